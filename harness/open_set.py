"""Open-set streams: out-of-distribution (OOD) images mixed into every domain's stream, and the metrics of how well
the method's output still tells them from the known classes (docs/open_set.md).

OPEN_SET.OOD_DATASET names the OOD set (datasets/ood_sets.py). Each in-distribution segment (domain, severity) gets
a companion: the OOD set at the same domain and severity (OPEN_SET.OOD_DOMAIN same; CLIPTTA's SVHN-C beside
CIFAR-10-C), or at a fixed one, or the whole set where it has no domains. Per segment, RATIO OOD images per ID image
are drawn from the companion (a seeded permutation, a new one each time it runs out, as CLIPTTA's cycling OOD
loader) and put into the segment's stream by OPEN_SET.MIX:

- ``uniform``: at uniformly random positions among the segment's images (over the whole task where a setting
  mixes domains);
- ``bursts``: in runs of BURST_LENGTH at random positions;
- ``per_batch``: CLIPTTA's protocol: every batch is TEST.BATCH_SIZE ID images followed by round(RATIO *
  TEST.BATCH_SIZE) OOD images (its drop_last OOD loader: an epoch's last partial batch is skipped).

The stream yields (image, label, segment, is_ood); an OOD image has label -1. The harness passes the images alone
to the method: the labels and the flags never reach it (``refuse_methods_that_ask_for_flags`` refuses a method
whose hooks ask for them). Accuracy, calibration and their counts are those of the ID images; the OOD metrics
(AUROC, FPR at 95% TPR, AUPR-in/out, OSCR) compare the declared score (OPEN_SET.SCORE) of the ID images with that
of the OOD images of the same segment."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from conf.errors import ConfigError

# Checking a config needs no torch (harness/build.py): torch is imported where a stream runs.
if TYPE_CHECKING:
    import torch

# OOD score of a batch's logits: msp (max softmax probability of logits / T), max_logit, energy
# (T * logsumexp(logits / T), Liu et al. 2020) or the method's own (TTAMethod.ood_scores).
SCORES = ("msp", "max_logit", "energy", "method")
MIXES = ("uniform", "bursts", "per_batch")
# Parameter names of a method's hooks that would ask for what the stream keeps from it.
FLAG_PARAMETERS = {"is_ood", "ood", "ood_flags", "is_unknown", "labels", "label", "targets", "target"}
METHOD_HOOKS = ("forward", "forward_and_adapt", "episode_logits", "loss")
TPR_LEVEL = 0.95
# The OOD metrics of an open-set run's records and their summary keys (harness/results.py).
OOD_FIELDS = {"auroc": "mean_auroc", "fpr95": "mean_fpr95", "aupr_in": "mean_aupr_in", "aupr_out": "mean_aupr_out",
              "oscr": "mean_oscr"}


def is_open_set(cfg) -> bool:
    return bool(cfg.OPEN_SET.OOD_DATASET)


# ------------------------------------------------------------------------------------------------ checks

def check_open_set(cfg, dataset) -> None:
    """The OPEN_SET keys against the in-distribution set and the OOD set, before anything loads: one ConfigError
    line naming the key and what was expected."""
    from datasets.ood_sets import get_ood_set, overlapping_classes
    node = cfg.OPEN_SET
    if not node.OOD_DATASET:
        changed = [f"OPEN_SET.{k}" for k in node if k != "OOD_DATASET" and node[k] != _defaults()[k]]
        if changed:
            raise ConfigError(f"{', '.join(changed)} set, but OPEN_SET.OOD_DATASET is empty (a closed-set run): name "
                              f"the OOD set, or leave the OPEN_SET keys at their defaults")
        return
    ood = get_ood_set(node.OOD_DATASET)
    if ood.name == dataset.name:
        raise ConfigError(f"OPEN_SET.OOD_DATASET {ood.name} is the in-distribution set itself (CORRUPTION.DATASET)")
    ood_classes = ood.class_names_for(cfg)
    shared = overlapping_classes(dataset.class_names, ood_classes)
    if shared:
        raise ConfigError(f"OPEN_SET.OOD_DATASET {ood.name} shares classes with {dataset.name}: {shared[:8]}"
                          f"{' ...' if len(shared) > 8 else ''} ({len(shared)}); its images of those classes are not "
                          f"unknown to the model: choose an OOD set without them")
    if not ood_classes and dataset.name not in ood.disjoint_from:
        raise ConfigError(f"OPEN_SET.OOD_DATASET {ood.name} names no classes, and its curators made it disjoint "
                          f"from {list(ood.disjoint_from) or 'no set'}, not from {dataset.name}: the overlap cannot be "
                          f"checked; choose an OOD set that names its classes")
    if node.OOD_DOMAIN != "same" and node.OOD_DOMAIN not in ood.domains:
        raise ConfigError(f"OPEN_SET.OOD_DOMAIN '{node.OOD_DOMAIN}' is not a domain of {ood.name}; expected 'same' or "
                          f"one of {list(ood.domains)}")
    for domain in cfg.CORRUPTION.TYPE:
        companion_domain(cfg, ood, domain, int(cfg.CORRUPTION.SEVERITY[0]))
    if node.MIX == "per_batch" and round(node.RATIO * cfg.TEST.BATCH_SIZE) < 1:
        raise ConfigError(f"OPEN_SET.RATIO {node.RATIO} with MIX per_batch and TEST.BATCH_SIZE {cfg.TEST.BATCH_SIZE} "
                          f"puts round({node.RATIO} x {cfg.TEST.BATCH_SIZE}) = 0 OOD images in a batch; expected a "
                          f"RATIO of at least {0.5 / cfg.TEST.BATCH_SIZE:g}")
    if node.MIX == "per_batch" and "mixed_domains" in cfg.SETTING:
        raise ConfigError(f"OPEN_SET.MIX per_batch with SETTING {cfg.SETTING}: a batch of several domains has no one "
                          f"companion OOD set to draw its OOD batch from; use MIX uniform or bursts")


def config_warnings(cfg) -> list[str]:
    """OPEN_SET keys that are set but change nothing for this run."""
    node, base, warnings = cfg.OPEN_SET, _defaults(), []
    if node.SCORE in ("max_logit", "method") and node.SCORE_TEMPERATURE != base["SCORE_TEMPERATURE"]:
        warnings.append(f"OPEN_SET.SCORE_TEMPERATURE {node.SCORE_TEMPERATURE} has no effect with OPEN_SET.SCORE "
                        f"{node.SCORE} (the method's own score does not read it; max_logit ranks alike at any T)")
    if node.MIX != "bursts" and node.BURST_LENGTH != base["BURST_LENGTH"]:
        warnings.append(f"OPEN_SET.BURST_LENGTH {node.BURST_LENGTH} has no effect with OPEN_SET.MIX {node.MIX}")
    return warnings


def check_open_set_method(cfg, cls) -> None:
    """The method on an open-set stream: OPEN_SET.SCORE method needs its own score; no hook may ask for the
    stream's labels or flags."""
    if not is_open_set(cfg):
        return
    if cfg.OPEN_SET.SCORE == "method" and getattr(cls, "own_ood_score", None) is None:
        raise ConfigError(f"OPEN_SET.SCORE method: {cls.method_name} has no OOD score of its own; expected msp, "
                          f"max_logit or energy for it")
    refuse_methods_that_ask_for_flags(cls)


