"""MEMO (methods/memo.py) on the tiny CLIP, both towers, against a transcription of the anchor suite's MEMO
(classification/methods/memo.py: marginal entropy of the augmented views, SGD steps on every weight and bias of the
image tower, episodic reset, then the image predicted; BatchNorm layers as AlphaBatchNorm): logits of every image
and adapted weights compared; the comparison fails when one line of the transcription changes; exact reset;
refusals."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import methods
from conf import ConfigError
from harness.build import check_method
from methods.augmentations import AugmentedViews
from tests.synthetic import tiny_cfg

C = 10
N_AUG = 4
SEED = 3
LR = 0.05
# Measured over 3 images (fp32; default CPU path / AVX2 path): ViT logits and weights equal bit for bit; ResNet
# logits within 3.2e-5 / 3.5e-5 (on logits up to 0.3: the transcription's hand BatchNorm and torch's kernel round
# differently, and the batch statistics of one image's 2 x 2 maps amplify it), weights within 1.2e-7 / 3.1e-7.
LOGITS_ATOL = {"vit": 1e-6, "rn": 1e-4}
WEIGHTS_ATOL = 1e-6


def rn_at_64_pixels(model):
    """The tiny ResNet tower's last stage is 1 x 1 at 32 pixels, so one image has 1 value per channel there and
    no batch variance (torch's train-mode BatchNorm, the reference's, refuses it): at 64 pixels it is 2 x 2. The
    attention pool's positional embedding is widened to the 2 x 2 map."""
    pool = model.clip.visual.attnpool
    generator = torch.Generator().manual_seed(5)
    width = pool.positional_embedding.shape[1]
    pool.positional_embedding = nn.Parameter(torch.randn(5, width, generator=generator) / width ** 0.5)
    return model


def tower(request, name):
    model = request.getfixturevalue("tiny_clip" if name == "vit" else "tiny_clip_rn")
    size = 32 if name == "vit" else 64
    return (model if name == "vit" else rn_at_64_pixels(model)), size


def build(model, arch, **overrides):
    cfg = tiny_cfg(MODEL__ADAPTATION="memo", MODEL__ARCH=arch, TEST__N_AUGMENTATIONS=N_AUG, RNG_SEED=SEED,
                   OPTIM__METHOD="SGD", OPTIM__LR=LR, **overrides)
    check_method(cfg)
    return methods.build_method(cfg, model, C)


ARCH = {"vit": "tiny-clip-test", "rn": "tiny-clip-test-rn"}


