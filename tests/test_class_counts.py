"""Per-class accuracy beside accuracy (harness/class_counts.py): the confusion counts of every record against a
plain loop over (label, prediction) pairs, balanced and worst-class accuracy against hand-computed values and
scikit-learn; in results.json, results.csv, merged shards and tables; on open-set streams, the ID images only."""
import copy
import csv
import importlib.util
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import harness.task_run
from harness import report
from harness.calibration import CalibrationCounts
from harness.class_counts import ClassCounts, class_fields
from harness.run import evaluate
from tests.synthetic import tiny_cfg, without_cost, write_cifar_c

skm = pytest.importorskip("sklearn.metrics")     # a test dependency (pyproject's test extra)

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["zero", "one", "two", "three"]


def add_pairs(counts: ClassCounts, pairs, segment: int = 0) -> None:
    labels, predicted = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    counts.add(labels, predicted, torch.full((len(pairs),), segment))


def test_counts_balanced_and_worst_class_equal_the_hand_computed_values():
    counts = ClassCounts(1, NAMES)
    add_pairs(counts, [(0, 0), (2, 0), (0, 1)])           # two batches, one segment
    add_pairs(counts, [(1, 1), (0, 0), (2, 3)])
    fields = counts.fields(0)
    # class 0: 2 of 3 right, class 1: 1 of 1, class 2: 0 of 2; class 3 is predicted but has no image: not counted
    assert fields["confusion"] == [[0, 0, 2], [0, 1, 1], [1, 1, 1], [2, 0, 1], [2, 3, 1]]
    assert fields["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-15)
    assert (fields["worst_class_accuracy"], fields["worst_class"], fields["worst_class_name"]) == (0.0, 2, "two")


def test_ties_take_the_smallest_class_and_an_empty_record_has_no_value():
    fields = class_fields([[3, 1, 2], [1, 3, 1], [2, 2, 1]], NAMES)       # classes 1 and 3 both at 0
    assert (fields["worst_class"], fields["worst_class_name"], fields["balanced_accuracy"]) == (1, "one", 1 / 3)
    empty = ClassCounts(2, NAMES)
    add_pairs(empty, [(0, 0)], segment=1)
    fields = empty.fields(0)
    assert fields["confusion"] == [] and math.isnan(fields["balanced_accuracy"])
    assert math.isnan(fields["worst_class_accuracy"]) and fields["worst_class"] is None


def test_per_segment_counts_equal_a_plain_loop_and_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 4, 5, 6], 600)          # class 3 never a label, sometimes a prediction
    predicted = np.where(rng.random(600) < 0.4, labels, rng.integers(0, 7, 600))
    segment = rng.integers(0, 3, 600)
    counts = ClassCounts(3)
    for start in range(0, 600, 64):
        s = slice(start, start + 64)
        counts.add(torch.from_numpy(labels[s]), torch.from_numpy(predicted[s]), torch.from_numpy(segment[s]))
    for k in range(3):
        cells = Counter()
        for label, guess, seg in zip(labels, predicted, segment):
            if seg == k:
                cells[(int(label), int(guess))] += 1
        fields = counts.fields(k)
        assert fields["confusion"] == [[t, p, c] for (t, p), c in sorted(cells.items())]
        mine = segment == k
        recall = {c: np.mean(predicted[mine][labels[mine] == c] == c) for c in sorted(set(labels[mine]))}
        with warnings.catch_warnings():      # "y_pred contains classes not in y_true": the absent class 3
            warnings.simplefilter("ignore")
            expected = skm.balanced_accuracy_score(labels[mine], predicted[mine])
        assert fields["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)
        assert fields["balanced_accuracy"] == pytest.approx(np.mean(list(recall.values())), abs=1e-12)
        assert fields["worst_class_accuracy"] == min(recall.values())
        assert fields["worst_class"] == min(c for c in recall if recall[c] == min(recall.values()))


# A training-free method whose predictions vary from image to image (the tiny CLIP predicts one class on noise):
# logits = the first C values of the transformed image.
PROBE = '''
import torch
from methods.base import TRAINING_FREE, TTAMethod
from methods.registry import register_method

@register_method("class_counts_probe")
class ClassCountsProbe(TTAMethod):
    protocol = TRAINING_FREE

    @torch.no_grad()
    def forward_and_adapt(self, x):
        return x.flatten(1)[:, :self.model(x).shape[1]].float()
'''
DOMAINS = ["fog", "snow"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "class_counts_probe_method.py"
    path.write_text(PROBE)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar_c(root, DOMAINS, per_severity=24)
    write_cifar_c(root, DOMAINS, per_severity=24, num_classes=100, folder="CIFAR-100-C", seed=1)
    return root


def run(probe, data, save_dir, **overrides):
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", MODEL__EXTRA_MODULES=[probe], MODEL__ADAPTATION="class_counts_probe",
                   DATA_DIR=str(data), SAVE_DIR=str(save_dir), CORRUPTION__TYPE=DOMAINS, TEST__BATCH_SIZE=8,
                   **overrides)
    return evaluate(cfg, progress=False)


@pytest.fixture
def seen_pairs(monkeypatch):
    """(segment, label, prediction) of every image the harness counts, from what calibration is given."""
    pairs = []

    class Spy(CalibrationCounts):
        def add(self, logits, labels, segment):
            pairs.extend(zip(segment.tolist(), labels.tolist(), logits.argmax(1).tolist()))
            super().add(logits, labels, segment)
    monkeypatch.setattr(harness.task_run, "CalibrationCounts", Spy)
    return pairs


def test_records_carry_the_counts_of_the_predictions_and_tables_show_them(probe, data, tmp_path, seen_pairs):
    payload = run(probe, data, tmp_path / "out")
    records = payload["records"]
    for k, r in enumerate(records):
        cells = Counter((t, p) for _, t, p in seen_pairs[24 * k:24 * (k + 1)])     # one task per domain, in order
        assert r["confusion"] == [[t, p, c] for (t, p), c in sorted(cells.items())]
        assert sum(c for _, _, c in r["confusion"]) == r["n"] == 24
        assert sum(c for t, p, c in r["confusion"] if t == p) == r["correct"]
        recall = {t: cells[(t, t)] / sum(c for (u, _), c in cells.items() if u == t) for t, _ in cells}
        assert r["balanced_accuracy"] == pytest.approx(sum(recall.values()) / len(recall))
        assert r["worst_class_accuracy"] == min(recall.values())
        assert r["worst_class_name"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                         "ship", "truck"][r["worst_class"]]
    assert len({p for _, _, p in seen_pairs}) > 3 and 0 < records[0]["correct"] < 24     # a varied stream
    summary = payload["summary"]
    assert summary["mean_balanced_accuracy"] == pytest.approx(np.mean([r["balanced_accuracy"] for r in records]))
    assert summary["mean_worst_class_accuracy"] == pytest.approx(np.mean([r["worst_class_accuracy"] for r in records]))
    with open(next((tmp_path / "out").rglob("results.csv")), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["balanced_accuracy"]) for row in rows[:2]] == pytest.approx([r["balanced_accuracy"]
                                                                                   for r in records])
    assert rows[-1]["domain"] == "mean"
    assert float(rows[-1]["worst_class_accuracy"]) == pytest.approx(summary["mean_worst_class_accuracy"])
    for metric, field in (("balanced_accuracy", "balanced_accuracy"), ("worst_class", "worst_class_accuracy")):
        table = report.build_table([("probe", [payload])], metric=metric)
        assert [r.kind for r in table.rows] == ["measured"]           # the paper reports accuracy only
        assert [table.value(table.rows[0], c) for c in table.columns] == pytest.approx([100 * r[field]
                                                                                        for r in records])
    assert "balanced accuracy (%, mean per-class recall over the classes present)" in report.to_markdown(
        report.build_table([("probe", [payload])], metric="balanced_accuracy"))


