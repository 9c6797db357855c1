"""OSTTA (methods/ostta.py) against an independent transcription of CLIPTTA's OSTTA.forward_and_adapt
(ttavlm/methods/ostta.py, with AbstractOpenSetTTAModel's forward, optimizer and parameters) on the tiny CLIPs (ViT
and ResNet towers): logits of every batch, adapted parameters and Adam state over three batches of three steps, with
steps that keep every image, some and none; the comparison fails when one line of the transcription changes; the
source model without a copy, reset, the own OOD score, refusals, the shipped configs."""
import copy

import pytest
import torch

import methods
from conf import ConfigError
from harness.build import check_method
from tests.cliptta_reference import norm_params, softmax_entropy
from tests.synthetic import tiny_cfg

CFG_FILE = "conf/cifar10_c/ostta.yaml"
BATCH = 8
STEPS = 3
# Measured max |difference| over the comparisons below: 0 for logits and parameters on both CPU code paths (the
# same operations in the same order); the tolerances leave room for other kernels. The one-line changes move the
# logits by 7.98 to 18.7 (both paths), over 3e5 times LOGIT_TOL. Without CLIPTTA's 1e-6 shift of the logits in the
# entropies (methods/ostta.py ENTROPY_EPS = 0) the logits differ by 1.3e-4 and the parameters by 2.9e-5 (measured).
LOGIT_TOL = 2e-5
PARAM_TOL = 2e-7
# Settings whose steps keep all, some and no images (kept counts per step on the three batches, measured):
# ViT [[8, 8, 0], [1, 0, 0], [0, 0, 0]] (the fallback runs; with EMPTY_FILTER skip [[8, 8, 0], [5, 7, 8], [8, 8, 8]]),
# ResNet [[8, 8, 8], [8, 8, 8], [6, 5, 5]].
SETTINGS = {"vit": dict(OPTIM__LR=1e-2, OSTTA__BETA_REG=1.0, OSTTA__MARGIN=-0.5),
            "rn": dict(OPTIM__LR=3e-3, OSTTA__BETA_REG=0.1, OSTTA__MARGIN=-0.1, MODEL__ARCH="tiny-clip-test-rn")}


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def _images(seed, n=BATCH):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the transcription
def softmax_mean_entropy(x, eps=1e-6):
    """CLIPTTA's lib.softmax_mean_entropy."""
    x = (x + eps).softmax(1).mean(0)
    return -(x * torch.log(x + eps)).sum()


