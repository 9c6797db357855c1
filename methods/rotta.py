"""RoTTA, robust test-time adaptation (Yuan et al., CVPR 2023; code BIT-DA/RoTTA) on CLIP.

Per test batch (as the original's forward_and_adapt):
1. the EMA teacher predicts the batch (these logits are reported); its softmax gives each sample a
   pseudo-label and an uncertainty (entropy, with log(p + 1e-6) as the original);
2. sample by sample, the category-balanced memory (CSTU) is offered the sample; after every offer all stored
   items age by one; after every ROTTA.UPDATE_FREQUENCY samples (counted over the stream, so updates can fall
   inside a batch) the student is trained on the whole memory: soft cross-entropy of the student on a strong
   augmentation of each stored image against the teacher on the stored image itself, weighted per item by
   the timeliness weight exp(-a) / (1 + exp(-a)), a = age / capacity; then the teacher moves towards the
   student, teacher = (1 - nu) * teacher + nu * student.

Adapted: the affine parameters of the image tower's LayerNorms. The original's robust BatchNorm (RBN, momentum
ROTTA.ALPHA) replaces BatchNorm layers; CLIP's ViT image towers have none, so nothing is replaced. An image
tower with BatchNorm layers (the CLIP ResNets) is refused with an error rather than run without RBN.

The teacher holds only the adapted parameters (every other weight is shared and frozen, so its EMA would be a
no-op); it runs as the model with those parameters swapped in (torch.func.functional_call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import TTATransforms
from methods.frames import NormAffineTTA
from methods.losses import soft_cross_entropy
from methods.registry import register_method


# ---------------------------------------------------------------------- the memory bank (CSTU)
@dataclass
class MemoryItem:
    data: torch.Tensor
    uncertainty: float
    age: int = 0


class CategoryBalancedMemory:
    """RoTTA's category-balanced sampling with timeliness and uncertainty (CSTU).

    Each class may hold up to ``capacity / num_classes`` items (a float quota: a class grows while it holds
    fewer). Score of an item = lambda_t / (1 + exp(-age / capacity)) + lambda_u * uncertainty / ln(C); higher is
    worse. A new sample with pseudo-label c and score s (age 0):
    - c below quota and memory not full: stored;
    - c below quota and memory full: the worst item of the majority classes (those holding the most items) is
      evicted if its score > s, and the sample stored; otherwise the sample is dropped;
    - c at or above quota: the same with c's own items.
    Ties in the worst score go to the last item scanned (classes in index order, items in insertion order).
    After every offer, stored or not, every stored item (the new one included) ages by one.
    """

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0):
        if capacity < 1 or num_classes < 2:
            raise ValueError(f"memory needs capacity >= 1 and >= 2 classes, got {capacity} and {num_classes}")
        self.capacity = capacity
        self.num_classes = num_classes
        self.per_class = capacity / num_classes
        self.lambda_t = lambda_t
        self.lambda_u = lambda_u
        self.items: list[list[MemoryItem]] = [[] for _ in range(num_classes)]

    def __len__(self) -> int:
        return sum(len(c) for c in self.items)

    def class_counts(self) -> list[int]:
        return [len(c) for c in self.items]

    def score(self, age: int, uncertainty: float) -> float:
        return (self.lambda_t / (1.0 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    def add(self, data: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Offer one sample; returns whether it was stored."""
        stored = self._make_room(label, self.score(0, uncertainty))
        if stored:
            self.items[label].append(MemoryItem(data, uncertainty))
        for class_items in self.items:
            for item in class_items:
                item.age += 1
        return stored

    def _make_room(self, label: int, new_score: float) -> bool:
        if len(self.items[label]) < self.per_class:
            if len(self) < self.capacity:
                return True
            counts = self.class_counts()
            candidates = [c for c, n in enumerate(counts) if n == max(counts)]
        else:
            candidates = [label]
        return self._evict_worst(candidates, new_score)

    def _evict_worst(self, classes: list[int], new_score: float) -> bool:
        worst = None   # (score, class, index)
        for c in classes:
            for index, item in enumerate(self.items[c]):
                s = self.score(item.age, item.uncertainty)
                if worst is None or s >= worst[0]:
                    worst = (s, c, index)
        if worst is None:
            return True
        if worst[0] > new_score:
            self.items[worst[1]].pop(worst[2])
            return True
        return False

    def contents(self) -> tuple[list[torch.Tensor], list[int]]:
        """Stored images and their ages, class by class, in insertion order."""
        data = [item.data for class_items in self.items for item in class_items]
        ages = [item.age for class_items in self.items for item in class_items]
        return data, ages


