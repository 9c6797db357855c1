"""CoTTA, continual test-time domain adaptation (Wang et al., CVPR 2022), as the anchor suite's
classification/methods/cotta.py (mariodoebler/test-time-adaptation) runs it on CLIP.

Three models: the student (adapted), its EMA teacher (methods/teachers.py, M_TEACHER.MOMENTUM) and the anchor (the
source weights). Per batch x (the anchor's loss_calculation and forward_and_adapt):
1. the student's logits s = student(x);
2. the anchor's confidence: mean over the batch of max softmax(anchor(x)); below COTTA.AP the teacher's logits are
   the mean of teacher(augment(x)) over TEST.N_AUGMENTATIONS random augmentations (get_tta_transforms of
   augmentations/transforms_cotta.py, drawn once per view for the whole batch), otherwise teacher(x);
3. one optimizer step on mean_b CE(s_b, t_b) = -sum softmax(t) log_softmax(s) (the anchor's CIFAR loss), or its
   symmetric version 0.5 CE(s, t) + 0.5 CE(t, s) (the anchor's loss on every other data set): COTTA.LOSS;
4. the teacher's EMA update, every image-tower parameter (update_all=True);
5. the stochastic restore: every adapted parameter element is set back to its source value where
   torch.rand < COTTA.RST.
The teacher's logits are reported (the anchor returns outputs_ema), hence PREDICT_BEFORE_UPDATE: they are not the
student's forward before the step (docs/cotta.md).

Adapted (the anchor's configure_model and collect_params): every parameter of the image tower named ``weight`` or
``bias`` (convolutions, linear layers, norms); BatchNorm layers use batch statistics. The text features stay
computed once (CLIP.FREEZE_TEXT_ENCODER True, as the anchor's default, which removes the text transformer).

Random numbers (augmentation parameters, noise, restore masks) come, in the anchor's order, from one CPU generator
seeded with RNG_SEED and restarted by reset(), never the global RNG: a run replays them exactly."""
from __future__ import annotations

import torch
import torch.nn as nn

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import TTATransforms
from methods.base import PREDICT_BEFORE_UPDATE
from methods.frames import free_weights_and_biases, trainable_weights_and_biases
from methods.registry import register_method
from methods.teachers import MeanTeacher

# How the student is pulled to the teacher: "auto" as the anchor (cross_entropy when the data set's name contains
# "cifar", symmetric_cross_entropy otherwise), or either one named.
COTTA_LOSSES = ("auto", "cross_entropy", "symmetric_cross_entropy")
def teacher_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Per sample: the anchor's softmax_entropy_cifar, or softmax_entropy_imagenet when ``symmetric``."""
    if symmetric:
        return (-0.5 * (teacher.softmax(1) * student.log_softmax(1)).sum(1)
                - 0.5 * (student.softmax(1) * teacher.log_softmax(1)).sum(1))
    return -(teacher.softmax(1) * student.log_softmax(1)).sum(1)


@register_method("cotta")
class CoTTA(MeanTeacher):
    protocol = PREDICT_BEFORE_UPDATE      # the teacher's (or its augmentation ensemble's) logits are reported
    config_defaults = {"COTTA": {
        # Probability with which every adapted parameter element returns to its source value after each step
        # (anchor: conf.py 0.01; its ImageNet YAMLs 0.001). 0 draws nothing.
        "RST": Option(0.01, within="[0, 1]"),
        # The teacher averages augmented views when the anchor's mean max-probability is below AP (anchor: 0.92;
        # its CIFAR-100 YAML 0.72, ImageNet 0.1).
        "AP": Option(0.92, within="[0, 1]"),
        # The student's loss against the teacher (see COTTA_LOSSES); "auto" is the anchor's choice by data set.
        "LOSS": Option("auto", choices=COTTA_LOSSES),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if not cfg.CLIP.FREEZE_TEXT_ENCODER:
            raise ConfigError("cotta adapts the image tower only (the anchor's CLIP with a frozen text encoder); "
                              "CLIP.FREEZE_TEXT_ENCODER must be True, got False")

    def __init__(self, cfg, model: nn.Module, num_classes: int):
        super().__init__(cfg, model, num_classes)
        self.rst = float(cfg.COTTA.RST)
        self.ap = float(cfg.COTTA.AP)
        self.n_augmentations = int(cfg.TEST.N_AUGMENTATIONS)
        loss = cfg.COTTA.LOSS
        if loss == "auto":
            loss = "cross_entropy" if "cifar" in cfg.CORRUPTION.DATASET else "symmetric_cross_entropy"
        self.symmetric_loss = loss == "symmetric_cross_entropy"

    def configure_model(self) -> None:
        """The anchor's configure_model on the image tower: eval mode, BatchNorm2d on batch statistics (running
        statistics dropped), BatchNorm1d in train mode; its weights and biases adapt (collect_params keeps only
        those, so only they are freed here)."""
        self.model.eval()
        self.model.requires_grad_(False)
        for module in self.model.clip.visual.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
            elif isinstance(module, nn.BatchNorm1d):
                module.train()
        free_weights_and_biases(self.model.clip.visual)

    def collect_params(self) -> tuple[list[nn.Parameter], list[str]]:
        return trainable_weights_and_biases(self.model, self.method_name, self.cfg.MODEL.ARCH)

    def setup_state(self) -> None:
        # The anchor's EMA covers every parameter (update_all=True); only the image tower's enter the logits.
        self.register_teacher(self.model.clip.visual.named_parameters(prefix="clip.visual"))
        self.reset_extra_state()

    def reset_extra_state(self) -> None:
        self.random = torch.Generator().manual_seed(int(self.cfg.RNG_SEED))
        self.augment = TTATransforms(generator=self.random)     # edge padding, blur and noise, as CoTTA's

    @torch.no_grad()
    def anchor_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The source model (the anchor suite's model_anchor): the adapted parameters at their source values."""
        source = {name: self._snapshot["module"][f"model.{name}"] for name in self.param_names}
        return torch.func.functional_call(self.model, source, (images,))

    def loss_and_teacher_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(images)
        anchor_prob = self.anchor_logits(images).softmax(1).max(1)[0]
        if anchor_prob.mean(0) < self.ap:
            views = [self.teacher_logits(self.augment(images)).detach() for _ in range(self.n_augmentations)]
            outputs_ema = torch.stack(views).mean(0)
        else:
            outputs_ema = self.teacher_logits(images)
        return teacher_cross_entropy(outputs, outputs_ema, self.symmetric_loss).mean(0), outputs_ema

    @torch.no_grad()
    def stochastic_restore(self) -> None:
        if self.rst <= 0.0:
            return
        for p, name in zip(self.params, self.param_names):
            mask = (torch.rand(p.shape, generator=self.random) < self.rst).float().to(p.device)
            p.copy_(self._snapshot["module"][f"model.{name}"] * mask + p * (1.0 - mask))

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss, outputs_ema = self.loss_and_teacher_logits(x)
        self.optimizer_step(loss)
        self.update_teacher()
        self.stochastic_restore()
        return outputs_ema.detach().float()

    def cost_info(self) -> dict:
        """Per batch: student, anchor and teacher forwards (the teacher on N_AUGMENTATIONS views when the anchor
        is unsure), one backward pass."""
        return {"views_per_image": self.n_augmentations, "backward_passes_per_image": 1}
