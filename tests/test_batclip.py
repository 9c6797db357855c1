"""BATCLIP: the vectorised loss against a plain per-class loop, its variant keys, what adapts, the
predict-then-adapt protocol, reset, precision, and one end-to-end run on synthetic CIFAR-10-C."""
import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from harness.build import check_method, load_cfg
from methods.batclip import Batclip, BatclipLossOptions, batclip_loss, precision_plan
from tests.synthetic import AUTHORS_OURS_YAML, tiny_cfg, write_cifar_c

BATCLIP_YAML = "conf/cifar10_c/batclip.yaml"


# ---------------------------------------------------------------------------------------------- the loss
def loop_reference(logits, feats, text, projection_norm="present", separation_reduction="sum",
                   prototypes="unnormalised"):
    """BATCLIP's terms the slow way: a Python loop over the classes that occur, one pair at a time."""
    probs = logits.softmax(1)
    entropy = -(probs * logits.log_softmax(1)).sum(1).mean()
    labels = [int(v) for v in logits.detach().argmax(1)]
    if prototypes == "normalised":
        feats = feats / feats.norm(dim=1, keepdim=True)
    classes = sorted(set(labels))
    protos = {}
    for c in classes:
        rows = [feats[i] for i in range(len(labels)) if labels[i] == c]
        protos[c] = sum(rows) / len(rows)
    projection = sum(torch.dot(protos[c], text[c]) for c in classes)
    projection = projection / (len(classes) if projection_norm == "present" else logits.shape[1])
    separation = torch.zeros((), dtype=logits.dtype)
    pairs = 0
    for c in classes:
        for l in classes:
            if c != l:
                pc, pl = protos[c], protos[l]
                separation = separation + (1 - torch.dot(pc, pl) / (pc.norm() * pl.norm()))
                pairs += 1
    if separation_reduction == "mean" and pairs:
        separation = separation / pairs
    return entropy, projection, separation, classes


