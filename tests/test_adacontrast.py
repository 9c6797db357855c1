"""AdaContrast (methods/adacontrast.py) against an independent transcription of the anchor suite's
classification/methods/adacontrast.py (AdaMoCo, loss_calculation, forward_and_adapt, update_labels,
refine_predictions, instance_loss) on the tiny CLIP, ViT and ResNet towers: a student, a deep-copied momentum
encoder, the MoCo queue drawn from the global RNG seeded as our generator, the feature bank as the anchor's dict,
the same views fed to both. Logits of every batch, the student's parameters and BatchNorm statistics, SGD's momentum
buffers, the key encoder, the queue (features, labels, pointer) and the bank equal over 4 batches (queue wrap-around,
bank ring, nearest-neighbour refinement); one changed line of the transcription breaks the equality; the views,
reset, refusals, warnings and the shipped values."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import methods
from conf import ConfigError
from harness.build import check_method
from tests.synthetic import tiny_cfg

CFG_FILE = "conf/cifar10_c/adacontrast.yaml"
BATCH, STEPS, SEED, QUEUE, WARMUP = 6, 4, 5, 10, 6


def _cfg(**overrides):
    base = dict(ADACONTRAST__QUEUE_SIZE=QUEUE, ADACONTRAST__NUM_NEIGHBORS=4, OPTIM__LR=5e-2, RNG_SEED=SEED,
                M_TEACHER__MOMENTUM=0.9)
    base.update(overrides)
    return tiny_cfg(CFG_FILE, **base)


def _batches():
    """(test images, weak, strong q, strong k) per batch: the views both sides are given."""
    g = torch.Generator().manual_seed(11)
    return [tuple(torch.rand(BATCH, 3, 32, 32, generator=g) for _ in range(4)) for _ in range(STEPS)]


# ---------------------------------------------------------------------- the transcription
def _encode(model, images):
    """BaseModel(return_feats=True) as defined for CLIP: the image tower's feature, the zero-shot head."""
    feats = model.encode_image(images)
    text, _ = model.text_features()
    return feats, model.logit_scale * F.normalize(feats, dim=-1) @ text.t()


def _configure_and_collect(model):
    """The anchor's configure_model (everything trainable, train mode) on the image tower; its collect_params."""
    model.requires_grad_(False)
    model.clip.visual.requires_grad_(True)
    params = []
    for _, m in model.clip.visual.named_modules():
        for np_, p in m.named_parameters():
            if np_ in ["weight", "bias"] and p.requires_grad:
                params.append(p)
    return params


def _refine(feats, probs, banks, refine_method, dist_type, num_neighbors):
    if refine_method != "nearest_neighbors":
        return probs.argmax(dim=1)
    pred_probs = []
    for chunk in feats.split(64):
        if dist_type == "euclidean":
            distances = torch.cdist(chunk, banks["features"])
        else:
            distances = 1 - torch.matmul(F.normalize(chunk, dim=1), F.normalize(banks["features"], dim=1).T)
        _, idxs = distances.sort()
        pred_probs.append(banks["probs"][idxs[:, :num_neighbors], :].mean(1))
    return torch.cat(pred_probs).max(dim=1)[1]


def _update_labels(banks, features, logits, queue_size):
    probs = F.softmax(logits, dim=1)
    start = banks["ptr"]
    end = start + len(features)
    if banks["features"].shape[0] < queue_size:
        banks["features"] = torch.cat([banks["features"], features], dim=0)
        banks["probs"] = torch.cat([banks["probs"], probs], dim=0)
    else:
        idxs_replace = torch.arange(start, end) % len(banks["features"])
        banks["features"][idxs_replace, :] = features
        banks["probs"][idxs_replace, :] = probs
    banks["ptr"] = end % len(banks["features"])


