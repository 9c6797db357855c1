"""TTAug (methods/ttaug.py) on the tiny CLIP, both towers, against a transcription of the anchor suite's TTAug
(classification/methods/ttaug.py: the mean of the model's logits over the image and its augmented views, with
AlphaBatchNorm layers); the comparison fails when one line changes; exact reset; nothing trained."""
import copy

import pytest
import torch
import torch.nn as nn

import methods
from conf import ConfigError
from harness.build import check_method
from methods.augmentations import AugmentedViews
from tests.synthetic import tiny_cfg

C = 10
N_AUG = 5
SEED = 4
ARCH = {"vit": "tiny-clip-test", "rn": "tiny-clip-test-rn"}
# Measured over 3 images (fp32; default CPU path / AVX2 path): ViT equal bit for bit; ResNet within 4.8e-7 / 4.8e-7
# (the transcription's hand BatchNorm rounds differently from torch's kernel).
ATOL = {"vit": 1e-6, "rn": 1e-5}


def build(model, arch, **overrides):
    cfg = tiny_cfg(MODEL__ADAPTATION="ttaug", MODEL__ARCH=arch, TEST__N_AUGMENTATIONS=N_AUG, RNG_SEED=SEED,
                   **overrides)
    check_method(cfg)
    return methods.build_method(cfg, model, C)


def hand_alpha_batchnorm(model, alpha):
    """AlphaBatchNorm as the reference computes it: batch mean and unbiased variance mixed with the source ones."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            def forward(x, layer=m):
                n = x.shape[0] * x.shape[2] * x.shape[3]
                mean = x.mean(dim=(0, 2, 3))
                var = ((x - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / (n - 1)
                mixed_mean = (1 - alpha) * layer.running_mean + alpha * mean
                mixed_var = (1 - alpha) * layer.running_var + alpha * var
                shape = (1, -1, 1, 1)
                out = (x - mixed_mean.view(shape)) / torch.sqrt(mixed_var.view(shape) + layer.eps)
                return out * layer.weight.view(shape) + layer.bias.view(shape)
            m.forward = forward


@torch.no_grad()
def reference_ttaug(model, images, mutation=None, alpha=0.1):
    model = copy.deepcopy(model)
    hand_alpha_batchnorm(model, alpha)
    views = AugmentedViews(N_AUG + 1, "augmix", SEED)
    outputs = []
    for image in images:
        x = views(image.unsqueeze(0))[0]                 # the image, then its N augmentations
        if mutation == "without_image":
            x = x[1:]
        logits = model(x)
        if mutation == "probabilities":
            outputs.append(logits.softmax(-1).mean(0, keepdim=True))
        else:
            outputs.append(logits.mean(0, keepdim=True))
    return torch.cat(outputs)


def images_of(n=3):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("tower_name", ["vit", "rn"])
@pytest.mark.parametrize("alpha", [0.1, 0.6])
def test_matches_the_reference_transcription(request, tower_name, alpha):
    model = request.getfixturevalue("tiny_clip" if tower_name == "vit" else "tiny_clip_rn")
    source = copy.deepcopy(model)
    method = build(model, ARCH[tower_name], BN__ALPHA=alpha)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    ours = torch.cat([method(images_of()[:2]), method(images_of()[2:])])      # batches of 2 and 1
    theirs = reference_ttaug(source, images_of(), alpha=alpha)
    torch.testing.assert_close(ours, theirs, atol=ATOL[tower_name], rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in method.state_dict().items())     # nothing adapts
    assert method.optimizer is None and method.param_names == []


@pytest.mark.parametrize("tower_name", ["vit", "rn"])
@pytest.mark.parametrize("mutation", ["without_image", "probabilities"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(request, tower_name, mutation):
    model = request.getfixturevalue("tiny_clip" if tower_name == "vit" else "tiny_clip_rn")
    source = copy.deepcopy(model)
    ours = build(model, ARCH[tower_name])(images_of())
    theirs = reference_ttaug(source, images_of(), mutation=mutation)
    difference = (ours - theirs).abs().max().item()
    # measured (both CPU paths): without the image 0.13 (ViT), 3.7e-4 (ResNet); mean of the probabilities 3.6 / 2.1
    assert difference > 10 * ATOL[tower_name], difference


def test_the_batch_statistics_matter_on_the_resnet_tower(tiny_clip_rn):
    source = copy.deepcopy(tiny_clip_rn)
    ours = build(tiny_clip_rn, "tiny-clip-test-rn")(images_of())
    assert (ours - reference_ttaug(source, images_of(), alpha=0.0)).abs().max() > 10 * ATOL["rn"]


def test_reset_restarts_the_views(tiny_clip):
    method = build(tiny_clip, "tiny-clip-test")
    first = method(images_of())
    assert not torch.equal(method(images_of()), first)          # new views
    method.reset()
    assert torch.equal(method(images_of()), first)


def test_refusals_name_the_key():
    with pytest.raises(ConfigError, match="TTAUG.VIEW_AUGMENTATION"):
        tiny_cfg(MODEL__ADAPTATION="ttaug", TTAUG__VIEW_AUGMENTATION="randaugment")
    with pytest.raises(ConfigError, match="BN.ALPHA"):
        tiny_cfg(MODEL__ADAPTATION="ttaug", BN__ALPHA=-1.0)
