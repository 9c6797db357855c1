"""TDA: training-free dynamic adapter (Karmanov et al., "Efficient Test-Time Adaptation of Vision-Language
Models", CVPR 2024; code kdiAAA/TDA ``tda_runner.py`` and ``utils.py``; the same code with CIFAR-10/100-C and
ImageNet-C settings in MarcLafon/cliptta ``ttavlm/methods/tda.py``). Nothing is trained.

Per test image, in stream order (``run_test_tda``):

1. CLIP logits ``get_clip_logits``: the image and TEST.N_AUGMENTATIONS - 1 random views of it, logits
   ``scale * features @ text`` (scale 100 in the code, TDA.LOGIT_SCALE). With one view the image's own logits;
   with several, the TDA.SELECTION_P fraction of views with the lowest softmax entropy: their normalised
   features are averaged (not renormalised; the cache key and query), their logits averaged (the CLIP logits),
   the entropy of their averaged probabilities is the image's entropy, their averaged probabilities its
   probability map, the argmax of the averaged logits its pseudo-label.
2. The positive cache of the pseudo-label's class takes (feature, entropy) if it holds fewer than
   POSITIVE_SHOT_CAPACITY entries, or replaces its highest-entropy entry if the new entropy is strictly lower;
   entries stay sorted by entropy (``update_cache``).
3. If the normalised entropy lies strictly between NEGATIVE_ENTROPY_LOWER and NEGATIVE_ENTROPY_UPPER, the
   negative cache of the same class is updated the same way with (feature, entropy, probability map).
4. The prediction, with the current image already in the caches (the reference's order):
   clip logits + POSITIVE_ALPHA * sum_entries exp(-POSITIVE_BETA (1 - q.k)) one_hot(class of entry)
              - NEGATIVE_ALPHA * sum_entries exp(-NEGATIVE_BETA (1 - q.k)) 1[MASK_LOWER < p_entry < MASK_UPPER]
   (``compute_cache_logits``; q the image's feature, k an entry's feature, p its probability map).

A batch is processed image by image in stream order, each image's views drawn on their own, so the caches and
the logits are those of batch size 1 whatever TEST.BATCH_SIZE is; only the encoding of all views of a batch is
batched. The caches are buffers (keys, entropies, probability maps, fill counts per class), so ``reset()``
empties them exactly. The cache arithmetic runs in fp32 (the reference runs it in fp16 with its fp16 CLIP).
"""
from __future__ import annotations

import math

import torch

from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import TRAINING_FREE
from methods.caches import (REFERENCE_LOGIT_SCALE, TDA_CACHE_OPTIONS, ClassQueues, cache_dtype,
                            check_tda_cache_intervals, negative_cache_logits, positive_cache_logits,
                            tda_cache_settings)
from methods.frames import ViewsMethod, lowest_entropy_views
from methods.losses import marginal_entropy
from methods.registry import register_method


