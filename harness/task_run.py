"""One task's stream through a method, counted: the loader of its segments (and their OOD companions), every batch's
images given to the method (never labels or OOD flags), and per segment the record of correct predictions,
calibration, class counts, open-set scores and cost. harness/run.py runs the setting's tasks with it;
harness/forgetting.py counts the clean set with it."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from conf.errors import UserError
from harness import open_set
from harness.calibration import CalibrationCounts
from harness.class_counts import ClassCounts
from harness.cost import CostMeter, CostTotals, image_tower_entry
from harness.progress import Progress
from harness.results import make_record
from harness.stream import SegmentStream, make_loader, task_stream_order

if TYPE_CHECKING:
    from harness.build import RunPlan

logger = logging.getLogger("tta")


def images_until_reset(plan: RunPlan, run_now: list[int], index: int) -> int:
    """The images the method is given from task ``index`` on, up to the next task that resets it."""
    total = 0
    for later in run_now[run_now.index(index):]:
        if later != index and plan.tasks[later].reset:
            break
        total += sum(len(plan.data[s]) for s in plan.tasks[later].segments)
    return total


class TaskCounts:
    """What a task's batches add up to, per segment: correct predictions and images (of the ID images in an
    open-set run), calibration, class counts, OOD scores, and the cost of every streamed image's method call."""

    def __init__(self, num_segments: int, class_names, open_set_run: bool):
        self.correct = torch.zeros(num_segments, dtype=torch.long)
        self.counts = torch.zeros(num_segments, dtype=torch.long)
        self.calibration = CalibrationCounts(num_segments)
        self.classes = ClassCounts(num_segments, class_names)
        self.costs = CostTotals(num_segments)
        self.scores = open_set.OodScores(num_segments) if open_set_run else None
        self.streamed_ood = 0

    def add(self, logits, labels, segment, is_ood, call, cfg, method) -> int:
        """One batch's logits; returns its ID images."""
        self.costs.add(segment, call)        # every streamed image, OOD ones too
        predicted = logits.argmax(1).cpu()
        hits = (predicted == labels).long()
        if self.scores is not None:      # accuracy, calibration and class counts: the ID images only
            self.scores.add(open_set.declared_scores(logits, cfg, method), is_ood[0], hits, segment)
            known = ~is_ood[0]
            self.streamed_ood += int(is_ood[0].sum())
            logits, labels, segment, hits, predicted = logits[known.to(logits.device)], labels[known], \
                segment[known], hits[known], predicted[known]
        self.correct.index_add_(0, segment, hits)
        self.counts.index_add_(0, segment, torch.ones_like(hits))
        self.calibration.add(logits, labels, segment)
        self.classes.add(labels, predicted, segment)
        return len(labels)

    def record(self, k: int, seg, ood_companion, meter: CostMeter) -> dict:
        fields = {**self.calibration.fields(k), **self.classes.fields(k)}
        if self.scores is not None:
            fields.update({**self.scores.fields(k), "ood_domain": ood_companion.domain,
                           "ood_severity": ood_companion.severity})
        fields["cost"] = self.costs.fields(k, meter.peak_mib, meter.peak_kind)
        return make_record(seg.domain, seg.severity, int(self.counts[k]), int(self.correct[k]), fields)


def run_task(plan: RunPlan, method, transform, index: int,
             bar: Progress | None = None) -> tuple[list[dict], float, int]:
    """Task ``index`` of ``plan`` streamed through ``method`` (its images transformed by ``transform``), counted on
    ``bar``; returns (records per segment, seconds, images streamed)."""
    cfg, task = plan.cfg, plan.tasks[index]
    parts = [plan.data[s] for s in task.segments]
    order = task_stream_order(cfg, task, index, parts)
    if not plan.ood:
        loader = make_loader(SegmentStream(parts, order, transform), cfg, plan.device)
    else:       # batches of (images, labels, segments, is_ood): the method gets the images only
        loader = open_set.open_set_loader(cfg, task, index, parts, [plan.ood[s] for s in task.segments], order,
                                          transform, plan.device)
    totals = TaskCounts(len(parts), plan.class_names, bool(plan.ood))
    bar = bar or Progress(0, "", enabled=False)
    bar.set_postfix_str(", ".join(f"{s.domain}@{s.severity}" for s in task.segments[:3])
                        + (" ..." if len(task.segments) > 3 else ""))
    start = time.perf_counter()
    meter = CostMeter(plan.device, image_tower_entry(method.model))
    try:
        with meter:
            for images, labels, segment, *is_ood in loader:
                with meter.call() as call:
                    logits = method(images.to(plan.device, non_blocking=True))
                bar.update(totals.add(logits, labels, segment, is_ood, call, cfg, method))
    except UserError as err:
        raise _without_worker_traceback(err) from None
    seconds = time.perf_counter() - start
    streamed = int(totals.counts.sum())
    planned = sum(len(p) for p in parts)
    if streamed != planned:         # a stream that samples fewer images than its segments hold
        bar.set_total(bar.total - planned + streamed)
    records = [totals.record(k, seg, plan.ood.get(seg), meter) for k, seg in enumerate(task.segments)]
    for record in records:
        logger.info("%s severity %d: accuracy %.2f%% (error %.2f%%, n=%d)%s", record["domain"], record["severity"],
                    100 * record["accuracy"], 100 * record["error"], record["n"],
                    "" if "n_ood" not in record else f"; AUROC {100 * record['auroc']:.2f}%, FPR95 "
                    f"{100 * record['fpr95']:.2f}%, OSCR {100 * record['oscr']:.2f}% (n_ood={record['n_ood']})")
    return records, seconds, streamed + totals.streamed_ood


def _without_worker_traceback(err: UserError) -> UserError:
    """A UserError raised in a DataLoader worker comes back with the worker's traceback in its message; keep the
    original message (the traceback's last line) so that it stays one line."""
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return err
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return type(err)(last[len(name):] if last.startswith(name) else last)
