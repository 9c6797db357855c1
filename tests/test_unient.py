"""UniEnt (methods/unient.py) against sklearn's GaussianMixture (test-only dependency) and an independent
transcription of CLIPTTA's UniEnt.forward_and_adapt (ttavlm/methods/unient.py; the official code's criteria for
the "hard" weighting) on the tiny CLIPs: the EM given the same initial parameters, the deterministic 2-means
initialisation, the component-order rule; logits, adapted parameters, Adam state and own OOD scores of every batch
over three batches; the one-line-change test; reset; refusals; the shipped configs."""
import copy
import itertools

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

import methods
from conf import ConfigError
from harness.build import check_method
from methods.unient import fit_two_gaussians, id_weights, initial_gaussians, two_means_labels
from tests.cliptta_reference import norm_params, softmax_entropy
from tests.synthetic import tiny_cfg

CFG_FILE = "conf/cifar10_c/unient.yaml"
BATCH = 8
# Measured max |difference| (both CPU code paths): EM responsibilities and means against sklearn 0 (float32 and
# float64 data: the same numpy operations in sklearn's order); method against the transcription (which runs
# sklearn itself): logits, parameters and own scores 0. The tolerances leave room for other kernels. The one-line
# changes move the logits by 1.67 to 14.8, over 8e4 times LOGIT_TOL.
EM_TOL = {np.float32: 1e-7, np.float64: 1e-12}
LOGIT_TOL = 2e-5
PARAM_TOL = 2e-7


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def _images(seed, n=BATCH):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _score_vectors():
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0.2, 0.05, 20), rng.normal(0.8, 0.1, 12)])
    yield np.clip(bimodal, 0, 1)
    yield rng.uniform(0, 1, 16)
    yield np.array([0.0, 0.0, 0.1, 0.1, 0.1, 0.9, 1.0, 1.0])          # ties
    yield np.array([0.0, 1.0])                                         # two images
    yield np.concatenate([[0.0], rng.uniform(0.7, 1.0, 30)])           # one outlier


# ---------------------------------------------------------------------- the Gaussian mixture
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_em_equals_sklearn_given_the_same_initial_parameters(dtype):
    for values in _score_vectors():
        x = values.astype(dtype)[:, None]
        weights, means, precision_chol = initial_gaussians(x)
        weights = weights / weights.sum()          # sklearn requires weights_init to sum to 1
        gm = GaussianMixture(n_components=2, weights_init=weights, means_init=means,
                             precisions_init=precision_chol ** 2).fit(x)
        resp, fitted_means, converged = fit_two_gaussians(x, weights, means, precision_chol)
        np.testing.assert_allclose(resp, gm.predict_proba(x), rtol=0, atol=EM_TOL[dtype])
        np.testing.assert_allclose(fitted_means, gm.means_, rtol=0, atol=EM_TOL[dtype])
        assert converged == gm.converged_


def _within_group_sse(values, labels):
    return sum(((values[labels == g] - values[labels == g].mean()) ** 2).sum() for g in (0, 1))


def test_the_initial_split_is_the_optimal_two_group_split():
    # brute force over every labelling with two non-empty groups: the least within-group sum of squares
    for values in _score_vectors():
        values = values[:14]
        best = min(_within_group_sse(values, np.array(lab)) for lab in itertools.product((0, 1), repeat=len(values))
                   if 0 < sum(lab) < len(values))
        labels = two_means_labels(values)
        assert _within_group_sse(values, labels) == pytest.approx(best, abs=1e-12)
        assert values[labels == 0].max() < values[labels == 1].min()     # the lower group is component 0


def test_default_sklearn_fit_agrees_where_its_kmeans_finds_the_optimal_split():
    max_probs = torch.from_numpy(next(_score_vectors()).astype(np.float32))
    ood = (1 - (max_probs - max_probs.min()) / (max_probs.max() - max_probs.min())).numpy()[:, None]
    ours, _ = id_weights(max_probs)
    for seed in range(3):       # the reference's k-means++ draws: several, all find the same split here
        gm = GaussianMixture(n_components=2, random_state=seed).fit(ood)
        weight = gm.predict_proba(ood)
        weight = weight if gm.means_[0, 0] < gm.means_[1, 0] else 1 - weight
        np.testing.assert_allclose(ours.numpy(), weight[:, 0], rtol=0, atol=1e-5)


