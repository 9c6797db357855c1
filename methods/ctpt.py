"""C-TPT: calibrated test-time prompt tuning via text feature dispersion (Yoon et al., ICLR 2024; code
hee-suk-yoon/C-TPT, ``tpt_classification.py`` ``test_time_tuning`` with ``--run_type tpt_ctpt`` and
``clip/custom_clip.py`` ``ClipTestTimeTuning.inference``).

TPT (methods/tpt.py, docs/tpt_vte.md) with one more loss term. Per test image: the image and
TEST.N_AUGMENTATIONS - 1 random views of it; the views' logits under the current prompt; the CTPT.SELECTION_P
fraction of views with the lowest softmax entropy (chosen at the first step and kept); OPTIM.STEPS AdamW steps on
the N_CTX learnable context token embeddings minimising

    marginal_entropy(selected views' logits) - CTPT.LAMBDA * ATFD(t_1, ..., t_C),
    ATFD = 1/C sum_c || t_c - 1/C sum_c' t_c' ||_2,

where t_c are the L2-normalised text features of the C class prompts under the current context (the same
features that give the step's logits; the centroid is not renormalised). Maximising the Average Text Feature
Dispersion spreads the class text features apart, which the paper shows lowers the calibration error. Then the
image itself is classified with the tuned prompt.

Episodic as the reference: with MODEL.EPISODIC the prompt and the optimizer state go back to their initial values
before every image, and a batch of several images is processed image by image, each from the initial prompt; the
gradient scaler of the mixed-precision path is not part of that per-image reset; ``reset()`` restores everything.
"""
from __future__ import annotations

import torch

from conf.options import Option
from methods.losses import marginal_entropy
from methods.prompts import PROMPT_TUNING_OPTIONS, PromptTuningViews
from methods.registry import register_method


def text_feature_dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """ATFD of (C, D) text features: the mean over classes of the L2 distance of each feature to their centroid
    (C-TPT's ``l2_norm_mean``: ``torch.linalg.norm(t - t.mean(0), dim=-1).mean()``)."""
    return torch.linalg.vector_norm(text_features - text_features.mean(0), dim=-1).mean()


@register_method("ctpt")
class CTPT(PromptTuningViews):
    views_node = mixed_precision_node = "CTPT"
    config_defaults = {"CTPT": {
        # Weight of the dispersion term, subtracted from the entropy (the loss maximises ATFD). The reference's
        # scripts: 50 on ImageNet and the fine-grained sets (test_tpt_ctpt_fg.sh), 20 on the natural shifts
        # (test_tpt_ctpt_ds.sh); its argparse default 0 is plain TPT. 0 here is TPT exactly (tested).
        "LAMBDA": Option(50.0, within="[0, inf)"),
        **PROMPT_TUNING_OPTIONS,
    }}

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.lambda_ = float(cfg.CTPT.LAMBDA)

    def draw_views(self, x: torch.Tensor) -> torch.Tensor:
        """Drawn image by image: a batch gets the views its images get one at a time (the batch size changes
        nothing)."""
        return self.views.image_by_image(x)

    def prompt_loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The marginal entropy of the confident views' predictions minus LAMBDA times the dispersion of this
        step's class text features."""
        loss = marginal_entropy(selected_logits)
        if self.lambda_:
            loss = loss + (-self.lambda_ * text_feature_dispersion(text_features.float()))
        return loss
