"""A results page: one self-contained HTML file (inline CSS and JavaScript, figures as base64 data URIs, nothing
fetched) holding, per data set and per metric the results have values for, the comparison table the Markdown
writer writes (the same Table, the paper's rows included, the same numbers and rounding), sortable by clicking a
column header, its missing cells marked, and per cell the provenance of the runs behind it on demand (a <details>
element: config hash, commit, package versions, data fingerprints, seeds pooled, the results file).

The page depends only on its inputs (no clock is read), so the same results give the same file."""
from __future__ import annotations

import base64
import html
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conf.files import atomic_write_text
from harness.report.model import METRICS, CompareError, Column, Row, Table, payload_cells, record_columns
from harness.report.runs import run_config, run_order
from harness.report.table import build_table
from harness.report.writers import _caption, _cell_text, to_figure
from harness.task_records import task_path

# "error" is 100 - accuracy, the accuracy table again: on the page only when it is the metric asked for.
SAME_AS_ANOTHER = {"error"}
# Package versions shown per run (results.py records more; these decide the numbers).
SHOWN_VERSIONS = ("python", "torch", "open_clip_torch", "timm", "numpy")


@dataclass
class PageTable:
    """A comparison table and, for each of its measured rows in order, the runs pooled in it."""
    table: Table
    runs: list[list[dict]]
    figures: list[tuple[str, bytes]] = field(default_factory=list)     # (caption, PNG)


def page_metrics(payloads: list[dict], first: str = "accuracy") -> list[str]:
    """The metrics the page shows: ``first``, then every other metric of METRICS that some run has a value for
    (calibration, per-class, open-set and cost fields appear only where the records hold them)."""
    others = [m for m in METRICS if m != first and m not in SAME_AS_ANOTHER
              and any(payload_cells(p, m) for p in payloads)]
    return [first] + others


def with_runs(table: Table, groups: list[tuple[str, list[dict]]]) -> PageTable:
    """``table`` with the runs of each measured row: ``groups`` are the (label, runs) the rows were built from, or
    runs grouped as they were (``group_runs``), in the same order. A row they do not reproduce (another method, run
    count or cells) is refused rather than shown with another row's provenance."""
    measured = [row for row in table.rows if row.kind == "measured"]
    if len(measured) != len(groups):
        raise CompareError(f"{table.dataset}: {len(measured)} measured rows but {len(groups)} groups of runs to give "
                           f"them provenance")
    for row, (_, runs) in zip(measured, groups):
        # the row's cells from these runs' records, as aggregate computes them (the runs maybe in another order,
        # which may move a mean's last bit)
        per_run = [payload_cells(p, table.metric) for p in runs]
        cells = {c: float(np.mean([run[c] for run in per_run])) for c in row.expected
                 if all(c in run for run in per_run)}
        if (row.method, row.runs, set(row.cells)) != (runs[0]["method"], len(runs), set(cells)) \
                or not all(np.isclose(row.cells[c], cells[c], rtol=1e-12, atol=0) for c in cells):
            raise CompareError(f"{table.dataset}: row {row.label!r} is not the runs {[r.get('_path') for r in runs]}; "
                               f"cannot give it their provenance")
    return PageTable(table, [runs for _, runs in groups])


def tables_for(groups: list[tuple[str, list[dict]]], metrics: list[str], with_paper: bool = True) -> list[PageTable]:
    """The page's tables of one data set's row groups (as ``build_table`` takes them), one per metric."""
    return [with_runs(build_table(groups, metric, with_paper), groups) for metric in metrics]


def pages_for(groups_per_dataset: list[list[tuple[str, list[dict]]]], first: str = "accuracy",
              with_paper: bool = True) -> list[PageTable]:
    """The page's tables of several data sets' row groups: per data set, one table per metric its runs have."""
    pages = []
    for groups in groups_per_dataset:
        payloads = [p for _, runs in groups for p in runs]
        pages += tables_for(groups, page_metrics(payloads, first), with_paper)
    return pages


def add_figures(pages: list[PageTable], kind: str = "bars") -> None:
    """Each table's figure (writers.to_figure: the PNG beside the Markdown table), kept as bytes to embed; nothing
    where ``kind`` is "none" or matplotlib is not installed."""
    for page in pages:
        page.figures = []
    if not kind or kind == "none":
        return
    with tempfile.TemporaryDirectory() as folder:
        for k, page in enumerate(pages):
            png = to_figure(page.table, Path(folder) / f"{k}.png", kind)
            if png is not None:
                page.figures.append((_caption(page.table), png.read_bytes()))


