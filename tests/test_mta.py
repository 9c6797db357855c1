import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method
from methods.augmentations import AugmentedViews
from methods.mta import solve_mta
from tests.synthetic import tiny_cfg

CFG_FILE = "conf/imagenet_a/mta.yaml"
N_VIEWS = 16                            # the YAML's 64 views cost 4x the time; 16 keep int(0.3 * 15) = 4 neighbours


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "TEST__BATCH_SIZE": 4, **overrides})


# ---------------------------------------------------------------------------------------------- the transcription
def _gaussian_kernel(mu, bandwidth, datapoints):
    dist = torch.norm(datapoints - mu, dim=-1, p=2)
    return torch.exp(-dist ** 2 / (2 * bandwidth ** 2))


def _reference_mta(image_features, text_features, logit_scale, lambda_y=0.2, lambda_q=4, max_iter=5,
                   temperature=1, mutation=None):
    """mta.py ``solve_mta`` for one image (its views' features (V, D), view 0 the image), as written there: the same
    loops, the same order of operations. ``mutation`` changes one line (to show the comparison can fail). Returns the
    logits (C,) and the number of updates each inner loop ran."""
    logits = image_features @ text_features.t() * logit_scale
    batch_size = image_features.shape[0]
    dist = torch.cdist(image_features, image_features)
    sorted_dist, _ = torch.sort(dist, dim=1)
    k = int(0.3 * (image_features.shape[0] - 1))
    selected_distances = sorted_dist[:, 1:k + 1] ** 2
    mean_distance = torch.mean(selected_distances, dim=1)
    bandwidth = torch.sqrt(0.5 * mean_distance)
    affinity_matrix = (logits / temperature).softmax(1) @ (logits / temperature).softmax(1).t()
    y = torch.ones(batch_size) / batch_size
    mode = image_features[0]
    th = 1e-6
    counts = []
    for _ in range(max_iter):
        density = _gaussian_kernel(mode, bandwidth, image_features)
        i = 0
        while True:
            i += 1
            old_y = y
            weighted_affinity = affinity_matrix * y.unsqueeze(0)
            if mutation == "inlierness":      # the affinity term taken row-wise transposed: W^T y instead of W y ...
                weighted_affinity = affinity_matrix * y.unsqueeze(1) * 1.5    # ... and scaled
            y = F.softmax(1 / lambda_y * (density + lambda_q * torch.sum(weighted_affinity, dim=1)), dim=-1)
            if torch.norm(old_y - y) < th or i >= max_iter:
                break
        counts.append(i)
        i = 0
        while True:
            i += 1
            old_mode = mode
            density = _gaussian_kernel(mode, bandwidth, image_features)
            weighted_density = density * y
            mode = torch.sum(weighted_density.unsqueeze(1) * image_features, dim=0) / torch.sum(weighted_density)
            if mutation != "no_normalisation":
                mode /= mode.norm(p=2, dim=-1)
            if torch.norm(old_mode - mode) < th or i >= max_iter:
                break
        counts.append(i)
    output = mode.unsqueeze(0) @ text_features.t() * logit_scale
    return output[0], counts


def _images(n=4, seed=1):
    """Blocky images (4x4 colour patches upsampled): views that disagree on the tiny CLIP."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=32, mode="nearest")


@torch.no_grad()
def _plain_method(clip, mean, std, images, seed, mutation=None, **options):
    """The method written out: each image's views (the same seed, drawn image by image) encoded one view at a time,
    text features from open_clip directly, then the reference's loop above on each image."""
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    text = F.normalize(clip.encode_text(tokenizer([f"a photo of a {c}." for c in CIFAR10_CLASSES])), dim=-1)
    scale = clip.logit_scale.exp()
    views = AugmentedViews(N_VIEWS, seed=seed)
    out, counts = [], []
    for image in images:
        image_views = views(image[None])[0]
        feats = torch.stack([F.normalize(clip.encode_image((v[None] - mean) / std)[0], dim=-1) for v in image_views])
        logits, n = _reference_mta(feats, text, scale, mutation=mutation, **options)
        out.append(logits)
        counts.append(n)
    return torch.stack(out), counts


