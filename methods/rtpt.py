"""R-TPT: robust test-time prompt tuning (Sheng et al., CVPR 2025; official code TomSheng21/R-TPT ``rtpt.py``
``test_time_tuning`` / ``test_time_adapt_eval`` / ``get_top_sim``, the same defense in TomSheng21/tta-vlm
``instance_method/rtpt.py``). docs/rtpt.md says more.

Per test image: the image and TEST.N_AUGMENTATIONS - 1 random views of it; the views' logits under the current
prompt; the RTPT.SELECTION_P fraction of views with the lowest softmax entropy (chosen at the first step and
kept); OPTIM.STEPS AdamW steps on the N_CTX learnable context token embeddings minimising

    1/|S| sum_{i in S} H(softmax(logits_i))        (the mean of the per-view entropies, not TPT's marginal entropy)

Then every view is classified with the tuned prompt and the views' logits are ensembled with reliability weights
from the views' (frozen) image features f_i:

    sim = F F^T,  self-similarity excluded (RTPT.SELF_SIMILARITY),
    score_i = mean of the RTPT.TOP_K largest entries of row i,   w = softmax(score / RTPT.TEMPERATURE),
    output = sum_i w_i logits_i.

Episodic as the reference: with MODEL.EPISODIC the prompt and the optimizer state go back to their initial values
before every image; ``reset()`` restores everything. The reference's adversarial attack (PGD on the input image
before the views are made) is not part of the method and is left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.losses import softmax_entropy
from methods.prompts import PROMPT_TUNING_OPTIONS, ImageViews, PromptTuningViews
from methods.registry import register_method

# How a view's similarity to itself is kept out of its top-k neighbours (docs/rtpt.md).
SELF_SIMILARITY_RULES = ("diagonal", "threshold")


def reliability_weights(features: torch.Tensor, top_k: int, temperature: float, self_similarity: str) -> torch.Tensor:
    """Weights (V,) of the views from their normalised image features (V, D), R-TPT's ``get_top_sim`` and softmax.
    "threshold" sets every similarity >= 1.0 to -inf, as the reference's code is written: whether a view's own
    similarity (1 up to rounding) is dropped then depends on its last bits, and a near-duplicate view that
    rounds to 1.0 is dropped too. "diagonal" drops exactly each view's own similarity."""
    sim = features @ features.t()
    if self_similarity == "threshold":
        sim = sim.masked_fill(sim >= 1.0, float("-inf"))
    else:
        own = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(own, float("-inf"))
    score = sim.topk(top_k, dim=-1).values.mean(dim=-1)
    return torch.softmax(score / temperature, dim=-1)


@register_method("rtpt")
class RTPT(PromptTuningViews):
    views_node = mixed_precision_node = "RTPT"
    config_defaults = {"RTPT": {
        # Neighbours whose similarities are averaged into a view's reliability score (get_top_sim's k = 20).
        "TOP_K": Option(20, within="[1, inf)"),
        # Temperature of the softmax over the scores (the reference's score / 0.01).
        "TEMPERATURE": Option(0.01, within="(0, inf)"),
        # "diagonal": each view's own similarity dropped, what the references do in practice (their similarities are
        # fp16, where a self-similarity rounds to 1.0); "threshold": similarities >= 1.0 set to -inf as written,
        # which in fp32 keeps about half of the diagonal, chosen by the machine's last bits (docs/rtpt.md).
        "SELF_SIMILARITY": Option("diagonal", choices=SELF_SIMILARITY_RULES),
        **PROMPT_TUNING_OPTIONS,
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        top_k, n_views = cfg.RTPT.TOP_K, cfg.TEST.N_AUGMENTATIONS
        if top_k > n_views - 1:
            raise ConfigError(f"RTPT.TOP_K = {top_k} averages each view's {top_k} nearest other views, but "
                              f"TEST.N_AUGMENTATIONS = {n_views} gives {n_views - 1}; set TEST.N_AUGMENTATIONS "
                              f">= {top_k + 1} or RTPT.TOP_K <= {n_views - 1}")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.top_k = int(cfg.RTPT.TOP_K)
        self.temperature = float(cfg.RTPT.TEMPERATURE)
        self.self_similarity = cfg.RTPT.SELF_SIMILARITY

    def split_images(self, x: torch.Tensor) -> list[ImageViews]:
        """Every image's views, drawn and encoded image by image (its views in one forward, as the reference's
        ``forward_features(images)``): the "threshold" test reads the last bits of the features, which must not
        depend on the batch size."""
        units = []
        for image_views in self.views.image_by_image(x):
            with torch.no_grad(), self.autocast():
                units.append(ImageViews(F.normalize(self.model.encode_image(image_views), dim=-1)))
        return units

    def prompt_loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The mean of the confident views' entropies (the reference's ``entropy_avg``)."""
        return softmax_entropy(selected_logits).mean()

    @torch.no_grad()
    def episode_logits(self, unit: ImageViews, outputs) -> torch.Tensor:
        """Every view classified with the tuned prompt, ensembled with the views' reliability weights."""
        with self.autocast():
            logits = self.model.logits(unit.features, self.text_features())
            weights = reliability_weights(unit.features, self.top_k, self.temperature, self.self_similarity)
        return (weights.float() @ logits.float()).unsqueeze(0)
