"""MEMO: test-time robustness via adaptation and augmentation (Zhang, Levine & Finn, NeurIPS 2022; code
zhangmarvin/memo), as the anchor suite runs it (mariodoebler/test-time-adaptation, classification/methods/memo.py).

Per test image x (episodic: from the source weights every time, MODEL.EPISODIC in every reference YAML):
1. N = TEST.N_AUGMENTATIONS AugMix views of x (methods/augmentations.py, MEMO.VIEW_AUGMENTATION);
2. OPTIM.STEPS optimizer steps (SGD in the reference YAMLs) on the marginal entropy of the views,
   H(mean_i softmax(f(view_i))), computed as the reference's ``marginal_entropy`` (log-probabilities
   x - logsumexp(x), logsumexp over the views - log N, clamped);
3. the image itself is classified by the adapted model; those logits are reported (ADAPT_THEN_PREDICT).

The model runs with AlphaBatchNorm layers (methods/batchnorm.py; BN.ALPHA): on a ResNet tower the views' and the
image's own statistics are mixed with the source ones; a ViT tower has no BatchNorm and nothing is replaced.
Adapted, as the reference's configure_model + TTAMethod.collect_params on its CLIP (text features precomputed,
text transformer removed): every parameter named ``weight`` or ``bias`` of the image tower (convolutions, norm
layers, linear layers; not class/positional embeddings, ``proj``, or nn.MultiheadAttention's in_proj_weight/bias).
"""
from __future__ import annotations

import torch

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS, AugmentedViews
from methods.base import ADAPT_THEN_PREDICT
from methods.batchnorm import AlphaBatchNormTTA
from methods.frames import ViewsMethod, free_weights_and_biases, image_and_views, trainable_weights_and_biases
from methods.losses import marginal_entropy
from methods.registry import register_method



@register_method("memo")
class MEMO(AlphaBatchNormTTA, ViewsMethod):
    views_node = "MEMO"
    protocol = ADAPT_THEN_PREDICT
    episode = "image"
    config_defaults = {"MEMO": {
        # How the N views are made. "augmix" (default): what the anchor suite's loader makes for MEMO
        # (AugMixAugmenter with use_augmix=True: RandomResizedCrop + flip, mixed with 3 AugMix chains; TPT's
        # AugMix, which MEMO's official code also uses for ImageNet); "crop_flip": the crops alone.
        "VIEW_AUGMENTATION": Option("augmix", choices=VIEW_AUGMENTATIONS),
    }}

    @classmethod
    def views_setup(cls, cfg) -> tuple[AugmentedViews, int]:
        return image_and_views(cfg, cls.views_node)

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if not cfg.CLIP.FREEZE_TEXT_ENCODER:
            raise ConfigError("memo adapts the image tower only (text features computed once); "
                              "CLIP.FREEZE_TEXT_ENCODER must be True, got False")

    def cost_info(self) -> dict:
        """Per test image: OPTIM.STEPS forward + backward passes of the N views, one forward of the image."""
        return {"views_per_image": self.views_per_image, "backward_passes_per_image": self.steps}

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self.use_alpha_batchnorm()
        free_weights_and_biases(self.model.clip.visual)

    def collect_params(self):
        return trainable_weights_and_biases(self.model, self.method_name, self.cfg.MODEL.ARCH)

    # ------------------------------------------------------------------ per image
    def reset_episode(self) -> None:
        """The reference's episodic reset: the model's weights and the optimizer state (not the gradient scaler,
        which its reset leaves as it is); the view stream goes on."""
        with torch.no_grad():
            for p, name in zip(self.params, self.param_names):
                p.copy_(self._snapshot["module"][f"model.{name}"])
        self._restore_snapshot(("optimizer",))

    def split_images(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every image's views (V, C, H, W), drawn image by image: the image first, then its N augmentations."""
        return list(self.views.image_by_image(x))

    @torch.enable_grad()
    def forward_and_adapt(self, views: torch.Tensor) -> None:
        """One step on the marginal entropy of the augmented views (the image itself is not among them)."""
        with self.autocast():
            logits = self.model(views[1:])
        self.optimizer_step(marginal_entropy(logits.float()))

    @torch.no_grad()
    def episode_logits(self, views: torch.Tensor, outputs) -> torch.Tensor:
        """The image classified by the adapted model; the reference predicts outside autocast."""
        return self.model(views[:1]).float()
