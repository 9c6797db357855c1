"""MTA: MeanShift for Test-time Augmentation (Zanella & Ben Ayed, "On the test-time zero-shot generalization of
vision-language models: Do we really need prompt learning?", CVPR 2024; code MaxZanella/MTA, ``mta.py``
``solve_mta``, ``main.py``). Nothing is trained and nothing is back-propagated.

Per test image, with x_1..x_V the L2-normalised features of its views (x_1 the image itself, TEST.N_AUGMENTATIONS
views in all) and t_c the class text features:

- bandwidth, one per view: h_i = sqrt(0.5 * mean of the squared distances from x_i to its k nearest other views),
  k = int(MTA.BANDWIDTH_NEIGHBOURS * (V - 1)) (the reference: 0.3);
- affinity W = p p^T with p_i = softmax(logit_scale * cos(x_i, t) / MTA.TEMPERATURE);
- inlierness y = 1/V, mode m = x_1; MTA.MAX_ITER outer iterations, each:
  * inlierness step: with d_i = exp(-||x_i - m||^2 / (2 h_i^2)) (fixed for the step), up to MAX_ITER updates
    y <- softmax((1 / LAMBDA_Y) * (d + LAMBDA_Q * W y)), stopped when ||y_old - y|| < MTA.TOLERANCE;
  * mode step: up to MAX_ITER updates m <- sum_i d_i(m) y_i x_i / sum_i d_i(m) y_i, then m / ||m||, stopped when
    ||m_old - m|| < MTA.TOLERANCE;
- logits = logit_scale * cos(m, t).

The reference loops per image; here all images of a batch (and all their views) are solved at once, every early
stop being per image (an image whose loop has stopped keeps its values while the others go on), so that a batch
gives what each image alone gives. The views are drawn image by image (``AugmentedViews.image_by_image``), so a
batch of B images gives exactly the views, and so the results, of B batches of one.
"""
from __future__ import annotations

import torch

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS, AugmentedViews
from methods.base import TRAINING_FREE
from methods.frames import ViewsMethod
from methods.registry import register_method


def view_bandwidths(features: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, V) per-view kernel bandwidths of features (B, V, D): sqrt(0.5 * the mean squared distance to the k =
    int(fraction * (V - 1)) nearest views, the view itself (first in the sorted row) left out)."""
    k = int(fraction * (features.shape[1] - 1))
    distances = torch.cdist(features, features).sort(dim=-1).values
    return torch.sqrt(0.5 * (distances[..., 1:k + 1] ** 2).mean(dim=-1))


def kernel_density(mode: torch.Tensor, bandwidth: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Gaussian kernel (B, V) of every view (B, V, D) around the mode (B, D), each view with its bandwidth (B, V)."""
    distance = torch.norm(features - mode[:, None], dim=-1, p=2)
    return torch.exp(-distance ** 2 / (2 * bandwidth ** 2))