def _reference(model, batches, cfg, num_classes=10, change=None):
    a, K, T_moco, m = cfg.ADACONTRAST, cfg.ADACONTRAST.QUEUE_SIZE, cfg.CONTRAST.TEMPERATURE, cfg.M_TEACHER.MOMENTUM
    params = _configure_and_collect(model)
    base, momentum = model, copy.deepcopy(model)
    momentum.requires_grad_(False)
    torch.manual_seed(cfg.RNG_SEED)
    mem_feat = F.normalize(torch.randn(model.clip.visual.output_dim, K), dim=0)
    mem_labels = torch.randint(0, num_classes, (K,))
    queue_ptr, first_x = 0, 0
    banks = {"features": torch.tensor([]), "probs": torch.tensor([]), "ptr": 0}
    optimizer = torch.optim.SGD(params, lr=cfg.OPTIM.LR, momentum=cfg.OPTIM.MOMENTUM, dampening=cfg.OPTIM.DAMPENING,
                                weight_decay=cfg.OPTIM.WD, nesterov=cfg.OPTIM.NESTEROV)
    returned = []
    for images_test, images_w, images_q, images_k in batches:
        base.clip.visual.train()
        momentum.clip.visual.train()
        feats_w, logits_w = _encode(base, images_w)
        with torch.no_grad():
            probs_w = F.softmax(logits_w, dim=1)
            if first_x >= WARMUP:
                refine = "nearest_neighbors"
            else:
                refine = None
                first_x += len(feats_w)
            pseudo = _refine(feats_w, probs_w, banks, refine, a.DIST_TYPE, a.NUM_NEIGHBORS)
        feats_q, logits_q = _encode(base, images_q)
        q = F.normalize(feats_q, dim=1)
        with torch.no_grad():
            for p_ema, p in zip(momentum.clip.visual.parameters(), base.clip.visual.parameters()):
                if change == "ema_weights_swapped":
                    p_ema.data = (1 - m) * p_ema.data + m * p.data
                else:
                    p_ema.data = m * p_ema.data + (1 - m) * p.data
            k = F.normalize(_encode(momentum, images_k)[0], dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, mem_feat.clone().detach()])
        logits_ins = torch.cat([l_pos, l_neg], dim=1)
        logits_ins /= T_moco
        old_labels = mem_labels.clone()
        idxs_replace = torch.arange(queue_ptr, queue_ptr + len(k)) % K
        mem_feat[:, idxs_replace] = k.T
        mem_labels[idxs_replace] = pseudo
        queue_ptr = (queue_ptr + len(k)) % K
        mask = torch.ones_like(logits_ins, dtype=torch.bool)
        mask_labels = old_labels if change == "mask_with_the_old_queue_labels" else mem_labels
        if a.CONTRAST_TYPE == "class_aware":
            mask[:, 1:] = pseudo.reshape(-1, 1) != mask_labels
            logits_ins = torch.where(mask, logits_ins, torch.tensor([float("-inf")]))
        loss_ins = F.cross_entropy(logits_ins, torch.zeros(logits_ins.shape[0], dtype=torch.long))
        logits_s = logits_q if a.CE_SUP_TYPE == "weak_strong" else logits_w
        loss_cls = F.cross_entropy(logits_s, pseudo)
        probs_mean = F.softmax(logits_s, dim=1).mean(dim=0)
        loss_div = -torch.sum(-probs_mean * torch.log(probs_mean + 1e-8))
        if change == "diversity_sign":
            loss_div = -loss_div
        loss = a.ALPHA * loss_cls + a.BETA * loss_ins + a.ETA * loss_div
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            bank_model = base if change == "bank_from_the_student" else momentum
            _update_labels(banks, *_encode(bank_model, images_w), K)
            base.clip.visual.eval()
            returned.append(_encode(base, images_test)[1])
    queue = {"mem_feat": mem_feat, "mem_labels": mem_labels, "queue_ptr": queue_ptr}
    return returned, base, momentum, optimizer, queue, banks


def _ours(model, batches, cfg):
    method = methods.build_method(cfg, model, 10)
    method.refine_warmup_samples = WARMUP
    outputs = []
    for test, weak, strong_q, strong_k in batches:
        method.make_views = lambda x, views=(weak, strong_q, strong_k): views      # the views both are given
        outputs.append(method(test))
    return outputs, method


def _max(pairs):
    return max((a.double() - b.double()).abs().max().item() for a, b in pairs)


