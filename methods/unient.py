"""UniEnt (Gao et al., CVPR 2024, "Unified Entropy Optimization for Open-Set Test-Time Adaptation") as CLIPTTA's
library implements it on CLIP (MarcLafon/cliptta: ttavlm/methods/unient.py on AbstractOpenSetTTAModel).

Per test batch, OPTIM.STEPS (scripts: 10) Adam steps on the affine parameters of the image tower's normalisation
layers (text features computed once), then the batch is classified by the adapted model (adapt, then predict).
One step, with cos the (B, C) cosines of the current model and s = LOGIT_SCALE:
- m_i = max softmax(s cos_i); u_i = 1 - (m_i - min m) / (max m - min m), in float32 as the code;
- a two-component 1-D Gaussian mixture fitted on u (sklearn's GaussianMixture EM, ``fit_two_gaussians``); w_i the
  posterior of the component of lower mean (the ID one), w'_i the other's (swapped by ``1 - weight``, as the code);
- L = BETA_TTA * mean_i(w_i H_i) - BETA_REG * H(mean_i p_i) [- BETA_OOD * mean_i(w'_i H_i) with USE_OOD_LOSS],
  H_i the entropy of softmax(s cos_i + ENTROPY_EPS) and H(mean p) the code's softmax_mean_entropy.
WEIGHTING "hard" is the official code's UniEnt (its --criterion ent_ind_ood): the mixture's hard assignment, the
ID entropies averaged over the ID images only and the OOD ones over the OOD images. The memory branch and the
--use_cliptta_loss / --use_clipartt_loss ablations are not implemented (no key asks for them; docs/unient.md).

The one deliberate difference: sklearn initialises the mixture from a k-means++ + Lloyd run drawn from numpy's
global RNG; here the responsibilities start from the optimal split of the sorted values into two groups (the
global optimum k-means looks for, the Otsu split of the values), so that a run is deterministic. The rest of the
EM (reg_covar 1e-6, tol 1e-3, max_iter 100, the lower-bound test, the final E-step) is sklearn's, in the scores'
dtype (float32, as the code hands sklearn a float32 array), with numpy's operations in sklearn's order."""
from __future__ import annotations

import math

import numpy as np
import torch

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import NormAffineTTA
from methods.losses import mean_prediction_entropy, softmax_entropy
from methods.ood_scores import SCORE_TYPES, cliptta_ood_scores
from methods.registry import register_method

WEIGHTINGS = ("soft", "hard")
# sklearn.mixture.GaussianMixture's defaults, which the code leaves unchanged.
GMM_REG_COVAR = 1e-6
GMM_TOL = 1e-3
GMM_MAX_ITER = 100


def two_means_labels(values: np.ndarray) -> np.ndarray:
    """0/1 labels of 1-D ``values`` (at least two distinct): the split of the sorted values into a lower and an
    upper group of least within-group sum of squares, cut only between distinct values (ties: the lowest cut)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order].astype(np.float64)
    n = len(ordered)
    prefix, prefix_sq = np.concatenate([[0.0], ordered.cumsum()]), np.concatenate([[0.0], (ordered ** 2).cumsum()])
    left = np.arange(1, n, dtype=np.float64)                     # size of the lower group per cut
    sse = (prefix_sq[1:n] - prefix[1:n] ** 2 / left
           + (prefix_sq[n] - prefix_sq[1:n]) - (prefix[n] - prefix[1:n]) ** 2 / (n - left))
    sse[ordered[1:] == ordered[:-1]] = np.inf                    # equal values stay together
    labels = np.ones(n, dtype=np.int64)
    labels[order[:int(np.argmin(sse)) + 1]] = 0
    return labels


# The EM below is sklearn's (1.9) GaussianMixture code for one feature and "full" covariances, written with the same
# numpy operations in the same order, so that it gives sklearn's numbers in float32 as in float64.
def gaussian_parameters(x: np.ndarray, resp: np.ndarray, reg_covar: float):
    """_estimate_gaussian_parameters: (nk, means, variances) of x (N, 1)."""
    nk = resp.sum(axis=0) + 10 * np.finfo(resp.dtype).eps
    means = (resp.T @ x) / nk[:, np.newaxis]
    variances = np.empty((2, 1, 1), dtype=x.dtype)
    for k in range(2):
        diff = x - means[k, :]
        variances[k] = ((resp[:, k] * diff.T) @ diff) / nk[k]
        variances[k].flat[::2] += reg_covar
    return nk, means, variances


def precision_cholesky(variances: np.ndarray) -> np.ndarray:
    """_compute_precision_cholesky for 1 x 1 matrices: the inverse of the Cholesky factor sqrt(variance)."""
    return (1.0 / np.sqrt(variances)).astype(variances.dtype)


def log_responsibilities(x, weights, means, precision_chol):
    """_estimate_log_prob_resp: (log p(x_i), log responsibilities (N, 2))."""
    log_prob = np.empty((len(x), 2), dtype=x.dtype)
    for k in range(2):
        y = (x @ precision_chol[k]) - (means[k, :] @ precision_chol[k])
        log_prob[:, k] = np.sum(np.square(y), axis=1)
    log_det = np.log(precision_chol.reshape(2, -1)[:, ::2]).sum(axis=1)
    weighted = -0.5 * (math.log(2 * math.pi) + log_prob) + log_det + np.log(weights)
    log_norm = logsumexp_rows(weighted)
    with np.errstate(under="ignore"):
        return log_norm, weighted - log_norm[:, np.newaxis]


def logsumexp_rows(array: np.ndarray) -> np.ndarray:
    """sklearn's _logsumexp over axis 1: log1p of the sum of the other terms over the count of maxima."""
    array_max = array.max(axis=1, keepdims=True)
    index_max = array == array_max
    rest = array.copy()
    rest[index_max] = -np.inf
    m = index_max.astype(array.dtype).sum(axis=1, keepdims=True, dtype=array.dtype)
    s = np.exp(rest - np.where(np.isfinite(array_max), array_max, 0)).sum(axis=1, keepdims=True, dtype=array.dtype)
    s = np.where(s == 0, s, s / m)
    return (np.log1p(s) + np.log(m) + array_max)[:, 0]