def _defaults() -> dict:
    import conf
    return dict(conf.defaults().OPEN_SET)


def companion_domain(cfg, ood, domain: str, severity: int) -> tuple[str, int]:
    """(domain, severity) of the OOD set read beside the in-distribution ``domain`` at ``severity``."""
    node = cfg.OPEN_SET
    wanted = domain if node.OOD_DOMAIN == "same" else node.OOD_DOMAIN
    if wanted not in ood.domains:
        if node.OOD_DOMAIN == "same" and len(ood.domains) == 1:
            wanted = ood.domains[0]             # a set without domains is read whole beside every domain
        else:
            raise ConfigError(f"OPEN_SET.OOD_DOMAIN same: {ood.name} has no domain '{domain}' to read beside "
                              f"{cfg.CORRUPTION.DATASET}'s; set OPEN_SET.OOD_DOMAIN to one of {list(ood.domains)}")
    if not ood.has_severities or wanted == "none":
        return wanted, 0
    wanted_severity = int(node.OOD_SEVERITY) or int(severity)
    if not 1 <= wanted_severity <= 5:
        raise ConfigError(f"OPEN_SET.OOD_SEVERITY: {ood.name} '{wanted}' needs a severity in 1..5 (the ID domain "
                          f"{domain} has none: set OPEN_SET.OOD_SEVERITY)")
    return wanted, wanted_severity


