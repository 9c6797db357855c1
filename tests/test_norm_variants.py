"""bntest, bnalpha and bnema (methods/norm.py, methods/batchnorm.py) on the tiny CLIP with a ResNet tower, against a
transcription of the anchor suite's BNTest / BNAlpha (AlphaBatchNorm) / BNEMA (EMABatchNorm): every BatchNorm2d
of the tower computed by hand (batch mean and variance, the statistics mixed or moved as the reference does),
logits and running statistics compared over 3 batches; the comparison fails when one line of the transcription
changes; exact reset; the ViT tower and bad keys refused in one line."""
import copy

import pytest
import torch
import torch.nn as nn

import methods
from conf import ConfigError
from harness.build import check_method
from methods.batchnorm import AlphaBatchNorm
from tests.synthetic import tiny_cfg

C = 10
BN_MOMENTUM = 0.1          # torch's BatchNorm2d default, which open_clip's ModifiedResNet keeps
# Measured over 3 batches (fp32; default CPU path / AVX2 path): logits within 1.4e-5 / 1.5e-5 (bntest: every layer
# normalised by the statistics of 4 images, down to 1 x 1 maps), 1.9e-6 / 1.7e-6 (bnalpha, bnema); running
# statistics within 1.8e-7 / 2.4e-7 (the transcription sums the batch moments in another order than torch).
LOGITS_ATOL = {"bntest": 5e-5, "bnalpha": 1e-5, "bnema": 1e-5}
STATS_ATOL = 1e-6


def build(name, model, **overrides):
    cfg = tiny_cfg(MODEL__ADAPTATION=name, MODEL__ARCH="tiny-clip-test-rn", **overrides)
    check_method(cfg)
    return methods.build_method(cfg, model, C)


def batches(n=3, size=4):
    return [torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def statistics(model):
    return {n: b.detach().clone() for n, b in model.state_dict().items()
            if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# ---------------------------------------------------------------------- the transcription
class HandBatchNorm:
    """Replaces the forward of every BatchNorm2d of a model by a hand computation of the reference's variant.
    ``phase`` says what the layers do now: "batch" (train mode: batch statistics, running ones moved), "alpha"
    (mixed statistics), "running" (eval mode: running statistics)."""

    def __init__(self, model, alpha=0.1, momentum=BN_MOMENTUM, mutation=None):
        self.alpha, self.momentum, self.mutation, self.phase = alpha, momentum, mutation, "batch"
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.forward = self.forward_of(m)

    def forward_of(self, layer):
        def forward(x):
            n = x.shape[0] * x.shape[2] * x.shape[3]
            mean = x.mean(dim=(0, 2, 3))
            biased = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
            unbiased = biased * n / (n - 1)
            if self.phase == "batch":
                use_mean, use_var = mean, (unbiased if self.mutation == "normalise_unbiased" else biased)
                with torch.no_grad():
                    layer.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                    layer.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
                    layer.num_batches_tracked += 1
            elif self.phase == "alpha":
                a = 1 - self.alpha if self.mutation == "alpha_swapped" else self.alpha
                use_mean = (1 - a) * layer.running_mean + a * mean
                use_var = (1 - a) * layer.running_var + a * unbiased
                if self.mutation == "alpha_source_variance":
                    use_var = layer.running_var
            else:
                use_mean, use_var = layer.running_mean, layer.running_var
            shape = (1, -1, 1, 1)
            normalised = (x - use_mean.view(shape)) / torch.sqrt(use_var.view(shape) + layer.eps)
            return normalised * layer.weight.view(shape) + layer.bias.view(shape)
        return forward


@torch.no_grad()
def reference_logits(name, model, images, mutation=None):
    """The reference's logits of one batch: BNTest (train-mode layers), BNAlpha, or BNEMA (a train-mode forward
    whose output is discarded, then an eval-mode forward)."""
    hand = model.hand
    if name == "bntest":
        hand.phase = "batch"
        return model(images)
    if name == "bnalpha":
        hand.phase = "alpha"
        return model(images)
    hand.phase = "batch"
    if mutation != "ema_no_update":
        model(images)
    hand.phase = "running"
    return model(images)


def reference_run(name, model, images_list, mutation=None, **hand_kwargs):
    model = copy.deepcopy(model)
    model.hand = HandBatchNorm(model, mutation=mutation, **hand_kwargs)
    logits = [reference_logits(name, model, x, mutation) for x in images_list]
    return logits, statistics(model)


def method_run(name, model, images_list, **overrides):
    method = build(name, model, **overrides)
    logits = [method(x) for x in images_list]
    return logits, statistics(method.model), method


# ---------------------------------------------------------------------- equality with the transcription
@pytest.mark.parametrize("name,alpha", [("bntest", 0.1), ("bnalpha", 0.1), ("bnalpha", 0.7), ("bnema", 0.1)])
def test_matches_the_reference_transcription_over_three_batches(tiny_clip_rn, name, alpha):
    source = copy.deepcopy(tiny_clip_rn)
    ours, our_stats, method = method_run(name, tiny_clip_rn, batches(), BN__ALPHA=alpha)
    theirs, their_stats = reference_run(name, source, batches(), alpha=alpha)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=LOGITS_ATOL[name], rtol=0)
    renamed = {k.replace(".layer.", "."): v for k, v in our_stats.items()}    # bnalpha wraps the layers
    assert renamed.keys() == their_stats.keys() and len(renamed) == 3 * 19
    for key, value in their_stats.items():
        torch.testing.assert_close(renamed[key], value, atol=STATS_ATOL, rtol=0)
    moved = {k for k, v in statistics(source).items() if not torch.equal(v, their_stats[k])}
    assert moved == (set() if name == "bnalpha" else set(their_stats)), "the source statistics must move"
    assert {f"{k}" for k in moved} <= set(method.param_names)
    assert method.num_trainable_params() == 0 and method.optimizer is None


@pytest.mark.parametrize("name,mutation", [
    ("bntest", "normalise_unbiased"), ("bnalpha", "alpha_swapped"), ("bnalpha", "alpha_source_variance"),
    ("bnema", "ema_no_update"), ("bnema", "momentum")])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip_rn, name, mutation):
    source = copy.deepcopy(tiny_clip_rn)
    alpha = 0.7
    ours, _, _ = method_run(name, tiny_clip_rn, batches(), BN__ALPHA=alpha)
    kwargs = {"momentum": 0.01} if mutation == "momentum" else {}
    theirs, _ = reference_run(name, source, batches(), mutation=None if mutation == "momentum" else mutation,
                              alpha=alpha, **kwargs)
    difference = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    # measured (both CPU paths): bntest 0.079; bnalpha 0.28 (alpha swapped), 0.44 (source variance); bnema 0.96
    # (momentum 0.01), 1.15 (no update)
    assert difference > 10 * LOGITS_ATOL[name], difference


