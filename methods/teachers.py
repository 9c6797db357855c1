"""The mean teacher the anchor suite's teacher-student methods share (CoTTA, AdaContrast): the node M_TEACHER
(MOMENTUM, its default 0.999 as the anchor's conf.py) and the exponential moving average of its
utils/misc.py ``ema_update_model``:

    teacher = MOMENTUM * teacher + (1 - MOMENTUM) * student      (nothing moves when MOMENTUM >= 1)

in that order of operations, so that it is bit for bit the anchor's arithmetic.

The teacher holds copies of the parameters it averages, registered on the method as buffers (so ``reset()`` restores
them exactly); every other weight is shared with the student. It predicts as the model with those copies swapped in
(torch.func.functional_call), so no second model is built.
"""
from __future__ import annotations

from typing import Iterable

import torch

from conf.options import Option
from methods.base import TTAMethod


@torch.no_grad()
def ema_update_model(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """The anchor's ema_update_model(update_all=True) on paired tensors, in place."""
    if momentum < 1.0:
        for to_update, to_merge in zip(teacher, student):
            to_update.copy_(momentum * to_update + (1 - momentum) * to_merge.detach().to(to_update.device))


class MeanTeacher(TTAMethod):
    """The frame of a method with an EMA teacher of (some of) the model's parameters: ``register_teacher`` in
    ``setup_state``, ``teacher_logits`` to predict with it, ``update_teacher`` after the student's step."""
    config_defaults = {"M_TEACHER": {
        # teacher = MOMENTUM * teacher + (1 - MOMENTUM) * student after every update (anchor: conf.py 0.999)
        "MOMENTUM": Option(0.999, within="[0, 1]"),
    }}

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.teacher_momentum = float(cfg.M_TEACHER.MOMENTUM)

    def register_teacher(self, named_parameters) -> None:
        """The teacher starts as a copy of these (name relative to ``self.model``, parameter) pairs."""
        self.teacher_names = []
        for index, (name, p) in enumerate(named_parameters):
            self.teacher_names.append(name)
            self.register_buffer(f"teacher_{index}", p.detach().clone())

    def teacher_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f"teacher_{i}") for i in range(len(self.teacher_names))]

    def student_tensors(self) -> list[torch.Tensor]:
        named = dict(self.model.named_parameters())
        return [named[name] for name in self.teacher_names]

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        weights = dict(zip(self.teacher_names, self.teacher_tensors()))
        return torch.func.functional_call(self.model, weights, (images,))

    def update_teacher(self) -> None:
        ema_update_model(self.teacher_tensors(), self.student_tensors(), self.teacher_momentum)
