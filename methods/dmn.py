"""DMN: dual memory networks, zero-shot (Zhang, Zhu, Ye, Tang, Zhang, "Dual Memory Networks: A Versatile
Adaptation Approach for Vision-Language Models", CVPR 2024; official code YBZh/DMN ``dmn_main.py``
``direct_inference`` and ``DualMem``, ``clip/fix_clip.py``, ``scripts/run.sh`` with ``--n_shot 0``). Nothing is
trained: the static memory (few-shot images) is empty in the zero-shot setting and the memory's learnable
projections stay zero, so only the dynamic memory of test features and the text classifier remain.

Per test image, in stream order (``direct_inference``):

1. Text probabilities of every view, ``softmax(scale * f_v @ t.T)`` (scale: the model's logit scale).
2. The DMN.SELECTION_P fraction of views with the lowest entropy; their averaged probabilities ``p`` give the
   pseudo-label ``argmax p`` and the entropy ``-sum p log(p + DMN.ENTROPY_EPSILON)`` (``update_memory_bank``).
3. The image's own feature (view 0) enters its pseudo-label's memory (DMN.MEMORY_SIZE slots per class) if there is
   room, else replaces the highest-entropy entry when its entropy is lower than some entry's (DMN.REPLACEMENT).
4. The memory read-out with the image already in it (``get_image_pred``): per class the entries and the class's
   text feature are keys and values, weights ``exp(-beta (1 - q.k))``, the weighted sum renormalised is the class's
   adaptive classifier ``a_c``; memory probabilities ``softmax(scale * a_c . q)``.
5. Reported: the log of the image's text probabilities (view 0) + DMN.MEMORY_WEIGHT * the memory probabilities
   (the reference's scores; their argmax is its prediction, their softmax the scores normalised).

``dmn_weak`` is TTA-VLM's DMN_WEAK (``online_method/dmn_weak.py``): the same with the image alone, no views.
A batch is processed image by image in stream order (the memory and the scores are those of batch size 1); the
views of a batch are encoded in one pass. The memory is buffers, so ``reset()`` empties it exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.files import read_class_texts
from conf.options import Option
from methods.augmentations import VIEW_AUGMENTATIONS
from methods.base import TRAINING_FREE
from methods.caches import cache_dtype
from methods.frames import ViewsMethod
from methods.losses import log_probabilities, softmax_entropy
from methods.prompts import templates_and_descriptions_features
from methods.registry import register_method

TEXT_PROMPTS = ("templates", "templates_and_cupl")
# The reference's CuPL file of each data set (fix_clip.py ID_to_gptprompts_path): data/gpt3_prompts/<file>.json.
CUPL_FILE_NAMES = {"imagenet_c": "imagenet", "imagenet_a": "imagenet", "imagenet_v2": "imagenet",
                   "imagenet_r": "imagenet", "imagenet_sketch": "imagenet", "caltech101": "caltech101",
                   "dtd": "dtd", "eurosat": "eurosat", "fgvc_aircraft": "fgvcaircraft", "food101": "food101",
                   "flowers102": "flowers102", "oxford_pets": "oxfordpets", "stanford_cars": "stanfordcars",
                   "sun397": "sun397", "ucf101": "ucf101"}
# select_confident_samples' entropy of probabilities: -sum p log(p + 1e-6).
SELECTION_EPSILON = 1e-6


class DynamicMemory(nn.Module):
    """The dynamic memory (``image_feature_memory``, ``image_entropy_mem``, ``image_feature_count``): per class up
    to ``size`` features with their entropies, in slot order (not sorted). Buffers, so reset() empties it."""

    def __init__(self, num_classes: int, size: int, dim: int, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.size = size
        self.register_buffer("features", torch.zeros(num_classes, size, dim, dtype=dtype, device=device))
        self.register_buffer("entropies", torch.zeros(num_classes, size, dtype=torch.float32, device=device))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long, device=device))

    @torch.no_grad()
    def insert(self, label: int, feature: torch.Tensor, entropy: torch.Tensor, always_replace: bool) -> None:
        """Append while the class has room; when full, overwrite the highest-entropy slot (the first of equal
        ones) if the new entropy is lower than some entry's (the reference), or in any case (TTA-VLM)."""
        n = int(self.counts[label])
        if n < self.size:
            slot = n
            self.counts[label] = n + 1
        else:
            worst = int(self.entropies[label].argmax())
            if not always_replace and not bool(entropy < self.entropies[label, worst]):
                return
            slot = worst
        self.features[label, slot] = feature
        self.entropies[label, slot] = entropy

    def read_out(self, query: torch.Tensor, text: torch.Tensor, beta: float) -> torch.Tensor:
        """The adaptive classifier (C, D) for the normalised query (D,): per class the memory entries and the text
        feature (C, D) weighted by exp(-beta (1 - q.k)), summed and renormalised (twice, as the reference: the
        zero output bias between). Empty slots are zero vectors and add nothing."""
        slots = F.normalize(torch.cat([self.features, text.unsqueeze(1).to(self.features.dtype)], dim=1), dim=-1)
        weights = torch.exp(-beta * (1 - slots @ query))                      # (C, S + 1)
        adaptive = F.normalize(torch.einsum("cs,csd->cd", weights, slots), dim=-1)
        return F.normalize(adaptive, dim=-1)


