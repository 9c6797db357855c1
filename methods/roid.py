"""ROID (Marsden, Doebler, Yang, WACV 2024) and CMF (Lee & Chang, ICLR 2024) on CLIP, as the anchor suite
(mariodoebler/test-time-adaptation) implements them in classification/methods/roid.py and cmf.py.

Both adapt the affine parameters of the image tower's normalisation layers with one step per batch on ROID's loss:
1. the batch's logits z (reported, see 4), p = softmax(z);
2. with ROID.USE_WEIGHTING, per sample (no gradient): the diversity weight w_div = 1 - cos(p_ema, p) and the
   certainty weight w_cert = -H(p), each min-max normalised over the batch; samples with w_div below the batch's
   mean are dropped; the others weigh exp(w_div * w_cert / ROID.TEMPERATURE); then
   p_ema <- MOMENTUM_PROBS * p_ema + (1 - MOMENTUM_PROBS) * mean_batch(p);
3. loss = sum_kept weight * SLR(z) / TEST.BATCH_SIZE, SLR(z) = -sum_c p_c log(p_c / (1 - p_c) + 1e-5) with p
   clamped to [0, 0.99]; plus, with ROID.USE_CONSISTENCY, sum_kept weight * SCE(z(aug(x)), z) / TEST.BATCH_SIZE,
   SCE the symmetric cross-entropy (alpha 0.5) and aug the anchor's get_tta_transforms(padding_mode="reflect",
   cotta_augs=False), one draw per batch;
4. after the optimizer step, ROID ensembles the adapted weights with the source ones,
   theta <- MOMENTUM_SRC * theta + (1 - MOMENTUM_SRC) * theta_src; CMF instead filters them (``CMF.filter``).
   With ROID.USE_PRIOR_CORRECTION the reported logits are the step's (pre-update) logits multiplied class by
   class by the batch's smoothed prior (prior + s) / (1 + s C), prior = mean_batch(p), s = max(1/B, 1/C) / max(prior).

The source and CMF's hidden model are held as copies of the adapted parameters only (every other weight is frozen
and shared). Randomness of the augmentation comes from a generator seeded with RNG_SEED, restarted by reset().
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import TTATransforms
from methods.base import PREDICT_BEFORE_UPDATE
from methods.frames import NORM_LAYERS, NormAffineTTA
from methods.losses import softmax_entropy
from methods.registry import register_method

# The anchor's CMF scales its process noise Q by (trainable parameters) / 38400 (cmf.py, param_size_ratio).
CMF_PARAMETER_SCALE = 38400


# ---------------------------------------------------------------------- losses (anchor utils/losses.py)
def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """SoftLikelihoodRatio: -sum_c p_c log(p_c / (1 - p_c) + eps), p = softmax clamped to [0, clip]."""
    probs = logits.softmax(1).clamp(min=0.0, max=clip)
    return -(probs * torch.log((probs / (torch.ones_like(probs) - probs)) + eps)).sum(1)


def symmetric_cross_entropy(x: torch.Tensor, x_ema: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SymmetricCrossEntropy(x, x_ema), per sample, as the anchor writes it (no target is detached)."""
    return (-(1 - alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1)
            - alpha * (x.softmax(1) * x_ema.log_softmax(1)).sum(1))


