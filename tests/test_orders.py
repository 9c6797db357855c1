"""Stream orders apart from the seed (TEST.ORDER_SEED) and the tail statistic over them (compare.py --orders K)."""
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conf import ConfigError
from harness import report
from harness.identity import config_hash, identity_keys
from harness.report import CompareError
from harness.report.runs import group_runs, tail_count, tail_mean
from harness.stream import authors_stream_order, stream_order, task_stream_order
from tests.synthetic import LabelledPart, tiny_cfg, write_cifar_c
from tests.test_compare import DOMAINS, _cli, fake_payload


# ------------------------------------------------------------------------------------------------ the statistic

def test_tail_count_is_a_tenth_rounded_up_and_at_least_one():
    # OGA: 10 of its 100 runs; below 10 runs the worst run alone; 30 runs: 3 (not 4, as ceil(0.1 * 30) would give)
    assert [tail_count(k) for k in (1, 3, 9, 10, 11, 19, 20, 21, 30, 100)] == [1, 1, 1, 1, 2, 2, 2, 3, 3, 10]


def test_tail_mean_by_hand():
    twenty = [71.0, 64.0, 80.0, 55.0, 90.0, 62.0, 77.0, 68.0, 59.0, 84.0,
              73.0, 66.0, 58.0, 81.0, 70.0, 75.0, 61.0, 79.0, 67.0, 72.0]
    assert tail_mean(twenty) == pytest.approx((55 + 58) / 2)            # the 2 worst of 20
    assert tail_mean(twenty, "high") == pytest.approx((90 + 84) / 2)    # error-like: the 2 highest
    ten = twenty[:10]
    assert tail_mean(ten) == 55.0                                        # the worst 1 of 10
    assert tail_mean([40.0, 30.0, 35.0]) == 30.0                         # K < 10: the worst order
    assert tail_mean(list(np.arange(100.0))[::-1]) == pytest.approx(4.5)   # mean of 0..9


# ------------------------------------------------------------------------------------------------ pooling

def order_payloads(rng, orders=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), n=40):
    return [fake_payload({d: (int(rng.integers(0, n + 1)), n) for d in DOMAINS}, TEST__ORDER_SEED=o) for o in orders]


def test_pooling_over_orders_equals_a_plain_loop_over_the_records():
    runs = order_payloads(np.random.default_rng(3))
    (label, grouped), = group_runs(runs)                     # one config: one row, the orders pooled
    assert len(grouped) == 11 and label == "source"
    table = report.build_table([(label, grouped)], with_paper=False)
    measured, tail = table.rows
    assert (measured.kind, tail.kind, tail.label) == ("measured", "tail", "source (tail: worst 2 of 11)")
    worst_two = 2
    per_run_means = []
    for k, column in enumerate(table.columns):
        values = []
        for p in runs:
            values.append(100.0 * p["records"][k]["correct"] / p["records"][k]["n"])
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        assert table.value(measured, column) == pytest.approx(mean)
        assert table.spread(measured, column) == pytest.approx(std)
        assert table.value(tail, column) == pytest.approx(sum(sorted(values)[:worst_two]) / worst_two)
    for p in runs:
        per_run_means.append(sum(100.0 * r["correct"] / r["n"] for r in p["records"]) / len(p["records"]))
    assert table.value(measured, "mean") == pytest.approx(sum(per_run_means) / len(per_run_means))
    assert table.value(tail, "mean") == pytest.approx(sum(sorted(per_run_means)[:worst_two]) / worst_two)
    assert measured.orders == list(range(1, 12)) and measured.seeds == [1] * 11
    # error: the tail is the mean of the highest errors, i.e. 100 - the tail of accuracy
    err = report.build_table([(label, grouped)], metric="error", with_paper=False)
    errors = sorted(100.0 - 100.0 * p["records"][0]["correct"] / p["records"][0]["n"] for p in runs)
    assert err.value(err.rows[1], err.columns[0]) == pytest.approx(sum(errors[-worst_two:]) / worst_two)


