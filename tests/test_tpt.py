import copy

import open_clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from harness.build import check_method
from methods.augmentations import AugmentedViews
from methods.losses import marginal_entropy
from tests.synthetic import reproducible_run_on_cifar10c, tiny_cfg

CFG_FILE = "conf/cifar10_c/tpt.yaml"
N_VIEWS, SELECTION_P = 8, 0.25          # keeps 2 views; the YAMLs' 64 / 0.1 keep 6



def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "TPT__SELECTION_P": SELECTION_P, **overrides})


def reference_text_features(clip, ctx):
    """CLIP's text tower written out on the full, untruncated 77 tokens, with positions 1..n of
    "a photo of a <name>." replaced by ctx."""
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    from datasets.class_names import CIFAR10_CLASSES
    tokens = tokenizer([f"a photo of a {c}." for c in CIFAR10_CLASSES])
    x = clip.token_embedding(tokens)
    x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(len(tokens), -1, -1), x[:, 1 + ctx.shape[0]:]], dim=1)
    x = clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(-1)] @ clip.text_projection
    return F.normalize(x, dim=-1)


def adamw_step(ctx, grad, m, v, t, lr, wd):
    """One AdamW step written out (betas 0.9 / 0.999, eps 1e-8; decoupled weight decay first), as torch's AdamW
    computes it: (ctx, m, v) after step number t."""
    ctx = ctx * (1 - lr * wd)
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad ** 2
    return ctx - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8), m, v


def _reference_tpt(model, images, seed, steps, episodic, augmentation="crop_flip", lr=5e-3, wd=0.01, k=2):
    """TPT written out plainly: per image, views (same seed), features one view at a time, python-sorted
    entropies, entropy of the mean probability, hand-written AdamW, prediction of the original view."""
    clip = model.clip
    views = AugmentedViews(N_VIEWS, augmentation, seed=seed)(images)
    ctx0 = clip.token_embedding(open_clip.get_tokenizer("tiny-clip-test")(["a photo of a"]))[0, 1:5].detach()
    ctx, m, v, t = ctx0.clone(), torch.zeros_like(ctx0), torch.zeros_like(ctx0), 0
    scale = clip.logit_scale.exp().item()
    outputs = []
    for image_views in views:
        if episodic:
            ctx, m, v, t = ctx0.clone(), torch.zeros_like(ctx0), torch.zeros_like(ctx0), 0
        feats = torch.stack([F.normalize(model.encode_image(view[None])[0], dim=-1) for view in image_views])
        feats = feats.detach()
        selected = None
        for _ in range(steps):
            ctx_var = ctx.clone().requires_grad_(True)
            logits = scale * feats @ reference_text_features(clip, ctx_var).t()
            if selected is None:
                ent = [-(p * p.log()).sum().item() for p in logits.detach().softmax(-1)]
                selected = sorted(range(N_VIEWS), key=lambda i: ent[i])[:k]
            mean_p = logits[selected].softmax(-1).mean(0)
            loss = -(mean_p * mean_p.log()).sum()
            (grad,) = torch.autograd.grad(loss, ctx_var)
            t += 1
            ctx, m, v = adamw_step(ctx, grad, m, v, t, lr, wd)
        with torch.no_grad():
            outputs.append(scale * feats[:1] @ reference_text_features(clip, ctx).t())
    return torch.cat(outputs), ctx


def assert_reset_restores_the_prompt(fresh, method, n_views: int, seed: int) -> None:
    """After two batches, ``reset()`` of a prompt-tuning ``method`` gives back the initial context, an empty
    optimizer state, the view stream's start and no update count: it then predicts what ``fresh`` (the same method
    built anew) predicts."""
    images = torch.rand(2, 3, 32, 32)
    expected = fresh(images)
    method(torch.rand(3, 3, 32, 32))
    method(torch.rand(1, 3, 32, 32))
    assert method.optimizer.state_dict()["state"]                      # something to restore
    method.reset()
    assert torch.equal(method.prompt_learner.ctx, fresh.prompt_learner.ctx_init)
    assert method.optimizer.state_dict()["state"] == {}
    assert torch.equal(method.views.rng_state(), AugmentedViews(n_views, seed=seed).rng_state())
    assert method.performed_updates == 0
    assert torch.equal(method(images), expected)


def assert_only_the_context_changes(method, clip, images) -> None:
    """``method`` adapts the 4 x 32 context tokens of its prompt and nothing else: every parameter and buffer of
    ``clip`` (the model it was built on) stays bit-identical and frozen, and the per-image reset's snapshot holds
    the context alone (so it is cheap)."""
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    ctx0 = method.prompt_learner.ctx.detach().clone()
    assert method.param_names == ["prompt_learner.ctx"] and method.num_trainable_params() == 4 * 32
    method(images)
    after = clip.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(method.prompt_learner.ctx.detach(), ctx0)
    assert all(not p.requires_grad for p in clip.parameters())
    assert list(method._snapshot["module"]) == ["prompt_learner.ctx"]


def reference_avg_entropy(outputs):
    """TPT's ``avg_entropy`` as its code (and TDA's and DPE's copies) writes it, line by line."""
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    min_real = torch.finfo(avg_logits.dtype).min
    avg_logits = torch.clamp(avg_logits, min=min_real)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


