"""The one way to build the model a run adapts (CLIP weights per MODEL.*, the zero-shot head per CLIP.*) and the
further CLIPs a method needs beside it (TTAMethod.auxiliary_models)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from conf.errors import ConfigError
from models.architectures import WeightsError
from models.clip import ZeroShotCLIP, zero_shot_head
from models.weights import WeightsSource, load_clip, resolve_weights


def check_precision(precision: str, device) -> None:
    if str(torch.device(device).type) == "cpu" and precision != "fp32":
        raise ConfigError(f"CLIP.PRECISION {precision} needs CUDA; on the CPU use fp32.")


def resolve_model_weights(cfg) -> WeightsSource:
    """The weights a run would load, checked without loading them (harness.build calls this first)."""
    return resolve_weights(cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS, cache_dir=cfg.CKPT_DIR,
                           allow_download=cfg.MODEL.ALLOW_DOWNLOAD)


@dataclass(frozen=True)
class AuxiliaryModel:
    """A further CLIP a method needs beside the one it adapts (``TTAMethod.auxiliary_models``, e.g. RLCF's reward
    model): the keys that name it, its architecture and its weights, checked without loading them."""
    arch_key: str
    weights_key: str
    arch: str
    weights: WeightsSource


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _naming(err: WeightsError, arch_key: str, weights_key: str) -> WeightsError:
    """The refusal of an auxiliary model's weights in the words of the keys that name them."""
    return WeightsError(str(err).replace("MODEL.WEIGHTS", weights_key).replace("MODEL.ARCH", arch_key))


def resolve_auxiliary_weights(cfg, arch_key: str, weights_key: str) -> AuxiliaryModel:
    """The auxiliary CLIP that ``arch_key`` and ``weights_key`` name, checked as MODEL.ARCH / MODEL.WEIGHTS are
    (refused in one line naming these keys; never a silent substitute for an empty one)."""
    arch, weights = str(_value(cfg, arch_key)), str(_value(cfg, weights_key))
    if not arch or not weights:
        raise ConfigError(f"{arch_key} '{arch}' and {weights_key} '{weights}': the method needs this further CLIP; "
                          f"set both (an open_clip architecture, and a pretrained tag, a checkpoint file or 'none')")
    try:
        source = resolve_weights(arch, weights, cache_dir=cfg.CKPT_DIR, allow_download=cfg.MODEL.ALLOW_DOWNLOAD)
    except WeightsError as err:
        raise _naming(err, arch_key, weights_key) from None
    return AuxiliaryModel(arch_key, weights_key, arch, source)


def build_auxiliary_clip(cfg, auxiliary: AuxiliaryModel, class_names: Sequence[str], templates: Sequence[str],
                         device) -> tuple[ZeroShotCLIP, dict]:
    """The auxiliary CLIP as a zero-shot classifier of the run's classes and templates, at the run's precision,
    frozen; returns (model, provenance)."""
    try:
        model, provenance = build_zero_shot_clip(cfg, class_names, templates, device, auxiliary.weights,
                                                 arch=auxiliary.arch)
    except WeightsError as err:
        raise _naming(err, auxiliary.arch_key, auxiliary.weights_key) from None
    model.requires_grad_(False)
    return model, provenance


def build_zero_shot_clip(cfg, class_names: Sequence[str], templates: Sequence[str], device,
                         weights: WeightsSource | None = None, arch: str | None = None) -> tuple[ZeroShotCLIP, dict]:
    """The zero-shot CLIP of ``cfg`` for ``class_names`` x ``templates`` on ``device``; returns (model, provenance).
    ``weights``: what resolve_model_weights found, when the caller checked it already; ``arch``: another
    architecture than MODEL.ARCH (an auxiliary model's, with its ``weights``)."""
    precision = cfg.CLIP.PRECISION
    check_precision(precision, device)
    arch = arch or cfg.MODEL.ARCH
    loaded = load_clip(arch, weights or resolve_model_weights(cfg), precision=precision, device=device,
                       cache_dir=cfg.CKPT_DIR, force_quick_gelu=cfg.MODEL.FORCE_QUICK_GELU)
    pcfg = loaded.preprocess_cfg
    model = zero_shot_head(loaded, arch, class_names, templates, cfg.CLIP.TRUNCATE_TEXT).to(device)
    model.eval()
    provenance = {
        "arch": arch, "weights": loaded.weights, "weights_source": loaded.weights_source,
        "precision": precision, "image_size": model.image_size,
        "interpolation": pcfg.get("interpolation", "bicubic"), "resize_mode": pcfg.get("resize_mode", "shortest"),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_templates": len(templates), "text_tokens_length": int(model.tokens.shape[1]),
    }
    return model, provenance
