"""WATT-P / WATT-S: loss, schedule (start points, optimizer state, weight averaging), what changes, prediction,
reset, cost attributes, config errors, and end-to-end runs through the harness."""
import copy
import json

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conf import ConfigError
from harness.run import evaluate
from methods.watt import WATT, WATT_TEMPLATES, WATTSequential, watt_loss
from models import model_spec
from tests.synthetic import tiny_cfg, write_cifar_c

TWO_TEMPLATES = ["a photo of a {}.", "art of the {}."]
LR = 1e-2   # large enough that one step visibly moves the weights of the tiny model



def make_watt(model, mode="parallel", templates=TWO_TEMPLATES, iterations=1, repeats=1, **overrides):
    cfg_file = "conf/cifar10_c/watt_p.yaml" if mode == "parallel" else "conf/cifar10_c/watt_s.yaml"
    cfg = tiny_cfg(cfg_file, WATT__TEMPLATES=list(templates), WATT__ITERATIONS=iterations, WATT__REPEATS=repeats,
                   OPTIM__LR=LR, **overrides)
    cls = WATT if mode == "parallel" else WATTSequential
    cls.check_setup(cfg, model_spec(cfg.MODEL.ARCH), model.class_names)   # as the run plan does
    return cls(cfg, model, 10).setup()


def images(n=6, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def visual_ln_params(model):
    return [p for m in model.clip.visual.modules() if isinstance(m, nn.LayerNorm) for p in (m.weight, m.bias)]


def ln_state(model):
    """{name: tensor} of the image tower's LayerNorm weights and biases."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p.detach().clone() for p in visual_ln_params(model)}


def independent_text_features(model, templates):
    """(T, C, D): each template's normalised text features, through open_clip's own encode_text."""
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    with torch.no_grad():
        return torch.stack([F.normalize(model.clip.encode_text(tokenizer([t.format(c) for c in model.class_names])),
                                        dim=-1) for t in templates])


def loop_loss(image_features, text_features, scale, temperature):
    """The reference's loss written element by element: rows j of logits^T against columns j of the targets."""
    b = image_features.shape[0]
    with torch.no_grad():
        pseudo = [int(torch.argmax(torch.stack([image_features[i] @ t for t in text_features]))) for i in range(b)]
    text = [text_features[c] for c in pseudo]
    sim = [[(image_features[i] @ image_features[k] + text[i] @ text[k]) / 2 for k in range(b)] for i in range(b)]
    total = 0.0
    for j in range(b):
        logits_j = torch.stack([scale * text[i] @ image_features[j] for i in range(b)])
        log_probs = logits_j - torch.logsumexp(logits_j, dim=0)
        for i in range(b):
            row = torch.stack(sim[i]) / temperature
            target_ij = torch.exp(row[j] - torch.logsumexp(row, dim=0))
            total = total - target_ij * log_probs[i]
    return total / b


def adam_step(model, params, optimizer, x, text, temperature=0.01):
    loss = watt_loss(F.normalize(model.encode_image(x), dim=-1), text, model.logit_scale, temperature)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def trainable_copy(model):
    m = copy.deepcopy(model)
    m.requires_grad_(False)
    params = visual_ln_params(m)
    for p in params:
        p.requires_grad_(True)
    return m, params, torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)


def reference_schedule(model, x, text_per_template, mode, iterations, repeats):
    """The reference's perform_adaptation, statement by statement (one Adam; fresh at the start and, in parallel
    mode, for every template of the first repeat; otherwise the weights are re-loaded from the average)."""
    m, params, optimizer = trainable_copy(model)
    source = [p.detach().clone() for p in params]
    fresh = copy.deepcopy(optimizer.state_dict())

    def load(weights):
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)

    average = None
    for repeat in range(repeats):
        collected = []
        if mode == "sequential":
            if repeat == 0:
                load(source)
                optimizer.load_state_dict(copy.deepcopy(fresh))
            else:
                load(average)
        for text in text_per_template:
            if mode == "parallel":
                if repeat == 0:
                    load(source)
                    optimizer.load_state_dict(copy.deepcopy(fresh))
                else:
                    load(average)
            for _ in range(iterations):
                adam_step(m, params, optimizer, x, text)
            collected.append([p.detach().clone() for p in params])
        average = [sum(ws[k] for ws in collected) / len(collected) for k in range(len(params))]
    load(average)
    return ln_state(m)


