"""CoTTA (methods/cotta.py) and the mean teacher (methods/teachers.py) against an independent transcription of the
anchor suite's classification/methods/cotta.py on the tiny CLIP (ViT and ResNet towers): a student, a deep-copied
EMA teacher and anchor, the reference's transform chain built from torchvision's transform classes on the global
RNG (seeded as our generator), its loops for the EMA and the stochastic restore. Logits of every step, the student's
parameters, Adam's moments and the teacher equal over 3 batches; one changed line of the transcription breaks the
equality; reset, refusals and the shipped values."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import methods
from conf import ConfigError
from harness.build import check_method
from methods.teachers import ema_update_model
from tests.synthetic import tiny_cfg

CFG_FILE = "conf/cifar10_c/cotta.yaml"
BATCH, STEPS, SEED = 6, 3, 5


def _cfg(**overrides):
    base = dict(TEST__N_AUGMENTATIONS=3, COTTA__RST=0.1, OPTIM__LR=1e-2, RNG_SEED=SEED)
    base.update(overrides)
    return tiny_cfg(CFG_FILE, **base)


def _batches():
    g = torch.Generator().manual_seed(11)
    return [torch.rand(BATCH, 3, 32, 32, generator=g) for _ in range(STEPS)]


# ---------------------------------------------------------------------- the transcription
class _ColorJitterPro(nn.Module):
    """transforms_cotta.ColorJitterPro.forward with the non-soft ranges."""

    def forward(self, img):
        for fn_id in torch.randperm(5):
            if fn_id == 0:
                img = TF.adjust_brightness(img, torch.tensor(1.0).uniform_(0.6, 1.4).item())
            if fn_id == 1:
                img = TF.adjust_contrast(img, torch.tensor(1.0).uniform_(0.7, 1.3).item())
            if fn_id == 2:
                img = TF.adjust_saturation(img, torch.tensor(1.0).uniform_(0.5, 1.5).item())
            if fn_id == 3:
                img = TF.adjust_hue(img, torch.tensor(1.0).uniform_(-0.06, 0.06).item())
            if fn_id == 4:
                gamma = torch.tensor(1.0).uniform_(0.7, 1.3).item()
                img = TF.adjust_gamma(img.clamp(1e-8, 1.0), gamma)
        return img


def _reference_transform(n_pixels):
    """get_tta_transforms(n_pixels) (soft=False, cotta_augs=True): the reference's classes, the global RNG."""
    return T.Compose([
        T.Lambda(lambda img: torch.clip(img, 0.0, 1.0)), _ColorJitterPro(),
        T.Pad(padding=int(n_pixels / 2), padding_mode="edge"),
        T.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1), shear=None,
                       interpolation=T.InterpolationMode.BILINEAR, fill=0),
        T.GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]), T.CenterCrop(size=n_pixels),
        T.RandomHorizontalFlip(p=0.5),
        T.Lambda(lambda img: img + (torch.randn(img.size()) * 0.005 + 0).to(img.device)),
        T.Lambda(lambda img: torch.clip(img, 0.0, 1.0))])


def _configure(model):
    """CoTTA.configure_model of the anchor, on the image tower (the anchor's CLIP drops its text transformer)."""
    model.eval()
    model.requires_grad_(False)
    for m in model.clip.visual.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        elif isinstance(m, nn.BatchNorm1d):
            m.train()
            m.requires_grad_(True)
        else:
            m.requires_grad_(True)


def _weights_and_biases(visual):
    """TTAMethod.collect_params of the anchor."""
    params = []
    for nm, m in visual.named_modules():
        for np_, p in m.named_parameters():
            if np_ in ["weight", "bias"] and p.requires_grad:
                params.append((nm, np_, p))
    return params


