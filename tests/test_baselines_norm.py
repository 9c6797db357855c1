"""TENT, RPL, SAR and RoTTA on the tiny CLIP: adapted parameters, losses against hand computations, SAR's
branches, RoTTA's memory/teacher/update schedule, exact reset, and a run through the harness."""
import copy
import math

import pytest
import torch

import methods
from conf import ConfigError
from harness.build import check_method
from harness.run import evaluate
from methods.losses import generalized_cross_entropy
from methods.augmentations import TTATransforms
from methods.rotta import CategoryBalancedMemory, timeliness_weights
from tests.synthetic import tiny_cfg, write_cifar_c

C = 10
PLAIN_SGD = dict(OPTIM__METHOD="SGD", OPTIM__LR=0.1, OPTIM__MOMENTUM=0.0, OPTIM__NESTEROV=False)
# Per method: overrides that make a step on the tiny CLIP (2 blocks) adapt something.
ACTIVE = {
    "tent": {},
    "rpl": {},
    "sar": dict(SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=1.0, SAR__RESET_CONSTANT_EM=0.0),
    "rotta": dict(ROTTA__MEMORY_SIZE=8, ROTTA__UPDATE_FREQUENCY=4),
}


def build(name, model, **overrides):
    cfg = tiny_cfg(MODEL__ADAPTATION=name, **overrides)
    check_method(cfg)                      # the run plan's checks, before any model loads
    return methods.build_method(cfg, model, C)


def assert_same_forward(a, b):
    """Two forwards of the same weights on the same images, one while autograd records: equal but for rounding,
    since on some CPU paths (SSE: tests/golden.py's CPU_PATH_SETTINGS) the kernels differ between the two.
    Measured: 1.7e-6 at most on logits of magnitude 4 (SSE), 0 on the AVX2 and AVX-512 paths; an update step of
    these tests moves the adapted weights by about 1e-3."""
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def entropy_by_hand(logits):
    """-sum p log p per row, with p = exp(l - max) / sum exp(l - max), in float64."""
    z = logits.double() - logits.double().max(1, keepdim=True).values
    p = z.exp() / z.exp().sum(1, keepdim=True)
    return -(p * p.log()).sum(1)


def visual_norm_names(model, skip=()):
    names = []
    for mname, m in model.clip.visual.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and not any(mname.startswith(s) for s in skip):
            names += [f"clip.visual.{mname}.weight", f"clip.visual.{mname}.bias"]
    return names


def state(method):
    return {k: v.detach().clone() for k, v in method.model.state_dict().items()}


# ---------------------------------------------------------------------- shared frame
@pytest.mark.parametrize("name", ["tent", "rpl", "sar", "rotta"])
def test_only_image_norm_affine_params_change(tiny_clip, name):
    method = build(name, tiny_clip, **ACTIVE[name])
    skip = ("transformer.resblocks.1.", "ln_post") if name == "sar" else ()
    expected = visual_norm_names(tiny_clip, skip)
    assert method.param_names == expected
    assert sorted(n for n, p in method.model.named_parameters() if p.requires_grad) == sorted(expected)
    text_before = method.model.text_features()[0].clone()
    before = state(method)
    method(images(8))
    after = state(method)
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(expected), changed - set(expected)
    assert torch.equal(method.model.text_features()[0], text_before)


@pytest.mark.parametrize("name", ["tent", "rpl", "sar", "rotta"])
def test_text_encoder_must_be_frozen(tiny_clip, name):
    with pytest.raises(ConfigError, match="FREEZE_TEXT_ENCODER"):
        build(name, tiny_clip, CLIP__FREEZE_TEXT_ENCODER=False)


def run_stream(method, batches):
    return [method(x) for x in batches]