def read_cupl(path: str, class_names) -> dict:
    return read_class_texts(path, class_names, "DMN.CUPL_PROMPTS", "expected the reference's data/gpt3_prompts/"
                            "CuPL_prompts_<set>.json; '' with DMN.TEXT_PROMPTS templates", "descriptions")


@register_method("dmn")
class DMN(ViewsMethod):
    views_node = "DMN"
    single_view_is_the_image = True     # one view: the image itself (dmn_weak; the reference's code needs views)
    protocol = TRAINING_FREE
    config_defaults = {"DMN": {
        # Slots per class of the dynamic memory (run.sh: --memory_size 50).
        "MEMORY_SIZE": Option(50, within="[1, inf)"),
        # Sharpness of the read-out weights exp(-beta (1 - q.k)) (run.sh: --beta 5.5).
        "BETA": Option(5.5, within="[0, inf)"),
        # Weight of the memory probabilities beside the text probabilities (weight 1). The reference searches it
        # after the stream on the test labels (direct_inference: beta2 in 0.001 ... 1000); the shipped configs set
        # the value its logs found per data set; 1.0 is TTA-VLM's fixed alpha.
        "MEMORY_WEIGHT": Option(1.0, within="[0, inf)"),
        # Fraction of the views (lowest entropy first) averaged for the pseudo-label (run.sh: --selection_p 0.1).
        "SELECTION_P": Option(0.1, within="(0, 1]"),
        # How the views are made (the reference: AugMix for the fine-grained sets, crops and flips for ImageNet's).
        "VIEW_AUGMENTATION": Option("crop_flip", choices=VIEW_AUGMENTATIONS),
        # "mean_probabilities": the reference ranks the views by -sum p log(p + 1e-6) and averages the confident
        # views' probabilities; "mean_logits": TTA-VLM ranks by the softmax entropy and averages their logits.
        "PSEUDO_LABEL": Option("mean_probabilities", choices=("mean_probabilities", "mean_logits")),
        # The epsilon of the memory entropy -sum p log(p + eps): 1e-8 in the reference, 1e-5 in TTA-VLM.
        "ENTROPY_EPSILON": Option(1e-8, within="[0, inf)"),
        # A full class memory: "lower_entropy" replaces its highest-entropy entry only if the new entropy is lower
        # (the reference); "always" replaces it in any case (TTA-VLM's MemoryBank.update).
        "REPLACEMENT": Option("lower_entropy", choices=("lower_entropy", "always")),
        # "templates": the text classifier averages the templates of CLIP.PROMPT_MODE; "templates_and_cupl" adds the
        # CuPL descriptions of DMN.CUPL_PROMPTS, as the reference (--text_prompt tip_cupl).
        "TEXT_PROMPTS": Option("templates", choices=TEXT_PROMPTS),
        # The reference's CuPL JSON for the data set ({class name: [descriptions]}, YBZh/DMN
        # data/gpt3_prompts/CuPL_prompts_<set>.json; not shipped here); read with TEXT_PROMPTS templates_and_cupl.
        "CUPL_PROMPTS": Option("", reads_file=True),
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        d = cfg.DMN
        if d.TEXT_PROMPTS == "templates":
            if d.CUPL_PROMPTS:
                raise ConfigError(f"DMN.CUPL_PROMPTS = '{d.CUPL_PROMPTS}' is given but DMN.TEXT_PROMPTS templates "
                                  f"does not read it; set DMN.TEXT_PROMPTS templates_and_cupl")
        elif not d.CUPL_PROMPTS:
            raise ConfigError(f"DMN.TEXT_PROMPTS templates_and_cupl needs DMN.CUPL_PROMPTS: the path of YBZh/DMN's "
                              f"data/gpt3_prompts/CuPL_prompts_{CUPL_FILE_NAMES.get(cfg.CORRUPTION.DATASET, '<set>')}"
                              f".json; or set DMN.TEXT_PROMPTS templates")
        else:
            read_cupl(d.CUPL_PROMPTS, class_names)

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        self.options = cfg.DMN

    def setup_scaler(self):
        return None     # nothing is trained

    def setup_state(self) -> None:
        if self.options.TEXT_PROMPTS == "templates_and_cupl":
            descriptions = read_cupl(self.options.CUPL_PROMPTS, self.model.class_names)
            text = templates_and_descriptions_features(self.model, descriptions, self.autocast())
        else:
            text = self.model.text_features()[0]
        dtype = cache_dtype(text)
        self.register_buffer("text", text.detach().to(dtype).clone(), persistent=False)   # constant
        self.memory = DynamicMemory(self.num_classes, int(self.options.MEMORY_SIZE), text.shape[1],
                                    device=text.device, dtype=dtype)

    def pseudo_labels(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Per image of logits (B, V, C): the pseudo-label and the memory entropy of its confident views."""
        if self.options.PSEUDO_LABEL == "mean_probabilities":
            probs = logits.softmax(dim=-1)
            ranking = -(probs * torch.log(probs + SELECTION_EPSILON)).sum(dim=-1)        # (B, V)
            chosen = ranking.argsort(dim=-1, stable=True)[:, :self.n_selected]
            mean = probs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, probs.shape[-1])).mean(dim=1)
        else:
            ranking = softmax_entropy(logits.flatten(0, 1)).view(logits.shape[:2])
            chosen = ranking.argsort(dim=-1, stable=True)[:, :self.n_selected]
            mean = logits.gather(1, chosen.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).mean(dim=1)
            mean = mean.softmax(dim=-1)
        entropy = -(mean * torch.log(mean + self.options.ENTROPY_EPSILON)).sum(dim=-1)
        return mean.argmax(dim=-1).tolist(), entropy

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        views = self.views.image_by_image(x)          # (B, V, C, H, W); view 0 = the image
        with self.autocast():
            features = self.model.encode_image(views.flatten(0, 1))
        features = F.normalize(features.to(self.text.dtype), dim=-1).view(*views.shape[:2], -1)
        scale = float(self.model.logit_scale)
        logits = scale * features @ self.text.t()     # (B, V, C)
        labels, entropies = self.pseudo_labels(logits)
        o, scores = self.options, []
        for i, label in enumerate(labels):            # stream order: image i reads the memory of images <= i
            query = features[i, 0]
            self.memory.insert(label, query, entropies[i], o.REPLACEMENT == "always")
            memory_logits = scale * self.memory.read_out(query, self.text, o.BETA) @ query
            scores.append(logits[i, 0].softmax(dim=-1) + o.MEMORY_WEIGHT * memory_logits.softmax(dim=-1))
        # log of the reference's scores: the same argmax, and softmax gives the scores normalised (calibration)
        return log_probabilities(torch.stack(scores).float())


@register_method("dmn_weak")
class DMNWeak(DMN):
    """TTA-VLM's DMN_WEAK: the image alone (no views), the rest as DMN."""
    config_defaults = {}     # the DMN node is declared once, by dmn

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        if cfg.TEST.N_AUGMENTATIONS != 1:
            raise ConfigError(f"dmn_weak classifies the image alone: TEST.N_AUGMENTATIONS must be 1, got "
                              f"{cfg.TEST.N_AUGMENTATIONS} (dmn uses views)")
        super().check_setup(cfg, model_spec, class_names)