# ------------------------------------------------------------------------------------------------ provenance

def _shown_columns(table: Table) -> list[tuple[str, object]]:
    """(header, column) of every shown column, as the Markdown writer orders them: the domains, the mean, then the
    table's named columns right of it (TEST.FORGETTING's, where a table has them)."""
    return list(zip(table.labels, table.columns)) + [("mean", "mean")] + [(name, name) for name in table.extra_columns]


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _task_fingerprints(payload: dict) -> dict[str, tuple[list[Column], dict]]:
    """{task index: (the columns it recorded, its data fingerprint)} of a run, in task order: from the run's task
    records where its folder keeps them (each job of a grid records its own task's fingerprint there, while
    results.json holds those of the tasks its last process ran), else provenance.data.fingerprints (columns
    unknown)."""
    prov = payload.get("provenance") or {}
    found = {str(k): ([], v or {}) for k, v in ((prov.get("data") or {}).get("fingerprints") or {}).items()}
    path, done = payload.get("_path"), prov.get("tasks_done")
    if path and Path(path).is_file() and isinstance(done, list):
        for index in done:
            try:
                stored = json.loads(task_path(Path(path).parent, int(index)).read_text())
            except (OSError, ValueError):
                continue
            known = found.get(str(index), ([], {}))[1]
            found[str(index)] = (record_columns(stored.get("records") or []), stored.get("data") or known)
    return dict(sorted(found.items(), key=lambda item: int(item[0]) if item[0].isdigit() else -1))


def _run_facts(payload: dict, cache: dict[int, dict]) -> dict:
    """What every cell's provenance says of a run, found once per page (its config is YAML to parse, its task
    records files to read): its tasks' fingerprints and its seeds."""
    if id(payload) not in cache:
        cfg = run_config(payload) if (payload.get("provenance") or {}).get("config") else {}
        seeds = f"seed {cfg.get('RNG_SEED')}"
        if (cfg.get("TEST") or {}).get("ORDER_SEED", -1) != -1:
            seeds += f", stream order seed {run_order(payload)}"
        cache[id(payload)] = {"tasks": _task_fingerprints(payload), "seeds": seeds}
    return cache[id(payload)]


def _fingerprint_text(key: str, print_: dict) -> str:
    return (f"task {key}: {print_.get('files')} files, {print_.get('bytes')} bytes under {print_.get('data_dir')} "
            f"(content {print_.get('content_sha1')}, exact {print_.get('exact_sha1')})")


def _run_value(table: Table, payload: dict, column) -> str:
    """This run's own value of a cell (the mean column: its mean over the table's columns), as the table shows
    values; "-" where it has none (a named column's value is the run's own field, named in the table's notes)."""
    cells = payload_cells(payload, table.metric)
    mean = float(np.mean([cells[c] for c in table.columns])) if all(c in cells for c in table.columns) else None
    return _cell_text(table, Row("", "measured", cells, mean=mean), column)


def _run_provenance(table: Table, payload: dict, column, facts: dict) -> str:
    """One run's lines in a cell's provenance (``facts``: its ``_run_facts``)."""
    prov = payload.get("provenance") or {}
    git = prov.get("git") or {}
    tasks = facts["tasks"]
    lines = [f"<b>{_esc(payload.get('_path', '(no results file)'))}</b>"]
    value = _run_value(table, payload, column)
    detail = ""
    if isinstance(column, Column):
        record = next((r for c, r in zip(record_columns(payload["records"]), payload["records"]) if c == column),
                      None)
        detail = f" ({record['correct']}/{record['n']} correct)" if record else " (no record: not run or not finished)"
    lines.append(f"value {_esc(value)}{_esc(detail)}")
    lines.append(f"{_esc(facts['seeds'])} · config hash {_esc(prov.get('config_hash'))}")
    if git:
        lines.append(f"commit {_esc(git.get('commit'))}" + (" (dirty)" if git.get("dirty") else ""))
    versions = prov.get("versions") or {}
    if versions:
        lines.append("versions " + _esc(", ".join(f"{k} {versions[k]}" for k in SHOWN_VERSIONS if k in versions)))
    if prov.get("weights_sha256"):
        lines.append(f"weights sha256 {_esc(prov['weights_sha256'])}")
    # a domain's cell: the data of the task that recorded it; the mean and the named columns: every task's
    keys = [k for k, (columns, _) in tasks.items() if column in columns] or list(tasks)
    lines += [f"data {_esc(_fingerprint_text(k, tasks[k][1]))}" for k in keys]
    for name, item in sorted((prov.get("inputs") or {}).items()):
        lines.append(f"input {_esc(name)}: {_esc((item or {}).get('path'))} sha256 {_esc((item or {}).get('sha256'))}")
    if prov.get("finished_at"):
        lines.append(f"run {_esc(prov.get('started_at'))} to {_esc(prov['finished_at'])} on {_esc(prov.get('host'))}")
    return "<li>" + "<br>".join(lines) + "</li>"


