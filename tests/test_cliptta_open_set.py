"""CLIPTTA's open-set parts (methods/cliptta.py: CLIPTTA.DETECT_OOD, USE_OOD_LOSS, UPDATE_ALPHA, ...; cliptta_otsu):
Otsu's threshold against scikit-image's, the Otsu/OCE losses against hand computations, three batches of three steps
against a transcription of the reference's step (MarcLafon/cliptta ttavlm/methods/cliptta_otsu.py with
abstract_model.py's init_otsu, get_scores, get_otsu_loss, filter_id; skimage's threshold_otsu itself), the one-line
changes that comparison catches, the own OOD score, exact reset, the edge cases and the refusals."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from skimage.filters import threshold_otsu as skimage_threshold_otsu   # test-only dependency (scikit-image)

import methods
from conf import ConfigError
from harness.build import check_method
from methods.base import ADAPT_THEN_PREDICT
from methods.cliptta import CLIPTTA, CLIPTTAOtsu, otsu_loss, threshold_otsu
from tests.cliptta_reference import norm_params, softmax_entropy
from tests.synthetic import tiny_cfg

CFG_FILE = "conf/cifar10_c/cliptta_otsu.yaml"
BATCH = 8
# Measured (default CPU path; the AVX2 path passes the same tolerances): logits (100 * cos) within 1.2e-5 (ViT)
# and 1.4e-4 (ResNet: BatchNorm on 8 images), OOD scores within 2.4e-7, alpha equal, norm parameters within
# 3.6e-7 of the transcription (the reference's 1e-6 logit shift in its entropies and its order of sums are the
# differences). The one-line changes move the logits by 0.25 or more, or alpha by 2e-3 or more.
LOGIT_TOL, SCORE_TOL, PARAM_TOL = {"vit": 1e-4, "rn": 1e-3}, 1e-5, 2e-6


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def _images(seed, n=BATCH):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- Otsu's threshold
@pytest.mark.parametrize("case", ["normal", "bimodal", "negative_log_probs", "ties", "two_values", "large"])
def test_threshold_otsu_equals_scikit_image(case):
    gen = np.random.RandomState(len(case))
    values = {"normal": gen.randn(37),
              "bimodal": np.concatenate([gen.randn(50) * 0.1, 3 + gen.randn(20) * 0.2]),
              "negative_log_probs": np.log(gen.dirichlet(np.ones(10), size=128).max(1)),
              "ties": np.repeat(gen.rand(5), 7),
              "two_values": np.array([0.25, -1.5, 0.25, 0.25]),
              "large": gen.standard_t(3, size=5000)}[case].astype(np.float32)
    want = skimage_threshold_otsu(values)
    assert threshold_otsu(torch.from_numpy(values)) == float(want)        # bit for bit
    assert np.float32(threshold_otsu(torch.from_numpy(values))) == want


def test_threshold_otsu_of_equal_values_is_that_value_and_nan_is_refused():
    values = torch.full((6,), -0.75)
    assert threshold_otsu(values) == -0.75 == float(skimage_threshold_otsu(values.numpy()))
    with pytest.raises(ValueError, match="not finite"):
        threshold_otsu(torch.tensor([0.1, float("nan"), 0.3]))


def test_threshold_otsu_on_a_hand_computed_case():
    # 0, 0, 1, 5: min 0, max 5, bin width 5/256; the best cut puts {0, 0, 1} below and {5} above, so the
    # threshold is the centre of the last bin that holds 1: 1 lies in bin floor(1 / (5/256)) = 51.
    width = np.float32(5) / np.float32(256)
    centre = float((np.float32(51) * width + np.float32(52) * width) / 2)
    assert threshold_otsu(torch.tensor([0.0, 0.0, 1.0, 5.0])) == pytest.approx(centre, abs=1e-6)


# ---------------------------------------------------------------------- the Otsu / OCE losses
def test_otsu_losses_equal_hand_computed_values():
    scores = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    alpha, gamma = torch.tensor([0.6], dtype=torch.float64), 0.1
    w = [1 / (1 + math.exp(-(s - 0.6) / 0.1)) for s in (0.2, 0.5, 0.9)]
    p_in, p_out = sum(w) / 3, sum(1 - v for v in w) / 3
    mu_in = sum(v * s for v, s in zip(w, (0.2, 0.5, 0.9))) / sum(w)
    mu_out = sum((1 - v) * s for v, s in zip(w, (0.2, 0.5, 0.9))) / sum(1 - v for v in w)
    want = {"max_inter_var": -p_in * p_out * (mu_in - mu_out) ** 2,
            "min_intra_var": -p_out * mu_out ** 2 - p_in * mu_in ** 2,
            "avg_contrastive": -(mu_in - mu_out) ** 2}
    assert want["avg_contrastive"] == pytest.approx(-0.21125, abs=1e-5)   # w = sigmoid(-4, -1, 3)
    for kind, value in want.items():
        assert otsu_loss(scores, alpha, gamma, kind).item() == pytest.approx(value, abs=1e-12), kind


def test_otsu_loss_is_zero_where_one_side_is_empty():
    # every w rounds to 1 (s - alpha >= 0.3 at gamma 0.005): the reference divides 0 by 0 (NaN)
    scores = torch.tensor([0.9, 0.95, 1.0], requires_grad=True)
    loss = otsu_loss(scores, torch.tensor([0.5]), 0.005, "avg_contrastive")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros(3))


# ---------------------------------------------------------------------- the transcription of the reference
def _get_scores(logits, score_type, ood_logit_scale):
    """abstract_model.get_scores on a list of views (one here), as written there."""
    logits = [lg * ood_logit_scale for lg in logits]
    if score_type == "max_prob":
        return torch.stack([lg.softmax(dim=-1) for lg in logits], dim=0).mean(dim=0).max(dim=1).values
    if score_type == "max_log_prob":
        return torch.stack([lg.softmax(dim=-1).log() for lg in logits], dim=0).mean(dim=0).max(dim=1).values
    raise AssertionError(score_type)


def _softmax_mean_entropy(x, eps=1e-6):
    x = (x + eps).softmax(1).mean(0)
    return -(x * torch.log(x + eps)).sum()


def _otsu_loss(scores, alpha, gamma, kind):
    w = torch.sigmoid((scores - alpha) / gamma)
    p_in, p_out = w.mean(), (1 - w).mean()
    mu_in = torch.dot(w, scores) / torch.sum(w)
    mu_out = torch.dot(1 - w, scores) / torch.sum(1 - w)
    if kind == "max_inter_var":
        return -p_in * p_out * (mu_in - mu_out).pow(2)
    if kind == "min_intra_var":
        return -p_out * mu_out.pow(2) - p_in * mu_in.pow(2)
    return -(mu_in - mu_out).pow(2)


def _loss_tta(features, prototypes, scale):
    """compute_loss_tta with --use_softmax_entropy and a frozen text tower (logits_per_text = logits_per_image)."""
    pred = (features @ prototypes.t()).topk(1, 1, True, True)[1]
    per_image = scale * features @ prototypes[pred[:, 0]].t()
    return (softmax_entropy(per_image).mean(0) + softmax_entropy(per_image).mean(0)) / 2


class _Reference:
    """The reference's CLIPTTA (cliptta_otsu.py) on a deep copy: its parameters, Adam (eps 1e-6) with alpha as a
    second group, init_otsu before every batch, its step, its final logits and scores. The memory keeps whole
    classes (the tests' NUM_SHOTS * C <= SAMPLE_SIZE), so its sample is the whole memory, class by class."""

    def __init__(self, model, node, optim, mutation=None):
        self.model, self.node, self.mutation = copy.deepcopy(model), node, mutation
        self.model.requires_grad_(False)
        self.params = norm_params(self.model)
        for p in self.params:
            p.requires_grad_(True)
        for m in self.model.clip.visual.modules():     # configure_model: model.train() (batch statistics)
            if isinstance(m, nn.BatchNorm2d):
                m.train()
        self.alpha = nn.Parameter(torch.tensor([node.ALPHA]), requires_grad=node.UPDATE_ALPHA)
        self.optimizer = torch.optim.Adam(self.params, lr=optim.LR, betas=(optim.BETA, 0.999), eps=1e-6)
        if node.UPDATE_ALPHA:
            self.optimizer.add_param_group({"params": self.alpha})
        self.prototypes = self.model.text_features()[0]
        self.memory = {}
        self.kept, self.initial_alphas = [], []

    def features(self, x):
        f = self.model.clip.encode_image(self.model.normalize(x))
        return f / f.norm(dim=-1, keepdim=True)

    def scores(self, logits, score_type=None):
        scale = self.node.CONFIDENCE_LOGIT_SCALE * (100 if self.mutation == "scores_at_logit_scale" else 1)
        return _get_scores(logits, score_type or self.node.SCORE_TYPE, scale)

    def init_otsu(self, x):
        with torch.no_grad():
            scores = self.scores([self.features(x) @ self.prototypes.t()])
            self.alpha.data = torch.tensor([skimage_threshold_otsu(scores.numpy())],
                                           requires_grad=self.node.UPDATE_ALPHA)
            self.initial_alphas.append(float(self.alpha))

    def filter_id(self, x, features, scores):
        threshold = self.alpha if self.node.UPDATE_ALPHA else torch.tensor([skimage_threshold_otsu(
            scores.detach().numpy())])
        keep = scores < threshold if self.mutation == "filter_keeps_below" else scores > threshold
        self.kept.append(int(keep.sum()))
        return x[keep], features[keep]

    def remember(self, x, features):
        with torch.no_grad():
            logits = [features @ self.prototypes.t()]
            pred = logits[0].topk(1, 1, True, True)[1][:, 0]
            confidence = self.scores(logits, self.node.ID_SCORE_TYPE)
        for i in range(x.shape[0]):
            self.memory.setdefault(int(pred[i]), []).append((float(confidence[i]), x[i]))
        self.memory = {c: sorted(v, key=lambda item: -item[0])[:self.node.NUM_SHOTS] for c, v in self.memory.items()}

    def step(self, x, step):
        node, scale = self.node, self.node.LOGIT_SCALE
        features = self.features(x)
        logits = [features @ self.prototypes.t()]
        loss_reg = _softmax_mean_entropy(scale * logits[0])
        scores = self.scores(logits)
        kind = "max_inter_var" if self.mutation == "ood_loss_max_inter_var" else node.LOSS_OOD
        loss_ood = _otsu_loss(scores, self.alpha, node.GAMMA, kind) if node.USE_OOD_LOSS else 0.0
        if node.DETECT_OOD:
            x, features = self.filter_id(x, features, scores)
        if self.mutation == "reg_on_filtered":
            loss_reg = _softmax_mean_entropy(scale * (features @ self.prototypes.t()))
        loss_tta = _loss_tta(features, self.prototypes, scale)
        if node.ADAPT_ON == "batch_and_memory":
            if step == 0:
                self.remember(x, features)
            stored = torch.stack([img for c in sorted(self.memory) for _, img in self.memory[c]])
            stored_features = self.features(stored)
            loss_tta += _loss_tta(stored_features, self.prototypes, scale)
            loss_reg += _softmax_mean_entropy(scale * (stored_features @ self.prototypes.t()))
        loss = node.BETA_TTA * loss_tta - node.BETA_REG * loss_reg + node.BETA_OOD * loss_ood
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x, steps):
        if self.node.USE_OOD_LOSS:
            self.init_otsu(x)
        with torch.enable_grad():
            for step in range(steps):
                self.step(x, step)
        with torch.no_grad():
            logits = [self.features(x) @ self.prototypes.t()]
            return self.node.LOGIT_SCALE * logits[0], self.scores(logits)


