"""What the suite knows about a CLIP architecture before any weight is loaded: open_clip's model config (with the
project's own tiny configs in models/model_configs/ registered), read into a ``ModelSpec``, and its tokenizer."""
from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import open_clip

from conf.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


class WeightsError(UserError):
    """A CLIP architecture or its weights cannot be used as asked; the message says what to do."""


def register_model_configs() -> None:
    """Register the project's own open_clip model configs (tiny CLIPs for tests and the demo) and the tiny timm
    towers two of them name (models/tiny_towers.py)."""
    global _registered
    if not _registered:
        from models.tiny_towers import register_tiny_timm_towers
        register_tiny_timm_towers()
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class ModelSpec:
    """An architecture as its config describes it, for checks that need no weights."""
    arch: str
    image_tower: str                  # "vit" (open_clip VisionTransformer), "resnet" (ModifiedResNet) or "timm"
    vision_layers: int | None         # residual blocks of a ViT image tower (None for the others)
    image_size: int
    context_length: int
    family: str = "vit"               # one of FAMILIES: the image tower's, or "siglip" for a sigmoid-loss model
    text_tower: str = "clip"          # one of TEXT_TOWERS

    @property
    def has_logit_bias(self) -> bool:
        """SigLIP's logits are logit_scale.exp() * cos + logit_bias (models/clip.py adds the bias)."""
        return self.family == "siglip"

    @property
    def image_tower_has_batchnorm(self) -> bool:
        return self.image_tower == "resnet"

    def tokenizer(self):
        return tokenizer_for(self.arch)


# The families of CLIP-style models the suite serves (docs/architecture.md, "Backbones"): the image tower's kind for a
# CLIP trained with the softmax contrastive loss; "siglip" for a model with a logit bias (sigmoid loss), whatever
# its image tower.
FAMILIES = ("vit", "resnet", "timm", "siglip")
# The text towers: "clip" is open_clip CLIP's own causal transformer pooled at the end-of-text token
# (clip.transformer, clip.token_embedding: what prompt learners feed embeddings into); "custom" is open_clip's
# CustomTextCLIP text model (``custom_text`` configs: EVA, SigLIP), reached only through encode_text.
TEXT_TOWERS = ("clip", "custom")


def check_arch(arch: str) -> None:
    register_model_configs()
    if arch not in open_clip.list_models():
        near = difflib.get_close_matches(arch, open_clip.list_models(), n=5, cutoff=0.4)
        raise WeightsError(f"Unknown CLIP architecture MODEL.ARCH '{arch}' (names are case-sensitive; this suite "
                           f"evaluates open_clip CLIP models only, where the authors' suite reads names such as "
                           f"Standard or resnet50 as RobustBench / torchvision models with MODEL.USE_CLIP False). "
                           f"Nearest open_clip names: {near}")


def model_spec(arch: str) -> ModelSpec:
    check_arch(arch)
    config = open_clip.get_model_config(arch) or {}
    vision = config.get("vision_cfg", {})
    layers = vision.get("layers")
    if vision.get("timm_model_name"):
        tower, blocks = "timm", None
    elif isinstance(layers, (list, tuple)):
        tower, blocks = "resnet", None
    else:
        tower, blocks = "vit", int(layers) if layers is not None else None
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    family = "siglip" if config.get("init_logit_bias") is not None else tower
    text_tower = "custom" if config.get("custom_text") or config.get("text_cfg", {}).get("hf_model_name") else "clip"
    return ModelSpec(arch, tower, blocks, size, int(config.get("text_cfg", {}).get("context_length", 77)), family,
                     text_tower)


def hf_tokenizer_name(arch: str) -> str | None:
    """The Hugging Face tokenizer open_clip.get_tokenizer takes for ``arch`` (SigLIP's and other custom-text models'),
    or None for open_clip's own CLIP tokenizer (which ships with open_clip)."""
    text = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    if text.get("hf_tokenizer_name"):
        return text["hf_tokenizer_name"]
    return f"SigLIP's ({arch})" if "siglip" in arch.lower() else None   # open_clip picks it by the name


def check_tokenizer(arch: str) -> None:
    """Refuse, before any model loads, an architecture whose tokenizer needs a package that is not installed."""
    name = hf_tokenizer_name(arch)
    if name is not None and importlib.util.find_spec("transformers") is None:
        raise WeightsError(f"MODEL.ARCH={arch} tokenizes with the Hugging Face tokenizer {name}, which needs the "
                           f"package transformers (not installed) and the tokenizer's files in the Hugging Face "
                           f"cache: install transformers and run once with network access")


@lru_cache(maxsize=None)
def tokenizer_for(arch: str):
    """open_clip's tokenizer of ``arch`` (one per architecture; it holds no state between calls)."""
    check_arch(arch)
    return open_clip.get_tokenizer(arch)
