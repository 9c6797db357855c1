"""Results are tabled only as their counts and task records say, and pooled only where the runs read the same
inputs: compare.py --results on real run folders, edited, moved and mixed as a user's folders get."""
import json
import shutil
from pathlib import Path

import pytest

from harness import report
from harness.report import CompareError
from harness.run import evaluate
from tests.synthetic import tiny_cfg, write_cifar_c
from tests.test_compare import _cli


def _run(data: Path, out: Path, seed: int, per_severity: int = 6) -> Path:
    if not data.exists():
        write_cifar_c(data, ["fog"], per_severity=per_severity)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", DATA_DIR=str(data), SAVE_DIR=str(out), CORRUPTION__TYPE=["fog"],
                   TEST__BATCH_SIZE=3, RNG_SEED=seed, TEST__STREAM_ORDER="suite")
    return Path(evaluate(cfg, progress=False)["provenance"]["save_dir"]) / "results.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Seeds 1 and 2 on one data set, seed 3 on another with more images: three real run folders."""
    root = tmp_path_factory.mktemp("pooling")
    a, b = root / "data_a", root / "data_b"
    write_cifar_c(b, ["fog"], per_severity=9)
    return {"root": root, "a1": _run(a, root / "out", 1), "a2": _run(a, root / "out", 2),
            "b3": _run(b, root / "out_b", 3)}


def _copy(runs, tmp_path, *names) -> Path:
    """The run folders of ``names`` under tmp_path/results (each with its task records)."""
    for name in names:
        src = runs[name].parent
        shutil.copytree(src, tmp_path / "results" / name / src.name)
    return tmp_path / "results"


def test_seeds_on_the_same_data_pool_and_other_data_gets_its_own_row(runs, tmp_path, capsys):
    folder = _copy(runs, tmp_path, "a1", "a2")
    (table,) = report.tables_from_results(report.load_results([folder]), with_paper=False)
    assert [row.runs for row in table.rows] == [2]
    folder = _copy(runs, tmp_path, "b3")
    code, out = _cli(["--results", str(folder), "--no-paper"], capsys)
    assert code == 0, out.err
    rows = [line for line in out.out.splitlines() if line.startswith("| source")]
    assert len(rows) == 2 and all("[data " in row for row in rows)
    with pytest.raises(CompareError, match="read other data for task 0"):
        report.aggregate(report.load_results([runs["a1"], runs["b3"]]))


def test_one_seed_twice_is_refused_not_pooled_as_two_seeds(runs, tmp_path):
    folder = _copy(runs, tmp_path, "a1")
    shutil.copytree(runs["a1"].parent, folder / "copy")
    with pytest.raises(CompareError, match="runs of one config, seed and data; pooled they would count as two"):
        report.tables_from_results(report.load_results([folder]))


def test_an_edited_results_file_is_refused(runs, tmp_path):
    folder = _copy(runs, tmp_path, "a1")
    (file,) = folder.rglob("results.json")
    good = json.loads(file.read_text())
    edited = json.loads(file.read_text())
    edited["records"][0]["accuracy"] = 0.99
    file.write_text(json.dumps(edited))
    with pytest.raises(CompareError, match=r"record 0 \(fog@5\): accuracy 0.99 / error .* are not its correct / n"):
        report.load_results([folder])
    edited = json.loads(json.dumps(good))
    edited["records"][0]["correct"] = edited["records"][0]["n"] + 1
    file.write_text(json.dumps(edited))
    with pytest.raises(CompareError, match="are not counts with 0 <= correct <= n"):
        report.load_results([folder])
    edited = json.loads(json.dumps(good))
    edited["summary"]["mean_accuracy"] = 0.5 if good["summary"]["mean_accuracy"] != 0.5 else 0.25
    file.write_text(json.dumps(edited))
    with pytest.raises(CompareError, match="summary.mean_accuracy .* is not the mean of its records"):
        report.load_results([folder])
    # consistent in itself, but not what the task records say: the records win
    edited = json.loads(json.dumps(good))
    record = edited["records"][0]
    record["correct"] = (record["correct"] + 1) % (record["n"] + 1)
    record["accuracy"] = record["correct"] / record["n"]
    record["error"] = 1 - record["accuracy"]
    edited["summary"] = report.runs.summarise(edited["records"])
    file.write_text(json.dumps(edited))
    with pytest.raises(CompareError, match=r"disagrees with the run's task records at fog@5"):
        report.load_results([folder])
    # a task the file lists as done whose record is gone
    file.write_text(json.dumps(good))
    (task,) = (file.parent / "tasks").glob("task_*.json")
    task.unlink()
    with pytest.raises(CompareError, match="lists task 0 as done, but its record .* cannot be read"):
        report.load_results([folder])
    # copied without its run folder, a file is checked against its own counts only
    shutil.rmtree(file.parent / "tasks")
    assert report.load_results([file])[0]["records"] == good["records"]


def test_a_run_folder_without_results_is_named_as_left_out(runs, tmp_path, capsys):
    folder = _copy(runs, tmp_path, "a1", "a2")
    stopped = next((folder / "a2").rglob("results.json"))
    stopped.unlink()
    code, out = _cli(["--results", str(folder), "--no-paper", "--out", str(tmp_path / "table"), "--figure", "none"],
                     capsys)
    assert code == 0, out.err
    assert f"warning: left out {stopped.parent}: task records but no results.json" in out.err
    assert f"left out {stopped.parent}" in (tmp_path / "table" / "comparison.md").read_text()
    rows = [line for line in out.out.splitlines() if line.startswith("| source")]
    assert len(rows) == 1


def test_a_record_the_run_never_streams_is_refused(runs, tmp_path):
    good = json.loads(runs["a1"].read_text())
    edited = json.loads(json.dumps(good))
    edited["records"].append(dict(edited["records"][0], domain="snow"))
    edited["summary"] = report.runs.summarise(edited["records"])
    file = tmp_path / "copied" / "results.json"         # copied without its task records
    file.parent.mkdir()
    file.write_text(json.dumps(edited))
    with pytest.raises(CompareError, match=r"record 1 \(snow@5\) is not one of the run's expected records"):
        report.load_results([file])
    edited["records"] = good["records"] * 2
    edited["summary"] = report.runs.summarise(edited["records"])
    file.write_text(json.dumps(edited))
    with pytest.raises(CompareError, match=r"record 1 \(fog@5\) is not one of the run's expected records .* or is "
                                           r"there twice"):
        report.load_results([file])
