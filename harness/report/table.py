"""Comparison tables from runs: one row per config (seeds pooled), the paper's row and the difference beside every
method the paper reports, one table per data set."""
from __future__ import annotations

from harness.report import paper
from harness.report.model import METRICS, CompareError, Column, Row, Table
from harness.report.runs import _mean, _std, aggregate, group_runs, run_config, tail_count

# The record fields of open-set runs' metrics (harness/open_set.py; reporting imports nothing of the running code).
OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "oscr")


def _row_mean(row: Row, columns: list[Column]) -> float | None:
    shown = [row.cells[c] for c in columns if c in row.cells]
    return _mean(shown) if shown else None


def _tail_row(row: Row) -> Row:
    """The row of ``row``'s tail statistic: per cell and for the mean, the mean of its worst runs."""
    worst = tail_count(row.runs)
    return Row(f"{row.label} (tail: worst {worst} of {row.runs})", "tail", dict(row.tail), mean=row.mean_tail,
               method=row.method, runs=0, orders=list(row.orders))


# TEST.FORGETTING's columns (results.json's "forgetting", harness/forgetting.py) right of the mean: name -> (the
# entry's field, Table.extra_columns' kind). Accuracy and error tables only: the entry is in accuracy.
FORGETTING_COLUMNS = {"clean (after)": ("accuracy_after", "level"), "forgetting": ("forgetting", "difference")}
FORGETTING_NOTE = ("clean (after): accuracy on the clean set (domain none) of the method's state at the end of the "
                   "stream, frozen; forgetting: the clean set's zero-shot accuracy minus clean (after), in points "
                   "(TEST.FORGETTING); '-' where a run of the row has no such measurement")


def _forgetting_cells(runs: list[dict]) -> tuple[dict, dict]:
    """(column -> mean over runs, column -> std over runs) of TEST.FORGETTING's columns, in accuracy % / points;
    empty where some run lacks the measurement (as a cell is shown only where every run has it)."""
    entries = [p.get("forgetting") or {} for p in runs]
    if not all(all(key in e for key, _ in FORGETTING_COLUMNS.values()) for e in entries):
        return {}, {}
    values = {name: [100.0 * e[key] for e in entries] for name, (key, _) in FORGETTING_COLUMNS.items()}
    return ({name: _mean(v) for name, v in values.items()},
            {name: _std(v) for name, v in values.items()} if len(runs) > 1 else {})


TAIL_NOTE = ("tail: per cell, the mean of the row's worst ceil(n/10) runs (at least one) of its n runs over stream "
             "orders (TEST.ORDER_SEED), OGA's expected tail accuracy (Fuchs et al. 2025: the mean accuracy of the "
             "worst 10% of runs); its mean column is the tail of the runs' means")


def _paper_rows(dataset: str, row: Row, runs: list[dict], columns: list[Column]) -> tuple[list[Row], str | None]:
    """The paper's row and the difference (measured - paper) under ``row``, and the note naming the paper; none
    where the paper does not report that method on that data set at the same severity."""
    reference = paper.paper_row_for_run(dataset, row.method, run_config(runs[0]))
    shown = paper.comparable_reference(reference, runs[0]["records"])
    printed_mean = paper.comparable_mean(reference, runs[0]["records"])
    if not shown and printed_mean is None:
        return [], None
    cells = {c: shown[c.domain] for c in row.cells if c.domain in shown} if shown else {}
    paper_row = Row(f"{row.label} (paper)", "paper", cells, method=row.method, runs=0)
    paper_row.mean = (printed_mean if printed_mean is not None
                      else _mean(list(cells.values())) if len(cells) == len(columns) else None)
    diff = {c: row.cells[c] - cells[c] for c in cells}
    diff_row = Row(f"{row.label} - paper", "diff", diff, method=row.method, runs=0)
    if paper_row.mean is not None and row.mean is not None:
        diff_row.mean = row.mean - paper_row.mean
    cfg = run_config(runs[0])
    mismatch = paper.protocol_mismatch(reference, (cfg.get("MODEL") or {}).get("ARCH"),
                                       (cfg.get("MODEL") or {}).get("WEIGHTS"), runs[0].get("setting"))
    note = f"{row.label} (paper): {reference.paper_method}"
    if reference.source != paper.BATCLIP_PAPER:
        note += f" as reported in {reference.source}"
    if printed_mean is not None:
        note += f", printed mean only (over its {len(reference.mean_over)} domains)"
    elif reference.reported_mean is not None:
        note += (f", printed mean {reference.reported_mean:.2f} over its {len(reference.accuracy)} domains "
                 f"(mean of its printed cells {reference.mean_of(list(reference.accuracy)):.2f})")
    if mismatch:
        note += "; measured with " + ", ".join(mismatch)
    return [paper_row, diff_row], note


