"""test_time.py as a user runs it: a table of accuracy and error per corruption with the mean, results on disk,
and clear one-line errors (exit code 2) for bad input."""
import json
import logging

import pytest

import test_time
from tests.synthetic import write_cifar_c

TINY = ["MODEL.ARCH", "tiny-clip-test", "MODEL.WEIGHTS", "none", "TEST.NUM_WORKERS", "0", "DEVICE", "cpu"]


def test_cli_prints_the_per_corruption_table_and_writes_results(tmp_path, caplog, capsys):
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=6)
    argv = ["--cfg", "conf/cifar10_c/source.yaml", "--no-progress", *TINY, "DATA_DIR", str(tmp_path),
            "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "['gaussian_noise', 'fog']"]
    with caplog.at_level(logging.INFO):
        assert test_time.main(argv) == 0
    results = capsys.readouterr().out.strip().removeprefix("results: ")
    payload = json.loads(open(results).read())
    table = next(r.getMessage() for r in caplog.records if "acc %" in r.getMessage())
    for record in payload["records"]:
        line = next(line for line in table.splitlines() if line.startswith(record["domain"]))
        assert f"{100 * record['accuracy']:.2f}" in line and f"{100 * record['error']:.2f}" in line
    mean_line = next(line for line in table.splitlines() if line.startswith("mean"))
    assert f"{100 * payload['summary']['mean_accuracy']:.2f}" in mean_line


@pytest.mark.parametrize("extra, needle", [
    (["DATA_DIR", "/nonexistent/data"], "/nonexistent/data/CIFAR-10-C does not exist"),
    (["OPTIM.LRR", "1"], "Nearest valid keys"),
    (["MODEL.WEIGHTS", "/nonexistent/clip.pt"], "does not exist"),
])
def test_cli_bad_input_is_one_clear_error(tmp_path, capsys, extra, needle):
    argv = ["--cfg", "conf/cifar10_c/source.yaml", "--no-progress", *TINY, "SAVE_DIR", str(tmp_path), *extra]
    assert test_time.main(argv) == 2
    assert needle in capsys.readouterr().err
