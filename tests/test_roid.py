"""ROID and CMF (methods/roid.py) against an independent transcription of the anchor suite's roid.py / cmf.py
(mariodoebler/test-time-adaptation, classification/methods/): its configure_model / collect_params on a ZeroShotCLIP
without text transformer, loss_calculation, the Adam/SGD step, ema_update_model (``p.data = ...``), CMF's
bayesian_filtering in python floats, the prior correction, and get_tta_transforms(cotta_augs=False) built from
torchvision's own transforms on torch's global generator. Logits and adapted state (parameters, optimizer moments,
probability average, source/hidden copies, hidden variance) equal over several batches, on the ViT and the ResNet
(BatchNorm) tiny CLIPs; the comparison fails when one line of the transcription changes; reset, refusals,
protocol and the shipped configs."""
import copy

import PIL
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import methods
from conf import ConfigError
from harness.build import check_method, load_cfg
from methods.augmentations import TTATransforms
from tests.synthetic import tiny_cfg

BATCH = 8
SEED = 3
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
# Measured (fp32, the default and the AVX2 CPU code paths): logits and every piece of state bit-equal (difference 0)
# over 3 batches, both towers; the tolerances leave room for another CPU's rounding.
LOGIT_TOL = 1e-6
STATE_TOL = 1e-7


def _cfg(name, arch="tiny-clip-test", **overrides):
    return tiny_cfg(f"conf/cifar10_c/{name}.yaml", MODEL__ARCH=arch, TEST__BATCH_SIZE=BATCH, RNG_SEED=SEED,
                    **overrides)


def _images(seed, n=BATCH):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the transcription
class ColorJitterPro(T.ColorJitter):
    """augmentations/transforms_cotta.py ColorJitterPro.forward, as written (torch's global generator)."""

    def __init__(self, brightness, contrast, saturation, hue, gamma):
        super().__init__(brightness, contrast, saturation, hue)
        self.gamma = self._check_input(gamma, "gamma")

    def forward(self, img):
        fn_idx = torch.randperm(5)
        for fn_id in fn_idx:
            if fn_id == 0 and self.brightness is not None:
                img = TF.adjust_brightness(img, torch.tensor(1.0).uniform_(*self.brightness).item())
            if fn_id == 1 and self.contrast is not None:
                img = TF.adjust_contrast(img, torch.tensor(1.0).uniform_(*self.contrast).item())
            if fn_id == 2 and self.saturation is not None:
                img = TF.adjust_saturation(img, torch.tensor(1.0).uniform_(*self.saturation).item())
            if fn_id == 3 and self.hue is not None:
                img = TF.adjust_hue(img, torch.tensor(1.0).uniform_(*self.hue).item())
            if fn_id == 4 and self.gamma is not None:
                gamma_factor = torch.tensor(1.0).uniform_(*self.gamma).item()
                img = TF.adjust_gamma(img.clamp(1e-8, 1.0), gamma_factor)
        return img


def anchor_tta_transforms(n_pixels):
    """get_tta_transforms(img_size, padding_mode="reflect", cotta_augs=False), soft=False."""
    return T.Compose([
        T.Lambda(lambda img: torch.clip(img, 0.0, 1.0)),
        ColorJitterPro(brightness=[0.6, 1.4], contrast=[0.7, 1.3], saturation=[0.5, 1.5], hue=[-0.06, 0.06],
                       gamma=[0.7, 1.3]),
        T.Pad(padding=int(n_pixels / 2), padding_mode="reflect"),
        T.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1), shear=None,
                       interpolation=PIL.Image.BILINEAR, fill=0),
        T.CenterCrop(size=n_pixels),
        T.RandomHorizontalFlip(p=0.5),
        T.Lambda(lambda img: torch.clip(img, 0.0, 1.0)),
    ])


