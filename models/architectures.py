"""What the suite knows about a CLIP architecture before any weight is loaded: open_clip's model config (with the
project's own tiny configs in models/model_configs/ registered), read into a ``ModelSpec``, and its tokenizer."""
from __future__ import annotations

import difflib
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
    """Register the project's own open_clip model configs (tiny CLIPs for tests and the demo)."""
    global _registered
    if not _registered:
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

    @property
    def image_tower_has_batchnorm(self) -> bool:
        return self.image_tower == "resnet"

    def tokenizer(self):
        return tokenizer_for(self.arch)


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
    return ModelSpec(arch, tower, blocks, size, int(config.get("text_cfg", {}).get("context_length", 77)))


@lru_cache(maxsize=None)
def tokenizer_for(arch: str):
    """open_clip's tokenizer of ``arch`` (one per architecture; it holds no state between calls)."""
    check_arch(arch)
    return open_clip.get_tokenizer(arch)
