"""Per-class memories the training-free cache methods share: ``ClassQueues`` (TDA's positive and negative caches,
DPE's prototype queues), the logit scale of those references' clip logits, and TDA's cache keys and cache logits
(TDA, BoostAdapter)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from conf.errors import ConfigError
from conf.options import Option

# The reference's clip logits: ``100. * image_features @ clip_weights`` (OpenAI CLIP's learned scale, rounded); DPE's
# code, built on TDA's, does the same.
REFERENCE_LOGIT_SCALE = 100.0

# TDA's positive and negative cache keys, in a node of their own for each method built on those caches (TDA,
# BoostAdapter: {"TDA": {..., **TDA_CACHE_OPTIONS}}); read by ``tda_cache_settings``.
TDA_CACHE_OPTIONS = {
    "POSITIVE_ENABLED": True,
    "POSITIVE_SHOT_CAPACITY": Option(3, within="[1, inf)"),
    "POSITIVE_ALPHA": Option(2.0, within="[0, inf)"),
    "POSITIVE_BETA": Option(5.0, within="[0, inf)"),
    "NEGATIVE_ENABLED": True,
    "NEGATIVE_SHOT_CAPACITY": Option(2, within="[1, inf)"),
    "NEGATIVE_ALPHA": Option(0.117, within="[0, inf)"),
    "NEGATIVE_BETA": Option(1.0, within="[0, inf)"),
    # An image enters the negative cache only if ENTROPY_LOWER < its normalised entropy < ENTROPY_UPPER.
    "NEGATIVE_ENTROPY_LOWER": 0.2,
    "NEGATIVE_ENTROPY_UPPER": 0.5,
    # An entry's negative pseudo-label marks the classes whose probability is within (MASK_LOWER, MASK_UPPER).
    "NEGATIVE_MASK_LOWER": 0.03,
    "NEGATIVE_MASK_UPPER": 1.0,
}


def check_tda_cache_intervals(node, name: str) -> None:
    """Refuse a node of TDA_CACHE_OPTIONS whose negative-cache bounds are not an open interval."""
    for low, high in (("NEGATIVE_ENTROPY_LOWER", "NEGATIVE_ENTROPY_UPPER"),
                      ("NEGATIVE_MASK_LOWER", "NEGATIVE_MASK_UPPER")):
        if not node[low] < node[high]:
            raise ConfigError(f"{name}.{low} = {node[low]} must be below {name}.{high} = {node[high]} "
                              f"(an open interval)")


def tda_cache_settings(node) -> tuple[dict, dict]:
    """(positive, negative) cache settings of a node of TDA_CACHE_OPTIONS."""
    positive = dict(enabled=bool(node.POSITIVE_ENABLED), capacity=int(node.POSITIVE_SHOT_CAPACITY),
                    alpha=float(node.POSITIVE_ALPHA), beta=float(node.POSITIVE_BETA))
    negative = dict(enabled=bool(node.NEGATIVE_ENABLED), capacity=int(node.NEGATIVE_SHOT_CAPACITY),
                    alpha=float(node.NEGATIVE_ALPHA), beta=float(node.NEGATIVE_BETA),
                    entropy_lower=float(node.NEGATIVE_ENTROPY_LOWER),
                    entropy_upper=float(node.NEGATIVE_ENTROPY_UPPER),
                    mask_lower=float(node.NEGATIVE_MASK_LOWER), mask_upper=float(node.NEGATIVE_MASK_UPPER))
    return positive, negative


class ClassQueues(nn.Module):
    """TDA's cache (``update_cache``): per class a queue of at most ``capacity`` entries (key (D,), score[, extra
    (E,)]) sorted by ascending score. A new entry is appended while its class's queue has room, else it replaces
    the last (highest-score) entry if its score is strictly lower; the queue is then sorted again, stably, as
    Python's ``sorted`` (ties keep their order). Buffers, so a method's reset() empties them exactly. TDA scores by
    entropy (float32) and keeps a probability map per negative entry (``extra_dim`` C); DPE queues its visual
    features here with python-float scores (``score_dtype`` float64, compared as the reference compares floats)."""

    def __init__(self, num_classes: int, capacity: int, dim: int, extra_dim: int = 0,
                 score_dtype: torch.dtype = torch.float32, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.capacity = capacity
        # ``dtype`` of keys and extras: fp32, as the references' caches; fp64 for a model run in fp64 (the
        # numerical-fragility test's reference run).
        self.register_buffer("keys", torch.zeros(num_classes, capacity, dim, dtype=dtype, device=device))
        self.register_buffer("scores", torch.full((num_classes, capacity), math.inf, dtype=score_dtype,
                                                  device=device))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long, device=device))
        self.register_buffer("extras", torch.zeros(num_classes, capacity, extra_dim, dtype=dtype, device=device))

    @torch.no_grad()
    def insert(self, label: int, key: torch.Tensor, score, extra: torch.Tensor | None = None) -> None:
        n = int(self.counts[label])
        if n < self.capacity:
            slot = n
            self.counts[label] = n + 1
        elif bool(torch.as_tensor(score, dtype=self.scores.dtype) < self.scores[label, -1]):
            slot = n - 1
        else:
            return
        self.keys[label, slot] = key
        self.scores[label, slot] = score
        if extra is not None:
            self.extras[label, slot] = extra
        filled = int(self.counts[label])
        order = self.scores[label, :filled].argsort(stable=True)
        for buffer in (self.keys, self.scores, self.extras):
            buffer[label, :filled] = buffer[label, order]


def cache_dtype(features: torch.Tensor) -> torch.dtype:
    """What a cache keeps features in: fp32 (also for fp16 features, as the references), fp64 for fp64 ones."""
    return torch.promote_types(features.dtype, torch.float32)


def cache_weights(query: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - q.k)) for every filled entry of a cache (C, S, D) with ``counts`` (C,) entries per class;
    0 for the empty slots. Written as the reference writes it, ``(-1) * (beta - beta * affinity)``."""
    affinity = keys @ query                                               # (C, S)
    filled = torch.arange(keys.shape[1], device=keys.device) < counts.unsqueeze(1)
    return torch.exp(-(beta - beta * affinity)) * filled


def positive_cache_logits(query, keys, counts, alpha: float, beta: float) -> torch.Tensor:
    """alpha * weights @ one_hot(class of each entry): the weights of each class's entries summed, (C,)."""
    return alpha * cache_weights(query, keys, counts, beta).sum(dim=1)


def negative_cache_logits(query, keys, counts, probs, alpha: float, beta: float, mask_lower: float,
                          mask_upper: float) -> torch.Tensor:
    """alpha * weights @ mask, the mask of an entry being 1 where its probability map lies strictly within
    (mask_lower, mask_upper); probs (C, S, C) are the entries' probability maps. (C,)"""
    mask = ((probs > mask_lower) & (probs < mask_upper)).to(keys.dtype)
    return alpha * torch.einsum("cs,csk->k", cache_weights(query, keys, counts, beta), mask)
