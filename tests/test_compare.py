"""Comparison tables, aggregation over seeds, merging of shards, the paper's rows, and the compare CLI."""
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from harness import report
from harness.report import paper
from harness.results import make_record, summarise
from tests.synthetic import tiny_cfg, write_cifar_c

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ["gaussian_noise", "shot_noise", "fog"]


def fake_payload(counts, seed=1, method="source", dataset="cifar10_c", severity=5, **cfg_overrides):
    """A results payload as evaluate writes it, for {domain: (correct, n)}, with a real config dump."""
    cfg_overrides.setdefault("CORRUPTION__TYPE", list(counts))
    cfg = tiny_cfg(f"conf/{dataset}/source.yaml", RNG_SEED=seed, **cfg_overrides)
    records = [make_record(d, severity, n, c) for d, (c, n) in counts.items()]
    return {"method": method, "dataset": dataset, "setting": cfg.SETTING, "domain_label": "corruption",
            "records": records, "summary": summarise(records),
            "provenance": {"config": cfg.dump(), "config_hash": "x", "save_dir": "/nowhere"}}


def seeds_payloads(rng, seeds=(1, 2, 3), n=50):
    return [fake_payload({d: (int(rng.integers(0, n + 1)), n) for d in DOMAINS}, seed=s) for s in seeds]


def test_table_cells_equal_records_and_mean_is_mean_of_cells_shown():
    a = fake_payload({"gaussian_noise": (10, 40), "shot_noise": (13, 40), "fog": (31, 40)})
    b = fake_payload({"gaussian_noise": (7, 20), "shot_noise": (2, 20), "fog": (19, 20)}, OPTIM__LR=0.5)
    table = report.build_table([("one", [a]), ("two", [b])], with_paper=False)
    assert table.labels == DOMAINS
    for row, p in zip(table.rows, (a, b)):
        cells = [table.value(row, c) for c in table.columns]
        assert cells == pytest.approx([100 * r["correct"] / r["n"] for r in p["records"]])
        assert table.value(row, "mean") == pytest.approx(np.mean(cells))
    err = report.build_table([("one", [a])], metric="error", with_paper=False)
    assert [err.value(err.rows[0], c) for c in err.columns] == pytest.approx([75.0, 67.5, 22.5])
    assert err.value(err.rows[0], "mean") == pytest.approx(100 - np.mean([25, 32.5, 77.5]))


def test_aggregation_mean_and_std_match_numpy():
    rng = np.random.default_rng(0)
    runs = seeds_payloads(rng)
    row = report.aggregate(runs, "src")
    acc = np.array([[100 * r["accuracy"] for r in p["records"]] for p in runs])   # runs x domains
    columns = report.record_columns(runs[0]["records"])
    assert [row.cells[c] for c in columns] == pytest.approx(acc.mean(0))
    assert [row.std[c] for c in columns] == pytest.approx(acc.std(0, ddof=1))
    assert row.mean == pytest.approx(acc.mean(1).mean()) and row.mean_std == pytest.approx(acc.mean(1).std(ddof=1))
    assert row.runs == 3 and row.seeds == [1, 2, 3]
    # the same through the Markdown and CSV writers
    table = report.build_table([("src", runs)], with_paper=False)
    md = report.to_markdown(table)
    assert f"{acc.mean(0)[0]:.2f} ± {acc.std(0, ddof=1)[0]:.2f}" in md
    rows = list(csv.DictReader(io.StringIO(report.to_csv(table))))
    assert float(rows[0]["fog"]) == pytest.approx(acc.mean(0)[2], abs=1e-4)
    assert float(rows[0]["fog std"]) == pytest.approx(acc.std(0, ddof=1)[2], abs=1e-4)
    assert float(rows[0]["mean"]) == pytest.approx(acc.mean(), abs=1e-4)


def test_aggregation_refuses_configs_that_differ_beyond_the_seed_and_names_the_keys():
    a = fake_payload({"fog": (1, 2)}, seed=1)
    b = fake_payload({"fog": (2, 2)}, seed=2, OPTIM__LR=0.5, TEST__BATCH_SIZE=3)
    with pytest.raises(report.CompareError) as err:
        report.aggregate([a, b])
    assert "OPTIM.LR" in str(err.value) and "TEST.BATCH_SIZE" in str(err.value)
    assert "RNG_SEED" not in str(err.value).split("refusing")[0]
    # runs of the authors' stream order and of the suite's are different experiments
    with pytest.raises(report.CompareError, match="TEST.STREAM_ORDER"):
        report.aggregate([a, fake_payload({"fog": (2, 2)}, seed=2, TEST__STREAM_ORDER="suite")])
    # keys that cannot change results do not count
    c = fake_payload({"fog": (2, 2)}, seed=2, SAVE_DIR="/elsewhere", TEST__NUM_WORKERS=3)
    assert report.aggregate([a, c]).runs == 2
    # runs with other domains are refused too
    full = fake_payload({"fog": (1, 2), "snow": (1, 2)}, seed=1)
    partial = fake_payload({"fog": (2, 2)}, seed=3, CORRUPTION__TYPE=["fog", "snow"])
    with pytest.raises(report.CompareError, match="other domains"):
        report.aggregate([full, partial])


