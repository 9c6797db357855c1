"""Every file that shapes a run's result enters its identity by content: list and split files, prompt files, the
weights. An edited file is another run: not resumed from the old records, not pooled with the old results."""
import hashlib
import json
from pathlib import Path

import pytest

from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import build_plan
from harness.report import CompareError, aggregate, group_runs, load_results
from harness.run import evaluate
from harness.task_records import ResumeError
from tests.synthetic import tiny_cfg, write_cifar_c, write_imagenet_c


def _imagenet_c(tmp_path) -> tuple[Path, Path]:
    from datasets.imagenet_c import imagenet_wnids
    entries = write_imagenet_c(tmp_path / "data", ["snow"], wnids=[imagenet_wnids()[i] for i in (1, 2, 3)],
                               per_class=2, size=32)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(entries) + "\n")
    return tmp_path / "data", listing


def _imagenet_cfg(data, listing, out, **overrides):
    return tiny_cfg("conf/imagenet_c/source.yaml", DATA_DIR=str(data), SAVE_DIR=str(out), CORRUPTION__TYPE=["snow"],
                    CORRUPTION__IMAGENET_C_LIST=str(listing), TEST__BATCH_SIZE=2, **overrides)


def test_an_image_list_edited_in_place_is_another_run(tmp_path):
    data, listing = _imagenet_c(tmp_path)
    first = evaluate(_imagenet_cfg(data, listing, tmp_path / "out"), progress=False)
    recorded = first["provenance"]["inputs"]["CORRUPTION.IMAGENET_C_LIST"]
    assert recorded == {"path": str(listing.resolve()), "sha256": hashlib.sha256(listing.read_bytes()).hexdigest()}
    # the same images in another order: the same size, the same image files, another stream
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(ResumeError, match=r"computed with another CORRUPTION.IMAGENET_C_LIST \(sha256 .* then, .* "
                                          r"now: the file was edited or replaced\)"):
        build_plan(_imagenet_cfg(data, listing, tmp_path / "out"))
    second = evaluate(_imagenet_cfg(data, listing, tmp_path / "again"), progress=False)
    with pytest.raises(CompareError, match="read another CORRUPTION.IMAGENET_C_LIST"):
        aggregate([first, second])
    assert len(group_runs(load_results([tmp_path / "out", tmp_path / "again"]))) == 2
    # a line given twice would count its image twice
    listing.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(Exception, match=f"{listing} lists {lines[0]} twice \\(line 1 and line {len(lines) + 1}\\)"):
        build_plan(_imagenet_cfg(data, listing, tmp_path / "third"))


def _cupl(path: Path, suffix: str = "") -> Path:
    path.write_text(json.dumps({n: [f"A {n} seen from afar{suffix}.", f"Some {n}."] for n in CIFAR10_CLASSES}))
    return path


def test_a_prompt_file_edited_in_place_is_another_run(tmp_path):
    write_cifar_c(tmp_path / "data", ["fog"], per_severity=4)
    cupl = _cupl(tmp_path / "cupl.json")

    def cfg(out):
        return tiny_cfg("conf/cifar10_c/source.yaml", MODEL__ADAPTATION="dpe", DATA_DIR=str(tmp_path / "data"),
                        SAVE_DIR=str(out), CORRUPTION__TYPE=["fog"], DPE__TEXT_PROTOTYPES="templates_and_cupl",
                        DPE__CUPL_PROMPTS=str(cupl), TEST__N_AUGMENTATIONS=2, DPE__SELECTION_P=0.5,
                        DPE__MIXED_PRECISION=False)
    plan = build_plan(cfg(tmp_path / "out"))
    assert plan.inputs["DPE.CUPL_PROMPTS"]["sha256"] == hashlib.sha256(cupl.read_bytes()).hexdigest()
    evaluate(plan, progress=False)
    _cupl(cupl, "!")             # one character more: another prompt, another text prototype
    with pytest.raises(ResumeError, match="computed with another DPE.CUPL_PROMPTS"):
        build_plan(cfg(tmp_path / "out"))
    cupl.unlink()
    cupl.mkdir()
    with pytest.raises(ConfigError, match=f"DPE.CUPL_PROMPTS = '{cupl}': a folder, not a file"):
        build_plan(cfg(tmp_path / "out"))


def test_records_without_the_content_of_a_file_the_run_reads_are_not_resumed(tmp_path):
    data, listing = _imagenet_c(tmp_path)
    payload = evaluate(_imagenet_cfg(data, listing, tmp_path / "out"), progress=False)
    (task,) = (Path(payload["provenance"]["save_dir"]) / "tasks").glob("task_*.json")
    stored = json.loads(task.read_text())
    del stored["inputs"]          # as a record written before these were recorded
    task.write_text(json.dumps(stored))
    with pytest.raises(ResumeError, match="no record of its content then"):
        build_plan(_imagenet_cfg(data, listing, tmp_path / "out"))
