"""LAME (Boudiaf, Mueller, Ben Ayed, Bertinetto, CVPR 2022, "Parameter-free Online Test-time Adaptation").

Training-free and transductive over the batch: nothing in CLIP changes. For a batch of N images with CLIP
probabilities p (N, K) and L2-normalised image features x (N, D), LAME finds soft assignments Y minimising
the Laplacian-regularised energy

  E(Y) = sum_ik [ -Y_ik log p_ik - Y_ik (W Y)_ik + Y_ik log Y_ik ]

by the bound-optimisation fixed point  Y <- softmax_k( log(p + 1e-10) + (W Y) )  started from
Y = softmax(log(p + 1e-10)), at most 100 rounds, stopped once |E - E_prev| <= 1e-8 |E_prev| (after round 3).
W (N, N) is the affinity of the features: kNN (1 for each of the KNN nearest others), rbf
(exp(-|x_i - x_j|^2 / (2 s^2)), s = the batch mean of every point's KNN-th smallest distance, itself included),
or linear (x x^T); FORCE_SYMMETRY replaces W by (W + W^T) / 2.

Equal to the anchor suite's classification/methods/lame.py (forward_and_adapt, kNN_affinity, rbf_affinity,
linear_affinity, laplacian_optimization, entropy_energy); LAME.UNARY_LOGITS cosine gives CLIPTTA's
ttavlm/methods/lame.py instead (its unary from the cosine similarities, without CLIP's logit scale). The
reported logits are log Y of the last round: softmax gives the reference's Y, argmax its prediction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf import Option
from methods.base import TRAINING_FREE, TTAMethod
from methods.registry import register_method

# The reference's fixed weight of the Laplacian term and its iteration budget (laplacian_optimization's defaults).
BOUND_LAMBDA = 1.0
MAX_STEPS = 100
# The relative energy change that stops the iterations (laplacian_optimization).
CONVERGENCE_TOLERANCE = 1e-8
AFFINITIES = ("kNN", "rbf", "linear")
UNARY_LOGITS = ("model", "cosine")


def knn_affinity(features: torch.Tensor, knn: int) -> torch.Tensor:
    """W[i, j] = 1 for the knn nearest j of i (Euclidean; the nearest, i itself, dropped), else 0."""
    n = features.shape[0]
    distances = torch.norm(features.unsqueeze(0) - features.unsqueeze(1), dim=-1, p=2)
    neighbours = distances.topk(min(knn + 1, n), -1, largest=False).indices[:, 1:]
    weights = torch.zeros(n, n, device=features.device, dtype=features.dtype)
    return weights.scatter_(-1, neighbours, 1.0)


def rbf_affinity(features: torch.Tensor, knn: int) -> torch.Tensor:
    """exp(-d^2 / (2 s^2)), s the mean over the batch of each point's knn-th smallest distance (itself counted).

    Where the reference divides 0 by 0 (s = 0: a batch of one image, or of identical ones) its kernel is NaN;
    ours is then the kernel's limit s -> 0+: 1 where the distance is 0, else 0."""
    n = features.shape[0]
    distances = torch.norm(features.unsqueeze(0) - features.unsqueeze(1), dim=-1, p=2)
    kth_distance = distances.topk(k=min(knn, n), dim=-1, largest=False).values[:, -1]
    sigma = kth_distance.mean()
    if sigma == 0:
        return (distances == 0).to(features.dtype)
    return torch.exp(-distances ** 2 / (2 * sigma ** 2))


def linear_affinity(features: torch.Tensor) -> torch.Tensor:
    return features @ features.t()


def affinity_matrix(features: torch.Tensor, affinity: str, knn: int, force_symmetry: bool) -> torch.Tensor:
    if affinity == "kNN":
        kernel = knn_affinity(features, knn)
    elif affinity == "rbf":
        kernel = rbf_affinity(features, knn)
    else:
        kernel = linear_affinity(features)
    return 0.5 * (kernel + kernel.t()) if force_symmetry else kernel


