"""TCA: token condensation as training-free test-time adaptation (Wang et al., "Is Less More? Exploring Token
Condensation as Training-free Test-time Adaptation", ICCV 2025, arXiv 2410.14729; official code Jo-wang/TCA
``runner.py`` (``run_test_tca``, ``update_reservoir_sim``, ``compute_reservoir_logits``), ``utils.py``
(``get_clip_logits``, ``cls_feature_similarity``) and ``clip/model.py`` (``ResidualAttentionBlock_Ours`` /
``_EViT``, ``Transformer_drop``, ``CLIP.update_cls_token``), ``clip/utils.py`` (``coreset_averaging``,
``k_center_greedy``)). Nothing is trained.

Per test image, in stream order:

1. The image tower runs with token condensation in the blocks TCA.LAYERS (reference: 3, 6, 9 of ViT-B/16) at rate
   r = TCA.PRUNING_RATE (``--token_pruning Ours-0.1``). In such a block with N tokens the attention runs as usual
   (with the class-token guide below, once there is one); then, from the class token's attention to the N - 1 patch
   tokens averaged over heads, the top ``left = ceil((1 - r)(N - 1))`` patches are ranked. "ours": the first
   ``left - 2 (N - left)`` are kept as they are (in ranking order), the next ``2 (N - left)`` are condensed into
   TCA.NUM_CENTERS tokens by coreset averaging (k-center greedy centers from a random first one, every token
   assigned to its nearest center, each cluster's inverse-distance weighted mean, the center itself weight 1), and
   the rest are fused into one token, their sum weighted by their attention; "evit": all ``left`` are kept and the
   rest fused. The block's MLP then runs on [class, kept, condensed, fused].
   The guide (TCA.CLS_GUIDANCE, ``--flag``): once every class holds at least two reservoir entries, the mean class
   tokens of each class's entries (per block) form the guide; a condensing block i prepends, for every image, the
   guide token of block i - 1 most cosine-similar to the image's class token to the attention's input (keys,
   values and queries; its output row and its attention row and column are dropped afterwards).
2. Clip logits ``100 * f . t`` of the normalised feature f; the entropy of their softmax; the pseudo-label.
3. The reservoir of the pseudo-label's class takes (f, entropy, the image's class tokens of every block). Above
   TCA.RESERVOIR_SIZE entries one is dropped: the one with the highest entropy + mean cosine similarity to the
   others (TCA.DIVERSITY; the similarity of the class tokens averaged over blocks with TCA.TOKEN_SIMILARITY, of f
   without), then the entries are sorted by entropy.
4. The prediction, with the image already in the reservoir: clip logits + TCA.LAMBDA * sum_entries
   exp(-BETA (1 - a)) one_hot(entry's class), a = sum_l w_l cos(image's class token of block l, entry's), w the
   softmax-like weights exp(linspace(0, 1, depth) / TCA.SCALE), normalised.

The image tower's own modules compute every block (the model is never changed); only the condensing blocks are
rearranged around them. Images are encoded as one batch while the guide is off (or cannot matter); once it is on,
each image changes it for the next, so they are encoded one at a time. The reservoir (features, class tokens,
entropies, counts), the guide and the random first centers (a generator seeded with RNG_SEED, drawn image by image)
are state that ``reset()`` restores, so a batch of 4 gives the logits of four batches of 1. The reservoir
arithmetic runs in fp32 (the reference: fp16, its model's precision).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import TRAINING_FREE, TTAMethod
from methods.caches import REFERENCE_LOGIT_SCALE
from methods.losses import softmax_entropy
from methods.registry import register_method

# The reference's token_pruning names (``--token_pruning <name>-<rate>``); its ToME variant is not provided.
PRUNING_RULES = ("ours", "evit")


def condensation_plan(n_tokens: int, layers, rate: float, rule: str, num_centers: int, depth: int) -> list:
    """Per block: None (a plain block) or (tokens in, patches ranked ``left``, patches kept as they are, patches
    condensed by coreset averaging); the token counts of ``ResidualAttentionBlock_Ours`` / ``_EViT``."""
    plan, n = [], n_tokens
    for i in range(depth):
        if i not in layers or rate <= 0:
            plan.append(None)
            continue
        left = math.ceil((1 - rate) * (n - 1))
        if rule == "ours":
            merged = n - left
            kept, clustered = left - 2 * merged, 2 * merged
            new_n = 1 + kept + num_centers + 1
        else:
            kept, clustered, new_n = left, 0, 1 + left + 1
        if left < 1 or kept < 0:
            raise ConfigError(f"TCA.PRUNING_RATE = {rate}: block {i} has {n} tokens; {rule} keeps ceil((1 - rate)"
                              f"(N - 1)) = {left} of them, too few for its rule (lower the rate)")
        plan.append((n, left, kept, clustered))
        n = new_n
    return plan


def coreset_average(tokens: torch.Tensor, first: torch.Tensor, num_centers: int) -> torch.Tensor:
    """``coreset_averaging`` of every image's tokens (B, n, W) at once: k-center greedy centers from the first
    center ``first`` (B,), each token assigned to its nearest center (cdist, argmin), per cluster the mean of its
    tokens weighted by 1 / distance to the center (a token at distance 0 weight 1), normalised; an empty
    cluster gives a zero token. Returns (B, num_centers, W)."""
    batch, n, width = tokens.shape
    rows = torch.arange(batch, device=tokens.device)
    chosen = [first]
    nearest = (tokens - tokens[rows, first].unsqueeze(1)).norm(dim=2)
    for _ in range(num_centers - 1):
        nxt = nearest.argmax(dim=1)
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (tokens - tokens[rows, nxt].unsqueeze(1)).norm(dim=2))
    centers = tokens.gather(1, torch.stack(chosen, 1).unsqueeze(-1).expand(-1, -1, width))
    assign = torch.cdist(tokens.float(), centers.float()).argmin(dim=2)                  # (B, n)
    own = centers.gather(1, assign.unsqueeze(-1).expand(-1, -1, width))
    distance = (tokens - own).norm(dim=2)
    eps = 1e-8
    distance = torch.where(distance == 0, torch.full_like(distance, eps), distance)
    weight = 1 / distance
    weight = torch.where(distance == eps, torch.ones_like(weight), weight)
    total = torch.zeros(batch, num_centers, dtype=weight.dtype, device=weight.device).scatter_add_(1, assign, weight)
    weight = weight / total.gather(1, assign)
    out = torch.zeros(batch, num_centers, width, dtype=tokens.dtype, device=tokens.device)
    return out.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, width), tokens * weight.unsqueeze(-1))


def attention_with_weights(block: nn.Module, h: torch.Tensor):
    """The block's own attention of normalised tokens h (B, L, W): its output and per-head weights (B, H, L, L)."""
    attn = block.attn
    if attn.batch_first:
        out, weights = attn(h, h, h, need_weights=True, average_attn_weights=False)
        return out, weights
    t = h.transpose(0, 1)
    out, weights = attn(t, t, t, need_weights=True, average_attn_weights=False)
    return out.transpose(0, 1), weights


