"""The results page (harness/report/html.py, `grid.py report --html`, `compare.py --html`): parsed without a browser,
every cell is the records' number (a plain loop over the results), the paper's rows are there, missing cells are
marked, every cell carries the provenance of its runs, nothing is fetched from elsewhere, and the same results give
the same file; then in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; skipped, saying why,
where either is absent): the page loads without errors, the DOM after its scripts ran holds the numbers, a click on
a header sorts the rows and a click on a number opens its provenance."""
from __future__ import annotations

import json
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import grid as grids
from harness import report
from harness import results as run_results
from harness.report import html
from harness.report.model import METRICS
from tests.grid_support import DOMAINS, ROOT, write_grid, write_shapes
from tests.test_compare import fake_payload

# A record's cost sub-dict as runs write it (harness/cost.py); results written before cost was recorded have none.
COST_FIELDS = getattr(run_results, "COST_FIELDS", ("seconds_per_image", "peak_memory_mib"))
CHROMIUM = Path("/usr/bin/chromium")
# Chromium as this machine's closed network needs it (no background connections, no first-run or update work).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _script_main(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------------------------------ reading the page

class PageParser(HTMLParser):
    """The page's tables as {(data set, metric): {row label: {"kind", "cells": {column: cell}}}}, a cell being
    {"text" (the number shown, or its summary), "class", "title", "prov" (its provenance's text)}; every
    src/href; the row labels in document order per table."""

    def __init__(self):
        super().__init__()
        self.tables: dict[tuple, dict] = {}
        self.order: dict[tuple, list[str]] = {}
        self.links: list[str] = []
        self.table = self.row = self.cell = None
        self.in_prov = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "section" and "data-metric" in a:
            self.table = (a["data-dataset"], a["data-metric"])
            self.tables[self.table], self.order[self.table] = {}, []
        elif tag == "tr" and "data-kind" in a:
            self.row = self.tables[self.table].setdefault(a["data-label"], {"kind": a["data-kind"], "cells": {}})
            self.order[self.table].append(a["data-label"])
        elif tag == "td" and "data-column" in a:
            self.cell = self.row["cells"].setdefault(a["data-column"], {"text": "", "class": a.get("class", ""),
                                                                        "title": a.get("title", ""), "prov": ""})
        elif tag == "div" and a.get("class") == "prov":
            self.in_prov += 1
        elif tag == "div" and self.in_prov:
            self.in_prov += 1

    def handle_endtag(self, tag):
        if tag == "td":
            self.cell = None
        elif tag == "div" and self.in_prov:
            self.in_prov -= 1

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["prov" if self.in_prov else "text"] += data