def _entropy(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def _slr(logits, clip=0.99, eps=1e-5):
    probs = torch.clamp(logits.softmax(1), min=0.0, max=clip)
    return -(probs * torch.log((probs / (torch.ones_like(probs) - probs)) + eps)).sum(1)


def _sce(x, x_ema, alpha=0.5):
    return -(1 - alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) \
        - alpha * (x.softmax(1) * x_ema.log_softmax(1)).sum(1)


def _ema(to_update, to_merge, momentum):
    """utils/misc.py ema_update_model on parameter lists."""
    if momentum < 1.0:
        for p, q in zip(to_update, to_merge):
            p.data = momentum * p.data + (1 - momentum) * q.data


class AnchorROID:
    """roid.py (cmf=False) and cmf.py (cmf=True); ``change`` alters one line (the one-line-change test)."""

    def __init__(self, model, cfg, cmf=False, change=None):
        self.model, self.cmf, self.change = model, cmf, change
        with torch.no_grad():
            self.text = model.text_features()[0].clone()       # ZeroShotCLIP's pre-extracted text features
        model.eval()
        model.requires_grad_(False)
        self.params = []
        for name, m in model.clip.named_modules():         # configure_model + collect_params; the anchor's
            if name == "transformer" or name.startswith("transformer."):   # ZeroShotCLIP drops the text transformer
                continue
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(True)
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
            elif isinstance(m, NORMS):
                m.requires_grad_(True)
            if isinstance(m, NORMS):
                self.params += [p for n, p in m.named_parameters() if n in ("weight", "bias") and p.requires_grad]
        o = cfg.OPTIM
        if o.METHOD == "Adam":
            self.optimizer = torch.optim.Adam(self.params, lr=o.LR, betas=(o.BETA, 0.999), weight_decay=o.WD)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=o.LR, momentum=o.MOMENTUM, dampening=o.DAMPENING,
                                             weight_decay=o.WD, nesterov=o.NESTEROV)
        r = cfg.ROID
        self.use_weighting, self.use_prior_correction = r.USE_WEIGHTING, r.USE_PRIOR_CORRECTION
        self.use_consistency, self.momentum_src = r.USE_CONSISTENCY, r.MOMENTUM_SRC
        self.momentum_probs, self.temperature = r.MOMENTUM_PROBS, r.TEMPERATURE
        self.batch_size = cfg.TEST.BATCH_SIZE
        self.class_probs_ema = 1 / model.num_classes * torch.ones(model.num_classes)
        self.tta_transform = anchor_tta_transforms(32)
        self.src = [p.detach().clone() for p in self.params]
        if cmf:
            self.alpha, self.gamma = cfg.CMF.ALPHA, cfg.CMF.GAMMA
            self.hidden = [p.detach().clone() for p in self.params]
            self.hidden_var = 0
            param_size_ratio = sum(p.numel() for p in self.params) / 38400
            self.q = cfg.CMF.Q * (1.0 if change == "q_unscaled" else param_size_ratio)
        torch.manual_seed(cfg.RNG_SEED)    # the transforms draw from torch's global generator

    def forward(self, imgs):
        feats = self.model.clip.encode_image(self.model.normalize(imgs))
        feats = feats / feats.norm(dim=1, keepdim=True)
        return self.model.clip.logit_scale.exp() * feats @ self.text.T

    def loss_calculation(self, imgs_test):
        outputs = self.forward(imgs_test)
        if self.use_weighting:
            with torch.no_grad():
                weights_div = 1 - F.cosine_similarity(self.class_probs_ema.unsqueeze(dim=0), outputs.softmax(1),
                                                      dim=1)
                weights_div = (weights_div - weights_div.min()) / (weights_div.max() - weights_div.min())
                mask = weights_div < weights_div.mean()
                if self.change == "mask_flipped":
                    mask = weights_div > weights_div.mean()
                weights_cert = - _entropy(outputs)
                weights_cert = (weights_cert - weights_cert.min()) / (weights_cert.max() - weights_cert.min())
                temperature = self.temperature if self.change != "no_temperature" else 1.0
                weights = torch.exp(weights_div * weights_cert / temperature)
                weights[mask] = 0.
                self.class_probs_ema = (self.momentum_probs * self.class_probs_ema
                                        + (1 - self.momentum_probs) * outputs.softmax(1).mean(0))
        loss_out = _slr(outputs)
        if self.use_weighting:
            loss_out = loss_out * weights
            loss_out = loss_out[~mask]
        loss = loss_out.sum() / self.batch_size
        if self.use_consistency:
            outputs_aug = self.forward(self.tta_transform(imgs_test[~mask]))
            target = outputs[~mask] if self.change != "detached_target" else outputs[~mask].detach()
            loss += (_sce(x=outputs_aug, x_ema=target) * weights[~mask]).sum() / self.batch_size
        return outputs, loss

    @torch.no_grad()
    def bayesian_filtering(self):
        if self.change != "no_predict_step":
            _ema(self.hidden, self.src, self.alpha)                  # recovered_model is the hidden model
        self.hidden_var = self.alpha ** 2 * self.hidden_var + self.q
        r = (1 - self.q)
        self.beta = r / (self.hidden_var + r)
        self.beta = self.beta if self.beta > 0.89 else 0.89
        self.beta = self.beta if self.beta < 0.9999 else 1.0
        self.hidden_var = self.beta * self.hidden_var
        recovered = [h.clone() for h in self.hidden]
        _ema(self.hidden, self.params, self.beta)
        _ema(self.params, recovered if self.change == "op_before_update" else self.hidden, self.gamma)

    def step(self, x):
        with torch.enable_grad():
            outputs, loss = self.loss_calculation(x)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.cmf:
            self.bayesian_filtering()
        else:
            _ema(self.params, self.src, self.momentum_src if self.change != "source_momentum" else 0.9)
        with torch.no_grad():
            if self.use_prior_correction:
                prior = outputs.softmax(1).mean(0)
                smooth = max(1 / outputs.shape[0], 1 / outputs.shape[1]) / torch.max(prior)
                smoothed_prior = (prior + smooth) / (1 + smooth * outputs.shape[1])
                outputs *= smoothed_prior
        return outputs.detach()

    def image_params(self):
        """The adapted parameters of the image tower (the anchor also collects ln_final, which never moves)."""
        ids = {id(p) for p in self.model.clip.visual.parameters()}
        return [p.detach() for p in self.params if id(p) in ids]


