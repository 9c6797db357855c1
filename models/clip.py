"""CLIP as a zero-shot classifier: class names x prompt templates -> text features, and
logits = logit_scale.exp() * cos(image feature, text feature), + logit_bias for a model that has one (SigLIP; what
methods' softmax-based quantities then are: MODEL.SIGLIP_PROBABILITIES, docs/architecture.md "Backbones").

Images enter as [0, 1] tensors of the model's input size; the CLIP mean/std normalisation happens
here, inside the model, as in the authors' suite. The model carries its tokenizer, so methods that build
prompts of their own (TPT, WATT) never ask open_clip for one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from models.architectures import tokenizer_for


@dataclass
class ClipOutput:
    logits: torch.Tensor              # (B, C)
    image_features: torch.Tensor      # (B, D) L2-normalised
    text_features: torch.Tensor       # (C, D) L2-normalised (template ensemble: mean of normalised, renormalised)
    image_pre_features: torch.Tensor  # (B, D) encode_image output, before normalisation
    text_pre_features: torch.Tensor   # (C, D) encode_text output (ensemble: mean over templates)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class _Shared:
    """Holds an object that copies of the model share instead of duplicating (a tokenizer's vocabulary is
    large, read-only and costs 0.2 s to deep-copy)."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class ZeroShotCLIP(nn.Module):
    def __init__(self, clip: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], truncate_text: bool = True):
        super().__init__()
        if not templates:
            raise ValueError("at least one prompt template is needed")
        self.clip = clip
        self._tokenizer = _Shared(tokenizer)
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        texts = [t.format(c) for c in self.class_names for t in self.templates]   # class-major
        self.truncate_text = truncate_text and self._text_is_causal_eot_pooled()
        self.register_buffer("tokens", self.truncate_tokens(tokenizer(texts)), persistent=False)
        self.text_param_names = [n for n, _ in self.text_named_parameters()]
        self._text_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ towers and parameters
    @property
    def tokenizer(self):
        """texts -> (N, context length) token ids, the model's own tokenizer."""
        return self._tokenizer.obj

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        size = getattr(self.clip.visual, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def image_named_parameters(self):
        return self.clip.visual.named_parameters(prefix="clip.visual")

    def text_named_parameters(self):
        """Every parameter of the text side: all of CLIP except the image tower and the logit scale/bias."""
        for name, p in self.clip.named_parameters(prefix="clip"):
            if not name.startswith("clip.visual.") and name not in ("clip.logit_scale", "clip.logit_bias"):
                yield name, p

    def text_tower_trainable(self) -> bool:
        return any(p.requires_grad for _, p in self.text_named_parameters())

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp()

    # ------------------------------------------------------------------ text side
    def _text_is_causal_eot_pooled(self) -> bool:
        clip = self.clip
        return (isinstance(clip, open_clip.model.CLIP) and getattr(clip, "attn_mask", None) is not None
                and getattr(clip, "text_pool_type", "argmax") in ("argmax", "eos"))

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of each sequence's end-of-text token (where CLIP pools the text feature)."""
        if getattr(self.clip, "text_pool_type", "argmax") == "eos":
            return (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def truncate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens cut after the longest prompt's end-of-text token when truncation is on. CLIP's text
        transformer is causal and pools at that token, so later positions never influence any feature:
        cutting them off is exact."""
        return tokens[:, : int(self.eot_index(tokens).max()) + 1] if self.truncate_text else tokens

    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Run CLIP's text transformer on token embeddings (B, L, width) for ``tokens`` (B, L).

        Shared by prompt-learning methods (TPT), which replace some embeddings by learned vectors.
        Works for any L <= context length (exact for L >= the EOT position, see __init__)."""
        clip = self.clip
        length = tokens.shape[1]
        cast = clip.transformer.get_cast_dtype()
        x = embeddings.to(cast) + clip.positional_embedding[:length].to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return x

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.truncate_text:
            return self.encode_token_embeddings(self.clip.token_embedding(tokens), tokens)
        return self.clip.encode_text(tokens)

    def _compute_text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.encode_tokens(self.tokens).float()
        pre = pre.view(self.num_classes, len(self.templates), -1)
        normalised = F.normalize(F.normalize(pre, dim=-1).mean(dim=1), dim=-1)
        return normalised, pre.mean(dim=1)

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised (C, D), unnormalised (C, D)) text features.

        Cached while no text-side parameter requires grad (nothing there can change); recomputed
        with gradient at every call otherwise, so adapted text LayerNorms take effect."""
        if self.text_tower_trainable():
            self._text_cache = None
            return self._compute_text_features()
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self._compute_text_features()
        return self._text_cache

    def invalidate_text_cache(self) -> None:
        self._text_cache = None

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_text_cache()
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ image side
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings of [0, 1] images (cast to the image tower's dtype, never half
        against fp32 weights)."""
        visual_dtype = _dtype_of(self.clip.visual)
        return self.clip.encode_image(self.normalize(images.to(visual_dtype)))

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        out = self.logit_scale * image_features @ text_features.t().to(image_features.dtype)
        bias = getattr(self.clip, "logit_bias", None)
        return out + bias.detach() if bias is not None else out

    def forward(self, images: torch.Tensor, return_features: bool = False):
        image_pre = self.encode_image(images)
        image_features = F.normalize(image_pre, dim=-1)
        text_features, text_pre = self.text_features()
        logits = self.logits(image_features, text_features)
        if return_features:
            return ClipOutput(logits, image_features, text_features, image_pre, text_pre)
        return logits


def zero_shot_head(loaded, arch: str, class_names: Sequence[str], templates: Sequence[str],
                   truncate_text: bool = True) -> ZeroShotCLIP:
    """ZeroShotCLIP around a loaded open_clip model (models.weights.LoadedClip), with the model's own
    normalisation constants and tokenizer."""
    mean = loaded.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = loaded.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return ZeroShotCLIP(loaded.model, tokenizer_for(arch), class_names, templates, mean, std,
                        truncate_text=truncate_text)