def parse_page(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


# ------------------------------------------------------------------------------------------------ the expected numbers

def record_value(record: dict, field: str):
    """A record's value of a METRICS field, read here on its own: the record's key, or its "cost" sub-dict's."""
    if field.startswith("cost."):
        return (record.get("cost") or {}).get(field.split(".", 1)[1])
    return record.get(field)


def expected_texts(runs: list[dict], metric: str, domains: list[str]) -> dict[str, str]:
    """{column: the text the table shows} of a measured row pooling ``runs``, by a plain loop over their records:
    per domain the mean over runs of the scaled value (± the sample std with several runs); the mean column the
    mean over runs of each run's mean over the domains, where every run has every domain."""
    field, scale, _ = METRICS[metric]
    per_run = []
    for p in runs:
        values = {}
        for r in p["records"]:
            v = record_value(r, field)
            if v is not None:
                values[r["domain"]] = scale * v
        per_run.append(values)

    def text(values):
        shown = f"{sum(values) / len(values):.2f}"
        return shown + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
    texts = {}
    for d in domains:
        texts[d] = text([run[d] for run in per_run]) if all(d in run for run in per_run) else "\u2014"
    complete = all(all(d in run for d in domains) for run in per_run)
    texts["mean"] = text([sum(run[d] for d in domains) / len(domains) for run in per_run]) if complete else "\u2014"
    return texts


# ------------------------------------------------------------------------------------------------ a comparison's page

FOG_CE = ["gaussian_noise", "fog"]


def comparison_runs() -> dict[str, list[dict]]:
    """BATCLIP on CIFAR-10-C over two seeds (the paper reports it: its rows follow), a source run of another config
    that has not finished fog (a missing cell, no mean), and a method whose name needs escaping; every record with
    an ECE and a cost sub-dict, so those tables appear."""
    runs = {"batclip": [fake_payload({"gaussian_noise": (30, 50), "fog": (40, 50)}, method="batclip"),
                        fake_payload({"gaussian_noise": (33, 50), "fog": (41, 50)}, method="batclip", seed=2)],
            "source": [fake_payload({"gaussian_noise": (20, 50)}, method="source", OPTIM__LR=0.5,
                                    CORRUPTION__TYPE=FOG_CE)],
            "<b>x</b>": [fake_payload({"gaussian_noise": (5, 50), "fog": (45, 50)}, method="<b>x</b>",
                                      OPTIM__LR=0.25)]}
    runs["source"][0]["expected"] = [[d, 5] for d in FOG_CE]
    for k, p in enumerate(p for group in runs.values() for p in group):
        for j, r in enumerate(p["records"]):
            r["ece"] = 0.01 * (k + 1) + 0.001 * j
            r["cost"] = {field: 0.002 * (k + 1) + 0.0001 * j + i for i, field in enumerate(COST_FIELDS)}
        p["summary"] = {**p["summary"], "mean_ece": statistics.mean(r["ece"] for r in p["records"])}
    return runs


def write_runs(folder: Path, runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each run as its own results.json below ``folder``; the runs with their paths, as load_results reads them."""
    for k, p in enumerate(p for group in runs.values() for p in group):
        path = folder / f"run{k}" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(p))
        p["_path"] = str(path)
    return runs


def check_page(page: PageParser, runs_by_label: dict[str, list[dict]], dataset: str, domains: list[str]) -> None:
    """Every measured cell of every table is the records' number, and carries each pooled run's provenance."""
    payloads = [p for runs in runs_by_label.values() for p in runs]
    metrics = [m for m in METRICS if m != "error"
               and any(record_value(r, METRICS[m][0]) is not None for p in payloads for r in p["records"])]
    assert sorted(m for d, m in page.tables if d == dataset) == sorted(metrics)
    for metric in metrics:
        table = page.tables[(dataset, metric)]
        for label, runs in runs_by_label.items():
            row = table[label]
            assert row["kind"] == "measured"
            texts = expected_texts(runs, metric, domains)
            assert {c: cell["text"] for c, cell in row["cells"].items()} == texts, (metric, label)
            for column, cell in row["cells"].items():
                if texts[column] == "\u2014":
                    assert "missing" in cell["class"] and cell["title"], (metric, label, column)
                for p in runs:        # the provenance of every run pooled in the cell
                    prov = p["provenance"]
                    assert p["_path"] in cell["prov"] and f"config hash {prov['config_hash']}" in cell["prov"]
                    seed = re.search(r"RNG_SEED: (\d+)", prov["config"]).group(1)
                    assert f"seed {seed}" in cell["prov"]


def test_comparison_page_holds_the_records_numbers_paper_rows_missing_cells_and_provenance(tmp_path):
    runs = write_runs(tmp_path, comparison_runs())
    groups = report.group_runs([p for group in runs.values() for p in group])
    assert [label for label, _ in groups] == list(runs)
    pages = html.pages_for([groups])
    text = html.render_page("comparison <test>", pages)
    page = parse_page(text)
    check_page(page, runs, "cifar10_c", FOG_CE)
    accuracy = page.tables[("cifar10_c", "accuracy")]
    # the paper's rows after BATCLIP: its printed numbers (batclip.md) and the difference per cell
    assert page.order[("cifar10_c", "accuracy")][:3] == ["batclip", "batclip (paper)", "batclip - paper"]
    assert {c: cell["text"] for c, cell in accuracy["batclip (paper)"]["cells"].items()} == \
        {"gaussian_noise": "61.13", "fog": "80.84", "mean": f"{(61.13 + 80.84) / 2:.2f}"}
    measured = {"gaussian_noise": (30 + 33) / 100, "fog": (40 + 41) / 100}
    assert accuracy["batclip - paper"]["cells"]["fog"]["text"] == f"{100 * measured['fog'] - 80.84:+.2f}"
    assert "BATCLIP" in accuracy["batclip (paper)"]["cells"]["fog"]["prov"]       # the paper row names its source
    # the paper reports accuracy only: no paper rows in the other metrics' tables
    assert all(row["kind"] == "measured" for row in page.tables[("cifar10_c", "ece")].values())
    # a paper row shows the paper's numbers for the measured row's cells only: source has no fog, nor has its paper row
    assert accuracy["source (paper)"]["cells"]["fog"]["title"] == "the paper reports no number here"
    # escaped text, nothing fetched from elsewhere, and the same results give the same page
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text and "comparison &lt;test&gt;" in text
    assert not [link for link in page.links if not link.startswith(("#", "data:image/png;base64,"))]
    assert not re.search(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert html.render_page("comparison <test>", html.pages_for([groups])) == text


def test_rows_given_other_runs_are_refused_rather_than_shown_with_their_provenance(tmp_path):
    runs = write_runs(tmp_path, comparison_runs())
    groups = report.group_runs([p for group in runs.values() for p in group])
    table = report.build_table(groups)
    with pytest.raises(report.CompareError, match="not the runs"):
        html.with_runs(table, [groups[1], groups[0], groups[2]])
    with pytest.raises(report.CompareError, match="measured rows"):
        html.with_runs(table, groups[:2])


def test_compare_results_html_writes_the_page_beside_the_tables_and_prints_its_path(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs", comparison_runs())
    main = _script_main("compare")
    assert main(["--results", str(tmp_path / "runs"), "--out", str(tmp_path / "tables"), "--html",
                 "--figure", "none"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "tables" / "comparison.html"
    assert f"wrote {path}" in out
    check_page(parse_page(path.read_text()), runs, "cifar10_c", FOG_CE)
    # a path of one's own, and the figures embedded as PNG data
    assert main(["--results", str(tmp_path / "runs"), "--html", str(tmp_path / "mine.html")]) == 0
    assert f"wrote {tmp_path / 'mine.html'}" in capsys.readouterr().out
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', (tmp_path / "mine.html").read_text())
    import base64
    assert images and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)


# ------------------------------------------------------------------------------------------------ the tiny grid's page

@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """The tiny grid (shapes_c, source and TENT on two corruptions), its page before any run and after every job
    ran (debug launcher, this process)."""
    folder = tmp_path_factory.mktemp("html_grid")
    data = write_shapes(folder / "data")
    path = write_grid(folder)
    opts = ["DATA_DIR", str(data), "SAVE_DIR", str(folder / "out")]
    main = _script_main("grid")
    assert main(["report", str(path), "--html", str(folder / "before.html"), *opts]) == 0
    assert main(["run", str(path), "--launcher", "debug", *opts]) == 0
    assert main(["report", str(path), "--html", *opts]) == 0
    grid = grids.load_grid(path, opts)
    return {"grid": grid, "before": folder / "before.html", "page": grid.folder / "tables" / f"{grid.name}.html",
            "main": main, "path": path, "opts": opts}


def test_the_tiny_grids_page_holds_its_results_with_their_provenance(tiny_grid):
    grid = tiny_grid["grid"]
    runs = {}
    for cell in grid.cells:
        results = Path(cell.jobs[0].run_dir) / "results.json"
        runs[cell.config_name] = [{**json.loads(results.read_text()), "_path": str(results)}]
    page = parse_page(tiny_grid["page"].read_text())
    check_page(page, runs, "shapes_c", DOMAINS)
    # each domain's cell names the data fingerprint of the task that recorded it (the task records' own)
    for name, (payload,) in runs.items():
        for k, domain in enumerate(DOMAINS):
            stored = json.loads((Path(payload["_path"]).parent / "tasks" / f"task_{k:04d}.json").read_text())
            assert stored["records"][0]["domain"] == domain
            prov = page.tables[("shapes_c", "accuracy")][name]["cells"][domain]["prov"]
            assert f"content {stored['data']['content_sha1']}" in prov and f"task {k}:" in prov
            assert f"commit {payload['provenance']['git']['commit']}" in prov
    # before any run: every cell is marked missing, with the run folder it will be in
    before = parse_page(tiny_grid["before"].read_text())
    assert set(before.tables) == {("shapes_c", "accuracy")}
    for name, row in before.tables[("shapes_c", "accuracy")].items():
        for cell in row["cells"].values():
            assert cell["text"] == "\u2014" and "missing" in cell["class"] and "not run yet" in cell["prov"]


def test_status_refuses_html_in_one_line(tiny_grid, capsys):
    with pytest.raises(SystemExit):
        tiny_grid["main"](["status", str(tiny_grid["path"]), "--html", *tiny_grid["opts"]])
    assert "--html is a flag of 'report'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ in Chromium

@pytest.fixture()
def browser(tmp_path):
    """A headless Chromium with a fresh profile, driven by Playwright (its own browser is not downloaded: Debian's
    is used); closed (its processes killed) at the end whatever happens."""
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (Debian package chromium): apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright's Python package is not installed (pip install playwright; it drives "
                    f"{CHROMIUM}, no browser download needed)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            timeout=60_000, viewport={"width": 1200, "height": 900})
        try:
            context.set_default_timeout(20_000)
            yield context
        finally:
            context.close()


def open_page(context, path: Path):
    """The page loaded from its file, with every script error and console error it raised."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"page error: {err}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, errors


def shown_texts(page, selector: str) -> dict[str, dict[str, str]]:
    """{row label: {column: the text shown}} of the table at ``selector``, read from the live DOM."""
    return page.eval_on_selector(selector, """t => Object.fromEntries(Array.from(t.querySelectorAll("tr[data-label]"))
        .map(tr => [tr.dataset.label, Object.fromEntries(Array.from(tr.querySelectorAll("td[data-column]"))
        .map(td => [td.dataset.column, (td.querySelector("summary") || td).textContent])) ]))""")


def test_in_chromium_the_page_loads_sorts_and_opens_provenance(browser, tmp_path, tiny_grid):
    runs = write_runs(tmp_path / "runs", comparison_runs())
    groups = report.group_runs([p for group in runs.values() for p in group])
    path = html.write_page(tmp_path / "page.html", "comparison", html.pages_for([groups]), figure="bars")
    page, errors = open_page(browser, path)
    table = 'section[data-dataset="cifar10_c"][data-metric="accuracy"] table'
    shown = shown_texts(page, table)
    for label, group in runs.items():
        assert shown[label] == expected_texts(group, "accuracy", FOG_CE)

    def order():       # the measured rows, top to bottom
        return page.eval_on_selector(table, """t => Array.from(t.tBodies).map(b => b.rows[0].dataset.label)""")
    assert order() == ["batclip", "source", "<b>x</b>"]
    fog = {label: 0.0 if group[0]["records"][-1]["domain"] != "fog" else
           statistics.mean(100 * p["records"][-1]["accuracy"] for p in group) for label, group in runs.items()}
    with_fog = [label for label in runs if label != "source"]        # source has no fog: last either way
    page.click(f"{table} thead th:nth-child(3)")
    assert page.get_attribute(f"{table} thead th:nth-child(3)", "aria-sort") == "ascending"
    assert order() == sorted(with_fog, key=fog.get) + ["source"]
    page.click(f"{table} thead th:nth-child(3)")
    assert order() == sorted(with_fog, key=fog.get, reverse=True) + ["source"]
    # a measured row keeps its paper and difference rows under it
    rows = page.eval_on_selector(table, "t => Array.from(t.querySelectorAll('tr[data-label]'))"
                                        ".map(r => r.dataset.label)")
    at = rows.index("batclip")
    assert rows[at:at + 3] == ["batclip", "batclip (paper)", "batclip - paper"]
    # a click on a number opens its provenance
    cell = f'{table} tr[data-label="batclip"] td[data-column="fog"]'
    assert not page.is_visible(f"{cell} div.prov")
    page.click(f"{cell} summary")
    assert page.eval_on_selector(f"{cell} details", "d => d.open") and page.is_visible(f"{cell} div.prov")
    assert runs["batclip"][1]["_path"] in page.inner_text(f"{cell} div.prov")
    assert errors == []

    # the tiny grid's page: its numbers in the DOM; a screenshot with a provenance opened
    page, errors = open_page(browser, tiny_grid["page"])
    grid_runs = {cell.config_name: [json.loads((Path(cell.jobs[0].run_dir) / "results.json").read_text())]
                 for cell in tiny_grid["grid"].cells}
    table = 'section[data-dataset="shapes_c"][data-metric="accuracy"] table'
    shown = shown_texts(page, table)
    for label, group in grid_runs.items():
        assert shown[label] == expected_texts(group, "accuracy", DOMAINS)
    page.click(f'{table} tr[data-label="tent"] td[data-column="fog"] summary')
    assert page.is_visible(f'{table} tr[data-label="tent"] td[data-column="fog"] div.prov')
    page.screenshot(path=str(tmp_path / "html_page.png"))
    assert (tmp_path / "html_page.png").read_bytes()[:4] == b"\x89PNG"
    assert errors == []
