"""Per-class accuracy beside accuracy: the confusion counts of a method's predictions per (domain, severity), and
from them the balanced accuracy and the worst class.

The record keeps the confusion as its non-zero cells only, ``confusion``: [true class, predicted class, count]
triples sorted by (true, predicted), so that ImageNet's 1000 classes stay small and any per-class metric can be
recomputed from the record (its per-class totals are the sums over a true class's triples). From it:

- per-class recall of class c: the images of class c predicted c / the images of class c;
- ``balanced_accuracy``: the mean per-class recall over the classes PRESENT in the record (at least one image of
  theirs in the stream of that domain and severity; Brodersen et al., ICPR 2010). A class absent from a record
  has no recall and does not count: on a record with every class present it is the usual balanced accuracy;
- ``worst_class_accuracy``: the lowest per-class recall over the present classes, ``worst_class`` that class's index
  (the smallest index among ties) and ``worst_class_name`` its name.

Counts are integers summed over batches, so records of shards and resumed tasks recompute these exactly
(harness/report/runs.py ``merge``). Open-set streams count their ID images only (harness/run.py)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # checking and reporting import this module without torch
    import torch

# The per-class fields of a record and their summary keys (harness/results.py).
CLASS_FIELDS = {"balanced_accuracy": "mean_balanced_accuracy", "worst_class_accuracy": "mean_worst_class_accuracy"}


class ClassCounts:
    """Per-segment confusion counts over a task's batches: {(true, predicted): images}, one Counter per segment."""

    def __init__(self, segments: int, class_names: list[str] | None = None):
        self.cells = [Counter() for _ in range(segments)]
        self.class_names = list(class_names or [])

    def add(self, labels: torch.Tensor, predicted: torch.Tensor, segment: torch.Tensor) -> None:
        import torch
        triples = torch.stack([segment.long().cpu(), labels.long().cpu(), predicted.long().cpu()], dim=1)
        unique, counts = torch.unique(triples, dim=0, return_counts=True)
        for (k, true, guess), count in zip(unique.tolist(), counts.tolist()):
            self.cells[k][(true, guess)] += count

    def fields(self, k: int) -> dict:
        """The record fields of segment ``k``."""
        confusion = [[true, guess, count] for (true, guess), count in sorted(self.cells[k].items())]
        return class_fields(confusion, self.class_names)


def per_class_recall(confusion: list) -> dict[int, float]:
    """{class: recall} of every class with an image in ``confusion`` ([true, predicted, count] triples)."""
    images: Counter = Counter()
    hits: Counter = Counter()
    for true, guess, count in confusion:
        images[true] += count
        hits[true] += count if true == guess else 0
    return {c: hits[c] / images[c] for c in sorted(images) if images[c]}


def class_fields(confusion: list, class_names: list[str] | None = None) -> dict:
    """The record's per-class fields from its confusion triples; NaN and None for a record without images."""
    recall = per_class_recall(confusion)
    cells = [[int(t), int(p), int(c)] for t, p, c in sorted(confusion)]
    if not recall:
        return {"confusion": cells, "balanced_accuracy": float("nan"), "worst_class_accuracy": float("nan"),
                "worst_class": None, "worst_class_name": None}
    worst = min(recall, key=lambda c: (recall[c], c))
    names = class_names or []
    return {"confusion": cells, "balanced_accuracy": sum(recall.values()) / len(recall),
            "worst_class_accuracy": recall[worst], "worst_class": worst,
            "worst_class_name": names[worst] if 0 <= worst < len(names) else None}


def confusion_totals(confusion: list) -> tuple[int, int]:
    """(images, correct) that ``confusion`` counts: what the record's n and correct must be."""
    return sum(c for _, _, c in confusion), sum(c for t, p, c in confusion if t == p)