def assert_states_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------------------- loss
def test_loss_matches_elementwise_computation_value_and_gradient(tiny_clip):
    torch.manual_seed(0)
    text = F.normalize(torch.randn(5, 32), dim=-1)
    feats = F.normalize(torch.randn(4, 32), dim=-1)
    a = feats.clone().requires_grad_(True)
    b = feats.clone().requires_grad_(True)
    vec = watt_loss(a, text, torch.tensor(100.0), 0.01)
    loop = loop_loss(b, text, 100.0, 0.01)
    vec.backward()
    loop.backward()
    torch.testing.assert_close(vec, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert a.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- schedule
def test_text_features_are_the_templates_features(tiny_clip):
    method = make_watt(tiny_clip)
    expected = independent_text_features(tiny_clip, TWO_TEMPLATES)
    torch.testing.assert_close(method.template_text_features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.ensemble_text_features, F.normalize(expected.mean(0), dim=-1),
                               atol=1e-5, rtol=1e-5)
    assert WATT_TEMPLATES == make_watt(copy.deepcopy(tiny_clip), templates=WATT_TEMPLATES).templates


def test_parallel_average_equals_mean_of_independent_adaptations(tiny_clip):
    """WATT-P, one repeat: every template adapts from the source with a fresh Adam; the result is their mean."""
    source = copy.deepcopy(tiny_clip)
    x = images()
    method = make_watt(tiny_clip, "parallel")
    method(x)
    text = method.template_text_features
    adapted = []
    for t in range(2):
        m, params, optimizer = trainable_copy(source)
        adam_step(m, params, optimizer, x, text[t])
        adapted.append(ln_state(m))
    hand_mean = {k: (adapted[0][k] + adapted[1][k]) / 2 for k in adapted[0]}
    assert_states_close(ln_state(method.model), hand_mean)
    # and the two templates really gave different weights, so the mean is not trivially either of them
    assert any(not torch.equal(adapted[0][k], adapted[1][k]) for k in hand_mean)


def test_sequential_average_equals_mean_along_the_chain(tiny_clip):
    """WATT-S, one repeat: template 2 continues from template 1's weights (and Adam state); mean of both."""
    source = copy.deepcopy(tiny_clip)
    x = images()
    method = make_watt(tiny_clip, "sequential")
    method(x)
    text = method.template_text_features
    m, params, optimizer = trainable_copy(source)
    adam_step(m, params, optimizer, x, text[0])
    after_first = ln_state(m)
    adam_step(m, params, optimizer, x, text[1])
    after_second = ln_state(m)
    hand_mean = {k: (after_first[k] + after_second[k]) / 2 for k in after_first}
    assert_states_close(ln_state(method.model), hand_mean)


def test_parallel_and_sequential_differ(tiny_clip):
    x = images()
    p = make_watt(copy.deepcopy(tiny_clip), "parallel")
    s = make_watt(copy.deepcopy(tiny_clip), "sequential")
    p(x), s(x)
    diff = max((a - b).abs().max().item() for a, b in zip(ln_state(p.model).values(), ln_state(s.model).values()))
    assert diff > 1e-4


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_full_schedule_matches_reference_loop(tiny_clip, mode):
    """Several repeats, iterations and templates: start points, Adam-state carry-over and averaging as in the
    reference's perform_adaptation."""
    source = copy.deepcopy(tiny_clip)
    x = images()
    templates = ["a photo of a {}.", "art of the {}.", "a {} in a video game."]
    method = make_watt(tiny_clip, mode, templates=templates, iterations=2, repeats=2)
    method(x)
    expected = reference_schedule(source, x, method.template_text_features, mode, iterations=2, repeats=2)
    assert_states_close(ln_state(method.model), expected)


# ---------------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_only_image_layernorm_affine_params_change(tiny_clip, mode):
    before = copy.deepcopy(tiny_clip.state_dict())
    method = make_watt(tiny_clip, mode)
    method(images())
    after = tiny_clip.state_dict()
    ln_names = set(ln_state(tiny_clip))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= ln_names
    assert all(k.startswith("clip.visual.") and k.endswith((".weight", ".bias")) for k in changed)
    assert set(method.param_names) == ln_names


def test_every_batch_starts_from_the_source(tiny_clip):
    """The reference resets before every batch: a batch's result does not depend on the batches before it."""
    x, other = images(seed=0), images(seed=1)
    fresh = make_watt(copy.deepcopy(tiny_clip), "sequential")
    first = fresh(x)
    used = make_watt(tiny_clip, "sequential")
    used(other)
    again = used(x)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_prediction_uses_averaged_weights_and_template_averaged_text(tiny_clip):
    source = copy.deepcopy(tiny_clip)
    method = make_watt(tiny_clip, "parallel")
    x = images()
    logits = method(x)
    text = independent_text_features(tiny_clip, TWO_TEMPLATES)
    ensemble = F.normalize(text.mean(dim=0), dim=-1)
    with torch.no_grad():   # the model now holds the averaged weights
        feats = F.normalize(tiny_clip.encode_image(x), dim=-1)
    torch.testing.assert_close(logits, tiny_clip.logit_scale * feats @ ensemble.t(), atol=1e-4, rtol=1e-4)
    zero_shot = make_watt(source, "parallel").predict(x)
    assert not torch.allclose(logits, zero_shot)


def test_reset_restores_everything_exactly(tiny_clip):
    method = make_watt(tiny_clip, "sequential", iterations=2)
    state0 = copy.deepcopy(method.state_dict())
    opt0 = copy.deepcopy(method.optimizer.state_dict())
    method(images())
    assert method.optimizer.state_dict()["state"]        # Adam moments exist after adapting
    method.reset()
    state1 = method.state_dict()
    assert state0.keys() == state1.keys()
    assert all(torch.equal(state0[k], state1[k]) for k in state0)
    assert method.optimizer.state_dict()["state"] == opt0["state"] == {}


def test_cost_attributes(tiny_clip):
    method = make_watt(tiny_clip, "parallel", templates=WATT_TEMPLATES, iterations=2, repeats=3)
    assert method.backward_passes_per_batch == 3 * 8 * 2
    assert method.forward_passes_per_batch == 3 * 8 * 2 + 1
    assert method.views_per_image == 1
    assert method.cost_info()["forward_passes_per_batch"] == 49


def test_deterministic(tiny_clip):
    x = images()
    a = make_watt(copy.deepcopy(tiny_clip), "parallel", iterations=2)(x)
    b = make_watt(copy.deepcopy(tiny_clip), "parallel", iterations=2)(x)
    assert torch.equal(a, b)


def test_config_errors(tiny_clip):
    with pytest.raises(ConfigError, match="WATT.TEMPLATES"):
        make_watt(copy.deepcopy(tiny_clip), templates=["no class slot"])
    with pytest.raises(ConfigError, match="OPTIM.STEPS"):
        make_watt(copy.deepcopy(tiny_clip), OPTIM__STEPS=2)
    with pytest.raises(ConfigError, match="WATT.ITERATIONS"):
        make_watt(copy.deepcopy(tiny_clip), iterations=0)


def test_configs_follow_the_reference_scripts():
    for ds in ("cifar10_c", "cifar100_c", "imagenet_c"):
        p = tiny_cfg(f"conf/{ds}/watt_p.yaml")
        s = tiny_cfg(f"conf/{ds}/watt_s.yaml")
        assert (p.WATT.ITERATIONS, p.WATT.REPEATS, s.WATT.ITERATIONS, s.WATT.REPEATS) == (2, 50, 2, 5)
        assert list(p.WATT.TEMPLATES) == list(s.WATT.TEMPLATES) == WATT_TEMPLATES
        assert p.OPTIM.METHOD == s.OPTIM.METHOD == "Adam" and p.OPTIM.LR == s.OPTIM.LR == 1e-3
        assert p.TEST.BATCH_SIZE == s.TEST.BATCH_SIZE == 128


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("variant", ["watt_p", "watt_s"])
def test_end_to_end_on_synthetic_cifar10c(tmp_path, variant):
    write_cifar_c(tmp_path, ["gaussian_noise"], per_severity=10)
    cfg = tiny_cfg(f"conf/cifar10_c/{variant}.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["gaussian_noise"], TEST__BATCH_SIZE=5, WATT__REPEATS=1, WATT__ITERATIONS=1,
                   WATT__TEMPLATES=TWO_TEMPLATES)
    payload = evaluate(cfg, progress=False)
    assert payload["method"] == variant
    assert [r["n"] for r in payload["records"]] == [10]
    assert 0.0 <= payload["records"][0]["accuracy"] <= 1.0
    saved = json.loads(next((tmp_path / "out").rglob("results.json")).read_text())
    assert saved["records"] == payload["records"]
    assert saved["provenance"]["method_cost"]["backward_passes_per_batch"] == 2