def test_component_order_rule_one_minus_the_weights():
    # A mixture whose component 0 is the upper one: the code takes 1 - weight, whose column 0 is the ID posterior.
    x = next(_score_vectors()).astype(np.float64)[:, None]
    initial = initial_gaussians(x)
    resp, fitted_means, _ = fit_two_gaussians(x, *[part[::-1].copy() for part in initial])
    assert fitted_means[0, 0] > fitted_means[1, 0]
    straight, _, _ = fit_two_gaussians(x, *initial)
    np.testing.assert_allclose((1 - resp)[:, 0], straight[:, 0], rtol=0, atol=1e-12)


def test_a_batch_of_equal_scores_counts_every_image_as_id():
    weight_id, weight_ood = id_weights(torch.full((5,), 0.3))
    assert torch.equal(weight_id, torch.ones(5)) and torch.equal(weight_ood, torch.zeros(5))
    weight_id, _ = id_weights(torch.tensor([0.7]))
    assert torch.equal(weight_id, torch.ones(1))


# ---------------------------------------------------------------------- the transcription
def _optimal_cut_labels(values):
    """The 2-means split by a plain loop over the cuts of the sorted values (between distinct values)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order].astype(np.float64)
    best, best_cut = np.inf, None
    for cut in range(1, len(ordered)):
        if ordered[cut] == ordered[cut - 1]:
            continue
        sse = ((ordered[:cut] - ordered[:cut].mean()) ** 2).sum() + ((ordered[cut:] - ordered[cut:].mean()) ** 2).sum()
        if sse < best - 1e-15:
            best, best_cut = sse, cut
    labels = np.ones(len(values), dtype=int)
    labels[order[:best_cut]] = 0
    return labels


class _SplitInitialisedMixture(GaussianMixture):
    """sklearn's GaussianMixture whose k-means responsibilities are replaced by the optimal split's (the one
    deliberate difference); everything else is sklearn's own code path."""

    def _initialize_parameters(self, X, random_state, xp=None):
        resp = np.zeros((len(X), 2), dtype=X.dtype)
        resp[np.arange(len(X)), _optimal_cut_labels(X[:, 0])] = 1
        self._initialize(X, resp)


