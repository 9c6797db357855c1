import json
from pathlib import Path

from harness.run import evaluate
from tests.synthetic import tiny_cfg, write_cifar_c


def test_source_end_to_end_on_synthetic_cifar10c(tmp_path):
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=12)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["gaussian_noise", "fog"], TEST__BATCH_SIZE=5)
    payload = evaluate(cfg, progress=False)
    assert [r["domain"] for r in payload["records"]] == ["gaussian_noise", "fog"]
    assert all(r["n"] == 12 for r in payload["records"])
    saved = json.loads((tmp_path / "out" / "cifar10_c" / "source").glob("*/results.json").__next__().read_text())
    assert saved["records"] == payload["records"]


def test_a_key_that_changes_nothing_is_logged_and_recorded(tmp_path):
    write_cifar_c(tmp_path, ["fog"], per_severity=4)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["fog"], TEST__WINDOW_LENGTH=2)
    payload = evaluate(cfg, progress=False)
    warning = "TEST.WINDOW_LENGTH = 2 has no effect in this suite"
    assert payload["provenance"]["config_warnings"][0].startswith(warning)
    assert warning in (Path(payload["provenance"]["save_dir"]) / "log.txt").read_text()