def _differences(ours, method, reference):
    outs, student, momentum, optimizer, queue, banks = reference
    named, buffers = dict(student.named_parameters()), dict(student.named_buffers())
    teacher_named = {**dict(momentum.named_parameters()), **dict(momentum.named_buffers())}
    ours_sgd, theirs_sgd = method.optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert len(theirs_sgd) == len(method.params) and method.queue_ptr == queue["queue_ptr"]
    assert torch.equal(method.mem_labels, queue["mem_labels"]) and method.bank_ptr == banks["ptr"]
    assert method.bank_features.shape == banks["features"].shape
    teacher = list(zip(method.teacher_tensors(), method.teacher_names)) + [
        (getattr(method, f"teacher_buffer_{i}"), n) for i, n in enumerate(method.teacher_buffer_names)]
    return {
        "logits": _max(zip(ours, outs)),
        "params": _max((p, named[n]) for p, n in zip(method.params, method.param_names)),
        "bn_statistics": _max([(b, buffers[n]) for n, b in method.model.named_buffers() if "running" in n] or
                              [(torch.zeros(1), torch.zeros(1))]),
        "sgd_momentum": _max((ours_sgd[i]["momentum_buffer"], theirs_sgd[i]["momentum_buffer"]) for i in theirs_sgd),
        "teacher": _max((t, teacher_named[n]) for t, n in teacher),
        "queue": _max([(method.mem_feat, queue["mem_feat"])]),
        "bank": _max([(method.bank_features, banks["features"]), (method.bank_probs, banks["probs"])]),
    }


CASES = [("vit", "cosine", "weak_strong", "class_aware"), ("vit", "euclidean", "weak_weak", "standard"),
         ("rn", "cosine", "weak_strong", "class_aware"), ("rn", "euclidean", "weak_strong", "standard")]
# measured (default and AVX2 CPU paths): 0 for every quantity, both towers: the same operations in the same order
TOLERANCE = 1e-6


@pytest.mark.parametrize("tower, dist, sup, contrast", CASES)
def test_adacontrast_matches_the_transcription_of_the_anchor(tower, dist, sup, contrast, request):
    model = request.getfixturevalue("tiny_clip" if tower == "vit" else "tiny_clip_rn")
    cfg = _cfg(ADACONTRAST__DIST_TYPE=dist, ADACONTRAST__CE_SUP_TYPE=sup, ADACONTRAST__CONTRAST_TYPE=contrast)
    reference = _reference(copy.deepcopy(model), _batches(), cfg)
    ours, method = _ours(model, _batches(), cfg)
    differences = _differences(ours, method, reference)
    assert max(differences.values()) <= TOLERANCE, differences
    moved = sum((p - method._snapshot["module"][f"model.{n}"]).abs().max().item() > 0
                for p, n in zip(method.params, method.param_names))
    assert moved == len(method.params)          # every adapted parameter moved, so the comparison has teeth
    assert method.first_x_samples == WARMUP     # the nearest-neighbour refinement served batches 2 to 4


@pytest.mark.parametrize("change", ["ema_weights_swapped", "mask_with_the_old_queue_labels", "diversity_sign",
                                    "bank_from_the_student"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip_rn, change):
    cfg = _cfg()
    reference = _reference(copy.deepcopy(tiny_clip_rn), _batches(), cfg, change=change)
    ours, method = _ours(tiny_clip_rn, _batches(), cfg)
    differences = _differences(ours, method, reference)
    # measured (logits, parameters): 0.54 / 0.14 (EMA weights swapped), 1.3 / 1.6 (mask with the queue's labels
    # before its update), 3.3 / 0.19 (diversity sign), 0.12 / 0 (bank from the student): over 10^4 x TOLERANCE
    assert max(differences["logits"], differences["params"]) > 10 * TOLERANCE, differences


# ---------------------------------------------------------------------- views
def test_views_are_the_anchors_transforms_on_the_seeded_stream():
    """weak ("plain") and strong (moco-v2-light) views equal torchvision's transform classes on tensors drawing from
    the global RNG seeded as our generator (the blur's sigma drawn from it too: the anchor uses python's random)."""
    from methods.adacontrast import MocoViews

    class _Blur:
        def __call__(self, x):
            sigma = torch.empty(1).uniform_(0.1, 2.0).item()
            k = 2 * int(torch.tensor(3 * sigma).ceil().item()) + 1
            return T.functional.gaussian_blur(x, [k, k], [sigma, sigma])

    weak = T.Compose([T.RandomCrop(32), T.RandomHorizontalFlip()])
    strong = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                        T.RandomApply([_Blur()], p=0.5), T.RandomHorizontalFlip()])
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ours = MocoViews(torch.Generator().manual_seed(SEED), resized_crop=False)(images)
    torch.manual_seed(SEED)
    theirs = [[], [], []]
    for img in images:
        for views, transform in zip(theirs, (weak, strong, strong)):
            views.append(transform(img))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, torch.stack(b))
    assert not torch.equal(ours[1], ours[2])


