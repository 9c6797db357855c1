"""ECALP: efficient and context-aware label propagation (Li et al., "Efficient and Context-Aware Label Propagation
for Zero-/Few-Shot Training-Free Adaptation of Vision-Language Model", ICLR 2025; code Yushu-Li/ECALP ``main.py``
and ``utils/iterative_label_propagation.py``, the same code in TomSheng21/tta-vlm ``online_method/ecalp*.py``).
Nothing is trained; zero-shot setting only (the few-shot one needs labelled shots: left out, docs/ecalp.md).

A graph grows over the stream. Its nodes: the C class text embeddings (label seeds), every test image seen so far,
and a second copy of the newest image (the reference appends the newest feature twice, ``main.py``). Per test
image, in stream order, the image first enters the graph, then it is predicted (``iterative_label_propagation``):

1. Edges (``dynamic_graph_expansion``): each image node keeps a kNN list of image nodes, the similarity being
   cos(normalize(w * f_a), f_b) with w = normalize(variance of the text embeddings per dimension) (the
   context-aware re-weighting, ``edge_reweighting(force_1=True)``), and its K_TEXT nearest classes (f . t).
   Old nodes' lists are updated incrementally as the reference does: candidate edges to the two new nodes are
   added, edges to the previous step's second copy are set to -1, and K_IMAGE (+1 or +2 spares) are kept.
2. W = (Wd + Wd^T) with Wd the kNN edges weighted sim ** GAMMA; W~ = D^-1/2 W D^-1/2 (1e-6 added to the root).
3. Y_hat = [eye(C); Y0], Y0 the previous step's labels of the image nodes (top-1 score / 5, the two new nodes 0);
   NUM_ITERATIONS times: Y = ALPHA * W~[images] Y_hat + (1 - ALPHA) * Y0, Y_hat = [eye(C); Y].
4. The prediction is the second copy's row of Y (reported as logits 10000 * Y, whose softmax is the reference's
   output); every image node's top-1 score / 5 is its Y0 for the next image.

The reference's order of edges (``topk``) is unspecified on ties; here equal similarities are ranked in the order
of the candidate list (a stable sort: the lower node first, old kNN entries before the new nodes' edges), so that
the two copies of the newest image are always taken in that order. The graph grows without bound, as the
reference's: all state (the weighted features, kNN lists, text edges and labels of every image seen) is registered
buffers grown by chunks, so reset() restores the empty graph exactly; per step the work is O(images seen * C).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.options import Option
from methods.base import TRAINING_FREE, TTAMethod
from methods.caches import cache_dtype
from methods.registry import register_method

# The reference reports softmax(10000 * Y[newest]); its logits are 10000 * Y.
REFERENCE_OUTPUT_SCALE = 10000.0
# Y0 of a node: its top-1 propagated score divided by this (``top3_values / 5``).
LABEL_MEMORY_DIVISOR = 5.0
# Images by which the graph's buffers grow (then doubled: amortised O(1) growth).
GRAPH_CHUNK = 256


def stable_top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest along the last dimension, equal values in their order (torch.topk leaves ties unordered)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
    return values.gather(-1, order), order


class StreamGraph(nn.Module):
    """The graph's state, one row per image seen (the second copy of the newest image is not stored: the next
    step drops it, as the reference drops its last row). Buffers grown by chunks; loading a state dict (reset())
    gives them the loaded shapes first."""

    ROWS = ("weighted", "knn_sim", "knn_index", "text_sim", "text_index", "label_score", "label_class")

    def __init__(self, dim: int, k_text: int, k_image: int, device=None, dtype=torch.float32):
        super().__init__()
        long = dict(dtype=torch.long, device=device)
        real = dict(dtype=dtype, device=device)
        self.register_buffer("count", torch.zeros((), **long))
        # kNN list width: the reference keeps K_IMAGE + 2 entries once the graph is large enough
        self.register_buffer("store_width", torch.zeros((), **long))
        self.register_buffer("weighted", torch.zeros(0, dim, **real))      # normalize(w * f)
        self.register_buffer("knn_sim", torch.zeros(0, k_image + 2, **real))
        self.register_buffer("knn_index", torch.zeros(0, k_image + 2, **long))
        self.register_buffer("text_sim", torch.zeros(0, k_text, **real))
        self.register_buffer("text_index", torch.zeros(0, k_text, **long))
        self.register_buffer("label_score", torch.zeros(0, **real))         # Y0: top-1 score / 5
        self.register_buffer("label_class", torch.zeros(0, **long))

    def ensure_rows(self, rows: int) -> None:
        capacity = self.weighted.shape[0]
        if rows <= capacity:
            return
        extra = max(GRAPH_CHUNK, capacity)
        for name in self.ROWS:
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, old.new_zeros((extra,) + old.shape[1:])]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.ROWS:      # the snapshot's (smaller) capacity, so that reset() can load it
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_method("ecalp")
class ECALP(TTAMethod):
    protocol = TRAINING_FREE
    config_defaults = {"ECALP": {
        # main.py's argparse defaults (the README's zero-shot commands set none of them; tta-vlm hard-codes them)
        "K_TEXT": Option(3, within="[1, inf)"),          # --k_text: nearest classes of an image node
        "K_IMAGE": Option(8, within="[1, inf)"),         # --k_image: nearest image nodes of an image node
        "GAMMA": Option(10.0, within="(0, inf)"),        # --gamma: edge weight = similarity ** gamma
        "ALPHA": Option(1.0, within="[0, 1]"),           # --alpha: weight of the propagated labels
        "NUM_ITERATIONS": Option(3, within="[1, inf)"),  # --num_iterations
    }}

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        e = cfg.ECALP
        self.k_text = min(int(e.K_TEXT), num_classes)       # k_im2text = min(k_text, num_classes)
        self.k_image = int(e.K_IMAGE)
        self.gamma, self.alpha, self.iterations = float(e.GAMMA), float(e.ALPHA), int(e.NUM_ITERATIONS)

    def setup_scaler(self):
        """Nothing is trained: no gradient scaler (MIXED_PRECISION sets fp16 autocast of the encoders only)."""
        return None

    def setup_state(self) -> None:
        """The empty graph (buffers: reset() restores it)."""
        text = self.model.text_features()[0]
        # fp32 (also under fp16 autocast, as the reference's .float()), fp64 for an fp64 model
        self.graph = StreamGraph(text.shape[1], self.k_text, self.k_image, device=self.device,
                                 dtype=cache_dtype(text))

    def cost_info(self) -> dict:
        return {"views_per_image": 1, "backward_passes_per_image": 0}

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model(x, return_features=True)
        features, text = out.image_features.float(), out.text_features.float()
        # the context-aware weights: the text embeddings' per-dimension variance, L2-normalised (force_1=True)
        weights = F.normalize(text.var(dim=0), dim=0)
        return torch.stack([self.predict_next(f, text, weights) for f in features])   # stream order

    def predict_next(self, feature: torch.Tensor, text: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Add one image (and its second copy) to the graph, propagate, return its logits (C,)."""
        g = self.graph
        previous = int(g.count)
        images, nodes = previous + 1, previous + 2
        g.ensure_rows(images)
        g.weighted[previous] = F.normalize(feature * weights, dim=0)
        # cos(weighted node, newest image) for every image node; the second copy repeats the newest's value
        similarity = g.weighted[:images] @ F.normalize(feature, dim=0)
        node_similarity = torch.cat([similarity, similarity[-1:]])
        self.update_knn_lists(previous, node_similarity)
        g.text_sim[previous], g.text_index[previous] = stable_top_k(feature @ text.t(), self.k_text)
        g.count.fill_(images)
        labels = self.propagate(images, min(self.k_image, nodes))
        g.label_score[:images], g.label_class[:images] = labels[:images].max(dim=1)   # first maximum on ties
        g.label_score[:images] /= LABEL_MEMORY_DIVISOR
        return REFERENCE_OUTPUT_SCALE * labels[-1]

    def update_knn_lists(self, previous: int, node_similarity: torch.Tensor) -> None:
        """``dynamic_graph_expansion``'s image-image part: the old nodes' lists (the previous second copy's
        entries set to -1, the two new nodes added) cut to the reference's width, and the newest node's list."""
        g = self.graph
        nodes = previous + 2
        k = min(self.k_image, nodes)
        if previous == k + 1:
            width = k + 1
        elif previous > k:
            width = k + 2
        else:
            width = k
        if previous > 0:
            old_width = int(g.store_width)
            old_sim = g.knn_sim[:previous, :old_width].clone()
            old_index = g.knn_index[:previous, :old_width]
            old_sim[old_index == nodes - 2] = -1.0      # the previous step's second copy is the newest node now
            to_new = node_similarity[:previous, None].expand(-1, 2)
            new_index = torch.tensor([nodes - 2, nodes - 1], device=old_index.device).expand(previous, -1)
            sim, order = stable_top_k(torch.cat([old_sim, to_new], dim=1), width)
            g.knn_index[:previous, :width] = torch.cat([old_index, new_index], dim=1).gather(1, order)
            g.knn_sim[:previous, :width] = sim
        g.knn_sim[previous, :width], g.knn_index[previous, :width] = stable_top_k(node_similarity, width)
        g.knn_sim[:previous + 1, width:] = -torch.inf       # unused columns (never among the kept ones)
        g.knn_index[:previous + 1, width:] = -1
        g.store_width.fill_(width)

    def propagate(self, images: int, k: int) -> torch.Tensor:
        """``iterative_label_propagation`` over the current graph; the labels Y of all image nodes, the second
        copy last, (images + 1, C)."""
        g, c = self.graph, self.num_classes
        rows = torch.cat([torch.arange(images, device=self.device), torch.tensor([images - 1], device=self.device)])
        n = rows.numel()
        image_targets = g.knn_index[rows, :k] + c
        targets = torch.cat([image_targets, g.text_index[rows]], dim=1).flatten()
        weights = torch.cat([g.knn_sim[rows, :k], g.text_sim[rows]], dim=1).flatten() ** self.gamma
        sources = (torch.arange(n, device=self.device) + c).repeat_interleave(k + self.k_text)
        degree = weights.new_zeros(c + n)
        degree.index_add_(0, sources, weights).index_add_(0, targets, weights)      # W = Wd + Wd^T
        root = 1.0 / (degree.sqrt() + 1e-6)
        normalised = root[sources] * weights * root[targets]
        to_image = targets >= c
        # text columns of W~ (the seeds' one-hot rows are constant) and the image-image block, both directions
        seeded = weights.new_zeros(n, c)
        seeded.index_put_((sources[~to_image] - c, targets[~to_image]), normalised[~to_image], accumulate=True)
        src, dst, w = sources[to_image] - c, targets[to_image] - c, normalised[to_image]
        adjacency = torch.sparse_coo_tensor(torch.stack([torch.cat([src, dst]), torch.cat([dst, src])]),
                                            torch.cat([w, w]), (n, n), check_invariants=False).coalesce()
        label_memory = weights.new_zeros(n, c)
        old = images - 1                         # the two new nodes start at 0
        label_memory[torch.arange(old, device=self.device), g.label_class[:old]] = g.label_score[:old]
        labels = label_memory
        for _ in range(self.iterations):
            labels = self.alpha * (seeded + torch.sparse.mm(adjacency, labels)) + (1 - self.alpha) * label_memory
        return labels
