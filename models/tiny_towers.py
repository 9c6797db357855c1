"""Tiny timm image towers for the test configs in models/model_configs/: timm's own recipes of the towers the real
open_clip configs name (EVA02-B-16's ``eva02_base_patch16_clip_224``, ViT-B-16-SigLIP's
``vit_base_patch16_siglip_224``) with test dimensions (32 px images, patch 8, width 64, 2 blocks), registered under
names of their own so that an open_clip config can name them in ``timm_model_name``. open_clip builds a timm tower at
the timm model's own input size (it passes no ``img_size``), hence a registered model rather than keyword arguments
in the JSON."""
from __future__ import annotations

from timm.models import eva, register_model, vision_transformer

TINY_DIMS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def eva02_tiny_clip_test(pretrained: bool = False, **kwargs):
    """EVA02-CLIP's tower (rotary position embedding, SwiGLU MLP, sub-LN attention) at test size."""
    return eva.eva02_base_patch16_clip_224(pretrained=pretrained, **TINY_DIMS, ref_feat_shape=(4, 4), **kwargs)


def vit_tiny_siglip_test(pretrained: bool = False, **kwargs):
    """SigLIP's tower (no class token, attention-pooling head "map") at test size."""
    return vision_transformer.vit_base_patch16_siglip_224(pretrained=pretrained, **TINY_DIMS, **kwargs)


TINY_TIMM_TOWERS = (eva02_tiny_clip_test, vit_tiny_siglip_test)


def register_tiny_timm_towers() -> None:
    """Make the tiny towers known to timm.create_model (once per process: timm warns when a name is registered
    again)."""
    for entrypoint in TINY_TIMM_TOWERS:
        register_model(entrypoint)