SCRIPTS = dict()      # the shipped values: scores max_log_prob, avg_contrastive, learnt alpha, filter, memory
SCENARIOS = {
    "scripts": SCRIPTS,
    "otsu_every_step": dict(CLIPTTA__USE_OOD_LOSS=False, CLIPTTA__UPDATE_ALPHA=False, CLIPTTA__SCORE_TYPE="max_prob",
                            CLIPTTA__ADAPT_ON="batch"),
    "fixed_alpha_loss_and_otsu_filter": dict(CLIPTTA__UPDATE_ALPHA=False, CLIPTTA__LOSS_OOD="max_inter_var"),
    "loss_without_filter": dict(CLIPTTA__DETECT_OOD=False, CLIPTTA__LOSS_OOD="min_intra_var",
                                CLIPTTA__ADAPT_ON="batch"),
}


def _run_both(request, tower, scenario, mutation=None, steps=3):
    model = request.getfixturevalue("tiny_clip" if tower == "vit" else "tiny_clip_rn")
    arch = {"MODEL__ARCH": "tiny-clip-test-rn"} if tower == "rn" else {}
    overrides = dict(OPTIM__STEPS=steps, OPTIM__LR=1e-3, CLIPTTA__NUM_SHOTS=2, CLIPTTA__SAMPLE_SIZE=20,
                     CLIPTTA__BETA_OOD=0.5, **SCENARIOS[scenario], **arch)
    cfg = _cfg(**overrides)
    if scenario == "loss_without_filter":
        cfg = tiny_cfg("conf/cifar10_c/cliptta.yaml", **overrides, CLIPTTA__USE_OOD_LOSS=True)
    batches = [_images(s) for s in (1, 2, 3)]
    request.node.source_params = [p.detach().clone() for p in norm_params(model)]
    reference = _Reference(model, cfg.CLIPTTA, cfg.OPTIM, mutation)
    want = [reference(x, steps) for x in batches]
    method = methods.build_method(cfg, model, 10)
    got = []
    for x in batches:
        logits = method(x)
        got.append((logits, method.ood_scores(logits), method.alpha.detach().clone()))
    return method, reference, got, want


