"""BatchNorm statistics at test time, shared by the anchor suite's BatchNorm methods (bntest, bnalpha, bnema:
methods/norm.py) and by MEMO and TTAug, which run on a model whose BatchNorm layers are ``AlphaBatchNorm``.

- ``AlphaBatchNorm``: a BatchNorm2d that normalises with (1 - alpha) * source statistics + alpha * the statistics
  of the batch it is given (the anchor suite's methods/bn.py AlphaBatchNorm, after Schneider et al. 2020);
- ``replace_batchnorms``: every BatchNorm2d of a module replaced by an AlphaBatchNorm around it;
- ``AlphaBatchNormTTA``: the frame that declares the ``BN`` node (BN.ALPHA) for the methods that read it;
- ``require_batchnorm_tower``: the one-line refusal of an image tower without BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import TTAMethod

BN_ALPHA_DEFAULT = 0.1   # the anchor suite's conf.py: _C.BN.ALPHA = 0.1


class AlphaBatchNorm(nn.Module):
    """Wraps a BatchNorm2d ``layer`` (kept, with its source statistics and affine parameters, as ``layer``):
    y = batch_norm(x, (1 - alpha) * mu_source + alpha * mu_batch, (1 - alpha) * var_source + alpha * var_batch),
    with the layer's weight, bias and eps. The batch variance is the unbiased one (the reference takes both batch
    statistics from the running buffers of a momentum-1 BatchNorm in train mode, which stores the unbiased
    variance). The result does not depend on the module's train/eval mode, as in the reference, where the inner
    BatchNorm is created in train mode and never switched. The reference's inner BatchNorm keeps the last batch's
    statistics in buffers that nothing reads before they are overwritten; they are not kept here."""

    def __init__(self, layer: nn.BatchNorm2d, alpha: float):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"BN.ALPHA must be in [0, 1], got {alpha}")
        self.layer = layer
        self.layer.eval()
        self.alpha = float(alpha)

    @torch.no_grad()
    def batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance per channel over (N, H, W), in at least fp32 (as BatchNorm's kernels), without
        gradient: the reference reads them from buffers that its inner BatchNorm updates in place."""
        if x.shape[0] * x.shape[2] * x.shape[3] < 2:
            # torch's BatchNorm in train mode (the reference's inner one) refuses this too
            raise ValueError(f"AlphaBatchNorm needs more than 1 value per channel for batch statistics, got input "
                             f"of shape {tuple(x.shape)}")
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(compute, dim=(0, 2, 3), correction=1)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.batch_statistics(x)
        layer = self.layer
        mixed_mean = (1 - self.alpha) * layer.running_mean + self.alpha * mean.to(layer.running_mean.dtype)
        mixed_var = (1 - self.alpha) * layer.running_var + self.alpha * var.to(layer.running_var.dtype)
        return F.batch_norm(x, mixed_mean, mixed_var, layer.weight, layer.bias, False, 0.0, layer.eps)


def replace_batchnorms(root: nn.Module, alpha: float) -> int:
    """Replace every BatchNorm2d under ``root`` by an AlphaBatchNorm around it (as the reference's
    AlphaBatchNorm.adapt_model); returns how many were replaced (0 on a ViT image tower)."""
    replaced = 0
    for name, child in list(root.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(root, name, AlphaBatchNorm(child, alpha))
            replaced += 1
        elif not isinstance(child, AlphaBatchNorm):
            replaced += replace_batchnorms(child, alpha)
    return replaced


def batchnorm_layers(root: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, layer) of every BatchNorm2d under ``root``."""
    return [(name, m) for name, m in root.named_modules() if isinstance(m, nn.BatchNorm2d)]


def require_batchnorm_tower(method_name: str, cfg, model_spec) -> None:
    """Refuse, in one line, an image tower without BatchNorm layers (open_clip's ViTs, timm towers)."""
    if not model_spec.image_tower_has_batchnorm:
        raise ConfigError(f"{method_name} adapts BatchNorm statistics and needs a CLIP with a ResNet image tower "
                          f"(BatchNorm; e.g. MODEL.ARCH RN50); MODEL.ARCH={cfg.MODEL.ARCH} has a "
                          f"{model_spec.image_tower} tower without BatchNorm")


class AlphaBatchNormTTA(TTAMethod):
    """The frame of the methods that run the model with AlphaBatchNorm layers (bnalpha, MEMO, TTAug): declares
    BN.ALPHA and replaces the image tower's BatchNorm2d layers (``use_alpha_batchnorm``, called by the method's
    ``configure_model``)."""
    config_defaults = {"BN": {
        # alpha of (1 - alpha) * source statistics + alpha * test-batch statistics (the anchor suite's BN.ALPHA).
        "ALPHA": Option(BN_ALPHA_DEFAULT, within="[0, 1]"),
    }}

    def use_alpha_batchnorm(self) -> int:
        return replace_batchnorms(self.model.clip.visual, self.cfg.BN.ALPHA)
