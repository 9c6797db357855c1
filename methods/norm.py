"""The anchor suite's BatchNorm-statistics methods (mariodoebler/test-time-adaptation, classification/methods/norm.py
and methods/bn.py) on a CLIP with a ResNet image tower (open_clip's RN50, RN101, ...: BatchNorm2d layers):

- bntest (BNTest; "norm_test" configs): every BatchNorm2d in train mode, so each test batch is normalised with its
  own statistics (mean, biased variance); the running statistics are updated as in train mode (momentum 0.1) but
  never read, as in the reference;
- bnalpha (BNAlpha; "norm_alpha"): every BatchNorm2d normalises with (1 - BN.ALPHA) * source + BN.ALPHA * batch
  statistics (methods/batchnorm.py AlphaBatchNorm; Schneider et al. 2020);
- bnema (BNEMA; "norm_ema"): per batch, a forward in train mode (the running statistics move towards the batch's,
  running = (1 - 0.1) * running + 0.1 * batch, torch's default momentum, unbiased variance), its output
  discarded, then a forward in eval mode with the updated running statistics, whose logits are reported.

Nothing is trained. The reported logits use the batch's own statistics (ADAPT_THEN_PREDICT). OPTIM.STEPS and
MODEL.EPISODIC act as in the reference's TTAMethod.forward loop (bnema: STEPS updates per batch). The adapted state
is the BatchNorm running statistics (bntest, bnema), named as this method's ``param_names``. A ViT image tower has
no BatchNorm: refused in one line.
"""
from __future__ import annotations

import torch

from methods.base import ADAPT_THEN_PREDICT, TTAMethod
from methods.batchnorm import AlphaBatchNormTTA, batchnorm_layers, require_batchnorm_tower
from methods.registry import register_method

STATISTICS_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class BatchNormStatisticsTTA(TTAMethod):
    """What the three share: the tower check, no parameter trained, one forward per step."""
    protocol = ADAPT_THEN_PREDICT
    statistics_move = True     # whether the running statistics change (bntest, bnema)
    forwards_per_step = 1      # bnema: one forward to update the statistics, one to predict

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        require_batchnorm_tower(cls.method_name, cfg, model_spec)

    def collect_params(self):
        """No parameter is trained; the names are those of the statistics buffers that adapt (reset restores them
        with the rest of the method state)."""
        if not self.statistics_move:
            return [], []
        names = [f"clip.visual.{name}.{buffer}" for name, _ in batchnorm_layers(self.model.clip.visual)
                 for buffer in STATISTICS_BUFFERS]
        return [], names

    def cost_info(self) -> dict:
        return {"forward_passes_per_batch": self.steps * self.forwards_per_step,
                "backward_passes_per_image": 0}

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(x).float()


@register_method("bntest")
class BNTest(BatchNormStatisticsTTA):
    config_defaults: dict = {}

    def configure_model(self) -> None:
        super().configure_model()
        for _, layer in batchnorm_layers(self.model.clip.visual):
            layer.train()


@register_method("bnalpha")
class BNAlpha(BatchNormStatisticsTTA, AlphaBatchNormTTA):
    config_defaults: dict = {}
    statistics_move = False

    def configure_model(self) -> None:
        super().configure_model()
        self.use_alpha_batchnorm()


@register_method("bnema")
class BNEMA(BatchNormStatisticsTTA):
    config_defaults: dict = {}
    forwards_per_step = 2

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's EMABatchNorm.forward: a train-mode forward that only updates the running statistics,
        then the eval-mode forward that uses them."""
        with self.autocast():
            self.model.train()
            self.model(x)
            self.model.eval()
            return self.model(x).float()
