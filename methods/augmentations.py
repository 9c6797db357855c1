"""Test-time views of a batch of images, built on the images' device in batched operations.

Used by the test-time-augmentation methods (TPT, VTE, ZERO, TDA, DPE; their common frame is ``ViewsMethod``,
methods/frames.py) and usable by any other: ``AugmentedViews(n_views, ...)`` turns a batch of [0, 1] images
(B, C, H, W) into (B, n_views, C, H, W), where view 0 of every image is the image itself and the other
n_views - 1 are random augmentations of it.

Augmentation "crop_flip" is what the TPT authors and the anchor suite (mariodoebler/test-time-adaptation,
``AugMixAugmenter`` with ``use_augmix=False``) apply for ImageNet and the corruption benchmarks: torchvision's
RandomResizedCrop to the input size (scale 0.08-1, aspect ratio 3/4-4/3, bilinear) followed by
RandomHorizontalFlip(0.5). Crop boxes are drawn exactly as ``RandomResizedCrop.get_params`` draws them (10
attempts, then the central fallback), vectorised; the crops are resampled for all views of all images by one
``grid_sample``.

Augmentation "augmix" is ``AugMixAugmenter`` with AugMix on (TPT ``data/datautils.py``, TDA/DPE
``datasets/utils.py``): each view is a crop_flip view ("pre-augmentation") mixed with 3 chains of 1-3 random
operations of AugMix's list (``augmix_ops.augmentations``: autocontrast, equalize, posterize, rotate, solarize,
shear_x/y, translate_x/y) at severity 1: ``m * pre + (1 - m) * sum_i w_i chain_i`` with w ~ Dirichlet(1, 1, 1)
and m ~ Beta(1, 1). The operations run on the 8-bit view (``round(255 * pre)``) as PIL runs them on the 8-bit
image, batched per operation over all chains of all views; they reproduce PIL's results exactly (tested).

Both make their views from the image the harness delivers (already resized and centre-cropped to the model's
input size), not from the raw image as the references do. Randomness comes from a dedicated CPU
``torch.Generator`` seeded with the run's seed, so the views are the same on CPU and GPU, independent of
anything else that consumes random numbers, and restorable (``reset``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TVF
from torchvision.transforms import InterpolationMode

from conf.errors import ConfigError

VIEW_AUGMENTATIONS = ("crop_flip", "augmix")
CROP_SCALE = (0.08, 1.0)          # torchvision RandomResizedCrop defaults, as in TPT and the anchor suite
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

# AugMix as the TPT/TDA/DPE code runs it: the 9 operations of augmix_ops.augmentations (not augmentations_all,
# whose colour/contrast/brightness/sharpness overlap ImageNet-C), AugMixAugmenter's default severity 1 (no
# caller changes it), 3 chains (width) of np.random.randint(1, 4) = 1-3 operations, Dirichlet(1, 1, 1) chain
# weights and a Beta(1, 1) weight of the pre-augmented view.
AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
AUGMIX_SEVERITY = 1
AUGMIX_WIDTH = 3
AUGMIX_MAX_DEPTH = 3


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


class AugmixDraws(NamedTuple):
    """The random choices of n AugMix views: per view the chain weights and the pre-augmentation's weight, per
    chain its depth, per chain step the operation, its level and its sign (drawn for all steps, used up to the
    chain's depth, so the stream does not depend on the images)."""
    chain_weights: torch.Tensor   # (n, WIDTH) float32, Dirichlet(1, ..., 1)
    mix: torch.Tensor             # (n,) float32, Beta(1, 1): weight of the pre-augmented view
    depth: torch.Tensor           # (n, WIDTH) int64 in [1, MAX_DEPTH]
    ops: torch.Tensor             # (n, WIDTH, MAX_DEPTH) int64 index into AUGMIX_OPS
    levels: torch.Tensor          # (n, WIDTH, MAX_DEPTH) float64, uniform(0.1, severity) as sample_level
    negate: torch.Tensor          # (n, WIDTH, MAX_DEPTH) bool: the sign flip of rotate / shear / translate


def sample_augmix(n: int, generator: torch.Generator, severity: float = AUGMIX_SEVERITY) -> AugmixDraws:
    """The AugMix draws of n views. Dirichlet(1, ..., 1) is drawn as normalised Exp(1) variables and Beta(1, 1)
    as a uniform: the same distributions as numpy's, from the dedicated generator."""
    exponential = -torch.log1p(-torch.rand(n, AUGMIX_WIDTH, generator=generator, dtype=torch.float64))
    chain_weights = (exponential / exponential.sum(dim=1, keepdim=True)).float()
    mix = torch.rand(n, generator=generator)
    depth = torch.randint(1, AUGMIX_MAX_DEPTH + 1, (n, AUGMIX_WIDTH), generator=generator)
    steps = (n, AUGMIX_WIDTH, AUGMIX_MAX_DEPTH)
    ops = torch.randint(0, len(AUGMIX_OPS), steps, generator=generator)
    levels = 0.1 + (severity - 0.1) * torch.rand(steps, generator=generator, dtype=torch.float64)
    negate = torch.rand(steps, generator=generator, dtype=torch.float64) > 0.5
    return AugmixDraws(chain_weights, mix, depth, ops, levels, negate)


def int_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    """augmix_ops.int_parameter, int(level * maxval / 10), for levels >= 0 (float64 like numpy's)."""
    return (level * maxval / 10).floor().long()


def float_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    return level * maxval / 10


def affine_data(op_names: list[str], levels: torch.Tensor, negate: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
    """(n, 6) float64 PIL ``Image.AFFINE`` data (a, b, c, d, e, f) of geometric AugMix operations: output pixel
    (x, y) reads input (a x + b y + c, d x + e y + f). Magnitudes as augmix_ops: rotate int(3 level) degrees
    about the centre (as ``Image.rotate``), shear 0.03 level, translate int(level * size / 30) pixels with size
    the view's width / height (the anchor suite's img_size; TPT/TDA/DPE fix it to 224, the ViT-B/16 view size)."""
    sign = 1.0 - 2.0 * negate.double()
    data = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64).repeat(len(op_names), 1)
    for i, name in enumerate(op_names):
        if name == "rotate":
            # Image.rotate's inverse map, including its angle % 360 and its rounding to 15 decimals
            radians = -math.radians(float(sign[i] * int_parameter(levels[i], 30)) % 360.0)
            cos, sin = round(math.cos(radians), 15), round(math.sin(radians), 15)
            cx, cy = width / 2.0, height / 2.0
            data[i] = torch.tensor([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy],
                                   dtype=torch.float64)
        elif name == "shear_x":
            data[i, 1] = sign[i] * float_parameter(levels[i], 0.3)
        elif name == "shear_y":
            data[i, 3] = sign[i] * float_parameter(levels[i], 0.3)
        elif name == "translate_x":
            data[i, 2] = sign[i] * int_parameter(levels[i], width / 3)
        elif name == "translate_y":
            data[i, 5] = sign[i] * int_parameter(levels[i], height / 3)
        else:
            raise ValueError(f"'{name}' is not a geometric AugMix operation")
    return data


def pil_affine(images: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(size, Image.AFFINE, data, resample=Image.BILINEAR)`` of uint8 images (n, C, H, W)
    with per-image data (n, 6), reproduced exactly: the input point of every output pixel centre; black where
    it falls outside the image; else bilinear between the 4 nearest pixel centres (indices clamped to the
    image), interpolated along x then y in float64 and truncated to uint8, as PIL's Geometry.c."""
    n, channels, height, width = images.shape
    device = images.device
    a, b, c, d, e, f = data.to(device).view(n, 6, 1, 1).unbind(1)
    y = torch.arange(height, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5
    x = torch.arange(width, device=device, dtype=torch.float64).view(1, 1, -1) + 0.5
    x_in, y_in = a * x + b * y + c, d * x + e * y + f                           # (n, H, W)
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    x_in, y_in = x_in - 0.5, y_in - 0.5                                         # pixel centres at integers
    x0, y0 = x_in.floor(), y_in.floor()
    dx, dy = (x_in - x0).unsqueeze(-1), (y_in - y0).unsqueeze(-1)
    x0, y0 = x0.long(), y0.long()
    xa, xb = x0.clamp(0, width - 1), (x0 + 1).clamp(0, width - 1)
    ya, yb = y0.clamp(0, height - 1), (y0 + 1).clamp(0, height - 1)
    # channels last, so one index per pixel picks all its channels
    pixels = images.permute(0, 2, 3, 1).reshape(n * height * width, channels)
    first = (torch.arange(n, device=device) * (height * width)).view(n, 1, 1)
    top_left, top_right = pixels[first + ya * width + xa].double(), pixels[first + ya * width + xb].double()
    top = top_left + (top_right - top_left) * dx
    bottom_left, bottom_right = pixels[first + yb * width + xa].double(), pixels[first + yb * width + xb].double()
    bottom = bottom_left + (bottom_right - bottom_left) * dx
    value = (top + (bottom - top) * dy) * inside.unsqueeze(-1)                 # (n, H, W, C)
    value = value.permute(0, 3, 1, 2)
    return value.clamp_(0, 255).floor_().to(torch.uint8)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast`` of uint8 images (n, C, H, W): per channel, int(x * scale + offset) with scale =
    255 / (max - min), offset = -min * scale, in float64 as PIL's lookup table (torchvision's autocontrast
    divides instead, which is 1 lower at some values); a constant channel is left as it is."""
    low = images.amin(dim=(-2, -1), keepdim=True).double()
    high = images.amax(dim=(-2, -1), keepdim=True).double()
    spread = high > low
    # a true division (255.0 / tensor would multiply by a reciprocal, which rounds differently from Python)
    scale = torch.where(spread, torch.full_like(high, 255.0) / (high - low).clamp(min=1), 1.0)
    offset = torch.where(spread, -low * scale, 0.0)
    return (images.double() * scale + offset).clamp_(0, 255).floor_().to(torch.uint8)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``ImageOps.posterize`` of uint8 images (n, C, H, W), keeping bits[i] (1-8) high bits of image i."""
    mask = ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8).to(images.device)
    return images & mask.view(-1, 1, 1, 1)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize`` of uint8 images: values >= threshold[i] inverted."""
    threshold = threshold.to(images.device).view(-1, 1, 1, 1)
    return torch.where(images >= threshold, 255 - images, images)


def augmix_step(chains: torch.Tensor, ops: torch.Tensor, levels: torch.Tensor, negate: torch.Tensor,
                active: torch.Tensor) -> torch.Tensor:
    """One step of every chain (uint8 (n, C, H, W), in place): chain i, if active[i], gets operation ops[i]
    with its level and sign (augmix_ops). Each operation runs once, batched over the chains that drew it; the
    geometric ones share one resampling."""
    height, width = chains.shape[-2:]

    def chosen(names):
        wanted = torch.tensor([AUGMIX_OPS.index(name) for name in names])
        return (active & torch.isin(ops, wanted)).nonzero().squeeze(1)

    for name in ("autocontrast", "equalize", "posterize", "solarize"):
        idx = chosen([name])
        if idx.numel() == 0:
            continue
        selected = chains[idx.to(chains.device)]
        if name == "autocontrast":
            changed = autocontrast(selected)
        elif name == "equalize":
            changed = TVF.equalize(selected)
        elif name == "posterize":
            changed = posterize(selected, 4 - int_parameter(levels[idx], 4))
        else:
            changed = solarize(selected, 256 - int_parameter(levels[idx], 256))
        chains[idx.to(chains.device)] = changed
    idx = chosen(GEOMETRIC_OPS)
    if idx.numel():
        names = [AUGMIX_OPS[k] for k in ops[idx].tolist()]
        data = affine_data(names, levels[idx], negate[idx], height, width)
        chains[idx.to(chains.device)] = pil_affine(chains[idx.to(chains.device)], data)
    return chains


def augmix_chains(pre: torch.Tensor, draws: AugmixDraws) -> torch.Tensor:
    """The WIDTH operation chains (n, WIDTH, C, H, W) of n pre-augmented views (n, C, H, W) in [0, 1], as [0, 1]
    floats: each starts from the 8-bit view and applies its depth's operations in order."""
    n, channels, height, width = pre.shape
    eight_bit = (pre.clamp(0, 1) * 255).round().to(torch.uint8)
    chains = eight_bit.repeat_interleave(AUGMIX_WIDTH, dim=0)
    depth = draws.depth.reshape(-1)
    for step in range(AUGMIX_MAX_DEPTH):
        augmix_step(chains, draws.ops[..., step].reshape(-1), draws.levels[..., step].reshape(-1),
                    draws.negate[..., step].reshape(-1), depth > step)
    return chains.view(n, AUGMIX_WIDTH, channels, height, width).to(pre.dtype) / 255


def augmix_mixture(pre: torch.Tensor, chains: torch.Tensor, chain_weights: torch.Tensor,
                   mix: torch.Tensor) -> torch.Tensor:
    """m * pre + (1 - m) * sum_i w_i chain_i per view. The reference mixes the normalised tensors; Normalize is
    affine and the weights sum to 1, so mixing the [0, 1] images (normalised later by the model) is the same."""
    weights = chain_weights.to(pre.device, pre.dtype).view(*chain_weights.shape, 1, 1, 1)
    m = mix.to(pre.device, pre.dtype).view(-1, 1, 1, 1)
    return m * pre + (1 - m) * (weights * chains).sum(dim=1)


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
        if self.augmentation == "augmix":
            # the pre-augmentations are the crop_flip views of the same draws; the AugMix draws follow them
            pre = augmented.flatten(0, 1)
            draws = sample_augmix(pre.shape[0], self.generator)
            augmented = augmix_mixture(pre, augmix_chains(pre, draws), draws.chain_weights,
                                       draws.mix).view_as(augmented)
        return torch.cat([images.unsqueeze(1), augmented], dim=1)

    def image_by_image(self, images: torch.Tensor) -> torch.Tensor:
        """The views (B, V, C, H, W) drawn image by image, so that a batch gets the views its images get one at a
        time (for methods whose results must not depend on the batch size: TDA, DPE)."""
        return torch.cat([self(image.unsqueeze(0)) for image in images])


# ------------------------------------------------------------------------------------------------ the anchor suite's
GAUSSIAN_NOISE_STD = 0.005          # get_tta_transforms' gaussian_std


class TTATransforms:
    """The anchor suite's ``get_tta_transforms`` (augmentations/transforms_cotta.py, soft=False) on a (B, 3, H, W)
    batch in [0, 1] (RoTTA's strong augmentation, CoTTA's teacher views, ROID's consistency view): clip;
    ColorJitterPro (brightness, contrast, saturation, hue, gamma in a random order); padding by H / 2
    (``padding_mode``); RandomAffine (+-15 degrees, translation 1/16, scale 0.9-1.1, bilinear, fill 0); with
    ``cotta_augs`` a Gaussian blur (kernel 5, sigma 0.001-0.5); centre crop to H; horizontal flip with probability
    0.5; with ``cotta_augs`` Gaussian noise (std 0.005); clip. Every parameter is drawn once per call (the batch
    shares it), the noise per pixel, in the reference's order and from the same distributions, but from a CPU
    generator seeded with ``seed`` instead of torch's global one: the same seed replays the reference's transforms
    (tests/test_roid.py, tests/test_cotta.py), and ``reseed`` restarts them.

    ``noise_seed``: draw the noise from a generator of its own on the images' device, seeded with it (RoTTA, whose
    images stay on the GPU); None draws it from the one CPU generator, after the flip, as the reference does
    (CoTTA). ``generator``: share an existing CPU generator instead of seeding one (CoTTA's restore masks come
    from the same stream)."""

    def __init__(self, seed: int = 0, padding_mode: str = "edge", cotta_augs: bool = True,
                 noise_seed: int | None = None, noise_std: float = GAUSSIAN_NOISE_STD,
                 generator: torch.Generator | None = None):
        self.seed, self.padding_mode, self.cotta_augs = int(seed), padding_mode, cotta_augs
        self.noise_seed, self.noise_std = noise_seed, noise_std
        self.shared_generator = generator
        self.reseed()

    def reseed(self) -> None:
        self.generator = self.shared_generator or torch.Generator().manual_seed(self.seed)
        self.noise_generators: dict[str, torch.Generator] = {}

    def _uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high, generator=self.generator).item()

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """ColorJitterPro: brightness, contrast, saturation, hue and gamma in a random order."""
        for op in torch.randperm(5, generator=self.generator).tolist():
            if op == 0:
                x = TF.adjust_brightness(x, self._uniform(0.6, 1.4))
            elif op == 1:
                x = TF.adjust_contrast(x, self._uniform(0.7, 1.3))
            elif op == 2:
                x = TF.adjust_saturation(x, self._uniform(0.5, 1.5))
            elif op == 3:
                x = TF.adjust_hue(x, self._uniform(-0.06, 0.06))
            else:
                gamma = self._uniform(0.7, 1.3)
                x = TF.adjust_gamma(x.clamp(1e-8, 1.0), gamma)   # the reference clamps (NaN gradients otherwise)
        return x

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        """RandomAffine of the padded batch, its parameters drawn in torchvision's order."""
        height, width = x.shape[-2:]
        angle = self._uniform(-15.0, 15.0)
        tx = int(round(self._uniform(-float(width / 16), float(width / 16))))
        ty = int(round(self._uniform(-float(height / 16), float(height / 16))))
        scale = self._uniform(0.9, 1.1)
        return TF.affine(x, angle=angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                          interpolation=InterpolationMode.BILINEAR, fill=[0.0] * x.shape[-3])

    def scaled_noise(self, x: torch.Tensor) -> torch.Tensor:
        """noise_std * N(0, 1) per pixel, from the CPU generator (then moved) or the device's own."""
        if self.noise_seed is None:
            return (torch.randn(x.size(), generator=self.generator) * self.noise_std).to(x.device)
        key = str(x.device)
        if key not in self.noise_generators:
            self.noise_generators[key] = torch.Generator(device=x.device).manual_seed(self.noise_seed)
        return torch.randn(x.shape, generator=self.noise_generators[key], device=x.device, dtype=x.dtype) * \
            self.noise_std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"get_tta_transforms expects (B, 3, H, W) images, got {tuple(images.shape)}")
        n_pixels = images.shape[-2]          # the reference's img_size[0]: the model's input size
        x = self.color_jitter(torch.clip(images, 0.0, 1.0))
        pad = int(n_pixels / 2)
        x = self.affine(TF.pad(x, [pad, pad, pad, pad], padding_mode=self.padding_mode))
        if self.cotta_augs:
            sigma = self._uniform(0.001, 0.5)
            x = TF.gaussian_blur(x, [5, 5], [sigma, sigma])
        x = TF.center_crop(x, [n_pixels, n_pixels])
        if torch.rand(1, generator=self.generator) < 0.5:
            x = TF.hflip(x)
        if self.cotta_augs:
            x = x + self.scaled_noise(x)
        return torch.clip(x, 0.0, 1.0)