def fit_two_gaussians(x: np.ndarray, weights: np.ndarray, means: np.ndarray, precision_chol: np.ndarray,
                      reg_covar: float = GMM_REG_COVAR, tol: float = GMM_TOL, max_iter: int = GMM_MAX_ITER):
    """GaussianMixture(n_components=2).fit(x) from the given initial weights (2,), means (2, 1) and precision
    Cholesky factors (2, 1, 1), then predict_proba(x): (responsibilities (N, 2), means (2, 1), converged)."""
    lower_bound, converged = -np.inf, False
    for _ in range(max_iter):
        previous = lower_bound
        log_norm, log_resp = log_responsibilities(x, weights, means, precision_chol)
        weights, means, variances = gaussian_parameters(x, np.exp(log_resp), reg_covar)
        weights /= weights.sum()
        precision_chol = precision_cholesky(variances)
        lower_bound = np.mean(log_norm)
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    return np.exp(log_responsibilities(x, weights, means, precision_chol)[1]), means, converged


def initial_gaussians(x: np.ndarray, reg_covar: float = GMM_REG_COVAR):
    """_initialize from one-hot responsibilities, here those of ``two_means_labels``: (weights, means, precision
    Cholesky factors)."""
    resp = np.zeros((len(x), 2), dtype=x.dtype)
    resp[np.arange(len(x)), two_means_labels(x[:, 0])] = 1
    nk, means, variances = gaussian_parameters(x, resp, reg_covar)
    return nk / len(x), means, precision_cholesky(variances)