def _cell_provenance(table: Table, row: Row, header: str, column, runs: list[dict], facts: list[dict],
                     note: str) -> str:
    head = f"{row.label}, {header}: {METRICS[table.metric][2]}"
    if row.kind == "measured":
        head += f", {'mean over' if len(runs) > 1 else 'of'} {len(runs)} run{'s' * (len(runs) > 1)}"
    elif row.kind == "tail":
        head += ", the mean of the worst runs of"
    parts = [f'<div class="prov"><p>{_esc(head)}</p>']
    if note:
        parts.append(f"<p>{_esc(note)}</p>")
    if runs:
        parts.append("<ol>" + "".join(_run_provenance(table, p, column, f) for p, f in zip(runs, facts)) + "</ol>")
    parts.append("</div>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ the page

def _sort_value(table: Table, row: Row, column) -> str:
    value = table.value(row, column)
    return "" if value is None else repr(float(value))


def _missing_reason(table: Table, row: Row, column) -> str:
    if row.kind == "paper":
        return "the paper reports no number here"
    if column == "mean":
        return "no mean: some cell of this row is missing (a run not run yet or not finished)"
    if isinstance(column, Column):
        return "missing: not run yet or not finished (no record of this cell in some run pooled here)"
    return "no value: some run pooled here has no such measurement"


def _row_html(table: Table, row: Row, runs: list[dict], facts: list[dict], notes: dict[str, str]) -> str:
    label = row.label + (f" (n={row.runs})" if row.runs > 1 else "")
    note = notes.get(row.label, "")
    cells = [f'<th scope="row" data-sort="{_esc(row.label)}">{_esc(label)}</th>']
    for key, column in _shown_columns(table):
        value = table.value(row, column)
        text = _cell_text(table, row, column)
        attrs = f'data-column="{_esc(key)}" data-sort="{_sort_value(table, row, column)}"'
        shown = _esc(text) if value is not None else "&mdash;"
        if value is None:
            attrs += f' class="missing" title="{_esc(_missing_reason(table, row, column))}"'
        if row.kind in ("measured", "tail") or note:
            provenance = _cell_provenance(table, row, key, column, runs if row.kind in ("measured", "tail") else [],
                                          facts, note)
            cells.append(f'<td {attrs}><details><summary>{shown}</summary>{provenance}</details></td>')
        else:
            cells.append(f"<td {attrs}>{shown}</td>")
    return f'<tr class="{row.kind}" data-kind="{row.kind}" data-label="{_esc(row.label)}">' + "".join(cells) + "</tr>"


def _table_html(index: int, page: PageTable, facts_cache: dict[int, dict]) -> str:
    """One table's section; ``facts_cache`` keeps each run's ``_run_facts`` across the tables of a page."""
    table = page.table
    notes = table.notes + [r.label + ": " + r.note for r in table.rows if r.note]
    # the note naming a paper row's source starts with that row's label
    row_notes = {r.label: next((n for n in table.notes if n.startswith(r.label + ":")), "")
                 for r in table.rows if r.kind == "paper"}
    row_notes.update({r.label: "measured - paper, per cell" for r in table.rows if r.kind == "diff"})
    header = ["method"] + [key for key, _ in _shown_columns(table)]
    out = [f'<section class="table" id="t{index}" data-dataset="{_esc(table.dataset)}" '
           f'data-metric="{_esc(table.metric)}">', f"<h3>{_esc(_caption(table))}</h3>",
           '<div class="side"><div><table class="results"><thead><tr>'
           + "".join(f'<th scope="col" title="click to sort">{_esc(h)}</th>' for h in header) + "</tr></thead>"]
    # a measured row and the rows that belong to it (tail, paper, difference) form one <tbody>: sorted together
    measured = iter(page.runs)
    runs: list[dict] = []
    facts: list[dict] = []
    bodies: list[list[str]] = []
    for row in table.rows:
        if row.kind == "measured":
            runs = next(measured)
            facts = [_run_facts(p, facts_cache) for p in runs]
            bodies.append([])
        bodies[-1].append(_row_html(table, row, runs, facts, row_notes))
    out += [f'<tbody data-order="{k}">' + "".join(body) + "</tbody>" for k, body in enumerate(bodies)]
    out.append("</table>")
    if notes:
        out.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    out.append("</div>")
    for caption, png in page.figures:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{_esc(caption)}</figcaption></figure>")
    out.append("</div></section>")
    return "\n".join(out)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}h3{font-size:1em}
