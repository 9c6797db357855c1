"""A comparison table as Markdown, CSV, LaTeX and a PNG figure (matplotlib, when installed)."""
from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import numpy as np

from harness.report.model import METRICS, CompareError, Row, Table
from conf.files import atomic_write_text


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
    return f"{table.dataset}: {METRICS[table.metric][2]} per {table.domain_label} and their mean"


def to_markdown(table: Table) -> str:
    header = ["method"] + table.labels + ["mean"] + list(table.extra_columns)
    lines = [f"**{_caption(table)}**", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        cells = [_cell_text(table, row, c) for c in [*table.columns, "mean", *table.extra_columns]]
        label = row.label + (f" (n={row.runs})" if row.runs > 1 else "")
        lines.append("| " + " | ".join([label] + cells) + " |")
    lines += [""] + [f"- {n}" for n in table.notes + [r.label + ": " + r.note for r in table.rows if r.note]]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    labels = table.labels
    orders = ["orders"] if table.with_orders else []      # each run's stream order seed (compare.py --orders)
    extra = list(table.extra_columns)       # TEST.FORGETTING's columns, after the existing ones
    writer.writerow(["row", "kind", "method", "metric", "runs", "seeds"] + orders + labels + ["mean"]
                    + [f"{label} std" for label in labels] + ["mean std"] + extra + [f"{name} std" for name in extra])

    def num(v):
        return "" if v is None else f"{v:.4f}"
    for row in table.rows:
        values = [num(table.value(row, c)) for c in table.columns] + [num(table.value(row, "mean"))]
        spreads = [num(table.spread(row, c)) for c in table.columns] + [num(table.spread(row, "mean"))]
        extra_values = [num(table.value(row, name)) for name in extra]
        extra_values += [num(table.spread(row, name)) for name in extra]
        order_seeds = [" ".join(str(o) for o in row.orders)] if orders else []
        writer.writerow([row.label, row.kind, row.method, table.metric, row.runs,
                         " ".join(str(s) for s in row.seeds)] + order_seeds + values + spreads + extra_values)
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    header = ["Method"] + [_latex_escape(label) for label in table.labels] + ["Mean"] + \
        [_latex_escape(name) for name in table.extra_columns]
    lines = [r"\begin{table}[t]", r"\centering", r"\resizebox{\linewidth}{!}{%",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(header) + r" \\",
             r"\midrule"]
    for row in table.rows:
        cells = [_cell_text(table, row, c, pm=r" $\pm$ ") for c in table.columns]
        cells += [_cell_text(table, row, c, pm=r" $\pm$ ") for c in ["mean", *table.extra_columns]]
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
    ylabel = METRICS[table.metric][2]
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
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure laid out, written to ``path`` (its folder made) at the report's resolution, and closed.
    Titles are wrapped to the figure's width (a metric's caption is longer than one line of a 6-inch figure)."""
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        if ax.get_title():
            ax.set_title(textwrap.fill(ax.get_title(), 70), fontsize=10)
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
        atomic_write_text(out_dir / f"{stem}{suffix}", text)
        written.append(out_dir / f"{stem}{suffix}")
    if figure and figure != "none":
        png = to_figure(table, out_dir / f"{stem}.png", figure)
        if png is not None:
            written.append(png)
    return written
