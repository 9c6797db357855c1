"""Calibration beside accuracy: expected calibration error, negative log-likelihood and mean confidence of a
method's predictions, per (domain, severity).

ECE is the standard one (Guo et al., ICML 2017; Naeini et al., AAAI 2015): the confidence of a prediction is its
top softmax probability; predictions fall into 15 equal-width bins over (0, 1], bin m holding the confidences in
((m-1)/15, m/15]; ECE = sum over bins of (bin count / N) * |accuracy in the bin - mean confidence in the bin|.
A method's output is read as logits (softmax gives its probabilities; StatA's log-probabilities give its own).
The per-bin sums are kept in the record, so records of shards merge and ECE can be recomputed exactly."""
from __future__ import annotations

import torch

ECE_BINS = 15


class CalibrationCounts:
    """Per-segment sums over a task's batches: per-bin counts, confidence sums and correct counts, and the NLL
    sum (float64, on the CPU)."""

    def __init__(self, segments: int, bins: int = ECE_BINS):
        self.bins = bins
        self.count = torch.zeros(segments, bins, dtype=torch.float64)
        self.confidence = torch.zeros(segments, bins, dtype=torch.float64)
        self.correct = torch.zeros(segments, bins, dtype=torch.float64)
        self.nll = torch.zeros(segments, dtype=torch.float64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, segment: torch.Tensor) -> None:
        log_probs = torch.log_softmax(logits.detach().double().cpu(), dim=1)
        confidence, predicted = log_probs.exp().max(dim=1)
        hits = (predicted == labels).double()
        # bin m (0-based) holds (m/B, (m+1)/B]: ceil(c * B) - 1, clamped for rounding at 0
        index = (torch.ceil(confidence * self.bins).long() - 1).clamp(0, self.bins - 1)
        flat = segment.long() * self.bins + index
        self.count.view(-1).index_add_(0, flat, torch.ones_like(confidence))
        self.confidence.view(-1).index_add_(0, flat, confidence)
        self.correct.view(-1).index_add_(0, flat, hits)
        self.nll.index_add_(0, segment.long(), -log_probs.gather(1, labels.long()[:, None])[:, 0])

    def fields(self, k: int) -> dict:
        """The record fields of segment ``k``."""
        return calibration_fields(self.count[k].tolist(), self.confidence[k].tolist(), self.correct[k].tolist(),
                                  float(self.nll[k]))


def calibration_fields(count: list, confidence: list, correct: list, nll_sum: float) -> dict:
    n = sum(count)
    bins = {"count": [int(c) for c in count], "confidence_sum": list(confidence), "correct": [int(c) for c in correct]}
    if not n:
        return {"ece": float("nan"), "nll": float("nan"), "mean_confidence": float("nan"), "calibration_bins": bins}
    ece = sum(abs(hit - conf) for hit, conf in zip(correct, confidence)) / n   # sum_m (n_m/N)|acc_m - conf_m|
    return {"ece": ece, "nll": nll_sum / n, "mean_confidence": sum(confidence) / n, "calibration_bins": bins}
