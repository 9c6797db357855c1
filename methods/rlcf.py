"""RLCF: test-time adaptation with CLIP reward (Zhao et al., ICLR 2024; code mzhaoshuai/RLCF,
``TPT/tpt_cls_rl.py`` ``test_time_tuning`` and ``TPT/clip_reward.py`` ``CLIPRewards``, prompt variant, scripts
``TPT/scripts/rlcf-prompt.sh`` and ``rlcf-prompt-fine.sh``).

TPT's prompt (methods/prompts.py) tuned by a policy gradient whose reward comes from a second, frozen CLIP (the
reward model; the authors': ViT-L/14). Per test image: the image and TEST.N_AUGMENTATIONS - 1 random views; at
the first step the views' logits under the current prompt and the RLCF.SELECTION_P fraction of views with the
lowest entropy, kept for the later steps (which, as the reference, forward only those views); each kept view v
samples its SAMPLE_K most probable classes c (top-k of its logits) and gets for each the reward

    r(v, c) = CLIPSCORE_WEIGHT * max(cos(g(v), u_c), 0),

g the reward model's image feature of the view (resized, bicubic with align_corners, where the reward model's
input size differs), u_c its text feature of the prompt "<CTX_INIT words> <class name>."; the rewards minus
their mean over the view's K samples (REWARD_BASELINE "view"; "batch": over all samples of the image; "none":
raw), divided by their standard deviation + 1e-5 under REWARD_STANDARDIZE; then OPTIM.STEPS AdamW steps on the
context minimising

    mean over (v, c) of r(v, c) * CE(logits(v), c),

and the image itself classified with the tuned prompt. Episodic as TPT: the prompt (from CTX_INIT's words, or a
CoOp context file, RLCF.COOP_CTX) and the optimizer state go back to their initial values before every image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.frames import lowest_entropy_views
from methods.prompts import PROMPT_TUNING_OPTIONS, ImageViews, PromptTuningViews
from methods.registry import register_method

REWARD_BASELINES = ("view", "batch", "none")
# The CLIPRewards constructor's epsilon added to the standard deviation when rewards are standardised.
REWARD_STD_EPS = 1e-5


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor, sampled: torch.Tensor,
                weight: float) -> torch.Tensor:
    """(S, K) rewards of S views' K sampled classes: weight * max(cos(image feature, class text feature), 0), from
    normalised (S, D) image and (C, D) text features (CLIPRewards.CLIPScore with pairwise=False)."""
    similarity = weight * (text_features[sampled] * image_features.unsqueeze(1)).sum(-1)
    return similarity.clamp_min(0)


def baseline_subtracted(scores: torch.Tensor, baseline: str, standardize: bool) -> torch.Tensor:
    """(S, K) rewards after CLIPRewards.rewards_post_process: minus their mean over each view's K samples
    ("view", process_batch 0) or over all S * K ("batch"), divided by std + 1e-5 when ``standardize``
    (amplify_rewards); untouched for "none" (reward_process 0) and for a group of one sample, as the reference."""
    groups = scores.flatten() if baseline == "batch" else scores
    if baseline == "none" or groups.shape[-1] <= 1:
        return scores
    centred = groups - groups.mean(-1, keepdim=True)
    if standardize:
        centred = centred / (groups.std(-1, keepdim=True) + REWARD_STD_EPS)
    return centred.reshape(scores.shape)


@dataclass
class RewardedViews(ImageViews):
    """One image's episode, with its views' pixels (V, 3, H, W) for the reward model and the reward model's
    normalised features of the views selected at the first step."""
    pixels: torch.Tensor | None = None
    reward_features: torch.Tensor | None = None


@register_method("rlcf")
class RLCF(PromptTuningViews):
    views_node = mixed_precision_node = "RLCF"
    # The harness builds the reward CLIP these keys name and passes it as the constructor's ``reward_model``.
    auxiliary_models = {"reward_model": ("RLCF.REWARD_ARCH", "RLCF.REWARD_WEIGHTS")}
    config_defaults = {"RLCF": {
        **PROMPT_TUNING_OPTIONS,
        # The reward CLIP (an open_clip architecture and its weights); empty is refused (the authors': ViT-L-14 with
        # openai weights; TTA-VLM's: the adapted model's own architecture and weights).
        "REWARD_ARCH": "",
        "REWARD_WEIGHTS": "",
        # Classes sampled per view: the top-k of its logits (--sample_k; the scripts: 3).
        "SAMPLE_K": Option(3, within="[1, inf)"),
        # Factor of the cosine in the reward (CLIPRewards' clipscore_weight 2.5).
        "CLIPSCORE_WEIGHT": Option(2.5, within="(0, inf)"),
        # What the rewards are centred on: "view" (the mean of a view's K samples: --reward_process 1
        # --process_batch 0, the scripts), "batch" (all samples of the image: --process_batch 1), "none" (raw
        # rewards: --reward_process 0).
        "REWARD_BASELINE": Option("view", choices=REWARD_BASELINES),
        # Centred rewards also divided by their standard deviation + 1e-5 (--reward_amplify; the scripts: 0).
        "REWARD_STANDARDIZE": False,
        # A CoOp checkpoint whose state_dict's "ctx" (N_CTX x text width) is the initial context (--load; the
        # scripts load CoOp's 16-shot ImageNet context); empty: the embeddings of CTX_INIT's words.
        "COOP_CTX": Option("", reads_file=True),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        node = cfg.RLCF
        for key in ("REWARD_ARCH", "REWARD_WEIGHTS"):
            if not str(node[key]).strip():
                raise ConfigError(f"RLCF.{key} is empty; RLCF needs its reward CLIP: give RLCF.REWARD_ARCH and "
                                  "RLCF.REWARD_WEIGHTS (the authors' reward model: ViT-L-14 with openai weights)")
        if node.SAMPLE_K > len(class_names):
            raise ConfigError(f"RLCF.SAMPLE_K = {node.SAMPLE_K} samples more classes than the {len(class_names)} "
                              "there are; set it to at most the number of classes")

    def __init__(self, cfg, model, num_classes, reward_model=None):
        super().__init__(cfg, model, num_classes)
        if reward_model is None:
            raise ConfigError("RLCF needs its reward CLIP, named by RLCF.REWARD_ARCH and RLCF.REWARD_WEIGHTS; "
                              "none was given")
        # Kept out of the module tree: frozen and never adapted, so not among the parameters, the state dict or
        # the snapshot that reset() restores.
        object.__setattr__(self, "reward_model", reward_model)
        node = cfg.RLCF
        self.sample_k = int(node.SAMPLE_K)
        self.clipscore_weight = float(node.CLIPSCORE_WEIGHT)
        self.reward_baseline = node.REWARD_BASELINE
        self.reward_standardize = bool(node.REWARD_STANDARDIZE)

    def cost_info(self) -> dict:
        """PromptTuningViews' cost, plus the selected views through the reward model's image encoder."""
        return {**super().cost_info(), "reward_model_views_per_image": self.n_selected}

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        super().configure_model()
        self.reward_model.eval()
        self.reward_model.requires_grad_(False)
        if self.cfg.RLCF.COOP_CTX:
            self.load_coop_context(self.cfg.RLCF.COOP_CTX)

    @torch.no_grad()
    def load_coop_context(self, path: str) -> None:
        """The initial context from a CoOp checkpoint (the reference: ``torch.load(args.load)['state_dict']['ctx']``
        copied into the context and its reset state). CoOp's Dassl checkpoints pickle their scheduler's state, so
        the file is unpickled in full: name only a file you trust."""
        ctx = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]["ctx"]
        learner = self.prompt_learner
        if tuple(ctx.shape) != tuple(learner.ctx.shape):
            raise ConfigError(f"RLCF.COOP_CTX {path}: its context is {tuple(ctx.shape)}, the prompt's is "
                              f"{tuple(learner.ctx.shape)} (RLCF.N_CTX x the text width; class-specific contexts "
                              "are not supported)")
        learner.ctx_init.copy_(ctx)
        learner.ctx.copy_(ctx)

    def setup_state(self) -> None:
        """The reward model's normalised text features of "<CTX_INIT words> <class name>." (the reference encodes
        the prompt learner's tokenized prompts once per data set); they never change, so reset never copies them."""
        reward = self.reward_model
        phrase = self.cfg.RLCF.CTX_INIT.replace("_", " ").strip()
        names = [name.replace("_", " ") for name in self.model.class_names]
        tokens = reward.truncate_tokens(reward.tokenizer([f"{phrase} {name}." for name in names]))
        with torch.no_grad(), self.autocast():
            features = reward.encode_tokens(tokens.to(reward.tokens.device)).float()
        self.register_buffer("reward_text_features", F.normalize(features, dim=-1), persistent=False)

    # ------------------------------------------------------------------ adaptation
    def split_images(self, x: torch.Tensor) -> list[RewardedViews]:
        """Every image's views, drawn image by image (the batch size changes nothing) and encoded in one pass for
        the whole batch (the image encoder is frozen); the pixels are kept for the reward model."""
        views = self.views.image_by_image(x)
        with torch.no_grad(), self.autocast():
            features = F.normalize(self.model.encode_image(views.flatten(0, 1)), dim=-1)
        features = features.view(views.shape[0], views.shape[1], -1)
        return [RewardedViews(f, pixels=v) for f, v in zip(features, views)]

    @torch.no_grad()
    def reward_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised reward-model features of views (S, 3, H, W) in [0, 1]: normalised, then resized (bicubic,
        align_corners=True) where the reward model's input size differs, as CLIPRewards.extract_image_features."""
        reward = self.reward_model
        with self.autocast():
            images = reward.normalize(pixels.to(next(reward.clip.visual.parameters()).dtype))
            if images.shape[-1] != reward.image_size or images.shape[-2] != reward.image_size:
                images = F.interpolate(images, size=reward.image_size, mode="bicubic", align_corners=True)
            features = reward.clip.encode_image(images).float()
        return F.normalize(features, dim=-1)

    def reward_loss(self, logits: torch.Tensor, reward_features: torch.Tensor) -> torch.Tensor:
        """mean over the selected views' K sampled classes of reward * cross-entropy, from their fp32 logits."""
        with torch.no_grad():
            sampled = logits.topk(self.sample_k, dim=-1).indices                        # (S, K)
            scores = clip_scores(reward_features, self.reward_text_features, sampled, self.clipscore_weight)
            rewards = baseline_subtracted(scores, self.reward_baseline, self.reward_standardize)
        cross_entropy = F.cross_entropy(logits.repeat_interleave(self.sample_k, dim=0), sampled.flatten(),
                                        reduction="none")
        return (rewards.flatten() * cross_entropy).mean()

    @torch.enable_grad()
    def forward_and_adapt(self, unit: RewardedViews) -> torch.Tensor:
        """One step; the confident views and their reward features are chosen at the first step, and only those
        views are classified at the later steps (the reference forwards ``inputs[selected_idx]``). Returns the
        step's logits of the selected views."""
        with self.autocast():
            text = self.text_features()
            features = unit.features if unit.selected is None else unit.features[unit.selected]
            logits = self.model.logits(features, text)
        logits = logits.float()
        if unit.selected is None:
            unit.selected = lowest_entropy_views(logits, self.n_selected)
            logits = logits[unit.selected]
            unit.reward_features = self.reward_image_features(unit.pixels[unit.selected])
        self.optimizer_step(self.reward_loss(logits, unit.reward_features))
        return logits.detach()