table.results{border-collapse:collapse;font-size:.85em;margin-bottom:.5em}
table.results th,table.results td{border:1px solid #ddd;padding:.2em .45em;text-align:right;white-space:nowrap}
table.results th[scope=row],table.results thead th:first-child{text-align:left}
table.results thead th{background:#f2f2f2;cursor:pointer;user-select:none;position:sticky;top:0}
table.results thead th[aria-sort=ascending]::after{content:" \\25B2"}
table.results thead th[aria-sort=descending]::after{content:" \\25BC"}
tbody{border-top:2px solid #999}
tr.paper{font-style:italic;color:#555}tr.diff,tr.tail{color:#555}
td.missing{background:#fbeaea;color:#a00;text-align:center}
td{position:relative}summary{cursor:pointer;list-style:none}summary::-webkit-details-marker{display:none}
details[open]>summary{font-weight:bold}
div.prov{position:absolute;left:0;top:100%;z-index:10;background:#fff;border:1px solid #888;box-shadow:0 2px 6px #0003;
padding:.4em .6em;text-align:left;white-space:normal;width:34em;font-size:.9em}
div.prov ol{padding-left:1.2em;margin:.3em 0}div.prov li{margin-bottom:.4em;word-break:break-all}
ul.notes{font-size:.8em;color:#444}figure{margin:0}figure img{width:460px;max-width:100%}
div.side{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
div.side>div{max-width:60em}figcaption{font-size:.8em;color:#555}
nav li{font-size:.9em}
"""

# Sorting: a click on a header orders the table's <tbody> groups (a measured row with its tail, paper and
# difference rows) by that column of their first row, ascending then descending; empty cells stay last.
_SCRIPT = """
document.querySelectorAll("table.results").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
      var bodies = Array.prototype.slice.call(table.tBodies);
      var key = function (body) { return body.rows[0].cells[col].getAttribute("data-sort"); };
      bodies.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === "" || y === "") {
          return (x === "") - (y === "") || a.dataset.order - b.dataset.order;
        }
        var c = col === 0 ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
        return dir * c || a.dataset.order - b.dataset.order;
      });
      bodies.forEach(function (body) { table.appendChild(body); });
    });
  });
});
"""


def render_page(title: str, pages: list[PageTable], lines: list[str] = ()) -> str:
    """The page: a title, ``lines`` under it (what it was made from), a contents list, then per data set its
    tables (one per metric), each with its notes and figure."""
    datasets = list(dict.fromkeys(p.table.dataset for p in pages))
    body = [f"<h1>{_esc(title)}</h1>"] + [f"<p>{_esc(line)}</p>" for line in lines]
    body.append("<p>Click a column header to sort; click a number (or a marked missing cell) for the provenance of "
                "the runs behind it.</p>")
    contents = []
    sections = []
    facts_cache: dict[int, dict] = {}
    for dataset in datasets:
        slug = re.sub(r"[^A-Za-z0-9_-]", "-", dataset)
        sections.append(f'<h2 id="d-{_esc(slug)}">{_esc(dataset)}</h2>')
        for index, page in enumerate(pages):
            if page.table.dataset == dataset:
                contents.append(f'<li><a href="#t{index}">{_esc(_caption(page.table))}</a></li>')
                sections.append(_table_html(index, page, facts_cache))
    body.append("<nav><ul>" + "".join(contents) + "</ul></nav>")
    body += sections
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def write_page(path: Path, title: str, pages: list[PageTable], lines: list[str] = (),
               figure: str | None = "bars", more_figures: dict[str, list[tuple[str, bytes]]] | None = None) -> Path:
    """The page written to ``path`` (atomically), with each table's figure of kind ``figure``, and ``more_figures``
    ({data set: [(caption, PNG)]}, e.g. a metric against a grid's batch sizes) under the first table of their data
    set; returns the path."""
    add_figures(pages, figure or "none")
    for dataset, figures in (more_figures or {}).items():
        first = next((page for page in pages if page.table.dataset == dataset), None)
        if first is not None:
            first.figures += figures
    atomic_write_text(Path(path), render_page(title, pages, lines))
    return Path(path)