def test_orders_show_in_every_writer_and_seed_tables_stay_as_they_were():
    runs = order_payloads(np.random.default_rng(4), orders=(1, 2, 3))
    table = report.build_table(group_runs(runs), with_paper=False)
    rows = list(csv.DictReader(report.to_csv(table).splitlines()))
    assert [(r["row"], r["kind"], r["orders"]) for r in rows] == [("source", "measured", "1 2 3"),
                                                                   ("source (tail: worst 1 of 3)", "tail", "1 2 3")]
    assert float(rows[1]["fog"]) == pytest.approx(min(100 * p["records"][2]["accuracy"] for p in runs), abs=1e-4)
    assert "| source (tail: worst 1 of 3) |" in report.to_markdown(table) and "expected tail" in table.notes[-1]
    assert r"source (tail: worst 1 of 3) &" in report.to_latex(table)
    # runs over seeds only (TEST.ORDER_SEED -1): no tail row, no orders column, no note
    seeds = [fake_payload({d: (5 + s, 20) for d in DOMAINS}, seed=s) for s in (1, 2, 3)]
    plain = report.build_table(group_runs(seeds), with_paper=False)
    assert [r.kind for r in plain.rows] == ["measured"] and not plain.notes
    assert report.to_csv(plain).splitlines()[0].startswith("row,kind,method,metric,runs,seeds,gaussian_noise,")


def test_a_run_at_order_seed_minus_one_is_the_run_of_order_seed_equal_to_its_seed():
    runs = [fake_payload({d: (5, 20) for d in DOMAINS}), fake_payload({d: (5, 20) for d in DOMAINS},
                                                                      TEST__ORDER_SEED=1)]
    with pytest.raises(CompareError, match=r"count as two seeds: give one of them \(both RNG_SEED 1, stream order "
                                           r"seed 1\)"):
        group_runs(runs)
    other = fake_payload({d: (5, 20) for d in DOMAINS}, TEST__ORDER_SEED=2)
    assert len(group_runs([runs[0], other])) == 1          # RNG_SEED 1 with orders 1 (its own) and 2: one row


# ------------------------------------------------------------------------------------------------ the key

PARTS = [LabelledPart(np.arange(40) % 4), LabelledPart(np.arange(30) % 4)]
SIZES = [40, 30]


@pytest.mark.parametrize("order,correlation", [("sequential", "none"), ("shuffled", "none"), ("sequential", "label")])
def test_order_seed_minus_one_is_todays_order_and_another_seed_another(order, correlation):
    task = SimpleNamespace(order=order, correlation=correlation, dirichlet_delta=0.0)
    labels = np.concatenate([p.labels for p in PARTS]) if correlation != "none" else None
    for stream in ("authors", "suite"):
        def before(seed):        # harness.stream's functions called as task_stream_order called them before the key
            if stream == "authors":
                return authors_stream_order(SIZES, order, seed, labels, correlation, 0.0, presampled=False)
            return stream_order(SIZES, order, seed, 2, labels=labels, correlation=correlation, batch_size=8)
        cfg = tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, TEST__STREAM_ORDER=stream, TEST__BATCH_SIZE=8)
        assert cfg.TEST.ORDER_SEED == -1
        assert np.array_equal(task_stream_order(cfg, task, 2, PARTS), before(5))
        same = tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, TEST__STREAM_ORDER=stream, TEST__BATCH_SIZE=8,
                        TEST__ORDER_SEED=5)
        assert np.array_equal(task_stream_order(same, task, 2, PARTS), before(5))
        other = tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, TEST__STREAM_ORDER=stream, TEST__BATCH_SIZE=8,
                         TEST__ORDER_SEED=9)
        assert np.array_equal(task_stream_order(other, task, 2, PARTS), before(9))
        assert not np.array_equal(before(9), before(5))


def test_the_authors_subset_keeps_its_images_and_is_reshuffled_by_another_order_seed():
    task = SimpleNamespace(order="sequential", correlation="none", dirichlet_delta=0.0)
    drawn = tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, CORRUPTION__NUM_EX=20)
    # the subset drawn with RNG_SEED is streamed in its draw's order, at -1 and at ORDER_SEED = RNG_SEED alike
    assert np.array_equal(task_stream_order(drawn, task, 0, PARTS), np.arange(70))
    again = tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, CORRUPTION__NUM_EX=20, TEST__ORDER_SEED=5)
    assert np.array_equal(task_stream_order(again, task, 0, PARTS), np.arange(70))
    other = tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, CORRUPTION__NUM_EX=20, TEST__ORDER_SEED=9)
    shuffled = task_stream_order(other, task, 0, PARTS)
    assert np.array_equal(shuffled, authors_stream_order(SIZES, "sequential", 9))     # random.Random(9).shuffle
    assert sorted(shuffled[:40]) == list(range(40)) and not np.array_equal(shuffled, np.arange(70))


