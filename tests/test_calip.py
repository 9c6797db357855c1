"""CALIP against an independent transcription of CLIPTTA's ttavlm/methods/calip.py (the per-image loop of
new_logits, the ViT's tokens from its VisionTransformer with use_local) and, for the ResNet tower, of the official
ZiyuGuo99/CALIP's AttentionPool2d with every position as a query (the attention written out head by head), on
both tiny CLIP towers; the comparison failing when one line changes; image by image; refusals, reset, configs."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from harness.build import check_method
from models.architectures import model_spec
from tests.synthetic import tiny_cfg

N_IMAGES, N_BATCHES = 4, 3
# Measured (fp32): max |logits - reference| = 1.0e-5 (ViT, logits up to ~30) and 6.1e-5 (ResNet, logits up to
# ~200: 4 ulp) on the default CPU path; 1.0e-5 and 4.6e-5 on the AVX2 one (batch of 4 vs 1: 7.6e-5).
TOLERANCE = 2e-4


def _cfg(arch="tiny-clip-test", **overrides):
    return tiny_cfg(MODEL__ARCH=arch, MODEL__ADAPTATION="calip", **overrides)


def _batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(N_IMAGES, 3, 32, 32, generator=generator) for _ in range(N_BATCHES)]


# ------------------------------------------------------------------ the transcription
def reference_vit_tokens(visual, images):
    """CLIPTTA's VisionTransformer.forward with use_local: ln_post and proj on every token."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:      # open_clip's blocks are batch-first
        x = block(x)
    return visual.ln_post(x) @ visual.proj


