"""CALIP (Guo, Zhang, Qiu, Ma, Miao, He, Cui, AAAI 2023, "CALIP: Zero-Shot Enhancement of CLIP with
Parameter-free Attention").

Training-free, image by image: nothing in CLIP changes and every image is classified on its own. With the
image's tokens projected to the joint space and each L2-normalised, g (D) the global token and V (D, L) the
L spatial ones, and T (C, D) the normalised text features:

  A   = 2 V^T T^T                                   (L, C), parameter-free cross attention
  T_a = V softmax_L(A)                               (D, C): text features refined by the image
  v_a = mean_L(softmax_C(A) T) + max_L(softmax_C(A) T)   (D): the image's tokens refined by the text
  logits = 100 g T^T + BETA_2 * 100 g T_a + BETA_3 * 100 v_a T^T

The tokens: ViT, every token of the last block after ln_post and the projection (token 0 the class token,
i.e. CLIP's image feature); ResNet, the attention pool with every position as a query (token 0 the mean
query, i.e. CLIP's image feature), as the official code's AttentionPool2d.

Equal to CLIPTTA's ttavlm/methods/calip.py (forward_and_adapt, new_logits; the ViT's tokens from its
VisionTransformer with use_local), which computes what the official ZiyuGuo99/CALIP run_imagenet.py does for
one fixed (BETA_2, BETA_3) instead of its search of both on the test labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf import ConfigError, Option
from methods.base import TRAINING_FREE, TTAMethod
from methods.caches import REFERENCE_LOGIT_SCALE
from methods.registry import register_method

# The fixed inverse temperature of the attention map (``A_weight = ... * 2`` in both references).
ATTENTION_SCALE = 2.0


def vit_tokens(visual, images: torch.Tensor) -> torch.Tensor:
    """(B, 1 + L, D): open_clip's VisionTransformer with ln_post and proj applied to every token (the class token
    first, equal to the tower's output)."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False) \
            or getattr(visual, "pool_type", "tok") != "tok":
        raise ConfigError("CALIP needs a ViT image tower pooled at its class token (CLIP's); this one pools "
                          "otherwise")
    x = visual.transformer(visual._embeds(images))
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


def resnet_tokens(visual, images: torch.Tensor) -> torch.Tensor:
    """(B, 1 + HW, D): open_clip's ModifiedResNet with its attention pool answering every position's query (the
    mean query first, equal to the tower's output), as the official CALIP's AttentionPool2d."""
    pool = visual.attnpool
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return x.permute(1, 0, 2)


def calip_logits(tokens: torch.Tensor, text_features: torch.Tensor, beta_2: float, beta_3: float):
    """CALIP's logits (B, C) from normalised tokens (B, 1 + L, D) and text features (C, D); every image alone."""
    global_features, spatial = tokens[:, 0, :], tokens[:, 1:, :]           # (B, D), (B, L, D)
    attention = spatial @ text_features.t() * ATTENTION_SCALE                 # (B, L, C)
    over_positions = attention.softmax(dim=1)
    over_classes = attention.softmax(dim=2)
    attended_text = spatial.transpose(1, 2) @ over_positions                  # (B, D, C)
    attended_visual = over_classes @ text_features                            # (B, L, D)
    attended_visual = attended_visual.mean(1) + attended_visual.max(1)[0]     # (B, D)
    logits_text = REFERENCE_LOGIT_SCALE * (global_features.unsqueeze(1) @ attended_text).squeeze(1)
    logits_visual = REFERENCE_LOGIT_SCALE * attended_visual @ text_features.t()
    clip_logits = REFERENCE_LOGIT_SCALE * global_features @ text_features.t()
    return clip_logits + logits_text * beta_2 + logits_visual * beta_3


@register_method("calip")
class CALIP(TTAMethod):
    protocol = TRAINING_FREE
    config_defaults = {"CALIP": {
        # Weights of the text-side and the visual-side attended logits, the paper's beta_2 and beta_3 (the CLIP
        # logits' beta_1 is 1): CLIPTTA's --beta_calip 2.0 0.1 (the official ImageNet config's search bounds).
        "BETA_2": Option(2.0, within="[0, inf)"),
        "BETA_3": Option(0.1, within="[0, inf)"),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if model_spec.image_tower not in ("vit", "resnet"):
            raise ConfigError(f"CALIP needs the spatial tokens of an open_clip ViT or ModifiedResNet image tower; "
                              f"MODEL.ARCH={cfg.MODEL.ARCH} has a {model_spec.image_tower} tower")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.beta_2 = float(cfg.CALIP.BETA_2)
        self.beta_3 = float(cfg.CALIP.BETA_3)

    def cost_info(self) -> dict:
        return {"views_per_image": 1, "forward_passes_per_image": 1, "backward_passes_per_image": 0}

    def image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every image's tokens in the joint space, each L2-normalised (B, 1 + L, D)."""
        visual = self.model.clip.visual
        images = self.model.normalize(x.to(next(visual.parameters()).dtype))
        with self.autocast():
            tokens = resnet_tokens(visual, images) if hasattr(visual, "attnpool") else vit_tokens(visual, images)
        return F.normalize(tokens, dim=-1)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.image_tokens(x)
        # The attention in fp32 at least (fp16 only from autocast); fp64 runs stay fp64.
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        text_features = self.model.text_features()[0].to(dtype)
        return calip_logits(tokens.to(dtype), text_features, self.beta_2, self.beta_3)
