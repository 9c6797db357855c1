"""Batch size, classes per batch (StatA's effective classes, TEST.CLASSES_PER_BATCH) and stream orders as grid axes:
the stream of K classes per batch, its refusals, the grid's expansion over the axes, its table rows and the figure
of accuracy against an axis."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conf import ConfigError
from harness import grid as grids
from harness.build import check_method
from harness.grid.tables import grid_axis_points, grid_tables
from harness.identity import config_hash, identity_keys
from harness.report.axis_figure import AxisPoint, axis_points, draw_axis_figure
from harness.stream import classes_per_batch_order, stream_order, task_stream_order
from tests.grid_support import DOMAINS, write_shapes
from tests.synthetic import LabelledPart, tiny_cfg
from tests.test_compare import fake_payload
from tests.test_grid import grid_main


# ------------------------------------------------------------------------------------------------ the stream

def check_batches(order: np.ndarray, labels: np.ndarray, k: int, batch: int) -> int:
    """The protocol replayed by a plain loop over the batches of ``order``: every image once, batches of ``batch``
    (the last one what is left), each with at least min(k, classes left) classes, and exactly that many where any
    k of the classes left hold a full batch between them (no class has run out). Returns how many batches held
    exactly k classes."""
    assert sorted(order.tolist()) == list(range(len(labels)))
    left = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    exact = 0
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        assert len(chunk) == min(batch, len(order) - start)
        present = {int(labels[i]) for i in chunk}
        alive = sorted(n for n in left.values() if n > 0)
        wanted = min(k, len(alive))
        assert len(present) >= wanted
        if sum(alive[:wanted]) >= len(chunk):        # even the k smallest classes fill the batch
            assert len(present) == wanted
        exact += len(present) == k
        for i in chunk:
            left[int(labels[i])] -= 1
    return exact


def test_whole_classes_make_whole_batches():
    # 10 classes of 4 images, batches of 8 from 2 classes: each batch is exactly two whole classes
    labels = np.repeat(np.arange(10), 4)
    order = classes_per_batch_order(labels, 2, 8, np.random.default_rng(0))
    batches = [labels[order[i:i + 8]] for i in range(0, 40, 8)]
    assert all(sorted(np.bincount(b, minlength=10).tolist()) == [0] * 8 + [4, 4] for b in batches)
    assert check_batches(order, labels, 2, 8) == 5
    # one class per batch of its size: the batches are the classes
    order = classes_per_batch_order(np.repeat(np.arange(5), 8), 1, 8, np.random.default_rng(1))
    assert [len(set(np.repeat(np.arange(5), 8)[order[i:i + 8]])) for i in range(0, 40, 8)] == [1] * 5


@pytest.mark.parametrize("k,batch", [(1, 1), (1, 16), (3, 16), (5, 64), (10, 10)])
def test_unbalanced_classes_follow_the_protocol(k, batch):
    rng = np.random.default_rng(7)
    labels = rng.choice(12, size=600, p=np.linspace(1, 3, 12) / np.linspace(1, 3, 12).sum())
    order = classes_per_batch_order(labels, k, batch, np.random.default_rng(3))
    assert check_batches(order, labels, k, batch) >= 1
    again = classes_per_batch_order(labels, k, batch, np.random.default_rng(3))
    assert np.array_equal(order, again)
    if batch > 1:
        assert not np.array_equal(order, classes_per_batch_order(labels, k, batch, np.random.default_rng(4)))


PARTS = [LabelledPart(np.arange(48) % 6), LabelledPart(np.arange(36) % 6)]


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_the_key_orders_the_task_by_the_order_seed(order):
    task = SimpleNamespace(order=order, correlation="none", dirichlet_delta=0.0)
    labels = np.concatenate([p.labels for p in PARTS])

    def cfg(**extra):
        return tiny_cfg("conf/cifar10_c/source.yaml", RNG_SEED=5, TEST__STREAM_ORDER="suite", TEST__BATCH_SIZE=6,
                        **extra)
    today = task_stream_order(cfg(), task, 1, PARTS)
    assert np.array_equal(today, stream_order([48, 36], order, 5, 1))          # 0: today's order
    first = task_stream_order(cfg(TEST__CLASSES_PER_BATCH=2, TEST__ORDER_SEED=1), task, 1, PARTS)
    assert np.array_equal(first, task_stream_order(cfg(TEST__CLASSES_PER_BATCH=2, TEST__ORDER_SEED=1), task, 1, PARTS))
    second = task_stream_order(cfg(TEST__CLASSES_PER_BATCH=2, TEST__ORDER_SEED=2), task, 1, PARTS)
    assert not np.array_equal(first, second)
    for found in (first, second):
        if order == "sequential":         # per segment, each a multiple of the batch: its batches stay in it
            assert sorted(found[:48]) == list(range(48))
            check_batches(found[:48], labels[:48], 2, 6)
            check_batches(found[48:] - 48, labels[48:], 2, 6)
        else:
            check_batches(found, labels, 2, 6)


def test_zero_stays_out_of_the_identity_and_another_value_enters_it():
    cfg = tiny_cfg("conf/cifar10_c/tent.yaml")
    assert cfg.TEST.CLASSES_PER_BATCH == 0 and "TEST.CLASSES_PER_BATCH" not in identity_keys(cfg)
    before = cfg.clone()              # the config as it was before the key existed
    before.defrost()
    del before.TEST["CLASSES_PER_BATCH"]
    assert config_hash(before) == config_hash(cfg)
    set_ = tiny_cfg("conf/cifar10_c/tent.yaml", TEST__STREAM_ORDER="suite", TEST__CLASSES_PER_BATCH=3)
    assert config_hash(set_) != config_hash(cfg) and identity_keys(set_)["TEST.CLASSES_PER_BATCH"] == 3


@pytest.mark.parametrize("extra,message", [
    ({}, "TEST.CLASSES_PER_BATCH 2: the authors' suite has no stream order with a set number of classes per batch; "
         "set TEST.STREAM_ORDER suite"),
    ({"TEST__STREAM_ORDER": "suite", "SETTING": "reset_each_shift_correlated"},
     "TEST.CLASSES_PER_BATCH 2 with SETTING reset_each_shift_correlated: a correlated setting orders the classes "
     "itself"),
    ({"TEST__STREAM_ORDER": "suite", "OPEN_SET__OOD_DATASET": "svhn"},
     "TEST.CLASSES_PER_BATCH 2 with OPEN_SET.OOD_DATASET svhn"),
    ({"TEST__STREAM_ORDER": "suite", "TEST__BATCH_SIZE": 1},
     "TEST.CLASSES_PER_BATCH 2 with TEST.BATCH_SIZE 1: a batch holds at least one image of each of its classes"),
])
def test_refusals_name_the_key(extra, message):
    with pytest.raises(ConfigError) as err:
        tiny_cfg("conf/cifar10_c/tent.yaml", TEST__CLASSES_PER_BATCH=2, **extra)
    assert message in err.value.one_line() and "\n" not in err.value.one_line()


def test_more_classes_than_the_data_set_and_episodic_per_image_methods_are_refused():
    with pytest.raises(ConfigError, match="TEST.CLASSES_PER_BATCH 11: cifar10_c has 10 classes; expected at most"):
        tiny_cfg("conf/cifar10_c/tent.yaml", TEST__STREAM_ORDER="suite", TEST__CLASSES_PER_BATCH=11)
    memo = tiny_cfg("conf/cifar10_c/memo.yaml", TEST__STREAM_ORDER="suite", TEST__CLASSES_PER_BATCH=2,
                    TEST__BATCH_SIZE=4)
    assert memo.MODEL.EPISODIC
    with pytest.raises(ConfigError, match="each image is its own episode"):
        check_method(memo)


# ------------------------------------------------------------------------------------------------ the grid

GRID = """name: {name}
datasets: [shapes_c]
methods: [source, tent]
seeds: [1]
settings: [reset_each_shift]
batch_sizes: [4, 8]
orders: [1, 2]
split: cell
overrides:
  CORRUPTION.TYPE: {domains}
  CORRUPTION.NUM_EX: 16
  TEST.NUM_WORKERS: 0
  DEVICE: cpu
{extra}"""


def axis_grid(folder: Path, extra: str = "", name: str = "axes") -> Path:
    path = Path(folder) / f"{name}.yaml"
    path.write_text(GRID.format(name=name, domains=DOMAINS, extra=extra))
    return path


def test_the_axes_expand_into_cells_and_jobs_and_match_where_and_exclude(tmp_path):
    grid = grids.load_grid(axis_grid(tmp_path), ["SAVE_DIR", str(tmp_path / "out")])
    found = [(c.config_name, c.batch_size, int(c.cfg.TEST.ORDER_SEED)) for c in grid.cells]
    assert found == [(m, b, o) for m in ("source", "tent") for b in (4, 8) for o in (1, 2)]
    assert len(grid.jobs) == 8 and len({j.config_hash for j in grid.jobs}) == 8
    assert grid.jobs[3].id.startswith("shapes_c.source.reset_each_shift.seed1.batch8.order2.")
    extra = ("exclude: [{method: tent, batch_size: 4}]\n"
             "cells:\n  - where: {batch_size: 8, order: 2}\n    overrides: {OPTIM.LR: 0.5}\n")
    grid = grids.load_grid(axis_grid(tmp_path, extra, "axes2"), ["SAVE_DIR", str(tmp_path / "out")])
    assert [(c.config_name, c.batch_size) for c in grid.cells].count(("tent", 4)) == 0 and len(grid.cells) == 6
    assert [c.cfg.OPTIM.LR == 0.5 for c in grid.cells] == [int(c.cfg.TEST.ORDER_SEED) == 2 and c.batch_size == 8
                                                           for c in grid.cells]
    path = axis_grid(tmp_path, "", "axes3")
    path.write_text(path.read_text().replace("orders: [1, 2]", "orders: [1]\nclasses_per_batch: [0, 3]")
                    + "  TEST.STREAM_ORDER: suite\n")
    grid = grids.load_grid(path, ["SAVE_DIR", str(tmp_path / "out")])
    assert [(c.batch_size, c.classes_per_batch) for c in grid.cells[:4]] == [(4, 0), (4, 3), (8, 0), (8, 3)]


@pytest.mark.parametrize("where,text,message", [
    ("file", "  TEST.BATCH_SIZE: 8\n", "TEST.BATCH_SIZE is an axis of the grid; list its values under 'batch_sizes'"),
    ("file", "  TEST.ORDER_SEED: 3\n", "TEST.ORDER_SEED is an axis of the grid; list its values under 'orders'"),
    ("cli", ["TEST.BATCH_SIZE", "8"], "the command line: TEST.BATCH_SIZE is an axis of the grid"),
    ("file", "cells:\n  - where: {method: tent}\n    overrides: {TEST.ORDER_SEED: 4}\n",
     "cells[0]: TEST.ORDER_SEED is an axis of the grid"),
    ("file", "batch_sizes: [4, 4]\n", "'batch_sizes' lists a value twice"),
    ("file", "classes_per_batch: [-1]\n", "'classes_per_batch' must be a non-empty list of integers >= 0"),
    ("file", "classes_per_batch: [11]\n  TEST.STREAM_ORDER: suite\n",
     "cell (source, shapes_c, seed 1, batch4, k11, order1): TEST.CLASSES_PER_BATCH 11"),
])
def test_the_axes_keys_are_refused_where_the_grid_lists_them(tmp_path, where, text, message):
    if where == "cli":
        path, cli = axis_grid(tmp_path), text
    else:
        base = axis_grid(tmp_path).read_text()
        if text.startswith("batch_sizes"):
            base = base.replace("batch_sizes: [4, 8]\n", text)
        elif text.startswith("classes_per_batch"):
            first, rest = text.split("\n", 1)
            base = base.replace("split: cell\n", f"split: cell\n{first}\n") + rest
        else:
            base += text
        path = tmp_path / "edited.yaml"
        path.write_text(base)
        cli = []
    with pytest.raises(grids.GridError) as err:
        grids.load_grid(path, cli + ["SAVE_DIR", str(tmp_path / "out")])
    assert message in err.value.one_line()


def test_an_unlisted_axis_key_may_still_be_overridden(tmp_path):
    path = axis_grid(tmp_path)
    path.write_text(path.read_text().replace("batch_sizes: [4, 8]\n", "") + "  TEST.BATCH_SIZE: 8\n")
    grid = grids.load_grid(path, ["SAVE_DIR", str(tmp_path / "out")])
    assert {c.batch_size for c in grid.cells} == {8} and len(grid.cells) == 4


# ------------------------------------------------------------------------------------------------ tables, figure

def run_means(payloads) -> list[float]:
    return [sum(100.0 * r["correct"] / r["n"] for r in p["records"]) / len(p["records"]) for p in payloads]


def mean_std(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, std


def test_points_are_the_runs_means_pooled_by_hand():
    rng = np.random.default_rng(11)
    runs = []
    for method in ("source", "tent"):
        for batch in (16, 1, 64):
            for order in (1, 2, 3):
                payload = fake_payload({d: (int(rng.integers(0, 41)), 40) for d in DOMAINS},
                                       TEST__BATCH_SIZE=batch, TEST__ORDER_SEED=order, OPTIM__LR=0.1 if
                                       method == "tent" else 0.001)
                runs.append((method, batch, payload))
    lines = axis_points(runs)
    assert list(lines) == ["source", "tent"]
    for method, points in lines.items():
        assert [p.value for p in points] == [1, 16, 64]
        for point in points:
            mean, std = mean_std(run_means([p for m, b, p in runs if m == method and b == point.value]))
            assert point.runs == 3 and point.mean == pytest.approx(mean) and point.std == pytest.approx(std)
    error = axis_points(runs, "error")["tent"][0]
    assert error.mean == pytest.approx(100.0 - lines["tent"][0].mean)
    one = axis_points(runs[:1])["source"]
    assert one == [AxisPoint(16, pytest.approx(run_means([runs[0][2]])[0]), None, 1)]


def test_the_figure_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    lines = {"tent": [AxisPoint(1, 40.0, 2.0, 3), AxisPoint(16, 55.0, None, 1), AxisPoint(64, None, None, 1)],
             "source": [AxisPoint(1, 45.0, 0.0, 3), AxisPoint(16, 45.0, 0.0, 3)]}
    path = draw_axis_figure(lines, "batch_sizes", tmp_path / "fig.png", "t")
    assert path == tmp_path / "fig.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(Exception, match="a figure's axis is one of"):
        draw_axis_figure(lines, "seeds", tmp_path / "x.png")


def test_a_run_grid_tables_a_row_per_batch_size_and_plots_it(tmp_path, capsys):
    data = write_shapes(tmp_path / "data")
    opts = ["DATA_DIR", data, "SAVE_DIR", tmp_path / "out"]
    path = axis_grid(tmp_path)
    assert grid_main("run", path, "--launcher", "debug", *opts) == 0
    out = capsys.readouterr().out
    assert "| tent (batch 4) (n=2) |" in out and "| source (batch 8) (n=2) |" in out
    grid = grids.load_grid(path, [str(o) for o in opts])
    payloads = {}
    for cell in grid.cells:
        stored = json.loads((Path(cell.jobs[0].run_dir) / "results.json").read_text())
        payloads.setdefault((cell.config_name, cell.batch_size), []).append(stored)
    table, = grid_tables(grid, with_paper=False)
    rows = {r.label: r for r in table.rows if r.kind == "measured"}
    assert sorted(rows) == ["source (batch 4)", "source (batch 8)", "tent (batch 4)", "tent (batch 8)"]
    figure = grid_axis_points(grid, "batch_sizes")["shapes_c"]
    for (method, batch), runs in payloads.items():
        mean, std = mean_std(run_means(runs))
        row = rows[f"{method} (batch {batch})"]
        assert row.runs == 2 and table.value(row, "mean") == pytest.approx(mean)
        for k, column in enumerate(table.columns):
            assert table.value(row, column) == pytest.approx(
                sum(100.0 * p["records"][k]["correct"] / p["records"][k]["n"] for p in runs) / 2)
        point, = [p for p in figure[method] if p.value == batch]
        assert (point.mean, point.runs) == (pytest.approx(mean), 2) and point.std == pytest.approx(std)
    assert grid_main("report", path, "--no-paper", *opts) == 0
    out = capsys.readouterr().out
    png = grid.folder / "tables" / "shapes_c_batch_sizes.png"
    try:
        import matplotlib  # noqa: F401
        assert f"wrote {png}" in out and png.read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        assert "matplotlib is not installed" in out