def _reference_cotta(model, batches, cfg, change=None):
    """The anchor's CoTTA, step by step; returns each step's outputs_ema, the student, the teacher, Adam."""
    torch.manual_seed(cfg.RNG_SEED)
    _configure(model)
    student = model
    model_ema, model_anchor = copy.deepcopy(student), copy.deepcopy(student)
    for p in list(model_ema.parameters()) + list(model_anchor.parameters()):
        p.detach_()
    source = copy.deepcopy(student.clip.visual.state_dict())
    collected = _weights_and_biases(student.clip.visual)
    optimizer = torch.optim.Adam([p for _, _, p in collected], lr=cfg.OPTIM.LR, betas=(cfg.OPTIM.BETA, 0.999),
                                 weight_decay=cfg.OPTIM.WD)
    transform = _reference_transform(32)
    mt, rst, ap = cfg.M_TEACHER.MOMENTUM, cfg.COTTA.RST, cfg.COTTA.AP
    symmetric = cfg.COTTA.LOSS == "symmetric_cross_entropy"
    returned = []
    for imgs_test in batches:
        outputs = student(imgs_test)
        anchor_prob = torch.nn.functional.softmax(model_anchor(imgs_test), dim=1).max(1)[0]
        teacher = student if change == "teacher_is_student" else model_ema
        if anchor_prob.mean(0) < ap:
            ema_outputs = [teacher(transform(imgs_test)).detach() for _ in range(cfg.TEST.N_AUGMENTATIONS)]
            outputs_ema = torch.stack(ema_outputs).mean(0)
        else:
            outputs_ema = teacher(imgs_test).detach()
        if symmetric:
            loss = (-0.5 * (outputs_ema.softmax(1) * outputs.log_softmax(1)).sum(1)
                    - 0.5 * (outputs.softmax(1) * outputs_ema.log_softmax(1)).sum(1)).mean(0)
        elif change == "loss_direction":
            loss = -(outputs.softmax(1) * outputs_ema.log_softmax(1)).sum(1).mean(0)
        else:
            loss = -(outputs_ema.softmax(1) * outputs.log_softmax(1)).sum(1).mean(0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for p_ema, p in zip(model_ema.clip.visual.parameters(), student.clip.visual.parameters()):
                if change == "ema_weights_swapped":
                    p_ema.data = (1 - mt) * p_ema.data + mt * p.data
                else:
                    p_ema.data = mt * p_ema.data + (1 - mt) * p.data
            if rst > 0.:
                for nm, m in student.clip.visual.named_modules():
                    for npp, p in m.named_parameters():
                        if npp in ["weight", "bias"] and p.requires_grad:
                            mask = (torch.rand(p.shape) < rst).float()
                            if change == "restore_inverted":
                                mask = 1.0 - mask
                            p.data = source[f"{nm}.{npp}"] * mask + p * (1. - mask)
        returned.append(outputs_ema.detach())
    return returned, student, model_ema, optimizer


def _ours(model, batches, cfg):
    method = methods.build_method(cfg, model, 10)
    return [method(x) for x in batches], method


def _max_differences(ours, method, reference):
    outs, student, teacher, optimizer = reference
    logits = max((a - b).abs().max().item() for a, b in zip(ours, outs))
    named = dict(student.named_parameters())
    params = max((p - named[n]).abs().max().item() for p, n in zip(method.params, method.param_names))
    named_teacher = dict(teacher.named_parameters())
    teacher_diff = max((t - named_teacher[n]).abs().max().item()
                       for t, n in zip(method.teacher_tensors(), method.teacher_names))
    ours_state = method.optimizer.state_dict()["state"]
    theirs = optimizer.state_dict()["state"]
    moments = max((ours_state[i][k] - theirs[i][k]).abs().max().item()
                  for i in theirs for k in ("exp_avg", "exp_avg_sq"))
    return logits, params, teacher_diff, moments


CASES = [("vit", 1.0, "cross_entropy"), ("vit", 0.0, "symmetric_cross_entropy"),
         ("rn", 1.0, "symmetric_cross_entropy"), ("rn", 0.0, "cross_entropy")]


@pytest.mark.parametrize("tower, ap, loss", CASES)
def test_cotta_matches_the_transcription_of_the_anchor(tower, ap, loss, request):
    """AP 1: the teacher averages augmented views every step; AP 0: it predicts the batch itself."""
    model = request.getfixturevalue("tiny_clip" if tower == "vit" else "tiny_clip_rn")
    cfg = _cfg(COTTA__AP=ap, COTTA__LOSS=loss)
    reference = _reference_cotta(copy.deepcopy(model), _batches(), cfg)
    ours, method = _ours(model, _batches(), cfg)
    assert len(reference[3].state_dict()["state"]) == len(method.params)
    logits, params, teacher, moments = _max_differences(ours, method, reference)
    # measured (both CPU paths): 0 for every quantity: the same operations in the same order
    assert logits <= 1e-5 and params <= 1e-6 and teacher <= 1e-6 and moments <= 1e-8, (logits, params, teacher,
                                                                                      moments)
    moved = sum((p - method._snapshot["module"][f"model.{n}"]).abs().max().item() > 0
                for p, n in zip(method.params, method.param_names))
    assert moved == len(method.params)          # every adapted parameter moved, so the comparison has teeth


@pytest.mark.parametrize("change", ["ema_weights_swapped", "restore_inverted", "loss_direction",
                                    "teacher_is_student"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, change):
    cfg = _cfg(COTTA__AP=1.0)
    reference = _reference_cotta(copy.deepcopy(tiny_clip), _batches(), cfg, change=change)
    ours, method = _ours(tiny_clip, _batches(), cfg)
    logits, params, teacher, _ = _max_differences(ours, method, reference)
    # measured (logits, parameters): 7.8 / 0.036 (EMA weights swapped), 0.029 / 0.030 (restore mask inverted),
    # 0.043 / 0.060 (loss direction swapped), 7.2 / 0.035 (teacher replaced by the student): over 1000x the
    # tolerances of the comparison above
    assert logits > 10 * 1e-5 and params > 10 * 1e-6, (logits, params, teacher)


def test_ema_update_is_the_anchors_arithmetic():
    teacher, student = [torch.tensor([1.0, -2.0, 3.0])], [torch.tensor([0.5, 0.25, -1.0])]
    expected = 0.9 * teacher[0] + (1 - 0.9) * student[0]
    ema_update_model(teacher, student, 0.9)
    assert torch.equal(teacher[0], expected)
    ema_update_model(teacher, student, 1.0)      # momentum 1: nothing moves
    assert torch.equal(teacher[0], expected)


def test_reset_restores_all_state_exactly(tiny_clip_rn):
    cfg = _cfg(COTTA__AP=1.0)
    batches = _batches()
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip_rn), 10)
    method = methods.build_method(cfg, tiny_clip_rn, 10)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    first = [method(x) for x in batches]
    method.reset()
    for key, value in method.state_dict().items():
        assert torch.equal(value, state[key]), key
    again = [method(x) for x in batches]
    expected = [fresh(x) for x in batches]
    for a, b, c in zip(first, again, expected):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_teacher_is_reported_not_the_student(tiny_clip):
    """AP 0 (no augmentation): the first batch reports the teacher, still the source model."""
    x = _batches()[0]
    with torch.no_grad():
        unadapted = copy.deepcopy(tiny_clip)(x)
    method = methods.build_method(_cfg(COTTA__AP=0.0), tiny_clip, 10)
    assert method.protocol == methods.base.PREDICT_BEFORE_UPDATE
    torch.testing.assert_close(method(x), unadapted, rtol=0, atol=1e-6)


