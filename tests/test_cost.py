"""The cost of a method's calls in every record (harness/cost.py): counts against hand counts and an independent
hook, proportional attribution of a batch over its segments, the hooks' removal, the peak memory, the tables, the
results files, resuming and merging. Timings are never asserted: only their structure and consistency."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.optim.optimizer as optimizer_module

import harness.cost as cost
import harness.run
from harness import report
from harness.cost import CallCost, CostMeter, CostTotals, image_tower_entry
from harness.report.runs import WORSE_END
from harness.results import COST_FIELDS, summarise
from harness.run import evaluate
from models import load_clip
from tests.synthetic import tiny_cfg, write_cifar_c

DOMAINS = ["gaussian_noise", "fog"]
PER_DOMAIN, BATCH = 10, 4           # batches of 4, 4 and 2 images per domain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_c(root, DOMAINS, per_severity=PER_DOMAIN)
    return root


@pytest.fixture
def tower_images(monkeypatch):
    """Counts, independently of harness/cost.py, the images the built model's image tower encodes: a forward hook
    on the tower itself (``model.clip.visual``), installed on every model the harness builds."""
    seen = []
    build = harness.run.build_zero_shot_clip

    def counting_build(*args, **kwargs):
        model, info = build(*args, **kwargs)
        model.clip.visual.register_forward_hook(lambda module, args, output: seen.append(int(args[0].shape[0])))
        return model, info
    monkeypatch.setattr(harness.run, "build_zero_shot_clip", counting_build)
    return seen


def run(method: str, data: Path, out: Path, **overrides) -> dict:
    cfg = tiny_cfg(f"conf/cifar10_c/{method}.yaml", DATA_DIR=str(data), SAVE_DIR=str(out),
                   CORRUPTION__TYPE=DOMAINS, TEST__BATCH_SIZE=BATCH, **overrides)
    return evaluate(cfg, progress=False)


def check_structure(record: dict) -> None:
    """Every cost field is there; the times are non-negative and prediction is the rest of the method's time."""
    c = record["cost"]
    assert set(c) == {*COST_FIELDS, "peak_memory_kind", "images"}
    assert c["seconds_per_image"] >= c["adapt_seconds_per_image"] >= 0
    assert c["predict_seconds_per_image"] == pytest.approx(c["seconds_per_image"] - c["adapt_seconds_per_image"])
    assert c["peak_memory_mib"] > 0 and c["peak_memory_kind"] in cost.PEAK_MEMORY_KINDS


@pytest.mark.parametrize("steps", [1, 2])
def test_tent_counts_one_backward_per_batch_and_step(data, tmp_path, tower_images, steps):
    payload = run("tent", data, tmp_path, OPTIM__STEPS=steps)
    batches = math.ceil(PER_DOMAIN / BATCH)
    for record in payload["records"]:
        check_structure(record)
        c = record["cost"]
        assert c["images"] == record["n"] == PER_DOMAIN
        assert c["backward_passes_per_image"] == pytest.approx(batches * steps / PER_DOMAIN)
        assert c["forward_images_per_image"] == pytest.approx(steps)    # tent: one forward of the batch per step
        assert c["adapt_seconds_per_image"] > 0
    counted = sum(r["cost"]["forward_images_per_image"] * r["cost"]["images"] for r in payload["records"])
    assert counted == pytest.approx(sum(tower_images))
    assert payload["summary"]["cost"] == pytest.approx(
        {f: np.mean([r["cost"][f] for r in payload["records"]]) for f in COST_FIELDS})