def build_table(groups: list[tuple[str, list[dict]]], metric: str = "accuracy", with_paper: bool = True) -> Table:
    """groups: (row label, runs of one config) in row order; every run must be on one data set. Rows are the
    aggregated runs, each followed by the paper's row and the difference (measured - paper) where the paper
    reports that method on that data set at the same severity."""
    if metric not in METRICS:
        raise CompareError(f"metric must be one of {', '.join(METRICS)}, got '{metric}'")
    with_paper = with_paper and metric in ("accuracy", "error")      # the paper reports accuracy only
    if not groups:
        raise CompareError("no results to tabulate")
    datasets = {p["dataset"] for _, runs in groups for p in runs}
    if len(datasets) != 1:
        raise CompareError(f"one table per data set: these results cover {sorted(datasets)}")
    dataset = datasets.pop()
    records = [r for _, runs in groups for p in runs for r in p["records"]]
    if metric in OOD_METRICS and records and not any(metric in r for r in records):
        raise CompareError(f"--metric {metric}: these results are closed-set runs, without OOD records (an open-set "
                           f"run sets OPEN_SET.OOD_DATASET, docs/open_set.md)")
    measured = [aggregate(runs, label, metric) for label, runs in groups]
    columns: list[Column] = []
    for row in measured:
        columns += [c for c in row.expected if c not in columns]
    rows: list[Row] = []
    notes: list[str] = []
    for (_, runs), row in zip(groups, measured):
        if metric in ("accuracy", "error"):
            row.extra, row.extra_std = _forgetting_cells(runs)
        if row.incomplete:
            row.note = "incomplete, no mean: " + "; ".join(row.incomplete)
        elif set(row.cells) != set(columns):
            row.mean = _row_mean(row, columns)
            row.mean_std = row.mean_tail = None
            row.note = "mean over its own cells only"
        rows.append(row)
        rows += [_tail_row(row)] if row.tail else []
        if with_paper:
            paper_rows, note = _paper_rows(dataset, row, runs, columns)
            rows += paper_rows
            notes += [note] if note else []
    first_run = groups[0][1][0]
    table = Table(dataset, columns, rows, metric, first_run.get("domain_label", "corruption"), notes)
    table.incomplete = [run for row in measured for run in row.incomplete]
    table.with_orders = any(row.orders for row in measured)
    table.notes += [TAIL_NOTE] if any(row.tail for row in measured) else []
    if any(row.extra for row in measured):
        table.extra_columns = {name: kind for name, (_, kind) in FORGETTING_COLUMNS.items()}
        table.notes.append(FORGETTING_NOTE)
    return table


def tables_from_results(payloads: list[dict], metric: str = "accuracy", with_paper: bool = True) -> list[Table]:
    """One table per data set."""
    by_dataset: dict[str, list[dict]] = {}
    for p in payloads:
        by_dataset.setdefault(p["dataset"], []).append(p)
    return [build_table(group_runs(runs), metric, with_paper) for runs in by_dataset.values()]
