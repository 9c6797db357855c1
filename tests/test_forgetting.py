"""TEST.FORGETTING (harness/forgetting.py): the clean set's frozen accuracy before and after a continual stream,
against independent computations (a source run on the clean set, a plain loop over deep-copied method states)."""
import copy
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from harness.build import ForgettingError, build_plan
from harness.forgetting import after_stream, before_stream, rng_states
from harness.identity import config_hash, identity_keys
from harness.report import tables_from_results, to_csv, to_latex, to_markdown
from harness.run import evaluate, prepare, run_tasks
from models import load_clip
from tests.synthetic import tiny_cfg, without_cost, write_cifar_c

DOMAINS = ["gaussian_noise", "fog"]
CLEAN_IMAGES = 20
BATCH = 8


def write_clean_cifar10(root, n: int = CLEAN_IMAGES, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """DATA_DIR/cifar-10-batches-py/test_batch in torchvision's format; returns (images (n, 32, 32, 3), labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    (root / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(n, -1), b"labels": labels.tolist()}, f)
    return images, labels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting")
    torch.manual_seed(3)
    checkpoint = root / "tiny.pt"
    torch.save(load_clip("tiny-clip-test", "none").model.state_dict(), checkpoint)
    write_cifar_c(root, DOMAINS, per_severity=24)
    images, labels = write_clean_cifar10(root)
    return {"root": root, "checkpoint": str(checkpoint), "images": images, "labels": labels}


def tent_cfg(data, save: str, **overrides):
    # A high learning rate, so that the stream visibly moves the adapted LayerNorms.
    settings = dict(MODEL__WEIGHTS=data["checkpoint"], DATA_DIR=str(data["root"]), SAVE_DIR=str(data["root"] / save),
                    CORRUPTION__TYPE=DOMAINS, SETTING="continual", TEST__BATCH_SIZE=BATCH, OPTIM__LR=0.05)
    return tiny_cfg("conf/cifar10_c/tent.yaml", **{**settings, **overrides})




@pytest.fixture(scope="module")
def runs(data):
    return {"with": evaluate(tent_cfg(data, "with", TEST__FORGETTING=True), progress=False),
            "without": evaluate(tent_cfg(data, "without"), progress=False)}


def test_the_stream_is_the_same_with_and_without_forgetting(runs):
    assert without_cost(runs["with"]["records"]) == without_cost(runs["without"]["records"])
    assert "forgetting" not in runs["without"]
    entry = runs["with"]["forgetting"]
    assert entry["clean_domain"] == "none" and entry["n"] == CLEAN_IMAGES
    assert entry["forgetting"] == entry["zero_shot_accuracy"] - entry["accuracy_after"]
    assert entry["zero_shot_accuracy"] == entry["correct_zero_shot"] / CLEAN_IMAGES
    assert entry["accuracy_after"] == entry["correct_after"] / CLEAN_IMAGES


def test_zero_shot_equals_a_source_run_on_the_clean_set(data, runs):
    source = evaluate(tiny_cfg("conf/cifar10_c/source.yaml", MODEL__WEIGHTS=data["checkpoint"],
                               DATA_DIR=str(data["root"]), SAVE_DIR=str(data["root"] / "source"),
                               CORRUPTION__TYPE=["none"], TEST__BATCH_SIZE=BATCH), progress=False)
    [clean] = source["records"]
    entry = runs["with"]["forgetting"]
    assert (entry["n"], entry["correct_zero_shot"]) == (clean["n"], clean["correct"])
    assert entry["zero_shot_record"]["confusion"] == clean["confusion"]


def test_after_is_a_plain_loop_over_copies_of_the_end_state_which_stays_unchanged(data, runs):
    plan = build_plan(tent_cfg(data, "manual", TEST__FORGETTING=True))
    state = prepare(plan)
    zero_shot = before_stream(plan, state)
    run_tasks(plan, state, progress=False)
    end_state = copy.deepcopy(state.method)
    parameters = {k: v.clone() for k, v in state.method.state_dict().items()}
    optimizer = copy.deepcopy(state.method.optimizer.state_dict())
    rng = rng_states()
    # The independent count: the clean images in the file's order (the authors' clean CIFAR stream), batch after
    # batch, each predicted by a fresh copy of the end state.
    correct = 0
    for start in range(0, CLEAN_IMAGES, BATCH):
        batch = torch.stack([state.transform(Image.fromarray(image)) for image in data["images"][start:start + BATCH]])
        predicted = copy.deepcopy(end_state)(batch).argmax(1)
        correct += int((predicted.numpy() == data["labels"][start:start + BATCH]).sum())

    entry = after_stream(plan, state, zero_shot)
    assert entry["correct_after"] == correct
    assert {k: entry[k] for k in ("correct_zero_shot", "correct_after")} == \
        {k: runs["with"]["forgetting"][k] for k in ("correct_zero_shot", "correct_after")}
    after = state.method.state_dict()
    assert after.keys() == parameters.keys() and all(torch.equal(after[k], parameters[k]) for k in parameters)
    assert repr(state.method.optimizer.state_dict()) == repr(optimizer)
    now = rng_states()
    assert torch.equal(now["torch"], rng["torch"]) and now["random"] == rng["random"]
    assert all(np.array_equal(a, b) for a, b in zip(now["numpy"], rng["numpy"]))
    # The stream moved the adapted parameters away from the source state: "after" is not the zero-shot state.
    source = state.method._snapshot["module"]
    assert any(not torch.equal(after[k], source[k]) for k in source if k in after and after[k].is_floating_point())


def test_measuring_twice_gives_the_same_record(data):
    """The measurement adapts nothing and starts every batch from the RNG states it found: measured again from the
    same state (other RNG states drawn in between) it gives the same record."""
    plan = build_plan(tent_cfg(data, "twice", TEST__FORGETTING=True))
    state = prepare(plan)
    zero_shot = before_stream(plan, state)
    random.random(), np.random.rand(), torch.rand(1)
    assert before_stream(plan, state) == zero_shot


def test_results_csv_has_the_clean_rows(data, runs):
    import csv
    rows = list(csv.DictReader(open(next((data["root"] / "with").rglob("results.csv")))))
    entry = runs["with"]["forgetting"]
    clean = {r["domain"]: r for r in rows if r["domain"].startswith("none")}
    assert int(clean["none (zero-shot)"]["correct"]) == entry["correct_zero_shot"]
    assert int(clean["none (after)"]["correct"]) == entry["correct_after"]
    rows_without = list(csv.DictReader(open(next((data["root"] / "without").rglob("results.csv")))))
    assert [r["domain"] for r in rows_without] == DOMAINS + ["mean"]


def test_the_key_at_its_default_stays_out_of_the_identity(data):
    off, on = tent_cfg(data, "x"), tent_cfg(data, "x", TEST__FORGETTING=True)
    assert "TEST.FORGETTING" not in identity_keys(off)
    assert identity_keys(on)["TEST.FORGETTING"] is True
    assert config_hash(off) != config_hash(on)
    # The hash of a config without the key (as written before it existed) is the hash of today's default.
    dumped = off.clone()
    dumped.defrost()
    del dumped.TEST["FORGETTING"]
    assert config_hash(dumped) == config_hash(off)


@pytest.mark.parametrize("overrides, message", [
    (dict(SETTING="reset_each_shift"), "resets the method again at fog"),
    (dict(MODEL__EPISODIC=True), "MODEL.EPISODIC True resets the method before every batch"),
    (dict(RUN_DOMAINS=["gaussian_noise"]), r"RUN_DOMAINS \['gaussian_noise'\] leaves out \['fog'\]"),
])
def test_refused_where_it_means_nothing(data, overrides, message):
    with pytest.raises(ForgettingError, match=message):
        tent_cfg(data, "refused", TEST__FORGETTING=True, **overrides)


def test_refused_without_a_clean_domain():
    with pytest.raises(ForgettingError, match="shapes_c has no clean domain 'none'"):
        tiny_cfg("conf/shapes_c/tent.yaml", SETTING="continual", TEST__FORGETTING=True)


def test_table_columns_hold_the_records_numbers(runs):
    entry = runs["with"]["forgetting"]
    [table] = tables_from_results([runs["with"], runs["without"]], with_paper=False)
    markdown = to_markdown(table)
    assert "| method | gaussian_noise | fog | mean | clean (after) | forgetting |" in markdown
    lines = [line for line in markdown.splitlines() if line.startswith("| tent")]
    with_row = [line for line in lines if f"| {100 * entry['accuracy_after']:.2f} | " in line]
    assert with_row and with_row[0].endswith(f"| {100 * entry['accuracy_after']:.2f} | "
                                             f"{100 * entry['forgetting']:.2f} |")
    assert any(line.endswith("| - | - |") for line in lines)            # the run without the measurement
    assert f"{100 * entry['forgetting']:.4f}" in to_csv(table)
    assert r"clean (after) & forgetting \\" in to_latex(table)
    [error] = tables_from_results([runs["with"]], metric="error", with_paper=False)
    assert to_markdown(error).splitlines()[-3].endswith(f"| {100 - 100 * entry['accuracy_after']:.2f} | "
                                                        f"{100 * entry['forgetting']:.2f} |")
    # A table of runs without the measurement keeps its columns.
    [plain] = tables_from_results([runs["without"]], with_paper=False)
    assert "| method | gaussian_noise | fog | mean |" in to_markdown(plain)
    assert to_csv(plain).splitlines()[0].endswith(",mean std")


def test_a_resumed_run_carries_its_measurement_or_says_why_not(data, runs):
    import json
    again = evaluate(tent_cfg(data, "with", TEST__FORGETTING=True), progress=False)      # every task read back
    assert again["provenance"]["resumed_tasks"] == [0, 1]
    assert again["forgetting"] == runs["with"]["forgetting"]
    results = next((data["root"] / "with").rglob("results.json"))
    payload = json.loads(results.read_text())
    del payload["forgetting"]
    results.write_text(json.dumps(payload))
    entry = evaluate(tent_cfg(data, "with", TEST__FORGETTING=True), progress=False)["forgetting"]
    assert entry["clean_domain"] == "none" and "did not run the whole stream" in entry["not_measured"]
    assert "accuracy_after" not in entry


def test_a_missing_clean_set_is_refused_before_any_model_loads(data, tmp_path):
    from datasets import DatasetError
    write_cifar_c(tmp_path, DOMAINS, per_severity=24)
    with pytest.raises(DatasetError, match="TEST.FORGETTING True reads the clean set 'none': .*test_batch does not "
                                           "exist"):
        build_plan(tent_cfg(data, "missing", TEST__FORGETTING=True, DATA_DIR=str(tmp_path)))


def test_runs_of_a_row_pool_as_mean_and_std_and_a_run_without_empties_the_cells():
    from harness.report.table import _forgetting_cells
    runs = [{"forgetting": {"accuracy_after": 0.5, "forgetting": 0.1}},
            {"forgetting": {"accuracy_after": 0.7, "forgetting": -0.05}}]
    cells, spread = _forgetting_cells(runs)
    assert cells == pytest.approx({"clean (after)": 60.0, "forgetting": 2.5})
    assert spread == pytest.approx({"clean (after)": np.std([50.0, 70.0], ddof=1),
                                    "forgetting": np.std([10.0, -5.0], ddof=1)})
    assert _forgetting_cells(runs + [{"forgetting": {"clean_domain": "none", "not_measured": "..."}}]) == ({}, {})
    assert _forgetting_cells(runs + [{}]) == ({}, {})