def test_results_are_grouped_by_config_with_seeds_pooled():
    rng = np.random.default_rng(1)
    runs = seeds_payloads(rng, seeds=(1, 2))
    other = fake_payload({d: (5, 50) for d in DOMAINS}, OPTIM__LR=0.5)
    (table,) = report.tables_from_results(runs + [other], with_paper=False)
    assert [r.runs for r in table.rows] == [2, 1]
    assert table.rows[0].label != table.rows[1].label     # one method, two configs: labels tell them apart


def test_paper_mapping_covers_every_row_of_both_csvs():
    rows = [r for r in paper.paper_rows() if r.source == paper.BATCLIP_PAPER]
    with open(REPO / "harness/report/paper_results/batclip_paper_main_table.csv", encoding="utf-8") as f:
        main = list(csv.DictReader(f))
    with open(REPO / "harness/report/paper_results/batclip_paper_dg_table.csv", encoding="utf-8") as f:
        dg = list(csv.DictReader(f))
    for line in main:
        row = paper.paper_row(paper.DATASETS[line["dataset"]], paper.METHODS[line["method"]])
        assert row is not None and row.paper_method == line["method"]
        for col, domain in paper.CORRUPTION_COLUMNS.items():
            assert row.accuracy[domain] == float(line[col])
        assert row.reported_mean == float(line["mean"]) and len(row.accuracy) == 15
    for line in dg:
        for method in [k for k in line if k not in ("dataset", "domain")]:
            row = paper.paper_row(paper.DATASETS[line["dataset"]], paper.METHODS[method])
            assert row.accuracy[paper.DG_DOMAINS[(line["dataset"], line["domain"])]] == float(line[method])
    dg_cells = sum(len(line) - 2 for line in dg)
    assert len(rows) == len(main) + dg_cells // 4 and sum(len(r.accuracy) for r in rows) == 15 * len(main) + dg_cells
    # our names are the suite's: registered corruption domains, DomainBed folder names (reference/data.md)
    import datasets
    for row in rows[:len(main)]:
        for domain in row.accuracy:
            datasets.get_dataset(row.dataset).check_domain(domain)
    folders = {"office_home": {"Art", "Clipart", "Product", "Real World"},
               "pacs": {"art_painting", "cartoon", "photo", "sketch"},
               "vlcs": {"Caltech101", "LabelMe", "SUN09", "VOC2007"},
               "terra_incognita": {"location_38", "location_43", "location_46", "location_100"}}
    for row in rows[len(main):]:
        assert set(row.accuracy) == folders[row.dataset]
        if row.dataset in datasets.DATASETS:          # the DomainBed loaders use the same names
            for domain in row.accuracy:
                datasets.get_dataset(row.dataset).check_domain(domain)
    assert {"stata", "stata_gamma_m1", "watt_p", "watt_s", "batclip", "source"} <= {r.method for r in rows}


def test_paper_rows_beside_measured_rows_with_the_difference_per_cell():
    measured = fake_payload({"gaussian_noise": (30, 50), "fog": (40, 50)}, method="batclip")
    table = report.build_table([("batclip", [measured])])
    kinds = [r.kind for r in table.rows]
    assert kinds == ["measured", "paper", "diff"]
    ours, theirs, diff = table.rows
    ref = {"gaussian_noise": 61.13, "fog": 80.84}      # the paper's BATCLIP row on CIFAR-10-C (batclip.md)
    for c in table.columns:
        assert table.value(theirs, c) == ref[c.domain]
        assert table.value(diff, c) == pytest.approx(table.value(ours, c) - ref[c.domain])
    assert table.value(theirs, "mean") == pytest.approx(np.mean(list(ref.values())))
    assert any("printed mean 73.85" in n for n in table.notes)
    # error metric: the paper's error is 100 - accuracy, the difference flips sign
    err = report.build_table([("batclip", [measured])], metric="error")
    c0 = err.columns[0]
    assert err.value(err.rows[1], c0) == pytest.approx(100 - 61.13)
    assert err.value(err.rows[2], c0) == pytest.approx(-(60.0 - 61.13))
    # no paper row at another severity, nor for a method the paper does not report
    assert [r.kind for r in report.build_table([("b", [fake_payload({"fog": (1, 2)}, method="batclip",
                                                                     severity=3)])]).rows] == ["measured"]
    assert [r.kind for r in report.build_table([("x", [fake_payload({"fog": (1, 2)}, method="nope")])]).rows] \
        == ["measured"]


