"""Side-by-side comparison of methods: tables (rows = methods, columns = domains + mean) built from results
records, aggregation over seeds (mean and standard deviation per cell), merging of shards, the paper's rows with
the difference per cell, and writers for Markdown, CSV, LaTeX and a PNG figure.

A results payload is what harness.run.evaluate returns and writes as results.json."""
from __future__ import annotations

import copy
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from harness import paper
from harness.identity import config_hash as _config_hash, describe_differences, differing_keys, identity_keys
from harness.results import atomic_write, summarise

SEED_KEY = "RNG_SEED"
REPO_ROOT = Path(__file__).resolve().parent.parent


class CompareError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------- loading

def load_results(paths) -> list[dict]:
    """Payloads from results.json files or from directories searched recursively for them (sorted by path)."""
    payloads = []
    for given in paths:
        path = Path(given)
        files = sorted(path.rglob("results.json")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise CompareError(f"{path}: no results.json below this directory")
        for file in files:
            if not file.is_file():
                raise CompareError(f"{file}: no such results file")
            try:
                payload = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                raise CompareError(f"{file}: not a readable results.json ({err})") from err
            for key in ("method", "dataset", "records"):
                if key not in payload:
                    raise CompareError(f"{file}: results.json without '{key}'")
            payload["_path"] = str(file)
            payloads.append(payload)
    return payloads


def _config(payload) -> dict:
    text = (payload.get("provenance") or {}).get("config")
    if not text:
        raise CompareError(f"{payload.get('_path', payload['method'])}: no provenance.config to compare configs by")
    return yaml.safe_load(text) or {}


def _label(payload) -> str:
    return payload.get("_path") or f"{payload['method']}#{(payload.get('provenance') or {}).get('config_hash')}"


# ----------------------------------------------------------------------------------------------- columns

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
        if per_domain[c.domain] == 1:
            labels.append(c.domain)
        else:
            labels.append(f"{c.domain}@{c.severity}" + (f"#{c.occurrence + 1}" if c.occurrence else ""))
    return labels


def payload_cells(payload) -> dict[Column, float]:
    """{column: accuracy %} of one run."""
    return {c: 100.0 * r["accuracy"] for c, r in zip(record_columns(payload["records"]), payload["records"])}


# ----------------------------------------------------------------------------------------------- rows

@dataclass
class Row:
    label: str
    kind: str                                   # "measured", "paper" or "diff"
    cells: dict                                 # Column -> accuracy % (mean over runs)
    std: dict = field(default_factory=dict)     # Column -> standard deviation over runs (with >= 2 runs)
    mean: float | None = None                   # mean of the cells shown (accuracy %)
    mean_std: float | None = None               # std over runs of each run's mean
    runs: int = 1
    seeds: list = field(default_factory=list)
    method: str = ""
    note: str = ""


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _std(values) -> float | None:
    # Sample standard deviation over runs (ddof=1), as usual when reporting seeds; None for a single run.
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def check_same_experiment(payloads: list[dict], ignore=(SEED_KEY,)) -> None:
    """Refuse payloads whose configs differ in a result-relevant key other than ``ignore`` (names the keys)."""
    if len(payloads) < 2:
        return
    configs = [_config(p) for p in payloads]
    diff = differing_keys(configs, tuple(ignore))
    if diff:
        labels = [_label(p) for p in payloads]
        raise CompareError(f"these results come from configs that differ in {diff} (not only in the seed); "
                           f"refusing to combine them:\n{describe_differences(configs, labels, tuple(ignore))}")


def aggregate(payloads: list[dict], label: str | None = None) -> Row:
    """One row from several runs of the same config that differ only in RNG_SEED: per cell the mean and the
    sample standard deviation over runs; the mean column is each run's mean of its cells, averaged."""
    if not payloads:
        raise CompareError("nothing to aggregate")
    check_same_experiment(payloads)
    columns = record_columns(payloads[0]["records"])
    for p in payloads[1:]:
        other = record_columns(p["records"])
        if other != columns:
            missing = sorted({c.domain for c in set(columns) ^ set(other)})
            raise CompareError(f"{_label(p)} has records for other domains/severities than {_label(payloads[0])} "
                               f"(differing: {missing}); merge shards first or finish the run")
    per_run = [payload_cells(p) for p in payloads]
    cells = {c: _mean([run[c] for run in per_run]) for c in columns}
    std = {c: _std([run[c] for run in per_run]) for c in columns} if len(payloads) > 1 else {}
    run_means = [_mean([run[c] for c in columns]) for run in per_run]
    seeds = [_config(p).get(SEED_KEY) if (p.get("provenance") or {}).get("config") else None for p in payloads]
    return Row(label or payloads[0]["method"], "measured", cells, std, _mean(run_means), _std(run_means),
               len(payloads), seeds, payloads[0]["method"])


def merge(payloads: list[dict]) -> dict:
    """One payload from shards of one run (identical configs, seed included): the union of their records, each
    (domain, severity) once, ordered as CORRUPTION.TYPE; records present in several shards must agree."""
    if not payloads:
        raise CompareError("nothing to merge")
    check_same_experiment(payloads, ignore=())
    first = payloads[0]
    for p in payloads[1:]:
        if (p["method"], p["dataset"], p.get("setting")) != (first["method"], first["dataset"], first.get("setting")):
            raise CompareError(f"{_label(p)} is {p['method']} on {p['dataset']}, not {first['method']} on "
                               f"{first['dataset']}")
    merged: dict[Column, dict] = {}
    for p in payloads:
        for column, record in zip(record_columns(p["records"]), p["records"]):
            known = merged.get(column)
            if known is not None and (known["n"], known["correct"]) != (record["n"], record["correct"]):
                raise CompareError(f"{column.domain}@{column.severity}: shards disagree ({known['correct']}/"
                                   f"{known['n']} vs {record['correct']}/{record['n']} in {_label(p)})")
            merged.setdefault(column, record)
    order = list((_config(first).get("CORRUPTION") or {}).get("TYPE") or [])
    rank = {d: i for i, d in enumerate(order)}
    columns = sorted(merged, key=lambda c: rank.get(c.domain, len(rank)))   # stable: keeps severity order
    records = [merged[c] for c in columns]
    result = copy.deepcopy({k: v for k, v in first.items() if k != "_path"})
    result["records"] = records
    result["summary"] = summarise(records)
    result["complete"] = bool(order) and set(order) <= {r["domain"] for r in records}
    prov = result.setdefault("provenance", {})
    prov["merged_from"] = [_label(p) for p in payloads]
    prov["wall_time_s"] = sum((p.get("provenance") or {}).get("wall_time_s") or 0.0 for p in payloads)
    return result


# ----------------------------------------------------------------------------------------------- tables

@dataclass
class Table:
    dataset: str
    columns: list[Column]
    rows: list[Row]
    metric: str = "accuracy"            # "accuracy" or "error" (error = 100 - accuracy)
    domain_label: str = "corruption"
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return column_labels(self.columns)

    def value(self, row: Row, column) -> float | None:
        """The shown value of a cell (None for an empty cell), in the table's metric; column may be "mean"."""
        v = row.mean if column == "mean" else row.cells.get(column)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if self.metric == "error" and row.kind != "diff":
            return 100.0 - v
        if self.metric == "error":
            return -v                     # measured - paper, in error points
        return v

    def spread(self, row: Row, column) -> float | None:
        return row.mean_std if column == "mean" else row.std.get(column)


def _row_mean(row: Row, columns: list[Column]) -> float | None:
    shown = [row.cells[c] for c in columns if c in row.cells]
    return _mean(shown) if shown else None


def build_table(groups: list[tuple[str, list[dict]]], metric: str = "accuracy", with_paper: bool = True) -> Table:
    """groups: (row label, runs of one config) in row order; every run must be on one data set. Rows are the
    aggregated runs, each followed by the paper's row and the difference (measured - paper) where the paper
    reports that method on that data set at the same severity."""
    if metric not in ("accuracy", "error"):
        raise CompareError(f"metric must be 'accuracy' or 'error', got '{metric}'")
    if not groups:
        raise CompareError("no results to tabulate")
    datasets = {p["dataset"] for _, runs in groups for p in runs}
    if len(datasets) != 1:
        raise CompareError(f"one table per data set: these results cover {sorted(datasets)}")
    dataset = datasets.pop()
    measured = [aggregate(runs, label) for label, runs in groups]
    columns: list[Column] = []
    for row in measured:
        columns += [c for c in row.cells if c not in columns]
    rows: list[Row] = []
    notes: list[str] = []
    for (label, runs), row in zip(groups, measured):
        row.mean = _row_mean(row, columns) if set(row.cells) != set(columns) else row.mean
        if set(row.cells) != set(columns):
            row.mean_std = None
            row.note = "mean over its own cells only"
        rows.append(row)
        if not with_paper:
            continue
        reference = paper.paper_row(dataset, row.method)
        shown = paper.comparable_reference(reference, runs[0]["records"])
        if not shown:
            continue
        cells = {c: shown[c.domain] for c in row.cells if c.domain in shown}
        paper_row = Row(f"{row.label} (paper)", "paper", cells, method=row.method, runs=0)
        paper_row.mean = _mean(list(cells.values())) if len(cells) == len(columns) else None
        diff = {c: row.cells[c] - cells[c] for c in cells}
        diff_row = Row(f"{row.label} - paper", "diff", diff, method=row.method, runs=0)
        if paper_row.mean is not None and row.mean is not None:
            diff_row.mean = row.mean - paper_row.mean
        rows += [paper_row, diff_row]
        cfg = _config(runs[0])
        mismatch = paper.protocol_mismatch(reference, (cfg.get("MODEL") or {}).get("ARCH"),
                                           (cfg.get("MODEL") or {}).get("WEIGHTS"), runs[0].get("setting"))
        note = f"{row.label} (paper): {reference.paper_method}"
        if reference.reported_mean is not None:
            note += (f", printed mean {reference.reported_mean:.2f} over its {len(reference.accuracy)} domains "
                     f"(mean of its printed cells {reference.mean_of(list(reference.accuracy)):.2f})")
        if mismatch:
            note += "; measured with " + ", ".join(mismatch)
        notes.append(note)
    first_run = groups[0][1][0]
    return Table(dataset, columns, rows, metric, first_run.get("domain_label", "corruption"), notes)


def group_runs(payloads: list[dict]) -> list[tuple[str, list[dict]]]:
    """Runs of the same config but for the seed form one group (one row); rows labelled by method, with a short
    config id where one method has several configs."""
    groups: dict[str, list[dict]] = {}
    for p in payloads:
        key = json.dumps([p["dataset"], sorted(identity_keys(_config(p), (SEED_KEY,)).items())], default=str)
        groups.setdefault(key, []).append(p)
    methods = [runs[0]["method"] for runs in groups.values()]
    labelled = []
    for key, runs in groups.items():
        label = runs[0]["method"]
        if methods.count(label) > 1:
            label += f" [{_identity_id(runs[0])}]"
        labelled.append((label, runs))
    return labelled


def _identity_id(payload) -> str:
    import hashlib
    flat = sorted(identity_keys(_config(payload), (SEED_KEY,)).items())
    return hashlib.sha1(repr(flat).encode()).hexdigest()[:6]


def tables_from_results(payloads: list[dict], metric: str = "accuracy", with_paper: bool = True) -> list[Table]:
    """One table per data set."""
    by_dataset: dict[str, list[dict]] = {}
    for p in payloads:
        by_dataset.setdefault(p["dataset"], []).append(p)
    return [build_table(group_runs(runs), metric, with_paper) for runs in by_dataset.values()]


# ----------------------------------------------------------------------------------------------- formats

def _cell_text(table: Table, row: Row, column, digits: int = 2, pm: str = " ± ") -> str:
    v = table.value(row, column)
    if v is None:
        return "-"
    text = f"{v:+.{digits}f}" if row.kind == "diff" else f"{v:.{digits}f}"
    s = table.spread(row, column)
    if s is not None:
        text += f"{pm}{s:.{digits}f}"
    return text


def _caption(table: Table) -> str:
    what = "accuracy" if table.metric == "accuracy" else "error"
    return f"{table.dataset}: {what} (%) per {table.domain_label} and their mean"


def to_markdown(table: Table) -> str:
    header = ["method"] + table.labels + ["mean"]
    lines = [f"**{_caption(table)}**", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        cells = [_cell_text(table, row, c) for c in table.columns] + [_cell_text(table, row, "mean")]
        label = row.label + (f" (n={row.runs})" if row.runs > 1 else "")
        lines.append("| " + " | ".join([label] + cells) + " |")
    lines += [""] + [f"- {n}" for n in table.notes + [r.label + ": " + r.note for r in table.rows if r.note]]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    labels = table.labels
    writer.writerow(["row", "kind", "method", "metric", "runs", "seeds"] + labels + ["mean"]
                    + [f"{label} std" for label in labels] + ["mean std"])

    def num(v):
        return "" if v is None else f"{v:.4f}"
    for row in table.rows:
        values = [num(table.value(row, c)) for c in table.columns] + [num(table.value(row, "mean"))]
        spreads = [num(table.spread(row, c)) for c in table.columns] + [num(table.spread(row, "mean"))]
        writer.writerow([row.label, row.kind, row.method, table.metric, row.runs,
                         " ".join(str(s) for s in row.seeds)] + values + spreads)
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    header = ["Method"] + [_latex_escape(label) for label in table.labels] + ["Mean"]
    lines = [r"\begin{table}[t]", r"\centering", r"\resizebox{\linewidth}{!}{%",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(header) + r" \\",
             r"\midrule"]
    for row in table.rows:
        cells = [_cell_text(table, row, c, pm=r" $\pm$ ") for c in table.columns]
        cells.append(_cell_text(table, row, "mean", pm=r" $\pm$ "))
        label = _latex_escape(row.label)
        if row.kind == "paper":
            label = r"\textit{" + label + "}"
        lines.append(" & ".join([label] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\caption{" + _latex_escape(_caption(table)) + "}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_figure(table: Table, path: Path, kind: str = "bars") -> Path | None:
    """A PNG of the measured rows: grouped bars per domain ("bars") or a method x domain heat map ("heatmap").
    Returns None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in table.rows if r.kind == "measured"]
    labels = table.labels + ["mean"]
    keys = list(table.columns) + ["mean"]
    values = np.array([[np.nan if table.value(r, k) is None else table.value(r, k) for k in keys] for r in rows])
    ylabel = f"{table.metric} (%)"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) * max(1, len(rows)) ** 0.5 + 2), 4.5))
    if kind == "heatmap":
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), [r.label for r in rows])
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(image, ax=ax, label=ylabel)
    elif kind == "bars":
        width = 0.8 / max(1, len(rows))
        x = np.arange(len(labels))
        for i, row in enumerate(rows):
            errors = [table.spread(row, k) or 0.0 for k in keys]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, values[i], width, yerr=errors, label=row.label,
                   capsize=2 if any(errors) else 0)
        ax.set_xticks(x, labels, rotation=60, ha="right")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    else:
        raise CompareError(f"figure kind must be 'bars' or 'heatmap', got '{kind}'")
    ax.set_title(_caption(table), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_table(table: Table, out_dir: Path, stem: str = "comparison", figure: str | None = "bars") -> list[Path]:
    """table as <stem>.md, .csv, .tex (and .png) in out_dir; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    for suffix, text in ((".md", to_markdown(table)), (".csv", to_csv(table)), (".tex", to_latex(table))):
        atomic_write(out_dir / f"{stem}{suffix}", text)
        written.append(out_dir / f"{stem}{suffix}")
    if figure and figure != "none":
        png = to_figure(table, out_dir / f"{stem}.png", figure)
        if png is not None:
            written.append(png)
    return written


# ----------------------------------------------------------------------------------------------- running

# Keys every compared method takes from the base config, so that all of them see the same data, stream and
# backbone; everything else (optimiser, batch size, method keys) comes from each method's own config.
SHARED_KEYS = ["SETTING", "RNG_SEED", "DATA_DIR", "SAVE_DIR", "CORRUPTION", "MODEL.ARCH", "MODEL.WEIGHTS",
               "MODEL.CKPT_PATH", "MODEL.FORCE_QUICK_GELU", "TEST.DELTA_DIRICHLET", "TEST.NUM_WORKERS", "DEVICE",
               "RESUME", "RUN_DOMAINS"]


def resolve_method_config(method: str, dataset: str, conf_dir: Path | None = None) -> Path:
    """A config file path as given, or conf/<dataset>/<method>.yaml for a method name."""
    path = Path(method)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise CompareError(f"config file {path} does not exist")
        return path
    conf_dir = Path(conf_dir) if conf_dir else REPO_ROOT / "conf"
    candidate = conf_dir / dataset / f"{method}.yaml"
    if not candidate.is_file():
        available = sorted(p.stem for p in (conf_dir / dataset).glob("*.yaml"))
        raise CompareError(f"no config {candidate} for method '{method}' on {dataset}; available: {available}. "
                           f"Give a config file path instead.")
    return candidate


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = copy.deepcopy(value)


def method_configs(methods: list[str], base_cfg_file=None, opts=None, seeds=None, overrides: dict | None = None):
    """[(method label, [cfg per seed])]: each method's own config with the SHARED_KEYS of the base config (the
    --cfg file, else the first method's config) and the command-line overrides applied to all of them."""
    from conf import ConfigError, load_cfg, validate
    opts = list(opts or [])
    if not methods:
        raise CompareError("give at least one method (name or config file)")
    first = base_cfg_file
    if first is None:
        if Path(methods[0]).suffix not in (".yaml", ".yml"):
            dataset = dict(zip(opts[0::2], opts[1::2])).get("CORRUPTION.DATASET")
            if not dataset:
                raise CompareError("method names need a data set: give --cfg (a config of that data set) or "
                                   "CORRUPTION.DATASET <name>")
            first = resolve_method_config(methods[0], dataset)
        else:
            first = methods[0]
    try:
        base = load_cfg(first, opts, freeze=False)
    except ConfigError as err:
        raise CompareError(str(err)) from None
    for key, value in (overrides or {}).items():
        _set(base, key, value)
    result = []
    for method in methods:
        path = resolve_method_config(method, base.CORRUPTION.DATASET)
        try:
            cfg = load_cfg(path, opts, freeze=False)
        except ConfigError as err:
            raise CompareError(f"{path}: {err}") from None
        for key in SHARED_KEYS:
            _set(cfg, key, _get(base, key))
        per_seed = []
        for seed in (seeds or [cfg.RNG_SEED]):
            seeded = cfg.clone()
            seeded.RNG_SEED = int(seed)
            try:
                validate(seeded)
            except ConfigError as err:
                raise CompareError(f"{path}: {err}") from None
            seeded.freeze()
            per_seed.append(seeded)
        label = Path(method).stem if Path(method).suffix in (".yaml", ".yml") else method
        result.append((label, per_seed))
    labels = [label for label, _ in result]
    for label in labels:
        if labels.count(label) > 1:
            raise CompareError(f"method '{label}' is given twice")
    return result


def run_comparison(configs, progress: bool = False, evaluate=None) -> list[tuple[str, list[dict]]]:
    """Evaluate every (label, [cfg per seed]) in turn; returns the groups for build_table."""
    if evaluate is None:
        from harness.run import evaluate
    groups = []
    for label, cfgs in configs:
        groups.append((label, [evaluate(cfg, progress=progress) for cfg in cfgs]))
    return groups


def comparison_dir(cfg, labels: list[str]) -> Path:
    """Default output folder of a comparison: SAVE_DIR/<dataset>/comparison/<setting>_<id of the methods>."""
    ident = _config_hash(cfg)
    import hashlib
    methods_id = hashlib.sha1(("|".join(labels) + ident).encode()).hexdigest()[:8]
    return Path(cfg.SAVE_DIR) / cfg.CORRUPTION.DATASET / "comparison" / f"{cfg.SETTING}_{methods_id}"
