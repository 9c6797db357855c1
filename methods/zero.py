"""ZERO: test-time adaptation with "zero" temperature (Farina et al., "Frustratingly Easy Test-Time Adaptation of
Vision-Language Models", NeurIPS 2024; code FarinaMatteo/zero, ``ttas/zero.py``). Nothing is trained.

Per test image: the image and TEST.N_AUGMENTATIONS - 1 random views of it (methods/augmentations.py); the
ZERO.SELECTION_P fraction of the views with the lowest softmax entropy (the original competes like any view, as in
the reference); every confident view votes for its class at temperature zero; the class with the most votes is the
prediction. Ties between classes are broken as ZERO.TIE_BREAK says; the reference breaks them with the discarded
(less confident) views, most confident first, and adds 1 to the winner's votes.

What the vote is (ZERO.VOTE): the reference divides the unscaled cosine similarities of the confident views by the
machine epsilon of their dtype and takes a softmax ("eps_softmax"). In fp32 (this suite's CPU path) that is a one-hot
vote except for near-exact ties; the reference runs fp32 weights under CUDA fp16 autocast, where the cosine matmul is
fp16 and eps is 2^-10, a temperature of about 1e-3 on the cosines: a view whose two best cosines are within a few 1e-3
splits its vote (ZERO.MIXED_PRECISION reproduces that on CUDA).
"one_hot" is the paper's zero-temperature limit (each view one vote for its argmax).

What is reported (ZERO.LOGITS): "log_marginal" (default), the log of the vote shares, so that softmax of the reported
logits is ZERO's zero-temperature marginal; or "votes", the reference's returned tensor (vote sums, tie bonus
included) read as logits. Either way the argmax is ZERO's prediction, exactly (see docs/zero.md on calibration).

Every image is independent: given the same views, the batch size changes nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import TRAINING_FREE
from methods.frames import ViewsMethod, lowest_entropy_views
from methods.registry import register_method

VOTES = ("eps_softmax", "one_hot")
TIE_BREAKS = ("reference", "discarded_views", "lowest_index")
REPORTED_LOGITS = ("log_marginal", "votes")


class ZeroVote(NamedTuple):
    votes: torch.Tensor        # (B, C) fp32: the confident views' votes summed, +1 for a tie-break winner
    prediction: torch.Tensor   # (B,) int64: argmax of votes (first index among equal sums)
    confident: torch.Tensor    # (B, k): indices of the confident views, lowest entropy first
    tied: torch.Tensor         # (B,) bool: whether the confident views' votes tied (before the tie-break)


def view_votes(cosines: torch.Tensor, vote: str) -> torch.Tensor:
    """Votes (..., C) fp32 of views with cosine similarities (..., C). "eps_softmax": softmax(cos / eps) with eps the
    machine epsilon of the cosines' dtype (the reference: the division in that dtype, the softmax in fp32 as autocast
    does); "one_hot": one vote for the argmax (first index among equal cosines)."""
    if vote == "one_hot":
        return F.one_hot(cosines.argmax(dim=-1), cosines.shape[-1]).float()
    return (cosines / torch.finfo(cosines.dtype).eps).float().softmax(dim=-1)


def zero_vote(cosines: torch.Tensor, logit_scale: torch.Tensor, n_confident: int, vote: str = "eps_softmax",
              tie_break: str = "reference") -> ZeroVote:
    """ZERO for views with unscaled cosine similarities (B, V, C) (view 0 = the image itself): confident views by
    the entropy of softmax(logit_scale * cos), their summed votes, the reference's tie-break, the prediction."""
    batch, n_views, n_classes = cosines.shape
    order = lowest_entropy_views(cosines * logit_scale.to(cosines.dtype), n_views)     # (B, V), most confident first
    ranked = cosines.gather(1, order.unsqueeze(-1).expand(-1, -1, n_classes))          # views in that order
    votes = view_votes(ranked[:, :n_confident], vote).sum(dim=1)                        # (B, C)
    top = votes.max(dim=-1, keepdim=True).values
    is_top = votes == top                                                               # exact, as the reference
    tied = is_top.sum(dim=-1) > 1
    if tie_break != "lowest_index" and bool(tied.any()):
        votes = votes + F.one_hot(tie_winner(ranked[:, n_confident:], is_top, tie_break), n_classes) * tied[:, None]
    return ZeroVote(votes, votes.argmax(dim=-1), order[:, :n_confident], tied)


