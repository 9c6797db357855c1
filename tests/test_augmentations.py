import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from conf import ConfigError
from methods import augmentations
from methods.augmentations import (AUGMIX_MAX_DEPTH, AUGMIX_OPS, AUGMIX_WIDTH, AugmentedViews, augmix_chains,
                                   augmix_mixture, augmix_step, int_parameter, resized_crops, sample_augmix,
                                   sample_crop_boxes)
from methods.frames import lowest_entropy_views, n_confident_views


def _generator(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_crop_boxes_fit_and_follow_torchvision_distribution():
    height, width, n = 224, 224, 4000
    boxes = sample_crop_boxes(n, height, width, _generator(0))
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.long
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # every box is one of RandomResizedCrop's: area fraction in [0.08, 1], aspect in [3/4, 4/3] (up to rounding)
    frac = (h * w).double() / (height * width)
    assert frac.min() >= 0.08 - 0.01 and frac.max() <= 1.0
    aspect = w.double() / h.double()
    assert aspect.min() >= 0.75 * (1 - 0.02) and aspect.max() <= 4 / 3 * (1 + 0.02)

    # the same distribution as torchvision's own sampler (independent draws): compare moments
    torch.manual_seed(1)
    image = torch.zeros(3, height, width)
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]).double()
    ours = boxes.double()
    for col in range(4):
        tol = 4 * ref[:, col].std() / math.sqrt(n) * math.sqrt(2)
        assert abs(ours[:, col].mean() - ref[:, col].mean()) < tol, col
    assert abs(frac.mean() - (ref[:, 2] * ref[:, 3] / (height * width)).mean()) < 0.02


def test_crop_boxes_central_fallback_for_extreme_aspect():
    # a 10 x 200 image: no 3/4..4/3 box with area >= 8% fits, so torchvision's central fallback is used
    boxes = sample_crop_boxes(50, 10, 200, _generator(0))
    top, left, h, w = boxes.unbind(1)
    fallback = (h == 10) & (w == round(10 * 4 / 3))
    assert fallback.any()
    assert (left[fallback] == (200 - 13) // 2).all() and (top[fallback] == 0).all()
    assert (left + w <= 200).all() and (top + h <= 10).all()


def test_resized_crops_match_torchvision_per_view_loop():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 40)
    boxes = sample_crop_boxes(2 * 5, 40, 40, _generator(3)).view(2, 5, 4)
    flips = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)
    views = resized_crops(images, boxes, flips, (40, 40))
    assert views.shape == (2, 5, 3, 40, 40)
    for b in range(2):
        for v in range(5):
            top, left, h, w = boxes[b, v].tolist()
            ref = TF.resized_crop(images[b], top, left, h, w, [40, 40],
                                  interpolation=T.InterpolationMode.BILINEAR, antialias=False)
            if flips[b, v]:
                ref = TF.hflip(ref)
            # identical away from the crop edges (within half an input pixel of a crop edge grid_sample reads the
            # true neighbour where interpolate clamps to the crop); the margin is the upscale factor
            my, mx = math.ceil(40 / h) + 1, math.ceil(40 / w) + 1
            torch.testing.assert_close(views[b, v][:, my:-my, mx:-mx], ref[:, my:-my, mx:-mx], atol=1e-5, rtol=0)


