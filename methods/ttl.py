"""TTL: test-time low-rank adaptation via confidence maximisation (Imam et al., WACV 2025; official code
Razaimam45/TTL-Test-Time-Low-Rank-Adaptation, ``ttl.py`` ``test_time_tuning`` / ``test_time_adapt_eval``,
``deyo.py`` ``forward_and_adapt_sar`` and ``clip/custom_clip.py`` ``ClipTestTimeTuning`` / ``LoRA_AB``;
TTA-VLM's version: TomSheng21/tta-vlm ``instance_method/ttl.py``, ``clip/custom_clip.py`` ``LoRALinear``,
``LoRAMultiheadAttention``, ``ClipLoraTestTimeTuning_v2``).

LoRA on the query and value projections of the attention of the image tower's blocks TTL.LAYERS (the reference:
9, 10, 11 of ViT-B/16): q = W_q x + b_q + s B_q A_q x, v likewise, s = TTL.ALPHA / TTL.RANK, A (rank x width) drawn
at random (xavier normal) from a generator seeded with RNG_SEED, B zero. Per test image: the image and
TEST.N_AUGMENTATIONS - 1 random views of it; every view re-encoded with the current LoRA (the image tower changes);
OPTIM.STEPS AdamW steps on all A and B minimising the confidence-weighted entropy of the views

    loss = 1/V' sum_i H_i * exp(-(H_i - TTL.ENTROPY_MARGIN)),   H_i = entropy of softmax(logits of view i),

the coefficient detached (DeYO's entropy re-weighting, Ent_0 = 0.4); the text features are the fixed zero-shot
"a photo of a <class>." ones. V' = the views whose entropy is at most ln(1000) (the official filter, TTL.
MAX_ENTROPY_FILTER), or the TTL.SELECTION_P fraction of lowest-entropy views when below 1. Then the image itself
is classified with the adapted tower. With MODEL.EPISODIC, A (to its initial draw), B (to zero) and the optimizer
state come back before every image; the gradient scaler of the mixed-precision path is not part of that reset,
as in both references; ``reset()`` restores everything. The LoRA exists only while this method computes: the
blocks' attention modules are swapped for LoRA-carrying stand-ins around every forward, and the model itself is
never changed.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import ViewsMethod
from methods.losses import softmax_entropy
from methods.registry import register_method

# deyo.py keeps the views with entropy <= math.log(1000): ImageNet's class count, hard-coded there.
REFERENCE_MAX_ENTROPY = math.log(1000)
# The official --init_method choices for A (B always starts at zero): torch.nn.init's xavier_normal_, normal_,
# kaiming_normal_ on the (rank, width) weight of peft's lora_A.
A_INITS = ("xavier", "gaussian", "kaiming")


def draw_lora_a(rank: int, width: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """A (rank, width) on the CPU, drawn from ``generator`` as the official LoRA_AB initialises peft's lora_A."""
    a = torch.empty(rank, width, dtype=torch.float32)     # fp32 LoRA parameters, as both references
    if init == "xavier":
        return nn.init.xavier_normal_(a, generator=generator)
    if init == "gaussian":
        return nn.init.normal_(a, generator=generator)
    return nn.init.kaiming_normal_(a, generator=generator)


class QueryValueLoRA(nn.Module):
    """The LoRA factors of one block's query and value projections: delta(x) = s * B (A x), A (rank, width),
    B (width, rank) zero-initialised (peft's lora_A / lora_B weights)."""

    def __init__(self, q_a: torch.Tensor, v_a: torch.Tensor, scaling: float):
        super().__init__()
        width = q_a.shape[1]
        self.q_A = nn.Parameter(q_a.clone())
        self.q_B = nn.Parameter(torch.zeros(width, q_a.shape[0], dtype=q_a.dtype, device=q_a.device))
        self.v_A = nn.Parameter(v_a.clone())
        self.v_B = nn.Parameter(torch.zeros(width, v_a.shape[0], dtype=v_a.dtype, device=v_a.device))
        self.scaling = scaling

    def delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # peft's order: lora_B(lora_A(x)) * scaling (the low-rank product never forms a width x width matrix)
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scaling


def lora_attention(attn: nn.MultiheadAttention, lora: QueryValueLoRA, q_x: torch.Tensor, k_x: torch.Tensor,
                   v_x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """nn.MultiheadAttention's output (no dropout, no weights) with the LoRA deltas added to the query and value
    projections: what the references' LoRA attention computes (separate q, k, v projections, softmax(q k^T /
    sqrt(head_dim)) v per head, out_proj)."""
    if not attn.batch_first:
        q_x, k_x, v_x = (t.transpose(0, 1) for t in (q_x, k_x, v_x))
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    q = F.linear(q_x, w_q, b_q) + lora.delta(q_x, lora.q_A, lora.q_B)
    k = F.linear(k_x, w_k, b_k)
    v = F.linear(v_x, w_v, b_v) + lora.delta(v_x, lora.v_A, lora.v_B)
    batch, length, width = q.shape
    heads = attn.num_heads
    q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    if attn_mask is not None and attn_mask.dtype == torch.bool:   # nn.MultiheadAttention: True = masked out
        attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    return out if attn.batch_first else out.transpose(0, 1)


class AttentionWithLoRA(nn.Module):
    """Stands in for a block's attention while TTL computes. It refers to the attention and the LoRA as plain
    attributes, not submodules: installed and removed around every forward, it leaves the model's modules and
    their names untouched."""

    def __init__(self, attn: nn.MultiheadAttention, lora: QueryValueLoRA):
        super().__init__()
        self.__dict__.update(attn=attn, lora=lora)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None, **_):
        k_x = q_x if k_x is None else k_x
        v_x = q_x if v_x is None else v_x
        return lora_attention(self.attn, self.lora, q_x, k_x, v_x, attn_mask), None


