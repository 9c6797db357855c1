"""TTAug: test-time augmentation, as the anchor suite runs it (mariodoebler/test-time-adaptation,
classification/methods/ttaug.py): the logits of every test image are the mean of the model's logits (not of the
probabilities) over the image and its N = TEST.N_AUGMENTATIONS augmented views (methods/augmentations.py,
TTAUG.VIEW_AUGMENTATION; the reference's loader makes AugMix views for it, as for MEMO).

Nothing is trained (TRAINING_FREE). The model runs with AlphaBatchNorm layers (methods/batchnorm.py; BN.ALPHA):
on a ResNet tower each image's 1 + N views are one batch, whose statistics are mixed with the source ones (the
reference at batch size 1, the only size its ``mean(0, keepdim=True)`` over the whole batch serves); a ViT tower
has no BatchNorm and nothing is replaced.
"""
from __future__ import annotations

import torch

from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS, AugmentedViews
from methods.base import TRAINING_FREE
from methods.batchnorm import AlphaBatchNormTTA
from methods.frames import ViewsMethod, image_and_views
from methods.registry import register_method


@register_method("ttaug")
class TTAug(AlphaBatchNormTTA, ViewsMethod):
    views_node = "TTAUG"
    protocol = TRAINING_FREE
    config_defaults = {"TTAUG": {
        # How the N views are made: "augmix" (default), the anchor suite's loader for ttaug (AugMixAugmenter with
        # use_augmix=True); "crop_flip": RandomResizedCrop + flip alone.
        "VIEW_AUGMENTATION": Option("augmix", choices=VIEW_AUGMENTATIONS),
    }}

    @classmethod
    def views_setup(cls, cfg) -> tuple[AugmentedViews, int]:
        return image_and_views(cfg, cls.views_node)

    def configure_model(self) -> None:
        super().configure_model()
        self.use_alpha_batchnorm()

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Per image: the mean of the logits of its 1 + N views, one forward of the views as one batch."""
        outputs = []
        with self.autocast():
            for views in self.views.image_by_image(x):
                outputs.append(self.model(views).float().mean(0, keepdim=True))
        return torch.cat(outputs)