def test_full_box_is_identity_and_flip_mirrors():
    images = torch.rand(1, 3, 16, 16)
    boxes = torch.tensor([[[0, 0, 16, 16], [0, 0, 16, 16]]])
    views = resized_crops(images, boxes, torch.tensor([[False, True]]), (16, 16))
    torch.testing.assert_close(views[0, 0], images[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(views[0, 1], images[0].flip(-1), atol=1e-6, rtol=0)


def test_views_shape_original_first_and_one_grid_sample(monkeypatch):
    calls = []
    real = F.grid_sample
    monkeypatch.setattr(augmentations.F, "grid_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    images = torch.rand(3, 3, 24, 24)
    views = AugmentedViews(6, seed=0)(images)
    assert views.shape == (3, 6, 3, 24, 24)
    assert len(calls) == 1                        # all views of all images in one resampling op
    assert torch.equal(views[:, 0], images)       # view 0 is the image itself, untouched
    assert not torch.equal(views[:, 1], views[:, 2])
    assert not torch.allclose(views[0, 1:], views[1, 1:])   # each image gets its own boxes
    assert AugmentedViews(1)(images).shape == (3, 1, 3, 24, 24)


def test_views_deterministic_under_seed_and_reset_restarts_stream():
    images = torch.rand(2, 3, 24, 24)
    a, b, c = AugmentedViews(5, seed=7), AugmentedViews(5, seed=7), AugmentedViews(5, seed=8)
    first = a(images)
    assert torch.equal(first, b(images))
    assert not torch.equal(first, c(images))
    second = a(images)
    assert not torch.equal(first, second)          # the stream moves on between batches
    a.reset()
    assert torch.equal(a(images), first)


def test_view_errors_name_the_keys():
    with pytest.raises(ConfigError, match="TEST.N_AUGMENTATIONS"):
        AugmentedViews(0)
    with pytest.raises(ConfigError, match="TPT.VIEW_AUGMENTATION"):
        AugmentedViews(4, "mixup", keys=("TEST.N_AUGMENTATIONS", "TPT.VIEW_AUGMENTATION"))
    with pytest.raises(ConfigError, match="TPT.SELECTION_P"):
        n_confident_views(8, 0.1, "TPT.SELECTION_P")
    with pytest.raises(ConfigError, match="VTE.SELECTION_P"):
        n_confident_views(8, 0.0, "VTE.SELECTION_P")
    assert n_confident_views(64, 0.1, "k") == 6


def test_lowest_entropy_views_against_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 7) * 3
    chosen = lowest_entropy_views(logits, 4)
    for b in range(3):
        entropies = []
        for v in range(12):
            p = logits[b, v].softmax(0)
            entropies.append(-(p * p.log()).sum().item())
        expected = sorted(range(12), key=lambda v: entropies[v])[:4]
        assert sorted(chosen[b].tolist()) == sorted(expected)


# ---------------------------------------------------------------------------------------------------- augmix

def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _reference_op(image: Image.Image, name: str, level: float, negate: bool) -> Image.Image:
    """TPT's data/augmix_ops.py operation at a given sampled level and sign, on a PIL image (IMAGE_SIZE = 224
    replaced by the image's width / height, which is what it is for CLIP ViT-B/16)."""
    w, h = image.size
    sign = -1 if negate else 1
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name == "posterize":
        return ImageOps.posterize(image, 4 - int(level * 4 / 10))
    if name == "rotate":
        return image.rotate(sign * int(level * 30 / 10), resample=Image.BILINEAR)
    if name == "solarize":
        return ImageOps.solarize(image, 256 - int(level * 256 / 10))
    affine = {"shear_x": (1, sign * (level * 0.3 / 10), 0, 0, 1, 0),
              "shear_y": (1, 0, 0, sign * (level * 0.3 / 10), 1, 0),
              "translate_x": (1, 0, sign * int(level * (w / 3) / 10), 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, sign * int(level * (h / 3) / 10))}[name]
    return image.transform((w, h), Image.AFFINE, affine, resample=Image.BILINEAR)


def _test_images(n=4, height=17, width=23):
    """uint8 images with narrow and skewed value ranges (so autocontrast / equalize / solarize act), one with a
    constant channel (autocontrast leaves it)."""
    g = _generator(11)
    low = torch.randint(0, 120, (n, 3, 1, 1), generator=g)
    span = torch.randint(1, 136, (n, 3, 1, 1), generator=g)
    images = low + (torch.rand(n, 3, height, width, generator=g) ** 2 * span).long()
    images[0, 1] = 77
    return images.to(torch.uint8)


@pytest.mark.parametrize("name", AUGMIX_OPS)
def test_each_augmix_op_equals_pil(name):
    images = _test_images()
    levels = [0.1, 0.55, 0.99, 3.7, 9.9]          # severity 1 draws levels in [0.1, 1); larger ones show more
    cases = [(i, level, negate) for i in range(len(images)) for level in levels for negate in (False, True)]
    chains = torch.stack([images[i] for i, _, _ in cases])
    ops = torch.full((len(cases),), AUGMIX_OPS.index(name))
    out = augmix_step(chains.clone(), ops, torch.tensor([c[1] for c in cases], dtype=torch.float64),
                      torch.tensor([c[2] for c in cases]), torch.ones(len(cases), dtype=torch.bool))
    changed = 0
    for k, (i, level, negate) in enumerate(cases):
        expected = _tensor(_reference_op(_pil(images[i]), name, level, negate))
        # exact: the tensor ops reproduce PIL's arithmetic, including its truncations
        assert torch.equal(out[k], expected), (name, i, level, negate)
        changed += not torch.equal(out[k], images[i])
    assert changed >= len(cases) // 4              # the op does act on these images (small levels may not)


def test_augmix_step_applies_each_chains_own_op_and_skips_inactive():
    images = _test_images(n=3, height=16, width=16)
    g = _generator(4)
    n = 27
    chains = images[torch.arange(n) % 3]
    ops = torch.arange(n) % len(AUGMIX_OPS)
    levels = 0.1 + 9.8 * torch.rand(n, generator=g, dtype=torch.float64)
    negate = torch.rand(n, generator=g) > 0.5
    active = torch.rand(n, generator=g) > 0.3
    out = augmix_step(chains.clone(), ops, levels, negate, active)
    for k in range(n):
        if active[k]:
            expected = _tensor(_reference_op(_pil(chains[k]), AUGMIX_OPS[ops[k]], levels[k].item(), bool(negate[k])))
        else:
            expected = chains[k]
        assert torch.equal(out[k], expected), k


def test_int_parameter_is_pythons_int_of_the_reference_formula():
    levels = torch.rand(2000, generator=_generator(2), dtype=torch.float64) * 9.9 + 0.1
    for maxval in (4, 30, 256, 224 / 3):
        expected = [int(level * maxval / 10) for level in levels.tolist()]
        assert int_parameter(levels, maxval).tolist() == expected


@pytest.mark.parametrize("severity", [1, 10])
def test_augmix_chains_equal_a_per_chain_pil_loop(severity):
    g = _generator(5)
    pre = torch.rand(4, 3, 20, 20, generator=g)
    draws = sample_augmix(4, g, severity=severity)
    chains = augmix_chains(pre, draws)
    assert chains.shape == (4, AUGMIX_WIDTH, 3, 20, 20) and chains.dtype == pre.dtype
    for v in range(4):
        start = _pil((pre[v] * 255).round().to(torch.uint8))          # as ToTensor's input: the 8-bit view
        for i in range(AUGMIX_WIDTH):
            image = start.copy()
            for step in range(int(draws.depth[v, i])):
                image = _reference_op(image, AUGMIX_OPS[draws.ops[v, i, step]], draws.levels[v, i, step].item(),
                                      bool(draws.negate[v, i, step]))
            assert torch.equal((chains[v, i] * 255).round().to(torch.uint8), _tensor(image)), (v, i)


def test_augmix_draws_follow_the_reference_distributions():
    n = 20000
    draws = sample_augmix(n, _generator(8))
    assert draws.chain_weights.dtype == torch.float32 and (draws.chain_weights > 0).all()
    torch.testing.assert_close(draws.chain_weights.sum(1), torch.ones(n), atol=1e-6, rtol=0)
    assert ((draws.depth >= 1) & (draws.depth <= AUGMIX_MAX_DEPTH)).all()
    assert ((draws.levels >= 0.1) & (draws.levels < 1.0)).all()
    # against numpy's samplers, which the reference calls: dirichlet([1, 1, 1]), beta(1, 1), randint(1, 4), ...
    rng = np.random.default_rng(0)
    reference = {"weights": rng.dirichlet([1.0, 1.0, 1.0], n), "mix": rng.beta(1.0, 1.0, n),
                 "depth": rng.integers(1, 4, (n, 3)), "levels": rng.uniform(0.1, 1, (n, 3, 3))}
    ours = {"weights": draws.chain_weights, "mix": draws.mix, "depth": draws.depth, "levels": draws.levels}
    for key, values in ours.items():
        values, ref = values.double().flatten(), torch.from_numpy(reference[key]).double().flatten()
        tol = 5 * ref.std() / math.sqrt(len(ref)) * math.sqrt(2)
        assert abs(values.mean() - ref.mean()) < tol, key
        assert abs(values.std() - ref.std()) < 0.02 * ref.std(), key
    counts = torch.bincount(draws.ops.flatten(), minlength=len(AUGMIX_OPS)).double() / draws.ops.numel()
    assert (counts - 1 / len(AUGMIX_OPS)).abs().max() < 0.005
    assert abs(draws.negate.double().mean() - 0.5) < 0.005


def test_augmix_mixture_against_reference_loop_and_normalisation():
    g = _generator(6)
    pre = torch.rand(5, 3, 8, 8, generator=g)
    chains = torch.rand(5, AUGMIX_WIDTH, 3, 8, 8, generator=g)
    draws = sample_augmix(5, g)
    mixed = augmix_mixture(pre, chains, draws.chain_weights, draws.mix)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    for v in range(5):
        w, m = draws.chain_weights[v], draws.mix[v]
        mix = torch.zeros_like(pre[v])
        for i in range(AUGMIX_WIDTH):
            mix += w[i] * chains[v, i]
        torch.testing.assert_close(mixed[v], m * pre[v] + (1 - m) * mix, atol=1e-6, rtol=0)
        # the reference mixes normalised tensors: the same as normalising our [0, 1] mixture
        normalised_mix = torch.zeros_like(pre[v])
        for i in range(AUGMIX_WIDTH):
            normalised_mix += w[i] * (chains[v, i] - mean) / std
        reference = m * (pre[v] - mean) / std + (1 - m) * normalised_mix
        torch.testing.assert_close((mixed[v] - mean) / std, reference, atol=1e-5, rtol=0)


def test_augmix_views_are_mixed_crop_flip_views_and_view_zero_is_the_image():
    images = torch.rand(2, 3, 24, 24, generator=_generator(1))
    views = AugmentedViews(5, "augmix", seed=3)(images)
    assert views.shape == (2, 5, 3, 24, 24) and views.dtype == images.dtype
    assert torch.equal(views[:, 0], images)
    # built plainly from the same stream: crop_flip's boxes and flips, then the AugMix draws
    g = _generator(3)
    boxes = sample_crop_boxes(2 * 4, 24, 24, g).view(2, 4, 4)
    flips = torch.rand(2, 4, generator=g) < 0.5
    pre = resized_crops(images, boxes, flips, (24, 24)).flatten(0, 1)
    draws = sample_augmix(8, g)
    expected = augmix_mixture(pre, augmix_chains(pre, draws), draws.chain_weights, draws.mix).view(2, 4, 3, 24, 24)
    torch.testing.assert_close(views[:, 1:], expected, atol=0, rtol=0)
    crop_flip = AugmentedViews(5, "crop_flip", seed=3)(images)
    torch.testing.assert_close(crop_flip[:, 1:], pre.view(2, 4, 3, 24, 24), atol=0, rtol=0)
    assert (views[:, 1:] - crop_flip[:, 1:]).abs().amax(dim=(2, 3, 4)).min() > 0   # every view is mixed
    assert views.min() >= 0 and views.max() <= 1


def test_augmix_views_deterministic_and_reset_restarts_stream():
    images = torch.rand(2, 3, 20, 20, generator=_generator(2))
    a, b, c = (AugmentedViews(4, "augmix", seed=s) for s in (7, 7, 8))
    first = a(images)
    assert torch.equal(first, b(images))
    assert not torch.equal(first, c(images))
    assert not torch.equal(first, a(images))      # the stream moves on between batches
    a.reset()
    assert torch.equal(a.rng_state(), AugmentedViews(4, "augmix", seed=7).rng_state())
    assert torch.equal(a(images), first)
    assert AugmentedViews(1, "augmix")(images).shape == (2, 1, 3, 20, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmix_views_on_cuda_equal_cpu():
    images = torch.rand(2, 3, 32, 32, generator=_generator(9))
    cpu = AugmentedViews(6, "augmix", seed=1)(images)
    gpu = AugmentedViews(6, "augmix", seed=1)(images.cuda())
    assert gpu.device.type == "cuda"
    # the crops (grid_sample) may differ in the last float bit, which can move a value across an 8-bit step
    assert (gpu.cpu() - cpu).abs().max() < 2 / 255
