"""The frames methods are built on, and the helpers that choose which parameters adapt.

- ``NormAffineTTA``: the normalisation-layer baselines (TENT, RPL, SAR, RoTTA, CLIPTTA) adapt the affine
  parameters of the image tower's normalisation layers;
- ``ViewsMethod``: the test-time-augmentation methods (TPT, VTE, ZERO, TDA, DPE) classify views of every image
  (methods/augmentations.py makes them) and keep the most confident (``lowest_entropy_views``);
- ``MemoryReplayTTA``: CLIPTTA's library's memory-replay methods (SoTTA, STAMP) on ``NormAffineTTA``: cosines,
  fp32 weights, SAM steps in fp32;
- ``configure_norm_adaptation``, ``configure_image_layernorms``, ``norm_parameters``: free and collect
  normalisation parameters, for a method on any frame (BATCLIP, CLIPArTT, WATT, plug-ins);
  ``free_weights_and_biases``, ``trainable_weights_and_biases``: every ``weight`` and ``bias`` of the image tower
  (the anchor suite's CoTTA, AdaContrast, MEMO);
- ``sam_ascent``, ``sam_restore``, ``sam_optimizer_step``: sharpness-aware minimisation (SAR, SoTTA, STAMP);
- ``image_and_views``: the image and its N augmented views, all kept (MEMO, TTAug).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from methods.augmentations import AugmentedViews
from methods.base import TTAMethod
from methods.losses import softmax_entropy

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def use_batch_statistics(module: nn.BatchNorm2d) -> None:
    """Normalise with the batch's statistics in any mode: train mode, running statistics dropped (the anchor
    suite's configure_model)."""
    module.train()
    module.track_running_stats = False
    module.running_mean = None
    module.running_var = None


def configure_norm_adaptation(model: nn.Module, modules=None) -> None:
    """Freeze everything, then free the affine parameters of the normalisation layers in ``modules``
    (default: the whole model). BatchNorm2d uses batch statistics (train mode, no running stats), as in
    the anchor suite; LayerNorm has no running statistics, so its mode does not matter."""
    model.eval()
    model.requires_grad_(False)
    for module in (modules if modules is not None else model.modules()):
        if isinstance(module, NORM_LAYERS):
            module.requires_grad_(True)
            if isinstance(module, nn.BatchNorm2d):
                use_batch_statistics(module)


def configure_image_layernorms(model: nn.Module) -> None:
    """Freeze CLIP, then free the affine parameters of the image tower's LayerNorms (what CLIPArTT and WATT adapt:
    their references' ``configure_model`` on ``model.visual`` for ViTs)."""
    model.eval()
    model.requires_grad_(False)
    for module in model.clip.visual.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)


def norm_parameters(model: nn.Module, root: nn.Module | None = None) -> tuple[list[nn.Parameter], list[str]]:
    """Affine weight and bias of every normalisation layer under ``root`` (default: the model), named
    relative to ``model``."""
    root = root if root is not None else model
    prefix = {id(m): n for n, m in model.named_modules()}
    params, names = [], []
    for module in root.modules():
        if isinstance(module, NORM_LAYERS):
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if isinstance(p, nn.Parameter):
                    params.append(p)
                    names.append(f"{prefix[id(module)]}.{pname}")
    return params, names


class NormAffineTTA(TTAMethod):
    """The frame of the normalisation-based baselines (TENT, RPL, SAR, RoTTA, CLIPTTA): adapts the affine
    weight/bias of the normalisation layers of the image tower (``model.clip.visual``) only; text features stay
    computed once and frozen. TENT and RPL take TTAMethod's default step, one optimizer step on their ``loss``."""

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if not cfg.CLIP.FREEZE_TEXT_ENCODER:
            raise ConfigError(f"{cls.method_name} adapts only the image tower's norm layers; "
                              f"CLIP.FREEZE_TEXT_ENCODER must be True, got False")

    def adapted_norm_layers(self) -> list[nn.Module]:
        """The norm layers whose affine parameters adapt (default: every one in the image tower)."""
        return [m for m in self.model.clip.visual.modules() if isinstance(m, NORM_LAYERS)]

    def configure_model(self) -> None:
        configure_norm_adaptation(self.model, self.adapted_norm_layers())

    def collect_params(self) -> tuple[list[nn.Parameter], list[str]]:
        params, names = norm_parameters(self.model, self.model.clip.visual)
        keep = {id(p) for m in self.adapted_norm_layers() for p in m.parameters(recurse=False)}
        chosen = [(p, n) for p, n in zip(params, names) if id(p) in keep]
        if not chosen:   # every open_clip image tower has norm layers; a plug-in tower might not
            raise ConfigError(f"{self.method_name}: the image tower of MODEL.ARCH={self.cfg.MODEL.ARCH} has no "
                              f"normalisation layer left to adapt")
        return [p for p, _ in chosen], [n for _, n in chosen]


