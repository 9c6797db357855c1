"""WATT: Weight Average Test-Time adaptation of CLIP (Osowiechi et al., NeurIPS 2024; code Mehrdad-Noori/WATT).

Per batch, starting from the source model every time (the reference resets before each batch):
for each of several text templates, adapt the image tower's LayerNorm affine parameters for ITERATIONS
Adam steps with a transductive loss, then average the adapted weights over the templates; repeat REPEATS
times. Parallel (watt_p): within a repeat every template starts from the same weights (the source in the
first repeat, the previous average afterwards). Sequential (watt_s): the templates are visited one after
another, each continuing from the previous template's weights; the average is taken over the weights
reached after each template, and the next repeat starts from that average.

Loss for template t (pseudo-labels from the current weights, cosine argmax against template t's text
features; T_i = text feature of image i's pseudo-label; v_i = normalised image feature):
    logits[i, j] = s * T_i . v_j                  (s = CLIP's logit scale, 100 for OpenAI weights)
    targets      = softmax_row(((v v^T + T T^T) / 2) / TARGET_TEMPERATURE)
    loss         = mean_j  sum_i  -targets[i, j] * log_softmax_i(logits[:, j])
(the reference's ``cross_entropy(logits.t(), targets.t())``; gradient also flows through v v^T in the
targets, as there). Prediction: the averaged weights and the template-averaged text features.

Optimizer state follows the reference exactly: one Adam over the LayerNorm parameters, fresh at the start
of every batch and, in parallel mode, for every template of the first repeat; otherwise its moments carry
over when the weights are re-loaded from the average.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT, TTAMethod, backbone_refusal
from methods.frames import configure_image_layernorms
from methods.losses import clipartt_loss
from methods.registry import register_method

# The eight templates of the reference's templates.yaml (the paper's CIFAR setting), in its order.
WATT_TEMPLATES = [
    "a photo of a {}",
    "itap of a {}",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def average_weights(snapshots: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Element-wise mean of several models' parameter lists (the reference's ``weight_average``)."""
    return [torch.stack(group).mean(dim=0) for group in zip(*snapshots)]


def watt_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """WATT's transductive loss for one template; ``text_features`` (C, D) normalised, ``image_features``
    (B, D) normalised and carrying gradient."""
    with torch.no_grad():
        pseudo_labels = (image_features @ text_features.t()).argmax(dim=1)
    # CLIPArTT's loss with each image's pseudo-label prompt as its text.
    return clipartt_loss(image_features, text_features[pseudo_labels], logit_scale, temperature)


