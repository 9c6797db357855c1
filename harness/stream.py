"""The stream of test data for one task: segments concatenated (or mixed), in a fixed pseudo-random order
from RNG_SEED (or TEST.ORDER_SEED) that is the same for every method, batched by a DataLoader whose workers apply
the per-image transform (nothing up-sampled is held in memory)."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class SegmentStream(Dataset):
    """(transformed image, label, segment index) for every sample of the task's segments, in ``order``."""

    def __init__(self, parts: list[Dataset], order: np.ndarray, transform):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.order = order
        self.transform = transform

    def __len__(self) -> int:
        return len(self.order)

    def locate(self, i: int) -> tuple[int, int]:
        flat = int(self.order[i])
        segment = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return segment, flat - int(self.offsets[segment])

    def __getitem__(self, i: int):
        segment, j = self.locate(i)
        image, label = self.parts[segment][j]
        return self.transform(image), label, segment


def order_seed(cfg) -> int:
    """The seed of the stream's order: TEST.ORDER_SEED, or RNG_SEED where it is -1 (the default, today's streams).
    Only the order reads it; which images a NUM_EX subset holds and the method's randomness stay on RNG_SEED."""
    chosen = int(cfg.TEST.get("ORDER_SEED", -1))
    return int(cfg.RNG_SEED) if chosen == -1 else chosen


def task_stream_order(cfg, task, index: int, parts: list[Dataset]) -> np.ndarray:
    """The order of a task's samples (positions in its concatenated segments) by TEST.STREAM_ORDER: "authors",
    their loaders' order (authors_stream_order); "suite", this suite's own permutation (stream_order); both
    seeded by ``order_seed``. The authors' NUM_EX subset is drawn with RNG_SEED and keeps its draw's order where
    the order seed is RNG_SEED; another order seed shuffles that subset as their loader shuffles a list.
    TEST.CLASSES_PER_BATCH > 0 (suite order only, checked before): batches of that many classes each
    (classes_per_batch_order)."""
    classes_per_batch = int(cfg.TEST.get("CLASSES_PER_BATCH", 0))
    needs_labels = task.correlation != "none" or classes_per_batch > 0
    labels = np.concatenate([segment_labels(p) for p in parts]) if needs_labels else None
    sizes = [len(p) for p in parts]
    seed = order_seed(cfg)
    if cfg.TEST.STREAM_ORDER == "authors":
        subset_drawn = cfg.CORRUPTION.NUM_EX >= 0 and cfg.CORRUPTION.SUBSET == "authors"
        return authors_stream_order(sizes, task.order, seed, labels, task.correlation, task.dirichlet_delta,
                                    presampled=subset_drawn and seed == int(cfg.RNG_SEED),
                                    file_order=[bool(getattr(p, "authors_file_order", False)) for p in parts])
    return stream_order(sizes, task.order, seed, index, labels=labels, correlation=task.correlation,
                        dirichlet_delta=task.dirichlet_delta, batch_size=int(cfg.TEST.BATCH_SIZE),
                        classes_per_batch=classes_per_batch)


