"""TPS: test-time prototype shifting (Sui, Wang & Yeung-Levy, "Just Shift It: Test-Time Prototype Shifting for
Zero-Shot Generalization with Vision-Language Models", WACV 2025; code elaine-sui/TPS, ``shift_classification.py``
``test_time_tuning`` / ``run_shift_iter``, ``model/learnable_shift.py`` ``TestTimeShiftTuning``, ``model/shifter.py``
``Shifter``; TTA-VLM's ``instance_method/tps.py`` and ``clip/custom_clip.py`` ``ClipShifterTestTimeTuning_v2``).

Class prototypes p_c are computed once from the frozen text encoder (TPS.PROTOTYPES: the mean of the normalised
features of the class's prompts under the model's templates, of its described prompts, or the average of both
means). Per test image, a learnable shift s, per class (C, D) or shared (D,) (TPS.SHIFT), starts at zero; the
image and TEST.N_AUGMENTATIONS - 1 random views give the logits

    logits = logit_scale * f(view) . normalize(normalize(p_c) + s_c),

the TPS.SELECTION_P fraction of views with the lowest softmax entropy is kept (re-chosen at every step, as the
authors' code, or chosen at the first step and kept, as TTA-VLM's: TPS.SELECTION), and OPTIM.STEPS AdamW steps on s
minimise TPT's marginal entropy of the kept views. Then the image itself is classified with the shifted prototypes.
Both encoders are frozen, so every view's image feature is computed once per image, all views of a batch in one
encoder pass; the views are drawn image by image, so a batch gives what its images give one at a time.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.files import read_class_texts
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import ViewsMethod, lowest_entropy_views
from methods.losses import marginal_entropy
from methods.prompts import ImageViews
from methods.registry import register_method

SHIFTS = ("per_class", "shared")
PROTOTYPES = ("templates", "descriptions", "templates_and_descriptions")
POOLINGS = ("micro", "macro")
SELECTIONS = ("every_step", "first_step")


def descriptor_sentence(descriptor: str) -> str:
    """The authors' ``make_descriptor_sentence`` (utils/save_concepts.py, after Menon & Vondrick): the clause a
    GPT-4 descriptor becomes after "<class name>, "."""
    if descriptor.startswith("a") or descriptor.startswith("an"):
        return f"which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f"which {descriptor}"
    if descriptor.startswith("used"):
        return f"which is {descriptor}"
    return f"which has {descriptor}"


def read_descriptions(path: str, class_names) -> dict:
    """The descriptors JSON ({class name: [descriptors]}, the authors' gpt4_descriptors/<set>-gpt4.json), checked
    to hold a non-empty list for every class (spelt as the data set spells it, "_" read as a space)."""
    return read_class_texts(path, class_names, "TPS.DESCRIPTIONS", "expected the authors' gpt4_descriptors/"
                            "<set>-gpt4.json, or '' with TPS.PROTOTYPES templates", "descriptors", nonempty=True)


@torch.no_grad()
def mean_normalised_features(model, texts: list[str], autocast) -> torch.Tensor:
    """(D,) the mean of the L2-normalised text features of ``texts``, not renormalised (the authors' cached
    prototype before ``get_text_features`` normalises it)."""
    with autocast:
        tokens = model.truncate_tokens(model.tokenizer(texts)).to(model.tokens.device)
        features = F.normalize(model.encode_tokens(tokens).float(), dim=-1)
    return features.mean(dim=0)


def class_prototypes(model, prototypes: str, descriptions_path: str, pooling: str, autocast) -> torch.Tensor:
    """(C, D) unnormalised prototypes: the authors' ``text_embeds`` (``TestTimeShiftTuning.__init__``). Templates
    alone: the model's own template-ensemble features (normalised mean of the normalised template features)."""
    if prototypes == "templates":
        return model.text_features()[0].detach().float()
    descriptions = read_descriptions(descriptions_path, model.class_names)
    rows = []
    for name in model.class_names:
        spoken = name.replace("_", " ")
        described = [f"{spoken}, " + descriptor_sentence(d) for d in descriptions[spoken]]
        concept_mean = mean_normalised_features(model, described, autocast)
        if prototypes == "descriptions":
            rows.append(concept_mean)
            continue
        template_mean = mean_normalised_features(model, [t.format(spoken) for t in model.templates], autocast)
        if pooling == "micro":        # --with_concepts --with_templates: the two means averaged
            rows.append((concept_mean + template_mean) / 2)
        else:                         # --macro_pooling: weighted by the number of prompts behind each mean
            n_described, n_templates = len(described), len(model.templates)
            rows.append((concept_mean * n_described + template_mean * n_templates) / (n_described + n_templates))
    return torch.stack(rows)


@register_method("tps")
class TPS(ViewsMethod):
    views_node = mixed_precision_node = "TPS"
    protocol = ADAPT_THEN_PREDICT
    episode = "image"
    config_defaults = {"TPS": {
        # "per_class": one shift vector per class prototype, (C, D) (the authors' main setting, --per_label, and
        # TTA-VLM's); "shared": one vector (D,) added to every prototype (scripts/shift/shift_text_shared*.sh).
        "SHIFT": Option("per_class", choices=SHIFTS),
        # What the prototypes are the mean of: "templates" = the model's templates (CLIP.PROMPT_MODE ensemble: the
        # 80 CLIP ImageNet templates, --with_templates; custom "a photo of a {}.": the no-flag runs and TTA-VLM);
        # "descriptions" = "<class>, which ... <descriptor>" of TPS.DESCRIPTIONS (--with_concepts);
        # "templates_and_descriptions" = both means pooled (--with_concepts --with_templates: the README's run).
        "PROTOTYPES": Option("templates", choices=PROTOTYPES),
        # The descriptors JSON (the authors' gpt4_descriptors/<set>-gpt4.json), read by the two description choices.
        "DESCRIPTIONS": Option("", reads_file=True),
        # How templates_and_descriptions pools the two means: "micro" their plain average (the README's run),
        # "macro" weighted by how many prompts each averages (--macro_pooling).
        "POOLING": Option("micro", choices=POOLINGS),
        # "every_step": the confident views re-chosen at every step (run_shift_iter); "first_step": chosen at the
        # first step and kept (TTA-VLM). The same with the authors' single step.
        "SELECTION": Option("every_step", choices=SELECTIONS),
        # Fraction of the views with the lowest entropy whose averaged prediction is tuned (--selection_p 0.1).
        "SELECTION_P": Option(0.1, within="(0, 1]"),
        # How the views are made (AugMixAugmenter(augmix=len(set_id) > 1): crop + flip on ImageNet and its
        # variants, AugMix on the fine-grained sets).
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
        # Both references run under CUDA fp16 autocast with a GradScaler (init_scale 1000); ignored on the CPU.
        "MIXED_PRECISION": True,
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        options = cfg.TPS
        if options.PROTOTYPES == "templates":
            if options.DESCRIPTIONS:
                raise ConfigError(f"TPS.DESCRIPTIONS = '{options.DESCRIPTIONS}' is given but TPS.PROTOTYPES "
                                  f"templates does not read it; set TPS.PROTOTYPES templates_and_descriptions")
        elif not options.DESCRIPTIONS:
            raise ConfigError(f"TPS.PROTOTYPES {options.PROTOTYPES} needs TPS.DESCRIPTIONS: the path of the "
                              f"authors' gpt4_descriptors/<set>-gpt4.json; or set TPS.PROTOTYPES templates")
        else:
            read_descriptions(options.DESCRIPTIONS, class_names)

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.options = cfg.TPS
        self.reselect = cfg.TPS.SELECTION == "every_step"

    def cost_info(self) -> dict:
        """Per test image: the views through the image encoder once (frozen); OPTIM.STEPS backward passes through
        the shifted prototypes only (no encoder)."""
        return {"views_per_image": self.views_per_image, "text_forward_passes_per_image": 0,
                "backward_passes_per_image": self.steps}

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        """Freeze all of CLIP, cache the prototypes (frozen: a non-persistent buffer, never reset) and create
        the zero shift."""
        self.model.eval()
        self.model.requires_grad_(False)
        o = self.options
        prototypes = class_prototypes(self.model, o.PROTOTYPES, o.DESCRIPTIONS, o.POOLING, self.autocast())
        # get_text_features normalises the cached prototypes before the shift is added.
        self.register_buffer("prototypes", F.normalize(prototypes, dim=-1), persistent=False)
        shape = prototypes.shape if o.SHIFT == "per_class" else prototypes.shape[1:]
        self.shift = nn.Parameter(torch.zeros(shape, dtype=prototypes.dtype, device=prototypes.device))

    def collect_params(self):
        return [self.shift], ["shift"]

    def setup_scaler(self):
        """The references' GradScaler(init_scale=1e3) under CUDA fp16 autocast; none on the CPU."""
        return torch.amp.GradScaler("cuda", init_scale=1000) if self.uses_mixed_precision() else None

    # ------------------------------------------------------------------ state
    def reset_episode(self) -> None:
        """Before every image (``model.reset()`` and the saved optimizer state): the shift back to zero and the
        optimizer state cleared; the gradient scaler is not reset per image, as in both references."""
        with torch.no_grad():
            self.shift.zero_()
        self._restore_snapshot(("optimizer",))

    # ------------------------------------------------------------------ adaptation
    def shifted_prototypes(self) -> torch.Tensor:
        """(C, D) normalize(prototype + shift), the classifier of every step and of the prediction."""
        return F.normalize(self.prototypes + self.shift, dim=-1)

    def split_images(self, x: torch.Tensor) -> list[ImageViews]:
        """Every image's views (drawn image by image), encoded in one pass for the whole batch."""
        views = self.views.image_by_image(x)
        with torch.no_grad(), self.autocast():
            features = F.normalize(self.model.encode_image(views.flatten(0, 1)), dim=-1)
        return [ImageViews(f) for f in features.view(views.shape[0], views.shape[1], -1)]

    @torch.enable_grad()
    def forward_and_adapt(self, unit: ImageViews) -> None:
        """One AdamW step on the shift: marginal entropy of the confident views' predictions."""
        with self.autocast():
            logits = self.model.logits(unit.features, self.shifted_prototypes())
        logits = logits.float()
        if unit.selected is None or self.reselect:
            unit.selected = lowest_entropy_views(logits.detach(), self.n_selected)
        self.optimizer_step(marginal_entropy(logits[unit.selected]))

    @torch.no_grad()
    def episode_logits(self, unit: ImageViews, outputs) -> torch.Tensor:
        """The image itself, classified with the shifted prototypes."""
        with self.autocast():
            return self.model.logits(unit.features[:1], self.shifted_prototypes()).float()