def test_alpha_batchnorm_is_mode_independent_and_detached(tiny_clip_rn):
    """As the reference's inner BatchNorm (train mode, never switched; its buffers carry no gradient)."""
    layer = copy.deepcopy(tiny_clip_rn.clip.visual.bn1)
    wrapped = AlphaBatchNorm(layer, 0.3)
    x = torch.randn(2, layer.num_features, 4, 4, requires_grad=True)
    y_train = wrapped.train()(x)
    assert torch.equal(wrapped.eval()(x), y_train)
    mean, var = wrapped.batch_statistics(x)
    assert not mean.requires_grad and not var.requires_grad
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        wrapped(torch.randn(1, layer.num_features, 1, 1))


# ---------------------------------------------------------------------- reset, protocol, refusals
@pytest.mark.parametrize("name", ["bntest", "bnalpha", "bnema"])
def test_reset_restores_all_state_exactly(tiny_clip_rn, name):
    method = build(name, tiny_clip_rn)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    first = [method(x) for x in batches(2)]
    method.reset()
    for key, value in method.state_dict().items():
        assert torch.equal(value, initial[key]), key
    replay = [method(x) for x in batches(2)]
    for a, b in zip(first, replay):
        assert torch.equal(a, b)


def test_episodic_bnema_starts_every_batch_from_the_source_statistics(tiny_clip_rn):
    source = copy.deepcopy(tiny_clip_rn)
    method = build("bnema", tiny_clip_rn, MODEL__EPISODIC=True)
    images = batches()
    ours = [method(x) for x in images]
    for x, logits in zip(images, ours):
        theirs, _ = reference_run("bnema", source, [x])
        torch.testing.assert_close(logits, theirs[0], atol=LOGITS_ATOL["bnema"], rtol=0)


@pytest.mark.parametrize("name", ["bntest", "bnalpha", "bnema"])
def test_a_vit_tower_is_refused_in_one_line(tiny_clip, name):
    cfg = tiny_cfg(MODEL__ADAPTATION=name)
    with pytest.raises(ConfigError, match="needs a CLIP with a ResNet image tower") as err:
        check_method(cfg)
    assert "\n" not in str(err.value) and "tiny-clip-test" in str(err.value)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_bn_alpha_outside_the_unit_interval_is_refused(alpha):
    with pytest.raises(ConfigError, match="BN.ALPHA"):
        tiny_cfg(MODEL__ADAPTATION="bnalpha", MODEL__ARCH="tiny-clip-test-rn", BN__ALPHA=alpha)
