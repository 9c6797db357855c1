"""Out-of-distribution scores of CLIPTTA's library (MarcLafon/cliptta, ``AbstractOpenSetTTAModel.get_scores``), for
the open-set methods that compute one (UniEnt, OSTTA, CLIPTTA): a score per image, higher = more in-distribution.

Their input is the cosine logits ``x . z_c`` (L2-normalised features) times OOD_LOGIT_SCALE (the code's
``ood_logit_scale``, 1.0 in every script: the softmax of the raw cosines, not of the 100-scaled logits). One view
(the code averages over test-time views; no open-set script uses them)."""
from __future__ import annotations

import torch

# The code's score_type values that need only the logits (its "sim", "tcp", "neglabel" and "clipartt" need
# features, labels or negative prompts; no open-set script uses them).
SCORE_TYPES = ("max_prob", "max_log_prob", "max_logit", "logsumexp", "entropy")


def cliptta_ood_scores(cosines: torch.Tensor, score_type: str, ood_logit_scale: float = 1.0) -> torch.Tensor:
    """(B,) scores of ``cosines`` (B, C) as the code's get_scores computes them for one view."""
    logits = cosines * ood_logit_scale
    if score_type == "max_prob":
        return logits.softmax(dim=-1).max(dim=1).values
    if score_type == "max_log_prob":
        return logits.softmax(dim=-1).log().max(dim=1).values      # log of the softmax, as theirs (not log_softmax)
    if score_type == "max_logit":
        return logits.max(dim=1).values
    if score_type == "logsumexp":
        return logits.logsumexp(dim=1)
    if score_type == "entropy":
        probs = logits.softmax(dim=-1)
        return (probs * torch.log(probs)).sum(1)                    # minus the entropy
    raise ValueError(f"unknown CLIPTTA score type '{score_type}' (expected one of {SCORE_TYPES})")
