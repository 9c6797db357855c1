"""The table model of a comparison: columns (domain, severity), rows (a method's cells, the paper's, their
difference) and the table (rows x columns in one metric). Also the report's error."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from conf.errors import UserError


class CompareError(UserError):
    """Results cannot be read, combined or tabulated as asked."""


@dataclass(frozen=True)
class Column:
    domain: str
    severity: int
    occurrence: int = 0        # the k-th record with this (domain, severity) in a run (gradual repeats severities)


def record_columns(records: list[dict]) -> list[Column]:
    seen: dict[tuple, int] = {}
    columns = []
    for r in records:
        key = (r["domain"], int(r["severity"]))
        columns.append(Column(*key, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return columns


def column_labels(columns: list[Column]) -> list[str]:
    """The domain name alone where a domain has one column; domain@severity (and #k for repeats) otherwise."""
    per_domain: dict[str, int] = {}
    for c in columns:
        per_domain[c.domain] = per_domain.get(c.domain, 0) + 1
    labels = []
    for c in columns:
        name = "clean" if c.domain == "none" else c.domain      # the clean test set (CORRUPTION.TYPE none)
        if per_domain[c.domain] == 1:
            labels.append(name)
        else:
            labels.append(f"{name}@{c.severity}" + (f"#{c.occurrence + 1}" if c.occurrence else ""))
    return labels


# A table's metric: (the record field it shows, its scale, how the caption and axes name it). "error" shows
# 100 - accuracy (Table.value); the calibration fields are harness/calibration.py's.
METRICS = {"accuracy": ("accuracy", 100.0, "accuracy (%)"),
           "error": ("accuracy", 100.0, "error (%)"),
           "ece": ("ece", 100.0, "expected calibration error (%, 15 equal-width bins)"),
           "nll": ("nll", 1.0, "negative log-likelihood (nats)"),
           "confidence": ("mean_confidence", 100.0, "mean confidence (%)"),
           # per-class recall from the records' confusion counts (harness/class_counts.py)
           "balanced_accuracy": ("balanced_accuracy", 100.0, "balanced accuracy (%, mean per-class recall over the "
                                                             "classes present)"),
           "worst_class": ("worst_class_accuracy", 100.0, "worst-class accuracy (%, lowest per-class recall)"),
           # open-set runs (harness/open_set.py), by the run's declared OOD score
           "auroc": ("auroc", 100.0, "AUROC (%, ID vs OOD by the declared score)"),
           "fpr95": ("fpr95", 100.0, "FPR at 95% TPR (%, lower is better)"),
           "aupr_in": ("aupr_in", 100.0, "AUPR-in (%)"),
           "aupr_out": ("aupr_out", 100.0, "AUPR-out (%)"),
           "oscr": ("oscr", 100.0, "OSCR (%)"),
           # the cost of the method's calls (harness/cost.py), under each record's "cost"
           "seconds_per_image": ("cost.seconds_per_image", 1000.0, "wall time of the method per image (ms)"),
           "adapt_seconds_per_image": ("cost.adapt_seconds_per_image", 1000.0,
                                       "wall time of backward passes and optimizer steps per image (ms)"),
           "predict_seconds_per_image": ("cost.predict_seconds_per_image", 1000.0,
                                         "wall time of the method per image, adaptation's gradient work left out "
                                         "(ms)"),
           "peak_memory": ("cost.peak_memory_mib", 1.0, "peak memory of the task (MiB)")}


def record_value(record: dict, field: str):
    """A record's value of a METRICS field: a key of the record, or "cost.<key>" of its "cost" (None where absent,
    e.g. results written before the cost was recorded)."""
    if field.startswith("cost."):
        return (record.get("cost") or {}).get(field[len("cost."):])
    return record.get(field)


def payload_cells(payload, metric: str = "accuracy") -> dict[Column, float]:
    """{column: value} of one run's finished records in ``metric`` (accuracy % for accuracy and error); a record
    without the metric's field (results written before calibration was recorded) gives no cell."""
    field, scale, _ = METRICS[metric]
    values = [record_value(r, field) for r in payload["records"]]
    return {c: scale * v for c, v in zip(record_columns(payload["records"]), values) if v is not None}


def expected_columns(payload) -> list[Column]:
    """The columns a run has when it is complete: every (domain, severity) of its setting's tasks (written by the
    harness as ``expected``); for results written without that list, the records it holds."""
    expected = payload.get("expected")
    if expected is None:
        return record_columns(payload["records"])
    return record_columns([{"domain": d, "severity": s} for d, s in expected])


@dataclass
class Row:
    label: str
    kind: str                                   # "measured", "paper", "diff" or "tail"
    cells: dict                                 # Column -> accuracy % (mean over runs)
    std: dict = field(default_factory=dict)     # Column -> standard deviation over runs (with >= 2 runs)
    mean: float | None = None                   # mean of the cells shown (accuracy %)
    mean_std: float | None = None               # std over runs of each run's mean
    runs: int = 1
    seeds: list = field(default_factory=list)
    method: str = ""
    note: str = ""
    incomplete: list = field(default_factory=list)   # the runs of this row that lack some of their cells
    expected: list = field(default_factory=list)     # the columns its runs have when complete
    orders: list = field(default_factory=list)       # each run's stream order seed, where a run set TEST.ORDER_SEED
    tail: dict = field(default_factory=dict)         # Column -> mean of the worst runs (runs.tail_mean)
    mean_tail: float | None = None                   # the same over each run's mean
    extra: dict = field(default_factory=dict)        # extra column name -> mean over runs (Table.extra_columns)
    extra_std: dict = field(default_factory=dict)    # extra column name -> standard deviation over runs (>= 2 runs)


@dataclass
class Table:
    dataset: str
    columns: list[Column]
    rows: list[Row]
    metric: str = "accuracy"            # a key of METRICS (error = 100 - accuracy)
    domain_label: str = "corruption"
    notes: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)   # runs with missing cells (their rows show no mean)
    with_orders: bool = False           # some row pools runs over stream orders (its tail row, an orders column)
    # Columns right of the mean, by name (Row.extra): TEST.FORGETTING's, where some run of the table has them.
    # Each is "level" (accuracy %, shown as error under metric error) or "difference" (points, shown as it is).
    extra_columns: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return column_labels(self.columns)

    def value(self, row: Row, column) -> float | None:
        """The shown value of a cell (None for an empty cell), in the table's metric; column may be "mean"."""
        if column in self.extra_columns:
            v = row.extra.get(column)
            if v is not None and self.metric == "error" and self.extra_columns[column] == "level":
                return 100.0 - v
            return v
        v = row.mean if column == "mean" else row.cells.get(column)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if self.metric == "error" and row.kind != "diff":
            return 100.0 - v
        if self.metric == "error":
            return -v                     # measured - paper, in error points
        return v

    def spread(self, row: Row, column) -> float | None:
        if column in self.extra_columns:
            return row.extra_std.get(column)
        return row.mean_std if column == "mean" else row.std.get(column)
