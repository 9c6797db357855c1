"""StatA (Zanella, Fuchs, De Vleeschouwer, Ben Ayed, CVPR 2025, "Realistic Test-Time Adaptation of
Vision-Language Models"; code MaxZanella/StatA, solvers/StatA.py).

Training-free and transductive: nothing in CLIP changes and no gradient is taken. Each test batch is
solved on its own (the reference calls its solver once per batch, without memory). In CLIP's normalised
embedding space every class c is a Gaussian with mean mu_c and diagonal variance var_c; soft assignments
z (N x C) are found by block-coordinate descent, starting from the zero-shot probabilities y_hat:

  z    <- softmax_c( lambda_y * log y_hat + (loglik + lap * (W z + W^T z) - 0.5 sum_d log var_c) / 50 )
          (Z_ITERATIONS inner steps; loglik_ic = -0.5 sum_d (x_id - mu_cd)^2 / var_cd; W = kNN cosine
          affinities, lap = LAMBDA_LAPLACIAN * 50 / (2 k))
  beta_c = n_c / (ALPHA + n_c)          (n_c = hard count of argmax z == c, or sum_i z_ic with SOFT_BETA)
  mu_c <- normalise(beta_c * normalise(weighted mean of x by z_c) + (1 - beta_c) * t_c)
  var_c <- beta_c * (weighted variance around mu_c) + (1 - beta_c) * (var_0 + (t_c - mu_c)^2)

The statistical anchor is the text side: t_c (text feature of class c) and var_0 (the zero-shot-weighted
spread of the batch around the text features). A class that no image chooses (beta_c = 0) stays exactly
at its anchor, which is what keeps a batch holding few classes, or a single one, well posed. MAX_ITERATIONS
outer rounds of (z, beta, mu, var) are followed by a last z update; the prediction is argmax z.

Numerical choices (identical values wherever the reference's arithmetic is finite): the z update is
computed in the log domain, and class sums of z are clamped away from 0 before dividing; the reference
produces NaN when a class's assignments underflow to exactly 0 (e.g. a batch of near-identical images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf.options import Option
from methods.base import TRAINING_FREE, TTAMethod
from methods.registry import register_method

# The reference's fixed temperature of the z update (``exp(1/50 * ...)``, Laplacian weight ``50 / (2 k)``).
Z_TEMPERATURE = 50.0


def knn_affinity(features: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """Dense (N, N) W: W[i, j] = cos(x_i, x_j) for the n_neighbors nearest j != i of each i, else 0
    (the reference's sparse matrix, which drops each row's top-1, i.e. the sample itself)."""
    n = features.shape[0]
    k = min(n_neighbors, n - 1)
    affinity = features @ features.t()
    weights = torch.zeros_like(affinity)
    if k < 1:
        return weights
    others = affinity.masked_fill(torch.eye(n, dtype=torch.bool, device=features.device), float("-inf"))
    index = others.topk(k, dim=1).indices
    return weights.scatter_(1, index, affinity.gather(1, index))


def initial_variance(features: torch.Tensor, prototypes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """var_0 (D,): (1/N) sum_i sum_c z_ic (x_i - t_c)^2, shared by all classes at the start."""
    squared = (features[:, None, :] - prototypes[None, :, :]) ** 2          # (N, C, D)
    return torch.einsum("ic,icd->d", z, squared) / features.shape[0]


def gaussian_log_likelihoods(features: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """(N, C): -0.5 sum_d (x_id - mu_cd)^2 / var_cd (the reference's Gaussian without the normaliser)."""
    return -0.5 * (((features[:, None, :] - means[None]) ** 2) / variances[None]).sum(dim=2)


def update_assignments(log_likelihoods: torch.Tensor, log_y_hat: torch.Tensor, z: torch.Tensor,
                       affinity: torch.Tensor, variances: torch.Tensor, lambda_y_hat: float,
                       lambda_laplacian: float, n_neighbors: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` z updates (the Laplacian term uses the latest z); returns (z, log z)."""
    k = min(n_neighbors, affinity.shape[0] - 1)
    fixed = log_likelihoods - 0.5 * variances.log().sum(dim=1)[None]
    log_z = z.log()
    for _ in range(iterations):
        energy = fixed
        if k >= 1:
            energy = energy + lambda_laplacian * (Z_TEMPERATURE / (2 * k)) * (affinity.t() @ z + affinity @ z)
        log_z = (lambda_y_hat * log_y_hat + energy / Z_TEMPERATURE).log_softmax(dim=1)
        z = log_z.exp()
    return z, log_z


def update_beta(z: torch.Tensor, alpha: float, soft: bool) -> torch.Tensor:
    """beta_c = n_c / (alpha + n_c): how much class c trusts the batch over its text anchor."""
    if soft:
        counts = z.sum(dim=0)
    else:
        counts = torch.bincount(z.argmax(dim=1), minlength=z.shape[1]).to(z.dtype)
    return counts / (alpha + counts + 1e-12)


def _class_mass(z: torch.Tensor) -> torch.Tensor:
    return z.sum(dim=0).clamp_min(torch.finfo(z.dtype).tiny)


def update_means(features: torch.Tensor, z: torch.Tensor, beta: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    batch_means = F.normalize((z.t() @ features) / _class_mass(z)[:, None], dim=-1)
    return F.normalize(beta[:, None] * batch_means + (1 - beta[:, None]) * prototypes, dim=-1)


def update_variances(features: torch.Tensor, z: torch.Tensor, beta: torch.Tensor, means: torch.Tensor,
                     prototypes: torch.Tensor, variance_0: torch.Tensor) -> torch.Tensor:
    """Uses the just-updated means, as the reference does."""
    spread = torch.einsum("ic,icd->cd", z, (features[:, None, :] - means[None]) ** 2) / _class_mass(z)[:, None]
    anchor = variance_0[None] + (prototypes - means) ** 2
    return beta[:, None] * spread + (1 - beta[:, None]) * anchor


@torch.no_grad()
def stata_solve(features: torch.Tensor, prototypes: torch.Tensor, zs_logit_scale: float = 100.0, alpha: float = 1.0,
                soft_beta: bool = False, lambda_y_hat: float = 1.0, lambda_laplacian: float = 1.0,
                n_neighbors: int = 3, max_iterations: int = 10, z_iterations: int = 5) -> torch.Tensor:
    """Log soft assignments log z (N, C) for normalised image features (N, D) and text prototypes (C, D)."""
    features, prototypes = features.float(), prototypes.float()
    log_y_hat = (zs_logit_scale * features @ prototypes.t()).log_softmax(dim=1)
    z = log_y_hat.exp()
    means = prototypes.clone()
    variance_0 = initial_variance(features, prototypes, z)
    variances = variance_0[None].expand_as(prototypes).clone()
    affinity = knn_affinity(features, n_neighbors)
    for k in range(max_iterations + 1):
        log_likelihoods = gaussian_log_likelihoods(features, means, variances)
        z, log_z = update_assignments(log_likelihoods, log_y_hat, z, affinity, variances, lambda_y_hat,
                                      lambda_laplacian, n_neighbors, z_iterations)
        if k == max_iterations:
            break
        beta = update_beta(z, alpha, soft_beta)
        means = update_means(features, z, beta, prototypes)
        variances = update_variances(features, z, beta, means, prototypes, variance_0)
    return log_z


@register_method("stata")
class StatA(TTAMethod):
    protocol = TRAINING_FREE
    config_defaults = {
        "STATA": {
            # Anchor weight alpha in beta_c = n_c / (alpha + n_c) (reference --alpha, 1 in all experiments).
            "ALPHA": Option(1.0, within="[0, inf)"),
            # beta from soft class masses instead of hard counts (reference --soft_beta, off).
            "SOFT_BETA": False,
            # Exponent of the zero-shot prior y_hat in the z update (fixed 1 in the reference).
            "LAMBDA_Y_HAT": 1.0,
            # Weight of the kNN Laplacian term (reference --lambda_laplacian, 1).
            "LAMBDA_LAPLACIAN": 1.0,
            # Neighbours per sample in the affinity graph (fixed 3 in the reference).
            "N_NEIGHBORS": Option(3, within="[0, inf)"),
            # Outer block-coordinate rounds (reference max_iter 10), each followed by the last z update.
            "MAX_ITERATIONS": Option(10, within="[0, inf)"),
            # Inner z updates per round (reference update_z max_iter 5).
            "Z_ITERATIONS": Option(5, within="[1, inf)"),
            # Scale of the zero-shot logits giving y_hat (hard-coded 100 in the reference = CLIP's learned
            # scale for OpenAI weights).
            "ZS_LOGIT_SCALE": Option(100.0, within="(0, inf)"),
        }
    }

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        s = cfg.STATA
        self.solver_args = dict(zs_logit_scale=float(s.ZS_LOGIT_SCALE), alpha=float(s.ALPHA),
                                soft_beta=bool(s.SOFT_BETA), lambda_y_hat=float(s.LAMBDA_Y_HAT),
                                lambda_laplacian=float(s.LAMBDA_LAPLACIAN), n_neighbors=int(s.N_NEIGHBORS),
                                max_iterations=int(s.MAX_ITERATIONS), z_iterations=int(s.Z_ITERATIONS))
        # Cost per test batch, for the results' provenance: one image forward, no backward.
        self.views_per_image = 1
        self.forward_passes_per_batch = 1
        self.backward_passes_per_batch = 0

    def cost_info(self) -> dict:
        return {"views_per_image": self.views_per_image, "forward_passes_per_batch": self.forward_passes_per_batch,
                "backward_passes_per_batch": self.backward_passes_per_batch}

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model(x, return_features=True)
        # log z: finite, and its argmax is StatA's prediction.
        return stata_solve(out.image_features, out.text_features, **self.solver_args)