@pytest.mark.parametrize("sharpness", [1.0, 15.0, 100.0, "one-hot"])
def test_marginal_entropy_is_the_references_to_the_bit_value_and_gradient(sharpness):
    """Bit for bit the references' fp32 value and gradient, also where the softmax is nearly one-hot (DPE's
    caltech101 setting scales cosines by 100 and its cache by alpha 15): there the fp32 gradient is mostly
    rounding (measured against fp64 below), and only the references' own formula reproduces their updates."""
    g = torch.Generator().manual_seed(3)
    if sharpness == "one-hot":      # every view gives class 0 a probability of 1 - 1e-8 or more
        base = torch.randn(6, 10, generator=g)
        base[:, 0] += 20.0
    else:
        base = torch.randn(6, 10, generator=g) * sharpness
    ours, theirs = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    value, expected = marginal_entropy(ours), reference_avg_entropy(theirs)
    value.backward()
    expected.backward()
    assert torch.equal(value, expected) and torch.equal(ours.grad, theirs.grad)
    exact = base.double().requires_grad_(True)
    reference_avg_entropy(exact).backward()
    relative = float((ours.grad.double() - exact.grad).norm() / exact.grad.norm())
    if sharpness == 1.0:
        assert relative < 1e-5      # fp32 is exact to its precision
    if sharpness == "one-hot":
        assert relative > 0.1       # the fp32 gradient is led by rounding (docs/dpe.md)
    log_softmax_form = base.clone().requires_grad_(True)
    p = log_softmax_form.log_softmax(-1)
    (-(torch.logsumexp(p, 0) - np.log(6)).exp().mul(torch.logsumexp(p, 0) - np.log(6)).sum()).backward()
    if sharpness != 1.0:        # the other way of writing it rounds otherwise: not the references' update
        assert not torch.equal(log_softmax_form.grad, ours.grad)


def test_marginal_entropy_is_entropy_of_mean_probability():
    torch.manual_seed(0)
    logits = torch.randn(5, 7) * 4
    p = logits.softmax(-1).mean(0)
    assert torch.allclose(marginal_entropy(logits), -(p * p.log()).sum(), atol=1e-6)
    assert torch.allclose(marginal_entropy(logits[:1]), -(logits[0].softmax(-1) * logits[0].log_softmax(-1)).sum())


def test_initial_prompt_gives_the_zero_shot_text_features(tiny_clip):
    method = methods.build_method(_cfg(), tiny_clip, 10)
    assert method.prompt_learner.ctx.shape == (4, 32)
    assert method.prompt_learner.tokens.shape[1] < 77                 # truncated to the longest prompt
    zero_shot = tiny_clip.text_features()[0]
    torch.testing.assert_close(method.text_features(), zero_shot, atol=1e-6, rtol=0)
    ctx0 = method.prompt_learner.ctx.detach()
    torch.testing.assert_close(reference_text_features(tiny_clip.clip, ctx0), zero_shot, atol=1e-6, rtol=0)


@pytest.mark.parametrize("episodic,steps,augmentation",
                         [(True, 1, "crop_flip"), (False, 1, "crop_flip"), (True, 2, "crop_flip"), (True, 1, "augmix")])
def test_tpt_matches_plain_reference(tiny_clip, episodic, steps, augmentation):
    reference_model = copy.deepcopy(tiny_clip)
    cfg = _cfg(MODEL__EPISODIC=episodic, OPTIM__STEPS=steps, RNG_SEED=3, TPT__VIEW_AUGMENTATION=augmentation)
    method = methods.build_method(cfg, tiny_clip, 10)
    assert method.views_per_image == N_VIEWS and method.n_selected == 2
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    out = method(images)
    ref_out, ref_ctx = _reference_tpt(reference_model, images, seed=3, steps=steps, episodic=episodic,
                                      augmentation=augmentation)
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(method.prompt_learner.ctx.detach(), ref_ctx, atol=1e-6, rtol=1e-5)


def test_only_the_context_tokens_change(tiny_clip):
    assert_only_the_context_changes(methods.build_method(_cfg(), tiny_clip, 10), tiny_clip, torch.rand(2, 3, 32, 32))


def test_reset_restores_all_state_exactly(tiny_clip):
    cfg = _cfg()
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    method = methods.build_method(cfg, tiny_clip, 10)
    images = torch.rand(1, 3, 32, 32)
    expected = fresh(images)
    method(torch.rand(3, 3, 32, 32))
    method(torch.rand(1, 3, 32, 32))
    assert method.optimizer.state_dict()["state"]                      # something to restore
    method.reset()
    assert torch.equal(method.prompt_learner.ctx, methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
                       .prompt_learner.ctx)
    assert method.optimizer.state_dict()["state"] == {}
    assert torch.equal(method.views.rng_state(), AugmentedViews(N_VIEWS, seed=cfg.RNG_SEED).rng_state())
    assert method.performed_updates == 0
    assert torch.equal(method(images), expected)                       # behaves exactly as a fresh method


def test_per_image_reset_is_cheap(tiny_clip):
    method = methods.build_method(_cfg(), tiny_clip, 10)
    assert list(method._snapshot["module"]) == ["prompt_learner.ctx"]  # no frozen CLIP weight, no token buffer


def test_bad_tpt_config_is_refused(tiny_clip):
    with pytest.raises(ConfigError, match="TPT.N_CTX"):
        check_method(_cfg(TPT__N_CTX=3))
    with pytest.raises(ConfigError, match="TPT.CLASS_TOKEN_POS"):
        check_method(_cfg(TPT__CLASS_TOKEN_POS="front"))
    with pytest.raises(ConfigError, match="TPT.SELECTION_P"):
        check_method(_cfg(TPT__SELECTION_P=0.1))
    with pytest.raises(ConfigError, match="TPT.VIEW_AUGMENTATION"):
        check_method(_cfg(TPT__VIEW_AUGMENTATION="mixup"))


def test_tpt_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise"], 5, TEST__BATCH_SIZE=2)
    assert payload["provenance"]["adapted_parameters"] == 4 * 32
    assert payload["provenance"]["method_cost"] == {
        "views_per_image": N_VIEWS, "text_forward_passes_per_image": 2, "backward_passes_per_image": 1}
