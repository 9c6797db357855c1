"""BATCLIP (Maharana et al., ICCV 2025): bimodal online test-time adaptation of CLIP.

Per batch: one forward pass of both towers (the text tower is re-run with gradient, because its
LayerNorms adapt), the loss  L = L_ent - L_pm - L_sp  on that pass, one optimizer step on the affine
parameters of every normalisation layer of both towers. The logits reported for the batch are those of
the forward pass before the update.

Defaults follow the authors' code (sarthaxxxxx/BATCLIP: methods/ours.py, utils/losses.py), which is what
produced the paper's tables; where it differs from the paper's formulas a BATCLIP.* key selects the
variant (see ``config_defaults`` and docs/batclip.md). The loss is vectorised: one one-hot matmul builds the
prototypes of the classes present in the batch, and only those enter the K x K similarity matrix.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import TTAMethod
from methods.frames import configure_norm_adaptation
from methods.losses import softmax_entropy
from methods.registry import register_method

logger = logging.getLogger(__name__)

PROJECTION_NORMS = ("present", "all")
SEPARATION_REDUCTIONS = ("sum", "mean")
PROTOTYPE_FEATURES = ("unnormalised", "normalised")


@dataclass(frozen=True)
class BatclipLossOptions:
    """The loss variants; the defaults are the authors' code."""
    entropy_weight: float = 1.0
    projection_weight: float = 1.0
    separation_weight: float = 1.0
    projection_norm: str = "present"        # 1/|K| (code) or "all": 1/C (paper's formula)
    separation_reduction: str = "sum"       # sum over ordered pairs (code) or "mean" over them
    prototypes: str = "unnormalised"        # mean of encode_image outputs (code) or of L2-normalised ones

    def __post_init__(self):
        for key, value, allowed in (("BATCLIP.PROJECTION_NORM", self.projection_norm, PROJECTION_NORMS),
                                    ("BATCLIP.SEPARATION_REDUCTION", self.separation_reduction,
                                     SEPARATION_REDUCTIONS),
                                    ("BATCLIP.PROTOTYPES", self.prototypes, PROTOTYPE_FEATURES)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")

    @classmethod
    def from_cfg(cls, node) -> "BatclipLossOptions":
        return cls(entropy_weight=float(node.ENTROPY_WEIGHT), projection_weight=float(node.PROJECTION_WEIGHT),
                   separation_weight=float(node.SEPARATION_WEIGHT), projection_norm=node.PROJECTION_NORM,
                   separation_reduction=node.SEPARATION_REDUCTION, prototypes=node.PROTOTYPES)


class BatclipLoss(NamedTuple):
    total: torch.Tensor        # ENTROPY_WEIGHT * entropy - PROJECTION_WEIGHT * projection - SEPARATION_WEIGHT * sep.
    entropy: torch.Tensor      # L_ent: mean per-sample entropy of softmax(logits)
    projection: torch.Tensor   # L_pm: prototype . normalised text feature, averaged as PROJECTION_NORM says
    separation: torch.Tensor   # L_sp: 1 - cos between distinct prototypes, reduced as SEPARATION_REDUCTION says
    present: torch.Tensor      # (K,) sorted pseudo-label classes present in the batch


def batclip_loss(logits: torch.Tensor, image_pre_features: torch.Tensor, text_features: torch.Tensor,
                 options: BatclipLossOptions | None = None) -> BatclipLoss:
    """BATCLIP's loss on one batch.

    logits (B, C) of the current forward pass; image_pre_features (B, D) encode_image outputs before L2
    normalisation; text_features (C, D) L2-normalised class text features (with gradient when the text
    tower adapts). Computed in at least fp32 whatever the input dtype (autocast yields fp16 inputs)."""
    options = options or BatclipLossOptions()
    if logits.ndim != 2 or image_pre_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(f"batclip_loss expects logits (B, C), image_pre_features (B, D), text_features (C, D); "
                         f"got {tuple(logits.shape)}, {tuple(image_pre_features.shape)}, "
                         f"{tuple(text_features.shape)}")
    (batch, num_classes), dim = logits.shape, text_features.shape[1]
    if image_pre_features.shape != (batch, dim) or text_features.shape[0] != num_classes:
        raise ValueError(f"batclip_loss: shapes do not agree: logits {tuple(logits.shape)}, image_pre_features "
                         f"{tuple(image_pre_features.shape)} (expected ({batch}, {dim})), text_features "
                         f"{tuple(text_features.shape)} (expected ({num_classes}, {dim}))")
    if batch == 0:
        raise ValueError("batclip_loss: empty batch (B = 0)")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits, features, text = logits.to(dtype), image_pre_features.to(dtype), text_features.to(dtype)

    entropy = softmax_entropy(logits).mean()

    # Hard pseudo-labels; argmax carries no gradient. K = the classes that occur (sorted, as torch.unique).
    labels = logits.detach().argmax(dim=1)
    present, slot = torch.unique(labels, sorted=True, return_inverse=True)
    k = present.numel()
    if options.prototypes == "normalised":
        features = F.normalize(features, dim=1)
    # Prototype of each present class = mean of its features: a (B x K) one-hot matmul (deterministic on
    # CUDA, unlike index_add's atomics).
    members = F.one_hot(slot, k).to(dtype)
    prototypes = (members.t() @ features) / members.sum(dim=0).unsqueeze(1)

    # L_pm: prototype . z_hat_c for the present classes.
    projection = (prototypes * text.index_select(0, present)).sum()
    projection = projection / (k if options.projection_norm == "present" else num_classes)

    # L_sp: sum over ordered pairs c != l of (1 - cos(p_c, p_l)); the diagonal is masked out, not subtracted,
    # so it contributes neither value nor gradient (as the reference's fill_diagonal_(0)).
    unit = F.normalize(prototypes, dim=1)
    dissimilarity = 1.0 - unit @ unit.t()
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=dissimilarity.device)
    separation = dissimilarity.masked_fill(~off_diagonal, 0.0).sum()
    if options.separation_reduction == "mean" and k > 1:
        separation = separation / (k * (k - 1))

    total = (options.entropy_weight * entropy - options.projection_weight * projection
             - options.separation_weight * separation)
    return BatclipLoss(total, entropy, projection, separation, present)


