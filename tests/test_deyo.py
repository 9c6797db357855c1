"""DeYO on the tiny CLIP (both towers) against an independent transcription of the anchor suite's
classification/methods/deyo.py (loss_calculation, forward_and_adapt, collect_params, configure_model): logits of
every step, adapted parameters and optimizer state, both filters and the reweighting, the three object-destructive
transformations and their random draws; exact reset, the protocol, the name rule and the refusals."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import methods
from conf import ConfigError
from harness.build import check_method
from methods.deyo import adapted_by_reference
from tests.synthetic import tiny_cfg

C = 10
SEED = 5
# Filters that keep some samples and drop others on the tiny CLIP's random weights (entropies near ln 10).
ACTIVE = dict(DEYO__MARGIN=0.975, DEYO__PLPD=0.002, RNG_SEED=SEED)
ADAM = dict(METHOD="Adam", LR=1e-2)
SGD = dict(METHOD="SGD", LR=0.05, MOMENTUM=0.9)     # the anchor's default Nesterov
# Measured |ours - transcription| over 3 steps: 0 on the logits and the parameters (the same operations in the same
# order) on the SSE and AVX2 paths; the tolerances leave room for another CPU's kernels.
ATOL_LOGITS, ATOL_STATE = 1e-5, 1e-6


def batches(n=3, size=16):
    return [torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def build(model, **overrides):
    cfg = tiny_cfg(MODEL__ADAPTATION="deyo", **overrides)
    check_method(cfg)
    return methods.build_method(cfg, model, C)


# ---------------------------------------------------------------------- the transcription
def _reference_configure_and_collect(model):
    """configure_model + collect_params of the anchor's DeYO. Its ZeroShotCLIP drops the text transformer (text
    features computed once), so the loop walks the image tower, named as the anchor names it."""
    model.eval()
    model.requires_grad_(False)
    for m in model.clip.visual.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.requires_grad_(True)
    params = []
    for nm, m in model.clip.visual.named_modules(prefix="clip.visual"):
        if 'layer4' in nm or 'blocks.9' in nm or 'blocks.10' in nm or 'blocks.11' in nm or 'norm.' in nm:
            continue
        if nm in ['norm']:
            continue
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            for np_, p in m.named_parameters():
                if np_ in ['weight', 'bias']:
                    p.requires_grad_(True)
                    params.append(p)
    # Our frame leaves the layers it does not adapt (layer4's BatchNorms) without gradient; the reference computes
    # their gradients and never applies them, which changes nothing.
    for m in model.clip.visual.modules():
        if isinstance(m, nn.BatchNorm2d) and not any(p is m.weight for p in params):
            m.requires_grad_(False)
    return params


def _reference_destroy(x_prime, aug, width, mutation):
    """The anchor's occ / patch / pixel branches, with the patches cut and joined by loops (no einops)."""
    if aug["type"] == 'occ':
        size, row, col = aug["size"], aug["row"], aug["col"]
        first_mean = x_prime.view(x_prime.shape[0], x_prime.shape[1], -1).mean(dim=2)
        window = first_mean.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, size, size)
        x_prime[:, :, row:row + size, col:col + size] = window
        return x_prime
    if aug["type"] == 'patch':
        p = aug["patch_len"]
        resize_t = torchvision.transforms.Resize(((width // p) * p, (width // p) * p))
        resize_o = torchvision.transforms.Resize((width, width))
        x_prime = resize_t(x_prime)
        h = x_prime.shape[-1] // p
        patches = torch.stack([x_prime[:, :, i * h:(i + 1) * h, j * h:(j + 1) * h]
                               for i in range(p) for j in range(p)], dim=1)
        perm_idx = torch.argsort(torch.rand(x_prime.shape[0], p * p), dim=-1)
        if mutation == "same_patch_order_for_all":
            perm_idx = perm_idx[:1].expand_as(perm_idx)
        patches = patches[torch.arange(x_prime.shape[0]).unsqueeze(-1), perm_idx]
        rows = [torch.cat([patches[:, i * p + j] for j in range(p)], dim=-1) for i in range(p)]
        return resize_o(torch.cat(rows, dim=-2))
    flat = x_prime.reshape(x_prime.shape[0], x_prime.shape[1], -1)
    return flat[:, :, torch.randperm(flat.shape[-1])].reshape(x_prime.shape[0], x_prime.shape[1], width, width)


def _reference_loss(model, x, outputs, hp, aug, counts, mutation):
    """loss_calculation after the first forward; None when a filter leaves nothing."""
    entropys = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
    filter_ids_1 = torch.where(entropys < hp["margin"] * math.log(C))
    entropys = entropys[filter_ids_1]
    counts.append(len(entropys))
    if len(entropys) == 0:
        return None
    x_prime = _reference_destroy(x[filter_ids_1].detach(), aug, x.shape[-1], mutation)
    with torch.no_grad():
        outputs_prime = model(x_prime)
    prob_outputs = outputs[filter_ids_1].softmax(1)
    prob_outputs_prime = outputs_prime.softmax(1)
    cls1 = prob_outputs.argmax(dim=1)
    plpd = torch.gather(prob_outputs, 1, cls1.reshape(-1, 1)) - torch.gather(prob_outputs_prime, 1, cls1.reshape(-1, 1))
    if mutation == "plpd_sign":
        plpd = -plpd
    plpd = plpd.reshape(-1)
    filter_ids_2 = torch.where(plpd > hp["plpd"])
    entropys = entropys[filter_ids_2]
    counts.append(len(entropys))
    if len(entropys) == 0:
        return None
    plpd = plpd[filter_ids_2]
    margin_e0 = (hp["margin"] if mutation == "e0_is_the_margin" else hp["margin_e0"]) * math.log(C)
    coeff = (float(hp["reweight_ent"]) * (1. / (torch.exp(entropys.clone().detach() - margin_e0)))
             + float(hp["reweight_plpd"]) * (1. / (torch.exp(-1. * plpd.clone().detach()))))
    if mutation == "weights_with_gradient":
        coeff = 1. / torch.exp(entropys - margin_e0) + 1. / torch.exp(-1. * plpd)
    return entropys.mul(coeff).mean(0)


def reference_deyo(model, images, hp, aug, optim, mutation=None):
    """The anchor's DeYO for len(images) batches, its shuffles drawn from torch's global generator seeded with
    RNG_SEED. Returns the logits of every step, the parameters, the optimizer and the filters' counts."""
    params = _reference_configure_and_collect(model)
    if optim["METHOD"] == "Adam":
        optimizer = torch.optim.Adam(params, lr=optim["LR"], betas=(0.9, 0.999), weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(params, lr=optim["LR"], momentum=optim["MOMENTUM"], dampening=0.0,
                                    weight_decay=0.0, nesterov=True)
    torch.manual_seed(SEED)
    logits, counts = [], []
    for x in images:
        with torch.enable_grad():
            outputs = model(x)
            loss = _reference_loss(model, x, outputs, hp, aug, counts, mutation)
            if loss is not None:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad()
        logits.append(outputs.detach())
    return logits, [p.detach().clone() for p in params], optimizer, counts


HP = dict(margin=0.975, plpd=0.002, margin_e0=0.4, reweight_ent=True, reweight_plpd=True)
CASES = {   # tower, our overrides, the transcription's augmentation, optimizer
    "vit_patch": ("vit", {}, dict(type="patch", patch_len=4), ADAM),
    "vit_patch_resized": ("vit", dict(DEYO__PATCH_LEN=5), dict(type="patch", patch_len=5), ADAM),
    "vit_pixel": ("vit", dict(DEYO__AUG_TYPE="pixel"), dict(type="pixel"), ADAM),
    "vit_occ": ("vit", dict(DEYO__AUG_TYPE="occ", DEYO__OCCLUSION_SIZE=16, DEYO__ROW_START=4,
                            DEYO__COLUMN_START=10), dict(type="occ", size=16, row=4, col=10), ADAM),
    "rn_patch": ("rn", {}, dict(type="patch", patch_len=4), SGD),
    "rn_pixel_sgd": ("rn", dict(DEYO__AUG_TYPE="pixel"), dict(type="pixel"), SGD),
}


def _run_both(request, case, mutation=None):
    tower, overrides, aug, optim = CASES[case]
    model = request.getfixturevalue("tiny_clip" if tower == "vit" else "tiny_clip_rn")
    arch = dict(MODEL__ARCH="tiny-clip-test-rn") if tower == "rn" else {}
    reference_model = copy.deepcopy(model)
    method = build(model, **arch, **ACTIVE, **{f"OPTIM__{k}": v for k, v in optim.items()}, **overrides)
    images = batches()
    ours = [method(x) for x in images]
    ref_logits, ref_params, ref_optimizer, counts = reference_deyo(reference_model, images, HP, aug, optim, mutation)
    return method, ours, ref_logits, ref_params, ref_optimizer, counts


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_transcription_of_the_anchor_suite(request, case):
    method, ours, ref_logits, ref_params, ref_optimizer, counts = _run_both(request, case)
    # Both filters at work: some of the 16 samples dropped by the entropy filter, some by the PLPD filter, and
    # some steps taken (counts: kept after filter 1, after filter 2, per batch).
    assert any(0 < n < 16 for n in counts[::2]) and any(n > 0 for n in counts[1::2]), counts
    assert any(b < a for a, b in zip(counts[::2], counts[1::2])), counts
    for a, b in zip(ours, ref_logits):
        torch.testing.assert_close(a, b, atol=ATOL_LOGITS, rtol=0)
    assert len(method.params) == len(ref_params)
    for p, q in zip(method.params, ref_params):
        torch.testing.assert_close(p.detach(), q, atol=ATOL_STATE, rtol=0)
    ours_state, ref_state = method.optimizer.state_dict()["state"], ref_optimizer.state_dict()["state"]
    assert ours_state.keys() == ref_state.keys()
    for k in ours_state:
        for name, value in ours_state[k].items():
            torch.testing.assert_close(value, ref_state[k][name], atol=ATOL_STATE, rtol=0)


@pytest.mark.parametrize("mutation", ["plpd_sign", "e0_is_the_margin", "weights_with_gradient",
                                      "same_patch_order_for_all"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(request, mutation):
    """Measured (parameters / logits): plpd_sign 3e-2 / 6e-2, e0_is_the_margin 4e-4 / 2e-6,
    weights_with_gradient 4e-2 / 0.4, same_patch_order_for_all 3e-2 / 0.36 (SSE and AVX2 alike)."""
    method, ours, ref_logits, ref_params, _, _ = _run_both(request, "vit_patch", mutation)
    param_diff = max((p.detach() - q).abs().max().item() for p, q in zip(method.params, ref_params))
    logit_diff = max((a - b).abs().max().item() for a, b in zip(ours, ref_logits))
    assert param_diff > 10 * ATOL_STATE or logit_diff > 10 * ATOL_LOGITS, (param_diff, logit_diff)


# ---------------------------------------------------------------------- parameters and protocol
def test_the_reference_name_rule_on_vit_b_16_and_resnet_names():
    assert adapted_by_reference("clip.visual.transformer.resblocks.8.ln_2")
    assert not adapted_by_reference("clip.visual.transformer.resblocks.9.ln_1")
    assert not adapted_by_reference("clip.visual.transformer.resblocks.11.ln_2")
    assert adapted_by_reference("clip.visual.transformer.resblocks.1.ln_1")
    assert adapted_by_reference("clip.visual.ln_post") and adapted_by_reference("clip.visual.ln_pre")
    assert not adapted_by_reference("clip.visual.layer4.0.bn1")
    assert adapted_by_reference("clip.visual.layer3.0.bn1")
    assert not adapted_by_reference("clip.visual.trunk.norm.x") and not adapted_by_reference("norm")


def test_resnet_layer4_frozen_but_normalised_with_batch_statistics(tiny_clip_rn):
    method = build(tiny_clip_rn, MODEL__ARCH="tiny-clip-test-rn", **ACTIVE)
    assert method.param_names and not any("layer4" in n for n in method.param_names)
    bns = [m for m in method.model.clip.visual.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.running_mean is None and not m.track_running_stats for m in bns)
    layer4 = method.model.clip.visual.layer4
    assert not any(p.requires_grad for p in layer4.parameters())


def test_predict_then_adapt_and_no_step_when_everything_is_filtered(tiny_clip):
    source = copy.deepcopy(tiny_clip)
    method = build(tiny_clip, DEYO__AUG_TYPE="pixel", OPTIM__LR=1e-2, **ACTIVE)   # a step on the first batch
    x, y = batches(2)
    with torch.no_grad():
        expected = source(x)
    assert torch.equal(method(x), expected)
    assert not torch.equal(method(y), source(y).detach())           # the second batch sees the adapted model
    still = build(copy.deepcopy(source), DEYO__MARGIN=0.0)          # nothing passes the entropy filter
    before = [p.detach().clone() for p in still.params]
    still(x)
    assert all(torch.equal(p, q) for p, q in zip(still.params, before))
    assert torch.equal(still.generator.get_state(), torch.Generator().manual_seed(1).get_state())  # no draw


def test_reset_restores_all_state_exactly(tiny_clip):
    method = build(tiny_clip, **ACTIVE)
    images = batches()
    first = method(images[0])
    state = copy.deepcopy(method.state_dict())
    optimizer = copy.deepcopy(method.optimizer.state_dict())
    generator = method.generator.get_state()
    method(images[1])
    method(images[2])
    method.reset()
    assert torch.equal(method(images[0]), first)
    after = method.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(method.generator.get_state(), generator)
    assert str(method.optimizer.state_dict()) == str(optimizer)


def test_episodic_reset_restores_the_model_but_the_shuffles_go_on(tiny_clip):
    source = copy.deepcopy(tiny_clip)
    method = build(tiny_clip, MODEL__EPISODIC=True, **ACTIVE)
    x, y = batches(2)
    method(x)
    drawn = method.generator.get_state()
    with torch.no_grad():
        assert torch.equal(method(y), source(y))                   # the source model for every batch
    assert not torch.equal(method.generator.get_state(), drawn)    # the reference's global stream goes on


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, words", [
    (dict(DEYO__AUG_TYPE="occ"), "DEYO.AUG_TYPE occ: the 112-pixel square"),     # defaults, 32-pixel tiny input
    (dict(DEYO__AUG_TYPE="occ", DEYO__OCCLUSION_SIZE=8, DEYO__ROW_START=28), "DEYO.ROW_START 28"),
    (dict(DEYO__PATCH_LEN=33), "DEYO.PATCH_LEN=33"),
    (dict(DEYO__AUG_TYPE="rotate"), "DEYO.AUG_TYPE"),
    (dict(DEYO__MARGIN=-0.1), "DEYO.MARGIN"),
    (dict(DEYO__PATCH_LEN=0), "DEYO.PATCH_LEN"),
    (dict(CLIP__FREEZE_TEXT_ENCODER=False), "CLIP.FREEZE_TEXT_ENCODER"),
])
def test_bad_config_is_refused_in_one_line_before_any_model_loads(overrides, words):
    with pytest.raises(ConfigError) as err:
        check_method(tiny_cfg(MODEL__ADAPTATION="deyo", **overrides))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_eata_margin_e0_of_the_anchor_is_refused_unless_it_is_deyos():
    cfg = tiny_cfg(MODEL__ADAPTATION="deyo")
    if "EATA" not in cfg or "MARGIN_E0" not in cfg.EATA:
        pytest.skip("no method of this checkout declares EATA.MARGIN_E0 (the schema refuses the key itself)")
    with pytest.raises(ConfigError, match="set DEYO.MARGIN_E0 0.3"):
        check_method(tiny_cfg(MODEL__ADAPTATION="deyo", EATA__MARGIN_E0=0.3))
    check_method(tiny_cfg(MODEL__ADAPTATION="deyo", EATA__MARGIN_E0=0.3, DEYO__MARGIN_E0=0.3))
