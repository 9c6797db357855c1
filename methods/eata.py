"""EATA and ETA, efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022) on CLIP, exact to the anchor
suite's classification/methods/eata.py (mariodoebler/test-time-adaptation).

Before adaptation (EATA only: EATA.FISHER_ALPHA > 0 and SOURCE.NUM_SAMPLES > 0), on the SOURCE.NUM_SAMPLES clean
source training images the harness hands over (``source_loader``, datasets/source_sets.py), in batches:
    F_i = mean over the batches of (d CE(f(x), argmax f(x)) / d theta_i)^2,   theta_i^0 = the source parameters.
Per test batch, one forward (its logits reported, predict-then-adapt):
1. reliable samples: entropy H(x) < E_0 = EATA.MARGIN_E0 * ln(C);
2. non-redundant: of those, |cos(m, softmax(f(x)))| < EATA.D_MARGIN, m the moving average of the probabilities
   of the samples kept so far (m <- 0.9 m + 0.1 mean; the first batch's mean starts it; reset() clears it);
3. loss = mean over the kept samples of H(x) / exp(H(x) - E_0)  +  FISHER_ALPHA * sum_i F_i (theta_i - theta_i^0)^2;
   one optimizer step (OPTIM), none when every sample is filtered out.
ETA is EATA without the Fisher term (EATA.FISHER_ALPHA 0, no source data). Adapted: the affine parameters of the
image tower's normalisation layers (BatchNorm on batch statistics), as the anchor's configure_model on a CLIP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.frames import NormAffineTTA
from methods.losses import softmax_entropy
from methods.registry import register_method

PROBS_MOMENTUM = 0.9       # the anchor's update_model_probs: 0.9 * m + (1 - 0.9) * mean of the new probabilities
# CLIPTTA's softmax_mean_entropy: (x + eps).softmax(1) averaged, -(p * log(p + eps)).sum()
CLIPTTA_EPS = 1e-6
REDUNDANCY_PROBS = ("logits", "cosine")


def update_model_probs(current: torch.Tensor | None, new_probs: torch.Tensor) -> torch.Tensor | None:
    """The anchor's update_model_probs: the moving average of the kept samples' probabilities."""
    if new_probs.shape[0] == 0:
        return current
    mean = new_probs.detach().mean(0)
    return mean if current is None else PROBS_MOMENTUM * current + (1 - PROBS_MOMENTUM) * mean


@register_method("eata")
class EATA(NormAffineTTA):
    # The anchor's conf.py EATA and SOURCE nodes (their defaults), plus two keys for CLIPTTA's ETA.
    config_defaults = {
        "EATA": {
            # Weight beta of the Fisher (EWC) term; 0: ETA, no source data read.
            "FISHER_ALPHA": Option(2000.0, within="[0, inf)"),
            # Redundancy threshold epsilon on |cos(moving average, probabilities)|.
            "D_MARGIN": Option(0.05, within="[0, inf)"),
            # Reliability threshold E_0 as a factor of ln(C). (The anchor's SAR reads it too; ours reads SAR.MARGIN_E0.)
            "MARGIN_E0": Option(0.4, within="[0, inf)"),
            # Probabilities of the redundancy filter: "logits" = softmax of CLIP's scaled logits (anchor suite);
            # "cosine" = softmax of the unscaled cosine similarities (CLIPTTA's ttavlm/methods/eata.py ETA).
            "REDUNDANCY_PROBS": Option("logits", choices=REDUNDANCY_PROBS),
            # CLIPTTA's ETA subtracts beta_reg (0.1 there) times the entropy of the batch's mean prediction; the
            # anchor suite does not (0).
            "MARGINAL_ENTROPY_WEIGHT": Option(0.0, within="[0, inf)"),
        },
        "SOURCE": {
            # Source images for the Fisher information: EATA computes it only when NUM_SAMPLES > 0 (the anchor's
            # default -1 means "all" to its loader, but EATA then runs as ETA); min(NUM_SAMPLES, N) are drawn
            # with random.Random(RNG_SEED).sample, as the anchor's get_source_loader.
            "NUM_SAMPLES": Option(-1, within="[-1, inf)"),
            # The anchor's loader: unused whenever NUM_SAMPLES > 0 (it then takes min(NUM_SAMPLES, N)).
            "PERCENTAGE": Option(1.0, within="(0, 1]"),
            # Accepted for the anchor's YAMLs; the source loader uses TEST.NUM_WORKERS, as the test stream
            # (workers change no result).
            "NUM_WORKERS": Option(4, within="[0, inf)"),
        },
    }
    # Source data is read when both keys are > 0 (harness/build.py; handed over as source_loader=...).
    source_data = ("EATA.FISHER_ALPHA", "SOURCE.NUM_SAMPLES")

    @classmethod
    def config_warnings(cls, cfg) -> list[str]:
        warnings = []
        if cfg.EATA.FISHER_ALPHA > 0 and cfg.SOURCE.NUM_SAMPLES <= 0:
            warnings.append(f"EATA.FISHER_ALPHA {cfg.EATA.FISHER_ALPHA} has no effect: SOURCE.NUM_SAMPLES "
                            f"{cfg.SOURCE.NUM_SAMPLES} is not > 0, so (as the anchor suite's EATA) no Fisher "
                            f"information is computed and this runs ETA")
        if cfg.SOURCE.PERCENTAGE != 1.0:
            warnings.append(f"SOURCE.PERCENTAGE {cfg.SOURCE.PERCENTAGE} has no effect on EATA: its source images "
                            f"are min(SOURCE.NUM_SAMPLES, N), as the anchor's get_source_loader")
        return warnings

    def __init__(self, cfg, model, num_classes, source_loader=None):
        super().__init__(cfg, model, num_classes)
        e = cfg.EATA
        self.e_margin = e.MARGIN_E0 * math.log(num_classes)
        self.d_margin = e.D_MARGIN
        self.fisher_alpha = e.FISHER_ALPHA
        self.redundancy_probs = e.REDUNDANCY_PROBS
        self.marginal_entropy_weight = e.MARGINAL_ENTROPY_WEIGHT
        self.uses_fisher = self.fisher_alpha > 0.0 and cfg.SOURCE.NUM_SAMPLES > 0
        if self.uses_fisher and source_loader is None:
            raise ConfigError(f"eata: EATA.FISHER_ALPHA {self.fisher_alpha} and SOURCE.NUM_SAMPLES "
                              f"{cfg.SOURCE.NUM_SAMPLES} need the source images (source_loader=...; the harness "
                              f"reads them from DATA_DIR); EATA.FISHER_ALPHA 0 runs ETA without them")
        self._source_loader = [source_loader] if self.uses_fisher else [None]   # a list: not module state
        self.fishers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.current_model_probs: torch.Tensor | None = None
        # Diagnostics as the anchor's (never reset): samples after the first and after both filters.
        self.num_samples_update_1 = 0
        self.num_samples_update_2 = 0
        self.source_images_seen = 0

    # ------------------------------------------------------------------ Fisher information
    def setup_state(self) -> None:
        """The Fisher information on the source images, before any adaptation (the anchor's EATA.__init__)."""
        if self.uses_fisher:
            self.fishers = self.compute_fishers(self._source_loader[0])
        self._source_loader = [None]

    @torch.enable_grad()
    def compute_fishers(self, loader) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{parameter name: (F, theta^0)}: per batch the squared gradient of the cross-entropy with the model's own
        predictions, summed over the batches and divided by their number; fp32, no autocast (as the anchor)."""
        sums: dict[str, torch.Tensor] = {}
        snapshots: dict[str, torch.Tensor] = {}
        batches = 0
        for batch in loader:
            images = batch[0].to(self.device, non_blocking=True)
            outputs = self.model(images)
            F.cross_entropy(outputs, outputs.max(1)[1]).backward()
            batches += 1
            self.source_images_seen += images.shape[0]
            for param, name in zip(self.params, self.param_names):
                if param.grad is not None:
                    squared = param.grad.detach().clone() ** 2
                    sums[name] = squared + sums[name] if name in sums else squared
                    snapshots[name] = param.detach().clone()
                param.grad = None
        if batches == 0:
            raise ConfigError("eata: the source loader gave no batch (SOURCE.NUM_SAMPLES images were expected)")
        return {name: (total / batches, snapshots[name]) for name, total in sums.items()}

    def ewc_penalty(self) -> torch.Tensor:
        """FISHER_ALPHA * sum_i F_i (theta_i - theta_i^0)^2, accumulated parameter by parameter as the anchor."""
        penalty = 0
        for param, name in zip(self.params, self.param_names):
            if name in self.fishers:
                fisher, source = self.fishers[name]
                penalty += self.fisher_alpha * (fisher * (param - source) ** 2).sum()
        return penalty

    # ------------------------------------------------------------------ the step
    def eata_loss(self, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The anchor's loss_calculation on a batch's fp32 logits: (loss, whether any sample is left to update on).
        Updates the moving average of the probabilities."""
        entropy = softmax_entropy(logits)
        reliable = torch.where(entropy < self.e_margin)[0]
        entropy = entropy[reliable]
        scores = logits if self.redundancy_probs == "logits" else logits / self.model.logit_scale.to(logits)
        probs = scores[reliable].softmax(1)
        if self.current_model_probs is not None:
            cosine = F.cosine_similarity(self.current_model_probs.unsqueeze(dim=0), probs, dim=1)
            kept = torch.where(torch.abs(cosine) < self.d_margin)[0]
            entropy, probs = entropy[kept], probs[kept]
        self.current_model_probs = update_model_probs(self.current_model_probs, probs)
        coeff = 1 / (torch.exp(entropy.clone().detach() - self.e_margin))
        loss = entropy.mul(coeff).mean(0)
        if self.fishers is not None:
            loss = loss + self.ewc_penalty()
        if self.marginal_entropy_weight:
            mean = (logits + CLIPTTA_EPS).softmax(1).mean(0)
            loss = loss - self.marginal_entropy_weight * -(mean * torch.log(mean + CLIPTTA_EPS)).sum()
        self.num_samples_update_1 += int(reliable.numel())
        self.num_samples_update_2 += int(entropy.numel())
        return loss, entropy.numel() != 0

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
            loss, update = self.eata_loss(logits.float())
        if update:       # no step when every sample is filtered out
            self.optimizer_step(loss)
        return logits.detach().float()

    def reset_extra_state(self) -> None:
        self.current_model_probs = None     # the anchor's reset(); the Fisher information stays

    def cost_info(self) -> dict:
        return {"forward_passes_per_batch": 1, "backward_passes_per_batch": 1,
                "source_images_for_fisher": self.source_images_seen}