# ---------------------------------------------------------------------- running both
def _run_both_cfg(clip, cfg, name, steps, change):
    reference = AnchorROID(copy.deepcopy(clip), cfg, cmf=name == "cmf", change=change)
    method = methods.build_method(cfg, clip, 10)
    ours, theirs = [], []
    for step in range(steps):
        x = _images(10 + step)
        ours.append(method(x))
        theirs.append(reference.step(x))
    return method, reference, torch.stack(ours), torch.stack(theirs)


def _state_differences(method, reference):
    """Max abs differences of every piece of adapted state."""
    diffs = {"params": max((a - b).abs().max().item() for a, b in zip(method.params, reference.image_params())),
             "class_probs_ema": (method.class_probs_ema - reference.class_probs_ema).abs().max().item()}
    ours_opt = [method.optimizer.state[p] for p in method.params]
    ids = {id(p) for p in reference.model.clip.visual.parameters()}
    theirs_opt = [reference.optimizer.state[p] for p in reference.params if id(p) in ids]
    diffs["optimizer"] = max((a[k] - b[k]).abs().max().item() for a, b in zip(ours_opt, theirs_opt)
                             for k in a if k != "step")
    if reference.cmf:
        hidden = [h for h, p in zip(reference.hidden, reference.params) if id(p) in ids]
        diffs["hidden"] = max((a - b).abs().max().item() for a, b in zip(method.hidden_params(), hidden))
        diffs["hidden_var"] = abs(method.hidden_var - reference.hidden_var)
        diffs["beta"] = abs(method.beta - reference.beta)
    return diffs


ARCHS = {"vit": "tiny-clip-test", "resnet": "tiny-clip-test-rn"}


def _clip(request, tower):
    return request.getfixturevalue("tiny_clip" if tower == "vit" else "tiny_clip_rn")


# ---------------------------------------------------------------------- equality with the transcription
def test_augmentation_replays_the_references_transforms_for_the_same_seed():
    ours = TTATransforms(SEED, padding_mode="reflect", cotta_augs=False)
    reference = anchor_tta_transforms(32)
    torch.manual_seed(SEED)
    for k in range(4):
        x = _images(k)
        assert torch.equal(ours(x), reference(x))
    ours.reseed()
    torch.manual_seed(SEED)
    x = _images(7)
    assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("tower", ["vit", "resnet"])