class PrecisionPlan(NamedTuple):
    autocast_dtype: torch.dtype | None   # None: run in the weights' precision (fp32)
    grad_scaler: bool


def precision_plan(device_type: str, use_autocast: bool) -> PrecisionPlan:
    """The authors always run the BATCLIP step under CUDA fp16 autocast with a GradScaler (weights stay
    fp32). There is no fp16 autocast on the CPU, so there it runs in fp32 and needs no scaler."""
    if use_autocast and device_type == "cuda":
        return PrecisionPlan(torch.float16, True)
    return PrecisionPlan(None, False)


@register_method("batclip", aliases=("ours",))
class Batclip(TTAMethod):
    config_defaults = {"BATCLIP": {
        # Weights of the three terms in  L = ENTROPY_WEIGHT * L_ent - PROJECTION_WEIGHT * L_pm
        # - SEPARATION_WEIGHT * L_sp  (authors: 1, 1, 1; 0 switches a term off, as in the paper's ablation).
        "ENTROPY_WEIGHT": 1.0,
        "PROJECTION_WEIGHT": 1.0,
        "SEPARATION_WEIGHT": 1.0,
        # L_pm normalisation: "present" divides by |K|, the number of classes among the batch's pseudo-labels
        # (authors' code); "all" divides by C, the number of classes (the paper's formula).
        "PROJECTION_NORM": Option("present", choices=PROJECTION_NORMS),
        # L_sp over the |K|(|K|-1) ordered pairs of present classes: "sum" (authors' code, grows like |K|^2)
        # or "mean" (divided by |K|(|K|-1); 0 when |K| = 1).
        "SEPARATION_REDUCTION": Option("sum", choices=SEPARATION_REDUCTIONS),
        # Features averaged into class prototypes (for L_pm and L_sp): "unnormalised" encode_image outputs
        # (authors' code) or "normalised" L2-normalised image features.
        "PROTOTYPES": Option("unnormalised", choices=PROTOTYPE_FEATURES),
        # On CUDA: run the step under fp16 autocast with a GradScaler, weights fp32 (the authors' code does
        # this always, whatever MIXED_PRECISION says). Ignored on the CPU (fp32, no scaler).
        "AUTOCAST": True,
        # The GradScaler's initial scale (authors: 1000).
        "GRAD_SCALER_INIT": Option(1000.0, within="(0, inf)"),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        if cfg.CLIP.PRECISION != "fp32":
            raise ConfigError(f"BATCLIP trains the normalisation layers, so it needs fp32 weights: set "
                              f"CLIP.PRECISION fp32 (got {cfg.CLIP.PRECISION}); BATCLIP.AUTOCAST gives fp16 "
                              f"compute on CUDA.")

    def __init__(self, cfg, model, num_classes: int):
        super().__init__(cfg, model, num_classes)
        self.loss_options = BatclipLossOptions.from_cfg(cfg.BATCLIP)
        self.last_loss: BatclipLoss | None = None
        self.precision = precision_plan(self.device.type, cfg.BATCLIP.AUTOCAST)

    def configure_model(self) -> None:
        """Affine parameters of every normalisation layer of both towers (BatchNorm2d, if any, in train mode
        without running statistics). CLIP.FREEZE_TEXT_ENCODER True keeps the text tower frozen (an image-only
        ablation; the authors' code cannot run that way)."""
        if self.cfg.CLIP.FREEZE_TEXT_ENCODER:
            logger.warning("BATCLIP with CLIP.FREEZE_TEXT_ENCODER True: only the image tower adapts (the paper "
                           "adapts both; its configs set FREEZE_TEXT_ENCODER False).")
            configure_norm_adaptation(self.model, self.model.clip.visual.modules())
        else:
            configure_norm_adaptation(self.model)

    def setup_scaler(self):
        if self.precision.grad_scaler:
            return torch.amp.GradScaler("cuda", init_scale=float(self.cfg.BATCLIP.GRAD_SCALER_INIT))
        return None

    def autocast(self):
        if self.precision.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.precision.autocast_dtype)
        return contextlib.nullcontext()

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model(x, return_features=True)   # text features recomputed with gradient
        loss = batclip_loss(out.logits, out.image_pre_features, out.text_features, self.loss_options)
        self.optimizer_step(loss.total)
        self.last_loss = BatclipLoss(*(t.detach() for t in loss))
        return out.logits.detach().float()

    def reset_extra_state(self) -> None:
        self.last_loss = None
