import json

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