def _transcription(model, batches, node, optim, steps, mutation=None):
    """CLIPTTA's UniEnt.forward_and_adapt (no memory, no ablation losses) on a deep copy, in its order: features,
    logits, max_prob at logit_scale, min-max, GMM on 1 - it (float32 numpy), 1 - weight when means_[0] >=
    means_[1], entropies with the eps shift, the loss, backward, step, zero_grad; after the last step the final
    logits and get_scores. "hard": the official code's ent_ind_ood criterion."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.clip.visual.train()
    params = norm_params(ref)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=optim.LR, weight_decay=optim.WD, eps=node.ADAM_EPS)
    text = ref.text_features()[0]
    eps, scale = node.ENTROPY_EPS, node.LOGIT_SCALE

    def get_logits(images):
        f = ref.clip.encode_image(ref.normalize(images))
        return (f / f.norm(dim=-1, keepdim=True)) @ text.t()

    outputs, scores = [], []
    for x in batches:
        for _ in range(steps):
            with torch.enable_grad():
                logits = get_logits(x)
                gm_scale = 1.0 if mutation == "gmm_on_raw_cosines" else scale
                max_cos_sim, _ = (logits * gm_scale).softmax(dim=1).max(1)
                scores_norm = (max_cos_sim - max_cos_sim.min()) / (max_cos_sim.max() - max_cos_sim.min())
                ood_scores = 1 - scores_norm.detach().cpu().numpy().reshape(-1, 1)
                gm = _SplitInitialisedMixture(n_components=2).fit(ood_scores)
                weight = gm.predict_proba(ood_scores)
                weight = weight if gm.means_[0, 0] < gm.means_[1, 0] else 1 - weight
                if mutation == "ood_weight_as_id":
                    weight = weight[:, ::-1].copy()
                weight_id, weight_ood = torch.from_numpy(weight[:, 0]), torch.from_numpy(weight[:, 1])
                entropys = softmax_entropy(scale * logits, eps=eps)
                if node.WEIGHTING == "soft":
                    loss_tta, loss_ood = entropys.mul(weight_id).mean(0), entropys.mul(weight_ood).mean(0)
                else:
                    filter_ids = gm.predict(ood_scores)
                    filter_ids = torch.from_numpy(filter_ids if gm.means_[0, 0] < gm.means_[1, 0] else 1 - filter_ids)
                    loss_tta, loss_ood = entropys[filter_ids == 0].mean(0), entropys[filter_ids == 1].mean(0)
                probs = (scale * logits + eps).softmax(1).mean(0)
                loss_reg = -(probs * torch.log(probs + eps)).sum()
                if mutation == "reg_sign_flipped":
                    loss_reg = -loss_reg
                loss_ood = loss_ood if node.USE_OOD_LOSS else 0.0
                loss = node.BETA_TTA * loss_tta - node.BETA_REG * loss_reg - node.BETA_OOD * loss_ood
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            logits = get_logits(x)
            outputs.append(scale * logits)
            scores.append((logits * node.OOD_LOGIT_SCALE).softmax(dim=-1).max(dim=1).values)   # max_prob
    return outputs, scores, params, optimizer


TRANSCRIBED = [
    # tower, WEIGHTING, USE_OOD_LOSS, ENTROPY_EPS
    ("vit", "soft", False, 1e-6),      # CLIPTTA's scripts, the shipped configs
    ("vit", "soft", True, 1e-6),       # --use_ood_loss
    ("vit", "hard", True, 0.0),        # the official UniEnt (ent_ind_ood)
    ("rn", "soft", False, 1e-6),
]


def _run_both(request, tower, weighting, ood_loss, eps, mutation=None, steps=3):
    model = request.getfixturevalue("tiny_clip" if tower == "vit" else "tiny_clip_rn")
    arch = {"MODEL__ARCH": "tiny-clip-test-rn"} if tower == "rn" else {}
    cfg = _cfg(UNIENT__WEIGHTING=weighting, UNIENT__USE_OOD_LOSS=ood_loss, UNIENT__ENTROPY_EPS=eps,
               UNIENT__BETA_OOD=0.5, OPTIM__STEPS=steps, OPTIM__LR=1e-2, **arch)
    batches = [_images(s) for s in (1, 2, 3)]
    request.node.source_params = [p.detach().clone() for p in norm_params(model)]
    want, want_scores, ref_params, ref_opt = _transcription(model, batches, cfg.UNIENT, cfg.OPTIM, steps, mutation)
    method = methods.build_method(cfg, model, 10)
    got, got_scores = [], []
    for x in batches:
        got.append(method(x))
        got_scores.append(method.ood_scores(got[-1]))
    return method, got, want, got_scores, want_scores, ref_params, ref_opt


@pytest.mark.parametrize("tower,weighting,ood_loss,eps", TRANSCRIBED)
def test_three_batches_equal_the_transcription(request, tower, weighting, ood_loss, eps):
    method, got, want, got_scores, want_scores, ref_params, ref_opt = _run_both(request, tower, weighting,
                                                                                ood_loss, eps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=LOGIT_TOL)
    for a, b in zip(got_scores, want_scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(method.params, request.node.source_params))
    assert len(method.params) == len(ref_params)
    for p, q in zip(method.params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_TOL)
    for p, q in zip(method.params, ref_params):
        state, theirs = method.optimizer.state[p], ref_opt.state[q]
        assert int(state["step"]) == int(theirs["step"]) == 9
        torch.testing.assert_close(state["exp_avg"], theirs["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"], theirs["exp_avg_sq"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("mutation", ["ood_weight_as_id", "reg_sign_flipped", "gmm_on_raw_cosines"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(request, mutation):
    _, got, want, _, _, _, _ = _run_both(request, "vit", "soft", False, 1e-6, mutation)
    logit_gap = max(float((a - b).abs().max()) for a, b in zip(got, want))
    assert logit_gap > 10 * LOGIT_TOL, (mutation, logit_gap)


# ---------------------------------------------------------------------- state, score, protocol
def test_reset_restores_all_state_exactly(tiny_clip):
    method = methods.build_method(_cfg(OPTIM__STEPS=2, OPTIM__LR=1e-2), tiny_clip, 10)
    fresh_state = {k: v.clone() for k, v in method.state_dict().items()}
    fresh_optimizer = str(method.optimizer.state_dict())
    first = [method(_images(s)) for s in (1, 2)]
    method.reset()
    assert method.last_cosines is None and method.last_id_weights is None
    for key, value in method.state_dict().items():
        assert torch.equal(value, fresh_state[key]), key
    assert str(method.optimizer.state_dict()) == fresh_optimizer
    again = [method(_images(s)) for s in (1, 2)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("score_type,scale", [("max_prob", 1.0), ("max_logit", 1.0), ("entropy", 10.0)])
def test_own_ood_score_is_get_scores_of_the_adapted_cosines(tiny_clip, score_type, scale):
    method = methods.build_method(_cfg(UNIENT__SCORE_TYPE=score_type, UNIENT__OOD_LOGIT_SCALE=scale,
                                       OPTIM__STEPS=2, OPTIM__LR=1e-2), tiny_clip, 10)
    x = _images(4)
    logits = method(x)
    with torch.no_grad():       # by hand, from the adapted model
        features = method.model.encode_image(x)
        cosines = (features / features.norm(dim=-1, keepdim=True)) @ method.model.text_features()[0].t()
    hand = {"max_prob": (scale * cosines).softmax(1).max(1).values, "max_logit": (scale * cosines).max(1).values,
            "entropy": ((scale * cosines).softmax(1) * (scale * cosines).log_softmax(1)).sum(1)}[score_type]
    torch.testing.assert_close(method.ood_scores(logits), hand, rtol=0, atol=1e-6)
    assert method.own_ood_score is not None


def test_the_reported_logits_are_those_after_the_batchs_updates(tiny_clip):
    method = methods.build_method(_cfg(OPTIM__STEPS=2, OPTIM__LR=1e-2), tiny_clip, 10)
    source = copy.deepcopy(tiny_clip)
    x = _images(1)
    out = method(x)
    assert method.protocol == methods.base.ADAPT_THEN_PREDICT
    torch.testing.assert_close(out, 100.0 * method.cosines(x).detach(), rtol=0, atol=0)
    assert not torch.allclose(out, source(x) * 100.0 / source.logit_scale, atol=1e-4)


def test_the_id_weights_follow_the_scores(tiny_clip):
    # the images the model is least sure of get the lowest ID weight
    method = methods.build_method(_cfg(OPTIM__STEPS=1), tiny_clip, 10)
    x = _images(5, n=16)
    with torch.no_grad():
        max_probs = (100.0 * method.cosines(x)).softmax(1).max(1).values
    method(x)
    weights = method.last_id_weights
    assert ((weights >= 0) & (weights <= 1)).all()
    assert weights[max_probs.argmax()] >= weights[max_probs.argmin()]


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides,message", [
    ({"UNIENT__BETA_OOD": -0.1}, r"UNIENT.BETA_OOD = -0.1"),
    ({"UNIENT__WEIGHTING": "otsu"}, r"UNIENT.WEIGHTING = 'otsu'"),
    ({"UNIENT__SCORE_TYPE": "neglabel"}, r"UNIENT.SCORE_TYPE = 'neglabel'"),
    ({"UNIENT__ENTROPY_EPS": -1e-6}, r"UNIENT.ENTROPY_EPS"),
    ({"UNIENT__OOD_LOGIT_SCALE": 0.0}, r"UNIENT.OOD_LOGIT_SCALE = 0.0"),
    ({"UNIENT__USE_MEMORY": True}, r"UNIENT.USE_MEMORY"),          # not implemented: an unknown key
    ({"TEST__BATCH_SIZE": 1}, r"TEST.BATCH_SIZE must be at least 2"),
    ({"CLIP__FREEZE_TEXT_ENCODER": False}, r"FREEZE_TEXT_ENCODER must be True"),
    ({"CLIP__PRECISION": "fp16"}, r"CLIP.PRECISION fp32"),
])
def test_refusals_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_method(_cfg(**overrides))


def test_both_towers_are_served():
    check_method(_cfg())
    check_method(_cfg(MODEL__ARCH="tiny-clip-test-rn"))


def test_shipped_configs_are_cliptta_script_values():
    for dataset in ("cifar10_c", "cifar100_c", "imagenet_c", "shapes_c"):
        cfg = tiny_cfg(f"conf/{dataset}/unient.yaml")
        assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.OPTIM.STEPS, cfg.OPTIM.WD, cfg.TEST.BATCH_SIZE) == \
            ("Adam", 1e-4, 10, 0.0, 128)
        node = cfg.UNIENT
        assert (node.BETA_TTA, node.BETA_REG, node.USE_OOD_LOSS, node.WEIGHTING, node.ENTROPY_EPS, node.SCORE_TYPE,
                node.OOD_LOGIT_SCALE, node.LOGIT_SCALE, node.ADAM_EPS) == \
            (1.0, 1.0, False, "soft", 1e-6, "max_prob", 1.0, 100.0, 1e-6)
