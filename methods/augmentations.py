"""Test-time views of a batch of images, built on the images' device in one batched operation.

Used by the test-time-augmentation methods (TPT, VTE) and usable by any other: ``AugmentedViews(n_views, ...)``
turns a batch of [0, 1] images (B, C, H, W) into (B, n_views, C, H, W), where view 0 of every image is the
image itself and the other n_views - 1 are random augmentations of it.

Augmentation "crop_flip" is what the TPT authors and the anchor suite (mariodoebler/test-time-adaptation,
``AugMixAugmenter`` with ``use_augmix=False``) apply for ImageNet and the corruption benchmarks: torchvision's
RandomResizedCrop to the input size (scale 0.08-1, aspect ratio 3/4-4/3, bilinear) followed by
RandomHorizontalFlip(0.5). AugMix mixing, which those suites use only for fine-grained data sets, is not
implemented. Crop boxes are drawn exactly as ``RandomResizedCrop.get_params`` draws them (10 attempts, then
the central fallback), vectorised; the crops are resampled for all views of all images by one ``grid_sample``.

Randomness comes from a dedicated CPU ``torch.Generator`` seeded with the run's seed, so the views are the
same on CPU and GPU, independent of anything else that consumes random numbers, and restorable (``reset``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from methods.base import softmax_entropy

VIEW_AUGMENTATIONS = ("crop_flip",)
CROP_SCALE = (0.08, 1.0)          # torchvision RandomResizedCrop defaults, as in TPT and the anchor suite
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


def sample_crop_boxes(n: int, height: int, width: int, generator: torch.Generator,
                      scale=CROP_SCALE, ratio=CROP_RATIO, attempts: int = CROP_ATTEMPTS) -> torch.Tensor:
    """(n, 4) int64 crop boxes (top, left, h, w), each distributed as ``RandomResizedCrop.get_params``:
    the first of ``attempts`` (area, aspect) draws that fits in the image, else the central fallback crop."""
    draws = torch.rand(n, attempts, 2, generator=generator, dtype=torch.float64)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)          # index of the first fitting attempt
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # Central fallback when no attempt fits (only for extreme image aspect ratios).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fb_w))
    h = torch.where(found, h, torch.full_like(h, fb_h))

    position = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (position[:, 0] * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(found, (position[:, 1] * (width - w + 1)).floor().long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
    """Views (B, V, C, size) of images (B, C, H, W): box ``boxes[b, v]`` = (top, left, h, w) of image b, resized
    bilinearly to ``size`` (as torchvision's resized_crop, no antialias: crops are never larger than the output)
    and mirrored where ``flips[b, v]``. One ``grid_sample`` for all views: the V sampling grids of an image are
    stacked along the output height, so the input is never replicated."""
    b, v = boxes.shape[:2]
    _, channels, in_h, in_w = images.shape
    out_h, out_w = size
    top, left, h, w = boxes.to(images.device, torch.float32).unbind(-1)
    # Affine map from output to input normalised coordinates (align_corners=False): a crop [left, left + w)
    # of an image of width in_w has centre (2 left + w) / in_w - 1 and half-width w / in_w.
    theta = torch.zeros(b * v, 2, 3, device=images.device, dtype=torch.float32)
    sign = 1.0 - 2.0 * flips.to(images.device, torch.float32)
    theta[:, 0, 0] = (sign * w / in_w).reshape(-1)
    theta[:, 0, 2] = ((2 * left + w) / in_w - 1).reshape(-1)
    theta[:, 1, 1] = (h / in_h).reshape(-1)
    theta[:, 1, 2] = ((2 * top + h) / in_h - 1).reshape(-1)
    grid = F.affine_grid(theta, [b * v, channels, out_h, out_w], align_corners=False)
    grid = grid.view(b, v * out_h, out_w, 2).to(images.dtype)
    # "border" clamps at the image edge as interpolate clamps at the crop edge (they differ only within half an
    # input pixel of a crop edge that is not an image edge, where grid_sample reads the true neighbour).
    stacked = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return stacked.view(b, channels, v, out_h, out_w).transpose(1, 2)


class AugmentedViews:
    """n_views views per image: the image itself (view 0) and n_views - 1 random augmentations."""

    def __init__(self, n_views: int, augmentation: str = "crop_flip", seed: int = 0,
                 keys: tuple[str, str] = ("TEST.N_AUGMENTATIONS", "VIEW_AUGMENTATION")):
        n_key, aug_key = keys
        if int(n_views) != n_views or n_views < 1:
            raise ConfigError(f"{n_key} must be an integer >= 1 (the original image plus n - 1 augmented views), "
                             f"got {n_views}")
        if augmentation not in VIEW_AUGMENTATIONS:
            raise ConfigError(f"{aug_key} must be one of {list(VIEW_AUGMENTATIONS)}, got '{augmentation}'")
        self.n_views = int(n_views)
        self.augmentation = augmentation
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        self._initial_rng_state = self.generator.get_state()

    def reset(self) -> None:
        """Restart the random stream: the same images give the same views again."""
        self.generator.set_state(self._initial_rng_state)

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
        batch, _, height, width = images.shape
        n_random = self.n_views - 1
        if n_random == 0:
            return images.unsqueeze(1)
        boxes = sample_crop_boxes(batch * n_random, height, width, self.generator).view(batch, n_random, 4)
        flips = torch.rand(batch, n_random, generator=self.generator) < 0.5
        augmented = resized_crops(images, boxes, flips, (height, width))
        return torch.cat([images.unsqueeze(1), augmented], dim=1)


def n_confident_views(n_views: int, fraction: float, key: str) -> int:
    """How many views are kept: int(n_views * fraction), as TPT's ``select_confident_samples``. Zero views
    would make the average undefined (NaN in the reference), so that is refused."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{key} must be in (0, 1], got {fraction}")
    k = int(n_views * fraction)
    if k < 1:
        raise ConfigError(f"{key} = {fraction} keeps int({n_views} * {fraction}) = 0 of TEST.N_AUGMENTATIONS = "
                         f"{n_views} views; raise either so that at least one view is kept")
    return k


def confident_views_setup(cfg, node: str) -> tuple[AugmentedViews, int]:
    """The views of a view-ensembling method configured under ``node`` (TPT, VTE): TEST.N_AUGMENTATIONS views
    made as <node>.VIEW_AUGMENTATION says, and how many of them <node>.SELECTION_P keeps."""
    views = AugmentedViews(cfg.TEST.N_AUGMENTATIONS, cfg[node].VIEW_AUGMENTATION, cfg.RNG_SEED,
                           keys=("TEST.N_AUGMENTATIONS", f"{node}.VIEW_AUGMENTATION"))
    return views, n_confident_views(views.n_views, cfg[node].SELECTION_P, f"{node}.SELECTION_P")


def lowest_entropy_views(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k views with the lowest softmax entropy along dim -2 of logits (..., V, C)."""
    entropy = softmax_entropy(logits.reshape(-1, logits.shape[-1]).float()).view(logits.shape[:-1])
    return entropy.argsort(dim=-1, stable=True)[..., :k]
