"""C-TPT (methods/ctpt.py) against a plain transcription of its reference's per-image loop (hee-suk-yoon/C-TPT,
tpt_classification.py ``test_time_tuning`` with ``run_type tpt_ctpt``, clip/custom_clip.py ``inference``)."""
import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from harness.build import check_method
from methods.augmentations import AugmentedViews
from methods.ctpt import text_feature_dispersion
from tests.synthetic import tiny_cfg
from tests.test_tpt import (adamw_step, assert_only_the_context_changes, assert_reset_restores_the_prompt,
                             reference_avg_entropy, reference_text_features)

CFG_FILE = "conf/cifar10_c/ctpt.yaml"
N_VIEWS, SELECTION_P = 8, 0.25          # keeps 2 views; the YAMLs' 64 / 0.1 keep 6


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "CTPT__SELECTION_P": SELECTION_P, **overrides})


def _l2_norm_mean(text_features):
    """custom_clip.py's l2_norm_mean written as loops: the centroid of the class features, then the mean over
    classes of each one's Euclidean distance to it."""
    n_classes, dim = text_features.shape
    centroid = sum(text_features[c] for c in range(n_classes)) / n_classes
    distances = [sum((text_features[c, d] - centroid[d]) ** 2 for d in range(dim)).sqrt() for c in range(n_classes)]
    return sum(distances) / n_classes


def _reference_ctpt(model, images, seed, steps, episodic, lambda_, augmentation="crop_flip", lr=5e-3, wd=0.01, k=2,
                    sign=-1.0):
    """C-TPT's per-image loop written out plainly: per image, the views (same seed, image by image), features one
    view at a time, python-sorted entropies, loss = avg_entropy(selected) + sign * lambda * l2_norm_mean (the
    reference: sign -1), hand-written AdamW, then the original view classified with the tuned prompt."""
    clip = model.clip
    views = AugmentedViews(N_VIEWS, augmentation, seed=seed)
    ctx0 = clip.token_embedding(open_clip.get_tokenizer("tiny-clip-test")(["a photo of a"]))[0, 1:5].detach()
    ctx, m, v, t = ctx0.clone(), torch.zeros_like(ctx0), torch.zeros_like(ctx0), 0
    scale = clip.logit_scale.exp().item()
    outputs = []
    for image in images:
        image_views = views(image[None])[0]
        if episodic:
            ctx, m, v, t = ctx0.clone(), torch.zeros_like(ctx0), torch.zeros_like(ctx0), 0
        feats = torch.stack([F.normalize(model.encode_image(view[None])[0], dim=-1) for view in image_views])
        feats = feats.detach()
        selected = None
        for _ in range(steps):
            ctx_var = ctx.clone().requires_grad_(True)
            text = reference_text_features(clip, ctx_var)
            logits = scale * feats @ text.t()
            if selected is None:
                ent = [-(p * p.log()).sum().item() for p in logits.detach().softmax(-1)]
                selected = sorted(range(N_VIEWS), key=lambda i: ent[i])[:k]
            loss = reference_avg_entropy(logits[selected])
            loss = loss + sign * lambda_ * _l2_norm_mean(text)
            (grad,) = torch.autograd.grad(loss, ctx_var)
            t += 1
            ctx, m, v = adamw_step(ctx, grad, m, v, t, lr, wd)
        with torch.no_grad():
            outputs.append(scale * feats[:1] @ reference_text_features(clip, ctx).t())
    return torch.cat(outputs), ctx


def _run(tiny_clip, images, **cfg):
    method = methods.build_method(_cfg(RNG_SEED=3, **cfg), tiny_clip, 10)
    return method(images), method.prompt_learner.ctx.detach().clone(), method


def test_dispersion_is_the_references_l2_norm_mean():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(7, 5), dim=-1)
    reference = torch.linalg.norm(text - text.mean(0), dim=-1).mean()      # custom_clip.py, as written
    assert torch.equal(text_feature_dispersion(text), reference)
    torch.testing.assert_close(text_feature_dispersion(text), _l2_norm_mean(text), atol=1e-6, rtol=0)
    same = text[:1].expand(4, -1)
    assert text_feature_dispersion(same) == 0                               # identical classes: no dispersion
    opposite = torch.stack([text[0], -text[0]])
    torch.testing.assert_close(text_feature_dispersion(opposite), torch.tensor(1.0))   # unit vectors, centroid 0


@pytest.mark.parametrize("episodic,steps,augmentation,lambda_", [
    (True, 1, "crop_flip", 50.0), (True, 2, "augmix", 20.0), (False, 1, "crop_flip", 50.0),
    (True, 3, "crop_flip", 5.0)])
def test_ctpt_matches_plain_reference(tiny_clip, episodic, steps, augmentation, lambda_):
    reference_model = copy.deepcopy(tiny_clip)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    out, ctx, method = _run(tiny_clip, images, MODEL__EPISODIC=episodic, OPTIM__STEPS=steps,
                            CTPT__VIEW_AUGMENTATION=augmentation, CTPT__LAMBDA=lambda_)
    assert method.views_per_image == N_VIEWS and method.n_selected == 2
    ref_out, ref_ctx = _reference_ctpt(reference_model, images, seed=3, steps=steps, episodic=episodic,
                                       lambda_=lambda_, augmentation=augmentation)
    # measured: logits within 4e-6, context within 1e-7 (fp32 rounding of the two orders of summation)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(ctx, ref_ctx, atol=1e-6, rtol=0)