@pytest.mark.parametrize("name", ["tent", "rpl", "sar", "rotta"])
def test_reset_restores_everything_exactly(tiny_clip, name):
    method = build(name, tiny_clip, **ACTIVE[name], OPTIM__METHOD="SGD", OPTIM__MOMENTUM=0.9)
    initial_state = copy.deepcopy(method.state_dict())
    initial_optim = copy.deepcopy(method.optimizer.state_dict())
    batches = [images(6, seed=s) for s in range(3)]
    first = run_stream(method, batches)
    assert method.optimizer.state_dict()["state"], "the stream should have updated the optimizer"
    method.reset()
    for k, v in initial_state.items():
        assert torch.equal(method.state_dict()[k], v), k
    assert method.optimizer.state_dict() == initial_optim
    if name == "sar":
        assert method.ema is None
    if name == "rotta":
        assert len(method.memory) == 0 and method.num_seen == 0 and method.num_model_updates == 0
    second = run_stream(method, batches)       # the same stream again: identical predictions
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def manual_sgd(model, names, loss_fn, x, lr=0.1):
    """Independent update: plain SGD step on ``loss_fn(logits)`` w.r.t. the named parameters of a copy."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    logits = model(x)
    grads = torch.autograd.grad(loss_fn(logits), [params[n] for n in names])
    return logits.detach(), {n: params[n].detach() - lr * g for n, g in zip(names, grads)}


# ---------------------------------------------------------------------- TENT / RPL
def test_tent_loss_is_mean_softmax_entropy(tiny_clip):
    tent = build("tent", tiny_clip)
    logits = torch.randn(5, C) * 3
    assert torch.allclose(tent.loss(logits).double(), entropy_by_hand(logits).mean(), atol=1e-6)


@pytest.mark.parametrize("name", ["tent", "rpl"])
def test_update_and_predictions(tiny_clip, name):
    x = images(8)
    source = copy.deepcopy(tiny_clip)
    method = build(name, tiny_clip, **PLAIN_SGD)
    if name == "tent":
        loss_fn = lambda l: entropy_by_hand(l).mean()
    else:
        loss_fn = lambda l: ((1 - l.softmax(1).gather(1, l.argmax(1, keepdim=True)) ** 0.8) / 0.8).mean()
    pre_logits, expected = manual_sgd(source, method.param_names, loss_fn, x)
    out = method(x)
    assert_same_forward(out, pre_logits)                    # the pre-update forward's predictions
    params = dict(method.model.named_parameters())
    for n, w in expected.items():
        assert torch.allclose(params[n], w, atol=1e-6), n
    with torch.no_grad():
        assert not torch.allclose(method.model(x), pre_logits)   # the update changed the model


def test_rpl_generalised_cross_entropy_by_hand(tiny_clip):
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    expected = []
    for row in logits.tolist():
        exps = [math.exp(v) for v in row]
        p_max = max(exps) / sum(exps)                      # the hard pseudo-label is the argmax
        expected.append((1 - p_max ** 0.8) / 0.8)
    labels = logits.argmax(1)
    assert torch.allclose(generalized_cross_entropy(logits, labels, 0.8), torch.tensor(expected), atol=1e-7)
    rpl = build("rpl", tiny_clip)
    assert rpl.q == 0.8
    assert math.isclose(rpl.loss(logits).item(), sum(expected) / 2, rel_tol=1e-6)
    rpl_half = build("rpl", copy.deepcopy(tiny_clip), RPL__Q=0.5)
    p = logits.softmax(1).max(1).values
    assert torch.allclose(rpl_half.loss(logits), ((1 - p ** 0.5) / 0.5).mean())
    with pytest.raises(ConfigError, match="RPL.Q"):
        build("rpl", copy.deepcopy(tiny_clip), RPL__Q=0.0)


# ---------------------------------------------------------------------- SAR
def sar_by_hand(model, names, x, margin, rho, lr):
    """One SAR step written out: filter, SAM ascent, refilter, plain SGD step from w. Returns
    (new weights or None, second loss or None, mask1, entropies after the perturbation)."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    ws = [params[n] for n in names]
    ent = entropy_by_hand(model(x)).float()
    mask1 = ent < margin
    if not mask1.any():
        return None, None, mask1, None
    g1 = torch.autograd.grad(ent[mask1].mean(), ws)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
    originals = [w.detach().clone() for w in ws]
    with torch.no_grad():
        for w, g in zip(ws, g1):
            w.add_(rho * g / (norm + 1e-12))
    ent2 = entropy_by_hand(model(x)).float()[mask1]
    mask2 = ent2 < margin
    if not mask2.any():
        return None, None, mask1, ent2
    loss2 = ent2[mask2].mean()
    g2 = torch.autograd.grad(loss2, ws)
    return {n: o - lr * g for n, o, g in zip(names, originals, g2)}, loss2.item(), mask1, ent2


