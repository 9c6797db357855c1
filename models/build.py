"""The one way to build the model a run adapts: CLIP weights per MODEL.*, the zero-shot head per CLIP.*."""
from __future__ import annotations

from typing import Sequence

import torch

from conf.errors import ConfigError
from models.clip import ZeroShotCLIP, zero_shot_head
from models.weights import WeightsSource, load_clip, resolve_weights


def check_precision(precision: str, device) -> None:
    if str(torch.device(device).type) == "cpu" and precision != "fp32":
        raise ConfigError(f"CLIP.PRECISION {precision} needs CUDA; on the CPU use fp32.")


def resolve_model_weights(cfg) -> WeightsSource:
    """The weights a run would load, checked without loading them (harness.build calls this first)."""
    return resolve_weights(cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS, cache_dir=cfg.CKPT_DIR,
                           allow_download=cfg.MODEL.ALLOW_DOWNLOAD)


def build_zero_shot_clip(cfg, class_names: Sequence[str], templates: Sequence[str], device,
                         weights: WeightsSource | None = None) -> tuple[ZeroShotCLIP, dict]:
    """The zero-shot CLIP of ``cfg`` for ``class_names`` x ``templates`` on ``device``; returns (model, provenance).
    ``weights``: what resolve_model_weights found, when the caller checked it already."""
    precision = cfg.CLIP.PRECISION
    check_precision(precision, device)
    loaded = load_clip(cfg.MODEL.ARCH, weights or resolve_model_weights(cfg), precision=precision, device=device,
                       cache_dir=cfg.CKPT_DIR, force_quick_gelu=cfg.MODEL.FORCE_QUICK_GELU)
    pcfg = loaded.preprocess_cfg
    model = zero_shot_head(loaded, cfg.MODEL.ARCH, class_names, templates, cfg.CLIP.TRUNCATE_TEXT).to(device)
    model.eval()
    provenance = {
        "arch": cfg.MODEL.ARCH, "weights": loaded.weights, "weights_source": loaded.weights_source,
        "precision": precision, "image_size": model.image_size,
        "interpolation": pcfg.get("interpolation", "bicubic"), "resize_mode": pcfg.get("resize_mode", "shortest"),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_templates": len(templates), "text_tokens_length": int(model.tokens.shape[1]),
    }
    return model, provenance
