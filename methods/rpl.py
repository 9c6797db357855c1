"""RPL, robust pseudo-labelling (Rusak et al., TMLR 2022) on CLIP: TENT's frame and step with the generalised
cross-entropy (Zhang & Sabuncu, 2018) on the model's own hard pseudo-labels instead of the entropy.
As in the anchor suite (mariodoebler/test-time-adaptation, methods/rpl.py): pseudo-labels are the argmax
of the same forward pass, loss = mean over the batch of (1 - p_y ** q) / q.
"""
from __future__ import annotations

import torch

from conf.options import Option
from methods.frames import NormAffineTTA
from methods.losses import generalized_cross_entropy
from methods.registry import register_method


@register_method("rpl")
class RPL(NormAffineTTA):
    config_defaults = {"RPL": {
        # Exponent of the generalised cross-entropy (q -> 0: cross-entropy, q = 1: MAE); 0.8 in RPL and the suite.
        "Q": Option(0.8, within="(0, 1]"),
    }}

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.q = float(cfg.RPL.Q)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean GCE of the batch against its own argmax pseudo-labels."""
        pseudo_labels = logits.argmax(1).detach()
        return generalized_cross_entropy(logits, pseudo_labels, self.q).mean(0)
