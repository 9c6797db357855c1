"""Loss kernels the methods share or that stand on their own: pure functions of tensors, no method state.

A method's own composite loss stays beside its class (``batclip_loss`` in methods/batclip.py, CLIPTTA's
``contrastive_loss``, WATT's ``watt_loss``, DPE's ``alignment_loss``); what a second method may use lives here.
"""
from __future__ import annotations

import math

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the average of softmax(logits) over dim 0, as TPT's ``avg_entropy`` computes it (TDA's and DPE's
    code carry the same function): log-probabilities written ``x - logsumexp(x)`` (not ``log_softmax``: the same
    value, but another rounding of its gradient, which decides the update where the softmax is nearly one-hot),
    log mean_i p_i = logsumexp_i log p_i - log N, clamped as the reference does to avoid 0 * -inf."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    log_mean = log_probs.logsumexp(dim=0) - math.log(logits.shape[0])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean * torch.exp(log_mean)).sum(dim=-1)


def mean_prediction_entropy(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Entropy of the batch's mean softmax, -sum_c p_c log(p_c + eps) (CLIPTTA's softmax_mean_entropy; the eps
    inside the log is why ``marginal_entropy`` is not the same)."""
    mean = logits.softmax(1).mean(0)
    return -(mean * torch.log(mean + eps)).sum()


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of softmax(student_logits) against the soft targets softmax(teacher_logits)."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


def generalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, q: float) -> torch.Tensor:
    """Per-sample GCE (Zhang & Sabuncu, 2018): (1 - softmax(logits)[target] ** q) / q."""
    p_target = logits.softmax(1).gather(1, targets[:, None]).squeeze(1)
    return (1.0 - p_target ** q) / q


def clipartt_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                  temperature: float, target_normalization: str = "column", detach_targets: bool = False,
                  target_similarity: str = "image_text") -> torch.Tensor:
    """CLIPArTT's transductive loss (also WATT's). ``image_features`` v (B, D) normalised and carrying gradient,
    ``text_features`` t (B, D) normalised, one prompt per image (row i belongs to image i):

        A       = (v v^T + t t^T) / 2
        targets = softmax_row(A / temperature)
        loss    = -1/B sum_i sum_j  w_ij  log softmax_j(s v_i . t_j)      (s = CLIP's logit scale)

    "column" (official code, ``cross_entropy(logits.t(), targets.t())``, and the paper's Eq. 3 "column-wise"
    softmax): w_ij = targets[j, i], normalised over images, not over prompts. "row" (MarcLafon/cliptta):
    w_ij = targets[i, j], a distribution over prompts per image. ``detach_targets``: the official code lets the
    gradient flow through v v^T in the targets; cliptta detaches them. ``target_similarity``: the reference's
    ablations of A (its --target-method): "image" A = v v^T / 2, "text" A = t t^T / 2, "identity" targets = I."""
    logits = logit_scale * text_features @ image_features.t()                 # [j, i] = s t_j . v_i
    if target_similarity == "identity":
        targets = torch.eye(len(image_features), dtype=logits.dtype, device=logits.device)
    else:
        if target_similarity == "image_text":
            affinity = (image_features @ image_features.t() + text_features @ text_features.t()) / 2
        elif target_similarity == "image":
            affinity = image_features @ image_features.t() / 2
        else:
            affinity = text_features @ text_features.t() / 2
        targets = (affinity / temperature).softmax(dim=-1)
    if detach_targets:
        targets = targets.detach()
    weights = targets.t() if target_normalization == "column" else targets
    # Row i of logits.t(): image i against every prompt j.
    return -(weights * logits.t().log_softmax(dim=-1)).sum(dim=1).mean()


def log_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """log of probabilities (B, C), or of positive scores, as logits whose argmax is exactly theirs (the reference's
    prediction; OnZeta, DMN): a probability of 0 (an underflowed softmax) is floored at the smallest normal float (logits stay
    finite); where rounding makes a lower-index class's log equal to the predicted class's, the predicted one is
    raised by one ulp."""
    prediction = probabilities.argmax(dim=1, keepdim=True)
    logits = probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
    chosen = logits.gather(1, prediction)
    index = torch.arange(logits.shape[1], device=logits.device)
    tied = ((logits == chosen) & (index < prediction)).any(dim=1, keepdim=True)
    raised = torch.where(tied, torch.nextafter(chosen, torch.full_like(chosen, math.inf)), chosen)
    return logits.scatter(1, prediction, raised)
