"""Zero-shot CLIP, no adaptation (the paper's ZS row)."""
import torch

from methods.base import TRAINING_FREE, TTAMethod
from methods.registry import register_method


@register_method("source", aliases=("zero_shot", "zs"))
class Source(TTAMethod):
    protocol = TRAINING_FREE

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(x).float()