def timeliness_weights(ages: list[int], capacity: int, device) -> torch.Tensor:
    a = torch.tensor(ages, dtype=torch.float32, device=device) / capacity
    return torch.exp(-a) / (1.0 + torch.exp(-a))


# ---------------------------------------------------------------------- strong augmentation
# ---------------------------------------------------------------------- the method
def _batchnorm_refusal(arch: str, where: str) -> str:
    return (f"RoTTA: MODEL.ARCH={arch} has BatchNorm layers ({where}); RoTTA's robust BatchNorm is not implemented "
            f"in this suite (the paper's CLIP models are ViTs, whose image towers use LayerNorm only)")


@register_method("rotta")
class RoTTA(NormAffineTTA):
    config_defaults = {"ROTTA": {
        "MEMORY_SIZE": Option(64, within="[1, inf)"),         # capacity of the memory bank
        "UPDATE_FREQUENCY": Option(64, within="[1, inf)"),    # train on the memory after every this many samples
        "NU": Option(0.001, within="[0, 1]"),                 # teacher = (1 - NU) * teacher + NU * student
        # Momentum of the robust BatchNorm (RBN). Only BatchNorm layers would use it; CLIP ViTs have none, and
        # BatchNorm image towers are refused, so it has no effect here (kept for the authors' config keys).
        "ALPHA": 0.05,
        "LAMBDA_T": 1.0,            # weight of timeliness in the memory score
        "LAMBDA_U": 1.0,            # weight of uncertainty in the memory score
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if model_spec.image_tower_has_batchnorm:
            raise ConfigError(_batchnorm_refusal(cfg.MODEL.ARCH, "its ResNet image tower"))

    def __init__(self, cfg, model: nn.Module, num_classes: int):
        super().__init__(cfg, model, num_classes)
        self.nu = float(cfg.ROTTA.NU)
        self.update_frequency = int(cfg.ROTTA.UPDATE_FREQUENCY)

    def configure_model(self) -> None:
        # check_setup refuses the CLIP ResNets; a timm image tower is only known once built.
        batch_norms = [n for n, m in self.model.clip.visual.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise ConfigError(_batchnorm_refusal(self.cfg.MODEL.ARCH, batch_norms[0]))
        super().configure_model()

    def setup_state(self) -> None:
        self.teacher_names = list(self.param_names)
        for index, p in enumerate(self.params):
            self.register_buffer(f"teacher_{index}", p.detach().clone())
        self.reset_extra_state()

    def reset_extra_state(self) -> None:
        r = self.cfg.ROTTA
        self.memory = CategoryBalancedMemory(r.MEMORY_SIZE, self.num_classes, r.LAMBDA_T, r.LAMBDA_U)
        # get_tta_transforms (edge padding, blur and noise); the noise from a generator of its own on the images'
        # device, so that the memory's images need not leave the GPU.
        self.strong_augment = TTATransforms(self.cfg.RNG_SEED, noise_seed=self.cfg.RNG_SEED + 1)
        self.num_seen = 0        # test samples offered to the memory since the last reset
        self.num_model_updates = 0

    # ------------------------------------------------------------------ teacher
    def teacher_params(self) -> list[torch.Tensor]:
        return [getattr(self, f"teacher_{i}") for i in range(len(self.teacher_names))]

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        weights = dict(zip(self.teacher_names, self.teacher_params()))
        return torch.func.functional_call(self.model, weights, (images,))

    @torch.no_grad()
    def update_teacher(self) -> None:
        for teacher, student in zip(self.teacher_params(), self.params):
            teacher.copy_((1.0 - self.nu) * teacher + self.nu * student.detach())

    # ------------------------------------------------------------------ adaptation
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.teacher_logits(x).float()
        probs = logits.softmax(1)
        labels = probs.argmax(1).tolist()
        uncertainties = (-(probs * torch.log(probs + 1e-6)).sum(1)).tolist()
        for index in range(x.shape[0]):
            # clone: a view would keep the whole test batch alive while the item stays in memory
            self.memory.add(x[index].detach().clone(), labels[index], uncertainties[index])
            self.num_seen += 1
            if self.num_seen % self.update_frequency == 0:
                self.update_model()
        return logits

    @torch.enable_grad()
    def update_model(self) -> None:
        data, ages = self.memory.contents()
        if not data:
            return
        stored = torch.stack(data)
        augmented = self.strong_augment(stored)
        with self.autocast():
            teacher = self.teacher_logits(stored)
            student = self.model(augmented)
        weights = timeliness_weights(ages, self.memory.capacity, stored.device)
        loss = (soft_cross_entropy(student.float(), teacher.float()) * weights).mean()
        self.optimizer_step(loss)
        self.update_teacher()
        self.num_model_updates += 1
