"""DeYO, destruction-based filtering and reweighting of entropy minimisation (Lee et al., "Entropy is not Enough for
Test-Time Adaptation: From the Perspective of Disentangled Factors", ICLR 2024) on CLIP, as the anchor suite's
classification/methods/deyo.py (mariodoebler/test-time-adaptation, built on Jhyun17/DeYO).

Per batch (one step, the logits of the first forward reported):
1. forward; entropy H_i of every sample; keep those with H_i < DEYO.MARGIN * ln(C);
2. destroy the object of the kept images x' (DEYO.AUG_TYPE): shuffle PATCH_LEN x PATCH_LEN patches, shuffle the
   pixels, or fill a square with each channel's image mean; forward x' without gradient;
3. PLPD_i = p_i(y_i) - p'_i(y_i), y_i = argmax p_i (p, p' the softmax of x and x'); keep PLPD_i > DEYO.PLPD;
4. loss = mean_i H_i * (REWEIGHT_ENT / exp(H_i - E0) + REWEIGHT_PLPD / exp(-PLPD_i)), the weights without
   gradient, E0 = DEYO.MARGIN_E0 * ln(C) (the anchor reads EATA.MARGIN_E0); one optimizer step, none when no
   sample is left.

Adapted: the affine parameters of the image tower's norm layers except those whose module name contains
``layer4``, ``blocks.9``, ``blocks.10``, ``blocks.11`` or ``norm.`` (the reference's name rule); every BatchNorm2d
of the tower normalises with the batch's statistics, the frozen ones too (the reference's configure_model).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from conf.errors import ConfigError
from conf.options import Option
from methods.frames import NormAffineTTA, configure_norm_adaptation, use_batch_statistics
from methods.losses import softmax_entropy
from methods.registry import register_method

AUG_TYPES = ("occ", "patch", "pixel")
# The reference's collect_params skips a module whose name contains one of these (layer4 of a ResNet, blocks 9-11
# of a ViT-Base: open_clip's "resblocks.9" contains "blocks.9"), or is exactly "norm" (timm's final norm).
FROZEN_NAME_PARTS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")
FROZEN_NAMES = ("norm",)
REFERENCE_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
# The anchor suite's default of EATA.MARGIN_E0, which its DeYO reads as the reweighting margin.
ANCHOR_EATA_MARGIN_E0 = 0.4


def adapted_by_reference(module_name: str) -> bool:
    """Whether the reference's name rule lets a norm layer of this (full) module name adapt."""
    return module_name not in FROZEN_NAMES and not any(part in module_name for part in FROZEN_NAME_PARTS)


def occlude(images: torch.Tensor, size: int, row: int, column: int) -> torch.Tensor:
    """A size x size square at (row, column) filled with each image's per-channel mean (in place, on a copy)."""
    mean = images.reshape(images.shape[0], images.shape[1], -1).mean(dim=2)
    window = mean[:, :, None, None].expand(-1, -1, size, size)
    images[:, :, row:row + size, column:column + size] = window
    return images


def shuffle_patches(images: torch.Tensor, patch_len: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's patch shuffle: resize (torchvision Resize, bilinear, antialiased; skipped when the size does
    not change) to the width rounded down to a multiple of patch_len, square; cut patch_len x patch_len patches;
    permute each image's patches by the argsort of uniform draws (B, patch_len**2); reassemble; resize back to the
    input width, square. The reference's sizes come from the width only."""
    width = images.shape[-1]
    inner = (width // patch_len) * patch_len
    out = tvf.resize(images, [inner, inner], interpolation=InterpolationMode.BILINEAR, antialias=True)
    b, c, h, w = out.shape[0], out.shape[1], inner // patch_len, inner // patch_len
    patches = out.reshape(b, c, patch_len, h, patch_len, w).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c, h, w)
    order = torch.argsort(torch.rand(b, patch_len * patch_len, generator=generator, dtype=torch.float32), dim=-1)
    patches = patches[torch.arange(b)[:, None], order.to(images.device)]
    out = patches.reshape(b, patch_len, patch_len, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, inner, inner)
    return tvf.resize(out, [width, width], interpolation=InterpolationMode.BILINEAR, antialias=True)