# ---------------------------------------------------------------------- the consistency augmentation
# ---------------------------------------------------------------------- ROID
@register_method("roid")
class ROID(NormAffineTTA):
    config_defaults = {"ROID": {
        "USE_WEIGHTING": True,          # certainty and diversity weighting (and the sample filter)
        "USE_PRIOR_CORRECTION": True,   # report the logits multiplied by the batch's smoothed prior
        "USE_CONSISTENCY": True,        # add the consistency loss on an augmented view
        "MOMENTUM_SRC": Option(0.99, within="[0, 1]"),     # theta <- m * theta + (1 - m) * theta_src (1: none)
        "MOMENTUM_PROBS": Option(0.9, within="[0, 1]"),    # moving average of the batch's mean softmax
        "TEMPERATURE": Option(0.3333333333333333, within="(0, inf)"),   # the anchor's 1/3
    }}
    # The reported logits are the step's pre-update logits, but with ROID.USE_PRIOR_CORRECTION (the default)
    # multiplied by a prior of the whole batch: not the plain predict-then-adapt logits (docs/roid_cmf.md).
    protocol = PREDICT_BEFORE_UPDATE

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        r = cfg.ROID
        if r.USE_CONSISTENCY and not r.USE_WEIGHTING:
            raise ConfigError("ROID.USE_CONSISTENCY True needs ROID.USE_WEIGHTING True: the reference's consistency "
                              "loss uses the weighting's sample filter and weights (it fails without them)")
        if r.USE_WEIGHTING and cfg.TEST.BATCH_SIZE < 2:
            raise ConfigError(f"ROID.USE_WEIGHTING min-max normalises its weights over the batch: TEST.BATCH_SIZE "
                              f"must be at least 2, got {cfg.TEST.BATCH_SIZE}")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        r = cfg.ROID
        self.use_weighting = bool(r.USE_WEIGHTING)
        self.use_prior_correction = bool(r.USE_PRIOR_CORRECTION)
        self.use_consistency = bool(r.USE_CONSISTENCY)
        self.momentum_src = float(r.MOMENTUM_SRC)
        self.momentum_probs = float(r.MOMENTUM_PROBS)
        self.temperature = float(r.TEMPERATURE)
        self.batch_size = int(cfg.TEST.BATCH_SIZE)   # the reference divides by the configured batch size

    def setup_state(self) -> None:
        for index, p in enumerate(self.params):
            self.register_buffer(f"source_{index}", p.detach().clone())
        dtype = self.params[0].dtype
        self.register_buffer("class_probs_ema", torch.full((self.num_classes,), 1 / self.num_classes, dtype=dtype,
                                                           device=self.device))
        self.reset_extra_state()

    def reset_extra_state(self) -> None:
        self.augment = TTATransforms(self.cfg.RNG_SEED, padding_mode="reflect", cotta_augs=False)

    def source_params(self) -> list[torch.Tensor]:
        return [getattr(self, f"source_{i}") for i in range(len(self.params))]

    def cost_info(self) -> dict:
        return {"forward_passes_per_batch": 2 if self.use_consistency else 1, "backward_passes_per_batch": 1}

    # ------------------------------------------------------------------ the step
    def sample_weights(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ROID's weights and filter mask (True: dropped) of a batch's logits; moves the probability average."""
        with torch.no_grad():
            probs = outputs.softmax(1)
            weights_div = 1 - F.cosine_similarity(self.class_probs_ema.unsqueeze(dim=0), probs, dim=1)
            weights_div = (weights_div - weights_div.min()) / (weights_div.max() - weights_div.min())
            mask = weights_div < weights_div.mean()
            weights_cert = -softmax_entropy(outputs)
            weights_cert = (weights_cert - weights_cert.min()) / (weights_cert.max() - weights_cert.min())
            weights = torch.exp(weights_div * weights_cert / self.temperature)
            weights[mask] = 0.0
            m = self.momentum_probs
            self.class_probs_ema.copy_(m * self.class_probs_ema + (1 - m) * outputs.softmax(1).mean(0))
        return weights, mask

    def loss_calculation(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(images)
        if self.use_weighting:
            weights, mask = self.sample_weights(outputs)
        loss_out = soft_likelihood_ratio(outputs)
        if self.use_weighting:
            loss_out = (loss_out * weights)[~mask]
        loss = loss_out.sum() / self.batch_size
        if self.use_consistency:   # check_setup: only with the weighting
            outputs_aug = self.model(self.augment(images[~mask]))
            consistency = symmetric_cross_entropy(outputs_aug, outputs[~mask]) * weights[~mask]
            loss = loss + consistency.sum() / self.batch_size
        return outputs, loss

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            outputs, loss = self.loss_calculation(x)
        self.optimizer_step(loss)
        with torch.no_grad():
            self.update_after_step()
            outputs = outputs.detach()
            if self.use_prior_correction:
                prior = outputs.softmax(1).mean(0)
                smooth = max(1 / outputs.shape[0], 1 / outputs.shape[1]) / torch.max(prior)
                smoothed_prior = (prior + smooth) / (1 + smooth * outputs.shape[1])
                outputs = outputs * smoothed_prior
        return outputs.float()

    def update_after_step(self) -> None:
        """ROID's weight ensembling with the source (ema_update_model; skipped at momentum 1, as there)."""
        m = self.momentum_src
        if m < 1.0:
            for p, source in zip(self.params, self.source_params()):
                p.copy_(m * p + (1 - m) * source)


# ---------------------------------------------------------------------- CMF
@register_method("cmf")
class CMF(ROID):
    """ROID's loss and prior correction (ROID.* keys except MOMENTUM_SRC, which CMF's code does not read), with
    ROID's weight ensembling replaced by continual momentum filtering (cmf.py ``bayesian_filtering``)."""
    config_defaults = {"CMF": {
        "ALPHA": Option(0.99, within="[0, 1]"),   # hidden <- ALPHA * hidden + (1 - ALPHA) * source (predict step)
        "GAMMA": Option(0.99, within="[0, 1]"),   # theta <- GAMMA * theta + (1 - GAMMA) * hidden (ensemble step)
        "Q": Option(0.005, within="[0, 1)"),      # process noise, scaled by (trainable parameters) / 38400
        # "op" ensembles with the predicted (recovered) model, "lp" with the updated one; in the anchor's code the
        # predict step updates the hidden model in place, so both use the updated hidden model (docs/roid_cmf.md).
        "TYPE": Option("lp", choices=("lp", "op")),
    }}

    @classmethod
    def config_warnings(cls, cfg) -> list[str]:
        if cfg.CMF.TYPE == "op":
            return ["CMF.TYPE op computes what lp computes, as in the anchor's cmf.py (its recovered model is the "
                    "hidden model, updated in place)"]
        return []

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.alpha = float(cfg.CMF.ALPHA)
        self.gamma = float(cfg.CMF.GAMMA)
        self.q_base = float(cfg.CMF.Q)

    def anchor_trainable_count(self) -> int:
        """The anchor's num_trainable_params: the affine entries of every normalisation layer of its ZeroShotCLIP
        once ``transformer`` (the text transformer) is removed: the image tower's plus ln_final's, which it
        collects but never moves (the text features are computed once)."""
        return sum(p.numel() for name, m in self.model.clip.named_modules()
                   if isinstance(m, NORM_LAYERS) and not name.startswith("transformer.")
                   for pname, p in m.named_parameters(recurse=False) if pname in ("weight", "bias"))

    def setup_state(self) -> None:
        super().setup_state()
        for index, p in enumerate(self.params):
            self.register_buffer(f"hidden_{index}", p.detach().clone())
        self.q = self.q_base * (self.anchor_trainable_count() / CMF_PARAMETER_SCALE)

    def reset_extra_state(self) -> None:
        super().reset_extra_state()
        self.hidden_var = 0.0     # the reference's reset() keeps it (docs/roid_cmf.md); restored here
        self.beta = None

    def hidden_params(self) -> list[torch.Tensor]:
        return [getattr(self, f"hidden_{i}") for i in range(len(self.params))]

    def update_after_step(self) -> None:
        """Kalman-style filtering of the adapted weights (predict, update, ensemble), in python floats as there."""
        hidden = self.hidden_params()
        if self.alpha < 1.0:   # 1. predict: the hidden model drifts back towards the source
            for h, source in zip(hidden, self.source_params()):
                h.copy_(self.alpha * h + (1 - self.alpha) * source)
        self.hidden_var = self.alpha ** 2 * self.hidden_var + self.q
        r = 1 - self.q
        beta = r / (self.hidden_var + r)
        beta = beta if beta > 0.89 else 0.89
        self.beta = beta if beta < 0.9999 else 1.0
        self.hidden_var = self.beta * self.hidden_var
        if self.beta < 1.0:    # 2. update: the hidden model moves towards the adapted one
            for h, p in zip(hidden, self.params):
                h.copy_(self.beta * h + (1 - self.beta) * p)
        if self.gamma < 1.0:   # 3. ensemble: the adapted model moves towards the hidden one
            for p, h in zip(self.params, hidden):
                p.copy_(self.gamma * p + (1 - self.gamma) * h)