def weighted_view_entropy(logits: torch.Tensor, margin: float, n_selected: int,
                          max_entropy: float | None) -> torch.Tensor | None:
    """deyo.py's loss of one image's views (V, C) fp32 logits: mean of H_i / exp(H_i.detach() - margin) over the
    n_selected lowest-entropy views when fewer than V (its --filter_ent branch), else over the views with
    H_i <= max_entropy (None: all). None when no view is left (the reference then takes no step)."""
    entropy = softmax_entropy(logits)
    if n_selected < entropy.shape[0]:
        entropy = entropy[entropy.argsort(stable=True)[:n_selected]]
    elif max_entropy is not None:
        entropy = entropy[entropy <= max_entropy]
    if entropy.numel() == 0:
        return None
    coefficient = 1 / torch.exp(entropy.clone().detach() - margin)
    return entropy.mul(coefficient).mean(0)


@register_method("ttl")
class TTL(ViewsMethod):
    views_node = mixed_precision_node = "TTL"
    protocol = ADAPT_THEN_PREDICT
    episode = "image"
    config_defaults = {"TTL": {
        # Blocks of the image tower whose attention gets LoRA (ttl.py --layer_range 9,11 inclusive; TTA-VLM's
        # add_lora layer_indices [9, 10, 11]).
        "LAYERS": Option([9, 10, 11], valid=lambda ls: isinstance(ls, (list, tuple)) and len(ls) > 0 and all(
                             isinstance(i, int) and i >= 0 for i in ls) and list(ls) == sorted(set(ls)),
                         expected="a non-empty increasing list of block indices >= 0, e.g. [9, 10, 11]"),
        "RANK": Option(16, within="[1, inf)"),              # ttl.py --rank 16; TTA-VLM r=16
        "ALPHA": Option(32.0, within="(0, inf)"),           # lora_alpha=32 in both: scaling alpha / rank = 2
        "A_INIT": Option("xavier", choices=A_INITS),        # ttl.py --init_method xavier; TTA-VLM xavier_normal_
        # Ent_0 of the confidence coefficient exp(-(H - Ent_0)): ttl.py --deyo_margin_e0 0.4, TTA-VLM's 0.4.
        "ENTROPY_MARGIN": Option(0.4, within="[0, inf)"),
        # The official deyo.py keeps only views with H <= ln(1000) (and takes no step when none is left); TTA-VLM
        # has no filter (False). With at most 1000 classes it can only drop a view at rounding level.
        "MAX_ENTROPY_FILTER": True,
        # The official ttl.py builds DeYO(steps=tta_steps) inside its own tta_steps loop: OPTIM.STEPS^2 updates
        # (True); TTA-VLM: OPTIM.STEPS updates (False). Both references' scripts use 1 step, where they agree.
        "NESTED_STEPS": True,
        # Fraction of lowest-entropy views in the loss (re-chosen at every update): 1 = all views, as both
        # references (ttl.py's --filter_ent 0); below 1, the official --filter_ent 1 branch with --selection_p.
        "SELECTION_P": Option(1.0, within="(0, 1]"),
        # How the views are made: crop_flip in the official code on every data set (its AugMixAugmenter's
        # aug_list is empty); TTA-VLM uses augmix on the fine-grained sets.
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
        # Both references run under CUDA fp16 autocast with GradScaler(init_scale=1000); ignored on the CPU.
        "MIXED_PRECISION": True,
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if model_spec.image_tower != "vit":
            raise ConfigError(f"ttl adds LoRA to the attention of a ViT image tower; MODEL.ARCH={cfg.MODEL.ARCH} has "
                              f"a {model_spec.image_tower} image tower (choose a ViT architecture)")
        depth = model_spec.vision_layers
        layers = list(cfg.TTL.LAYERS)
        if depth is not None and layers[-1] >= depth:
            raise ConfigError(f"TTL.LAYERS = {layers} names a block beyond the {depth} blocks (0..{depth - 1}) of "
                              f"MODEL.ARCH={cfg.MODEL.ARCH}'s image tower")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        node = cfg.TTL
        self.layers = list(node.LAYERS)
        self.rank, self.scaling = int(node.RANK), float(node.ALPHA) / int(node.RANK)
        self.margin = float(node.ENTROPY_MARGIN)
        self.max_entropy = REFERENCE_MAX_ENTROPY if node.MAX_ENTROPY_FILTER else None
        self.updates_per_step = self.steps if node.NESTED_STEPS else 1

    def cost_info(self) -> dict:
        """Per test image: every view through the image tower (with gradient) at every update, then the image."""
        updates = self.steps * self.updates_per_step
        return {"views_per_image": self.views_per_image, "image_forward_passes_per_image": updates + 1,
                "backward_passes_per_image": updates}

    # ------------------------------------------------------------------ setup
    def attention_layers(self) -> list[nn.MultiheadAttention]:
        """The attention modules of the blocks TTL.LAYERS, checked to be plain self-attention LoRA can wrap."""
        blocks = getattr(getattr(self.model.clip.visual, "transformer", None), "resblocks", None)
        if blocks is None or self.layers[-1] >= len(blocks):
            raise ConfigError(f"TTL.LAYERS = {self.layers}: the image tower of MODEL.ARCH={self.cfg.MODEL.ARCH} has "
                              f"{0 if blocks is None else len(blocks)} transformer blocks")
        attns = [getattr(blocks[i], "attn", None) for i in self.layers]
        if not all(isinstance(a, nn.MultiheadAttention) and a._qkv_same_embed_dim and a.bias_k is None
                   for a in attns):
            raise ConfigError(f"ttl: the blocks TTL.LAYERS = {self.layers} of MODEL.ARCH={self.cfg.MODEL.ARCH} have no "
                              f"plain nn.MultiheadAttention self-attention to add LoRA to")
        return attns

    def configure_model(self) -> None:
        """Freeze all of CLIP; build the LoRA factors, A drawn from a generator seeded with RNG_SEED (the same
        config and seed give the same A, whatever ran before), q before v in every block, blocks in order."""
        self.model.eval()          # as both references (model.eval()): LoRA dropout 0.05 is then inactive
        self.model.requires_grad_(False)
        generator = torch.Generator().manual_seed(int(self.cfg.RNG_SEED))
        init = self.cfg.TTL.A_INIT
        loras = []
        for attn in self.attention_layers():
            q_a = draw_lora_a(self.rank, attn.embed_dim, init, generator)
            v_a = draw_lora_a(self.rank, attn.embed_dim, init, generator)
            loras.append(QueryValueLoRA(q_a.to(self.device), v_a.to(self.device), self.scaling))
        self.lora = nn.ModuleList(loras)

    def collect_params(self):
        """All A and B, in the references' order (per block: q's A, q's B, v's A, v's B)."""
        named = [(f"lora.{i}.{n}", getattr(m, n)) for i, m in enumerate(self.lora)
                 for n in ("q_A", "q_B", "v_A", "v_B")]
        return [p for _, p in named], [n for n, _ in named]

    def setup_scaler(self):
        """The references run under CUDA fp16 autocast with a GradScaler (init_scale 1000); none on the CPU."""
        return torch.amp.GradScaler("cuda", init_scale=1000) if self.uses_mixed_precision() else None

    # ------------------------------------------------------------------ state
    def reset_episode(self) -> None:
        """Before every image (MODEL.EPISODIC): A to its initial draw, B to zero, a fresh optimizer state (the
        official LoRA_reset and optimizer.load_state_dict(optim_state))."""
        with torch.no_grad():
            for name, p in self.lora.named_parameters():
                p.copy_(self._snapshot["module"][f"lora.{name}"])
        self._restore_snapshot(("optimizer",))

    # ------------------------------------------------------------------ adaptation
    @contextlib.contextmanager
    def lora_in_image_tower(self):
        """The model with the LoRA in the blocks TTL.LAYERS, for the duration of the block."""
        blocks = self.model.clip.visual.transformer.resblocks
        originals = [blocks[i].attn for i in self.layers]
        try:
            for i, attn, lora in zip(self.layers, originals, self.lora):
                blocks[i].attn = AttentionWithLoRA(attn, lora)
            yield
        finally:
            for i, attn in zip(self.layers, originals):
                blocks[i].attn = attn

    def split_images(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every image's views (V, C, H, W), view 0 the image itself, drawn image by image (the batch size changes
        nothing)."""
        return list(self.views.image_by_image(x))

    @torch.enable_grad()
    def forward_and_adapt(self, views: torch.Tensor) -> None:
        """One step: all views in one forward through the current LoRA, one update on the weighted entropy
        (OPTIM.STEPS updates with TTL.NESTED_STEPS, the official nesting)."""
        for _ in range(self.updates_per_step):
            with self.lora_in_image_tower(), self.autocast():
                logits = self.model(views)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))     # fp16 under autocast
            loss = weighted_view_entropy(logits, self.margin, self.n_selected, self.max_entropy)
            if loss is not None:
                self.optimizer_step(loss)

    @torch.no_grad()
    def episode_logits(self, views: torch.Tensor, outputs) -> torch.Tensor:
        """The image itself, classified by the adapted image tower."""
        with self.lora_in_image_tower(), self.autocast():
            return self.model(views[:1]).float()
