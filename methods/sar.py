"""SAR, sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023; code mr-eggplant/SAR) on CLIP.

Per batch (as the original's forward_and_adapt_sar):
1. forward; reliable samples are those with entropy < SAR.MARGIN_E0 * ln(C); loss = their mean entropy;
2. SAM ascent: w -> w + rho * g / (||g|| + 1e-12), g the gradient of that loss (rho = SAR.RHO);
3. forward the batch again at the perturbed weights; of the step-1 reliable samples, keep those whose
   entropy is still below the margin; their mean entropy is the second loss;
4. gradient of the second loss at the perturbed weights, back to w, one step of the base optimizer (OPTIM);
5. moving average of the second loss, ema = 0.9 * ema + 0.1 * loss; when ema < SAR.RESET_CONSTANT_EM the
   model is recovered (reset to the source state).
The predictions are the logits of the first forward.

Adapted: the image tower's norm affine parameters except those of the deepest residual blocks and the final
norm, as the original does for ViT-Base (it skips blocks 9-11 and ``norm``).
"""
from __future__ import annotations

import contextlib

import logging
import math

import torch
import torch.nn as nn

from conf.errors import ConfigError
from conf.options import Option
from methods.frames import NormAffineTTA, sam_ascent, sam_restore
from methods.losses import softmax_entropy
from methods.registry import register_method

logger = logging.getLogger(__name__)

EMA_DECAY = 0.9   # the original's update_ema: 0.9 * ema + (1 - 0.9) * loss
AUTHORS_TRANSFORMER_LR = 0.001


def authors_sgd(cfg) -> dict:
    """The SGD arguments of the authors' SAR.setup_optimizer: lr 0.001 when the architecture's name, lower-cased
    with "-" as "_", contains "vit_" or "swin_" (ViT-B-16 does), else OPTIM.LR; momentum OPTIM.MOMENTUM; torch's
    defaults for the rest (no Nesterov, dampening 0, weight decay 0)."""
    name = cfg.MODEL.ARCH.lower().replace("-", "_")
    transformer = "vit_" in name or "swin_" in name
    return {"lr": AUTHORS_TRANSFORMER_LR if transformer else float(cfg.OPTIM.LR), "momentum": float(cfg.OPTIM.MOMENTUM)}