def test_paper_row_of_a_run_is_the_row_of_the_shipped_config_it_matches():
    from harness.build import load_cfg

    def row_for(config, *opts):
        cfg = load_cfg(f"conf/imagenet_c/{config}.yaml", list(opts))
        found = paper.paper_row_for_run("imagenet_c", cfg.MODEL.ADAPTATION, cfg)
        return found.method if found else None

    # StatA has two paper rows (gamma 0.1 and -1); each shipped config gets its own, a CfgNode or a YAML dump alike
    assert row_for("stata") == "stata" and row_for("stata_gamma_m1") == "stata_gamma_m1"
    cfg = load_cfg("conf/imagenet_c/stata_gamma_m1.yaml")
    assert paper.paper_row_for_run("imagenet_c", "stata", cfg.dump()).method == "stata_gamma_m1"
    # a run that keeps gamma -1's stream but changes another key is still that row
    assert row_for("stata_gamma_m1", "STATA.N_NEIGHBORS", "5") == "stata_gamma_m1"
    # a stream neither row describes as well as the other: no paper row rather than the wrong one
    assert row_for("stata", "TEST.DELTA_DIRICHLET", "0.5", "TEST.CORRELATION_SAMPLER", "anchor") is None
    assert row_for("stata", "TEST.CORRELATION_SAMPLER", "anchor") is None     # gamma 0.1 without StatA's sampler
    assert row_for("stata", "TEST.DELTA_DIRICHLET", "0.0") == "stata_gamma_m1"  # a sorted stream, whatever sampler
    # a method with one row gets it whatever its keys; other data sets and unknown methods none
    assert paper.paper_row_for_run("imagenet_c", "batclip", {"OPTIM": {"LR": 1.0}}).method == "batclip"
    assert paper.paper_row_for_run("cifar10_c", "stata", {}) is None
    assert paper.paper_row_for_run("imagenet_c", "nope", {}) is None


def test_merge_of_shards_and_disagreeing_shards(tmp_path):
    a = fake_payload({"gaussian_noise": (3, 10), "fog": (4, 10)}, CORRUPTION__TYPE=DOMAINS)
    b = fake_payload({"shot_noise": (5, 10), "fog": (4, 10)}, CORRUPTION__TYPE=DOMAINS)
    merged = report.merge([b, a])
    assert [r["domain"] for r in merged["records"]] == DOMAINS and merged["complete"]
    assert merged["summary"]["mean_accuracy"] == pytest.approx(np.mean([0.3, 0.5, 0.4]))
    bad = fake_payload({"fog": (9, 10)}, CORRUPTION__TYPE=DOMAINS)
    with pytest.raises(report.CompareError, match="disagree"):
        report.merge([a, bad])
    with pytest.raises(report.CompareError, match="RNG_SEED"):
        report.merge([a, fake_payload({"shot_noise": (5, 10)}, seed=7, CORRUPTION__TYPE=DOMAINS)])


def test_writers_markdown_csv_latex_and_figure(tmp_path):
    runs = seeds_payloads(np.random.default_rng(2), seeds=(1, 2))
    table = report.build_table([("source", runs)])
    written = report.write_table(table, tmp_path, "cmp", figure="heatmap")
    assert sorted(p.suffix for p in written) == [".csv", ".md", ".png", ".tex"]
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    tex = (tmp_path / "cmp.tex").read_text()
    assert r"gaussian\_noise" in tex and r"$\pm$" in tex and r"\textit{source (paper)}" in tex
    md = (tmp_path / "cmp.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| method"))
    assert header == "| method | gaussian_noise | shot_noise | fog | mean |"
    assert report.to_figure(table, tmp_path / "bars.png", "bars").is_file()