def provenance(cfg, ood: dict) -> dict:
    """What the results record of an open-set run's OOD data: the set, its layout and description, the share, mix
    and score, and each segment's companion (domain, severity, images)."""
    from datasets.ood_sets import get_ood_set
    ood_set = get_ood_set(cfg.OPEN_SET.OOD_DATASET)
    return {"ood_dataset": ood_set.name, "layout": ood_set.layout, **ood_set.describe(cfg),
            "ratio": cfg.OPEN_SET.RATIO, "mix": cfg.OPEN_SET.MIX, "score": cfg.OPEN_SET.SCORE,
            "score_temperature": cfg.OPEN_SET.SCORE_TEMPERATURE,
            "companions": [{"domain": s.domain, "severity": s.severity, "ood_domain": c.domain,
                            "ood_severity": c.severity, "ood_images": len(c.images)} for s, c in ood.items()]}


def refuse_methods_that_ask_for_flags(cls) -> None:
    """A method's hooks get images only: a hook with a parameter named like the stream's labels or OOD flags
    would receive nothing (or something else) there, so such a method is refused by name."""
    for hook in METHOD_HOOKS:
        function = getattr(cls, hook, None)
        if function is None:
            continue
        asked = sorted(FLAG_PARAMETERS & set(inspect.signature(function).parameters))
        if asked:
            raise ConfigError(f"method {cls.method_name}: {hook}() asks for {asked[0]}; a test-time method sees the "
                              f"images only, never the stream's labels or OOD flags")


# ------------------------------------------------------------------------------------------------ data

@dataclass(frozen=True)
class Companion:
    """The OOD images read beside one in-distribution segment."""
    domain: str
    severity: int
    images: object          # an ImageDataset


def companions(cfg, segments, check_files: bool = True) -> dict:
    """{segment: Companion} for the in-distribution ``segments``, each checked (non-empty; ``check_files``: the
    cheap checks of every file too); one ImageDataset per distinct OOD (domain, severity)."""
    from datasets.base import DatasetError
    from datasets.ood_sets import get_ood_set
    ood = get_ood_set(cfg.OPEN_SET.OOD_DATASET)
    built: dict[tuple[str, int], object] = {}
    found = {}
    for segment in segments:
        key = companion_domain(cfg, ood, segment.domain, segment.severity)
        if key not in built:
            images = ood.build(cfg, *key)
            if len(images) == 0:
                raise DatasetError(f"OPEN_SET.OOD_DATASET {ood.name}: no images for {key[0]} at severity {key[1]}")
            if check_files and hasattr(images, "check_files"):
                images.check_files()
            built[key] = images
        found[segment] = Companion(key[0], key[1], built[key])
    return found


class OpenSetStream:
    """(transformed image, label, segment, is_ood) for the flat positions of ``batches``: 0..N_id-1 are the ID
    segments' images (concatenated), N_id.. the companions' (one block per segment, in segment order)."""

    def __init__(self, parts: list, ood_parts: list, ood_rows: list[np.ndarray], transform):
        self.parts, self.ood_parts, self.ood_rows, self.transform = parts, ood_parts, ood_rows, transform
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.ood_offsets = int(self.offsets[-1]) + np.cumsum([0] + [len(r) for r in ood_rows])

    def __len__(self) -> int:
        return int(self.ood_offsets[-1])

    def __getitem__(self, flat: int):
        flat = int(flat)
        if flat < self.offsets[-1]:
            segment = int(np.searchsorted(self.offsets, flat, side="right") - 1)
            image, label = self.parts[segment][flat - int(self.offsets[segment])]
            return self.transform(image), label, segment, False
        segment = int(np.searchsorted(self.ood_offsets, flat, side="right") - 1)
        image, _ = self.ood_parts[segment][int(self.ood_rows[segment][flat - int(self.ood_offsets[segment])])]
        return self.transform(image), -1, segment, True


