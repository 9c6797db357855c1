"""STAMP (Yu et al., ECCV 2024, "STAMP: Outlier-Aware Test-Time Adaptation with Stable Memory Replay") as CLIPTTA's
library implements it on CLIP (MarcLafon/cliptta: ttavlm/methods/stamp.py, its RBM), closed-set.

Per step (OPTIM.STEPS per batch, then the batch is classified by the adapted model: adapt, then predict):
- filtering (no gradient): p = softmax(LOGIT_SCALE * cos); an image enters the class-balanced memory (RBM) under
  the pseudo-label argmax p when its entropy -sum p log(p + FILTER_ENTROPY_EPS) < ALPHA_STAMP * ln(C) and, with
  USE_CONSISTENCY_FILTERING, when the source model predicts the same class. The memory keeps MEMORY_LENGTH images;
  when full, every new image first drops the oldest image of a random class among the non-empty classes of
  largest count EMA (c_k <- 0.9 c_k + 0.1 n_k, updated when the memory is read);
- replay: when the memory holds anything, one optimizer step (SAM around it with USE_SAM) on the whole memory
  batch with the loss  mean_i(H_i * w_i) * MEMORY_LENGTH, w_i = exp(-H_i) / sum_j exp(-H_j), H_i the entropy of
  softmax(LOSS_LOGIT_SCALE * cos_i + 1e-6) (CLIPTTA's code: the raw cosines, scale 1).
The adapted parameters are the affine weight and bias of the image tower's normalisation layers.
"""
from __future__ import annotations

import copy
import logging
import math
import random

import torch
import torch.nn as nn

from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import MemoryReplayTTA, sam_optimizer_step
from methods.registry import register_method

logger = logging.getLogger(__name__)

ENTROPY_EPS = 1e-6   # CLIPTTA's lib.softmax_entropy adds it to the logits before the softmax
COUNT_DECAY = 0.9    # the RBM's class-count EMA: 0.9 * c + 0.1 * n


def shifted_softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """CLIPTTA's lib.softmax_entropy: the entropy of softmax(logits + 1e-6), written as it does."""
    shifted = logits + ENTROPY_EPS
    return -(shifted.softmax(1) * shifted.log_softmax(1)).sum(1)