def sar_margin_factor(model, x, quantile):
    with torch.no_grad():
        ent = entropy_by_hand(model(x))
    return float(ent.quantile(quantile)) / math.log(C), ent


def test_sar_excluded_layers_follow_the_keys(tiny_clip):
    sar = build("sar", copy.deepcopy(tiny_clip), SAR__EXCLUDED_DEEPEST_BLOCKS=1)
    assert sar.param_names == visual_norm_names(tiny_clip, ("transformer.resblocks.1.", "ln_post"))
    sar = build("sar", copy.deepcopy(tiny_clip), SAR__EXCLUDED_DEEPEST_BLOCKS=0, SAR__EXCLUDE_FINAL_NORM=False)
    assert sar.param_names == visual_norm_names(tiny_clip)
    with pytest.raises(ConfigError, match="EXCLUDED_DEEPEST_BLOCKS=3 exceeds the 2 blocks"):
        build("sar", copy.deepcopy(tiny_clip))          # default 3 (ViT-B: blocks 9-11), tiny has 2
    assert tiny_cfg(MODEL__ADAPTATION="sar").SAR.EXCLUDED_DEEPEST_BLOCKS == 3


def test_sar_normal_steps_and_moving_average(tiny_clip):
    x = images(12)
    factor, ent = sar_margin_factor(tiny_clip, x, 0.6)   # some samples pass the filter, some do not
    cfg = dict(SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=factor, SAR__RESET_CONSTANT_EM=0.0, **PLAIN_SGD)
    sar = build("sar", copy.deepcopy(tiny_clip), **cfg)
    margin = factor * math.log(C)
    assert math.isclose(sar.margin, margin)
    expected, loss1, mask1, _ = sar_by_hand(tiny_clip, sar.param_names, x, margin, 0.05, 0.1)
    assert 0 < int(mask1.sum()) < len(x)
    with torch.no_grad():
        pre = tiny_clip(x)
    assert_same_forward(sar(x), pre)
    params = dict(sar.model.named_parameters())
    for n, w in expected.items():
        assert torch.allclose(params[n], w, atol=1e-6), n
    assert math.isclose(sar.ema, loss1, rel_tol=1e-5)
    # second step from the updated model: ema = 0.9 * ema + 0.1 * loss
    expected2, loss2, _, _ = sar_by_hand(sar.model, sar.param_names, x, margin, 0.05, 0.1)
    sar(x)
    assert math.isclose(sar.ema, 0.9 * loss1 + 0.1 * loss2, rel_tol=1e-5)
    for n, w in expected2.items():
        assert torch.allclose(params[n], w, atol=1e-6), n


def test_sar_rho_key_changes_the_perturbation(tiny_clip):
    x = images(12)
    cfg = dict(SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=1.0, SAR__RESET_CONSTANT_EM=0.0, **PLAIN_SGD)
    sar = build("sar", copy.deepcopy(tiny_clip), SAR__RHO=0.5, **cfg)
    expected, _, _, _ = sar_by_hand(tiny_clip, sar.param_names, x, math.log(C), 0.5, 0.1)
    sar(x)
    params = dict(sar.model.named_parameters())
    for n, w in expected.items():
        assert torch.allclose(params[n], w, atol=1e-6), n