@register_method("tda")
class TDA(ViewsMethod):
    views_node = "TDA"
    single_view_is_the_image = True     # one view: the image itself, as the reference's one-image branch
    protocol = TRAINING_FREE
    config_defaults = {"TDA": {
        # Fraction of the views (lowest softmax entropy first) averaged when TEST.N_AUGMENTATIONS > 1 (hard-coded
        # 0.1 in the reference: 6 of 64). With one view the image itself is used, as the reference does.
        "SELECTION_P": Option(0.1, within="(0, 1]"),
        # How the views are made (reference: AugMix views for ImageNet-A/-V2/-R/-Sketch; see docs/tda.md).
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
        # Scale of the clip logits: "fixed_100" as the code (``100. *``), or "model" (the model's logit_scale;
        # the same for OpenAI weights up to rounding, different for other weights).
        "LOGIT_SCALE": Option("fixed_100", choices=("fixed_100", "model")),
        # Normalised entropy, compared with the negative cache's entropy bounds: "log2" as the code (natural-log
        # entropy divided by log2(num classes), so at most ln 2), or "ln" (divided by ln(num classes), in [0, 1]).
        "ENTROPY_NORMALISATION": Option("log2", choices=("log2", "ln")),
        **TDA_CACHE_OPTIONS,
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        check_tda_cache_intervals(cfg.TDA, "TDA")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        t = cfg.TDA
        self.positive, self.negative = tda_cache_settings(t)
        self.max_entropy = (math.log2(num_classes) if t.ENTROPY_NORMALISATION == "log2" else math.log(num_classes))

    def setup_scaler(self):
        """Nothing is trained: no gradient scaler, whatever MIXED_PRECISION says (it sets fp16 autocast only)."""
        return None

    def setup_state(self) -> None:
        """The two caches, empty: per class a queue of up to SHOT_CAPACITY (key, entropy[, probability map])
        entries, sorted by entropy (``ClassQueues``: buffers, so reset() empties them)."""
        text = self.model.text_features()[0]
        c, device, dim, dtype = self.num_classes, self.device, text.shape[1], cache_dtype(text)
        self.positive_cache = ClassQueues(c, self.positive["capacity"], dim, device=device, dtype=dtype)
        self.negative_cache = ClassQueues(c, self.negative["capacity"], dim, extra_dim=c, device=device, dtype=dtype)

    def logit_scale(self) -> float:
        if self.cfg.TDA.LOGIT_SCALE == "fixed_100":
            return REFERENCE_LOGIT_SCALE
        return float(self.model.logit_scale)

    @torch.no_grad()
    def clip_outputs(self, x: torch.Tensor):
        """``get_clip_logits`` for every image of the batch: the (averaged) feature (B, D), clip logits (B, C),
        entropy (B,), probability map (B, C) and pseudo-label (B,). Views are drawn image by image, so that the
        random stream does not depend on the batch size; all views are encoded in one pass."""
        views = self.views.image_by_image(x)      # (B, V, C, H, W); view 0 = image
        batch, n_views = views.shape[:2]
        with self.autocast():
            out = self.model(views.flatten(0, 1), return_features=True)
        features = out.image_features.float().view(batch, n_views, -1)
        logits = self.logit_scale() * features @ out.text_features.float().t()  # (B, V, C)
        selected = lowest_entropy_views(logits, self.n_selected)               # (B, k); view 0 when V = 1
        chosen_logits = logits.gather(1, selected.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        chosen_features = features.gather(1, selected.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        clip_logits = chosen_logits.mean(dim=1)
        entropy = torch.stack([marginal_entropy(image_logits) for image_logits in chosen_logits])
        prob_map = chosen_logits.softmax(dim=-1).mean(dim=1)
        return chosen_features.mean(dim=1), clip_logits, entropy, prob_map, clip_logits.argmax(dim=1)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        features, clip_logits, entropy, prob_map, pred = self.clip_outputs(x)
        normalised_entropy = (entropy / self.max_entropy).tolist()
        pos, neg = self.positive, self.negative
        final = []
        for i, label in enumerate(pred.tolist()):     # stream order: image i sees the caches of images < i
            if pos["enabled"]:
                self.positive_cache.insert(label, features[i], entropy[i])
            if neg["enabled"] and neg["entropy_lower"] < normalised_entropy[i] < neg["entropy_upper"]:
                self.negative_cache.insert(label, features[i], entropy[i], prob_map[i])
            logits = clip_logits[i].clone()
            if pos["enabled"]:
                logits += positive_cache_logits(features[i], self.positive_cache.keys, self.positive_cache.counts,
                                                pos["alpha"], pos["beta"])
            if neg["enabled"]:
                neg_cache = self.negative_cache
                logits -= negative_cache_logits(features[i], neg_cache.keys, neg_cache.counts, neg_cache.extras,
                                                neg["alpha"], neg["beta"], neg["mask_lower"], neg["mask_upper"])
            final.append(logits)
        return torch.stack(final)
