"""A grid's comparison tables (one per data set, the paper's rows beside) and the compute its jobs used."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness import report
from harness.grid.spec import Cell, Grid, GridError
from harness.task_records import ResumeError, read_tasks
from harness.grid.status import JobStatus
from harness.identity import config_hash, identity_keys
from harness.report.runs import POOLED_KEYS


def _placeholder(cell: Cell) -> dict:
    """The payload of a cell with no results yet: its expected cells, none measured (shown as missing). Its
    ``method`` is the registered one, as in a run's results.json (the paper's row is looked up by it)."""
    import datasets
    dataset = datasets.get_dataset(cell.dataset)
    return {"method": cell.method, "dataset": cell.dataset, "setting": cell.setting,
            "domain_label": dataset.domain_label, "complete": False, "records": [],
            "expected": [[s.domain, s.severity] for task in cell.tasks for s in task.segments],
            "provenance": {"config": cell.cfg.dump(), "config_hash": config_hash(cell.cfg)},
            "_path": f"{cell.jobs[0].run_dir} (not run yet)"}


def cell_payload(grid: Grid, cell: Cell) -> dict:
    """The cell's results, once its records are checked as a run checks them before resuming (their config, data,
    input files and weights): results of other data are refused, not tabled."""
    path = Path(cell.jobs[0].run_dir) / "results.json"
    if not path.is_file():
        return _placeholder(cell)
    try:
        read_tasks(path.parent, cell.tasks, config_hash(cell.cfg), cell.cfg.dump(), grid.identity_of(cell))
    except ResumeError as err:
        raise GridError(f"{grid.path}: cell ({cell.config_name}, {cell.dataset}, seed {cell.seed}): "
                        f"{err.one_line()}") from None
    return report.load_results([path])[0]


def grid_tables(grid: Grid, metric: str = "accuracy", with_paper: bool = True) -> list:
    """One comparison table per data set: a row per config name (and setting, and other overrides) with its seeds
    pooled, the paper's rows beside; cells a job has not finished are empty and their row has no mean."""
    return [report.build_table(rows, metric, with_paper) for _, rows in grid_row_groups(grid)]


def grid_row_groups(grid: Grid) -> list[tuple[str, list[tuple[str, list[dict]]]]]:
    """Per data set, the (label, runs) of each row of its table (what ``report.build_table`` takes): the cells that
    differ only in seed and order seed pooled, a row's runs with results first."""
    tables = []
    for dataset in dict.fromkeys(cell.dataset for cell in grid.cells):
        groups: dict[str, list] = {}
        labels: dict[str, str] = {}
        cells = [c for c in grid.cells if c.dataset == dataset]
        for cell in cells:
            identity = sorted(identity_keys(cell.cfg, POOLED_KEYS).items())
            key = json.dumps(identity, default=str)
            groups.setdefault(key, []).append(cell_payload(grid, cell))
            labels[key] = cell_label(cell, cells)
        named = list(labels.values())
        rows = []
        for key, payloads in groups.items():
            label = labels[key]
            if named.count(label) > 1:     # one config with several override sets: tell them apart
                label += f" [{hashlib.sha1(key.encode()).hexdigest()[:6]}]"
            # runs with results first: the paper's row is matched on the first run's records
            rows.append((label, sorted(payloads, key=lambda p: not p["records"])))
        tables.append((dataset, rows))
    return tables


# The axes a grid table's rows and its figures tell apart: (their word in a label, a cell's value).
AXIS_VALUES = {"batch_sizes": ("batch", lambda cell: cell.batch_size),
               "classes_per_batch": ("classes per batch", lambda cell: cell.classes_per_batch)}


def cell_label(cell: Cell, cells: list[Cell], leave_out: str = "") -> str:
    """A cell's row label among ``cells`` (one data set's): its config name, with its setting, batch size and
    classes per batch where those differ among the cells, e.g. "tent (batch 16, 4 classes per batch)";
    ``leave_out`` names an AXIS_VALUES axis not to show (the figure's x)."""
    label = cell.config_name
    if len({c.setting for c in cells}) > 1:
        label += f" [{cell.setting}]"
    shown = [f"{name} {value(cell)}" if name == "batch" else f"{value(cell) or 'any'} classes per batch"
             for axis, (name, value) in AXIS_VALUES.items()
             if axis != leave_out and len({value(c) for c in cells}) > 1]
    return label + (f" ({', '.join(shown)})" if shown else "")


def plotted_axes(grid: Grid) -> list[str]:
    """The AXIS_VALUES axes over which some data set's cells take more than one value: each gets a figure."""
    return [axis for axis, (_, value) in AXIS_VALUES.items()
            if any(len({value(c) for c in grid.cells if c.dataset == d}) > 1 for d in {c.dataset for c in grid.cells})]


def grid_axis_points(grid: Grid, axis: str, metric: str = "accuracy") -> dict[str, dict]:
    """{data set: {line label: [AxisPoint]}}: the mean ``metric`` of each config (with its setting and other axis)
    against the cells' values of ``axis`` (an AXIS_VALUES axis), its runs over seeds and orders pooled as a table's
    row pools them (harness.report.axis_figure.axis_points)."""
    from harness.report.axis_figure import axis_points
    _, value = AXIS_VALUES[axis]
    figures = {}
    for dataset in dict.fromkeys(cell.dataset for cell in grid.cells):
        cells = [c for c in grid.cells if c.dataset == dataset]
        runs = [(cell_label(cell, cells, leave_out=axis), value(cell), cell_payload(grid, cell)) for cell in cells]
        figures[dataset] = axis_points(runs, metric)
    return figures


def compute_summary(statuses: list[JobStatus]) -> str:
    """Compute used by the finished jobs (their wall time where they ran, model loading included), and the rest
    estimated from the mean time of finished jobs of the same config (its config name) and data set."""
    finished = [s for s in statuses if s.state == "done" and s.seconds]
    per_kind: dict[tuple, list[float]] = {}
    for s in finished:
        per_kind.setdefault((s.job.dataset, s.job.config_name), []).append(s.seconds)
    rest = [s for s in statuses if s.state != "done"]
    estimate, unknown = 0.0, 0
    for s in rest:
        times = per_kind.get((s.job.dataset, s.job.config_name))
        if times:
            estimate += sum(times) / len(times)
        else:
            unknown += 1
    if not finished:
        return "compute: no job finished yet, nothing to estimate the others from"
    line = f"compute: {_duration(sum(s.seconds for s in finished))} in {len(finished)} finished jobs"
    if rest:
        line += (f"; the other {len(rest)}: about {_duration(estimate)} (the mean of finished jobs of the same "
                 f"config and data set)")
        if unknown:
            line += f", {unknown} of them without a finished job to go by"
    return line


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} job-hours" if seconds >= 3600 else f"{seconds:.0f} job-seconds"