def test_bad_cotta_config_is_refused():
    with pytest.raises(ConfigError, match="COTTA.RST"):
        check_method(_cfg(COTTA__RST=1.5))
    with pytest.raises(ConfigError, match="COTTA.AP"):
        check_method(_cfg(COTTA__AP=-0.1))
    with pytest.raises(ConfigError, match="COTTA.LOSS"):
        check_method(_cfg(COTTA__LOSS="kl"))
    with pytest.raises(ConfigError, match="M_TEACHER.MOMENTUM"):
        check_method(_cfg(M_TEACHER__MOMENTUM=1.5))
    with pytest.raises(ConfigError, match="CLIP.FREEZE_TEXT_ENCODER"):
        check_method(_cfg(CLIP__FREEZE_TEXT_ENCODER=False))


def test_shipped_values_are_the_anchors():
    from harness.build import load_cfg
    expected = {"cifar10_c": ("Adam", 1e-3, 0.01, 0.92), "cifar100_c": ("Adam", 1e-3, 0.01, 0.72),
                "imagenet_c": ("SGD", 0.01, 0.001, 0.1)}
    for dataset, values in expected.items():
        cfg = load_cfg(f"conf/{dataset}/cotta.yaml")
        assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.COTTA.RST, cfg.COTTA.AP) == values, dataset
        assert cfg.M_TEACHER.MOMENTUM == 0.999 and cfg.TEST.N_AUGMENTATIONS == 32 and cfg.COTTA.LOSS == "auto"
