"""SoTTA (Gong et al., NeurIPS 2023, "SoTTA: Robust Test-Time Adaptation on Noisy Data Streams") as CLIPTTA's
library implements it on CLIP (MarcLafon/cliptta: ttavlm/methods/sotta.py, ttavlm/memory/hus.py), closed-set.

Per test batch (OPTIM.STEPS steps, then the batch is classified by the adapted model: adapt, then predict):
- at the batch's first step only, every image enters the high-confidence uniform-class memory (HUS) under its
  pseudo-label argmax_c cos(x, t_c), if its confidence max softmax(OOD_LOGIT_SCALE * cos) is at least
  HIGH_THRESHOLD; a full memory (CAPACITY images) first drops a random image of the image's own class when that
  class is among the largest, else a random image of a random largest class;
- every step, when the memory holds anything, one optimizer step (SAM around it with USE_SAM) on the entropy of
  softmax(LOGIT_SCALE * cos) of memory images: LOSS_ON "first_image" (CLIPTTA's code, which passes the memory as a
  list of one-image "views" and takes the loss of view 0 only) or "memory_batch" (the whole memory as one batch,
  the official SoTTA's mean entropy).
The adapted parameters are the affine weight and bias of the image tower's normalisation layers.
"""
from __future__ import annotations

import logging
import random

import torch

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import MemoryReplayTTA, sam_optimizer_step
from methods.registry import register_method

logger = logging.getLogger(__name__)

LOSS_SETS = ("first_image", "memory_batch")
ENTROPY_EPS = 1e-6   # CLIPTTA's lib.softmax_entropy adds it to the logits before the softmax


def shifted_softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """CLIPTTA's lib.softmax_entropy: the entropy of softmax(logits + 1e-6), written as it does."""
    shifted = logits + ENTROPY_EPS
    return -(shifted.softmax(1) * shifted.log_softmax(1)).sum(1)


class HighConfidenceUniformMemory:
    """CLIPTTA's HUS: per pseudo-class lists of (image on the CPU, confidence), ``capacity`` images in all. The
    random draws of a replacement come from a dedicated ``random.Random`` seeded with the run's seed (theirs: the
    global ``random`` module, with the same calls), restarted by ``clear``."""

    def __init__(self, capacity: int, num_classes: int, threshold: float, seed: int):
        self.capacity = int(capacity)
        self.num_classes = int(num_classes)
        self.threshold = float(threshold)
        self.seed = int(seed)
        self.clear()

    def clear(self) -> None:
        self.images: list[list[torch.Tensor]] = [[] for _ in range(self.num_classes)]
        self.confidences: list[list[float]] = [[] for _ in range(self.num_classes)]
        self.rng = random.Random(self.seed)

    def __len__(self) -> int:
        return sum(len(c) for c in self.images)

    def class_counts(self) -> list[int]:
        return [len(c) for c in self.images]

    def add(self, image: torch.Tensor, label: int, confidence: float) -> None:
        if confidence < self.threshold:
            return
        if len(self) >= self.capacity:
            self._drop_one(label)
        self.images[label].append(image.detach().cpu())
        self.confidences[label].append(confidence)

    def _drop_one(self, label: int) -> None:
        counts = self.class_counts()
        largest = [c for c, n in enumerate(counts) if n == max(counts)]
        victim = label if label in largest else self.rng.choice(largest)
        index = self.rng.randrange(0, len(self.images[victim]))
        self.images[victim].pop(index)
        self.confidences[victim].pop(index)

    def stored(self) -> list[torch.Tensor]:
        """The stored images, class by class in class order, oldest first within a class."""
        return [image for per_class in self.images for image in per_class]