def make_batch(labels, num_classes, dim=16, seed=0, dtype=torch.float64):
    """Logits whose argmax is ``labels``; unnormalised features of varied norms; unit text features."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    logits = torch.randn(len(labels), num_classes, generator=g, dtype=dtype)
    logits = logits + 8.0 * F.one_hot(labels, num_classes).to(dtype)
    norms = 1 + 3 * torch.rand(len(labels), 1, generator=g, dtype=dtype)
    feats = torch.randn(len(labels), dim, generator=g, dtype=dtype) * norms
    text = F.normalize(torch.randn(num_classes, dim, generator=g, dtype=dtype), dim=1)
    return logits, feats, text


CASES = {
    "one_class_present": ([3] * 7, 10),
    "every_class_present": ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 5, 9, 9], 10),
    "class_with_one_image": ([2, 2, 2, 7, 2, 5, 5], 10),
    "batch_smaller_than_classes": ([4, 11, 0, 4, 19], 20),
    "many_classes": ([int(v) for v in torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))], 1000),
}
VARIANTS = [dict(), dict(projection_norm="all"), dict(separation_reduction="mean"), dict(prototypes="normalised"),
            dict(projection_norm="all", separation_reduction="mean", prototypes="normalised")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()) or "authors")
@pytest.mark.parametrize("case", list(CASES))
def test_vectorised_loss_equals_per_class_loop_values_and_gradients(case, variant):
    labels, num_classes = CASES[case]
    logits, feats, text = make_batch(labels, num_classes)
    leaves = [t.clone().requires_grad_(True) for t in (logits, feats, text)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (logits, feats, text)]
    got = batclip_loss(*leaves, BatclipLossOptions(**variant))
    ent, pm, sp, classes = loop_reference(*ref_leaves, **variant)
    assert got.present.tolist() == classes
    for a, b in ((got.entropy, ent), (got.projection, pm), (got.separation, sp), (got.total, ent - pm - sp)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    got.total.backward()
    (ent - pm - sp).backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_no_gradient_through_the_pseudo_labels():
    """L_pm and L_sp reach the logits only through argmax, which has no gradient: d total / d logits is
    d entropy / d logits."""
    logits, feats, text = make_batch([0, 1, 1, 2, 0, 3], 5)
    a = logits.clone().requires_grad_(True)
    batclip_loss(a, feats, text).total.backward()
    b = logits.clone().requires_grad_(True)
    (-(b.softmax(1) * b.log_softmax(1)).sum(1).mean()).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_variant_keys_change_the_loss_as_documented():
    logits, feats, text = make_batch([1, 1, 4, 6, 6, 6, 9], 10)
    base = batclip_loss(logits, feats, text)
    k = base.present.numel()
    assert k == 4
    # "all": the paper's 1/C instead of the code's 1/|K|.
    every = batclip_loss(logits, feats, text, BatclipLossOptions(projection_norm="all"))
    torch.testing.assert_close(every.projection, base.projection * k / 10)
    # "mean": the sum over ordered pairs divided by their number |K|(|K|-1).
    mean = batclip_loss(logits, feats, text, BatclipLossOptions(separation_reduction="mean"))
    torch.testing.assert_close(mean.separation, base.separation / (k * (k - 1)))
    # "normalised": prototypes of unit features; the same loss as unnormalised on pre-normalised inputs.
    normed = batclip_loss(logits, feats, text, BatclipLossOptions(prototypes="normalised"))
    on_unit = batclip_loss(logits, F.normalize(feats, dim=1), text)
    torch.testing.assert_close(normed.total, on_unit.total)
    assert not torch.allclose(normed.projection, base.projection)
    # weights: total = we * L_ent - wp * L_pm - ws * L_sp.
    weighted = batclip_loss(logits, feats, text, BatclipLossOptions(entropy_weight=0.5, projection_weight=2.0,
                                                                    separation_weight=0.0))
    torch.testing.assert_close(weighted.total, 0.5 * base.entropy - 2.0 * base.projection)
    torch.testing.assert_close(base.total, base.entropy - base.projection - base.separation)


def test_single_present_class_separation_is_zero_for_sum_and_mean():
    logits, feats, text = make_batch([5, 5, 5], 10)
    for reduction in ("sum", "mean"):
        out = batclip_loss(logits, feats, text, BatclipLossOptions(separation_reduction=reduction))
        assert out.present.tolist() == [5]
        assert torch.isfinite(out.total) and out.separation.item() == 0.0
        torch.testing.assert_close(out.projection, feats.mean(0) @ text[5])


def test_separation_sum_grows_with_present_classes_like_k_squared():
    """Orthogonal prototypes: every ordered pair contributes 1, so the sum is |K|(|K|-1)."""
    dim, k = 8, 5
    feats = torch.eye(dim, dtype=torch.float64)[:k] * torch.arange(1, k + 1, dtype=torch.float64)[:, None]
    logits = 10.0 * F.one_hot(torch.arange(k), 7).double()
    text = F.normalize(torch.randn(7, dim, dtype=torch.float64), dim=1)
    out = batclip_loss(logits, feats, text)
    torch.testing.assert_close(out.separation, torch.tensor(float(k * (k - 1)), dtype=torch.float64))


def test_loss_runs_in_fp32_for_half_inputs():
    logits, feats, text = make_batch([0, 1, 2, 2], 4, dtype=torch.float16)
    out = batclip_loss(logits, feats, text)
    assert out.total.dtype == torch.float32
    ref = batclip_loss(logits.float(), feats.float(), text.float())
    torch.testing.assert_close(out.total, ref.total)


@pytest.mark.parametrize("kwargs, key", [(dict(projection_norm="classes"), "BATCLIP.PROJECTION_NORM"),
                                         (dict(separation_reduction="avg"), "BATCLIP.SEPARATION_REDUCTION"),
                                         (dict(prototypes="raw"), "BATCLIP.PROTOTYPES")])
def test_bad_variant_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        BatclipLossOptions(**kwargs)


def test_bad_shapes_are_reported():
    logits, feats, text = make_batch([0, 1], 3)
    with pytest.raises(ValueError, match="text_features"):
        batclip_loss(logits, feats, text[:2])
    with pytest.raises(ValueError, match="image_pre_features"):
        batclip_loss(logits, feats[:1], text)


# ---------------------------------------------------------------------------------------------- precision
def test_precision_plan_fp16_autocast_and_scaler_only_on_cuda():
    assert precision_plan("cuda", True) == (torch.float16, True)
    assert precision_plan("cuda", False) == (None, False)
    assert precision_plan("cpu", True) == (None, False)
    assert precision_plan("cpu", False) == (None, False)


def batclip_on(model, **overrides):
    cfg = tiny_cfg(BATCLIP_YAML, **overrides)
    check_method(cfg)                      # the run plan's checks, before any model loads
    return methods.build_method(cfg, model, model.num_classes)


def images(n=12, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cpu_path_is_fp32_without_scaler(tiny_clip):
    method = batclip_on(tiny_clip)
    assert method.scaler is None and method.precision.autocast_dtype is None
    logits = method(images())
    assert logits.dtype == torch.float32 and logits.shape == (12, 10)
    assert method.last_loss.total.dtype == torch.float32


def test_half_weights_are_refused(tiny_clip):
    with pytest.raises(ConfigError, match="CLIP.PRECISION"):
        batclip_on(tiny_clip, CLIP__PRECISION="fp16")


# ---------------------------------------------------------------------------------------------- what adapts
NORM_NAME = re.compile(r"(^|\.)(ln_pre|ln_post|ln_final|ln_1|ln_2)\.(weight|bias)$")


def test_adapted_parameters_are_the_norm_affines_of_both_towers(tiny_clip):
    method = batclip_on(tiny_clip)
    expected = {n for n, _ in tiny_clip.named_parameters() if NORM_NAME.search(n)}
    assert set(method.param_names) == expected
    assert {n for n, p in tiny_clip.named_parameters() if p.requires_grad} == expected
    assert any(n.startswith("clip.visual.") for n in expected) and "clip.ln_final.weight" in expected
    # tiny-clip-test: image width 64 (ln_pre, 2 blocks x 2, ln_post), text width 32 (2 blocks x 2, ln_final).
    assert method.num_trainable_params() == 6 * 2 * 64 + 5 * 2 * 32


def test_vit_b16_adapts_65536_parameters():
    """The paper's count, on ViT-B-16 built on the meta device (construction only, no weights, no forward)."""
    import open_clip
    from datasets.class_names import CIFAR10_CLASSES
    from models.clip import ZeroShotCLIP
    clip = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    model = ZeroShotCLIP(clip, open_clip.get_tokenizer("ViT-B-16"), CIFAR10_CLASSES, ["a photo of a {}."],
                         open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    method = batclip_on(model)
    assert method.num_trainable_params() == 65_536
    assert sum(p.numel() for p in model.parameters()) == 149_620_737
    assert all(NORM_NAME.search(n) for n in method.param_names)


def test_frozen_text_encoder_key_adapts_the_image_tower_only(tiny_clip):
    method = batclip_on(tiny_clip, CLIP__FREEZE_TEXT_ENCODER=False)
    both = set(method.param_names)
    frozen_text = batclip_on(copy.deepcopy(tiny_clip), CLIP__FREEZE_TEXT_ENCODER=True)
    assert set(frozen_text.param_names) == {n for n in both if n.startswith("clip.visual.")}


def test_one_step_changes_only_norm_affines_and_runs_the_text_tower_with_gradient(tiny_clip):
    method = batclip_on(tiny_clip)
    before = copy.deepcopy(tiny_clip.state_dict())
    text_before = tiny_clip.text_features()[0].detach().clone()
    method(images())
    after = tiny_clip.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = set(method.param_names)
    assert changed <= trainable, changed - trainable                      # the rest is bit-identical
    assert any(n.startswith("clip.visual.") for n in changed)
    assert any(not n.startswith("clip.visual.") for n in changed)         # text LayerNorms moved too
    params = dict(tiny_clip.named_parameters())
    assert params["clip.ln_final.weight"].grad is not None and params["clip.ln_final.weight"].grad.abs().sum() > 0
    assert not torch.allclose(tiny_clip.text_features()[0], text_before)  # text features recomputed


def test_returned_logits_are_the_pre_update_predictions(tiny_clip):
    method = batclip_on(tiny_clip)
    x = images()
    frozen_copy = copy.deepcopy(tiny_clip)
    logits = method(x)
    with torch.no_grad():
        expected = frozen_copy(x)
        after_update = tiny_clip(x)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after_update, expected, rtol=1e-5, atol=1e-5)


