"""A metric against one axis of a grid (TEST.BATCH_SIZE, TEST.CLASSES_PER_BATCH): the points, one line per
method, and their PNG (matplotlib, when installed). The points come from the runs' results as a table's rows pool
them (seeds and stream orders; harness.report.runs.aggregate), so a point is the mean column of the row its runs
would make, and its error bar that row's spread."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.report.model import METRICS, CompareError
from harness.report.table import build_table
from harness.report.writers import save_figure

# How each axis is shown: its x label and whether its x axis is logarithmic.
AXIS_TITLES = {"batch_sizes": ("batch size (TEST.BATCH_SIZE)", True),
               "classes_per_batch": ("classes per batch (TEST.CLASSES_PER_BATCH; 0 = any)", False)}


@dataclass(frozen=True)
class AxisPoint:
    """One point of a line: the runs of one config at one axis value."""
    value: int                       # the axis value (x)
    mean: float | None               # the mean of the runs' means over their domains; None: a run is unfinished
    std: float | None                # their sample standard deviation; None for one run
    runs: int                        # how many runs (seeds x orders) it pools


def axis_points(runs: list[tuple[str, int, dict]], metric: str = "accuracy") -> dict[str, list[AxisPoint]]:
    """{line label: its points by axis value} from (line label, axis value, results payload) triples; the payloads
    of one label and value must be one experiment up to their seeds and order seeds (refused otherwise, as a
    table's row refuses them). Lines in the order their labels first come, points by increasing value."""
    grouped: dict[str, dict[int, list[dict]]] = {}
    for label, value, payload in runs:
        grouped.setdefault(label, {}).setdefault(int(value), []).append(payload)
    lines = {}
    for label, by_value in grouped.items():
        points = []
        for value in sorted(by_value):
            payloads = sorted(by_value[value], key=lambda p: not p["records"])   # as a grid table's row
            table = build_table([(label, payloads)], metric, with_paper=False)
            row = table.rows[0]
            points.append(AxisPoint(value, table.value(row, "mean"), table.spread(row, "mean"), row.runs))
        lines[label] = points
    return lines


def draw_axis_figure(lines: dict[str, list[AxisPoint]], axis: str, path, title: str = "",
                     metric: str = "accuracy") -> Path | None:
    """A PNG at ``path`` of ``lines`` (axis_points): the metric (y) against ``axis`` (x, logarithmic for batch
    sizes), a line per label, error bars where a point pools several runs; points without a mean are left out.
    Returns None when matplotlib is not installed."""
    if axis not in AXIS_TITLES:
        raise CompareError(f"a figure's axis is one of {', '.join(AXIS_TITLES)}, got '{axis}'")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xlabel, logarithmic = AXIS_TITLES[axis]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, points in lines.items():
        shown = [p for p in points if p.mean is not None]
        if not shown:
            continue
        errors = [p.std or 0.0 for p in shown]
        ax.errorbar([p.value for p in shown], [p.mean for p in shown], yerr=errors if any(errors) else None,
                    marker="o", capsize=3, label=label)
    if logarithmic:
        ax.set_xscale("log")
    values = sorted({p.value for points in lines.values() for p in points})
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRICS[metric][2])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