@register_method("sar")
class SAR(NormAffineTTA):
    config_defaults = {"SAR": {
        # Reliable-sample margin E_0 as a factor of ln(C): a sample is used when its entropy < MARGIN_E0 * ln(C).
        "MARGIN_E0": Option(0.4, within="[0, inf)"),
        # Model recovery threshold e_m on the moving average of the second (perturbed) loss.
        "RESET_CONSTANT_EM": 0.2,
        # SAM neighbourhood radius rho.
        "RHO": Option(0.05, within="[0, inf)"),
        # Norm layers of this many deepest residual blocks of the ViT image tower stay frozen (original: blocks
        # 9-11 of ViT-Base, i.e. 3 of 12). 0 adapts every block.
        "EXCLUDED_DEEPEST_BLOCKS": Option(3, within="[0, inf)"),
        # Keep the final norm of the image tower (open_clip: visual.ln_post; timm: norm) frozen, as the original.
        # (The BATCLIP authors' CLIP port adapts ln_post: its name test 'norm.' does not match 'ln_post'.)
        "EXCLUDE_FINAL_NORM": True,
        # After a recovery the original's SAR.forward re-assigns the old EMA (self.ema = ema after reset()), so
        # the low average survives the reset; the anchor suite clears it. False = cleared (anchor suite).
        "KEEP_EMA_AFTER_RECOVERY": False,
        # The base optimizer of SAM. "authors": as the authors' SAR.setup_optimizer (both suites), whatever
        # OPTIM.METHOD says: SGD with momentum OPTIM.MOMENTUM and no Nesterov, dampening or weight decay, at
        # learning rate 0.001 for ViT and Swin architectures (the SAR paper's for transformers) and OPTIM.LR
        # otherwise. "config": the optimizer OPTIM describes.
        "OPTIMIZER": Option("authors", choices=("authors", "config")),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if "EATA" in cfg and cfg.EATA.MARGIN_E0 != 0.4:      # the anchor's SAR reads EATA.MARGIN_E0 (default 0.4)
            raise ConfigError(f"EATA.MARGIN_E0 {cfg.EATA.MARGIN_E0}: the anchor suite's SAR reads its margin there; "
                              f"this suite's SAR reads SAR.MARGIN_E0 (set that instead)")
        depth = cfg.SAR.EXCLUDED_DEEPEST_BLOCKS
        if depth > 0 and model_spec.image_tower != "vit":
            raise ConfigError(f"SAR.EXCLUDED_DEEPEST_BLOCKS={depth} needs a ViT image tower with residual blocks; "
                              f"MODEL.ARCH={cfg.MODEL.ARCH} has a {model_spec.image_tower} tower (set it to 0)")
        if depth > (model_spec.vision_layers or 0):
            raise ConfigError(f"SAR.EXCLUDED_DEEPEST_BLOCKS={depth} exceeds the {model_spec.vision_layers} blocks "
                              f"of MODEL.ARCH={cfg.MODEL.ARCH}")

    def __init__(self, cfg, model: nn.Module, num_classes: int):
        super().__init__(cfg, model, num_classes)
        s = cfg.SAR
        self.margin = float(s.MARGIN_E0) * math.log(num_classes)
        self.rho = float(s.RHO)
        self.reset_constant_em = float(s.RESET_CONSTANT_EM)
        self.keep_ema_after_recovery = bool(s.KEEP_EMA_AFTER_RECOVERY)
        self.ema: float | None = None
        self.num_recoveries = 0   # diagnostics only (not method state)
        if cfg.MIXED_PRECISION:
            logger.warning("SAR runs in fp32 (as the original and the anchor suite); MIXED_PRECISION is ignored")

    # ------------------------------------------------------------------ parameters
    def adapted_norm_layers(self) -> list[nn.Module]:
        visual = self.model.clip.visual
        excluded: set[int] = set()
        depth = self.cfg.SAR.EXCLUDED_DEEPEST_BLOCKS
        if depth > 0:   # check_setup made sure the tower has at least ``depth`` residual blocks
            blocks = visual.transformer.resblocks
            for block in list(blocks)[len(blocks) - depth:]:
                excluded.update(id(m) for m in block.modules())
        if self.cfg.SAR.EXCLUDE_FINAL_NORM:
            final = getattr(visual, "ln_post", None)
            if final is not None:
                excluded.add(id(final))
        return [m for m in super().adapted_norm_layers() if id(m) not in excluded]

    @classmethod
    def config_warnings(cls, cfg) -> list[str]:
        if cfg.SAR.OPTIMIZER != "authors":
            return []
        sgd = authors_sgd(cfg)
        o = cfg.OPTIM
        unused = [f"OPTIM.{key} {value}" for key, value, used in (
            ("METHOD", o.METHOD, o.METHOD == "SGD"), ("LR", o.LR, o.LR == sgd["lr"]),
            ("NESTEROV", o.NESTEROV, not o.NESTEROV), ("WD", o.WD, o.WD == 0), ("DAMPENING", o.DAMPENING,
                                                                                     o.DAMPENING == 0)) if not used]
        if not unused:
            return []
        return [f"SAR runs SAM over SGD(lr={sgd['lr']}, momentum={sgd['momentum']}), as the authors' suite does for "
                f"MODEL.ARCH {cfg.MODEL.ARCH}: {', '.join(unused)} not used (SAR.OPTIMIZER config uses them)"]

    def setup_optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.SAR.OPTIMIZER == "config":
            return super().setup_optimizer()
        return torch.optim.SGD(self.params, **authors_sgd(self.cfg))

    def setup_scaler(self):
        return None   # SAM's two gradient evaluations run in fp32

    def autocast(self):
        return contextlib.nullcontext()   # fp32 always (see __init__), also for what precision_info reports

    # ------------------------------------------------------------------ the step
    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        outputs = logits.detach().float()
        entropy = softmax_entropy(logits.float())
        reliable = entropy < self.margin
        if not bool(reliable.any()):
            # Nothing reliable: no gradient, no perturbation, no step. (The original would still call the base
            # optimizer on a zero gradient, which with momentum moves the weights; we do not update.)
            return outputs
        self.optimizer.zero_grad(set_to_none=True)
        entropy[reliable].mean(0).backward()
        originals = sam_ascent(self.params, self.rho, missing_grad_as_zero=True)

        entropy_perturbed = softmax_entropy(self.model(x).float())[reliable]
        still_reliable = entropy_perturbed < self.margin
        if not bool(still_reliable.any()):
            # Nothing reliable at w + e: back to w, no step, the moving average unchanged (the original skips
            # the EMA on a NaN loss and would step on a zero gradient, see above).
            sam_restore(originals)
            self.optimizer.zero_grad(set_to_none=True)
            return outputs
        loss = entropy_perturbed[still_reliable].mean(0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sam_restore(originals)          # the gradient taken at w + e updates w
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        value = float(loss.item())
        self.ema = value if self.ema is None else EMA_DECAY * self.ema + (1.0 - EMA_DECAY) * value
        if self.ema < self.reset_constant_em:
            logger.info("SAR: loss moving average %.4f < %.4f, recovering the model", self.ema,
                        self.reset_constant_em)
            ema = self.ema
            self.reset()
            self.num_recoveries += 1
            if self.keep_ema_after_recovery:
                self.ema = ema
        return outputs

    def reset_extra_state(self) -> None:
        self.ema = None
