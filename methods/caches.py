"""Per-class memories the training-free cache methods share: ``ClassQueues`` (TDA's positive and negative caches,
DPE's prototype queues) and the logit scale of those references' clip logits."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# The reference's clip logits: ``100. * image_features @ clip_weights`` (OpenAI CLIP's learned scale, rounded); DPE's
# code, built on TDA's, does the same.
REFERENCE_LOGIT_SCALE = 100.0


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