# ---------------------------------------------------------------------- the transcription
def hand_alpha_batchnorm(model, alpha=0.1):
    """AlphaBatchNorm as the reference computes it: the batch's mean and unbiased variance (buffers of a momentum-1
    BatchNorm: no gradient), mixed with the layer's source statistics, then batch_norm with the layer's affine."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            def forward(x, layer=m):
                with torch.no_grad():
                    n = x.shape[0] * x.shape[2] * x.shape[3]
                    mean = x.mean(dim=(0, 2, 3))
                    var = ((x - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / (n - 1)
                    mixed_mean = (1 - alpha) * layer.running_mean + alpha * mean
                    mixed_var = (1 - alpha) * layer.running_var + alpha * var
                shape = (1, -1, 1, 1)
                out = (x - mixed_mean.view(shape)) / torch.sqrt(mixed_var.view(shape) + layer.eps)
                return out * layer.weight.view(shape) + layer.bias.view(shape)
            m.forward = forward


def marginal_entropy_by_hand(logits, mutation=None):
    if mutation == "mean_entropy":
        p = logits.softmax(-1)
        return -(p * p.log()).sum(-1).mean()
    logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    avg = logits.logsumexp(dim=0) - math.log(logits.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * torch.exp(avg)).sum(dim=-1)


def adapted_weights(model):
    """The reference's collect_params on its CLIP: every 'weight' / 'bias' of a module (image tower: its text
    transformer is removed and the text features are precomputed)."""
    return {f"clip.visual.{mn}.{pn}".replace("..", "."): p for mn, m in model.clip.visual.named_modules()
            for pn, p in m.named_parameters(recurse=False) if pn in ("weight", "bias")}


def reference_memo(model, images, steps=1, episodic=True, mutation=None, augmentation="augmix"):
    model = copy.deepcopy(model)
    hand_alpha_batchnorm(model, alpha=0.0 if mutation == "source_statistics" else 0.1)
    model.requires_grad_(False)
    weights = adapted_weights(model)
    for p in weights.values():
        p.requires_grad_(True)
    source = {n: p.detach().clone() for n, p in weights.items()}
    params = list(weights.values())
    lr = 2 * LR if mutation == "lr" else LR
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True)
    fresh = copy.deepcopy(optimizer.state_dict())
    views = AugmentedViews(N_AUG + 1, augmentation, SEED)
    outputs = []
    for image in images:
        x = views(image.unsqueeze(0))[0]                 # the image, then its N augmentations
        if episodic:
            with torch.no_grad():
                for n, p in weights.items():
                    p.copy_(source[n])
            optimizer.load_state_dict(fresh)
        for _ in range(steps):
            x_aug = x if mutation == "with_image" else x[1:]
            with torch.enable_grad():
                loss = marginal_entropy_by_hand(model(x_aug), mutation)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            outputs.append(model(x[:1]))
    return torch.cat(outputs), {n: p.detach().clone() for n, p in weights.items()}


def our_memo(model, arch, images, **overrides):
    method = build(model, arch, **overrides)
    logits = method(images)
    return logits, {n: p.detach().clone() for n, p in zip(method.param_names, method.params)}, method


def images_of(size, n=3):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def compare_weights(ours, theirs, atol):
    renamed = {n.replace(".layer.", "."): p for n, p in ours.items()}      # AlphaBatchNorm wraps the layer
    assert renamed.keys() == theirs.keys()
    return max((renamed[n] - theirs[n]).abs().max().item() for n in theirs)


# ---------------------------------------------------------------------- equality with the transcription
@pytest.mark.parametrize("tower_name", ["vit", "rn"])
@pytest.mark.parametrize("episodic,steps", [(True, 1), (True, 2), (False, 1)])
def test_matches_the_reference_transcription(request, tower_name, episodic, steps):
    model, size = tower(request, tower_name)
    source = copy.deepcopy(model)
    images = images_of(size)
    ours, our_weights, _ = our_memo(model, ARCH[tower_name], images, MODEL__EPISODIC=episodic, OPTIM__STEPS=steps)
    theirs, their_weights = reference_memo(source, images, steps=steps, episodic=episodic)
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL[tower_name], rtol=0)
    assert compare_weights(our_weights, their_weights, WEIGHTS_ATOL) < WEIGHTS_ATOL
    moved = compare_weights(our_weights, adapted_weights(source), 0)
    assert moved > 100 * WEIGHTS_ATOL          # the steps do move the weights


@pytest.mark.parametrize("tower_name,mutation", [
    ("vit", "mean_entropy"), ("vit", "with_image"), ("vit", "lr"),
    ("rn", "source_statistics"), ("rn", "with_image"), ("rn", "lr")])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(request, tower_name, mutation):
    model, size = tower(request, tower_name)
    source = copy.deepcopy(model)
    images = images_of(size, n=2)
    _, our_weights, _ = our_memo(model, ARCH[tower_name], images, MODEL__EPISODIC=False)
    _, their_weights = reference_memo(source, images, episodic=False, mutation=mutation)
    difference = compare_weights(our_weights, their_weights, WEIGHTS_ATOL)
    # measured (both CPU paths), largest weight difference: ViT 6.2e-4 (mean entropy), 1.6e-3 (the image in the
    # loss), 3.6e-2 (lr); ResNet 5.5e-3 (source statistics), 4.5e-4 (the image in the loss), 0.13 (lr)
    assert difference > 10 * WEIGHTS_ATOL, difference


def test_adapted_parameters_are_the_image_towers_weights_and_biases(tiny_clip):
    method = build(tiny_clip, "tiny-clip-test")
    assert set(method.param_names) == set(adapted_weights(tiny_clip))
    assert not any(n.endswith(("in_proj_weight", "positional_embedding", "class_embedding", "proj"))
                   for n in method.param_names)
    assert all(n.startswith("clip.visual.") for n in method.param_names)


# ---------------------------------------------------------------------- reset, protocol, refusals
@pytest.mark.parametrize("tower_name", ["vit", "rn"])
def test_reset_restores_all_state_exactly(request, tower_name):
    model, size = tower(request, tower_name)
    method = build(model, ARCH[tower_name], MODEL__EPISODIC=False)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    optimizer = str(method.optimizer.state_dict())
    first = [method(x) for x in images_of(size, n=2).split(1)]
    method.reset()
    for key, value in method.state_dict().items():
        assert torch.equal(value, initial[key]), key
    assert str(method.optimizer.state_dict()) == optimizer
    replay = [method(x) for x in images_of(size, n=2).split(1)]
    for a, b in zip(first, replay):
        assert torch.equal(a, b)


def test_episodic_images_do_not_depend_on_the_batch_size(tiny_clip):
    images = images_of(32, n=3)
    batched = build(copy.deepcopy(tiny_clip), "tiny-clip-test")(images)
    method = build(tiny_clip, "tiny-clip-test")
    one_by_one = torch.cat([method(x) for x in images.split(1)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)


def test_refusals_name_the_key():
    with pytest.raises(ConfigError, match="MEMO.VIEW_AUGMENTATION"):
        tiny_cfg(MODEL__ADAPTATION="memo", MEMO__VIEW_AUGMENTATION="randaugment")
    with pytest.raises(ConfigError, match="FREEZE_TEXT_ENCODER"):
        check_method(tiny_cfg(MODEL__ADAPTATION="memo", CLIP__FREEZE_TEXT_ENCODER=False))
    with pytest.raises(ConfigError, match="BN.ALPHA"):
        tiny_cfg(MODEL__ADAPTATION="memo", BN__ALPHA=2.0)
