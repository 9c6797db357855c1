"""What the prompt methods share: class text features from the templates plus per-class descriptions (DPE's
and DMN's CuPL prompts); and, for the prompt-tuning methods (TPT, C-TPT), CoOp-style class prompts "[SOT] ctx_1
... ctx_n <class name>. [EOT]" whose n context token embeddings are learnable and shared by all classes, the check
of the words they start from, the per-image unit of a view-based prompt-tuning episode, and ``PromptTuningViews``,
the frame of such a method: per image, the views' logits under the current prompt, the confident views chosen at
the first step, OPTIM.STEPS steps on the context minimising ``prompt_loss``, then the image classified with the
tuned prompt."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import ADAPT_THEN_PREDICT, backbone_refusal
from methods.frames import ViewsMethod, lowest_entropy_views


# The keys every prompt-tuning method's node holds (its own node: {"TPT": {**PROMPT_TUNING_OPTIONS}}).
PROMPT_TUNING_OPTIONS = {
    # Fraction of the views with the lowest entropy whose averaged prediction is tuned (the references: 0.1).
    "SELECTION_P": Option(0.1, within="(0, 1]"),
    # Number of learnable context tokens; must equal the token count of CTX_INIT.
    "N_CTX": Option(4, within="[1, inf)"),
    # Words the context is initialised from, "_" for spaces (the references: "a_photo_of_a").
    "CTX_INIT": "a_photo_of_a",
    # Where the class name goes; only "end" (the references' setting) is implemented.
    "CLASS_TOKEN_POS": Option("end", choices=("end",)),
    # How the views are made: "crop_flip" = RandomResizedCrop + horizontal flip, what the TPT authors and the anchor
    # suite use for ImageNet(-C) and CIFAR-C; "augmix" = those views AugMix-mixed, what the TPT authors use for the
    # fine-grained sets (C-TPT's scripts also for the natural shifts; methods/augmentations.py).
    "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
    # The references always run under CUDA fp16 autocast with a GradScaler (init_scale 1000); ignored on the CPU.
    "MIXED_PRECISION": True,
}


def templates_and_descriptions_features(model, descriptions: dict, autocast) -> torch.Tensor:
    """(C, D) normalised class text features from the model's templates plus ``descriptions`` ({spoken class name:
    [texts]}, e.g. CuPL's): per class every prompt's normalised feature averaged, then renormalised (DPE's
    ``clip_classifier``, DMN's ``tip_cupl``)."""
    features = []
    for name in model.class_names:
        spoken = name.replace("_", " ")
        texts = [t.format(spoken) for t in model.templates] + descriptions[spoken]
        with torch.no_grad(), autocast:
            tokens = model.truncate_tokens(model.tokenizer(texts)).to(model.tokens.device)
            prompt_features = F.normalize(model.encode_tokens(tokens).float(), dim=-1)
        features.append(F.normalize(prompt_features.mean(dim=0), dim=-1))
    return torch.stack(features)


def context_prompt_tokens(tokenizer, ctx_init: str, n_ctx: int, class_names, node: str = "TPT") -> torch.Tensor:
    """Tokens (C, L) of the prompts "<ctx_init words> <class name>." for every class, checked: CTX_INIT holds
    exactly N_CTX tokens and is tokenised the same in front of every class name (its embeddings are shared).
    ``node`` names the config node of CTX_INIT and N_CTX in the messages."""
    phrase = ctx_init.replace("_", " ").strip()
    if not phrase:
        raise ConfigError(f"{node}.CTX_INIT is empty; give the words the context starts from, e.g. 'a_photo_of_a' "
                          "(random context initialisation is not implemented)")
    phrase_tokens = tokenizer([phrase])
    n_phrase = int(phrase_tokens[0].argmax()) - 1          # tokens between SOT and EOT (the largest token id)
    if n_phrase != n_ctx:
        raise ConfigError(f"{node}.N_CTX = {n_ctx}, but {node}.CTX_INIT '{ctx_init}' is {n_phrase} tokens; "
                          f"set {node}.N_CTX {n_phrase}")
    names = [name.replace("_", " ") for name in class_names]
    tokens = tokenizer([f"{phrase} {name}." for name in names])
    if not torch.equal(tokens[:, 1:1 + n_ctx], phrase_tokens[:, 1:1 + n_ctx].expand(len(names), -1)):
        raise ConfigError(f"{node}.CTX_INIT '{ctx_init}' is not tokenised identically in front of every class name")
    return tokens


class PromptContext(nn.Module):
    """CoOp-style prompts "[SOT] ctx_1 ... ctx_n <class name>. [EOT]" for every class, with the n context token
    embeddings learnable and shared by all classes. The class-name, full-stop and end tokens keep their
    frozen embeddings (non-persistent buffers: they never change, so reset never copies them)."""

    def __init__(self, model, ctx_init: str, n_ctx: int, node: str = "TPT"):
        super().__init__()
        tokens = model.truncate_tokens(context_prompt_tokens(model.tokenizer, ctx_init, n_ctx, model.class_names,
                                                             node))
        device = model.clip.token_embedding.weight.device
        tokens = tokens.to(device)
        with torch.no_grad():
            embeddings = model.clip.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)             # SOT
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx:].clone(), persistent=False)     # name . EOT pad
        self.register_buffer("ctx_init", embeddings[0, 1:1 + n_ctx].clone(), persistent=False)
        self.ctx = nn.Parameter(self.ctx_init.clone())

    def forward(self) -> torch.Tensor:
        """Token embeddings (C, L, width) of all class prompts with the current context."""
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    @torch.no_grad()
    def restore(self) -> None:
        self.ctx.copy_(self.ctx_init)