def _cli(argv, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_cli", REPO / "scripts" / "compare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(argv)
    return code, capsys.readouterr()


def test_cli_runs_methods_on_the_same_stream_and_tabulates_results(tmp_path, capsys):
    write_cifar_c(tmp_path / "data", ["gaussian_noise", "fog"], per_severity=16)
    other = tmp_path / "source_blurry.yaml"
    other.write_text("MODEL:\n  ADAPTATION: source\nCORRUPTION:\n  DATASET: cifar10_c\n"
                     "CLIP:\n  PROMPT_TEMPLATE: ['a blurry photo of a {}.']\nTEST:\n  BATCH_SIZE: 5\n")
    common = ["DATA_DIR", str(tmp_path / "data"), "SAVE_DIR", str(tmp_path / "out"), "MODEL.ARCH", "tiny-clip-test",
              "MODEL.WEIGHTS", "none", "TEST.NUM_WORKERS", "0", "DEVICE", "cpu",
              "CORRUPTION.TYPE", "['gaussian_noise', 'fog']"]
    code, out = _cli(["--cfg", "conf/cifar10_c/source.yaml", "--out", str(tmp_path / "cmp"), "--figure", "none",
                      "--methods", "source", str(other), *common], capsys)
    assert code == 0, out.err
    results = sorted((tmp_path / "out" / "cifar10_c" / "source").glob("*/results.json"))
    assert len(results) == 2
    payloads = [json.loads(p.read_text()) for p in results]
    # both methods saw the same data, stream and backbone; only the method's own keys differ
    cfgs = [report.run_config(p) for p in payloads]
    assert {c["CLIP"]["PROMPT_TEMPLATE"][0] for c in cfgs} == {"a photo of a {}.", "a blurry photo of a {}."}
    assert all(c["CORRUPTION"]["TYPE"] == ["gaussian_noise", "fog"] and c["MODEL"]["ARCH"] == "tiny-clip-test"
               for c in cfgs)
    rows = list(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    by_label = {r["row"]: r for r in rows}
    assert set(by_label) >= {"source", "source_blurry", "source (paper)", "source - paper"}
    for p in payloads:
        label = "source" if report.run_config(p)["CLIP"]["PROMPT_TEMPLATE"][0].startswith("a photo") \
            else "source_blurry"
        for r in p["records"]:
            assert float(by_label[label][r["domain"]]) == pytest.approx(100 * r["accuracy"], abs=1e-4)
    assert float(by_label["source (paper)"]["fog"]) == 70.22
    # the single-run table in the log shows the paper's row beside the measured one
    log = (results[0].parent / "log.txt").read_text()
    assert "paper acc %" in log and re.search(r"fog\s+5\s+16\s+[\d.]+\s+[\d.]+\s+70\.22", log)
    # tabulating the existing results gives the same numbers
    code, out = _cli(["--results", str(tmp_path / "out"), "--no-paper"], capsys)
    assert code == 0 and "| source" in out.out and "(paper)" not in out.out
    # a method name without a config file is a clear error
    code, out = _cli(["--cfg", "conf/cifar10_c/source.yaml", "--methods", "no_such_method", *common], capsys)
    assert code == 2 and "conf/cifar10_c/no_such_method.yaml" in out.err


def test_method_papers_table_is_read_in_our_names_with_its_source():
    """Every line of method_papers.csv becomes exactly one number of one row, read back here with a plain CSV reader;
    the BATCLIP paper's rows keep their own source, and paper_methods keeps to BATCLIP's paper by default."""
    with open(REPO / "harness/report/paper_results/method_papers.csv", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    assert lines, "no reported numbers of the added methods"
    rows = [r for r in paper.paper_rows() if r.source != paper.BATCLIP_PAPER]
    assert sum(len(r.accuracy) + (r.reported_mean is not None and not r.accuracy) for r in rows) == len(lines)
    for line in lines:
        row = paper.paper_row(line["dataset"], line["method"])
        assert row.source == line["source"] and row.paper_method == line["paper_method"]
        value = row.reported_mean if line["domain"] == "mean" else row.accuracy[line["domain"]]
        assert value == float(line["accuracy"])
    assert "clipartt" not in paper.paper_methods("cifar10_c")
    assert "clipartt" in paper.paper_methods("cifar10_c", "CLIPArTT (WACV 2025) Table 8")


def test_a_paper_that_prints_only_a_mean_is_compared_on_the_mean_over_its_domains():
    """CLIPArTT's paper prints only its mean over the 15 CIFAR-10-C corruptions: the paper row shows that mean and the
    difference of means, no cells, and only for a run of exactly those 15 at severity 5."""
    corruptions = list(paper.CORRUPTION_COLUMNS.values())
    measured = fake_payload({c: (30 + i, 50) for i, c in enumerate(corruptions)}, method="clipartt")
    table = report.build_table([("clipartt", [measured])])
    ours, theirs, diff = table.rows
    assert [r.kind for r in table.rows] == ["measured", "paper", "diff"]
    assert theirs.cells == {} and diff.cells == {}
    assert theirs.mean == 73.22
    expected_mean = np.mean([100 * (30 + i) / 50 for i in range(15)])
    assert ours.mean == pytest.approx(expected_mean) and diff.mean == pytest.approx(expected_mean - 73.22)
    assert any("as reported in CLIPArTT (WACV 2025) Table 8, printed mean only (over its 15 domains)" in n
               for n in table.notes)
    part = fake_payload({c: (30, 50) for c in corruptions[:14]}, method="clipartt")
    assert [r.kind for r in report.build_table([("clipartt", [part])]).rows] == ["measured"]
    other_severity = fake_payload({c: (30, 50) for c in corruptions}, method="clipartt", severity=3)
    assert [r.kind for r in report.build_table([("clipartt", [other_severity])]).rows] == ["measured"]