@pytest.mark.parametrize("name,overrides", [
    ("roid", {}),
    ("roid", {"ROID__USE_PRIOR_CORRECTION": False, "ROID__MOMENTUM_SRC": 0.9, "OPTIM__LR": 0.01}),
    ("roid", {"ROID__USE_CONSISTENCY": False, "OPTIM__METHOD": "SGD", "OPTIM__LR": 0.05}),
    ("cmf", {"CMF__Q": 0.5, "OPTIM__LR": 0.01}),
    ("cmf", {}),
])
def test_matches_the_transcription_over_several_batches(request, tower, name, overrides):
    clip = _clip(request, tower)
    cfg = _cfg(name, arch=ARCHS[tower], **overrides)
    method, reference, ours, theirs = _run_both_cfg(clip, cfg, name, 3, None)
    # measured: difference 0 for logits and state, both towers, both CPU code paths
    torch.testing.assert_close(ours, theirs, atol=LOGIT_TOL, rtol=0)
    diffs = _state_differences(method, reference)
    assert max(diffs.values()) < STATE_TOL, diffs
    if name == "cmf" and "CMF__Q" in overrides:
        assert 0.89 <= method.beta < 1.0       # the update step ran


ROID_CHANGES = ["no_temperature", "mask_flipped", "detached_target", "source_momentum"]
CMF_CHANGES = ["q_unscaled", "op_before_update", "no_predict_step"]


@pytest.mark.parametrize("name,change", [("roid", c) for c in ROID_CHANGES] + [("cmf", c) for c in CMF_CHANGES])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, name, change):
    # a larger step, Q and 1 - GAMMA make CMF's filter move the weights visibly
    overrides = {"OPTIM__LR": 0.05, "CMF__Q": 0.5, "CMF__GAMMA": 0.9} if name == "cmf" else {"OPTIM__LR": 0.05}
    cfg = _cfg(name, **overrides)
    method, reference, ours, theirs = _run_both_cfg(tiny_clip, cfg, name, 3, change)
    diffs = _state_differences(method, reference)
    worst = max(diffs["params"], diffs.get("hidden", 0.0), (ours - theirs).abs().max().item())
    # measured worst differences: no_temperature 0.22, mask_flipped 0.27, detached_target 0.19, source_momentum
    # 0.08, q_unscaled 0.022, op_before_update 8e-4, no_predict_step 3e-5 (hidden) against STATE_TOL 1e-7
    assert worst > 10 * STATE_TOL, diffs


# ---------------------------------------------------------------------- reset, protocol, refusals, configs
@pytest.mark.parametrize("tower", ["vit", "resnet"])
@pytest.mark.parametrize("name", ["roid", "cmf"])
def test_reset_restores_all_state_exactly(request, tower, name):
    method = methods.build_method(_cfg(name, arch=ARCHS[tower], CMF__Q=0.5), _clip(request, tower), 10)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    optimizer = copy.deepcopy(method.optimizer.state_dict())
    first = [method(_images(1)), method(_images(2))]
    assert not torch.equal(method.class_probs_ema, state["class_probs_ema"])
    method.reset()
    for key, value in method.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert str(method.optimizer.state_dict()) == str(optimizer)
    if name == "cmf":
        assert (method.hidden_var, method.beta) == (0.0, None)
    again = [method(_images(1)), method(_images(2))]        # the augmentation stream restarts too
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("name", ["roid", "cmf"])
def test_reported_logits_are_the_pre_update_ones_times_the_smoothed_prior(tiny_clip, name):
    with torch.no_grad():
        unadapted = copy.deepcopy(tiny_clip)(_images(1))
    plain = methods.build_method(_cfg(name, ROID__USE_PRIOR_CORRECTION=False), copy.deepcopy(tiny_clip), 10)
    assert torch.equal(plain(_images(1)), unadapted)         # without the correction: predict-then-adapt
    corrected = methods.build_method(_cfg(name), tiny_clip, 10)(_images(1))
    prior = unadapted.softmax(1).mean(0)
    smooth = max(1 / BATCH, 1 / 10) / prior.max()
    torch.testing.assert_close(corrected, unadapted * (prior + smooth) / (1 + 10 * smooth), atol=1e-6, rtol=0)