class CpuScalerBatclip(Batclip):
    """Batclip with a real GradScaler on the CPU, to test that reset restores the scaler's state too."""

    def setup_scaler(self):
        return torch.amp.GradScaler("cpu", init_scale=float(self.cfg.BATCLIP.GRAD_SCALER_INIT))


@pytest.mark.parametrize("method_class", [Batclip, CpuScalerBatclip])
def test_reset_restores_model_optimizer_and_scaler_exactly(tiny_clip, method_class):
    cfg = tiny_cfg(BATCLIP_YAML)
    source = copy.deepcopy(tiny_clip.state_dict())
    method = method_class(cfg, tiny_clip, 10).setup()
    scaler_state = copy.deepcopy(method.scaler.state_dict()) if method.scaler else None
    first_logits = method(images(seed=1))
    first_params = copy.deepcopy(tiny_clip.state_dict())
    for seed in (2, 3, 4):
        method(images(seed=seed))
    assert method.optimizer.state and method.last_loss is not None
    if method.scaler:
        assert method.scaler.state_dict() != scaler_state and method.scaler.get_scale() == 1000.0
    method.reset()
    assert all(torch.equal(v, tiny_clip.state_dict()[k]) for k, v in source.items())
    assert not method.optimizer.state and method.last_loss is None
    if method.scaler:
        assert method.scaler.state_dict() == scaler_state
    # Bit-identical replay: the same first step from the source state (Adam moments start at zero again).
    torch.testing.assert_close(method(images(seed=1)), first_logits, rtol=0, atol=0)
    assert all(torch.equal(v, tiny_clip.state_dict()[k]) for k, v in first_params.items())