@torch.no_grad()
def sam_ascent(params, rho: float, missing_grad_as_zero: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SAM's first step (davda54/sam, adaptive False; SAR, SoTTA, STAMP): w -> w + rho * g / (||g|| + 1e-12);
    returns (parameter, w) pairs for ``sam_restore``. ``missing_grad_as_zero``: every parameter takes part, a
    missing gradient counting as 0 (SAR's); otherwise the parameters without a gradient are left out (CLIPTTA's
    optimizers/sam.py). Both give the same step; the pairs differ."""
    if missing_grad_as_zero:
        pairs = [(p, p.grad if p.grad is not None else torch.zeros_like(p)) for p in params]
    else:
        pairs = [(p, p.grad) for p in params if p.grad is not None]
    grad_norm = torch.norm(torch.stack([g.norm(p=2) for _, g in pairs]), p=2)
    scale = rho / (grad_norm + 1e-12)
    saved = []
    for p, g in pairs:
        saved.append((p, p.detach().clone()))
        p.add_(g * scale.to(p))
    return saved


@torch.no_grad()
def sam_restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """SAM's second step before the base optimizer's step: back to w (the gradient stays the one taken at w + e)."""
    for p, original in saved:
        p.copy_(original)


WEIGHT_AND_BIAS = ("weight", "bias")


def free_weights_and_biases(root: nn.Module) -> None:
    """Let every parameter named ``weight`` or ``bias`` under ``root`` adapt: what the anchor suite's CoTTA,
    AdaContrast and MEMO collect (``collect_params``: ``np in ['weight', 'bias']``), on the image tower."""
    for module in root.modules():
        for name, p in module.named_parameters(recurse=False):
            if name in WEIGHT_AND_BIAS:
                p.requires_grad_(True)


def trainable_weights_and_biases(model: nn.Module, method: str, arch: str) -> tuple[list[nn.Parameter], list[str]]:
    """Every trainable ``weight`` and ``bias`` of ``model``, in the anchor's order (named_modules, then each
    module's own), with their names; a tower without any is refused."""
    params, names = [], []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if name in WEIGHT_AND_BIAS and p.requires_grad:
                params.append(p)
                names.append(f"{module_name}.{name}")
    if not params:
        raise ConfigError(f"{method}: the image tower of MODEL.ARCH={arch} has no weight to adapt")
    return params, names


def sam_optimizer_step(optimizer: torch.optim.Optimizer, params, rho: float, loss_fn) -> None:
    """One SAM step (CLIPTTA's optimizers/sam.py with its base optimizer: SoTTA, STAMP): the gradient of
    ``loss_fn()`` at w, the ascent to w + e, the gradient of ``loss_fn()`` there, back to w, the base step."""
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    saved = sam_ascent(params, rho)
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()      # the gradient at w + e updates w
    sam_restore(saved)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def image_and_views(cfg, node: str) -> tuple[AugmentedViews, int]:
    """The image and its TEST.N_AUGMENTATIONS augmented views, all kept (the anchor suite's loader for MEMO and
    TTAug: 1 + N views), made as <node>.VIEW_AUGMENTATION says."""
    views = AugmentedViews(cfg.TEST.N_AUGMENTATIONS + 1, cfg[node].VIEW_AUGMENTATION, cfg.RNG_SEED,
                           keys=("TEST.N_AUGMENTATIONS", f"{node}.VIEW_AUGMENTATION"))
    return views, views.n_views


class MemoryReplayTTA(NormAffineTTA):
    """The frame of CLIPTTA's library's memory-replay methods (SoTTA, STAMP): image-tower norm parameters trained
    in fp32 weights on cosines of normalised features; with ``use_sam`` (their --use_sam) every step is a SAM step
    in fp32, without autocast or GradScaler."""
    use_sam = False

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)   # the text tower must stay frozen
        if cfg.CLIP.PRECISION != "fp32":
            raise ConfigError(f"{cls.method_name} trains normalisation parameters and needs fp32 weights: set "
                              f"CLIP.PRECISION fp32 (got {cfg.CLIP.PRECISION}); MIXED_PRECISION True gives fp16 "
                              f"compute on CUDA")

    def setup_scaler(self):
        return None if self.use_sam else super().setup_scaler()

    def autocast(self):
        return contextlib.nullcontext() if self.use_sam else super().autocast()

    def cosines(self, x: torch.Tensor, visual: nn.Module | None = None) -> torch.Tensor:
        """cos(x_i, t_c), (B, C), of the adapted image tower or of ``visual`` (CLIPTTA's get_logits on normalised
        features; class bias 0 for CLIP)."""
        with self.autocast():
            if visual is None:
                pre = self.model.encode_image(x)
            else:
                pre = visual(self.model.normalize(x.to(next(visual.parameters()).dtype)))
        return F.normalize(pre.float(), dim=-1) @ self.model.text_features()[0].float().t()