def stream_order(sizes: list[int], order: str, seed: int, task_index: int = 0, labels: np.ndarray | None = None,
                 correlation: str = "none", dirichlet_delta: float = 0.0, batch_size: int = 1,
                 classes_per_batch: int = 0) -> np.ndarray:
    """Sequential: each segment shuffled on its own, segments one after another. Shuffled: all samples of all
    segments in one permutation. Seeded by RNG_SEED only (and, for "shuffled", the task index), so every method
    sees the identical stream.

    correlation "label" / "dirichlet" then reorders the shuffled samples by their class ``labels`` (one label per
    sample of the concatenated segments): per segment for "sequential", over the whole task for "shuffled", as the
    anchor suite sorts each loader's (possibly mixed) sample list. ``classes_per_batch`` > 0 (with no correlation)
    regroups them alike into batches of ``batch_size`` from that many classes each (classes_per_batch_order)."""
    rng_seed = [int(seed) & 0xFFFFFFFF, 0x5EED]
    offsets = np.cumsum([0] + list(sizes))
    if order == "sequential":
        pieces = [offsets[k] + np.random.default_rng(rng_seed).permutation(n) for k, n in enumerate(sizes)]
        if correlation != "none":
            pieces = [correlate(piece, labels, correlation, dirichlet_delta, rng_seed + [k], batch_size)
                      for k, piece in enumerate(pieces)]
        elif classes_per_batch > 0:
            pieces = [piece[classes_per_batch_order(labels[piece], classes_per_batch, batch_size,
                                                    np.random.default_rng(rng_seed + [k, 2]))]
                      for k, piece in enumerate(pieces)]
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)
    if order == "shuffled":
        flat = np.random.default_rng(rng_seed + [task_index]).permutation(int(offsets[-1]))
        if correlation != "none":
            flat = correlate(flat, labels, correlation, dirichlet_delta, rng_seed + [task_index, 1],
                             batch_size)
        elif classes_per_batch > 0:
            flat = flat[classes_per_batch_order(labels[flat], classes_per_batch, batch_size,
                                                np.random.default_rng(rng_seed + [task_index, 2]))]
        return flat
    if order == "as_is":
        return np.arange(int(offsets[-1]))
    raise ValueError(f"unknown stream order '{order}'")


def authors_stream_order(sizes: list[int], order: str, seed: int, labels: np.ndarray | None = None,
                         correlation: str = "none", dirichlet_delta: float = 0.0, presampled: bool = False,
                         file_order: list[bool] | None = None) -> np.ndarray:
    """The order in which the authors' suite (and the anchor suite it forks) feeds a task's samples, for the same
    RNG_SEED: their ``get_test_loader`` builds one loader per segment ("sequential") or one for all segments mixed
    ("shuffled"), and each starts with ``random.seed(seed); np.random.seed(seed)``, then ``random.shuffle`` of the
    sample list (in the order their data set code lists it: our segments' order), ``random.sample`` of NUM_EX
    (``presampled``: the data set has drawn it already, datasets.base.select_subset, in the sample's order; with
    CORRUPTION.SUBSET first_n the first NUM_EX are the list their shuffle starts from), then
    for a correlated setting a stable sort by label or their ``sort_by_dirichlet`` on NumPy's global generator.
    A segment with ``file_order`` (a set their loader reads without a sample list: clean CIFAR through
    torchvision) is neither shuffled nor sorted there, and so not here."""
    offsets = np.cumsum([0] + list(sizes))
    if order == "sequential":
        groups = [np.arange(offsets[k], offsets[k + 1]) for k in range(len(sizes))]
        fixed = list(file_order or [False] * len(sizes))
    elif order == "shuffled":
        groups = [np.arange(int(offsets[-1]))]
        fixed = [all(file_order or [False])]
    else:
        raise ValueError(f"unknown stream order '{order}'")
    pieces = []
    for group, keep in zip(groups, fixed):
        if not keep:
            if not presampled:
                as_list = group.tolist()
                random.Random(seed).shuffle(as_list)      # random.seed(seed); random.shuffle(samples)
                group = np.asarray(as_list, dtype=np.int64)
            if correlation == "label":
                group = group[np.argsort(labels[group], kind="stable")]     # list.sort(key=label) is stable
            elif correlation == "dirichlet":
                group = group[authors_dirichlet_order(labels[group], dirichlet_delta, seed)]
            elif correlation != "none":
                raise ValueError(f"the authors' stream order has no correlation '{correlation}'")
        pieces.append(group)
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


def authors_dirichlet_order(labels: np.ndarray, delta: float, seed: int) -> np.ndarray:
    """Positions 0..N-1 of ``labels`` as the authors' ``sort_by_dirichlet`` orders them right after
    ``np.random.seed(seed)`` (nothing else draws from NumPy's global generator in their loader before it):
    ``dirichlet_order`` on their legacy generator, whose ``permutation`` makes the draws of their ``shuffle``
    calls. (Where every chunk is full before a class is split, their code divides by zero; this one draws again.
    Where they stop after 120 s without a split, this stops after DIRICHLET_MAX_ATTEMPTS.)"""
    return dirichlet_order(labels, delta, np.random.RandomState(int(seed) & 0xFFFFFFFF))