def test_sar_all_samples_filtered_out_changes_nothing(tiny_clip):
    x = images(8)
    sar = build("sar", tiny_clip, SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=1.0, SAR__RESET_CONSTANT_EM=0.0,
                OPTIM__METHOD="SGD", OPTIM__MOMENTUM=0.9)
    sar(x)                                           # a normal step: momentum buffers now exist
    ema = sar.ema
    optim_before = copy.deepcopy(sar.optimizer.state_dict())
    before = state(sar)
    sar.margin = 0.0                                 # = SAR.MARGIN_E0 0: no entropy is below it
    with torch.no_grad():
        pre = sar.model(x)
    out = sar(x)
    assert torch.equal(out, pre)
    after = state(sar)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sar.ema == ema
    assert str(sar.optimizer.state_dict()) == str(optim_before)
    fresh = build("sar", copy.deepcopy(tiny_clip), SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=0.0)
    fresh(x)
    assert fresh.ema is None and not fresh.optimizer.state_dict()["state"]


def test_sar_filtered_only_after_the_perturbation(tiny_clip):
    x = images(12)
    with torch.no_grad():
        ent = entropy_by_hand(tiny_clip(x))
    margin = float(ent.min()) + 1e-4                 # exactly one sample is reliable before the perturbation
    cfg = dict(SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=margin / math.log(C), SAR__RHO=1.0, **PLAIN_SGD)
    sar = build("sar", copy.deepcopy(tiny_clip), **cfg)
    expected, _, mask1, ent2 = sar_by_hand(tiny_clip, sar.param_names, x, sar.margin, 1.0, 0.1)
    assert int(mask1.sum()) == 1 and expected is None and bool((ent2 >= sar.margin).all())
    before = state(sar)
    sar(x)
    after = state(sar)
    assert all(torch.equal(before[k], after[k]) for k in before)   # back at w, no step
    assert sar.ema is None and not sar.optimizer.state_dict()["state"]


@pytest.mark.parametrize("keep_ema", [False, True])
def test_sar_model_recovery(tiny_clip, keep_ema):
    x = images(8)
    sar = build("sar", tiny_clip, SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=1.0, SAR__RESET_CONSTANT_EM=100.0,
                SAR__KEEP_EMA_AFTER_RECOVERY=keep_ema)
    initial = state(sar)
    expected, loss, _, _ = sar_by_hand(tiny_clip, sar.param_names, x, sar.margin, 0.05, 0.0)
    sar(x)                                           # ema = loss < 100: the model is recovered
    after = state(sar)
    assert all(torch.equal(initial[k], after[k]) for k in initial)
    assert not sar.optimizer.state_dict()["state"]
    assert sar.num_recoveries == 1
    if keep_ema:
        assert math.isclose(sar.ema, loss, rel_tol=1e-5)
    else:
        assert sar.ema is None


def test_sar_no_recovery_above_threshold(tiny_clip):
    sar = build("sar", tiny_clip, SAR__EXCLUDED_DEEPEST_BLOCKS=1, SAR__MARGIN_E0=1.0, SAR__RESET_CONSTANT_EM=0.0)
    initial = state(sar)
    sar(images(8))
    assert sar.num_recoveries == 0 and sar.ema is not None
    assert any(not torch.equal(initial[k], v) for k, v in state(sar).items())


# ---------------------------------------------------------------------- RoTTA: memory
def hand_score(age, u, capacity, num_classes):
    return 1 / (1 + math.exp(-age / capacity)) + u / math.log(num_classes)


def contents(memory):
    return [[(int(item.data), item.age) for item in items] for items in memory.items]


