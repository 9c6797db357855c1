"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022; code azshue/TPT; CLIP version in the anchor suite,
mariodoebler/test-time-adaptation ``methods/tpt.py`` and ``models/custom_clip.py``).

Per test image: the image and TEST.N_AUGMENTATIONS - 1 random views of it (methods/augmentations.py); the
views' logits under the current prompt; the TPT.SELECTION_P fraction of views with the lowest softmax entropy;
OPTIM.STEPS AdamW steps on the N_CTX learnable context token embeddings (initialised from "a photo of a")
minimising the entropy of the selected views' averaged probabilities; then the original image is classified
with the tuned prompt. Both CLIP encoders stay frozen, so the image features of the views are computed once.

Episodic as in the reference: with MODEL.EPISODIC (set in every TPT YAML) the prompt and the optimizer state
go back to their initial values before every image; a batch of several images is processed image by image,
each from the initial prompt. As in the reference, the gradient scaler of the mixed-precision path is not
part of that per-image reset; ``reset()`` restores everything (prompt, optimizer, scaler, view stream).
"""
from __future__ import annotations

import torch

from methods.losses import marginal_entropy
from methods.prompts import PROMPT_TUNING_OPTIONS, PromptTuningViews
from methods.registry import register_method


@register_method("tpt")
class TPT(PromptTuningViews):
    views_node = mixed_precision_node = "TPT"
    config_defaults = {"TPT": {**PROMPT_TUNING_OPTIONS}}

    def prompt_loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The marginal entropy of the confident views' predictions."""
        return marginal_entropy(selected_logits)
