"""TENT (Wang et al., ICLR 2021; code DequanWang/tent) on CLIP: minimise the mean softmax entropy of each
test batch by updating the affine parameters of the image tower's normalisation layers; one step per batch,
predictions from the forward pass taken before the update.
"""
from __future__ import annotations

import torch

from methods.base import NormAffineTTA, softmax_entropy
from methods.registry import register_method


@register_method("tent")
class Tent(NormAffineTTA):
    config_defaults: dict = {}

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean softmax entropy over the batch."""
        return softmax_entropy(logits).mean(0)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
        loss = self.loss(logits.float())
        self.optimizer_step(loss)
        return logits.detach().float()
