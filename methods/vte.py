"""VTE: vision-text-space ensemble (Döbler et al., "A Lost Opportunity for Vision-Language Models", ECCV 2024
workshop; anchor suite mariodoebler/test-time-adaptation ``methods/vte.py``). Nothing is trained.

Text space: the prompt-template ensemble (CLIP.PROMPT_MODE ensemble in the VTE YAMLs: 18 CIFAR / 80 ImageNet
templates; the model averages the normalised template features per class and renormalises). Image space: the
image and TEST.N_AUGMENTATIONS - 1 random views of it; the VTE.SELECTION_P fraction of these views with the
lowest softmax entropy (the original competes like any view) is kept and their L2-normalised image features are
averaged. As in the reference, the average is not renormalised: logits = logit_scale * mean @ text.T, which
scales every class logit of an image by the same factor (same prediction as renormalising).

Every image of a batch is handled independently, so the batch size changes nothing but the memory used
(B x N_AUGMENTATIONS views are encoded at once). MODEL.EPISODIC and OPTIM.* have nothing to act on.
"""
from __future__ import annotations

import torch

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import TRAINING_FREE
from methods.frames import ViewsMethod, lowest_entropy_views
from methods.registry import register_method


# The default of TPT.SELECTION_P and VTE.SELECTION_P (the references' 0.1).
TPT_SELECTION_DEFAULT = 0.1


@register_method("vte")
class VTE(ViewsMethod):
    views_node = "VTE"
    protocol = TRAINING_FREE
    config_defaults = {"VTE": {
        # Fraction of the views (lowest entropy first) whose image features are averaged. The anchor suite reads
        # this value from TPT.SELECTION_P (default 0.1, never set in its VTE configs); here VTE owns it.
        "SELECTION_P": Option(0.1, within="(0, 1]"),
        # How the views are made; "crop_flip" = RandomResizedCrop + horizontal flip, as the anchor suite does for
        # the corruption benchmarks; "augmix" = those views AugMix-mixed (see methods/augmentations.py).
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if cfg.TPT.SELECTION_P != TPT_SELECTION_DEFAULT and cfg.VTE.SELECTION_P == TPT_SELECTION_DEFAULT:
            raise ConfigError(f"TPT.SELECTION_P = {cfg.TPT.SELECTION_P}: the authors' suite reads VTE's view "
                              f"fraction from TPT.SELECTION_P; here it is VTE.SELECTION_P (set that)")

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        views = self.views(x)                                             # (B, V, C, H, W); view 0 = x
        batch, n_views = views.shape[:2]
        with self.autocast():
            out = self.model(views.flatten(0, 1), return_features=True)
        logits = out.logits.float().view(batch, n_views, -1)
        features = out.image_features.float().view(batch, n_views, -1)
        selected = lowest_entropy_views(logits, self.n_selected)         # (B, k)
        ensembled = features.gather(1, selected.unsqueeze(-1).expand(-1, -1, features.shape[-1])).mean(dim=1)
        return self.model.logits(ensembled, out.text_features.float())