@pytest.mark.parametrize("tower,scenario", [("vit", "scripts"), ("rn", "scripts"), ("vit", "otsu_every_step"),
                                            ("vit", "fixed_alpha_loss_and_otsu_filter"),
                                            ("vit", "loss_without_filter")])
def test_three_batches_equal_the_transcription(request, tower, scenario):
    method, reference, got, want = _run_both(request, tower, scenario)
    source = request.node.source_params
    for (logits, scores, _), (ref_logits, ref_scores) in zip(got, want):
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGIT_TOL[tower])
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=SCORE_TOL)
    assert len(method.params) == len(reference.params)
    assert any(not torch.equal(p, q) for p, q in zip(method.params, source))
    for p, q in zip(method.params, reference.params):
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_TOL)
    torch.testing.assert_close(method.alpha.detach(), reference.alpha.detach(), rtol=0, atol=SCORE_TOL)
    if method.detect_ood:      # the filter kept part of a batch at least once: the comparison covers it
        assert any(0 < k < BATCH for k in reference.kept), reference.kept
    if method.use_ood_loss and method.update_alpha:   # alpha learnt: moved away from the last batch's Otsu value
        assert float(method.alpha.detach()) != reference.initial_alphas[-1]


@pytest.mark.parametrize("mutation", ["filter_keeps_below", "reg_on_filtered", "scores_at_logit_scale",
                                      "ood_loss_max_inter_var"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(request, mutation):
    # The OOD loss moves the norm parameters little on the tiny CLIP (Adam, lr 1e-3); it alone moves alpha, so its
    # change shows in alpha (compared within SCORE_TOL above).
    method, reference, got, want = _run_both(request, "vit", "scripts", mutation)
    logit_gap = max(float((a[0] - b[0]).abs().max()) for a, b in zip(got, want))
    alpha_gap = float((method.alpha.detach() - reference.alpha.detach()).abs().max())
    assert max(logit_gap / LOGIT_TOL["vit"], alpha_gap / SCORE_TOL) > 10, (mutation, logit_gap, alpha_gap)


# ---------------------------------------------------------------------- the own score, state
def test_own_ood_score_is_get_scores_of_the_reported_cosines(tiny_clip):
    method = methods.build_method(_cfg(OPTIM__STEPS=1), tiny_clip, 10)
    assert CLIPTTA.protocol == CLIPTTAOtsu.protocol == ADAPT_THEN_PREDICT     # adapt, then predict the batch
    assert isinstance(CLIPTTA.own_ood_score, str)
    with pytest.raises(RuntimeError, match="for the batch just reported"):
        method.ood_scores(torch.zeros(BATCH, 10))
    logits = method(_images(4))
    cos = logits / 100.0      # max_log_prob of softmax(1.0 * cos), by hand
    want = [max(math.log(math.exp(c) / sum(math.exp(v) for v in row)) for c in row) for row in cos.tolist()]
    assert method.ood_scores(logits).tolist() == pytest.approx(want, abs=1e-6)


def test_reset_is_exact(tiny_clip):
    method = methods.build_method(_cfg(OPTIM__STEPS=2, OPTIM__LR=1e-3, CLIPTTA__NUM_SHOTS=2), tiny_clip, 10)
    fresh_state = {k: v.clone() for k, v in method.state_dict().items()}
    fresh_optimizer = str(method.optimizer.state_dict())
    assert len(method.optimizer.param_groups) == 2 and method.optimizer.param_groups[1]["params"] == [method.alpha]
    first = [(method(_images(s)), method.alpha.detach().clone()) for s in (1, 2, 3)]
    assert float(method.alpha.detach()) != 0.5
    method.reset()
    assert method.last_cosines is None and len(method.memory) == 0
    for key, value in method.state_dict().items():
        assert torch.equal(value, fresh_state[key]), key
    assert str(method.optimizer.state_dict()) == fresh_optimizer
    again = [(method(_images(s)), method.alpha.detach().clone()) for s in (1, 2, 3)]
    for (a, alpha_a), (b, alpha_b) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(alpha_a, alpha_b)


# ---------------------------------------------------------------------- edge cases
def test_an_empty_in_distribution_set_adds_no_term_where_the_reference_turns_nan(tiny_clip):
    # alpha above every max_prob score and not re-set (no OOD loss): the filter keeps no image
    cfg = _cfg(OPTIM__STEPS=2, CLIPTTA__USE_OOD_LOSS=False, CLIPTTA__SCORE_TYPE="max_prob", CLIPTTA__ALPHA=2.0)
    source = copy.deepcopy(tiny_clip)
    method = methods.build_method(cfg, tiny_clip, 10)
    x = _images(5)
    with torch.no_grad():
        cos = nn.functional.normalize(source.clip.encode_image(source.normalize(x)), dim=-1) @ \
            source.text_features()[0].t()
    logits = method(x)
    assert len(method.memory) == 0 and torch.isfinite(logits).all()
    assert all(torch.isfinite(p).all() for p in method.params)
    # step 1 (source weights): only -BETA_REG * L_reg(batch) is left
    method.reset()
    method.steps = 1
    method(x)
    reg = -(lambda m: (m * torch.log(m + 1e-6)).sum())((100 * cos).softmax(1).mean(0))
    assert method.last_loss.item() == pytest.approx(-1.0 * reg.item(), abs=1e-6)
    empty = torch.zeros(0, 4)
    assert torch.isnan(softmax_entropy(empty @ empty.t()).mean(0))       # the reference's L_tta on no image


def test_equal_scores_filter_every_image_out(tiny_clip):
    # Otsu's threshold of equal values is that value, and the filter keeps s > threshold: none
    method = methods.build_method(_cfg(CLIPTTA__UPDATE_ALPHA=False), tiny_clip, 10)
    assert not method.in_distribution(torch.full((5,), -2.3)).any()


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides,message", [
    ({"CLIPTTA__DETECT_OOD": False}, r"cliptta_otsu filters .* CLIPTTA.DETECT_OOD must be True"),
    ({"CLIPTTA__ADAPT_ON": "memory"}, r"cliptta_old has no open-set parts"),
    ({"CLIPTTA__ID_SCORE_TYPE": "tcp"}, r"CLIPTTA.ID_SCORE_TYPE = 'tcp'"),
    ({"CLIPTTA__BETA_OOD": -0.1}, r"CLIPTTA.BETA_OOD = -0.1"),
    ({"CLIPTTA__ALPHA": "high"}, r"CLIPTTA.ALPHA"),
])
def test_refusals_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_method(_cfg(**overrides))