def test_compare_script_tabulates_worst_class_accuracy(probe, data, tmp_path, capsys):
    payload = run(probe, data, tmp_path / "out")
    spec = importlib.util.spec_from_file_location("compare_script", ROOT / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    assert compare.main(["--results", str(tmp_path / "out"), "--metric", "worst_class", "--figure", "none"]) == 0
    text = capsys.readouterr().out
    assert "worst-class accuracy (%, lowest per-class recall)" in text
    assert f"{100 * payload['records'][0]['worst_class_accuracy']:.2f}" in text


def test_merged_shards_equal_the_unsharded_run_and_recompute_from_the_counts(probe, data, tmp_path):
    whole = run(probe, data, tmp_path / "whole")
    shards = [run(probe, data, tmp_path / f"m{k}", RUN_DOMAINS=[domain]) for k, domain in enumerate(DOMAINS)]
    merged = report.merge(shards)
    assert without_cost(merged["records"]) == without_cost(whole["records"]) and merged["complete"]
    for key in ("mean_balanced_accuracy", "mean_worst_class_accuracy"):
        assert merged["summary"][key] == whole["summary"][key]
    # the per-class fields of a merged record come from its counts, not from what the shard wrote beside them
    edited = copy.deepcopy(shards)
    edited[0]["records"][0].update(balanced_accuracy=0.99, worst_class_accuracy=0.98, worst_class=7)
    recounted = report.merge(edited)["records"][0]
    # the name of class 7 was not its
    assert without_cost([recounted]) == [{**without_cost(whole["records"])[0], "worst_class_name": None}]
    edited[0]["records"][0]["confusion"][0][2] += 1
    with pytest.raises(report.CompareError, match=r"fog@5: its confusion counts \d+ correct of 25 images, not"):
        report.merge(edited)
    twice = copy.deepcopy(shards[0])
    twice["records"][0]["confusion"] = _moved_one_image(twice["records"][0]["confusion"])
    with pytest.raises(report.CompareError, match=r"fog@5: shards disagree in their confusion counts"):
        report.merge([shards[0], shards[1], twice])


def _moved_one_image(confusion: list) -> list:
    """The same n and correct: one wrong image moved to another wrong class."""
    cells = {(t, p): c for t, p, c in confusion}
    t, p = next(key for key in cells if key[0] != key[1])
    other = next(q for q in range(10) if q not in (t, p))
    cells[(t, p)] -= 1
    cells[(t, other)] = cells.get((t, other), 0) + 1
    return [[t, p, c] for (t, p), c in sorted(cells.items()) if c]


def test_an_open_set_run_counts_the_id_images_only(probe, data, tmp_path):
    closed = run(probe, data, tmp_path / "closed")
    mixed = run(probe, data, tmp_path / "open", OPEN_SET__OOD_DATASET="cifar100_c", OPEN_SET__RATIO=0.5)
    for open_record, closed_record in zip(mixed["records"], closed["records"]):
        assert open_record["n_ood"] == 12 and sum(c for _, _, c in open_record["confusion"]) == 24
        # the probe classifies each image alone: its ID images get the closed-set run's predictions
        for field in ("confusion", "balanced_accuracy", "worst_class_accuracy", "worst_class"):
            assert open_record[field] == closed_record[field]
    header = (Path(mixed["provenance"]["save_dir"]) / "results.csv").read_text().splitlines()[0].split(",")
    assert {"balanced_accuracy", "worst_class_accuracy", "auroc"} <= set(header)
