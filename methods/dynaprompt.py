"""DynaPrompt: dynamic test-time prompt tuning (Xiao et al., ICLR 2025; official code zzzx1224/DynaPrompt
``dynap_classification.py`` ``test_time_tuning`` / ``test_time_adapt_eval`` and ``clip/custom_clip_lessctx.py``
``PromptLearner``; TomSheng21/tta-vlm ``online_method/dynaprompt.py`` re-implements it). docs/dynaprompt.md says
more.

An online method: a buffer of DYNAPROMPT.NUM_PROMPTS prompts (context offsets from the CTX_INIT embeddings, all
zero at the start), each prompt's use count and a least-recently-used order carry over the stream. Per test image:

1. if every prompt has been used, the least recently used one (the head of the order) is re-initialised (offset 0,
   use count 0; its place in the order is kept); the optimizer state goes back to its initial (empty) state
   (DYNAPROMPT.OPTIMIZER_STATE "per_image", the official ``optimizer.load_state_dict(optim_state)``);
2. OPTIM.STEPS times: the views' logits under every prompt; per prompt the views' mean entropy and the mean over
   the augmented views of (max logit of the image) - (max logit of the view); the prompts ordered by decreasing
   entropy and by decreasing difference; with r the rank of the order's head (the "initial" prompt) in the entropy
   order, the prompts of ``entropy_order[min(r + 1, P - 1):]`` that are also in ``difference_order[:r]`` are
   selected together with the head (DYNAPROMPT.SELECTED_PROMPTS says how the intersection is read); each selected
   prompt moves to the end of the order and its use count grows by one; then one AdamW step on the selected prompts'
   loss: the SELECTION_P fraction of views with the lowest entropy (averaged over the selected prompts), per prompt
   the entropy of those views' averaged probabilities, averaged over the prompts;
3. the image itself (view 0) classified with the last step's selected prompts after the step: the mean of their
   logits (adapt-then-predict).

Batched where the reference loops: the views are encoded once per image, every prompt's class text features come
from one text-encoder pass (identical prompts, e.g. the fresh ones, encoded once, so that their entropies tie
exactly), the step's gradient from one pass over the selected prompts only. Ties in the orders go to the lower
prompt index (a stable sort; the reference's ``topk`` leaves them unspecified).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.losses import marginal_entropy
from methods.prompts import PROMPT_TUNING_OPTIONS, PromptContext, PromptTuningViews
from methods.registry import register_method

# When the optimizer state goes back to its initial state: before every image (the official code) or never (tta-vlm).
OPTIMIZER_STATES = ("per_image", "carried")
# How the selected prompts are read from the intersection of the two orders: "as_written" = both references'
# ``ent_order[alllist]`` (the intersection's prompt indices used as positions in the entropy order), "intersection"
# = the intersected prompts themselves (what the paper describes).
SELECTED_PROMPT_RULES = ("as_written", "intersection")


class PromptBuffer(PromptContext):
    """P CoOp-style prompts "[SOT] ctx_1 ... ctx_n <class name>. [EOT]" (TPT's ``PromptContext``), each with its own
    n learnable context tokens, stored as offsets from the CTX_INIT embeddings (the reference's ``ctx + init_ctx``,
    ``ctx`` starting at zero), with each prompt's use count and the least-recently-used order (buffers, so that
    reset() restores them)."""

    def __init__(self, model, ctx_init: str, n_ctx: int, num_prompts: int, node: str):
        super().__init__(model, ctx_init, n_ctx, node)
        device = self.ctx_init.device
        self.ctx = nn.Parameter(torch.zeros(num_prompts, *self.ctx_init.shape, dtype=self.ctx_init.dtype,
                                            device=device))
        self.register_buffer("use", torch.zeros(num_prompts, dtype=torch.long, device=device))
        self.register_buffer("order", torch.arange(num_prompts, device=device))

    def forward(self) -> torch.Tensor:
        """Token embeddings (P * C, L, width) of every prompt's class prompts."""
        return self.embeddings(self.ctx)

    @torch.no_grad()
    def restore(self) -> None:
        """The fresh buffer: every offset zero, no prompt used, the order 0 .. P-1."""
        self.ctx.zero_()
        self.use.zero_()
        self.order.copy_(torch.arange(len(self.order), device=self.order.device))

    def embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings (K * C, L, width) of all class prompts of K context offsets (K, n, width)."""
        n_cls = self.prefix.shape[0]
        full = (ctx + self.ctx_init).to(self.prefix.dtype)
        full = full.unsqueeze(1).expand(-1, n_cls, -1, -1)
        prefix = self.prefix.unsqueeze(0).expand(ctx.shape[0], -1, -1, -1)
        suffix = self.suffix.unsqueeze(0).expand(ctx.shape[0], -1, -1, -1)
        return torch.cat([prefix, full, suffix], dim=2).flatten(0, 1)


def select_prompts(entropy: list[float], difference: list[float], order: list[int], rule: str) -> list[int]:
    """The prompts one step tunes, in the reference's order: the intersection (read as ``rule`` says), then the head
    of the least-recently-used ``order``. Orders by decreasing value, ties to the lower index."""
    n = len(entropy)
    entropy_order = sorted(range(n), key=lambda p: -entropy[p])
    difference_order = sorted(range(n), key=lambda p: -difference[p])
    head = order[0]
    rank = entropy_order.index(head)
    both = sorted(set(entropy_order[min(rank + 1, n - 1):]) & set(difference_order[:rank]))
    if rule == "as_written":
        both = [entropy_order[p] for p in both]
    return both + [head]


@register_method("dynaprompt")
class DynaPrompt(PromptTuningViews):
    views_node = mixed_precision_node = "DYNAPROMPT"
    config_defaults = {"DYNAPROMPT": {
        # Prompts in the buffer (the official run_dynap.sh: num_p=12; tta-vlm: 10).
        "NUM_PROMPTS": Option(12, within="[2, inf)"),
        # "per_image": the optimizer state back to its initial state before every image (official
        # optimizer.load_state_dict(optim_state)); "carried": kept over the stream (tta-vlm).
        "OPTIMIZER_STATE": Option("per_image", choices=OPTIMIZER_STATES),
        # "as_written": ent_order[alllist] as both references write it; "intersection": the intersected prompts, as
        # the paper describes the selection (docs/dynaprompt.md).
        "SELECTED_PROMPTS": Option("as_written", choices=SELECTED_PROMPT_RULES),
        # Re-initialise the least recently used prompt when every prompt has been used (both references; the
        # official code skips it when --log_date contains "noapp", its ablation).
        "REINIT_LEAST_RECENT": True,
        **PROMPT_TUNING_OPTIONS,
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if cfg.MODEL.EPISODIC:
            raise ConfigError("dynaprompt is online (its prompts, use counts and order carry over the stream); "
                              "MODEL.EPISODIC must be False, got True")

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        node = cfg.DYNAPROMPT
        self.num_prompts = int(node.NUM_PROMPTS)
        self.optimizer_state = node.OPTIMIZER_STATE
        self.selection_rule = node.SELECTED_PROMPTS
        self.reinit = bool(node.REINIT_LEAST_RECENT)

    def configure_model(self) -> None:
        """Freeze all of CLIP and build the prompt buffer (its context offsets are the parameters)."""
        self.model.eval()
        self.model.requires_grad_(False)
        node = self.cfg.DYNAPROMPT
        self.prompt_learner = PromptBuffer(self.model, node.CTX_INIT, node.N_CTX, self.num_prompts, "DYNAPROMPT")

    def cost_info(self) -> dict:
        """Per test image: its views through the image encoder once; per step one text-encoder pass over every
        distinct prompt's class prompts (no gradient) and one over the selected prompts' (with gradient); one more
        over the selected prompts to predict."""
        return {"views_per_image": self.views_per_image, "prompts": self.num_prompts,
                "text_forward_passes_per_image": 2 * self.steps + 1, "backward_passes_per_image": self.steps}

    def reset_episode(self) -> None:
        """MODEL.RESET_AFTER_NUM_UPDATES: the fresh buffer (contexts, use counts, order) and optimizer; not reset(),
        which would restart the view stream too."""
        self._restore_snapshot(("module", "optimizer"))

    # ------------------------------------------------------------------ adaptation
    def prompt_text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised class text features (K, C, D) of K context offsets (K, n, width)."""
        buffer = self.prompt_learner
        tokens = buffer.tokens.repeat(ctx.shape[0], 1)
        pre = self.model.encode_token_embeddings(buffer.embeddings(ctx), tokens)
        return F.normalize(pre, dim=-1).view(ctx.shape[0], buffer.prefix.shape[0], -1)

    def split_images(self, x: torch.Tensor) -> list[dict]:
        """Every image's views, drawn and encoded image by image (one forward per image, as the reference's
        ``model(images)``), so that the batch size changes nothing."""
        units = []
        for image_views in self.views.image_by_image(x):
            with torch.no_grad(), self.autocast():
                units.append({"features": F.normalize(self.model.encode_image(image_views), dim=-1),
                              "selected": None})
        return units

    @torch.no_grad()
    def begin_image(self) -> None:
        """Before an image's first step: the least recently used prompt re-initialised once every prompt has been
        used, and the optimizer state back to its start (OPTIMIZER_STATE "per_image")."""
        buffer = self.prompt_learner
        if self.reinit and bool((buffer.use > 0).all()):
            head = int(buffer.order[0])
            buffer.use[head] = 0
            buffer.ctx[head].mul_(0)            # the reference's ctx[i] = ctx[i] * 0
        if self.optimizer_state == "per_image":
            self._restore_snapshot(("optimizer",))

    @torch.enable_grad()
    def forward_and_adapt(self, unit: dict) -> None:
        """One step: every prompt's view logits, the selection of the prompts, the use counts and order updated,
        one optimizer step on the selected prompts' loss."""
        if unit["selected"] is None:
            self.begin_image()
        buffer = self.prompt_learner
        features = unit["features"]
        with torch.no_grad(), self.autocast():
            distinct, inverse = torch.unique(buffer.ctx.detach().flatten(1), dim=0, return_inverse=True)
            text = self.prompt_text_features(distinct.view(-1, *buffer.ctx.shape[1:]))[inverse]
            logits = self.model.logits(features, text.flatten(0, 1))
        logits = logits.float().view(features.shape[0], self.num_prompts, -1)           # (V, P, C)
        log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
        entropy = -(log_probs * log_probs.exp()).sum(-1).mean(0)                         # (P,)
        top = logits.max(dim=-1).values                                                   # (V, P)
        difference = (top[:1] - top[1:]).mean(0)                                          # (P,)
        selected = select_prompts(entropy.tolist(), difference.tolist(), buffer.order.tolist(), self.selection_rule)
        order, use = buffer.order.tolist(), buffer.use.tolist()
        for p in selected:
            order.remove(p)
            order.append(p)
            use[p] += 1
        buffer.order.copy_(torch.tensor(order))
        buffer.use.copy_(torch.tensor(use))
        unit["selected"] = selected

        index = torch.tensor(selected, device=features.device)
        with self.autocast():
            text = self.prompt_text_features(buffer.ctx[index])
            step_logits = self.model.logits(features, text.flatten(0, 1))
        step_logits = step_logits.float().view(features.shape[0], len(selected), -1)    # (V, K, C)
        view_entropy = -(step_logits.softmax(-1) * step_logits.log_softmax(-1)).sum(-1).mean(-1)
        confident = view_entropy.argsort(stable=True)[:self.n_selected]
        self.optimizer_step(marginal_entropy(step_logits[confident]).mean())

    @torch.no_grad()
    def episode_logits(self, unit: dict, outputs) -> torch.Tensor:
        """The image itself classified with the last step's selected prompts after the step: their logits averaged."""
        index = torch.tensor(unit["selected"], device=unit["features"].device)
        with self.autocast():
            text = self.prompt_text_features(self.prompt_learner.ctx[index])
            logits = self.model.logits(unit["features"][:1], text.flatten(0, 1))
        return logits.float().view(1, len(unit["selected"]), -1).mean(1)