class ReplayBalancedMemory:
    """CLIPTTA's (and the official STAMP's) RBM: per pseudo-class FIFO lists, ``max_len`` images in all, and a
    float32 count EMA per class. The draw among tied largest classes comes from a dedicated ``random.Random``
    seeded with the run's seed (theirs: the global ``random`` module, the same call), restarted by ``clear``."""

    def __init__(self, max_len: int, num_classes: int, seed: int):
        self.max_len = int(max_len)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.clear()

    def clear(self) -> None:
        self.items: list[list[torch.Tensor]] = [[] for _ in range(self.num_classes)]
        self.count_class = torch.zeros(self.num_classes, dtype=torch.float32)
        self.total = 0
        self.rng = random.Random(self.seed)

    def __len__(self) -> int:
        return self.total     # as theirs: the number appended, capped at max_len

    def _drop_oldest_of_a_largest_class(self) -> None:
        nonempty = [c for c in range(self.num_classes) if self.items[c]]
        max_count = 0
        for c in nonempty:
            if self.count_class[c] > max_count:
                max_count = self.count_class[c]
        largest = [c for c in nonempty if self.count_class[c] == max_count]
        self.items[self.rng.choice(largest)].pop(0)

    def append(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        for image, label in zip(images, labels.tolist()):
            if self.total < self.max_len:
                self.total += 1
            else:
                self._drop_oldest_of_a_largest_class()
            self.items[label].append(image)

    def read(self) -> torch.Tensor:
        """Every stored image, class by class; updates the count EMA of every class (as theirs get_data)."""
        stored = []
        for c in range(self.num_classes):
            stored.extend(self.items[c])
            self.count_class[c] = COUNT_DECAY * self.count_class[c] + (1 - COUNT_DECAY) * len(self.items[c])
        return torch.stack(stored)


@register_method("stamp")
class STAMP(MemoryReplayTTA):
    protocol = ADAPT_THEN_PREDICT
    config_defaults = {"STAMP": {
        "MEMORY_LENGTH": Option(128, within="[1, inf)"),    # --memory_length: images the RBM holds (official: 64)
        # --alpha_stamp: an image enters the memory when its entropy < ALPHA_STAMP * ln(C) (official: STAMP.ALPHA).
        "ALPHA_STAMP": Option(0.45, within="[0, inf)"),
        # --use_consistency_filtering: also require the source model's prediction to agree (official: always on
        # except ImageNet).
        "USE_CONSISTENCY_FILTERING": False,
        # --logit_scale: scale of the cosines in the filtering softmax and the reported logits.
        "LOGIT_SCALE": Option(100.0, within="(0, inf)"),
        # Scale of the cosines in the replay loss: CLIPTTA's code takes the entropy of the raw cosines (1.0); the
        # official STAMP of the model's logits (CLIP's would be LOGIT_SCALE).
        "LOSS_LOGIT_SCALE": Option(1.0, within="(0, inf)"),
        # eps in the filtering entropy -sum p log(p + eps): CLIPTTA's lib.entropy 0.0, the official 1e-5.
        "FILTER_ENTROPY_EPS": Option(0.0, within="[0, inf)"),
        "USE_SAM": False,                                     # --use_sam (the official STAMP always uses SAM)
        "RHO": Option(0.05, within="[0, inf)"),              # SAM radius (CLIPTTA's SAM default; never passed)
        "ADAM_EPS": Option(1e-6, within="(0, inf)"),         # abstract_model.setup_optimizer: Adam(..., eps=1e-6)
    }}

    def __init__(self, cfg, model, num_classes: int):
        super().__init__(cfg, model, num_classes)
        node = cfg.STAMP
        self.margin = float(node.ALPHA_STAMP) * math.log(num_classes)
        self.logit_scale, self.loss_logit_scale = float(node.LOGIT_SCALE), float(node.LOSS_LOGIT_SCALE)
        self.filter_entropy_eps = float(node.FILTER_ENTROPY_EPS)
        self.use_consistency_filtering = bool(node.USE_CONSISTENCY_FILTERING)
        self.use_sam, self.rho = bool(node.USE_SAM), float(node.RHO)
        self.adam_eps = float(node.ADAM_EPS)        # the optimizer (base class) reads it
        self.memory = ReplayBalancedMemory(node.MEMORY_LENGTH, num_classes, cfg.RNG_SEED)
        # The source image tower for the consistency filter, in a list: frozen, so kept out of reset's snapshot.
        self._source_visual: list[nn.Module] = []
        if self.use_sam and cfg.MIXED_PRECISION:
            logger.warning("stamp with STAMP.USE_SAM runs in fp32 (two gradient evaluations per step, no "
                           "GradScaler); MIXED_PRECISION is ignored")

    def setup_state(self) -> None:
        if self.use_consistency_filtering:   # theirs: deepcopy(self.model).train() after configure_model
            self._source_visual = [copy.deepcopy(self.model.clip.visual).requires_grad_(False)]

    def cost_info(self) -> dict:
        replay = 2 if self.use_sam else 1
        return {"views_per_image": 1, "steps_per_batch": self.steps, "memory_length": self.memory.max_len,
                "no_grad_forwards_per_step": 2 if self.use_consistency_filtering else 1,
                "replay_forward_backward_per_step": replay}

    def reset_extra_state(self) -> None:
        self.memory.clear()

    # ------------------------------------------------------------------ adaptation
    @torch.no_grad()
    def remember(self, x: torch.Tensor) -> None:
        cosines = self.cosines(x)
        probs = (self.logit_scale * cosines).softmax(dim=-1)
        entropy = -(probs * torch.log(probs + self.filter_entropy_eps)).sum(1)
        keep = entropy < self.margin
        if self.use_consistency_filtering:   # theirs: argmax of the (unscaled) logits of both models
            keep = keep & (cosines.argmax(dim=1) == self.cosines(x, self._source_visual[0]).argmax(dim=1))
        self.memory.append(x[keep], probs.argmax(dim=1)[keep])

    def replay_loss(self, stored: torch.Tensor) -> torch.Tensor:
        entropy = shifted_softmax_entropy(self.loss_logit_scale * self.cosines(stored))
        inverse = 1 / torch.exp(entropy)
        weights = inverse / inverse.sum() * self.memory.max_len
        return entropy.mul(weights).mean()

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> None:
        self.remember(x)
        if len(self.memory) == 0:
            return
        stored = self.memory.read()
        if not self.use_sam:
            self.optimizer_step(self.replay_loss(stored))
            return
        sam_optimizer_step(self.optimizer, self.params, self.rho, lambda: self.replay_loss(stored))

    @torch.no_grad()
    def episode_logits(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """The batch classified by the adapted model: LOGIT_SCALE * cos (CLIPTTA's softmax(100 * cos))."""
        return self.logit_scale * self.cosines(x)
