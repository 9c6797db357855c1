"""Nothing silent, nothing late (issue 13): a run's identity covers what it reads, every input is checked before
the first batch, and every failure is one clear line. Each test is a case that was silent, late or unclear."""
import csv
import errno
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import conf.files
import test_time
from conf import ConfigError
from conf.files import WriteError
from datasets import DatasetError
from harness.report import load_results, tables_from_results, to_markdown
from harness.run import evaluate
from harness.task_records import ResumeError, task_locks
from models import WeightsError
from tests.synthetic import TINY_OPTS, tiny_cfg, write_cifar_c, write_image_folders

DOMAINS = ["gaussian_noise", "fog"]


def cfg_on(data, out, **overrides):
    return tiny_cfg("conf/cifar10_c/source.yaml", DATA_DIR=str(data), SAVE_DIR=str(out),
                    CORRUPTION__TYPE=overrides.pop("CORRUPTION__TYPE", DOMAINS), TEST__BATCH_SIZE=4, **overrides)


@pytest.fixture
def no_model_loading(monkeypatch):
    import harness.run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(harness.run, "build_zero_shot_clip", refuse)


# ---------------------------------------------------------------------------------------------- silent today
def test_other_data_never_resumes_the_first_datas_results(tmp_path):
    write_cifar_c(tmp_path / "a", DOMAINS, per_severity=8, seed=1)
    write_cifar_c(tmp_path / "b", DOMAINS, per_severity=8, seed=2)
    first = evaluate(cfg_on(tmp_path / "a", tmp_path / "out"), progress=False)
    with pytest.raises(ResumeError, match=r"computed on other data \(DATA_DIR .*/a then, .*/b now\)"):
        evaluate(cfg_on(tmp_path / "b", tmp_path / "out"), progress=False)
    # the same path with regenerated files (other content, same sizes): refused too
    write_cifar_c(tmp_path / "a", DOMAINS, per_severity=8, seed=3)
    os.utime(tmp_path / "a" / "CIFAR-10-C" / "fog.npy", ns=(1, 1))
    with pytest.raises(ResumeError, match="computed on other data .* modification times differ"):
        evaluate(cfg_on(tmp_path / "a", tmp_path / "out"), progress=False)
    # --restart computes it again; an untouched copy resumes
    again = evaluate(cfg_on(tmp_path / "b", tmp_path / "out", RESUME=False), progress=False)
    assert again["provenance"]["data"]["data_dir"] == str((tmp_path / "b").resolve())
    assert evaluate(cfg_on(tmp_path / "b", tmp_path / "out"), progress=False)["provenance"]["resumed_tasks"] == [0, 1]
    assert first["provenance"]["data"]["fingerprints"]["0"]["files"] == 2        # the corruption file and labels


def test_other_weights_never_resume(tmp_path):
    from models import load_clip
    write_cifar_c(tmp_path / "data", DOMAINS, per_severity=4)
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(load_clip("tiny-clip-test", "none").model.state_dict(), weights)
    payload = evaluate(cfg_on(tmp_path / "data", tmp_path / "out", MODEL__WEIGHTS=str(weights)), progress=False)
    assert len(payload["provenance"]["weights_sha256"]) == 64
    torch.manual_seed(1)
    torch.save(load_clip("tiny-clip-test", "none").model.state_dict(), weights)
    with pytest.raises(ResumeError, match="computed with other weights"):
        evaluate(cfg_on(tmp_path / "data", tmp_path / "out", MODEL__WEIGHTS=str(weights)), progress=False)