def test_view_method_counts_its_views_and_source_no_gradient_work(data, tmp_path, tower_images):
    zero = run("zero", data, tmp_path / "zero", CORRUPTION__NUM_EX=4)
    for record in zero["records"]:
        check_structure(record)
        assert record["cost"]["forward_images_per_image"] == pytest.approx(64)     # the image and its 63 views
        assert record["cost"]["backward_passes_per_image"] == 0
    assert sum(r["cost"]["forward_images_per_image"] * r["n"] for r in zero["records"]) == sum(tower_images)
    tower_images.clear()
    source = run("source", data, tmp_path / "source")
    for record in source["records"]:
        check_structure(record)
        assert record["cost"]["backward_passes_per_image"] == 0 and record["cost"]["adapt_seconds_per_image"] == 0
        assert record["cost"]["forward_images_per_image"] == 1
    assert sum(tower_images) == len(DOMAINS) * PER_DOMAIN


def test_a_batch_is_split_over_its_segments_by_images():
    totals = CostTotals(2)
    totals.add(torch.tensor([0, 0, 0, 1]), CallCost(seconds=4.0, adapt_seconds=2.0, forward_images=8,
                                                    backward_passes=1))
    totals.add(torch.tensor([1, 1]), CallCost(seconds=2.0, adapt_seconds=0.0, forward_images=2, backward_passes=0))
    first, second = totals.fields(0, 5.0, "cpu_peak_rss"), totals.fields(1, 5.0, "cpu_peak_rss")
    # segment 0: 3/4 of the first batch over its 3 images; segment 1: 1/4 of it and all of the second, 3 images
    assert (first["images"], second["images"]) == (3, 3)
    assert first["seconds_per_image"] == pytest.approx(3.0 / 3)
    assert first["adapt_seconds_per_image"] == pytest.approx(1.5 / 3)
    assert first["predict_seconds_per_image"] == pytest.approx(1.5 / 3)
    assert first["forward_images_per_image"] == pytest.approx(6 / 3)
    assert first["backward_passes_per_image"] == pytest.approx(0.75 / 3)
    assert second["seconds_per_image"] == pytest.approx((1.0 + 2.0) / 3)
    assert second["adapt_seconds_per_image"] == pytest.approx(0.5 / 3)
    assert second["forward_images_per_image"] == pytest.approx((2 + 2) / 3)
    assert second["backward_passes_per_image"] == pytest.approx(0.25 / 3)
    assert first["peak_memory_mib"] == second["peak_memory_mib"] == 5.0
    assert math.isnan(CostTotals(1).fields(0, 5.0, "cpu_peak_rss")["seconds_per_image"])    # nothing streamed


def test_mixed_stream_splits_its_batches_over_domains(data, tmp_path):
    payload = run("tent", data, tmp_path, SETTING="mixed_domains")
    # one task: 20 images of both domains shuffled into batches of 4, one backward pass per batch
    assert [r["cost"]["images"] for r in payload["records"]] == [PER_DOMAIN] * len(DOMAINS)
    backward = sum(r["cost"]["backward_passes_per_image"] * r["cost"]["images"] for r in payload["records"])
    assert backward == pytest.approx(len(DOMAINS) * PER_DOMAIN / BATCH)
    assert len({r["cost"]["peak_memory_mib"] for r in payload["records"]}) == 1      # the task's peak, in each


@pytest.mark.parametrize("arch", ["tiny-clip-test", "tiny-clip-test-rn"])
def test_the_meter_counts_backward_and_steps_then_restores_everything(arch):
    model = load_clip(arch, "none").model.eval()
    optimizer = torch.optim.SGD(model.visual.parameters(), lr=0.0)
    images = torch.rand(3, 3, 32, 32)
    original = torch.autograd.backward
    entry = image_tower_entry(torch.nn.ModuleDict({"clip": model}))
    assert entry is model.visual.conv1           # the first layer of either tower (patch embedding, stem)
    with CostMeter(torch.device("cpu"), entry) as meter:
        assert torch.autograd.backward is not original
        with meter.call() as call:
            for _ in range(2):
                optimizer.zero_grad()
                model.encode_image(images).sum().backward()
                optimizer.step()
            with torch.no_grad():
                model.encode_image(images[:1])
    assert (call.backward_passes, call.forward_images) == (2, 3 + 3 + 1)
    assert call.seconds >= call.adapt_seconds > 0
    assert torch.autograd.backward is original
    assert not optimizer_module._global_optimizer_pre_hooks
    assert not optimizer_module._global_optimizer_post_hooks
    assert not entry._forward_pre_hooks
    with pytest.raises(RuntimeError, match="inside"):
        with CostMeter(torch.device("cpu"), entry):
            raise RuntimeError("inside the context")
    assert torch.autograd.backward is original and not entry._forward_pre_hooks
    assert not optimizer_module._global_optimizer_pre_hooks