def correlate(indices: np.ndarray, labels: np.ndarray | None, correlation: str, delta: float,
              rng_seed: list[int], batch_size: int = 1) -> np.ndarray:
    """Reorder ``indices`` (already shuffled) so that classes come in runs: "label" sorts by label, keeping the
    shuffled order within a class; "dirichlet" follows the anchor suite's Dirichlet ordering."""
    if labels is None:
        raise ValueError("a correlated stream needs the class label of every sample")
    labels = np.asarray(labels)
    if correlation == "label":
        return indices[np.argsort(labels[indices], kind="stable")]
    if correlation == "dirichlet":
        return indices[dirichlet_order(labels[indices], delta, np.random.default_rng(rng_seed))]
    if correlation == "stata":
        return indices[stata_online_order(labels[indices], delta, batch_size, np.random.default_rng(rng_seed))]
    raise ValueError(f"unknown correlation '{correlation}' (expected none, label, dirichlet or stata)")


def stata_online_order(labels: np.ndarray, gamma: float, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..N-1 of ``labels`` ordered as StatA's online sampler (MaxZanella/StatA) orders a test set: there
    are min(N // batch_size, C) consecutive slots; each class's samples are split over the slots in
    Dirichlet(gamma)-distributed shares; each slot is shuffled; the stream is slot after slot. Small gamma: each
    batch holds few classes (the StatA paper's realistic setting)."""
    if gamma <= 0:
        raise ValueError(f"TEST.DELTA_DIRICHLET (StatA's gamma) must be > 0 for the StatA sampler, got {gamma}")
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    n_slots = max(1, min(len(labels) // max(1, int(batch_size)), len(classes)))
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    for c in classes:
        members = np.flatnonzero(labels == c)
        cuts = (np.cumsum(rng.dirichlet(np.full(n_slots, float(gamma))))[:-1] * len(members)).astype(np.int64)
        for slot, part in zip(slots, np.split(members, cuts)):
            slot.extend(part.tolist())
    return np.concatenate([rng.permutation(np.asarray(slot, dtype=np.int64)) for slot in slots])


def classes_per_batch_order(labels: np.ndarray, classes_per_batch: int, batch_size: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Positions 0..N-1 of ``labels`` in batches of ``batch_size`` drawn from ``classes_per_batch`` classes each:
    StatA's "effective classes per batch" (Zanella et al., CVPR 2025; their BatchSampler draws K classes uniformly
    without replacement, then the batch uniformly without replacement from all images of those classes, then
    shuffles it), as one pass over the stream: each image comes exactly once (StatA draws every batch anew from the
    whole set, so images repeat across batches), so a row's accuracy is over the same images as without the key.
    Per batch: K classes drawn uniformly among those with images left (all of them where fewer are left); one image
    of each, so that all K are in the batch (effective); the rest drawn uniformly from the images left of those
    classes; the batch shuffled. Where those classes hold fewer than ``batch_size`` images between them (classes
    run out near the end), further classes with images left, in random order, join until the batch is full: such
    a batch holds more than K classes. The last batch holds what is left."""
    labels = np.asarray(labels, dtype=np.int64)
    if classes_per_batch < 1 or batch_size < classes_per_batch:
        raise ValueError(f"classes per batch must be in 1..batch size ({batch_size}), got {classes_per_batch}")
    left = {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    batches = []
    while left:
        available = np.asarray(sorted(left))
        picked = [int(c) for c in rng.choice(available, size=min(classes_per_batch, len(available)), replace=False)]
        size = min(batch_size, sum(len(v) for v in left.values()))
        joining = iter(int(c) for c in rng.permutation(available) if int(c) not in picked)
        while sum(len(left[c]) for c in picked) < size:
            picked.append(next(joining))
        firsts = [left[c][0] for c in picked]
        pool = np.concatenate([left[c][1:] for c in picked])
        owners = np.repeat(picked, [len(left[c]) - 1 for c in picked])
        drawn = rng.choice(len(pool), size=size - len(picked), replace=False)
        batches.append(rng.permutation(np.concatenate([firsts, pool[drawn]]).astype(np.int64)))
        kept = np.ones(len(pool), dtype=bool)
        kept[drawn] = False
        for c in picked:
            rest = pool[kept & (owners == c)]
            if len(rest):
                left[c] = rest
            else:
                del left[c]
    return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)


# The anchor suite redraws the class split until every chunk holds at least this many samples.
DIRICHLET_MIN_CHUNK = 10
DIRICHLET_MAX_ATTEMPTS = 10_000


def dirichlet_order(labels: np.ndarray, delta: float,
                    rng: np.random.Generator | np.random.RandomState) -> np.ndarray:
    """Positions 0..N-1 of ``labels`` in a temporally correlated order, as the anchor suite's sort_by_dirichlet
    (after NOTE, Gong et al. 2022) defines it: there are C chunks (C = max label + 1); the samples of each class,
    shuffled, are split over the chunks in Dirichlet(delta)-distributed proportions, where chunks that already
    hold N/C samples get no more; the split is redrawn until every chunk holds at least 10 samples. The stream
    is then chunk after chunk, and within a chunk class after class in a random class order. Small delta gives
    long single-class runs, large delta nearly i.i.d. batches."""
    if delta <= 0:
        raise ValueError(f"TEST.DELTA_DIRICHLET must be > 0 for the Dirichlet order, got {delta}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    chunks = num_classes
    attempts = DIRICHLET_MAX_ATTEMPTS if n >= chunks * DIRICHLET_MIN_CHUNK else 0   # else impossible
    for _ in range(attempts):
        chunk_sizes = np.zeros(chunks, dtype=np.int64)
        parts = [[None] * num_classes for _ in range(chunks)]   # parts[chunk][class] = positions
        for k in range(num_classes):
            members = rng.permutation(np.flatnonzero(labels == k))
            proportions = rng.dirichlet(np.full(chunks, float(delta)))
            proportions = proportions * (chunk_sizes < n / chunks)   # balance: full chunks take no more
            total = proportions.sum()
            if total <= 0:
                break
            cuts = (np.cumsum(proportions / total) * len(members)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(members, cuts)):
                parts[j][k] = piece
                chunk_sizes[j] += len(piece)
        else:
            if chunk_sizes.min() >= DIRICHLET_MIN_CHUNK:
                order = []
                for j in range(chunks):
                    for k in rng.permutation(num_classes):
                        order.append(parts[j][k])
                return np.concatenate(order).astype(np.int64)
    raise ValueError(f"Could not build a Dirichlet-correlated stream with TEST.DELTA_DIRICHLET={delta} for "
                     f"{n} samples of {num_classes} classes (every one of the {chunks} chunks needs at least "
                     f"{DIRICHLET_MIN_CHUNK} samples); use more samples or another delta")


def segment_labels(part) -> np.ndarray:
    """The class label of every sample of one domain's Dataset without decoding images: its ``labels``
    (datasets of this suite), ``targets`` or ``samples`` (torchvision folders); otherwise read item by item."""
    for attr in ("labels", "targets"):
        if hasattr(part, attr):
            values = np.asarray(getattr(part, attr), dtype=np.int64)
            if len(values) == len(part):
                return values
    if hasattr(part, "samples"):
        return np.asarray([s[1] for s in part.samples], dtype=np.int64)
    return np.asarray([int(part[i][1]) for i in range(len(part))], dtype=np.int64)


def make_loader(stream: Dataset, cfg, device: torch.device) -> DataLoader:
    workers = int(cfg.TEST.NUM_WORKERS)
    return DataLoader(stream, batch_size=int(cfg.TEST.BATCH_SIZE), shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