def test_a_table_over_an_incomplete_run_shows_missing_cells_and_no_mean(tmp_path, capsys):
    write_cifar_c(tmp_path / "data", ["gaussian_noise", "shot_noise", "fog"], per_severity=4)
    cfg = cfg_on(tmp_path / "data", tmp_path / "out", CORRUPTION__TYPE=["gaussian_noise", "shot_noise", "fog"],
                 RUN_DOMAINS=["gaussian_noise", "fog"])           # a run stopped before shot_noise
    payload = evaluate(cfg, progress=False)
    assert payload["complete"] is False
    (table,) = tables_from_results(load_results([tmp_path / "out"]), with_paper=False)
    row = next(line for line in to_markdown(table).splitlines() if line.startswith("| source"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] != "-" and cells[2] == "-" and cells[3] != "-" and cells[4] == "-"   # shot_noise, mean
    assert "incomplete, no mean" in to_markdown(table) and table.incomplete
    rows = list(csv.DictReader((Path(payload["provenance"]["save_dir"]) / "results.csv").open()))
    assert rows[-1]["domain"].startswith("mean (incomplete") and rows[-1]["accuracy"] == ""
    from tests.test_compare import _cli
    code, out = _cli(["--results", str(tmp_path / "out"), "--no-paper"], capsys)
    assert code == 0 and "warning: incomplete run" in out.err


def test_fractional_or_float_labels_are_refused_before_the_model_loads(tmp_path, no_model_loading):
    root = write_cifar_c(tmp_path, ["fog"], per_severity=4)
    np.save(root / "labels.npy", np.load(root / "labels.npy").astype(np.float32) + 0.5)
    with pytest.raises(DatasetError, match="labels.npy: expected integer class labels, got dtype float32"):
        evaluate(cfg_on(tmp_path, tmp_path / "out", CORRUPTION__TYPE=["fog"]), progress=False)
    assert not (tmp_path / "out").exists()


def test_other_image_sizes_are_read_and_recorded(tmp_path):
    write_cifar_c(tmp_path, ["fog"], per_severity=4, size=48)
    payload = evaluate(cfg_on(tmp_path, tmp_path / "out", CORRUPTION__TYPE=["fog"]), progress=False)
    assert payload["provenance"]["data"]["image_shapes"] == [[48, 48, 3]]
    assert payload["records"][0]["n"] == 4


# ---------------------------------------------------------------------------------------------- late today
def test_every_domains_layout_is_checked_before_the_first_batch(tmp_path, no_model_loading):
    from tests.test_domainbed import PACS_CLASSES
    for domain in ("art_painting", "cartoon"):
        write_image_folders(tmp_path / "PACS" / domain, PACS_CLASSES, per_class=1)
    cases = {"empty class folder": lambda: [p.unlink() for p in (tmp_path / "PACS" / "cartoon" / "dog").iterdir()],
             "extra class folder": lambda: (tmp_path / "PACS" / "cartoon" / "unicorn").mkdir(),
             "missing domain": lambda: (tmp_path / "PACS" / "cartoon").rename(tmp_path / "PACS" / "kartoon")}
    needles = {"empty class folder": "cartoon/dog holds no images", "extra class folder": "unicorn",
               "missing domain": "PACS/cartoon does not exist"}
    for case, damage in cases.items():
        damage()
        cfg = tiny_cfg("conf/pacs/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                       CORRUPTION__TYPE=["art_painting", "cartoon"])
        with pytest.raises(DatasetError, match=needles[case]):
            evaluate(cfg, progress=False)
        assert not (tmp_path / "out").exists(), case
        if case == "empty class folder":
            write_image_folders(tmp_path / "PACS" / "cartoon", ["dog"], per_class=1)
        if case == "extra class folder":
            (tmp_path / "PACS" / "cartoon" / "unicorn").rmdir()


# ---------------------------------------------------------------------------------------------- unclear today
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, no_model_loading):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    with pytest.raises(ConfigError, match="DEVICE cuda: no CUDA device is available here"):
        evaluate(cfg_on(tmp_path, tmp_path / "out", DEVICE="cuda"), progress=False)


@pytest.mark.parametrize("content, needle", [
    (b"", "is an empty file, not a checkpoint"),
    (b"PK\x03\x04 truncated zip", "cannot be read as a tiny-clip-test checkpoint"),
    (b"\x80\x04not a pickle", "cannot be read as a tiny-clip-test checkpoint"),
])
def test_corrupt_or_empty_checkpoint_is_one_line(tmp_path, capsys, content, needle):
    write_cifar_c(tmp_path / "data", DOMAINS, per_severity=4)
    (tmp_path / "w.pt").write_bytes(content)
    argv = ["--cfg", "conf/cifar10_c/source.yaml", *TINY_OPTS, "MODEL.WEIGHTS", str(tmp_path / "w.pt"),
            "DATA_DIR", str(tmp_path / "data"), "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", str(DOMAINS)]
    assert test_time.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err.strip().splitlines()[-1] and "Traceback" not in err and "weights_only" not in err


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    from models import load_clip
    torch.save(load_clip("tiny-clip-shapes", "none").model.state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="does not fit MODEL.ARCH tiny-clip-test .*another architecture"):
        load_clip("tiny-clip-test", str(tmp_path / "other.pt"))


def test_save_dir_under_a_file_or_read_only_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                            no_model_loading):
    write_cifar_c(tmp_path / "data", DOMAINS, per_severity=4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"SAVE_DIR .*/file/out/.*: .*/file is a file, not a folder"):
        evaluate(cfg_on(tmp_path / "data", tmp_path / "file" / "out"), progress=False)
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(conf.files.os, "access",
                        lambda path, mode: False if Path(path) == tmp_path / "ro" else real_access(path, mode))
    with pytest.raises(WriteError, match=r"SAVE_DIR .*/ro/out.* is not writable"):
        evaluate(cfg_on(tmp_path / "data", tmp_path / "ro" / "out"), progress=False)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    write_cifar_c(tmp_path / "data", DOMAINS, per_severity=4)
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("results.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)
    monkeypatch.setattr(conf.files.os, "replace", full)
    argv = ["--cfg", "conf/cifar10_c/source.yaml", "--no-progress", *TINY_OPTS, "DATA_DIR", str(tmp_path / "data"),
            "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", str(DOMAINS)]
    assert test_time.main(argv) == 2
    assert "results.json: No space left on device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_a_resume_file_of_the_wrong_type_is_one_line(tmp_path):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    payload = evaluate(cfg_on(tmp_path, tmp_path / "out"), progress=False)
    for content in ("[1, 2]", '{"task_index": 0, "records": 5}', '"text"'):
        (Path(payload["provenance"]["save_dir"]) / "tasks" / "task_0000.json").write_text(content)
        with pytest.raises(ResumeError, match="task_0000.json: unreadable task record"):
            evaluate(cfg_on(tmp_path, tmp_path / "out"), progress=False)


# ---------------------------------------------------------------------------------------------- also
def test_a_second_process_on_the_same_tasks_is_refused_with_the_first_ones_pid(tmp_path):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    cfg = cfg_on(tmp_path, tmp_path / "out")
    from harness.build import run_dir
    with task_locks(run_dir(cfg), [1]):                 # another process runs the fog task
        with pytest.raises(ResumeError, match=rf"task 1 is being run by pid {os.getpid()} on"):
            evaluate(cfg, progress=False)
        other_shard = evaluate(cfg_on(tmp_path, tmp_path / "out", RUN_DOMAINS=["gaussian_noise"]), progress=False)
        assert [r["domain"] for r in other_shard["records"]] == ["gaussian_noise"]
    assert len(evaluate(cfg, progress=False)["records"]) == 2      # released: the run resumes and finishes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_are_created_as_the_umask_says(tmp_path, umask):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    old = os.umask(umask)
    try:
        payload = evaluate(cfg_on(tmp_path, tmp_path / f"out{umask}"), progress=False)
    finally:
        os.umask(old)
    run = Path(payload["provenance"]["save_dir"])
    for path in [run / "results.json", run / "results.csv", run / "tasks" / "task_0000.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_orphan_temporary_files_are_removed_on_the_next_run(tmp_path):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    payload = evaluate(cfg_on(tmp_path, tmp_path / "out"), progress=False)
    run = Path(payload["provenance"]["save_dir"])
    dead = 2 ** 22 + 12345                               # above Linux's default pid_max: no such process
    orphan = run / f".results.json.{socket.gethostname()}.{dead}.tmp"
    busy = run / "tasks" / f".task_0001.json.{socket.gethostname()}.{os.getpid()}.tmp"
    orphan.write_text("half")
    busy.write_text("being written")
    evaluate(cfg_on(tmp_path, tmp_path / "out"), progress=False)
    assert not orphan.exists() and busy.exists()


def test_the_log_file_holds_our_records_only(tmp_path):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    payload = evaluate(cfg_on(tmp_path, tmp_path / "out"), progress=True)      # stderr is not a terminal here
    log = (Path(payload["provenance"]["save_dir"]) / "log.txt").read_text().splitlines()
    assert all(line.startswith("[") or line.startswith((" ", "corruption", "gaussian", "fog", "mean", "paper"))
               for line in log), log
    assert not any("\r" in line or "it/s" in line for line in log)
    assert not any("Parsing model identifier" in line or "Loaded built-in" in line for line in log)


def test_results_record_when_where_and_what(tmp_path):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    payload = evaluate(cfg_on(tmp_path, tmp_path / "out", RNG_SEED=7), progress=False)
    prov = payload["provenance"]
    assert prov["host"] == socket.gethostname() and prov["started_at"] <= prov["finished_at"]
    assert prov["weights_sha256"] is None and prov["seed"] == 7                  # random weights: no file
    rows = list(csv.DictReader((Path(prov["save_dir"]) / "results.csv").open()))
    assert {(r["seed"], r["config_hash"]) for r in rows} == {("7", prov["config_hash"])}
    assert json.loads((Path(prov["save_dir"]) / "results.json").read_text())["provenance"]["host"]


def test_prompt_modes_give_each_data_sets_own_templates():
    """coop and tda read the data set's declared lists (checked against the lists typed from CoOp's and TDA's
    code); a mode the data set lacks is refused in one line naming the mode and the modes it has."""
    import datasets
    from datasets.class_names import IMAGENET_TEMPLATES
    from tests.synthetic import tiny_cfg
    imagenet_a, imagenet_r = datasets.get_dataset("imagenet_a"), datasets.get_dataset("imagenet_r")
    cfg = tiny_cfg("conf/imagenet_a/source.yaml", CLIP__PROMPT_MODE="coop")
    assert imagenet_a.prompt_templates(cfg) == ["a photo of a {}."]
    cfg = tiny_cfg("conf/imagenet_a/source.yaml", CLIP__PROMPT_MODE="tda")
    assert imagenet_a.prompt_templates(cfg) == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                                                "a photo of the large {}.", "a {} in a video game.",
                                                "art of the {}.", "a photo of the small {}."]
    assert imagenet_r.prompt_templates(cfg) == IMAGENET_TEMPLATES and len(IMAGENET_TEMPLATES) == 80
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", CLIP__PROMPT_MODE="tda")
    with pytest.raises(datasets.DatasetError, match=r"CLIP.PROMPT_MODE tda: cifar10_c has no tda templates.*"
                                                     r"\['custom', 'ensemble'\]"):
        datasets.get_dataset("cifar10_c").prompt_templates(cfg)


# ---------------------------------------------------------------------------------------------- round two (issue 26)
@pytest.mark.parametrize("damage, needle", [
    (lambda path: path.write_bytes(b""), "is empty (0 bytes)"),
    (lambda path: path.write_bytes(b"<html>404 Not Found</html>"), "is not an image: it begins with b'<html>40'"),
])
def test_an_empty_or_damaged_image_is_refused_before_the_model_loads(tmp_path, no_model_loading, damage, needle):
    from tests.test_domainbed import PACS_CLASSES
    for domain in ("art_painting", "cartoon"):
        write_image_folders(tmp_path / "PACS" / domain, PACS_CLASSES, per_class=1)
    broken = tmp_path / "PACS" / "cartoon" / "dog" / "img_000.png"
    damage(broken)
    cfg = tiny_cfg("conf/pacs/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["art_painting", "cartoon"])
    with pytest.raises(DatasetError, match=re.escape(str(broken)) + ".*" + re.escape(needle)):
        evaluate(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    import harness.logs
    write_cifar_c(tmp_path / "data", DOMAINS, per_severity=4)

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(harness.logs.RunLogHandler, "format", full)     # inside emit: as a write that fails
    argv = ["--cfg", "conf/cifar10_c/source.yaml", "--no-progress", *TINY_OPTS, "DATA_DIR", str(tmp_path / "data"),
            "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", str(DOMAINS)]
    assert test_time.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot write the run's log ")
    assert err.strip().endswith("log.txt: No space left on device")


PLUGIN = '''
from methods.registry import register_method
from methods.source import Source


@register_method("{name}")
class Plugin(Source):
    pass  # {note}
'''


def test_two_plugin_files_of_one_name_are_refused_not_mixed_up(tmp_path):
    from conf import import_plugins
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same_name_plugin.py").write_text(PLUGIN.format(name=f"plugin_{folder}", note=""))
    import_plugins([str(tmp_path / "a" / "same_name_plugin.py")])
    import_plugins([str(tmp_path / "a" / "same_name_plugin.py")])        # the same file again: nothing to do
    with pytest.raises(ConfigError, match=r"b/same_name_plugin.py and .*a/same_name_plugin.py both import as "
                                          r"module 'extra_same_name_plugin' in this process .* but differ"):
        import_plugins([str(tmp_path / "b" / "same_name_plugin.py")])
    (tmp_path / "c").mkdir()          # a copy of the same code elsewhere is the same plug-in
    (tmp_path / "c" / "same_name_plugin.py").write_text((tmp_path / "a" / "same_name_plugin.py").read_text())
    import_plugins([str(tmp_path / "c" / "same_name_plugin.py")])


def test_a_plugin_file_edited_in_place_is_another_run(tmp_path):
    from harness.build import build_plan
    plugin = tmp_path / "edited_plugin.py"
    plugin.write_text(PLUGIN.format(name="edited_plugin", note="first"))
    write_cifar_c(tmp_path / "data", DOMAINS, per_severity=4)

    def cfg():
        return cfg_on(tmp_path / "data", tmp_path / "out", MODEL__EXTRA_MODULES=[str(plugin)],
                      MODEL__ADAPTATION="edited_plugin")
    payload = evaluate(cfg(), progress=False)
    assert payload["provenance"]["inputs"]["MODEL.EXTRA_MODULES edited_plugin.py"]["path"] == str(plugin)
    plugin.write_text(PLUGIN.format(name="edited_plugin", note="second"))
    with pytest.raises(ResumeError, match="computed with another MODEL.EXTRA_MODULES edited_plugin.py"):
        build_plan(cfg())


def test_a_domain_or_severity_listed_twice_is_refused_before_the_model_loads(tmp_path, no_model_loading):
    write_cifar_c(tmp_path, DOMAINS, per_severity=4)
    with pytest.raises(ConfigError, match=r"CORRUPTION.TYPE = \['fog', 'snow', 'fog'\] lists fog twice"):
        evaluate(cfg_on(tmp_path, tmp_path / "out", CORRUPTION__TYPE=["fog", "snow", "fog"]), progress=False)
    with pytest.raises(ConfigError, match=r"CORRUPTION.SEVERITY = \[5, 3, 5\] lists 5 twice"):
        evaluate(cfg_on(tmp_path, tmp_path / "out", CORRUPTION__SEVERITY=[5, 3, 5]), progress=False)
    assert not (tmp_path / "out").exists()


def test_compare_refuses_a_seed_given_twice(capsys):
    from tests.test_compare import _cli
    with pytest.raises(SystemExit):
        _cli(["--cfg", "conf/cifar10_c/source.yaml", "--methods", "source", "--seeds", "1", "2", "1"], capsys)
    assert "--seeds 1 2 1 gives a seed twice" in capsys.readouterr().err