def ood_rows(size: int, chunks: list[int], rng: np.random.Generator) -> np.ndarray:
    """Rows of a set of ``size`` images drawn in ``chunks``: from a permutation, a new one when the current one
    holds fewer rows than the next chunk needs (its rest is skipped, as a drop_last loader skips it); a chunk larger
    than the set takes whole permutations and the rest from a new one."""
    drawn, epoch, at = [], rng.permutation(size), 0
    for chunk in chunks:
        need = int(chunk)
        while need > 0:
            if at == size or (size - at < need and need <= size):
                epoch, at = rng.permutation(size), 0
            take = min(need, size - at)
            drawn.append(epoch[at:at + take])
            at += take
            need -= take
    return np.concatenate(drawn).astype(np.int64) if drawn else np.zeros(0, dtype=np.int64)


def open_set_batches(cfg, id_order: np.ndarray, id_segment: np.ndarray, runs: list[np.ndarray],
                     ood_sizes: list[int], rng_seed: list[int]) -> tuple[list[list[int]], list[np.ndarray]]:
    """(the batches as lists of flat stream positions, the companion rows drawn per segment).

    ``id_order``: the ID positions in stream order; ``id_segment``: the segment of each; ``runs``: index arrays into
    ``id_order`` that OOD images are mixed into (a segment's images, or the whole task where it mixes domains)."""
    node, batch_size = cfg.OPEN_SET, int(cfg.TEST.BATCH_SIZE)
    segments = len(ood_sizes)
    rngs = [np.random.default_rng(rng_seed + [k]) for k in range(segments)]
    mixer = np.random.default_rng(rng_seed + [segments])
    n_id = len(id_order)
    drawn: list[list[np.ndarray]] = [[] for _ in range(segments)]
    sequence_runs: list[list[tuple[int, int]]] = []      # per run: (segment or -1 for ID, index) items
    batches_of_runs: list[list[list[tuple[int, int]]]] = []
    for run in runs:
        ids = [(-1, int(i)) for i in run]
        if node.MIX == "per_batch":
            batches_of_runs.append(_per_batch(ids, id_segment, run, batch_size, round(node.RATIO * batch_size),
                                              ood_sizes, rngs, drawn))
            continue
        counts = np.bincount(id_segment[run], minlength=segments)
        ood_items = []
        for k in range(segments):
            n = int(round(node.RATIO * counts[k]))
            if n:
                start = sum(len(d) for d in drawn[k])
                drawn[k].append(ood_rows(ood_sizes[k], [n], rngs[k]))
                ood_items += [(k, start + j) for j in range(n)]
        ood_items = [ood_items[j] for j in mixer.permutation(len(ood_items))]
        sequence_runs.append(_interleave(ids, ood_items, node.MIX, int(node.BURST_LENGTH), mixer))
    rows = [np.concatenate(d) if d else np.zeros(0, dtype=np.int64) for d in drawn]
    offsets = n_id + np.cumsum([0] + [len(r) for r in rows])

    def flat(item):
        k, j = item
        return int(id_order[j]) if k < 0 else int(offsets[k] + j)

    if node.MIX == "per_batch":
        return [[flat(i) for i in b] for run in batches_of_runs for b in run], rows
    sequence = [flat(i) for run in sequence_runs for i in run]
    return [sequence[s:s + batch_size] for s in range(0, len(sequence), batch_size)], rows


def _per_batch(ids, id_segment, run, batch_size, ood_batch, ood_sizes, rngs, drawn) -> list:
    """CLIPTTA's batches: each chunk of ``batch_size`` ID images, then ``ood_batch`` images of the chunk's segment's
    companion (the segment of its first image; a run of one segment has one). A segment's OOD batches are drawn in
    one go, so that they follow one another through each permutation as a drop_last loader's batches do."""
    owners = [int(id_segment[run[s]]) for s in range(0, len(ids), batch_size)]
    starts = {}
    for k in sorted(set(owners)):
        starts[k] = sum(len(d) for d in drawn[k])
        drawn[k].append(ood_rows(ood_sizes[k], [ood_batch] * owners.count(k), rngs[k]))
    batches, taken = [], {k: 0 for k in starts}
    for s, k in zip(range(0, len(ids), batch_size), owners):
        first = starts[k] + taken[k]
        batches.append(ids[s:s + batch_size] + [(k, first + j) for j in range(ood_batch)])
        taken[k] += ood_batch
    return batches