# ---------------------------------------------------------------------------------------------- the method
@pytest.mark.parametrize("options", [{}, {"lambda_y": 0.5, "lambda_q": 1.0, "temperature": 2.0, "max_iter": 3}])
def test_mta_matches_the_reference_loop_on_tiny_clip(tiny_clip, options):
    keys = {"lambda_y": "MTA__LAMBDA_Y", "lambda_q": "MTA__LAMBDA_Q", "temperature": "MTA__TEMPERATURE",
            "max_iter": "MTA__MAX_ITER"}
    images = _images(6)
    method = methods.build_method(_cfg(RNG_SEED=5, **{keys[k]: v for k, v in options.items()}), tiny_clip, 10)
    assert method.views_per_image == N_VIEWS and method.num_trainable_params() == 0
    out = method(images)
    expected, counts = _plain_method(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, 5, **options)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(out.argmax(1), expected.argmax(1))
    # not vacuous: the mode moved away from the image (MTA's logits are not zero-shot CLIP's), and the inner loops
    # stopped at different counts with the reference's values (the per-image early stops of the batched solver are exercised)
    with torch.no_grad():
        zero_shot = tiny_clip(images)
    assert (out - zero_shot).abs().max() > 1e-2
    if not options:
        assert len({c for per_image in counts for c in per_image}) > 1


@pytest.mark.parametrize("mutation", ["inlierness", "no_normalisation"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, mutation):
    images = _images(6)
    method = methods.build_method(_cfg(RNG_SEED=5), tiny_clip, 10)
    out = method(images)
    changed, _ = _plain_method(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, 5, mutation=mutation)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, changed, atol=2e-5, rtol=1e-5)


def test_batch_of_four_equals_four_batches_of_one(tiny_clip):
    images = _images(4, seed=3)
    batched = methods.build_method(_cfg(RNG_SEED=2), copy.deepcopy(tiny_clip), 10)
    single = methods.build_method(_cfg(RNG_SEED=2), tiny_clip, 10)
    whole = batched(images)
    one_by_one = torch.cat([single(images[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, one_by_one, atol=1e-6, rtol=1e-6)     # the same views; encoder batching only
    assert torch.equal(whole.argmax(1), one_by_one.argmax(1))


def test_the_solver_on_a_batch_equals_it_on_each_image():
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(5, 12, 8, generator=g) + 3 * torch.randn(5, 1, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    mode, y, logits = solve_mta(features, text, scale)
    for b in range(5):
        m1, y1, l1 = solve_mta(features[b:b + 1], text, scale)
        torch.testing.assert_close(logits[b:b + 1], l1, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(y[b:b + 1], y1, atol=1e-7, rtol=1e-6)
        expected, _ = _reference_mta(features[b], text, scale)
        torch.testing.assert_close(logits[b], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mode.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(y.sum(dim=-1), torch.ones(5))


def test_mta_changes_no_state_and_reports_its_cost(tiny_clip):
    method = methods.build_method(_cfg(), tiny_clip, 10)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    assert method.cost_info() == {"views_per_image": N_VIEWS, "backward_passes_per_image": 0,
                                  "meanshift_iterations_per_image": 5}
    method(_images(2))
    after = method.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_reset_restores_all_state_exactly(tiny_clip):
    cfg = _cfg()
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    method = methods.build_method(cfg, tiny_clip, 10)
    images = _images(4)
    expected = fresh(images)
    assert torch.equal(method(images), expected)                       # same seed, same output
    method(_images(3, seed=7))
    method.reset()
    assert torch.equal(method.views.rng_state(), AugmentedViews(N_VIEWS, seed=cfg.RNG_SEED).rng_state())
    assert torch.equal(method(images), expected)                       # reset() restarts the view stream


def test_bad_mta_config_is_refused():
    with pytest.raises(ConfigError, match="MTA.BANDWIDTH_NEIGHBOURS"):
        check_method(_cfg(TEST__N_AUGMENTATIONS=4))                     # int(0.3 * 3) = 0 neighbours
    check_method(_cfg(TEST__N_AUGMENTATIONS=5))
    for key, value in [("LAMBDA_Y", 0.0), ("MAX_ITER", 0), ("TEMPERATURE", -1.0),
                       ("VIEW_AUGMENTATION", "no_such_augmentation")]:
        with pytest.raises(ConfigError, match=f"MTA.{key}"):
            check_method(_cfg(**{f"MTA__{key}": value}))