# ---------------------------------------------------------------------------------------------- configs and run


def test_authors_yaml_with_adaptation_ours_builds_batclip(tmp_path, tiny_clip):
    path = tmp_path / "ours.yaml"
    path.write_text(AUTHORS_OURS_YAML)
    cfg = tiny_cfg(path)
    method = methods.build_method(cfg, tiny_clip, 10)
    assert type(method) is Batclip and methods.METHODS.canonical("ours") == "batclip"
    assert isinstance(method.optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("dataset, optimizer, lr, batch", [("cifar10_c", "AdamW", 1e-3, 200),
                                                           ("cifar100_c", "Adam", 5e-4, 200),
                                                           ("imagenet_c", "AdamW", 5e-4, 64)])
def test_shipped_yamls_have_the_papers_settings(dataset, optimizer, lr, batch):
    from datasets.corruptions import CORRUPTIONS as CORRUPTIONS_15
    cfg = load_cfg(f"conf/{dataset}/batclip.yaml")
    assert methods.METHODS.canonical(cfg.MODEL.ADAPTATION) == "batclip"
    assert (cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS, cfg.SETTING) == ("ViT-B-16", "openai", "reset_each_shift")
    assert cfg.CORRUPTION.SEVERITY == [5] and cfg.CORRUPTION.TYPE == CORRUPTIONS_15
    assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.TEST.BATCH_SIZE) == (optimizer, lr, batch)
    assert (cfg.OPTIM.WD, cfg.OPTIM.BETA, cfg.OPTIM.STEPS) == (0.01, 0.9, 1)
    assert cfg.CLIP.FREEZE_TEXT_ENCODER is False and list(cfg.CLIP.PROMPT_TEMPLATE) == ["a photo of a {}."]
    assert cfg.BATCLIP.AUTOCAST is True and cfg.BATCLIP.GRAD_SCALER_INIT == 1000.0


def test_end_to_end_on_synthetic_cifar10c(tmp_path):
    from harness.run import evaluate
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=10)
    cfg = tiny_cfg(BATCLIP_YAML, DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["gaussian_noise", "fog"], TEST__BATCH_SIZE=4)
    payload = evaluate(cfg, progress=False)
    assert payload["method"] == "batclip"
    assert [(r["domain"], r["severity"], r["n"]) for r in payload["records"]] == [("gaussian_noise", 5, 10),
                                                                                  ("fog", 5, 10)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in payload["records"])
    assert payload["provenance"]["adapted_parameters"] == 6 * 2 * 64 + 5 * 2 * 32
    saved = json.loads(next((tmp_path / "out" / "cifar10_c" / "batclip").glob("*/results.json")).read_text())
    assert saved["records"] == payload["records"]


def test_skipped_scaler_steps_are_counted(tiny_clip):
    """Under fp16 a GradScaler skips the step whose gradients overflow and backs off its scale; the method counts
    those steps (recorded in the results as provenance.grad_scaler_skipped_steps). A CPU GradScaler and a loss made
    infinite on purpose stand in for an fp16 overflow on a GPU."""
    method = CpuScalerBatclip(tiny_cfg(BATCLIP_YAML), tiny_clip, 10).setup()
    before = [p.detach().clone() for p in method.params]
    first = method.params[0]
    method.optimizer_step((first * float("inf")).sum())
    assert method.scaler_skipped_steps == 1 and method.scaler.get_scale() == 500.0
    assert all(torch.equal(p, b) for p, b in zip(method.params, before))        # the step was skipped
    method.optimizer_step(method.params[0].square().sum())
    assert method.scaler_skipped_steps == 1                                     # a finite step is taken
    assert not torch.equal(method.params[0], before[0])
    method.reset()
    assert method.scaler_skipped_steps == 1                                     # a run-long diagnostic