def test_memory_replacement_rule_hand_built():
    mem = CategoryBalancedMemory(capacity=4, num_classes=2)        # quota 2 per class
    t = lambda i: torch.tensor(i)
    assert mem.add(t(1), 0, 0.1) and mem.add(t(2), 0, 0.5)
    assert contents(mem) == [[(1, 2), (2, 1)], []]                  # ages increase after every offer
    # class 0 full: worst of class 0 is item 2 (age 1, u 0.5): 0.562 + 0.721 = 1.284 > new 0.5 + 0.289 = 0.789
    assert hand_score(1, 0.5, 4, 2) > hand_score(2, 0.1, 4, 2) and hand_score(1, 0.5, 4, 2) > hand_score(0, 0.2, 4, 2)
    assert mem.add(t(3), 0, 0.2)
    assert contents(mem) == [[(1, 3), (3, 1)], []]
    # a very uncertain sample scores worse than everything in its class: dropped, yet everything ages
    assert hand_score(0, 2.0, 4, 2) > max(hand_score(3, 0.1, 4, 2), hand_score(1, 0.2, 4, 2))
    assert not mem.add(t(4), 0, 2.0)
    assert contents(mem) == [[(1, 4), (3, 2)], []]
    assert mem.add(t(5), 1, 0.3) and mem.add(t(6), 1, 0.3)
    assert contents(mem) == [[(1, 6), (3, 4)], [(5, 2), (6, 1)]] and len(mem) == 4
    # class 1 full: among equal uncertainties the older item (5) is worse and goes
    assert mem.add(t(7), 1, 0.0)
    assert contents(mem) == [[(1, 7), (3, 5)], [(6, 2), (7, 1)]]


def test_memory_evicts_from_the_majority_class():
    mem = CategoryBalancedMemory(capacity=4, num_classes=3)        # quota 4/3: a class grows to 2 at most
    t = lambda i: torch.tensor(i)
    mem.add(t(1), 0, 0.0)
    mem.add(t(2), 1, 0.9)
    mem.add(t(3), 1, 0.1)
    mem.add(t(4), 2, 0.2)
    assert contents(mem) == [[(1, 4)], [(2, 3), (3, 2)], [(4, 1)]] and len(mem) == 4
    # class 0 below quota, memory full: the worst item of the majority class (1) goes, although item 1 is older
    assert hand_score(3, 0.9, 4, 3) > hand_score(4, 0.0, 4, 3)
    assert mem.add(t(5), 0, 0.5)
    assert contents(mem) == [[(1, 5), (5, 1)], [(3, 3)], [(4, 2)]]
    # classes 0 majority now; a class-2 sample must beat the worst of class 0 (item 5: age 1, u 0.5)
    assert not mem.add(t(6), 2, 2.0)
    assert mem.add(t(7), 2, 0.0)
    assert contents(mem) == [[(1, 7)], [(3, 5)], [(4, 4), (7, 1)]]


def test_memory_ties_go_to_the_last_item_scanned():
    mem = CategoryBalancedMemory(capacity=2, num_classes=2)
    mem.add(torch.tensor(1), 0, 0.5)
    mem.add(torch.tensor(2), 1, 0.5)
    mem.items[0][0].age = mem.items[1][0].age = 3                 # equal scores in both majority classes
    mem.add(torch.tensor(3), 0, 0.0)                              # class 0 at quota 1: evicts within class 0
    assert contents(mem) == [[(3, 1)], [(2, 4)]]


def test_memory_random_stream_stays_within_capacity_and_balanced():
    gen = torch.Generator().manual_seed(0)
    capacity, num_classes = 16, 5
    mem = CategoryBalancedMemory(capacity, num_classes)
    stored_at = {}
    for step in range(400):
        label = int(torch.randint(0, num_classes, (), generator=gen))
        if mem.add(torch.tensor(step), label, float(torch.rand((), generator=gen)) * math.log(num_classes)):
            stored_at[step] = step
        assert len(mem) <= capacity
        assert max(mem.class_counts()) <= math.ceil(capacity / num_classes)
        for items in mem.items:
            for item in items:
                assert item.age == step - stored_at[int(item.data)] + 1
    assert len(mem) == capacity


def test_timeliness_weights_by_hand():
    w = timeliness_weights([0, 64, 128], 64, "cpu")
    assert torch.allclose(w, torch.tensor([0.5, math.exp(-1) / (1 + math.exp(-1)), math.exp(-2) / (1 + math.exp(-2))]))


