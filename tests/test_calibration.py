"""Calibration beside accuracy: ECE (15 equal-width bins), NLL and mean confidence per (domain, severity), against
hand-computed values and a plain loop over Guo et al.'s definition; in results.json, results.csv and as a table
metric."""
import csv
import math

import numpy as np
import pytest
import torch

from harness import report
from harness.calibration import ECE_BINS, CalibrationCounts
from harness.run import evaluate
from tests.synthetic import tiny_cfg, write_cifar_c


def two_class_logits(confidences_of_class0):
    p = torch.tensor(confidences_of_class0, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


def test_ece_nll_and_confidence_equal_the_hand_computed_values():
    # class-0 probabilities 0.9, 0.91, 0.62, 0.95, 0.55 (each the top one); labels: right, wrong, wrong, right, right
    logits = two_class_logits([0.9, 0.91, 0.62, 0.95, 0.55])
    labels = torch.tensor([0, 1, 1, 0, 0])
    counts = CalibrationCounts(1)
    counts.add(logits[:2], labels[:2], torch.zeros(2, dtype=torch.long))     # two batches, one segment
    counts.add(logits[2:], labels[2:], torch.zeros(3, dtype=torch.long))
    fields = counts.fields(0)
    # bins of width 1/15: 0.9 and 0.91 share (13/15, 14/15] (accuracy 1/2, confidence 0.905); 0.62, 0.95 and
    # 0.55 are alone in theirs. ECE = (2 |0.5 - 0.905| + |0 - 0.62| + |1 - 0.95| + |1 - 0.55|) / 5
    assert fields["ece"] == pytest.approx((0.81 + 0.62 + 0.05 + 0.45) / 5, abs=1e-12)
    assert fields["mean_confidence"] == pytest.approx(3.93 / 5, abs=1e-12)
    nll = -(math.log(0.9) + math.log(0.09) + math.log(0.38) + math.log(0.95) + math.log(0.55)) / 5
    assert fields["nll"] == pytest.approx(nll, abs=1e-12)
    bins = fields["calibration_bins"]
    assert bins["count"][13] == 2 and bins["count"][9] == 1 and bins["count"][14] == 1 and bins["count"][8] == 1
    assert sum(bins["count"]) == 5 and sum(bins["correct"]) == 3 and len(bins["count"]) == ECE_BINS


def plain_ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al. (2017), written as a loop over bins with their boundary rule lower < confidence <= upper."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for m in range(bins):
        lower, upper = m / bins, (m + 1) / bins
        inside = [i for i in range(len(labels)) if lower < confidence[i] <= upper]
        if inside:
            accuracy = np.mean([predicted[i] == labels[i] for i in inside])
            total += len(inside) / len(labels) * abs(accuracy - np.mean(confidence[inside]))
    return total


def test_per_segment_statistics_equal_a_plain_loop_per_segment():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (500, 10))
    labels = rng.integers(0, 10, 500)
    segment = rng.integers(0, 3, 500)
    counts = CalibrationCounts(3)
    for start in range(0, 500, 64):
        s = slice(start, start + 64)
        counts.add(torch.from_numpy(logits[s]).float(), torch.from_numpy(labels[s]), torch.from_numpy(segment[s]))
    for k in range(3):
        mine = segment == k
        fields = counts.fields(k)
        assert fields["ece"] == pytest.approx(plain_ece(logits[mine].astype(np.float32).astype(np.float64),
                                                        labels[mine]), abs=1e-9)
        log_probs = torch.log_softmax(torch.from_numpy(logits[mine]).float().double(), 1).numpy()
        assert fields["nll"] == pytest.approx(-np.mean(log_probs[np.arange(mine.sum()), labels[mine]]), abs=1e-9)
        assert sum(fields["calibration_bins"]["count"]) == mine.sum()


def test_runs_record_calibration_and_tables_show_it(tmp_path):
    write_cifar_c(tmp_path, ["fog", "snow"], per_severity=24)
    payload = evaluate(tiny_cfg("conf/cifar10_c/tent.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                                CORRUPTION__TYPE=["fog", "snow"], TEST__BATCH_SIZE=8), progress=False)
    for r in payload["records"]:
        bins = r["calibration_bins"]
        # the bins hold every image and every correct prediction the accuracy counts
        assert sum(bins["count"]) == r["n"] and sum(bins["correct"]) == r["correct"]
        assert r["ece"] == pytest.approx(sum(abs(c - s) for c, s in zip(bins["correct"], bins["confidence_sum"]))
                                         / r["n"])
        assert 0.1 <= r["mean_confidence"] <= 1 and r["nll"] > 0
    assert payload["summary"]["mean_ece"] == pytest.approx(np.mean([r["ece"] for r in payload["records"]]))
    with open(next((tmp_path / "out").rglob("results.csv")), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["ece"]) for row in rows[:2]] == pytest.approx([r["ece"] for r in payload["records"]])
    assert rows[-1]["domain"] == "mean" and float(rows[-1]["nll"]) == pytest.approx(payload["summary"]["mean_nll"])
    table = report.build_table([("tent", [payload])], metric="ece")
    assert [r.kind for r in table.rows] == ["measured"]           # no paper row: the paper reports accuracy
    assert [table.value(table.rows[0], c) for c in table.columns] == \
        pytest.approx([100 * r["ece"] for r in payload["records"]])
    assert "expected calibration error (%, 15 equal-width bins)" in report.to_markdown(table)
    # results written before calibration was recorded show no calibration cells, and say so
    old = {**payload, "records": [{k: v for k, v in r.items() if k in ("domain", "severity", "n", "correct",
                                                                         "accuracy", "error")}
                                  for r in payload["records"]]}
    empty = report.build_table([("tent", [old])], metric="nll")
    assert empty.rows[0].cells == {} and empty.rows[0].incomplete
    with pytest.raises(report.CompareError, match="metric must be one of accuracy, error, ece, nll, confidence"):
        report.build_table([("tent", [payload])], metric="brier")