@dataclass
class ImageViews:
    """One test image's episode: the normalised features (V, D) of its views (view 0 = the image itself) and its
    confident views (the prompt-tuning references choose them at the first step and keep them; TPS's authors
    choose them again at every step)."""
    features: torch.Tensor
    selected: torch.Tensor | None = None


class PromptTuningViews(ViewsMethod):
    """The frame of TPT and C-TPT. A subclass sets ``views_node`` and ``mixed_precision_node`` to its node (which
    holds SELECTION_P, N_CTX, CTX_INIT, VIEW_AUGMENTATION, MIXED_PRECISION) and writes ``prompt_loss``; ``draw_views`` says how a batch's views are
    drawn. Both encoders stay frozen: the views' image features are computed once per image."""
    protocol = ADAPT_THEN_PREDICT
    episode = "image"

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if model_spec.text_tower != "clip":
            raise backbone_refusal(cls.method_name, cfg, model_spec, "its learnt prompt embeddings enter open_clip "
                                   "CLIP's own causal text transformer (token_embedding, attn_mask), which a "
                                   "custom-text model (EVA, SigLIP) does not have")
        node = cfg[cls.views_node]
        context_prompt_tokens(model_spec.tokenizer(), node.CTX_INIT, node.N_CTX, class_names, cls.views_node)

    def cost_info(self) -> dict:
        """Per test image: the views through the image encoder (once, encoders frozen), OPTIM.STEPS forward +
        backward passes of the text encoder over all class prompts, and one more forward to predict."""
        return {"views_per_image": self.views_per_image, "text_forward_passes_per_image": self.steps + 1,
                "backward_passes_per_image": self.steps}

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        """Freeze all of CLIP and build the learnable prompt (the parameters collected next)."""
        self.model.eval()
        self.model.requires_grad_(False)
        node = self.cfg[self.views_node]
        self.prompt_learner = PromptContext(self.model, node.CTX_INIT, node.N_CTX, self.views_node)

    def collect_params(self):
        return [self.prompt_learner.ctx], ["prompt_learner.ctx"]

    def setup_scaler(self):
        """The references run under CUDA fp16 autocast with a GradScaler (init_scale 1000); none on the CPU."""
        return torch.amp.GradScaler("cuda", init_scale=1000) if self.uses_mixed_precision() else None

    # ------------------------------------------------------------------ state
    def reset_episode(self) -> None:
        """The per-image episodic reset: only the context tokens and the optimizer state (cheap)."""
        self.prompt_learner.restore()
        self._restore_snapshot(("optimizer",))

    # ------------------------------------------------------------------ adaptation
    def text_features(self) -> torch.Tensor:
        pre = self.model.encode_token_embeddings(self.prompt_learner(), self.prompt_learner.tokens)
        return F.normalize(pre, dim=-1)

    def draw_views(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V, C, H, W) views of the batch, view 0 the image itself (default: drawn for the whole batch)."""
        return self.views(x)

    def split_images(self, x: torch.Tensor) -> list[ImageViews]:
        """Every image's views, encoded in one pass for the whole batch (the image encoder is frozen)."""
        views = self.draw_views(x)
        with torch.no_grad(), self.autocast():
            features = F.normalize(self.model.encode_image(views.flatten(0, 1)), dim=-1)
        return [ImageViews(f) for f in features.view(views.shape[0], views.shape[1], -1)]

    def prompt_loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The loss of one step from the confident views' fp32 logits and this step's class text features."""
        raise NotImplementedError

    @torch.enable_grad()
    def forward_and_adapt(self, unit: ImageViews) -> None:
        """One step on the prompt; the confident views are chosen at the first step and kept."""
        with self.autocast():
            text = self.text_features()
            logits = self.model.logits(unit.features, text)
        logits = logits.float()
        if unit.selected is None:
            unit.selected = lowest_entropy_views(logits, self.n_selected)
        self.optimizer_step(self.prompt_loss(logits[unit.selected], text))

    @torch.no_grad()
    def episode_logits(self, unit: ImageViews, outputs) -> torch.Tensor:
        """The image itself, classified with the tuned prompt."""
        with self.autocast():
            return self.model.logits(unit.features[:1], self.text_features()).float()