def test_only_the_image_towers_norm_affine_parameters_move(tiny_clip_rn):
    before = {k: v.clone() for k, v in tiny_clip_rn.state_dict().items()}
    method = methods.build_method(_cfg("cmf", arch="tiny-clip-test-rn", CMF__Q=0.5), tiny_clip_rn, 10)
    method(_images(1))
    moved = {k for k, v in tiny_clip_rn.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert moved and moved <= set(method.param_names)
    layers = {type(tiny_clip_rn.get_submodule(n.rsplit(".", 1)[0])) for n in method.param_names}
    assert layers == {nn.BatchNorm2d} and all(n.startswith("clip.visual.") for n in method.param_names)


def test_cmf_scales_q_by_the_anchors_trainable_parameter_count(tiny_clip):
    method = methods.build_method(_cfg("cmf"), tiny_clip, 10)
    ln_final = sum(p.numel() for p in tiny_clip.clip.ln_final.parameters())
    image_norms = sum(p.numel() for p in method.params)
    assert method.anchor_trainable_count() == image_norms + ln_final
    assert method.q == 0.005 * ((image_norms + ln_final) / 38400)


@pytest.mark.parametrize("overrides,key", [
    ({"ROID__MOMENTUM_SRC": 1.5}, "ROID.MOMENTUM_SRC"),
    ({"ROID__TEMPERATURE": 0.0}, "ROID.TEMPERATURE"),
    ({"ROID__MOMENTUM_PROBS": -0.1}, "ROID.MOMENTUM_PROBS"),
    ({"ROID__USE_WEIGHTING": False}, "ROID.USE_CONSISTENCY"),
    ({"TEST__BATCH_SIZE": 1}, "TEST.BATCH_SIZE"),
    ({"CLIP__FREEZE_TEXT_ENCODER": False}, "CLIP.FREEZE_TEXT_ENCODER"),
])
@pytest.mark.parametrize("name", ["roid", "cmf"])
def test_bad_config_is_refused_in_one_line(name, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:   # at loading, or before any model
        check_method(tiny_cfg(f"conf/cifar10_c/{name}.yaml", **overrides))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides,key", [({"CMF__TYPE": "kf"}, "CMF.TYPE"), ({"CMF__Q": 1.0}, "CMF.Q"),
                                           ({"CMF__ALPHA": 1.1}, "CMF.ALPHA"), ({"CMF__GAMMA": -1.0}, "CMF.GAMMA")])
def test_bad_cmf_config_is_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_method(tiny_cfg("conf/cifar10_c/cmf.yaml", **overrides))


def test_cmf_type_op_is_lp_as_in_the_reference_and_says_so(tiny_clip):
    from methods.roid import CMF
    cfg = _cfg("cmf", CMF__Q=0.5, CMF__TYPE="op")
    assert CMF.config_warnings(cfg) and not CMF.config_warnings(_cfg("cmf"))
    lp = methods.build_method(_cfg("cmf", CMF__Q=0.5), copy.deepcopy(tiny_clip), 10)
    op = methods.build_method(cfg, tiny_clip, 10)
    for k in range(2):
        assert torch.equal(lp(_images(k)), op(_images(k)))


@pytest.mark.parametrize("name", ["roid", "cmf"])
@pytest.mark.parametrize("dataset,method,lr,batch", [
    ("cifar10_c", "Adam", 1e-3, 200), ("cifar100_c", "Adam", 1e-3, 200), ("imagenet_c", "SGD", 2.5e-4, 64),
    ("shapes_c", "Adam", 1e-3, 200)])
def test_shipped_configs_carry_the_anchors_values(name, dataset, method, lr, batch):
    cfg = load_cfg(f"conf/{dataset}/{name}.yaml")
    o = cfg.OPTIM
    assert (o.METHOD, o.LR, o.BETA, o.WD, o.STEPS) == (method, lr, 0.9, 0.0, 1)
    assert cfg.TEST.BATCH_SIZE == batch
    assert cfg.MODEL.ARCH == ("tiny-clip-shapes" if dataset == "shapes_c" else "ViT-B-16")
    if method == "SGD":
        assert (cfg.OPTIM.MOMENTUM, cfg.OPTIM.NESTEROV, cfg.OPTIM.DAMPENING) == (0.9, True, 0.0)
    r = cfg.ROID
    assert (r.USE_WEIGHTING, r.USE_PRIOR_CORRECTION, r.USE_CONSISTENCY) == (True, True, True)
    assert (r.MOMENTUM_SRC, r.MOMENTUM_PROBS, r.TEMPERATURE) == (0.99, 0.9, 1 / 3)
    assert (cfg.CMF.ALPHA, cfg.CMF.GAMMA, cfg.CMF.Q, cfg.CMF.TYPE) == (0.99, 0.99, 0.005, "lp")