def tie_winner(discarded: torch.Tensor, is_top: torch.Tensor, tie_break: str) -> torch.Tensor:
    """The reference's ``greedy_break`` (B,): among the discarded views (B, V - k, C), most confident first, the
    argmax of the first whose argmax is a tied class. If none is, its ``break_sample_tie`` on the most confident
    discarded view: "discarded_views" takes that view's argmax over the tied classes (what the code means to do);
    "reference" does what the code does: ``logit[~ties] = -inf`` on an integer tensor is a bitwise not, so it masks
    the classes C - 1 - c of the tied classes c (negative indices) and takes the argmax of the rest."""
    predicted = discarded.argmax(dim=-1)                                                # (B, V - k)
    hits = is_top.gather(1, predicted)
    first_hit = predicted.gather(1, hits.int().argmax(dim=1, keepdim=True)).squeeze(1)
    most_confident = discarded[:, 0]
    masked = is_top.flip(-1) if tie_break == "reference" else ~is_top
    fallback = most_confident.masked_fill(masked, float("-inf")).argmax(dim=-1)
    return torch.where(hits.any(dim=1), first_hit, fallback)


def reported_logits(votes: torch.Tensor, prediction: torch.Tensor, kind: str) -> torch.Tensor:
    """What the harness gets (B, C) fp32, its argmax exactly ``prediction``. "votes": the vote sums. "log_marginal":
    log of the vote shares, a share of 0 (a class without a vote) floored at the smallest normal float32 (log about
    -87.3: logits stay finite, its probability about 1e-38); where rounding makes a lower-index class equal to the
    prediction's log share, the prediction's is raised by one ulp so that argmax stays exact."""
    if kind == "votes":
        return votes
    shares = votes / votes.sum(dim=-1, keepdim=True)
    logits = shares.clamp_min(torch.finfo(shares.dtype).tiny).log()
    chosen = logits.gather(1, prediction[:, None])
    index = torch.arange(logits.shape[1], device=logits.device)
    level = ((logits == chosen) & (index < prediction[:, None])).any(dim=1, keepdim=True)
    raised = torch.where(level, torch.nextafter(chosen, torch.full_like(chosen, float("inf"))), chosen)
    return logits.scatter(1, prediction[:, None], raised)


@register_method("zero")
class Zero(ViewsMethod):
    views_node = "ZERO"
    protocol = TRAINING_FREE
    mixed_precision_node = "ZERO"
    config_defaults = {"ZERO": {
        # Fraction of the views (lowest entropy first) that vote; the reference's gamma = 0.3 (19 of 64 views).
        "SELECTION_P": Option(0.3, within="(0, 1]"),
        # How the views are made; the reference uses RandomResizedCrop + horizontal flip on every data set.
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
        # eps_softmax: softmax(cos / eps(dtype)), the reference's code; one_hot: one vote per view, the paper's limit.
        "VOTE": Option("eps_softmax", choices=VOTES),
        # reference: greedy over the discarded views, then the code's fallback as written (index bug included);
        # discarded_views: the same with the fallback the code means; lowest_index: no tie-break (first max).
        "TIE_BREAK": Option("reference", choices=TIE_BREAKS),
        # log_marginal: log vote shares (softmax = the zero-temperature marginal); votes: the reference's output.
        "LOGITS": Option("log_marginal", choices=REPORTED_LOGITS),
        # The reference runs fp32 CLIP under CUDA fp16 autocast (run.py); the same here on CUDA, ignored on CPU.
        "MIXED_PRECISION": True,
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        views, n_confident = cls.views_setup(cfg)
        if n_confident == views.n_views and cfg.ZERO.TIE_BREAK != "lowest_index":
            raise ConfigError(f"ZERO.SELECTION_P = {cfg.ZERO.SELECTION_P} keeps all {views.n_views} views, so "
                              f"ZERO.TIE_BREAK {cfg.ZERO.TIE_BREAK} has no discarded view to break a tie with (the "
                              f"reference fails there); lower ZERO.SELECTION_P or use ZERO.TIE_BREAK lowest_index")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.options = cfg.ZERO

    @torch.no_grad()
    def view_cosines(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (B, V, C) of every image's views with the class text features, all views of the batch
        in one encoder pass; in fp16 under autocast (as the reference's), fp32 otherwise."""
        views = self.views(x)                                             # (B, V, C, H, W); view 0 = x
        with self.autocast():
            out = self.model(views.flatten(0, 1), return_features=True)
            cosines = out.image_features @ out.text_features.t().to(out.image_features.dtype)
        return cosines.view(views.shape[0], views.shape[1], -1)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        result = zero_vote(self.view_cosines(x), self.model.logit_scale, self.n_selected, o.VOTE, o.TIE_BREAK)
        return reported_logits(result.votes, result.prediction, o.LOGITS)
