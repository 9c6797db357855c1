"""CLIPArTT: Adaptation of CLIP to New Domains at Test Time (Hakim, Osowiechi et al., WACV 2025; official code
dosowiechi/CLIPArTT, ``models/tent.py`` and ``adapt.py``; a second implementation in MarcLafon/cliptta,
``ttavlm/methods/clipartt.py``).

Per test batch, starting from the source model (the reference reloads model and Adam state before every batch:
MODEL.EPISODIC True in the configs), OPTIM.STEPS (the reference's niter, 10) times:

1. with the current weights, the TOP_K most probable classes of every image (cosine against the class prompts);
2. one prompt per image conditioned on them, TEMPLATE filled with "c1 or c2 or c3" ("a photo of a cat or dog or
   deer"), encoded by the frozen text tower: t_i, normalised; v_i the normalised image features (with gradient);
3. soft pseudo-labels from the batch's image-image and text-text similarities and CLIPArTT's cross-entropy
   (``methods.losses.clipartt_loss``), one Adam step on the affine parameters of the image tower's LayerNorms.

Then the batch is predicted with the adapted image tower and the class prompts (adapt, then predict; the text
tower never changes). WATT (methods/watt.py) is this loss with single-template pseudo-label prompts: both take
``clipartt_loss`` from methods/losses.py and ``configure_image_layernorms`` from methods/frames.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT, TTAMethod
from methods.caches import REFERENCE_LOGIT_SCALE
from methods.frames import configure_image_layernorms
from methods.losses import clipartt_loss
from methods.registry import register_method

# How image i's target weights over the batch's prompts j are normalised (see methods.losses.clipartt_loss).
TARGET_NORMALIZATIONS = ("column", "row")
# What the targets are made of: the reference's --target-method 1 (the method), 2, 3 and 4 (the paper's Table 4).
TARGET_SIMILARITIES = ("image_text", "image", "text", "identity")


def conditioned_prompts(template: str, class_names, top_classes: torch.Tensor) -> list[str]:
    """One prompt per image: ``template`` filled with its top classes joined by " or " (most probable first),
    e.g. "a photo of a cat or dog or deer" (the reference's ``getprompt``)."""
    return [template.format(" or ".join(class_names[c] for c in row)) for row in top_classes.tolist()]


@register_method("clipartt")
class CLIPArTT(TTAMethod):
    # Transductive: the reference predicts each batch with the weights adapted on it.
    protocol = ADAPT_THEN_PREDICT
    config_defaults = {
        "CLIPARTT": {
            # K, classes per conditioned prompt (reference --K, default 3; the paper uses 3 everywhere).
            "TOP_K": Option(3, within="[1, inf)"),
            # The conditioned prompt (reference: "a photo of a " + "c1 or c2 or c3", no full stop).
            "TEMPLATE": Option("a photo of a {}", valid=lambda t: isinstance(t, str) and t.count("{}") == 1,
                               expected="a template with one '{}' for the joined class names"),
            # tau of the target softmax (a constant 0.01 in the reference and the paper).
            "TARGET_TEMPERATURE": Option(0.01, within="(0, inf)"),
            # "column": the official code and the paper (Eq. 3); "row": MarcLafon/cliptta (see clipartt_loss).
            "TARGET_NORMALIZATION": Option("column", choices=TARGET_NORMALIZATIONS),
            # False: the official code (gradient also through the image-image similarities of the targets);
            # True: MarcLafon/cliptta (targets.detach()).
            "DETACH_TARGETS": Option(False, choices=(False, True)),
            # What the pseudo-labels come from: "image_text" (the method; reference --target-method 1), or the
            # reference's ablations (the paper's Table 4) "image" (2), "text" (3), "identity" (4).
            "TARGET_SIMILARITY": Option("image_text", choices=TARGET_SIMILARITIES),
            # Scale s of the loss's logits s t_j . v_i: "model", CLIP's own logit_scale (the official code's
            # ``logit_scale.exp()``: 100 for OpenAI's weights), or "fixed_100" (MarcLafon/cliptta's copy).
            "LOGIT_SCALE": Option("model", choices=("model", "fixed_100")),
            # eps of its Adam: 1e-8, torch's default, which the official code keeps; 1e-6 in MarcLafon/cliptta.
            "ADAM_EPS": Option(1e-8, within="(0, inf)"),
        }
    }

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        if model_spec.image_tower != "vit":
            raise ConfigError(f"clipartt adapts the LayerNorms of a ViT image tower; MODEL.ARCH={cfg.MODEL.ARCH} has "
                              f"a {model_spec.image_tower} image tower (the reference's BatchNorm branch for ResNets "
                              f"is not implemented)")
        if cfg.CLIPARTT.TOP_K > len(class_names):
            raise ConfigError(f"CLIPARTT.TOP_K = {cfg.CLIPARTT.TOP_K}: expected at most the number of classes "
                              f"({len(class_names)})")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        o = cfg.CLIPARTT
        self.top_k = int(o.TOP_K)
        self.template = o.TEMPLATE
        self.temperature = float(o.TARGET_TEMPERATURE)
        self.target_normalization = o.TARGET_NORMALIZATION
        self.detach_targets = bool(o.DETACH_TARGETS)
        self.target_similarity = o.TARGET_SIMILARITY
        self.fixed_logit_scale = o.LOGIT_SCALE == "fixed_100"
        self.adam_eps = float(o.ADAM_EPS)          # read by setup_optimizer

    def cost_info(self) -> dict:
        """Per test batch: OPTIM.STEPS forward + backward passes of the image tower and one more forward to
        predict; at every step each image's conditioned prompt goes through the text tower (no gradient)."""
        return {"views_per_image": 1, "forward_passes_per_batch": self.steps + 1,
                "backward_passes_per_batch": self.steps, "text_prompts_per_image": self.steps,
                "text_forward_passes_at_start": len(self.model.tokens)}

    # ------------------------------------------------------------------ set-up and episodes
    def configure_model(self) -> None:
        configure_image_layernorms(self.model)

    def reset_episode(self) -> None:
        """The reference's per-batch reset; the frozen class text features stay cached."""
        self.restore_source_parameters()

    # ------------------------------------------------------------------ adaptation
    @torch.no_grad()
    def prompt_features(self, top_classes: torch.Tensor) -> torch.Tensor:
        """Normalised text features (B, D) of every image's conditioned prompt."""
        prompts = conditioned_prompts(self.template, self.model.class_names, top_classes)
        tokens = self.model.truncate_tokens(self.model.tokenizer(prompts)).to(self.device)
        with self.autocast():
            features = self.model.encode_tokens(tokens)
        return F.normalize(features.float(), dim=-1)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> None:
        with self.autocast():
            image_features = self.model.encode_image(x)
        image_features = F.normalize(image_features.float(), dim=-1)
        class_features, _ = self.model.text_features()
        # Top-K under the current weights (the reference's separate no-grad forward gives the same values).
        top_classes = (image_features.detach() @ class_features.t()).topk(self.top_k, dim=1).indices
        scale = REFERENCE_LOGIT_SCALE if self.fixed_logit_scale else self.model.logit_scale
        loss = clipartt_loss(image_features, self.prompt_features(top_classes), scale,
                             self.temperature, self.target_normalization, self.detach_targets,
                             self.target_similarity)
        self.optimizer_step(loss)

    @torch.no_grad()
    def episode_logits(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """After the batch's steps: the batch classified by the adapted image tower against the class prompts."""
        with self.autocast():
            image_features = self.model.encode_image(x)
        return self.model.logits(F.normalize(image_features.float(), dim=-1), self.model.text_features()[0]).float()
