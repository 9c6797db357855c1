"""OSTTA (Lee et al., ICCV 2023, "Towards Open-Set Test-Time Adaptation Utilizing the Wisdom of Crowds in Entropy
Minimization") as CLIPTTA's library runs it on CLIP (MarcLafon/cliptta: ttavlm/methods/ostta.py on
AbstractOpenSetTTAModel).

Per test batch, OPTIM.STEPS Adam steps on the affine parameters of the image tower's normalisation layers, then the
batch is classified by the adapted model (adapt, then predict). One step, with p = softmax(LOGIT_SCALE * cos) of the
adapted model and p0 the same of the source model (theirs: ``model0``, a frozen copy):
- keep image i when p_i[c0_i] - p0_i[c0_i] >= MARGIN, c0_i = argmax p0_i (its confidence in the source's class rose);
- L_tta = mean entropy of softmax(LOGIT_SCALE * cos + 1e-6) over the kept images; none kept: over the whole batch
  (OSTTA.EMPTY_FILTER batch, theirs) or no L_tta term (skip);
- L = BETA_TTA * L_tta - BETA_REG * H(mean_i softmax(LOGIT_SCALE * cos_i + 1e-6)) (log(p + 1e-6), theirs).
The source model is not a copy: its only difference from the adapted one is the adapted parameters, whose source
values are kept (a few LayerNorm vectors) and swapped in for the source forward (torch.func.functional_call). It is
computed once per batch (theirs: at every step; the same values, the source never changes).

Own OOD score (open-set streams, docs/open_set.md): CLIPTTA's get_scores of the reported batch's cosines,
OSTTA.SCORE_TYPE at OSTTA.OOD_LOGIT_SCALE (methods/ood_scores.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import NormAffineTTA
from methods.losses import mean_prediction_entropy
from methods.ood_scores import SCORE_TYPES, cliptta_ood_scores
from methods.registry import register_method

EMPTY_FILTER_RULES = ("batch", "skip")
ENTROPY_EPS = 1e-6   # CLIPTTA's lib.softmax_entropy and softmax_mean_entropy add it to the logits before the softmax


def shifted_softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """CLIPTTA's lib.softmax_entropy: the entropy of softmax(logits + 1e-6), the shift written twice as theirs. One
    shared shift gives the same loss but sums the gradient's three paths into the logits in another order, which
    Adam turns into differences of ~1e-5 in the parameters (measured on the tiny CLIP)."""
    return -((logits + ENTROPY_EPS).softmax(1) * (logits + ENTROPY_EPS).log_softmax(1)).sum(1)


@register_method("ostta")
class OSTTA(NormAffineTTA):
    protocol = ADAPT_THEN_PREDICT
    own_ood_score = "cliptta_get_scores"
    config_defaults = {"OSTTA": {
        # --margin_ostta (configuration.py 0.4, what return_tta_model passes; the class default 0.05 is never used):
        # an image enters L_tta when its confidence in the source's class rose by at least this much.
        "MARGIN": Option(0.4, within="[-1, 1]"),
        # No image kept: "batch" (theirs: the mean entropy of the whole batch) or "skip" (no L_tta term).
        "EMPTY_FILTER": Option("batch", choices=EMPTY_FILTER_RULES),
        "BETA_TTA": Option(1.0, within="[0, inf)"),      # --beta_tta (open-set scripts: 1.0)
        "BETA_REG": Option(1.0, within="[0, inf)"),      # --beta_reg (open-set scripts: 1.0; code default 0.1)
        "LOGIT_SCALE": Option(100.0, within="(0, inf)"),  # --logit_scale: cosines' scale in the loss and the logits
        # --score_type and --ood_logit_scale: the own OOD score, get_scores of the reported batch's cosines.
        "SCORE_TYPE": Option("max_prob", choices=SCORE_TYPES),
        "OOD_LOGIT_SCALE": Option(1.0, within="(0, inf)"),
        "ADAM_EPS": Option(1e-6, within="(0, inf)"),     # abstract_model.setup_optimizer: Adam(..., eps=1e-6)
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)   # the text tower must stay frozen
        if cfg.CLIP.PRECISION != "fp32":
            raise ConfigError(f"ostta trains normalisation parameters and needs fp32 weights: set CLIP.PRECISION "
                              f"fp32 (got {cfg.CLIP.PRECISION}); MIXED_PRECISION True gives fp16 compute on CUDA")

    def __init__(self, cfg, model, num_classes: int):
        super().__init__(cfg, model, num_classes)
        node = cfg.OSTTA
        self.margin = float(node.MARGIN)
        self.empty_filter = node.EMPTY_FILTER
        self.beta_tta, self.beta_reg = float(node.BETA_TTA), float(node.BETA_REG)
        self.logit_scale = float(node.LOGIT_SCALE)
        self.score_type, self.ood_logit_scale = node.SCORE_TYPE, float(node.OOD_LOGIT_SCALE)
        self.adam_eps = float(node.ADAM_EPS)        # the optimizer (base class) reads it
        self.source_values: dict[str, torch.Tensor] = {}
        self.source_confidence: tuple[torch.Tensor, torch.Tensor] | None = None   # (p0[c0], c0) of the batch
        self.last_cosines: torch.Tensor | None = None    # the reported batch's cosines, for ood_scores
        self.kept_per_step: list[int] = []               # images in L_tta at each step of the last batch

    def setup_state(self) -> None:
        # The source model = the model with these values in place of the adapted parameters; never updated, so a
        # plain attribute outside reset()'s snapshot stays exact.
        self.source_values = {name: p.detach().clone() for p, name in zip(self.params, self.param_names)}

    def reset_extra_state(self) -> None:
        self.source_confidence = None
        self.last_cosines = None
        self.kept_per_step = []

    def cost_info(self) -> dict:
        """Per test batch: one no-grad forward of the source model, OPTIM.STEPS forward + backward passes of the
        adapted one, one forward to predict."""
        return {"views_per_image": 1, "steps_per_batch": self.steps, "forward_passes_per_batch": self.steps + 2,
                "backward_passes_per_batch": self.steps}

    # ------------------------------------------------------------------ adaptation
    def cosines(self, x: torch.Tensor, source: bool = False) -> torch.Tensor:
        """cos(x_i, t_c), (B, C), of the adapted image tower or (``source``) of the source one."""
        with self.autocast():
            if source:
                pre = functional_call(self.model, self.source_values, (x,), {"return_features": True})
                pre = pre.image_pre_features
            else:
                pre = self.model.encode_image(x)
        return F.normalize(pre.float(), dim=-1) @ self.model.text_features()[0].float().t()

    @torch.no_grad()
    def source_prediction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p0[c0], c0): the source model's confidence and class of every image."""
        return (self.logit_scale * self.cosines(x, source=True)).softmax(1).max(1)

    def ostta_loss(self, cosines: torch.Tensor) -> torch.Tensor:
        """BETA_TTA * L_tta - BETA_REG * L_reg of the adapted model's cosines, against the batch's source
        confidences. Every term scales the cosines itself, as theirs: one shared product would sum the gradient's
        paths in another order (see ``shifted_softmax_entropy``)."""
        values0, indices0 = self.source_confidence
        probs = (self.logit_scale * cosines).softmax(1)
        values = probs[torch.arange(len(indices0), device=probs.device), indices0]
        entropy = shifted_softmax_entropy(self.logit_scale * cosines)
        kept = values - values0 >= self.margin
        self.kept_per_step.append(int(kept.sum()))
        if kept.any():
            loss_tta = entropy[kept].mean(0)
        elif self.empty_filter == "batch":
            loss_tta = entropy.mean(0)
        else:
            loss_tta = 0.0      # no L_tta term; the regulariser still steps
        loss_reg = mean_prediction_entropy(self.logit_scale * cosines + ENTROPY_EPS, eps=ENTROPY_EPS)
        return self.beta_tta * loss_tta - self.beta_reg * loss_reg

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> None:
        if self.source_confidence is None:    # the batch's first step
            self.source_confidence = self.source_prediction(x)
            self.kept_per_step = []
        self.optimizer_step(self.ostta_loss(self.cosines(x)))

    @torch.no_grad()
    def episode_logits(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """The batch classified by the adapted model: LOGIT_SCALE * cos (theirs: softmax(100 * cos))."""
        self.source_confidence = None
        self.last_cosines = self.cosines(x)
        return self.logit_scale * self.last_cosines

    def ood_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """CLIPTTA's get_scores (OSTTA.SCORE_TYPE, OSTTA.OOD_LOGIT_SCALE) of the cosines behind ``logits``."""
        if self.last_cosines is None or len(self.last_cosines) != len(logits):
            raise RuntimeError("ostta.ood_scores: call it with the logits of the batch the method just reported")
        return cliptta_ood_scores(self.last_cosines, self.score_type, self.ood_logit_scale)