def test_cpu_peak_memory_sees_an_allocation_inside_the_context():
    module = torch.nn.Identity()
    with CostMeter(torch.device("cpu"), module) as quiet:
        pass
    with CostMeter(torch.device("cpu"), module) as busy:
        block = torch.ones(200 * 2 ** 18)      # 200 MiB of float32, every page written
        del block
    assert quiet.peak_mib > 0 and quiet.peak_kind == busy.peak_kind
    if busy.peak_kind != "cpu_peak_rss":
        pytest.skip(f"this kernel refuses the reset of the resident-set peak ({busy.peak_kind})")
    assert busy.peak_mib >= quiet.peak_mib + 150        # the context's own peak: the allocation on top of the rest


def test_without_the_reset_the_process_peak_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(cost, "_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    with CostMeter(torch.device("cpu"), torch.nn.Identity()) as meter:
        pass
    import resource
    assert meter.peak_kind == "cpu_process_peak_rss"
    assert meter.peak_mib == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05)


def test_cost_tables_csv_resume_and_merge(data, tmp_path):
    shard = run("tent", data, tmp_path / "run", RUN_DOMAINS=["fog"])
    full = run("tent", data, tmp_path / "run")                     # resumes: fog is read back
    assert full["provenance"]["resumed_tasks"] == [1]
    assert full["records"][1]["cost"] == shard["records"][0]["cost"]
    other = run("tent", data, tmp_path / "other", RUN_DOMAINS=["gaussian_noise"])
    merged = report.merge([shard, other])
    assert [r["cost"] for r in merged["records"]] == [other["records"][0]["cost"], shard["records"][0]["cost"]]
    assert merged["summary"]["cost"] == summarise(merged["records"])["cost"]

    for metric, field, scale in [("seconds_per_image", "seconds_per_image", 1000.0),
                                 ("adapt_seconds_per_image", "adapt_seconds_per_image", 1000.0),
                                 ("predict_seconds_per_image", "predict_seconds_per_image", 1000.0),
                                 ("peak_memory", "peak_memory_mib", 1.0)]:
        assert WORSE_END[metric] == "high"
        table = report.build_table([("tent", [full])], metric=metric)
        (row,) = table.rows                     # the paper reports accuracy only: no paper rows
        expected = [scale * r["cost"][field] for r in full["records"]]
        assert [table.value(row, c) for c in table.columns] == pytest.approx(expected)
        assert table.value(row, "mean") == pytest.approx(sum(expected) / len(expected))
    older = {**full, "records": [{k: v for k, v in r.items() if k != "cost"} for r in full["records"]]}
    table = report.build_table([("tent", [older])], metric="peak_memory")      # results from before the cost
    assert all(table.value(table.rows[0], c) is None for c in table.columns)

    with open(Path(full["provenance"]["save_dir"]) / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-len(COST_FIELDS) - 1:] == [*COST_FIELDS, "peak_memory_kind"]
    for row, record in zip(rows, full["records"]):
        for field in COST_FIELDS:
            assert float(row[field]) == pytest.approx(record["cost"][field])
    for field in COST_FIELDS:
        assert float(rows[-1][field]) == pytest.approx(np.mean([r["cost"][field] for r in full["records"]]))