def id_weights(max_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ID weight, OOD weight) of each image from its max softmax probability, as the code: the mixture on
    1 - min-max-normalised scores, the posterior of the lower-mean component, the other as 1 - it. A batch whose
    scores are all equal (one image, or ties; the code's sklearn call raises there) counts every image as ID."""
    low, high = max_probs.min(), max_probs.max()
    if not bool(high > low):
        return torch.ones_like(max_probs), torch.zeros_like(max_probs)
    ood = 1 - ((max_probs - low) / (high - low)).cpu().numpy().reshape(-1, 1)    # float32, as the code's
    resp, means, _ = fit_two_gaussians(ood, *initial_gaussians(ood))
    resp = resp if means[0, 0] < means[1, 0] else 1 - resp     # the code: 1 - weight, not a column swap
    return (torch.from_numpy(np.ascontiguousarray(resp[:, 0])).to(max_probs.device),
            torch.from_numpy(np.ascontiguousarray(resp[:, 1])).to(max_probs.device))


@register_method("unient")
class UniEnt(NormAffineTTA):
    protocol = ADAPT_THEN_PREDICT
    own_ood_score = "cliptta_get_scores"
    config_defaults = {"UNIENT": {
        "BETA_TTA": Option(1.0, within="[0, inf)"),      # weight of the ID entropy (scripts: 1.0)
        "BETA_REG": Option(1.0, within="[0, inf)"),      # weight of -H(mean p) (scripts: 1.0; code default 0.1)
        # The OOD entropy-maximisation term: off in CLIPTTA's scripts (no --use_ood_loss), on in the official.
        "USE_OOD_LOSS": Option(False, choices=(False, True)),
        "BETA_OOD": Option(0.1, within="[0, inf)"),      # its weight (configuration.py --beta_ood 0.1)
        # "soft": posterior weights (CLIPTTA's code; the official UniEnt+); "hard": the official UniEnt.
        "WEIGHTING": Option("soft", choices=WEIGHTINGS),
        # Added to the logits inside both entropies and to p inside log(p) of H(mean p): CLIPTTA's lib 1e-6;
        # the official code 0.
        "ENTROPY_EPS": Option(1e-6, within="[0, inf)"),
        "LOGIT_SCALE": Option(100.0, within="(0, inf)"),          # the code's logit_scale
        "SCORE_TYPE": Option("max_prob", choices=SCORE_TYPES),    # own OOD score: get_scores' score_type
        "OOD_LOGIT_SCALE": Option(1.0, within="(0, inf)"),        # get_scores' ood_logit_scale
        "ADAM_EPS": Option(1e-6, within="(0, inf)"),              # abstract_model.setup_optimizer's eps
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)   # the text tower must stay frozen
        if cfg.CLIP.PRECISION != "fp32":
            raise ConfigError(f"unient trains normalisation parameters and needs fp32 weights: set CLIP.PRECISION "
                              f"fp32 (got {cfg.CLIP.PRECISION}); MIXED_PRECISION True gives fp16 compute on CUDA")
        if cfg.TEST.BATCH_SIZE < 2:
            raise ConfigError(f"unient fits a two-component mixture on each batch's scores: TEST.BATCH_SIZE must "
                              f"be at least 2 (got {cfg.TEST.BATCH_SIZE})")

    def __init__(self, cfg, model, num_classes: int):
        super().__init__(cfg, model, num_classes)
        node = cfg.UNIENT
        self.beta_tta, self.beta_reg, self.beta_ood = float(node.BETA_TTA), float(node.BETA_REG), float(node.BETA_OOD)
        self.use_ood_loss, self.weighting = bool(node.USE_OOD_LOSS), node.WEIGHTING
        self.entropy_eps, self.logit_scale = float(node.ENTROPY_EPS), float(node.LOGIT_SCALE)
        self.score_type, self.ood_logit_scale = node.SCORE_TYPE, float(node.OOD_LOGIT_SCALE)
        self.adam_eps = float(node.ADAM_EPS)        # the optimizer (base class) reads it
        self.last_cosines: torch.Tensor | None = None
        self.last_id_weights: torch.Tensor | None = None

    def cost_info(self) -> dict:
        """Per test batch: OPTIM.STEPS forward + backward passes, then one forward pass to predict."""
        return {"views_per_image": 1, "steps_per_batch": self.steps, "forward_passes_per_batch": self.steps + 1,
                "backward_passes_per_batch": self.steps}

    def reset_extra_state(self) -> None:
        self.last_cosines = None
        self.last_id_weights = None

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            pre = self.model.encode_image(x).float()
        # written as the code's get_features (F.normalize rounds the gradient differently)
        return (pre / pre.norm(dim=-1, keepdim=True)) @ self.model.text_features()[0].float().t()

    def step_loss(self, cosines: torch.Tensor) -> torch.Tensor:
        """The code's loss of one step from the batch's cosines (gradient through the entropies only)."""
        max_probs = (self.logit_scale * cosines.detach()).softmax(dim=1).max(dim=1).values
        weight_id, weight_ood = id_weights(max_probs)
        self.last_id_weights = weight_id
        # logit_scale * cosines formed once per term, as the code (the gradients then add up in its order)
        entropies = softmax_entropy(self.logit_scale * cosines + self.entropy_eps)
        if self.weighting == "soft":
            loss_id, loss_ood = (entropies * weight_id).mean(0), (entropies * weight_ood).mean(0)
        else:   # the official UniEnt: hard assignment, each set averaged over its own images (none: 0)
            is_id = weight_id > weight_ood
            loss_id = entropies[is_id].mean(0) if is_id.any() else entropies.sum() * 0
            loss_ood = entropies[~is_id].mean(0) if (~is_id).any() else entropies.sum() * 0
        loss_reg = mean_prediction_entropy(self.logit_scale * cosines + self.entropy_eps, eps=self.entropy_eps)
        loss = self.beta_tta * loss_id - self.beta_reg * loss_reg
        return loss - self.beta_ood * loss_ood if self.use_ood_loss else loss

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> None:
        self.optimizer_step(self.step_loss(self.cosines(x)))

    @torch.no_grad()
    def episode_logits(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """The batch classified by the adapted model: LOGIT_SCALE * cos (the code's softmax(100 * cos))."""
        self.last_cosines = self.cosines(x)
        return self.logit_scale * self.last_cosines

    def ood_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The code's get_scores on the adapted model's cosines of the batch just reported (SCORE_TYPE,
        OOD_LOGIT_SCALE); higher = more in-distribution."""
        return cliptta_ood_scores(self.last_cosines, self.score_type, self.ood_logit_scale)
