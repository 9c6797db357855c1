"""OnZeta: online zero-shot transfer (Qian & Hu, "Online Zero-Shot Classification with CLIP", ECCV 2024; official
code idstcv/OnZeta ``main_online.py``; the same loop in TomSheng21/tta-vlm ``online_method/onzeta.py``). Nothing
is trained by gradient descent and CLIP stays frozen: two closed-form online updates per image.

Per test image i = 1, 2, ... of the stream (x its normalised CLIP feature, T the (D, C) text classifier, W the
(D, C) class proxies in the image space, starting at T, rho (C,) the dual variable of the class proportions,
starting at 0; n the number of images the reference's schedule divides by, the test set's size: here the images
until the next reset, as the harness gives them (``begin_stream``), or ONZETA.STREAM_LENGTH where it is set):

1. schedules: lr_i = CW / sqrt(i), rlr_i = CR / sqrt(i), beta_i = BETA * sqrt(i / n);
2. online label learning: p_i = softmax(x T / TAU_T) * exp(rho), renormalised to sum 1;
   rho <- max(0, rho - rlr_i (p_i - ALPHA / C));
3. online proxy learning: v_i = softmax(x W / TAU_I); the prediction is beta_i v_i + (1 - beta_i) p_i;
   W <- W - (lr_i / TAU_I) x (v_i - p_i)^T, then every column of W renormalised.

So each image is predicted with the proxies of the images before it, and with the dual variable of the images
before it (p_i uses rho before its own update); the reference's order is kept step for step. The reported logits
are the log of the prediction (ONZETA.PREDICTION onzeta) or of p_i (onlab, the reference's second accuracy),
so that softmax of them gives back the method's probabilities.

A batch is processed image by image in stream order (only the encoding and the fixed x T are batched), so the
result is that of batch size 1. rho, W and the stream index i are registered buffers: ``reset()`` restores them
exactly. The online arithmetic runs in fp32 as the reference's (``.float()`` on features and classifier).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import TRAINING_FREE, TTAMethod
from methods.caches import cache_dtype
from methods.losses import log_probabilities
from methods.registry import register_method

logger = logging.getLogger(__name__)

PREDICTIONS = ("onzeta", "onlab")


@register_method("onzeta")
class OnZeta(TTAMethod):
    protocol = TRAINING_FREE
    config_defaults = {"ONZETA": {
        # main_online.py's argparse defaults (its only values: one setting for ImageNet, the only set it reads).
        "TAU_T": Option(0.01, within="(0, inf)"),       # --tau_t: temperature of the text classifier
        "TAU_I": Option(0.04, within="(0, inf)"),       # --tau_i: temperature of the image-space proxies
        "CW": Option(0.5, within="[0, inf)"),           # --cw: proxy learning rate, lr_i = CW / sqrt(i)
        "CR": Option(20.0, within="[0, inf)"),          # --cr: dual learning rate, rlr_i = CR / sqrt(i)
        "ALPHA": Option(1.0, within="[0, 1]"),          # --alpha: each class's share at least ALPHA / C
        "BETA": Option(0.8, within="[0, 1]"),           # --beta: weight of the proxies, beta_i = BETA sqrt(i / n)
        # n of beta_i: the reference divides by the size of the whole test set (n = len(image_label)). 0: the
        # images the method is given until the next reset, as the harness says (begin_stream); > 0: that number.
        "STREAM_LENGTH": Option(0, within="[0, inf)"),
        # What is reported: "onzeta", the combination (the paper's method); "onlab", online label learning alone
        # (the reference's second printed accuracy).
        "PREDICTION": Option("onzeta", choices=PREDICTIONS),
    }}

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        o = cfg.ONZETA
        self.tau_text, self.tau_image = float(o.TAU_T), float(o.TAU_I)
        self.proxy_rate, self.dual_rate = float(o.CW), float(o.CR)
        self.alpha, self.beta = float(o.ALPHA), float(o.BETA)
        self.stream_length = int(o.STREAM_LENGTH) or None       # None: until begin_stream gives it
        self.prediction = str(o.PREDICTION)
        self.warned_past_stream_length = False

    def begin_stream(self, num_images: int) -> None:
        """n = the images until the next reset, unless ONZETA.STREAM_LENGTH names it."""
        if not int(self.cfg.ONZETA.STREAM_LENGTH):
            self.stream_length = int(num_images)

    def setup_scaler(self):
        """Nothing is trained: no gradient scaler, whatever MIXED_PRECISION says (it sets fp16 autocast only)."""
        return None

    def cost_info(self) -> dict:
        return {"views_per_image": 1, "backward_passes_per_image": 0}

    def setup_state(self) -> None:
        """The text classifier T (D, C), fixed (not state); the proxies W (starting at T), the dual variable rho
        and the number of images seen, buffers that reset() restores."""
        text = self.model.text_features()[0].detach()
        classifier = text.to(cache_dtype(text)).t().contiguous()
        self.register_buffer("text_classifier", classifier, persistent=False)
        self.register_buffer("class_proxies", classifier.clone())
        self.register_buffer("dual", torch.zeros(self.num_classes, dtype=classifier.dtype, device=classifier.device))
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long, device=classifier.device))

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            features = self.model(x, return_features=True).image_features
        features = features.to(self.text_classifier.dtype)
        # x T does not depend on the state: one product for the batch
        text_probabilities = torch.softmax(features @ self.text_classifier / self.tau_text, dim=1)
        predictions = [self.step(feature, probabilities) for feature, probabilities in
                       zip(features, text_probabilities)]
        return log_probabilities(torch.stack(predictions))

    def step(self, feature: torch.Tensor, text_probabilities: torch.Tensor) -> torch.Tensor:
        """One image, in the reference's order: label learning, then the prediction with the proxies before this
        image, then the proxy update. Returns the image's probabilities (the combination, or p_i for onlab)."""
        index = int(self.images_seen) + 1
        if self.stream_length is None:
            raise ConfigError("ONZETA.STREAM_LENGTH 0 takes n from the harness (begin_stream), which did not give "
                              "it: set ONZETA.STREAM_LENGTH to the number of images between resets")
        self.warn_past_stream_length(index)
        proxy_rate = self.proxy_rate / math.sqrt(index)
        dual_rate = self.dual_rate / math.sqrt(index)
        beta = self.beta * math.sqrt(index / self.stream_length)
        label = text_probabilities * torch.exp(self.dual)
        label = label / torch.sum(label)
        self.dual.sub_(dual_rate * (label - self.alpha / self.num_classes)).clamp_(min=0)
        vision = torch.softmax(feature @ self.class_proxies / self.tau_image, dim=0)
        combined = beta * vision + (1 - beta) * label
        self.class_proxies.sub_((proxy_rate / self.tau_image) * torch.outer(feature, vision - label))
        self.class_proxies.copy_(F.normalize(self.class_proxies, dim=0))
        self.images_seen += 1
        return combined if self.prediction == "onzeta" else label

    def warn_past_stream_length(self, index: int) -> None:
        """beta_i grows past BETA after n images (past 1 after 1.56 n with BETA 0.8): say so once."""
        if index > self.stream_length and not self.warned_past_stream_length:
            self.warned_past_stream_length = True
            logger.warning("OnZeta: image %d of the stream exceeds ONZETA.STREAM_LENGTH = %d; beta_i = BETA * "
                           "sqrt(i / n) keeps growing (set STREAM_LENGTH to the number of images between resets)",
                           index, self.stream_length)