def shuffle_pixels(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One permutation of the H * W pixel positions, shared by every image and channel (the reference's)."""
    b, c, width = images.shape[0], images.shape[1], images.shape[-1]
    flat = images.reshape(b, c, -1)
    order = torch.randperm(flat.shape[-1], generator=generator).to(images.device)
    return flat[:, :, order].reshape(b, c, width, width)


@register_method("deyo")
class DeYO(NormAffineTTA):
    config_defaults = {"DEYO": {
        # Reweight each entropy by 1 / exp(H - E0) (summed with the PLPD weight).
        "REWEIGHT_ENT": True,
        # Reweight each entropy by 1 / exp(-PLPD).
        "REWEIGHT_PLPD": True,
        # PLPD threshold: a sample enters the loss only if p(y) - p'(y) > PLPD.
        "PLPD": 0.2,
        # Entropy filter: a sample is kept only if H < MARGIN * ln(C).
        "MARGIN": Option(0.5, within="[0, inf)"),
        # E0 of the entropy weight, as a factor of ln(C). The anchor suite reads EATA.MARGIN_E0 (default 0.4), the
        # authors' code its own --deyo_margin_e0 (0.4); here one node belongs to one method, so it is DeYO's.
        "MARGIN_E0": Option(0.4, within="[0, inf)"),
        # The object-destructive transformation: patch shuffle, pixel shuffle or occlusion.
        "AUG_TYPE": Option("patch", choices=AUG_TYPES),
        # occ: side of the square, and its top-left corner (row, column), in pixels of the model's input.
        "OCCLUSION_SIZE": Option(112, within="[1, inf)"),
        "ROW_START": Option(56, within="[0, inf)"),
        "COLUMN_START": Option(56, within="[0, inf)"),
        # patch: patches per row and per column.
        "PATCH_LEN": Option(4, within="[1, inf)"),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        d, size = cfg.DEYO, model_spec.image_size
        if d.AUG_TYPE == "occ" and max(d.ROW_START, d.COLUMN_START) + d.OCCLUSION_SIZE > size:
            raise ConfigError(f"DEYO.AUG_TYPE occ: the {d.OCCLUSION_SIZE}-pixel square at DEYO.ROW_START "
                              f"{d.ROW_START}, DEYO.COLUMN_START {d.COLUMN_START} must lie within the {size} x {size} "
                              f"input of MODEL.ARCH={cfg.MODEL.ARCH} (the reference fails on a shape mismatch)")
        if d.AUG_TYPE == "patch" and d.PATCH_LEN > size:
            raise ConfigError(f"DEYO.PATCH_LEN={d.PATCH_LEN} must be at most the input size {size} of "
                              f"MODEL.ARCH={cfg.MODEL.ARCH}")
        eata = cfg.get("EATA")
        if eata is not None and "MARGIN_E0" in eata and eata.MARGIN_E0 != ANCHOR_EATA_MARGIN_E0 \
                and eata.MARGIN_E0 != d.MARGIN_E0:
            raise ConfigError(f"EATA.MARGIN_E0={eata.MARGIN_E0} is DeYO's reweighting margin in the anchor suite; "
                              f"here it is DEYO.MARGIN_E0 (now {d.MARGIN_E0}): set DEYO.MARGIN_E0 {eata.MARGIN_E0}")

    def __init__(self, cfg, model: nn.Module, num_classes: int):
        super().__init__(cfg, model, num_classes)
        d = cfg.DEYO
        self.reweight_ent = bool(d.REWEIGHT_ENT)
        self.reweight_plpd = bool(d.REWEIGHT_PLPD)
        self.plpd_threshold = float(d.PLPD)
        self.deyo_margin = float(d.MARGIN) * math.log(num_classes)
        self.margin_e0 = float(d.MARGIN_E0) * math.log(num_classes)
        self.aug_type = d.AUG_TYPE
        self.occlusion = (int(d.OCCLUSION_SIZE), int(d.ROW_START), int(d.COLUMN_START))
        self.patch_len = int(d.PATCH_LEN)
        # The reference draws the shuffles from torch's global CPU generator; ours has its own, seeded by
        # RNG_SEED, so that a run's draws do not depend on what else used the global one. reset() restarts it.
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(cfg.RNG_SEED))
        self._initial_generator_state = self.generator.get_state()

    # ------------------------------------------------------------------ parameters
    def adapted_norm_layers(self) -> list[nn.Module]:
        return [m for name, m in self.model.clip.visual.named_modules(prefix="clip.visual")
                if isinstance(m, REFERENCE_NORM_LAYERS) and adapted_by_reference(name)]

    def configure_model(self) -> None:
        configure_norm_adaptation(self.model, self.adapted_norm_layers())
        for module in self.model.clip.visual.modules():
            if isinstance(module, nn.BatchNorm2d):   # the frozen ones (layer4) too, as the reference
                use_batch_statistics(module)

    # ------------------------------------------------------------------ the step
    def destroy_objects(self, images: torch.Tensor) -> torch.Tensor:
        """x' of DEYO.AUG_TYPE, from a detached copy of the kept images."""
        if self.aug_type == "occ":
            return occlude(images, *self.occlusion)
        if self.aug_type == "patch":
            return shuffle_patches(images, self.patch_len, self.generator)
        return shuffle_pixels(images, self.generator)

    def deyo_loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """The reweighted mean entropy of the samples both filters keep; None when none is left."""
        entropy = softmax_entropy(logits)
        kept = torch.where(entropy < self.deyo_margin)
        entropy = entropy[kept]
        if len(entropy) == 0:
            return None
        destroyed = self.destroy_objects(x[kept].detach())
        with torch.no_grad():
            logits_destroyed = self.model(destroyed)
        prob = logits[kept].softmax(1)
        prob_destroyed = logits_destroyed.softmax(1)
        label = prob.argmax(dim=1).reshape(-1, 1)
        plpd = (torch.gather(prob, 1, label) - torch.gather(prob_destroyed, 1, label)).reshape(-1)
        kept = torch.where(plpd > self.plpd_threshold)
        entropy = entropy[kept]
        if len(entropy) == 0:
            return None
        plpd = plpd[kept]
        if self.reweight_ent or self.reweight_plpd:
            weight = (float(self.reweight_ent) * (1. / torch.exp(entropy.clone().detach() - self.margin_e0))
                      + float(self.reweight_plpd) * (1. / torch.exp(-1. * plpd.clone().detach())))
            entropy = entropy.mul(weight)
        return entropy.mean(0)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():   # the reference's loss_calculation runs whole under autocast
            logits = self.model(x)
            loss = self.deyo_loss(x, logits)
        if loss is not None:    # no step when every sample was filtered out
            self.optimizer_step(loss)
        return logits.detach().float()

    # ------------------------------------------------------------------ state
    def reset_episode(self) -> None:
        """MODEL.EPISODIC and RESET_AFTER_NUM_UPDATES: model and optimizer back, the shuffle stream goes on (the
        reference's reset leaves the global generator alone)."""
        self._restore_snapshot()

    def reset_extra_state(self) -> None:
        self.generator.set_state(self._initial_generator_state)

    def cost_info(self) -> dict:
        """Per batch: the forward of the batch, a forward of the entropy-filtered images' destroyed copies, and
        one backward pass when a sample passes both filters."""
        return {"views_per_image": 1, "forward_passes_per_batch": 2 * self.steps,
                "backward_passes_per_batch": self.steps}