@register_method("tca")
class TCA(TTAMethod):
    protocol = TRAINING_FREE
    config_defaults = {"TCA": {
        # Entries kept per class (configs/<set>.yaml reservoir_size), the layer-weight temperature (scale), the
        # weight of the reservoir logits (lambd) and the sharpness of their affinity (beta): configs/imagenet.yaml.
        "RESERVOIR_SIZE": Option(3, within="[1, inf)"),
        "SCALE": Option(0.1, within="(0, inf)"),
        "LAMBDA": Option(3.0, within="[0, inf)"),
        "BETA": Option(5.0, within="[0, inf)"),
        # The condensation rule of --token_pruning: "ours" (ResidualAttentionBlock_Ours) or "evit" (_EViT).
        "PRUNING": Option("ours", choices=PRUNING_RULES),
        # The rate of --token_pruning Ours-0.1 (runner.py's default; the README's table says Ours-0.035). 0: no
        # condensation, the plain tower.
        "PRUNING_RATE": Option(0.1, within="[0, 1)"),
        # The condensing blocks (clip/model.py VisionTransformer.drop_loc = [3, 6, 9]).
        "LAYERS": Option([3, 6, 9], valid=lambda ls: isinstance(ls, (list, tuple)) and len(ls) > 0 and all(
                             isinstance(i, int) and i >= 0 for i in ls) and list(ls) == sorted(set(ls)),
                         expected="a non-empty increasing list of block indices >= 0, e.g. [3, 6, 9]"),
        # Tokens the "ours" rule condenses the next-ranked patches into (coreset_averaging(..., num_centers=4)).
        "NUM_CENTERS": Option(4, within="[1, inf)"),
        # --div True: drop the entry with the highest entropy + similarity; False: entropy + int(entropy range /
        # dissimilarity range) * (1 - similarity) (0 when the dissimilarities are all equal; the code divides by 0).
        "DIVERSITY": True,
        # --token_sim True: the similarity of the class tokens averaged over blocks; False: of the image features.
        "TOKEN_SIMILARITY": True,
        # --flag True: the class tokens of the reservoir guide the condensing blocks' attention.
        "CLS_GUIDANCE": True,
        # Scale of the clip logits: "fixed_100" as the code (utils.get_clip_logits ``100. *``) or "model".
        "LOGIT_SCALE": Option("fixed_100", choices=("fixed_100", "model")),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if model_spec.image_tower != "vit":
            raise ConfigError(f"tca condenses the tokens of a ViT image tower; MODEL.ARCH={cfg.MODEL.ARCH} has a "
                              f"{model_spec.image_tower} image tower (choose a ViT architecture)")
        depth, layers = model_spec.vision_layers, list(cfg.TCA.LAYERS)
        if depth is not None and layers[-1] >= depth:
            raise ConfigError(f"TCA.LAYERS = {layers} names a block beyond the {depth} blocks (0..{depth - 1}) of "
                              f"MODEL.ARCH={cfg.MODEL.ARCH}'s image tower")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        t = cfg.TCA
        self.capacity, self.lambd, self.beta, self.scale = int(t.RESERVOIR_SIZE), float(t.LAMBDA), float(t.BETA), \
            float(t.SCALE)
        self.rule, self.rate, self.layers = t.PRUNING, float(t.PRUNING_RATE), list(t.LAYERS)
        self.num_centers = int(t.NUM_CENTERS)
        self.diversity, self.token_similarity, self.cls_guidance = bool(t.DIVERSITY), bool(t.TOKEN_SIMILARITY), \
            bool(t.CLS_GUIDANCE)
        self.seed = int(cfg.RNG_SEED)
        self.center_rng = torch.Generator().manual_seed(self.seed)

    def setup_scaler(self):
        """Nothing is trained: no gradient scaler (MIXED_PRECISION sets fp16 autocast only)."""
        return None

    def setup_state(self) -> None:
        """The empty reservoir (per class up to RESERVOIR_SIZE features, class tokens of every block, entropies,
        sorted by entropy; a count) and the guide (off): buffers, so reset() restores them exactly."""
        visual = self.model.clip.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "class_embedding") or getattr(visual, "attn_pool", None) is not None \
                or getattr(visual, "pool_type", "tok") != "tok":
            raise ConfigError(f"tca needs an open_clip ViT image tower pooled at its class token; "
                              f"MODEL.ARCH={self.cfg.MODEL.ARCH} has none")
        self.depth, width = len(blocks), visual.class_embedding.shape[-1]
        if self.layers[-1] >= self.depth:
            raise ConfigError(f"TCA.LAYERS = {self.layers} names a block beyond the {self.depth} blocks of "
                              f"MODEL.ARCH={self.cfg.MODEL.ARCH}'s image tower")
        n_tokens = visual.positional_embedding.shape[0]
        self.plan = condensation_plan(n_tokens, self.layers, self.rate, self.rule, self.num_centers, self.depth)
        text = self.model.text_features()[0]
        c, r, d, dev = self.num_classes, self.capacity, text.shape[1], self.device
        self.register_buffer("res_features", torch.zeros(c, r, d, device=dev))
        self.register_buffer("res_tokens", torch.zeros(c, r, self.depth, width, device=dev))
        self.register_buffer("res_entropy", torch.zeros(c, r, device=dev))
        self.register_buffer("res_counts", torch.zeros(c, dtype=torch.long, device=dev))
        self.register_buffer("guide", torch.zeros(c, self.depth, width, device=dev))
        self.register_buffer("guide_on", torch.zeros((), dtype=torch.bool, device=dev))
        weights = torch.exp(torch.linspace(0, 1, self.depth, dtype=torch.float64) / self.scale)
        self.layer_weights = (weights / weights.sum()).to(dev)       # compute_reservoir_logits' scaling_weights

    def reset_extra_state(self) -> None:
        self.center_rng = torch.Generator().manual_seed(self.seed)

    def cost_info(self) -> dict:
        """One pass of the image tower per image (tokens entering every block listed), nothing backward."""
        tokens, n = [], self.model.clip.visual.positional_embedding.shape[0]
        for step in self.plan:
            tokens.append(n)
            if step is not None:
                n = 1 + step[2] + (self.num_centers if self.rule == "ours" else 0) + 1
        return {"views_per_image": 1, "backward_passes_per_image": 0, "tokens_per_block": tokens}

    # ------------------------------------------------------------------ the condensed image tower
    def guided(self) -> bool:
        """Whether the guide can change the tower's output (the "ours" rule, a rate above 0, CLS_GUIDANCE)."""
        return self.cls_guidance and self.rule == "ours" and self.rate > 0

    def draw_first_centers(self, batch: int) -> torch.Tensor:
        """k_center_greedy's random first center, per image (in stream order) and per "ours" block: (B, blocks)."""
        sizes = [step[3] for step in self.plan if step is not None] if self.rule == "ours" else []
        draws = [[int(torch.randint(n, (1,), generator=self.center_rng)) for n in sizes] for _ in range(batch)]
        return torch.tensor(draws, dtype=torch.long).view(batch, len(sizes))

    def condense(self, block: nn.Module, x: torch.Tensor, step, first: torch.Tensor, guide):
        """One condensing block (ResidualAttentionBlock_Ours / _EViT with drop_rate > 0) on x (B, N, W)."""
        n, left, kept, clustered = step
        if guide is not None:
            best = F.cosine_similarity(guide.unsqueeze(1), x[:, 0].unsqueeze(0), dim=2).argmax(dim=0)   # (B,)
            out, weights = attention_with_weights(block, block.ln_1(torch.cat([guide[best].unsqueeze(1), x], 1)))
            out, weights = out[:, 1:], weights[:, :, 1:, 1:]
        else:
            out, weights = attention_with_weights(block, block.ln_1(x))
        x = x + block.ls_1(out)
        cls_attn = weights[:, :, 0, 1:].mean(dim=1)                                           # (B, N - 1)
        order = cls_attn.topk(left, dim=1, largest=True, sorted=True)[1]
        patches = x[:, 1:]
        width = x.shape[-1]
        parts = [x[:, :1], patches.gather(1, order[:, :kept].unsqueeze(-1).expand(-1, -1, width))]
        if self.rule == "ours":
            cluster = patches.gather(1, order[:, kept:].unsqueeze(-1).expand(-1, -1, width))
            parts.append(coreset_average(cluster, first, self.num_centers).to(x.dtype))
        dropped = torch.ones_like(cls_attn).scatter_(1, order, 0.0)
        parts.append((patches * (cls_attn * dropped).unsqueeze(-1)).sum(dim=1, keepdim=True))
        x = torch.cat(parts, dim=1)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def encode(self, images: torch.Tensor, first: torch.Tensor, guide):
        """Unnormalised features (B, D) and the class token after every block (B, depth, W) of [0, 1] images."""
        visual = self.model.clip.visual
        dtype = next(visual.parameters()).dtype
        x = visual._embeds(self.model.normalize(images.to(dtype)))                             # (B, N, W)
        batch_first = getattr(visual.transformer, "batch_first", True)
        tokens, j = [], 0
        for layer, (block, step) in enumerate(zip(visual.transformer.resblocks, self.plan)):
            if step is None:
                x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            else:
                block_guide = guide[:, layer - 1] if guide is not None else None   # the class tokens of block i - 1
                x = self.condense(block, x, step, first[:, j] if first.shape[1] else None, block_guide)
                j += 1
            tokens.append(x[:, 0])
        pooled = visual.ln_post(x[:, 0])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, torch.stack(tokens, dim=1)

    # ------------------------------------------------------------------ the reservoir
    def insert(self, label: int, feature: torch.Tensor, tokens: torch.Tensor, entropy: torch.Tensor) -> None:
        """update_reservoir_sim: append, drop the highest score above capacity, sort by entropy (stable)."""
        count = int(self.res_counts[label])
        feats = torch.cat([self.res_features[label, :count], feature[None]])
        toks = torch.cat([self.res_tokens[label, :count], tokens[None]])
        ents = torch.cat([self.res_entropy[label, :count], entropy.reshape(1)])
        if count + 1 > self.capacity:
            keys = toks.mean(dim=1) if self.token_similarity else feats
            keys = F.normalize(keys, p=2, dim=1)
            similarity = keys @ keys.t()
            mean_sim = ((similarity.sum(dim=1) - similarity.diagonal()) / count).double()
            loss = ents.double()
            if self.diversity:
                score = loss + mean_sim
            else:
                dissim = 1 - mean_sim
                spread = float(dissim.max() - dissim.min())
                weight = int(float(loss.max() - loss.min()) / spread) if spread > 0 else 0
                score = loss + weight * dissim
            drop = int(torch.argmax(score))
            keep = [i for i in range(count + 1) if i != drop]
            feats, toks, ents = feats[keep], toks[keep], ents[keep]
        order = torch.sort(ents, stable=True).indices
        n = len(order)
        self.res_features[label, :n] = feats[order]
        self.res_tokens[label, :n] = toks[order]
        self.res_entropy[label, :n] = ents[order]
        self.res_counts[label] = n

    def update_guide(self, label: int) -> bool:
        """CLIP.update_cls_token once every class holds more than one entry: the mean class tokens per class.
        Returns whether the guide changed."""
        if not self.cls_guidance:
            return False
        if not bool(self.guide_on):
            if not bool((self.res_counts > 1).all()):
                return False
            for c in range(self.num_classes):
                self.guide[c] = self.res_tokens[c, :int(self.res_counts[c])].mean(dim=0)
            self.guide_on.fill_(True)
            return True
        new = self.res_tokens[label, :int(self.res_counts[label])].mean(dim=0)
        changed = not torch.equal(new, self.guide[label])
        self.guide[label] = new
        return changed

    def reservoir_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """compute_reservoir_logits: LAMBDA * sum over entries of exp(-BETA (1 - a)) per entry's class."""
        cos = F.cosine_similarity(tokens[None, None], self.res_tokens, dim=-1)                # (C, R, depth)
        affinity = (cos.double() * self.layer_weights).sum(dim=-1).float()
        valid = torch.arange(self.capacity, device=self.res_counts.device)[None] < self.res_counts[:, None]
        weights = ((-1) * (self.beta - self.beta * affinity)).exp() * valid
        return self.lambd * weights.sum(dim=1)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        first = self.draw_first_centers(batch).to(x.device)
        text = self.model.text_features()[0].float()
        scale = REFERENCE_LOGIT_SCALE if self.cfg.TCA.LOGIT_SCALE == "fixed_100" else float(self.model.logit_scale)
        outputs, start = [], 0
        while start < batch:
            guide = self.guide if (self.guided() and bool(self.guide_on)) else None
            stop = start + 1 if guide is not None else batch     # once guided, each image changes the next one's
            with self.autocast():
                pre, tokens = self.encode(x[start:stop], first[start:stop], guide)
            features, tokens = F.normalize(pre.float(), dim=-1), tokens.float()
            clip_logits = scale * features @ text.t()
            entropy = softmax_entropy(clip_logits)
            done = stop - start
            for i, label in enumerate(clip_logits.argmax(dim=1).tolist()):
                self.insert(label, features[i], tokens[i], entropy[i])
                changed = self.update_guide(label)
                outputs.append(clip_logits[i] + self.reservoir_logits(tokens[i]))
                if changed and self.guided() and i + 1 < done:      # re-encode the rest with the new guide
                    done = i + 1
                    break
            start += done
        return torch.stack(outputs)