def reference_resnet_tokens(visual, images):
    """The official CALIP's AttentionPool2d (query = every position), the attention written out per head."""
    pool = visual.attnpool
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    x = x.flatten(2).permute(0, 2, 1)                                    # (B, HW, C)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding
    heads, width = pool.num_heads, x.shape[-1]
    q, k, v = pool.q_proj(x), pool.k_proj(x), pool.v_proj(x)
    outputs = []
    for h in range(heads):
        part = slice(h * width // heads, (h + 1) * width // heads)
        weights = (q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(width // heads)).softmax(-1)
        outputs.append(weights @ v[..., part])
    return pool.c_proj(torch.cat(outputs, dim=-1))


def reference_calip(model, images, beta=(2.0, 0.1), change=None):
    """CLIPTTA's CALIP.forward_and_adapt and new_logits, image by image."""
    with torch.no_grad():
        visual = model.clip.visual
        normalised_images = model.normalize(images)
        tokens_of = reference_resnet_tokens if hasattr(visual, "attnpool") else reference_vit_tokens
        total = tokens_of(visual, normalised_images)
        total = total / total.norm(dim=-1, keepdim=True)
        prototypes = model.text_features()[0]
        global_feat, spatial = total[:, 0, :], total[:, 1:, :].permute(0, 2, 1)
        logits1, logits2 = [], []
        for i, feat_v in enumerate(spatial):
            a_weight = feat_v.permute(1, 0) @ prototypes.t() * (1 if change == "temperature" else 2)
            a_weight1 = F.softmax(a_weight, dim=0)
            a_weight2 = F.softmax(a_weight, dim=1)
            feat_t_a = feat_v @ a_weight1
            feat_v_a = a_weight2 @ prototypes
            feat_v_a = feat_v_a.mean(0) if change == "no_max" else feat_v_a.mean(0) + feat_v_a.max(0)[0]
            logits1.append(100. * global_feat[i] @ feat_t_a)
            logits2.append(100. * feat_v_a @ prototypes.t())
        logits1, logits2 = torch.stack(logits1), torch.stack(logits2)
        clip_logits = global_feat @ prototypes.t()
        if change == "betas_swapped":
            beta = beta[::-1]
        return 100.0 * clip_logits + logits1 * beta[0] + logits2 * beta[1]


def _ours(model, batches, arch="tiny-clip-test", **overrides):
    method = methods.build_method(_cfg(arch, **overrides), model, 10)
    return [method(b) for b in batches]


@pytest.mark.parametrize("tower", ["vit", "resnet"])
@pytest.mark.parametrize("betas", [(2.0, 0.1), (0.7, 1.3)])
def test_calip_matches_the_transcription(tiny_clip, tiny_clip_rn, tower, betas):
    model = tiny_clip if tower == "vit" else tiny_clip_rn
    arch = "tiny-clip-test" if tower == "vit" else "tiny-clip-test-rn"
    reference_model = copy.deepcopy(model)
    batches = _batches()
    ours = _ours(model, batches, arch, CALIP__BETA_2=betas[0], CALIP__BETA_3=betas[1])
    for batch, logits in zip(batches, ours):
        torch.testing.assert_close(logits, reference_calip(reference_model, batch, betas), atol=TOLERANCE, rtol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_the_global_token_is_clips_image_feature(tiny_clip, tiny_clip_rn, tower):
    model = tiny_clip if tower == "vit" else tiny_clip_rn
    method = methods.build_method(_cfg("tiny-clip-test" if tower == "vit" else "tiny-clip-test-rn"), model, 10)
    images = _batches()[0]
    with torch.no_grad():
        tokens = method.image_tokens(images)
        torch.testing.assert_close(tokens[:, 0], model(images, return_features=True).image_features,
                                   atol=1e-6, rtol=0)
    assert tokens.shape[1] == (17 if tower == "vit" else 2)      # 4x4 patches / a 1x1 map, plus the global token


@pytest.mark.parametrize("change", ["temperature", "no_max", "betas_swapped"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, change):
    reference_model = copy.deepcopy(tiny_clip)
    batches = _batches()
    ours = _ours(tiny_clip, batches)
    difference = max(float((logits - reference_calip(reference_model, b, change=change)).abs().max())
                     for b, logits in zip(batches, ours))
    # measured: 6.3 (attention temperature 1), 9.8 (mean without max), 395 (betas swapped); tolerance 2e-4
    assert difference > 10 * TOLERANCE


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_a_batch_of_four_gives_what_four_batches_of_one_give(tiny_clip, tiny_clip_rn, tower):
    model = tiny_clip if tower == "vit" else tiny_clip_rn
    method = methods.build_method(_cfg("tiny-clip-test" if tower == "vit" else "tiny-clip-test-rn"), model, 10)
    images = _batches(1)[0]
    together = method(images)
    alone = torch.cat([method(image) for image in images.split(1)])
    torch.testing.assert_close(together, alone, atol=TOLERANCE, rtol=0)


def test_reset_and_no_parameters(tiny_clip):
    batches = _batches(2)
    method = methods.build_method(_cfg(), tiny_clip, 10)
    assert method.optimizer is None and method.num_trainable_params() == 0
    first = method(batches[0])
    method(batches[1])
    method.reset()
    assert torch.equal(method(batches[0]), first)


def test_bad_calip_config_and_towers_are_refused():
    with pytest.raises(ConfigError, match="CALIP.BETA_2"):
        check_method(_cfg(CALIP__BETA_2=-1.0))
    with pytest.raises(ConfigError, match="CALIP.BETA_3"):
        check_method(_cfg(CALIP__BETA_3=-0.5))
    spec = model_spec("tiny-clip-test")
    timm = type(spec)(**{**spec.__dict__, "image_tower": "timm"})
    with pytest.raises(ConfigError, match="timm tower"):
        check_method(_cfg(), timm)
    check_method(_cfg("tiny-clip-test-rn"))


def test_shipped_configs_are_clipttas():
    for dataset in ("cifar10_c", "cifar100_c", "imagenet_c", "shapes_c"):
        cfg = tiny_cfg(f"conf/{dataset}/calip.yaml")
        assert (cfg.CALIP.BETA_2, cfg.CALIP.BETA_3) == (2.0, 0.1), dataset