def entropy_energy(assignments, unary, pairwise, bound_lambda: float) -> torch.Tensor:
    return (unary * assignments - bound_lambda * pairwise * assignments
            + assignments * torch.log(assignments.clip(1e-20))).sum()


def laplacian_optimization(unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = BOUND_LAMBDA,
                           max_steps: int = MAX_STEPS) -> torch.Tensor:
    """log Y (N, K) of the last round of the reference's fixed point (its Y is the softmax of the same exponent;
    the log is taken from the exponent so that it stays finite where Y underflows)."""
    previous_energy = float("inf")
    assignments = (-unary).softmax(-1)
    exponent = -unary
    for i in range(max_steps):
        pairwise = bound_lambda * kernel.matmul(assignments)
        exponent = -unary + pairwise
        assignments = exponent.softmax(-1)
        energy = entropy_energy(assignments, unary, pairwise, bound_lambda).item()
        if i > 1 and abs(energy - previous_energy) <= CONVERGENCE_TOLERANCE * abs(previous_energy):
            break
        previous_energy = energy
    return exponent.log_softmax(-1)


@register_method("lame")
class LAME(TTAMethod):
    protocol = TRAINING_FREE
    config_defaults = {"LAME": {
        # The anchor suite's keys and defaults (conf.py).
        # Affinity of the batch's features: kNN, rbf or linear (the anchor's default rbf; CLIPTTA's knn).
        "AFFINITY": Option("rbf", choices=AFFINITIES),
        # Neighbours of kNN; for rbf, which neighbour's distance sets the bandwidth (CLIPTTA: fixed 5).
        "KNN": Option(5, within="[1, inf)"),
        # Declared by the anchor suite and read by no affinity there (rbf sets its bandwidth from KNN).
        "SIGMA": Option(1.0, within="(0, inf)"),
        # W <- (W + W^T) / 2 before the optimisation (CLIPTTA: never).
        "FORCE_SYMMETRY": False,
        # The choice between the two references: the unary -log p from the model's logits (the anchor suite's
        # ZeroShotCLIP, logit_scale * cos) or from the cosine similarities themselves (CLIPTTA's get_logits).
        "UNARY_LOGITS": Option("model", choices=UNARY_LOGITS),
    }}

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        s = cfg.LAME
        self.affinity = str(s.AFFINITY)
        self.knn = int(s.KNN)
        self.force_symmetry = bool(s.FORCE_SYMMETRY)
        self.unary_logits = str(s.UNARY_LOGITS)

    @classmethod
    def config_warnings(cls, cfg) -> list[str]:
        if cfg.LAME.SIGMA != 1.0:
            return [f"LAME.SIGMA={cfg.LAME.SIGMA} has no effect, as in the anchor suite: rbf's bandwidth is the "
                    f"mean LAME.KNN-th neighbour distance"]
        return []

    def cost_info(self) -> dict:
        return {"views_per_image": 1, "forward_passes_per_batch": 1, "backward_passes_per_batch": 0}

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        # The whole step under autocast when MIXED_PRECISION is on, as the anchor's forward_decorator.
        with self.autocast():
            out = self.model(x, return_features=True)
            if self.unary_logits == "model":
                logits = out.logits
            else:
                logits = out.image_features @ out.text_features.t().to(out.image_features.dtype)
            unary = -torch.log(logits.softmax(dim=1) + 1e-10)
            features = F.normalize(out.image_pre_features, p=2, dim=-1)
            kernel = affinity_matrix(features, self.affinity, self.knn, self.force_symmetry)
            log_assignments = laplacian_optimization(unary, kernel.to(unary.dtype))
        # fp16 only under autocast; fp32 and fp64 runs keep their dtype.
        return log_assignments.float() if log_assignments.dtype == torch.float16 else log_assignments