@pytest.mark.parametrize("changed", ["sign", "no_dispersion", "lambda"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, changed):
    """The dispersion term moves the prompt well beyond the tolerance of the comparison above: with its sign
    flipped, without it, or with another lambda, the transcription no longer matches."""
    reference_model = copy.deepcopy(tiny_clip)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    out, ctx, _ = _run(tiny_clip, images, CTPT__LAMBDA=50.0)
    kwargs = {"sign": dict(sign=1.0, lambda_=50.0), "no_dispersion": dict(lambda_=0.0),
              "lambda": dict(lambda_=20.0)}[changed]
    ref_out, ref_ctx = _reference_ctpt(reference_model, images, seed=3, steps=1, episodic=True, **kwargs)
    assert not torch.allclose(ctx, ref_ctx, atol=1e-6, rtol=0)
    assert (ctx - ref_ctx).abs().max() > 1000 * 1e-6      # measured: 0.01 for the flipped sign (two Adam steps)


def test_lambda_zero_is_tpt_bit_for_bit(tiny_clip):
    """One image (a batch of several draws TPT's views for the whole batch at once, C-TPT's image by image)."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    out, ctx, _ = _run(copy.deepcopy(tiny_clip), images, CTPT__LAMBDA=0.0)
    tpt = methods.build_method(tiny_cfg("conf/cifar10_c/tpt.yaml", TEST__N_AUGMENTATIONS=N_VIEWS,
                                        TPT__SELECTION_P=SELECTION_P, RNG_SEED=3), tiny_clip, 10)
    assert torch.equal(out, tpt(images)) and torch.equal(ctx, tpt.prompt_learner.ctx.detach())


def test_the_dispersion_grows_as_the_reference_intends(tiny_clip):
    """One step with lambda 50 raises the ATFD of the tuned prompt above the initial prompt's (the term is
    maximised), and above what plain entropy minimisation (lambda 0) leaves."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    _, _, ctpt = _run(copy.deepcopy(tiny_clip), images, CTPT__LAMBDA=50.0)
    _, _, plain = _run(copy.deepcopy(tiny_clip), images, CTPT__LAMBDA=0.0)
    initial = text_feature_dispersion(tiny_clip.text_features()[0])
    with torch.no_grad():
        assert text_feature_dispersion(ctpt.text_features()) > initial
        assert text_feature_dispersion(ctpt.text_features()) > text_feature_dispersion(plain.text_features())


def test_a_batch_of_four_gives_what_four_batches_of_one_give(tiny_clip):
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32)
    cfg = _cfg(RNG_SEED=3, CTPT__VIEW_AUGMENTATION="augmix")
    batched = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    single = methods.build_method(cfg, tiny_clip, 10)
    out4 = batched(images)
    out1 = torch.cat([single(b) for b in images.split(1)])
    torch.testing.assert_close(out4, out1, atol=1e-5, rtol=1e-6)
    assert out4.argmax(1).tolist() == out1.argmax(1).tolist()


def test_only_the_context_tokens_change(tiny_clip):
    assert_only_the_context_changes(methods.build_method(_cfg(), tiny_clip, 10), tiny_clip, torch.rand(2, 3, 32, 32))


def test_reset_restores_all_state_exactly(tiny_clip):
    cfg = _cfg()
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    method = methods.build_method(cfg, tiny_clip, 10)
    assert_reset_restores_the_prompt(fresh, method, N_VIEWS, cfg.RNG_SEED)


def test_bad_ctpt_config_is_refused():
    with pytest.raises(ConfigError, match="CTPT.N_CTX"):
        check_method(_cfg(CTPT__N_CTX=3))
    with pytest.raises(ConfigError, match="CTPT.LAMBDA"):
        check_method(_cfg(CTPT__LAMBDA=-1.0))
    with pytest.raises(ConfigError, match="CTPT.CLASS_TOKEN_POS"):
        check_method(_cfg(CTPT__CLASS_TOKEN_POS="front"))
    with pytest.raises(ConfigError, match="CTPT.SELECTION_P"):
        check_method(_cfg(CTPT__SELECTION_P=0.1))


def test_shipped_lambdas_and_views_are_the_reference_scripts():
    from harness.build import load_cfg
    for dataset, lambda_, views in [("imagenet_c", 50.0, "crop_flip"), ("imagenet_a", 20.0, "augmix"),
                                    ("imagenet_sketch", 20.0, "augmix"), ("dtd", 50.0, "augmix"),
                                    ("eurosat", 50.0, "augmix")]:
        cfg = load_cfg(f"conf/{dataset}/ctpt.yaml")
        assert (cfg.CTPT.LAMBDA, cfg.CTPT.VIEW_AUGMENTATION) == (lambda_, views), dataset
        assert (cfg.TEST.N_AUGMENTATIONS, cfg.CTPT.SELECTION_P, cfg.OPTIM.LR, cfg.OPTIM.STEPS) == (64, 0.1, 5e-3, 1)
    assert math.isclose(load_cfg("conf/cifar10_c/ctpt.yaml").CTPT.LAMBDA, 50.0)