@register_method("watt_p")
class WATT(TTAMethod):
    """WATT-P (parallel multi-template weight averaging); ``WATTSequential`` is WATT-S."""
    mode = "parallel"
    # Transductive: the batch is predicted after adapting on it (reference: adapt, then evaluate).
    protocol = ADAPT_THEN_PREDICT
    config_defaults = {
        "WATT": {
            # Templates adapted on and averaged for the prediction (reference templates.yaml).
            "TEMPLATES": Option(list(WATT_TEMPLATES),
                                valid=lambda ts: len(ts) > 0 and all(str(t).count("{}") == 1 for t in ts),
                                expected="a non-empty list of templates, each with one '{}' for the class name"),
            # L: Adam steps per template before the weights are averaged (reference --watt_l, default 2).
            "ITERATIONS": Option(2, within="[1, inf)"),
            # M: repeats of (adapt on every template, average) per batch (reference --watt_m, default 5;
            # its CIFAR scripts use 50 for WATT-P and 5 for WATT-S).
            "REPEATS": Option(5, within="[1, inf)"),
            # Temperature of the target similarity softmax (constant 0.01 in the reference).
            "TARGET_TEMPERATURE": Option(0.01, within="(0, inf)"),
        }
    }

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        if model_spec.image_tower == "resnet":
            raise backbone_refusal(cls.method_name, cfg, model_spec, "it adapts the image tower's LayerNorms, and a "
                                   "ModifiedResNet tower has none (BatchNorm only)")
        if cfg.OPTIM.STEPS != 1:
            raise ConfigError(f"{cls.method_name}: OPTIM.STEPS must be 1 (got {cfg.OPTIM.STEPS}); WATT's own loop "
                              f"runs WATT.REPEATS x len(WATT.TEMPLATES) x WATT.ITERATIONS steps per batch")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        w = cfg.WATT
        self.templates = list(w.TEMPLATES)
        self.iterations = int(w.ITERATIONS)
        self.repeats = int(w.REPEATS)
        self.temperature = float(w.TARGET_TEMPERATURE)
        per_template = self._template_text_features()                                     # (T, C, D)
        # Constants of the frozen text tower: not method state (non-persistent, never reset).
        self.register_buffer("template_text_features", per_template, persistent=False)
        self.register_buffer("ensemble_text_features", F.normalize(per_template.mean(dim=0), dim=-1),
                             persistent=False)
        steps = self.repeats * len(self.templates) * self.iterations
        # Cost per test batch, for the results' provenance (text features are computed once, at start-up).
        self.views_per_image = 1
        self.backward_passes_per_batch = steps
        self.forward_passes_per_batch = steps + 1      # + the prediction with the averaged weights

    def cost_info(self) -> dict:
        return {"views_per_image": self.views_per_image, "forward_passes_per_batch": self.forward_passes_per_batch,
                "backward_passes_per_batch": self.backward_passes_per_batch,
                "text_forward_passes_at_start": len(self.templates) * self.num_classes}

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        """Only the affine parameters of the image tower's LayerNorms adapt (reference ``set_ln_grads``)."""
        configure_image_layernorms(self.model)

    @torch.no_grad()
    def _template_text_features(self) -> torch.Tensor:
        """Normalised text features (T, C, D) of every WATT template for every class."""
        tokenizer = self.model.tokenizer
        names = self.model.class_names
        features = []
        for template in self.templates:
            tokens = self.model.truncate_tokens(tokenizer([template.format(c) for c in names])).to(self.device)
            chunks = [self.model.encode_tokens(tokens[i:i + 1000]).float() for i in range(0, len(tokens), 1000)]
            features.append(F.normalize(torch.cat(chunks), dim=-1))
        return torch.stack(features)

    # ------------------------------------------------------------------ state handling
    def _load_source(self) -> None:
        """Source LayerNorm weights, fresh optimizer and scaler (the reference's reset before every batch)."""
        self.restore_source_parameters()

    @torch.no_grad()
    def _load_weights(self, weights: list[torch.Tensor]) -> None:
        for p, w in zip(self.params, weights):
            p.copy_(w)

    def _current_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    # ------------------------------------------------------------------ adaptation
    def _adapt_on_template(self, x: torch.Tensor, text_features: torch.Tensor) -> None:
        scale = self.model.logit_scale
        for _ in range(self.iterations):
            with self.autocast():
                image_features = self.model.encode_image(x)
            loss = watt_loss(F.normalize(image_features.float(), dim=-1), text_features, scale, self.temperature)
            self.optimizer_step(loss)

    def adapt(self, x: torch.Tensor) -> None:
        """Leaves the model holding the final averaged weights."""
        self._load_source()
        average = None
        for repeat in range(self.repeats):
            if self.mode == "sequential" and repeat > 0:
                self._load_weights(average)
            snapshots = []
            for text_features in self.template_text_features:
                if self.mode == "parallel":
                    if repeat == 0:
                        self._load_source()
                    else:
                        self._load_weights(average)
                self._adapt_on_template(x, text_features)
                snapshots.append(self._current_weights())
            average = average_weights(snapshots)
        self._load_weights(average)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            image_features = self.model.encode_image(x)
        return self.model.logits(F.normalize(image_features.float(), dim=-1), self.ensemble_text_features)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adapt(x)
        return self.predict(x)


@register_method("watt_s")
class WATTSequential(WATT):
    """WATT-S: the same method with sequential multi-template weight averaging (keys in the WATT node)."""
    mode = "sequential"
    config_defaults = {}   # the WATT node is declared once, by watt_p