def _transcription(model, batches, node, optim, steps, mutation=None):
    """CLIPTTA's OSTTA on a deep copy: configure_model (train mode, norm affine parameters free), Adam eps 1e-6,
    model0 = deepcopy(model) after it; per batch ``steps`` forward_and_adapt calls, the last one's no-grad forward
    reported (times logit_scale, as get_results' softmax(100 * cos)). ``empty`` "skip" is our extension."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.clip.visual.train()
    params = norm_params(ref)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=optim.LR, weight_decay=optim.WD, eps=1e-6)
    model0 = copy.deepcopy(ref)
    text = ref.text_features()[0]

    def get_logits(net, x):   # get_features (normalize_features True for CLIP) + get_logits (class bias 0)
        f = net.clip.encode_image(net.normalize(x))
        return (f / f.norm(dim=-1, keepdim=True)) @ text.t()

    def forward_and_adapt(x, step):
        with torch.no_grad():
            logits0 = get_logits(ref if mutation == "source_is_the_adapted_model" else model0, x)
            prob0 = (node.LOGIT_SCALE * logits0).softmax(1)
            values0, indices0 = prob0.max(1)
        with torch.enable_grad():
            logits = get_logits(ref, x)
            prob = (node.LOGIT_SCALE * logits).softmax(1)
            values = prob[torch.arange(prob0.size(0)), indices0]
            entropys = softmax_entropy(node.LOGIT_SCALE * logits)
            filter_ids = values - values0 >= node.MARGIN
            if mutation == "filter_reversed":
                filter_ids = values - values0 <= node.MARGIN
            if len(entropys[filter_ids]) > 0:
                loss_tta = entropys[filter_ids].mean(0)
            elif node.EMPTY_FILTER == "skip" or mutation == "no_fallback":
                loss_tta = 0.0
            else:
                loss_tta = entropys.mean(0)
            loss_reg = softmax_mean_entropy(node.LOGIT_SCALE * logits)
            sign = 1.0 if mutation == "regulariser_added" else -1.0
            loss = node.BETA_TTA * loss_tta + sign * node.BETA_REG * loss_reg
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == steps - 1:
            with torch.no_grad():
                return get_logits(ref, x)
        return None

    outputs = []
    for x in batches:
        for step in range(steps):
            logits = forward_and_adapt(x, step)
        outputs.append(node.LOGIT_SCALE * logits)
    return outputs, params, optimizer


def _tower(request, tower):
    return request.getfixturevalue("tiny_clip" if tower == "vit" else "tiny_clip_rn")


def _run_both(request, tower, mutation=None, **overrides):
    model = _tower(request, tower)
    cfg = _cfg(OPTIM__STEPS=STEPS, **{**SETTINGS[tower], **overrides})
    batches = [_images(s) for s in (1, 2, 3)]
    request.node.source_params = [p.detach().clone() for p in norm_params(model)]
    want, ref_params, ref_opt = _transcription(model, batches, cfg.OSTTA, cfg.OPTIM, STEPS, mutation)
    method = methods.build_method(cfg, model, 10)
    got, kept = [], []
    for x in batches:
        got.append(method(x))
        kept.append(method.kept_per_step)
    return method, got, want, ref_params, ref_opt, kept


@pytest.mark.parametrize("tower,empty", [("vit", "batch"), ("rn", "batch"), ("vit", "skip")])
def test_three_batches_equal_the_transcription(request, tower, empty):
    method, got, want, ref_params, ref_opt, kept = _run_both(request, tower, OSTTA__EMPTY_FILTER=empty)
    steps = [k for per_batch in kept for k in per_batch]
    assert BATCH in steps and any(0 < k < BATCH for k in steps)       # all kept, and some
    assert tower == "rn" or 0 in steps                                 # none kept: the EMPTY_FILTER rule runs
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=LOGIT_TOL)
    assert len(method.params) == len(ref_params)
    assert any(not torch.equal(p, q) for p, q in zip(method.params, request.node.source_params))
    for p, q in zip(method.params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_TOL)
    for p, q in zip(method.params, ref_params):
        state, theirs = method.optimizer.state[p], ref_opt.state[q]
        assert int(state["step"]) == int(theirs["step"]) == 3 * STEPS
        torch.testing.assert_close(state["exp_avg"], theirs["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"], theirs["exp_avg_sq"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("mutation", ["filter_reversed", "no_fallback", "regulariser_added",
                                      "source_is_the_adapted_model"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(request, mutation):
    _, got, want, _, _, _ = _run_both(request, "vit", mutation)
    logit_gap = max(float((a - b).abs().max()) for a, b in zip(got, want))
    assert logit_gap > 10 * LOGIT_TOL, (mutation, logit_gap)


# ---------------------------------------------------------------------- the source model, state, protocol
def test_the_source_model_is_the_adapted_one_with_the_source_values_not_a_copy(tiny_clip):
    source = copy.deepcopy(tiny_clip)
    method = methods.build_method(_cfg(OPTIM__STEPS=STEPS, **SETTINGS["vit"]), tiny_clip, 10)
    assert sorted(method.source_values) == sorted(method.param_names)      # only the adapted parameters
    assert not any(isinstance(m, type(tiny_clip.clip.visual)) for m in method.modules()
                   if m is not tiny_clip.clip.visual)
    x = _images(1)
    method(x)
    with torch.no_grad():
        want = torch.nn.functional.normalize(source.encode_image(x), dim=-1) @ source.text_features()[0].t()
        torch.testing.assert_close(method.cosines(x, source=True), want, rtol=0, atol=0)
        assert not torch.equal(method.cosines(x), want)                    # the model itself has moved


def test_reset_restores_all_state_exactly(tiny_clip):
    method = methods.build_method(_cfg(OPTIM__STEPS=STEPS, **SETTINGS["vit"]), tiny_clip, 10)
    fresh_state = {k: v.clone() for k, v in method.state_dict().items()}
    fresh_optimizer = str(method.optimizer.state_dict())
    first = [method(_images(s)) for s in (1, 2, 3)]
    method.reset()
    assert method.source_confidence is None and method.last_cosines is None
    for key, value in method.state_dict().items():
        assert torch.equal(value, fresh_state[key]), key
    assert str(method.optimizer.state_dict()) == fresh_optimizer
    again = [method(_images(s)) for s in (1, 2, 3)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_reported_logits_are_those_after_the_batchs_update(tiny_clip):
    method = methods.build_method(_cfg(**SETTINGS["vit"]), tiny_clip, 10)
    x = _images(1)
    out = method(x)
    assert method.protocol == methods.base.ADAPT_THEN_PREDICT
    torch.testing.assert_close(out, 100.0 * method.cosines(x).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("score_type,scale", [("max_prob", 1.0), ("logsumexp", 2.0), ("entropy", 1.0)])
def test_the_own_ood_score_is_get_scores_of_the_reported_cosines(tiny_clip, score_type, scale):
    method = methods.build_method(_cfg(OSTTA__SCORE_TYPE=score_type, OSTTA__OOD_LOGIT_SCALE=scale,
                                       **SETTINGS["vit"]), tiny_clip, 10)
    assert method.own_ood_score
    x = _images(2)
    out = method(x)
    cosines = (out / 100.0).double() * scale                  # by hand, in float64, from the reported logits
    hand = {"max_prob": lambda c: c.softmax(1).max(1).values, "logsumexp": lambda c: c.logsumexp(1),
            "entropy": lambda c: (c.softmax(1) * c.softmax(1).log()).sum(1)}[score_type](cosines)
    torch.testing.assert_close(method.ood_scores(out).double(), hand, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="the batch the method just reported"):
        method.ood_scores(out[:3])


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides,message", [
    ({"OSTTA__MARGIN": 1.5}, r"OSTTA.MARGIN = 1.5"),
    ({"OSTTA__EMPTY_FILTER": "none"}, r"OSTTA.EMPTY_FILTER = 'none'"),
    ({"OSTTA__SCORE_TYPE": "energy"}, r"OSTTA.SCORE_TYPE = 'energy'"),
    ({"OSTTA__OOD_LOGIT_SCALE": 0.0}, r"OSTTA.OOD_LOGIT_SCALE = 0.0"),
    ({"OSTTA__BETA_REG": -1.0}, r"OSTTA.BETA_REG = -1.0"),
    ({"OSTTA__LOGIT_SCALE": 0.0}, r"OSTTA.LOGIT_SCALE = 0.0"),
    ({"CLIP__FREEZE_TEXT_ENCODER": False}, r"FREEZE_TEXT_ENCODER must be True"),
    ({"CLIP__PRECISION": "fp16"}, r"CLIP.PRECISION fp32"),
])
def test_refusals_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_method(_cfg(**overrides))


def test_both_towers_are_served():
    check_method(_cfg())
    check_method(_cfg(MODEL__ARCH="tiny-clip-test-rn"))


def test_shipped_configs_are_the_open_set_scripts_values():
    for dataset in ("cifar10_c", "cifar100_c", "imagenet_c", "shapes_c"):
        cfg = tiny_cfg(f"conf/{dataset}/ostta.yaml")
        assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.OPTIM.STEPS, cfg.OPTIM.WD, cfg.TEST.BATCH_SIZE) == \
            ("Adam", 1e-4, 10, 0.0, 128)
        node = cfg.OSTTA
        assert (node.MARGIN, node.EMPTY_FILTER, node.BETA_TTA, node.BETA_REG, node.LOGIT_SCALE, node.SCORE_TYPE,
                node.OOD_LOGIT_SCALE, node.ADAM_EPS) == (0.4, "batch", 1.0, 1.0, 100.0, "max_prob", 1.0, 1e-6)