def n_confident_views(n_views: int, fraction: float, key: str) -> int:
    """How many views are kept: int(n_views * fraction), as TPT's ``select_confident_samples``. Zero views
    would make the average undefined (NaN in the reference), so that is refused."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{key} must be in (0, 1], got {fraction}")
    k = int(n_views * fraction)
    if k < 1:
        raise ConfigError(f"{key} = {fraction} keeps int({n_views} * {fraction}) = 0 of TEST.N_AUGMENTATIONS = "
                         f"{n_views} views; raise either so that at least one view is kept")
    return k


def confident_views_setup(cfg, node: str, single_view_is_the_image: bool = False) -> tuple[AugmentedViews, int]:
    """The views of a view-ensembling method configured under ``node`` (TPT, VTE, ZERO, TDA, DPE):
    TEST.N_AUGMENTATIONS views made as <node>.VIEW_AUGMENTATION says, and how many of them <node>.SELECTION_P keeps.
    ``single_view_is_the_image``: one view is the image itself, kept whatever SELECTION_P says (the one-image
    branch of TDA's and DPE's code)."""
    views = AugmentedViews(cfg.TEST.N_AUGMENTATIONS, cfg[node].VIEW_AUGMENTATION, cfg.RNG_SEED,
                           keys=("TEST.N_AUGMENTATIONS", f"{node}.VIEW_AUGMENTATION"))
    if single_view_is_the_image and views.n_views == 1:
        return views, 1
    return views, n_confident_views(views.n_views, cfg[node].SELECTION_P, f"{node}.SELECTION_P")


def lowest_entropy_views(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k views with the lowest softmax entropy along dim -2 of logits (..., V, C)."""
    entropy = softmax_entropy(logits.reshape(-1, logits.shape[-1]).float()).view(logits.shape[:-1])
    return entropy.argsort(dim=-1, stable=True)[..., :k]


class ViewsMethod(TTAMethod):
    """The frame of a method that classifies test-time views of every image (TPT, VTE, ZERO, TDA, DPE): its
    ``views`` and how many it keeps (``n_selected``), from TEST.N_AUGMENTATIONS and <views_node>.VIEW_AUGMENTATION /
    SELECTION_P (checked before the model loads); the view stream restarts on every reset."""
    views_node = ""                    # the config node of the method's VIEW_AUGMENTATION and SELECTION_P
    single_view_is_the_image = False   # see confident_views_setup

    @classmethod
    def views_setup(cls, cfg) -> tuple[AugmentedViews, int]:
        return confident_views_setup(cfg, cls.views_node, cls.single_view_is_the_image)

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        cls.views_setup(cfg)

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.views, self.n_selected = self.views_setup(cfg)
        # Cost per image, for the results' provenance: image-encoder passes (views) per test image.
        self.views_per_image = self.views.n_views

    def cost_info(self) -> dict:
        """Per test image: the views through the image encoder; text features are computed once at start-up."""
        return {"views_per_image": self.views_per_image, "backward_passes_per_image": 0}

    def reset_extra_state(self) -> None:
        self.views.reset()