# ---------------------------------------------------------------------- RoTTA: method
def test_rotta_update_schedule_counts_samples_across_batches(tiny_clip):
    rotta = build("rotta", tiny_clip, ROTTA__MEMORY_SIZE=8, ROTTA__UPDATE_FREQUENCY=4)
    before = state(rotta)
    updates = []
    for n in (3, 5, 1, 7, 4):
        rotta(images(n, seed=n))
        updates.append(rotta.num_model_updates)
        if updates[-1] == 0:
            assert all(torch.equal(before[k], v) for k, v in state(rotta).items())
    assert updates == [0, 2, 2, 4, 5]               # floor(3/4), floor(8/4), floor(9/4), floor(16/4), floor(20/4)
    steps = {int(s["step"]) for s in rotta.optimizer.state_dict()["state"].values()}
    assert steps == {5}


def test_rotta_teacher_is_the_ema_and_predicts(tiny_clip):
    source = copy.deepcopy(tiny_clip)
    rotta = build("rotta", tiny_clip, ROTTA__MEMORY_SIZE=8, ROTTA__UPDATE_FREQUENCY=8, ROTTA__NU=0.3)
    assert all(torch.equal(t, p) for t, p in zip(rotta.teacher_params(), rotta.params))
    x = images(8)
    teacher_before = [t.clone() for t in rotta.teacher_params()]
    with torch.no_grad():
        assert_same_forward(rotta(x), source(x))    # first batch: teacher = source, predicted before the update
    assert rotta.num_model_updates == 1
    for t_new, t_old, p in zip(rotta.teacher_params(), teacher_before, rotta.params):
        assert torch.equal(t_new, (1 - 0.3) * t_old + 0.3 * p.detach())
    assert any(not torch.equal(t, p) for t, p in zip(rotta.teacher_params(), rotta.params))
    # the next batch is predicted by the teacher, not the student
    x2 = images(4, seed=1)
    with torch.no_grad():
        teacher_model = copy.deepcopy(source)
        named = dict(teacher_model.named_parameters())
        for n, t in zip(rotta.teacher_names, rotta.teacher_params()):
            named[n].copy_(t)
        assert torch.allclose(rotta(x2), teacher_model(x2), atol=1e-6)


def test_rotta_update_loss_by_hand(tiny_clip):
    source = copy.deepcopy(tiny_clip)
    rotta = build("rotta", tiny_clip, ROTTA__MEMORY_SIZE=4, ROTTA__UPDATE_FREQUENCY=6, **PLAIN_SGD)
    x = images(6)
    rotta(x)                                         # fills the memory, then one update on it
    assert rotta.num_model_updates == 1
    # Rebuild the memory and the augmentation independently and take the step by hand.
    replay = CategoryBalancedMemory(4, C)
    with torch.no_grad():
        p = source(x).softmax(1)
    u = -(p * torch.log(p + 1e-6)).sum(1)
    for i in range(6):
        replay.add(x[i], int(p[i].argmax()), float(u[i]))
    data, ages = replay.contents()
    stored = torch.stack(data)
    augmented = TTATransforms(rotta.cfg.RNG_SEED, noise_seed=rotta.cfg.RNG_SEED + 1)(stored)
    a = torch.tensor(ages, dtype=torch.float64) / 4
    weights = (torch.exp(-a) / (1 + torch.exp(-a))).float()

    def loss_fn(model):
        with torch.no_grad():
            target = source(stored).softmax(1)
        return (-(target * model(augmented).log_softmax(1)).sum(1) * weights).mean()

    m_copy = copy.deepcopy(source)
    named = dict(m_copy.named_parameters())
    grads = torch.autograd.grad(loss_fn(m_copy), [named[n] for n in rotta.param_names])
    params = dict(rotta.model.named_parameters())
    for n, g in zip(rotta.param_names, grads):
        assert torch.allclose(params[n], named[n].detach() - 0.1 * g, atol=1e-6), n