def _interleave(ids: list, ood_items: list, mix: str, burst: int, rng: np.random.Generator) -> list:
    """The ID items in their order with the OOD items put in: at uniformly random positions, or in bursts of
    ``burst`` consecutive OOD items at random gaps between ID items."""
    if not ood_items:
        return list(ids)
    if mix == "uniform":
        total = len(ids) + len(ood_items)
        is_ood = np.zeros(total, dtype=bool)
        is_ood[rng.choice(total, size=len(ood_items), replace=False)] = True
        ids_iter, ood_iter = iter(ids), iter(ood_items)
        return [next(ood_iter) if flag else next(ids_iter) for flag in is_ood]
    bursts = [ood_items[s:s + burst] for s in range(0, len(ood_items), burst)]
    gaps = np.sort(rng.choice(len(ids) + 1, size=len(bursts), replace=len(bursts) > len(ids) + 1))
    out, at = [], 0
    for gap, chunk in zip(gaps, bursts):
        out += ids[at:gap] + chunk
        at = gap
    return out + ids[at:]


def open_set_loader(cfg, task, index: int, parts: list, companions_of: list, id_order: np.ndarray, transform,
                    device):
    """The DataLoader of one task's open-set stream: (images, labels, segments, is_ood) batches."""
    from torch.utils.data import DataLoader
    from harness.stream import order_seed
    offsets = np.cumsum([0] + [len(p) for p in parts])
    id_segment = (np.searchsorted(offsets, id_order, side="right") - 1).astype(np.int64)
    if task.order == "sequential":
        runs = [np.flatnonzero(id_segment == k) for k in range(len(parts))]
    else:
        runs = [np.arange(len(id_order))]
    seed = [order_seed(cfg) & 0xFFFFFFFF, 0x00D5E7, int(index)]     # RNG_SEED unless TEST.ORDER_SEED
    batches, rows = open_set_batches(cfg, id_order, id_segment, runs, [len(c.images) for c in companions_of], seed)
    stream = OpenSetStream(parts, [c.images for c in companions_of], rows, transform)
    workers = int(cfg.TEST.NUM_WORKERS)
    return DataLoader(stream, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


# ------------------------------------------------------------------------------------------------ scores, metrics

def declared_scores(logits: torch.Tensor, cfg, method) -> torch.Tensor:
    """The OOD score (higher = more in-distribution) of each image of a batch, by OPEN_SET.SCORE, in float64."""
    node = cfg.OPEN_SET
    if node.SCORE == "method":
        return method.ood_scores(logits).detach().double().cpu()
    scaled = logits.detach().double().cpu() / float(node.SCORE_TEMPERATURE)
    if node.SCORE == "msp":
        return scaled.softmax(dim=1).max(dim=1).values
    if node.SCORE == "max_logit":
        return scaled.max(dim=1).values
    return float(node.SCORE_TEMPERATURE) * scaled.logsumexp(dim=1)


class OodScores:
    """Per segment: the declared score, the OOD flag and (for ID images) whether the prediction was right."""

    def __init__(self, segments: int):
        self.parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(segments)]

    def add(self, scores: torch.Tensor, is_ood: torch.Tensor, hits: torch.Tensor, segment: torch.Tensor) -> None:
        scores, is_ood, hits, segment = (t.cpu().numpy() for t in (scores, is_ood, hits, segment))
        for k in np.unique(segment):
            mine = segment == k
            self.parts[int(k)].append((scores[mine].astype(np.float64), is_ood[mine].astype(bool),
                                       hits[mine].astype(bool)))

    def fields(self, k: int) -> dict:
        if not self.parts[k]:
            return ood_metrics(np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool))
        scores, is_ood, hits = (np.concatenate(column) for column in zip(*self.parts[k]))
        return ood_metrics(scores[~is_ood], scores[is_ood], hits[~is_ood])


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, id_correct: np.ndarray) -> dict:
    """The OOD record fields of one segment (NaN where either side is empty)."""
    fields = {"n_ood": int(len(ood_scores))}
    if len(id_scores) == 0 or len(ood_scores) == 0:
        return {**fields, **{name: float("nan") for name in OOD_FIELDS}}
    return {**fields, "auroc": auroc(id_scores, ood_scores), "fpr95": fpr_at_tpr(id_scores, ood_scores),
            "aupr_in": average_precision(id_scores, ood_scores),
            "aupr_out": average_precision(-np.asarray(ood_scores), -np.asarray(id_scores)),
            "oscr": oscr(id_scores, ood_scores, id_correct)}


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve with the ID images as positives: P(s_id > s_ood) + P(s_id = s_ood) / 2 over all
    pairs (the Mann-Whitney statistic; sklearn's roc_auc_score)."""
    ood_sorted = np.sort(np.asarray(ood_scores, dtype=np.float64))
    ids = np.asarray(id_scores, dtype=np.float64)
    below = np.searchsorted(ood_sorted, ids, side="left")
    equal = np.searchsorted(ood_sorted, ids, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (len(ids) * len(ood_sorted)))


def roc_points(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, from the highest, after (0, 0): an image is called ID
    when its score is >= the threshold."""
    scores = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    positive = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(positive)[last_of_value]
    fps = (last_of_value + 1) - tps
    return (np.r_[0.0, fps / len(ood_scores)], np.r_[0.0, tps / len(id_scores)],
            np.r_[np.inf, scores[last_of_value]])


def fpr_at_tpr(id_scores, ood_scores, level: float = TPR_LEVEL) -> float:
    """The false-positive rate where the ROC curve reaches a true-positive rate of ``level``, linear between its
    points (CLIPTTA's get_fpr: scipy's interp1d of sklearn's roc_curve at 0.95); where points lie at exactly
    ``level``, the first (lowest FPR)."""
    fpr, tpr, _ = roc_points(id_scores, ood_scores)
    i = int(np.searchsorted(tpr, level, side="left"))
    if tpr[i] == level:
        return float(fpr[i])
    return float(fpr[i - 1] + (fpr[i] - fpr[i - 1]) * (level - tpr[i - 1]) / (tpr[i] - tpr[i - 1]))


def average_precision(positive_scores, negative_scores) -> float:
    """Area under the precision-recall curve as sklearn's average_precision_score sums it: sum over thresholds of
    (recall step) x precision. AUPR-in: the ID images positive with their scores; AUPR-out: the OOD images positive
    with the negated scores."""
    fpr, tpr, _ = roc_points(positive_scores, negative_scores)
    tps, fps = tpr[1:] * len(positive_scores), fpr[1:] * len(negative_scores)
    precision = tps / (tps + fps)
    return float(np.sum(np.diff(np.r_[0.0, tpr[1:]]) * precision))


def oscr(id_scores, ood_scores, id_correct) -> float:
    """Open-set classification rate (Dhamija et al. 2018) as its reference code computes it (Chen et al.'s ARPL
    compute_oscr, which OpenOOD and CLIPTTA's get_oscr carry): at each distinct score t, from the highest, the point
    (FPR = OOD images with score >= t, CCR = correctly classified ID images with score > t, each over its set's
    size), after (0, 0) and before (1, 1); the area by trapezoids (a correct ID image just above an OOD one gives a
    diagonal step)."""
    scores = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    correct = np.concatenate([np.asarray(id_correct, dtype=np.float64), np.zeros(len(ood_scores))])
    is_ood = np.concatenate([np.zeros(len(id_scores)), np.ones(len(ood_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, correct, is_ood = scores[order], correct[order], is_ood[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    above = np.r_[0.0, np.cumsum(correct)[last_of_value][:-1]] / len(id_scores)   # strictly above t
    fpr = np.r_[0.0, np.cumsum(is_ood)[last_of_value] / len(ood_scores), 1.0]
    ccr = np.r_[0.0, above, 1.0]
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))
