import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from conf import ConfigError
from methods import augmentations
from methods.augmentations import (AugmentedViews, lowest_entropy_views, n_confident_views, resized_crops,
                                   sample_crop_boxes)


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
        AugmentedViews(4, "augmix", keys=("TEST.N_AUGMENTATIONS", "TPT.VIEW_AUGMENTATION"))
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
