"""DPE: dual prototype evolving (Zhang et al., "Dual Prototype Evolving for Test-Time Generalization of
Vision-Language Models", NeurIPS 2024; code zhangce01/DPE-CLIP ``main_dpe.py`` and ``utils.py``, built on TDA).

The stream is processed one image at a time (a batch of B images is B images in stream order). Per image:

1. Its TEST.N_AUGMENTATIONS views (view 0 = the image) are classified with the current textual prototypes; the
   DPE.SELECTION_P fraction of lowest-entropy views is kept (with one view: the image itself). Their mean logits
   give the pseudo-label, their mean (unrenormalised) feature is the image's query feature, and the entropy of
   their averaged probabilities its confidence.
2. Visual prototypes: the query feature enters the pseudo-label's priority queue (``PrototypeCache``: at most
   DPE.SHOT_CAPACITY features per class, lowest entropy kept); a class's visual prototype is the mean of its queue.
3. Residuals: zero-initialised learnable residuals on the textual prototypes (C, D) and on the visual prototypes
   of the classes in the queues (K, D), each renormalised after adding; OPTIM.STEPS steps of a freshly built
   AdamW (lr DPE.LR_TEXT / DPE.LR_IMAGE, eps DPE.ADAMW_EPS, weight decay DPE.WEIGHT_DECAY) on the entropy of
   [mean logits of the confident views + Tip-Adapter-style cache logits of the query feature] plus DPE.ALIGN_WEIGHT
   times InfoNCE between each visual prototype and its class's textual prototype.
4. Prediction (no gradient) with the residual-adjusted prototypes: the image itself (DPE.PREDICT_FROM image), or,
   as the reference for ImageNet-A, the confident views re-selected under the adjusted textual prototypes.
5. Textual prototypes evolve: when the prediction's entropy, normalised (DPE.ENTROPY_NORMALISER), is below
   DPE.TEXT_UPDATE_THRESHOLD, the global textual prototypes become the cumulative average of themselves and the
   residual-adjusted prototypes of this image.

The residuals and their optimizer exist only within one image; the queues, the global textual prototypes and the
update count are registered buffers, restored exactly by ``reset()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conf.defaults import SUITE_OPTIONS
from conf.errors import ConfigError
from conf.files import read_class_texts
from conf.options import Option, default_of
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import ADAPT_THEN_PREDICT
from methods.caches import REFERENCE_LOGIT_SCALE, ClassQueues, cache_dtype
from methods.frames import ViewsMethod, lowest_entropy_views
from methods.losses import marginal_entropy
from methods.prompts import templates_and_descriptions_features
from methods.registry import register_method

# torch's AdamW defaults, which the reference leaves as they are.
ADAMW_BETAS = (0.9, 0.999)


class PrototypeCache(ClassQueues):
    """Per-class priority queues of image features (TDA's positive cache, as DPE keeps it: ``ClassQueues`` with
    python-float scores, compared in float64 as the reference compares its floats), and the class prototypes
    they give."""

    def __init__(self, num_classes: int, capacity: int, dim: int, device=None, dtype: torch.dtype = torch.float32):
        super().__init__(num_classes, capacity, dim, score_dtype=torch.float64, device=device, dtype=dtype)

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes (K,) ascending, prototypes (K, D)): the mean queued feature of every class with a queue."""
        classes = torch.nonzero(self.counts).squeeze(1)
        counts = self.counts[classes]
        filled = torch.arange(self.capacity, device=counts.device) < counts[:, None]
        weights = filled.to(self.keys.dtype) / counts[:, None].to(self.keys.dtype)
        return classes, (self.keys[classes] * weights[..., None]).sum(dim=1)


def cache_logits(query: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor, num_classes: int,
                 alpha: float, beta: float) -> torch.Tensor:
    """Tip-Adapter's cache logits of query features (N, D) against visual prototypes (K, D) of ``classes``:
    alpha * exp(-beta (1 - affinity)) in each prototype's class column, zero for classes without a prototype."""
    affinity = query @ prototypes.t().to(query.dtype)
    weights = (-(beta - beta * affinity)).exp().float()
    out = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=weights.dtype)
    return alpha * out.index_copy(1, classes, weights)