def test_the_ood_mixing_follows_the_order_seed(monkeypatch):
    from harness import open_set
    seen = []
    monkeypatch.setattr(open_set, "open_set_batches", lambda *args: seen.append(args[-1]) or ([[0]], []))
    monkeypatch.setattr(open_set, "OpenSetStream", lambda *args: [0])
    task = SimpleNamespace(order="sequential")
    for order_seed in (-1, 9):
        cfg = tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, TEST__ORDER_SEED=order_seed, TEST__NUM_WORKERS=0)
        open_set.open_set_loader(cfg, task, 3, PARTS, [], np.arange(70), None, torch.device("cpu"))
    assert seen == [[5, 0x00D5E7, 3], [9, 0x00D5E7, 3]]


def test_the_methods_randomness_stays_on_rng_seed():
    from harness.run import seed_everything
    draws = []
    for order_seed in (-1, 9):
        seed_everything(tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, TEST__ORDER_SEED=order_seed))
        draws.append((torch.rand(3), np.random.rand(3)))
    assert torch.equal(draws[0][0], draws[1][0]) and np.array_equal(draws[0][1], draws[1][1])


def test_the_key_at_its_default_moves_no_config_hash_and_bad_values_are_refused():
    cfg = tiny_cfg("conf/cifar10_c/tent.yaml")
    without = cfg.clone()
    without.defrost()
    del without.TEST["ORDER_SEED"]          # a config from before the key: the identity it had
    assert config_hash(cfg) == config_hash(without)
    assert "TEST.ORDER_SEED" not in identity_keys(cfg.dump())
    chosen = tiny_cfg("conf/cifar10_c/tent.yaml", TEST__ORDER_SEED=1)
    assert config_hash(chosen) != config_hash(cfg) and identity_keys(chosen.dump())["TEST.ORDER_SEED"] == 1
    with pytest.raises(ConfigError, match=r"TEST\.ORDER_SEED.*-2"):
        tiny_cfg("conf/cifar10_c/tent.yaml", TEST__ORDER_SEED=-2)


# ------------------------------------------------------------------------------------------------ compare.py

def test_compare_over_three_orders_gives_each_method_its_mean_std_and_tail(tmp_path, capsys):
    write_cifar_c(tmp_path / "data", ["gaussian_noise", "fog"], per_severity=16)
    common = ["DATA_DIR", str(tmp_path / "data"), "SAVE_DIR", str(tmp_path / "out"), "MODEL.ARCH", "tiny-clip-test",
              "MODEL.WEIGHTS", "none", "TEST.NUM_WORKERS", "0", "DEVICE", "cpu", "TEST.BATCH_SIZE", "4",
              "CORRUPTION.TYPE", "['gaussian_noise', 'fog']"]
    code, out = _cli(["--cfg", "conf/cifar10_c/source.yaml", "--out", str(tmp_path / "cmp"), "--figure", "none",
                      "--no-paper", "--no-progress", "--methods", "source", "tent", "--orders", "3", *common], capsys)
    assert code == 0, out.err
    rows = {r["row"]: r for r in csv.DictReader((tmp_path / "cmp" / "comparison.csv").open())}
    assert list(rows) == ["source", "source (tail: worst 1 of 3)", "tent", "tent (tail: worst 1 of 3)"]
    for method in ("source", "tent"):
        payloads = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "cifar10_c" / method).glob(
            "*/results.json"))]
        assert sorted(report.run_config(p)["TEST"]["ORDER_SEED"] for p in payloads) == [1, 2, 3]
        assert {report.run_config(p)["RNG_SEED"] for p in payloads} == {1}
        assert rows[method]["orders"] == "1 2 3" and rows[method]["runs"] == "3"
        for k, domain in enumerate(["gaussian_noise", "fog"]):
            values = [100.0 * p["records"][k]["correct"] / p["records"][k]["n"] for p in payloads]
            assert float(rows[method][domain]) == pytest.approx(np.mean(values), abs=1e-4)
            assert float(rows[method][f"{domain} std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-4)
            assert float(rows[f"{method} (tail: worst 1 of 3)"][domain]) == pytest.approx(min(values), abs=1e-4)
    # the same table from the runs on disk
    code, again = _cli(["--results", str(tmp_path / "out"), "--no-paper"], capsys)
    assert code == 0 and "| tent (tail: worst 1 of 3) |" in again.out


@pytest.mark.parametrize("argv,message", [
    (["--methods", "source", "--orders", "0"], "--orders takes a count K >= 1"),
    (["--results", "x", "--orders", "3"], "--orders runs methods"),
    (["--methods", "source", "--orders", "2", "TEST.ORDER_SEED", "4"], "leave out the TEST.ORDER_SEED override")])
def test_compare_refuses_orders_it_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _cli(argv, capsys)
    assert stop.value.code == 2 and message in capsys.readouterr().err
