"""TENT (Wang et al., ICLR 2021; code DequanWang/tent) on CLIP: minimise the mean softmax entropy of each
test batch by updating the affine parameters of the image tower's normalisation layers; one step per batch,
predictions from the forward pass taken before the update (TTAMethod's default step on ``loss``).
"""
from __future__ import annotations

import torch

from methods.frames import NormAffineTTA
from methods.losses import softmax_entropy
from methods.registry import register_method


@register_method("tent")
class Tent(NormAffineTTA):
    config_defaults: dict = {}

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean softmax entropy over the batch."""
        return softmax_entropy(logits).mean(0)