def alignment_loss(visual: torch.Tensor, textual: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (info-nce-pytorch without negative keys, as the reference calls it): each visual prototype (K, D)
    against all textual prototypes of the same K classes, its own class the positive; both sides renormalised."""
    logits = F.normalize(visual, dim=-1) @ F.normalize(textual, dim=-1).t()
    return F.cross_entropy(logits.float() / temperature, torch.arange(len(visual), device=visual.device))


def read_cupl(path: str, class_names) -> dict:
    """The CuPL JSON ({class name: [descriptions]}), checked to describe every class."""
    return read_class_texts(path, class_names, "DPE.CUPL_PROMPTS", "expected the reference's "
                            "gpt3_prompts/CuPL_prompts_<dataset>.json; '' for the templates only", "descriptions")


@dataclass
class ImageEpisode:
    """One test image: the normalised features (V, D) of its views (view 0 = the image itself), and what its
    first step fixes: the confident views, the query feature, the queued classes and their prototypes, and the
    zero-initialised residuals."""
    features: torch.Tensor
    selected: torch.Tensor | None = None
    query: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    text_residual: torch.Tensor | None = None
    visual_residual: torch.Tensor | None = None


TEXT_PROTOTYPES = ("templates_and_cupl", "templates")
# The reference's CuPL file of each data set (datasets/<set>.py cupl_path): gpt3_prompts/CuPL_prompts_<name>.json.
CUPL_FILE_NAMES = {"imagenet_c": "imagenet", "imagenet_a": "imagenet", "imagenet_v2": "imagenet",
                   "imagenet_r": "imagenet", "imagenet_sketch": "imagenet", "caltech101": "caltech101",
                   "dtd": "dtd", "eurosat": "eurosat", "fgvc_aircraft": "fgvcaircraft", "food101": "food101",
                   "flowers102": "flowers102", "oxford_pets": "oxfordpets", "stanford_cars": "stanfordcars",
                   "sun397": "sun397", "ucf101": "ucf101"}


@register_method("dpe")
class DPE(ViewsMethod):
    views_node = "DPE"
    single_view_is_the_image = True     # one view: the image itself, as the reference's one-image branch
    protocol = ADAPT_THEN_PREDICT
    episode = "image"
    mixed_precision_node = "DPE"
    config_defaults = {"DPE": {
        # Queue length per class (the reference's positive.shot_capacity: 3 in every config).
        "SHOT_CAPACITY": Option(3, within="[1, inf)"),
        # Cache logits alpha * exp(-beta (1 - affinity)) (positive.alpha / positive.beta).
        "ALPHA": Option(6.0, within="[0, inf)"),
        "BETA": Option(5.0, within="[0, inf)"),
        # AdamW learning rates of the textual and visual residuals (learning_rate.text / learning_rate.image).
        "LR_TEXT": Option(6e-4, within="[0, inf)"),
        "LR_IMAGE": Option(6e-4, within="[0, inf)"),
        # Weight of the alignment (InfoNCE) loss (learning_rate.align) and its temperature (main_dpe.py: 0.01).
        "ALIGN_WEIGHT": Option(0.5, within="[0, inf)"),
        "ALIGN_TEMPERATURE": Option(0.01, within="(0, inf)"),
        # The reference's AdamW settings for both residuals (main_dpe.py: eps 1e-3, weight_decay 1e-1).
        "ADAMW_EPS": Option(1e-3, within="(0, inf)"),
        "WEIGHT_DECAY": Option(0.1, within="[0, inf)"),
        # Textual prototypes evolve when the prediction's normalised entropy is below this (reference: 0.1).
        "TEXT_UPDATE_THRESHOLD": Option(0.1, within="[0, inf)"),
        # How that entropy (in nats) is normalised: "log2" divides by log2(C) as the reference's get_entropy (a
        # TDA inheritance: nats over bits, so 0.1 means a true normalised entropy below 0.1 / ln 2 = 0.144);
        # "ln" divides by ln(C), a true normalised entropy in [0, 1]. The queues' order is the same.
        "ENTROPY_NORMALISER": Option("log2", choices=("log2", "ln")),
        # Fraction of the views kept as confident (reference: 0.1, i.e. 6 of 64); ignored with one view.
        "SELECTION_P": Option(0.1, within="(0, 1]"),
        # How the views are made. The reference uses AugMix views for the ImageNet sets (and none for the
        # fine-grained sets): conf/methods/dpe.yaml sets "augmix".
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
        # What is classified after the update: "image" (view 0), as the reference for every set but ImageNet-A;
        # "confident_views": the mean of the confident views, re-selected under the adjusted textual prototypes,
        # as the reference for ImageNet-A (main_dpe.py: dataset_name == 'A').
        "PREDICT_FROM": Option("image", choices=("image", "confident_views")),
        # Scale of the clip logits: "fixed_100", the code's ``100. * image_features @ clip_weights`` (utils.py), or
        # "model", the model's own logit_scale (the same for OpenAI's CLIP, not for other weights).
        "LOGIT_SCALE": Option("fixed_100", choices=("fixed_100", "model")),
        # What the textual prototypes average: "templates_and_cupl", the templates of CLIP.PROMPT_MODE and the CuPL
        # descriptions of DPE.CUPL_PROMPTS, as the reference on every data set; "templates": the templates only.
        "TEXT_PROTOTYPES": Option("templates_and_cupl", choices=TEXT_PROTOTYPES),
        # The reference's CuPL JSON ({class name: [descriptions]}) for the data set: gpt3_prompts/
        # CuPL_prompts_<set>.json of zhangce01/DPE-CLIP (not shipped here); read with TEXT_PROTOTYPES
        # templates_and_cupl only.
        "CUPL_PROMPTS": Option("", reads_file=True),
        # The reference runs under CUDA fp16 autocast with fp16 residuals and no gradient scaler; ignored on CPU.
        "MIXED_PRECISION": True,
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if cfg.DPE.TEXT_PROTOTYPES == "templates":
            if cfg.DPE.CUPL_PROMPTS:
                raise ConfigError(f"DPE.CUPL_PROMPTS = '{cfg.DPE.CUPL_PROMPTS}' is given but DPE.TEXT_PROTOTYPES "
                                  f"templates does not read it; set DPE.TEXT_PROTOTYPES templates_and_cupl")
        elif not cfg.DPE.CUPL_PROMPTS:
            raise ConfigError(f"DPE.TEXT_PROTOTYPES templates_and_cupl (the reference's textual prototypes) needs "
                              f"DPE.CUPL_PROMPTS: the path of zhangce01/DPE-CLIP's gpt3_prompts/CuPL_prompts_"
                              f"{CUPL_FILE_NAMES.get(cfg.CORRUPTION.DATASET, '<set>')}.json; or set "
                              f"DPE.TEXT_PROTOTYPES templates to run without the descriptions")
        else:
            read_cupl(cfg.DPE.CUPL_PROMPTS, class_names)

    @classmethod
    def config_warnings(cls, cfg) -> list[str]:
        """OPTIM keys other than STEPS set away from the suite defaults: DPE builds its own AdamW from DPE.*."""
        unused = [f"OPTIM.{key} {cfg.OPTIM[key]}" for key, declared in SUITE_OPTIONS["OPTIM"].items()
                  if key != "STEPS" and cfg.OPTIM[key] != default_of(declared)]
        if not unused:
            return []
        return [f"DPE optimises its residuals with AdamW(lr DPE.LR_TEXT / DPE.LR_IMAGE, eps DPE.ADAMW_EPS, weight "
                f"decay DPE.WEIGHT_DECAY): {', '.join(unused)} not used"]

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.options = cfg.DPE
        self.entropy_scale = math.log2(num_classes) if cfg.DPE.ENTROPY_NORMALISER == "log2" else math.log(num_classes)

    def clip_logits(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """scale * image @ text.T, the scale as DPE.LOGIT_SCALE says."""
        if self.options.LOGIT_SCALE == "model":
            return self.model.logits(image_features, text)
        return REFERENCE_LOGIT_SCALE * image_features @ text.t().to(image_features.dtype)

    def cost_info(self) -> dict:
        """Per test image: the views through the image encoder (once, encoders frozen) and OPTIM.STEPS backward
        passes through the prototypes only (the text encoder runs once, at set-up)."""
        return {"views_per_image": self.views_per_image, "backward_passes_per_image": self.steps}

    # ------------------------------------------------------------------ setup and state
    def collect_params(self):
        """Nothing of CLIP adapts; the residuals are built per image."""
        return [], []

    def num_trainable_params(self) -> int:
        """Per image at most C x D textual plus C x D visual residual entries."""
        return 2 * self.text_prototypes.numel()

    def setup_scaler(self):
        return None       # the reference calls loss.backward() without a gradient scaler

    def setup_state(self) -> None:
        if self.options.TEXT_PROTOTYPES == "templates_and_cupl":
            descriptions = read_cupl(self.options.CUPL_PROMPTS, self.model.class_names)
            text = templates_and_descriptions_features(self.model, descriptions, self.autocast())
        else:
            text = self.model.text_features()[0]
        # The global textual prototypes (C, D): normalised at the start, cumulative averages afterwards.
        self.register_buffer("text_prototypes", text.detach().to(cache_dtype(text)).clone())
        self.register_buffer("text_updates", torch.zeros((), dtype=torch.long, device=text.device))
        self.cache = PrototypeCache(self.num_classes, self.options.SHOT_CAPACITY, text.shape[1], text.device,
                                    cache_dtype(text))

    def residual_dtype(self) -> torch.dtype:
        return torch.float16 if self.uses_mixed_precision() else self.text_prototypes.dtype

    def reset_episode(self) -> None:
        """MODEL.EPISODIC: forget the queues and the evolved textual prototypes before every image (the view
        stream goes on). The residuals are per image in any case."""
        self._restore_snapshot(("module",))

    # ------------------------------------------------------------------ per image
    def split_images(self, x: torch.Tensor) -> list[ImageEpisode]:
        """Every image's views, drawn image by image (so a batch gives the views its images give one at a time)
        and encoded in one pass for the whole batch (the image encoder is frozen)."""
        views = self.views.image_by_image(x)       # (B, V, C, H, W); view 0 = the image
        with torch.no_grad(), self.autocast():
            features = F.normalize(self.model.encode_image(views.flatten(0, 1)).float(), dim=-1)
        return [ImageEpisode(f) for f in features.view(views.shape[0], views.shape[1], -1)]

    def normalised_entropy(self, logits: torch.Tensor) -> float:
        return float(marginal_entropy(logits) / self.entropy_scale)

    @torch.no_grad()
    def begin_episode(self, unit: ImageEpisode) -> None:
        """Confident views under the current textual prototypes, the queue update, the prototypes and residuals."""
        with self.autocast():
            logits = self.clip_logits(unit.features, F.normalize(self.text_prototypes, dim=-1)).float()
        unit.selected = lowest_entropy_views(logits, self.n_selected)
        confident = logits[unit.selected]
        unit.query = unit.features[unit.selected].mean(dim=0, keepdim=True)
        self.cache.insert(int(confident.mean(dim=0).argmax()), unit.query[0], self.normalised_entropy(confident))
        unit.classes, unit.visual = self.cache.prototypes()
        dtype = self.residual_dtype()
        unit.text_residual = torch.zeros_like(self.text_prototypes, dtype=dtype, requires_grad=True)
        unit.visual_residual = torch.zeros_like(unit.visual, dtype=dtype, requires_grad=True)

    def adjusted_prototypes(self, unit: ImageEpisode) -> tuple[torch.Tensor, torch.Tensor]:
        """(textual (C, D), visual (K, D)) prototypes plus the residuals, renormalised."""
        return (F.normalize(self.text_prototypes + unit.text_residual, dim=-1),
                F.normalize(unit.visual + unit.visual_residual, dim=-1))

    def visual_logits(self, query, visual, unit) -> torch.Tensor:
        o = self.options
        return cache_logits(query, visual, unit.classes, self.num_classes, o.ALPHA, o.BETA)

    @torch.enable_grad()
    def forward_and_adapt(self, unit: ImageEpisode) -> None:
        """One AdamW step on both residuals (a fresh optimizer, as the reference builds one per step)."""
        if unit.selected is None:
            self.begin_episode(unit)
        o = self.options
        with self.autocast():
            text, visual = self.adjusted_prototypes(unit)
            logits = self.clip_logits(unit.features[unit.selected], text).float().mean(dim=0, keepdim=True)
            logits = logits + self.visual_logits(unit.query, visual, unit)
            loss = marginal_entropy(logits)
            loss = loss + o.ALIGN_WEIGHT * alignment_loss(visual, text[unit.classes], o.ALIGN_TEMPERATURE)
        optimizer = torch.optim.AdamW([
            {"params": [unit.text_residual], "lr": o.LR_TEXT},
            {"params": [unit.visual_residual], "lr": o.LR_IMAGE}],
            betas=ADAMW_BETAS, eps=o.ADAMW_EPS, weight_decay=o.WEIGHT_DECAY)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def episode_logits(self, unit: ImageEpisode, outputs) -> torch.Tensor:
        """The prediction with the adjusted prototypes, then the evolution of the global textual prototypes."""
        with self.autocast():
            text, visual = self.adjusted_prototypes(unit)
            if self.options.PREDICT_FROM == "image":
                query = unit.features[:1]
                logits = self.clip_logits(query, text).float()
            else:
                all_views = self.clip_logits(unit.features, text).float()
                selected = lowest_entropy_views(all_views, self.n_selected)
                query = unit.features[selected].mean(dim=0, keepdim=True)
                logits = all_views[selected].mean(dim=0, keepdim=True)
            logits = logits + self.visual_logits(query, visual, unit)
        if self.normalised_entropy(logits) < self.options.TEXT_UPDATE_THRESHOLD:
            self.text_updates += 1
            n = int(self.text_updates)
            self.text_prototypes.copy_(self.text_prototypes * (n / (n + 1)) + text.float() * (1 / (n + 1)))
        return logits