def test_strong_augment_is_batched_reproducible_and_bounded():
    x = torch.rand(1, 3, 32, 32).repeat(4, 1, 1, 1)
    aug = TTATransforms(5, noise_seed=6, noise_std=0.0)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert all(torch.equal(y[0], y[i]) for i in range(1, 4))   # one parameter draw for the batch
    assert not torch.allclose(y, x, atol=1e-3)
    assert not torch.equal(aug(x), y)                            # fresh draws at the next call
    aug.reseed()
    assert torch.equal(aug(x), y)                                # reseed restarts the stream
    noisy = TTATransforms(5, noise_seed=6)(x)
    assert not torch.equal(noisy[0], noisy[1])                   # the noise is per pixel
    with pytest.raises(ValueError, match="B, 3, H, W"):
        aug(torch.rand(3, 32, 32))


def test_rotta_refuses_batchnorm_towers(tiny_clip):
    tiny_clip.clip.visual.extra_bn = torch.nn.BatchNorm2d(3)
    with pytest.raises(ConfigError, match="BatchNorm"):
        build("rotta", tiny_clip)


# ---------------------------------------------------------------------- through the harness
@pytest.mark.parametrize("name", ["tent", "rpl", "sar", "rotta"])
def test_paper_configs_run_through_the_harness(tmp_path, name):
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=6)
    extra = dict(SAR__EXCLUDED_DEEPEST_BLOCKS=1) if name == "sar" else {}
    cfg = tiny_cfg(f"conf/cifar10_c/{name}.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["gaussian_noise", "fog"], TEST__BATCH_SIZE=4, **extra)
    assert cfg.MODEL.ADAPTATION == name and cfg.TEST.BATCH_SIZE == 4
    first = evaluate(cfg, progress=False)["records"]
    second = evaluate(cfg, progress=False)["records"]
    assert [r["n"] for r in first] == [6, 6]
    assert first == second                           # same config and seed: identical results on the CPU


@pytest.mark.parametrize("dataset,batch", [("cifar10_c", 200), ("cifar100_c", 200), ("imagenet_c", 64)])
@pytest.mark.parametrize("name", ["tent", "rpl", "sar", "rotta"])
def test_yaml_settings(dataset, batch, name):
    from harness.build import load_cfg
    from datasets.corruptions import CORRUPTIONS as CORRUPTIONS_15
    cfg = load_cfg(f"conf/{dataset}/{name}.yaml")
    assert (cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS, cfg.MODEL.ADAPTATION) == ("ViT-B-16", "openai", name)
    assert list(cfg.CORRUPTION.SEVERITY) == [5] and list(cfg.CORRUPTION.TYPE) == CORRUPTIONS_15
    assert cfg.SETTING == "reset_each_shift" and cfg.TEST.BATCH_SIZE == batch and cfg.CLIP.FREEZE_TEXT_ENCODER
    assert not cfg.MIXED_PRECISION and cfg.OPTIM.STEPS == 1 and cfg.OPTIM.WD == 0.0
    expected = {
        ("tent", "cifar"): ("Adam", 1e-3), ("tent", "imagenet"): ("SGD", 2.5e-4),
        ("rpl", "cifar"): ("Adam", 1e-3), ("rpl", "imagenet"): ("SGD", 5e-4),
        ("sar", "cifar"): ("SGD", 1e-3), ("sar", "imagenet"): ("SGD", 1e-3),
        ("rotta", "cifar"): ("Adam", 1e-3), ("rotta", "imagenet"): ("Adam", 1e-3),
    }[(name, "imagenet" if dataset == "imagenet_c" else "cifar")]
    assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR) == expected
    if name == "rpl":
        assert cfg.RPL.Q == 0.8
    if name == "sar":
        assert (cfg.SAR.MARGIN_E0, cfg.SAR.RHO, cfg.SAR.RESET_CONSTANT_EM) == (0.4, 0.05, 0.2)
        assert cfg.OPTIM.MOMENTUM == 0.9 and not cfg.OPTIM.NESTEROV
    if name == "rotta":
        r = cfg.ROTTA
        assert (r.MEMORY_SIZE, r.UPDATE_FREQUENCY, r.NU, r.ALPHA, r.LAMBDA_T, r.LAMBDA_U) == (64, 64, 0.001, 0.05, 1, 1)