@register_method("sotta")
class SoTTA(MemoryReplayTTA):
    protocol = ADAPT_THEN_PREDICT
    config_defaults = {"SOTTA": {
        "CAPACITY": Option(64, within="[1, inf)"),          # --capacity: images the memory holds
        # --high_threshold: an image enters the memory when max softmax(OOD_LOGIT_SCALE * cos) >= this.
        "HIGH_THRESHOLD": Option(0.5, within="[0, 1]"),
        # --ood_logit_scale: scale of the cosines in that confidence (CLIPTTA: 1.0, the raw cosines).
        "OOD_LOGIT_SCALE": Option(1.0, within="(0, inf)"),
        # --logit_scale: scale of the cosines in the entropy loss and the reported logits.
        "LOGIT_SCALE": Option(100.0, within="(0, inf)"),
        # What the entropy is taken on: "first_image" (CLIPTTA's code: the first stored image alone) or
        # "memory_batch" (the whole memory as one batch, the official SoTTA).
        "LOSS_ON": Option("first_image", choices=LOSS_SETS),
        "USE_SAM": False,                                    # --use_sam: SAM around the base optimizer
        "RHO": Option(0.05, within="[0, inf)"),             # SAM radius (CLIPTTA's SAM default; never passed)
        "ADAM_EPS": Option(1e-6, within="(0, inf)"),        # abstract_model.setup_optimizer: Adam(..., eps=1e-6)
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if cfg.MODEL.RESET_AFTER_NUM_UPDATES != 0:
            raise ConfigError(f"sotta: MODEL.RESET_AFTER_NUM_UPDATES must be 0 (got "
                              f"{cfg.MODEL.RESET_AFTER_NUM_UPDATES}); a reset between a batch's steps would empty "
                              f"the memory that only the batch's first step fills")

    def __init__(self, cfg, model, num_classes: int):
        super().__init__(cfg, model, num_classes)
        node = cfg.SOTTA
        self.logit_scale = float(node.LOGIT_SCALE)
        self.ood_logit_scale = float(node.OOD_LOGIT_SCALE)
        self.loss_on = node.LOSS_ON
        self.use_sam, self.rho = bool(node.USE_SAM), float(node.RHO)
        self.adam_eps = float(node.ADAM_EPS)        # the optimizer (base class) reads it
        self.memory = HighConfidenceUniformMemory(node.CAPACITY, num_classes, node.HIGH_THRESHOLD, cfg.RNG_SEED)
        self.step_on_batch = 0      # steps taken on the current batch (the memory takes the batch at step 0)
        if self.use_sam and cfg.MIXED_PRECISION:
            logger.warning("sotta with SOTTA.USE_SAM runs in fp32 (two gradient evaluations per step, no "
                           "GradScaler); MIXED_PRECISION is ignored")

    def cost_info(self) -> dict:
        forwards = 2 if self.use_sam else 1
        return {"views_per_image": 1, "steps_per_batch": self.steps, "memory_capacity": self.memory.capacity,
                "loss_on": self.loss_on, "forward_passes_per_step": forwards, "backward_passes_per_step": forwards}

    def reset_extra_state(self) -> None:
        self.memory.clear()
        self.step_on_batch = 0

    # ------------------------------------------------------------------ adaptation
    @torch.no_grad()
    def remember(self, x: torch.Tensor) -> None:
        cosines = self.cosines(x)
        labels = cosines.max(1).indices
        confidences = (cosines * self.ood_logit_scale).softmax(dim=-1).max(dim=1).values
        for i in range(x.shape[0]):
            self.memory.add(x[i].unsqueeze(0), int(labels[i]), float(confidences[i]))

    def memory_loss(self, stored: list[torch.Tensor]) -> torch.Tensor:
        images = stored[0] if self.loss_on == "first_image" else torch.cat(stored)
        return shifted_softmax_entropy(self.logit_scale * self.cosines(images)).mean(0)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> None:
        if self.step_on_batch == 0:
            self.remember(x)
        self.step_on_batch += 1
        if len(self.memory) == 0:
            return
        stored = [image.to(x.device) for image in self.memory.stored()]
        if not self.use_sam:
            self.optimizer_step(self.memory_loss(stored))
            return
        sam_optimizer_step(self.optimizer, self.params, self.rho, lambda: self.memory_loss(stored))

    @torch.no_grad()
    def episode_logits(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """The batch classified by the adapted model: LOGIT_SCALE * cos (CLIPTTA's softmax(100 * cos))."""
        self.step_on_batch = 0
        return self.logit_scale * self.cosines(x)