def test_views_with_a_random_resized_crop_are_torchvisions():
    from methods.adacontrast import MocoViews
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    views = MocoViews(torch.Generator().manual_seed(SEED), resized_crop=True)
    torch.manual_seed(SEED)
    crop = T.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True)
    for img in images:
        assert torch.equal(views.random_resized_crop(img), crop(img))


# ---------------------------------------------------------------------- reset, protocol, config
def test_reset_restores_all_state_exactly(tiny_clip_rn):
    cfg = _cfg()
    images = [b[0] for b in _batches()]
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip_rn), 10)
    method = methods.build_method(cfg, tiny_clip_rn, 10)
    for m in (fresh, method):
        m.refine_warmup_samples = WARMUP
    state = {k: v.clone() for k, v in method.state_dict().items()}
    first = [method(x) for x in images]
    method.reset()
    for key, value in method.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert method.queue_ptr == 0 and method.bank_features is None and method.first_x_samples == 0
    again = [method(x) for x in images]
    expected = [fresh(x) for x in images]
    for a, b, c in zip(first, again, expected):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_adapted_student_is_reported_after_the_update(tiny_clip):
    x = _batches()[0][0]
    method = methods.build_method(_cfg(), tiny_clip, 10)
    assert method.protocol == methods.base.ADAPT_THEN_PREDICT
    logits = method(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, method.model(x), rtol=0, atol=0)


def test_bad_adacontrast_config_is_refused():
    for key, value in [("ADACONTRAST__QUEUE_SIZE", 0), ("ADACONTRAST__DIST_TYPE", "l1"),
                       ("ADACONTRAST__CE_SUP_TYPE", "weak_all"), ("ADACONTRAST__NUM_NEIGHBORS", 0),
                       ("CONTRAST__TEMPERATURE", 0.0), ("M_TEACHER__MOMENTUM", 1.5),
                       ("ADACONTRAST__STRONG_AUGMENTATION", "randaugment"), ("CLIP__FREEZE_TEXT_ENCODER", False)]:
        with pytest.raises(ConfigError, match=key.replace("__", ".")):
            check_method(_cfg(**{key: value}))


def test_keys_the_anchor_does_not_read_are_warned():
    from methods.adacontrast import AdaContrast
    assert AdaContrast.config_warnings(_cfg()) == []
    warnings = AdaContrast.config_warnings(_cfg(CONTRAST__PROJECTION_DIM=64, ADACONTRAST__CE_TYPE="smoothed",
                                                ADACONTRAST__REFINE_METHOD="none", CONTRAST__MODE="one"))
    assert len(warnings) == 4 and all("has no effect" in w for w in warnings)


def test_shipped_values_are_the_anchors():
    from harness.build import load_cfg
    for dataset in ("cifar10_c", "cifar100_c", "imagenet_c", "shapes_c"):
        cfg = load_cfg(f"conf/{dataset}/adacontrast.yaml")
        o = cfg.OPTIM
        assert (o.METHOD, o.LR, o.MOMENTUM, o.WD, o.NESTEROV, o.STEPS) == ("SGD", 2e-4, 0.9, 1e-4, True, 1), dataset
        assert cfg.CONTRAST.TEMPERATURE == 0.07 and cfg.M_TEACHER.MOMENTUM == 0.999
        assert cfg.ADACONTRAST.QUEUE_SIZE == 16384 and cfg.ADACONTRAST.NUM_NEIGHBORS == 10