def test_shipped_configs_follow_the_open_set_scripts():
    c10, c100, inet, shapes = (tiny_cfg(f"conf/{d}/cliptta_otsu.yaml")
                               for d in ("cifar10_c", "cifar100_c", "imagenet_c", "shapes_c"))
    for cfg in (c10, c100, inet, shapes):
        node = cfg.CLIPTTA
        assert (cfg.MODEL.ADAPTATION, cfg.OPTIM.LR, cfg.OPTIM.STEPS, node.ADAPT_ON) == \
            ("cliptta_otsu", 1e-4, 10, "batch_and_memory")
        assert (node.USE_OOD_LOSS, node.DETECT_OOD, node.UPDATE_ALPHA) == (True, True, True)
        assert (node.SCORE_TYPE, node.ID_SCORE_TYPE, node.LOSS_OOD, node.GAMMA) == \
            ("max_log_prob", "max_prob", "avg_contrastive", 0.005)
        assert (node.NUM_SHOTS, node.BETA_TTA) == (16, 1.0)
    assert (c10.CLIPTTA.BETA_OOD, c10.CLIPTTA.BETA_REG, c10.CLIPTTA.SAMPLE_SIZE) == (0.1, 1.0, 128)
    assert (c100.CLIPTTA.BETA_OOD, c100.CLIPTTA.BETA_REG, c100.CLIPTTA.SAMPLE_SIZE) == (1.0, 1.0, 128)
    assert (inet.CLIPTTA.BETA_OOD, inet.CLIPTTA.BETA_REG, inet.CLIPTTA.SAMPLE_SIZE, inet.TEST.BATCH_SIZE) == \
        (1.0, 0.5, 64, 256)
    assert dict(shapes.CLIPTTA) == dict(c10.CLIPTTA)