def solve_mta(features: torch.Tensor, text_features: torch.Tensor, logit_scale, lambda_y: float = 0.2,
              lambda_q: float = 4.0, max_iter: int = 5, tolerance: float = 1e-6, temperature: float = 1.0,
              bandwidth_fraction: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MTA for a batch: features (B, V, D) of every image's views (view 0 the image), text features (C, D).
    Returns (mode (B, D), inlierness (B, V), logits (B, C))."""
    batch, n_views, _ = features.shape
    logits = features @ text_features.t() * logit_scale                              # (B, V, C)
    probs = (logits / temperature).softmax(dim=-1)
    affinity = probs @ probs.transpose(1, 2)                                           # (B, V, V)
    bandwidth = view_bandwidths(features, bandwidth_fraction)
    y = torch.ones(batch, n_views, device=features.device, dtype=features.dtype) / n_views
    mode = features[:, 0]
    for _ in range(max_iter):
        density = kernel_density(mode, bandwidth, features)
        running = torch.ones(batch, dtype=torch.bool, device=features.device)
        for _ in range(max_iter):                                    # inlierness step, early stop per image
            new_y = ((1 / lambda_y) * (density + lambda_q * (affinity * y[:, None, :]).sum(dim=2))).softmax(dim=-1)
            moved = torch.norm(y - new_y, dim=-1)
            y = torch.where(running[:, None], new_y, y)
            running = running & ~(moved < tolerance)
            if not bool(running.any()):
                break
        running = torch.ones(batch, dtype=torch.bool, device=features.device)
        for _ in range(max_iter):                                    # mode step (mean shift), early stop per image
            weights = kernel_density(mode, bandwidth, features) * y
            new_mode = (weights[..., None] * features).sum(dim=1) / weights.sum(dim=1, keepdim=True)
            new_mode = new_mode / new_mode.norm(p=2, dim=-1, keepdim=True)
            moved = torch.norm(mode - new_mode, dim=-1)
            mode = torch.where(running[:, None], new_mode, mode)
            running = running & ~(moved < tolerance)
            if not bool(running.any()):
                break
    return mode, y, mode @ text_features.t() * logit_scale


@register_method("mta")
class MTA(ViewsMethod):
    views_node = "MTA"
    protocol = TRAINING_FREE
    mixed_precision_node = "MTA"
    config_defaults = {"MTA": {
        # How the views are made: the reference's AugMixAugmenter with augmix off for MTA on every data set
        # (main.py: augmix=(len(set_id) > 1 and args.tpt)): RandomResizedCrop + horizontal flip.
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
        # Weight of the entropic term (main.py --lambda_y 0.2): the inlierness softmax is taken of (1 / LAMBDA_Y) * (...).
        "LAMBDA_Y": Option(0.2, within="(0, inf)"),
        # Weight of the quadratic (affinity) term (main.py --lambda_q 4).
        "LAMBDA_Q": Option(4.0, within="[0, inf)"),
        # Outer iterations, and the most updates of each inner step (mta.py: max_iter = 5 for all three loops).
        "MAX_ITER": Option(5, within="[1, inf)"),
        # An inner step stops once its update moves y (or the mode) by less than this, in L2 (mta.py: th = 1e-6).
        "TOLERANCE": Option(1e-6, within="[0, inf)"),
        # Temperature of the softmax whose products are the views' affinities (mta.py: temperature = 1).
        "TEMPERATURE": Option(1.0, within="(0, inf)"),
        # Bandwidth of view i from its int(BANDWIDTH_NEIGHBOURS * (V - 1)) nearest views (mta.py: 0.3).
        "BANDWIDTH_NEIGHBOURS": Option(0.3, within="(0, 1]"),
        # The reference runs fp32 CLIP under CUDA fp16 autocast (main.py / mta.py); the same here on CUDA for the
        # encoder, ignored on CPU. The solver runs in fp32 either way (the reference's normalised features are fp32).
        "MIXED_PRECISION": True,
    }}

    @classmethod
    def views_setup(cls, cfg) -> tuple[AugmentedViews, int]:
        """TEST.N_AUGMENTATIONS views made as MTA.VIEW_AUGMENTATION says, all of them used (MTA selects none)."""
        views = AugmentedViews(cfg.TEST.N_AUGMENTATIONS, cfg.MTA.VIEW_AUGMENTATION, cfg.RNG_SEED,
                               keys=("TEST.N_AUGMENTATIONS", "MTA.VIEW_AUGMENTATION"))
        k = int(cfg.MTA.BANDWIDTH_NEIGHBOURS * (views.n_views - 1))
        if k < 1:
            raise ConfigError(f"MTA.BANDWIDTH_NEIGHBOURS = {cfg.MTA.BANDWIDTH_NEIGHBOURS} with TEST.N_AUGMENTATIONS "
                              f"= {views.n_views} gives the bandwidth int({cfg.MTA.BANDWIDTH_NEIGHBOURS} * "
                              f"{views.n_views - 1}) = 0 neighbours (NaN in the reference); raise either")
        return views, views.n_views

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.options = cfg.MTA

    def cost_info(self) -> dict:
        """Per test image: its views through the image encoder once; the MeanShift runs on their features."""
        return {"views_per_image": self.views_per_image, "backward_passes_per_image": 0,
                "meanshift_iterations_per_image": self.options.MAX_ITER}

    @torch.no_grad()
    def view_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features (B, V, D) of every image's views, all views of the batch in one encoder pass, and the
        class text features (C, D); fp32."""
        views = self.views.image_by_image(x)         # (B, V, C, H, W); view 0 = x; drawn image by image, so that
                                                     # the batch size changes nothing
        with self.autocast():
            out = self.model(views.flatten(0, 1), return_features=True)
        features = out.image_features.float().view(views.shape[0], views.shape[1], -1)
        return features, out.text_features.float()

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        features, text = self.view_features(x)
        _, _, logits = solve_mta(features, text, self.model.logit_scale.float(), o.LAMBDA_Y, o.LAMBDA_Q,
                                 int(o.MAX_ITER), o.TOLERANCE, o.TEMPERATURE, o.BANDWIDTH_NEIGHBOURS)
        return logits
