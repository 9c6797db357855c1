"""CLIPTTA (Lafon et al., NeurIPS 2025; code MarcLafon/cliptta): closed-set test-time adaptation of CLIP with a
soft contrastive loss on the batch's pseudo-captions, a marginal-entropy regulariser and a class-wise confident
memory (CCM).

Per test batch, OPTIM.STEPS (authors: 10) Adam steps on the affine parameters of the image tower's LayerNorms
(the text tower stays frozen, its class features computed once), then the batch is classified with the adapted
model (adapt, then predict). One step:
- pseudo-captions: each image's predicted class text feature t_i = z_hat[argmax_c cos(x_i, z_hat_c)];
- loss on a set of images (the batch, a sample of the memory, or both, CLIPTTA.ADAPT_ON):
  L_tta = soft contrastive loss on the B x B matrix  LOGIT_SCALE * x_i . t_j  (CLIPTTA.LOSS, LOSS_SIDES),
  L_reg = entropy of the mean prediction softmax(LOGIT_SCALE * cos) over the set (with log(p + 1e-6));
  L = BETA_TTA * L_tta - BETA_REG * L_reg, summed over the sets (batch and memory sample) as the authors do;
- at the batch's first step only, the memory receives the batch: per predicted class it keeps the NUM_SHOTS
  images of highest confidence max softmax(CONFIDENCE_LOGIT_SCALE * cos); every step draws max(1,
  SAMPLE_SIZE // C) images of each class (all of them where a class holds fewer).

The authors' closed-set CIFAR scripts run their ``cliptta`` class (batch + memory); their ImageNet scripts run
``cliptta_old`` (memory sample only): CLIPTTA.ADAPT_ON selects (docs/cliptta.md).

Open-set parts (their ``cliptta_otsu.CLIPTTA`` with ``AbstractOpenSetTTAModel``; off by default, so ``cliptta``
stays closed-set; ``cliptta_otsu`` is the same class with the open-set scripts' values):
- the OOD score s_i = get_scores(CONFIDENCE_LOGIT_SCALE * cos_i) of type CLIPTTA.SCORE_TYPE (methods/ood_scores.py),
  higher = more in-distribution; it is also the method's own OOD score of the reported batch;
- USE_OOD_LOSS: + BETA_OOD * L_ood, the Otsu-style loss of the soft split w_i = sigmoid((s_i - alpha) / GAMMA)
  (CLIPTTA.LOSS_OOD: max_inter_var, min_intra_var or avg_contrastive, the paper's OCE); alpha is set to the
  Otsu threshold of the batch's scores before its first step and, with UPDATE_ALPHA, learnt by Adam beside the
  norm parameters (its own parameter group);
- DETECT_OOD: L_tta and the memory take only the images with s_i > threshold (alpha with UPDATE_ALPHA, else
  Otsu's threshold of the step's scores); L_reg keeps the whole batch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import NormAffineTTA
from methods.losses import mean_prediction_entropy, softmax_entropy
from methods.ood_scores import SCORE_TYPES, cliptta_ood_scores
from methods.registry import register_method

ADAPT_SETS = ("batch_and_memory", "memory", "batch")
CONTRASTIVE_LOSSES = ("soft", "hard")
LOSS_SIDES = ("image", "symmetric")
OOD_LOSSES = ("max_inter_var", "min_intra_var", "avg_contrastive")
OTSU_BINS = 256         # skimage.filters.threshold_otsu's nbins default, which the reference uses


def pseudo_caption_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x B image-to-pseudo-caption logits  logit_scale * x_i . t_{pred_j}, and the (B, C) cosines).

    image_features (B, D) and text_features (C, D) are L2-normalised; the pseudo-label of image j is its
    highest-cosine class (no gradient flows through the choice)."""
    cosines = image_features @ text_features.t()
    predicted = cosines.detach().topk(1, dim=1).indices[:, 0]
    captions = text_features.index_select(0, predicted)
    return logit_scale * image_features @ captions.t(), cosines


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float,
                     loss: str = "soft", sides: str = "image") -> torch.Tensor:
    """CLIPTTA's L_tta on one set of images.

    soft: mean over rows of the entropy of softmax(row) (the authors' --use_softmax_entropy, every script);
    hard: CLIP's cross-entropy with the diagonal as targets. sides "image": the image-to-text matrix counted
    for both halves (the authors' code whenever the text tower is frozen, as in every closed-set script);
    "symmetric": half image-to-text rows, half text-to-image rows (the transposed matrix; CLIP's form, the
    paper's loss, and the authors' code when it adapts the text tower)."""
    per_image, _ = pseudo_caption_logits(image_features, text_features, logit_scale)
    per_text = per_image.t() if sides == "symmetric" else per_image
    if loss == "soft":
        return (softmax_entropy(per_image).mean(0) + softmax_entropy(per_text).mean(0)) / 2
    diagonal = torch.arange(per_image.shape[0], device=per_image.device)
    return (F.cross_entropy(per_image, diagonal) + F.cross_entropy(per_text, diagonal)) / 2


def threshold_otsu(values: torch.Tensor) -> float:
    """Otsu's threshold of the values, equal to skimage.filters.threshold_otsu(values as float32 numpy), which the
    reference calls: one value throughout gives that value; otherwise a 256-bin histogram between min and max
    (numpy's, as skimage's exposure.histogram for float input; counts as float32), the weights and means of the
    two classes at every cut, and the centre of the bin that ends the lower class where the between-class
    variance w_low w_high (m_low - m_high)^2 is largest (its first maximum). Non-finite values are refused."""
    flat = values.detach().float().cpu().numpy().reshape(-1)
    if np.all(flat == flat[0]):
        return float(flat[0])
    counts, edges = np.histogram(flat, bins=OTSU_BINS)     # raises on NaN/inf: no finite range
    counts = counts.astype(np.float32)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts)
    weight_high = np.cumsum(counts[::-1])[::-1]
    mean_low = np.cumsum(counts * centres) / weight_low
    mean_high = (np.cumsum((counts * centres)[::-1]) / weight_high[::-1])[::-1]
    between = weight_low[:-1] * weight_high[1:] * (mean_low[:-1] - mean_high[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def otsu_loss(scores: torch.Tensor, alpha: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """The reference's get_otsu_loss: soft membership w = sigmoid((s - alpha) / gamma) of the in-distribution
    side, p_in = mean w, mu_in = sum w s / sum w (p_out, mu_out with 1 - w), then
    max_inter_var: -p_in p_out (mu_in - mu_out)^2; min_intra_var: -p_out mu_out^2 - p_in mu_in^2;
    avg_contrastive: -(mu_in - mu_out)^2. Where one side's weights sum to 0 (every w rounds to 0 or to 1) the
    reference divides 0 by 0 and its parameters turn NaN; here the loss is then 0."""
    w = torch.sigmoid((scores - alpha) / gamma)
    if float(w.detach().sum()) == 0.0 or float((1 - w.detach()).sum()) == 0.0:
        return scores.sum() * 0.0
    p_in, p_out = w.mean(), (1 - w).mean()
    mu_in = torch.dot(w, scores) / torch.sum(w)
    mu_out = torch.dot(1 - w, scores) / torch.sum(1 - w)
    if kind == "max_inter_var":
        return -p_in * p_out * (mu_in - mu_out).pow(2)
    if kind == "min_intra_var":
        return -p_out * mu_out.pow(2) - p_in * mu_in.pow(2)
    return -(mu_in - mu_out).pow(2)     # avg_contrastive (OOD_LOSSES)


class ClassConfidentMemory:
    """The authors' CCM: per (pseudo-)class, the NUM_SHOTS most confident images seen so far (on the CPU, as
    theirs). ``sample`` takes max(1, sample_size // C) images per class, at random where a class holds more
    (sample_size capped at NUM_SHOTS * C, as theirs), class by class in class order. The draws come from a
    dedicated CPU generator seeded with the run's seed (theirs: the global RNG), so a reset replays exactly."""

    def __init__(self, num_shots: int, num_classes: int, sample_size: int, seed: int):
        self.num_shots = int(num_shots)
        self.num_classes = int(num_classes)
        self.sample_size = min(int(sample_size), self.num_shots * self.num_classes)
        self.per_class_sample = max(1, self.sample_size // self.num_classes)
        self.seed = int(seed)
        self.clear()

    def clear(self) -> None:
        self.images: list[torch.Tensor | None] = [None] * self.num_classes
        self.confidences = [torch.empty(0) for _ in range(self.num_classes)]
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def __len__(self) -> int:
        return sum(len(c) for c in self.confidences)

    def class_counts(self) -> list[int]:
        return [len(c) for c in self.confidences]

    def add(self, images: torch.Tensor, labels: torch.Tensor, confidences: torch.Tensor) -> None:
        images, labels, confidences = images.detach().cpu(), labels.cpu(), confidences.detach().float().cpu()
        for c in torch.unique(labels).tolist():
            members = labels == c
            stored = images[members] if self.images[c] is None else torch.cat([self.images[c], images[members]])
            scores = torch.cat([self.confidences[c], confidences[members]])
            if len(scores) > self.num_shots:
                keep = scores.topk(k=self.num_shots).indices
                stored, scores = stored[keep], scores[keep]
            self.images[c], self.confidences[c] = stored, scores

    def sample(self) -> torch.Tensor:
        drawn = []
        for c in range(self.num_classes):
            count = len(self.confidences[c])
            if count > self.per_class_sample:
                pick = torch.randperm(count, generator=self.generator)[:self.per_class_sample]
                drawn.append(self.images[c][pick])
            elif count:
                drawn.append(self.images[c])
        return torch.cat(drawn)


@register_method("cliptta")
class CLIPTTA(NormAffineTTA):
    protocol = ADAPT_THEN_PREDICT
    # The reference's final scores (ood_scores), reported beside its logits on every batch.
    own_ood_score = "get_scores(CLIPTTA.SCORE_TYPE) of the adapted model's cosines"
    config_defaults = {"CLIPTTA": {
        # What each step adapts on: "batch_and_memory" (the authors' `cliptta` class, their CIFAR scripts),
        # "memory" (a memory sample only: their `cliptta_old` class, their ImageNet scripts), "batch" (no memory).
        "ADAPT_ON": Option("batch_and_memory", choices=ADAPT_SETS),
        # "soft": entropy of each row's softmax (--use_softmax_entropy, every script); "hard": CLIP's
        # cross-entropy with the diagonal as targets (the code's other branch).
        "LOSS": Option("soft", choices=CONTRASTIVE_LOSSES),
        # "image": image-to-text rows only (code with a frozen text tower); "symmetric": + text-to-image (paper).
        "LOSS_SIDES": Option("image", choices=LOSS_SIDES),
        "BETA_TTA": Option(1.0, within="[0, inf)"),      # weight of L_tta (scripts: 1.0)
        "BETA_REG": Option(1.0, within="[0, inf)"),      # weight of -L_reg (scripts: 1.0; code default 0.1)
        "NUM_SHOTS": Option(4, within="[1, inf)"),       # images kept per class in the memory
        "SAMPLE_SIZE": Option(40, within="[1, inf)"),    # memory sample per step: max(1, SAMPLE_SIZE // C) per class
        # Scale of the cosines in every get_scores score: the memory's confidence and the OOD score (the code's
        # ood_logit_scale, 1.0).
        "CONFIDENCE_LOGIT_SCALE": Option(1.0, within="(0, inf)"),
        # The memory's confidence, a get_scores type (--id_score_type, default and scripts: max_prob).
        "ID_SCORE_TYPE": Option("max_prob", choices=SCORE_TYPES),
        # Open-set parts (configuration.py defaults: all off; scripts/open_set/*/cliptta.sh: on, conf cliptta_otsu).
        # The OOD score, a get_scores type (--score_type; default max_prob, open-set scripts max_log_prob); also
        # the method's own OOD score of the reported batch (OPEN_SET.SCORE method).
        "SCORE_TYPE": Option("max_prob", choices=SCORE_TYPES),
        "USE_OOD_LOSS": False,        # --use_ood_loss: + BETA_OOD * L_ood, alpha set by Otsu before every batch
        "DETECT_OOD": False,          # --detect_ood: L_tta and the memory take only the images scored > threshold
        # --update_alpha: alpha learnt by Adam (own parameter group) and used as the filter's threshold; False:
        # the filter recomputes Otsu's threshold of every step's scores.
        "UPDATE_ALPHA": False,
        "ALPHA": Option(0.5, within="(-inf, inf)"),    # --alpha: alpha's start (re-set by Otsu with USE_OOD_LOSS)
        "GAMMA": Option(0.005, within="(0, inf)"),     # --gamma: temperature of w = sigmoid((s - alpha) / gamma)
        "BETA_OOD": Option(0.1, within="[0, inf)"),    # --beta_ood (default 0.1; open-set scripts 1.0 but CIFAR-10-C)
        "LOSS_OOD": Option("max_inter_var", choices=OOD_LOSSES),   # --loss_ood_type (scripts: avg_contrastive)
        # Fixed scale of the cosines in the loss and the reported logits (the code's logit_scale, 100).
        "LOGIT_SCALE": Option(100.0, within="(0, inf)"),
        "ADAM_EPS": Option(1e-6, within="(0, inf)"),     # the code's Adam/AdamW eps
    }}

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)   # the text tower must stay frozen
        if cfg.CLIP.PRECISION != "fp32":
            raise ConfigError(f"cliptta trains LayerNorm parameters and needs fp32 weights: set CLIP.PRECISION fp32 "
                              f"(got {cfg.CLIP.PRECISION}); MIXED_PRECISION True gives fp16 compute on CUDA")
        node = cfg.CLIPTTA
        if (node.DETECT_OOD or node.USE_OOD_LOSS) and node.ADAPT_ON == "memory":
            raise ConfigError(f"{cls.method_name}: CLIPTTA.DETECT_OOD / USE_OOD_LOSS need the batch in the step "
                              f"(CLIPTTA.ADAPT_ON batch_and_memory or batch, got memory: the authors' cliptta_old "
                              f"has no open-set parts)")
        if cfg.MODEL.RESET_AFTER_NUM_UPDATES != 0:
            raise ConfigError(f"cliptta: MODEL.RESET_AFTER_NUM_UPDATES must be 0 (got "
                              f"{cfg.MODEL.RESET_AFTER_NUM_UPDATES}); a reset between a batch's steps would empty "
                              f"the memory the remaining steps sample from")

    def __init__(self, cfg, model, num_classes: int):
        super().__init__(cfg, model, num_classes)
        node = cfg.CLIPTTA
        self.adapt_on = node.ADAPT_ON
        self.loss_kind, self.loss_sides = node.LOSS, node.LOSS_SIDES
        self.beta_tta, self.beta_reg = float(node.BETA_TTA), float(node.BETA_REG)
        self.logit_scale = float(node.LOGIT_SCALE)
        self.adam_eps = float(node.ADAM_EPS)        # the optimizer (base class) reads it
        self.confidence_logit_scale = float(node.CONFIDENCE_LOGIT_SCALE)
        self.memory = (ClassConfidentMemory(node.NUM_SHOTS, num_classes, node.SAMPLE_SIZE, cfg.RNG_SEED)
                       if self.adapt_on != "batch" else None)
        self.step_on_batch = 0      # steps taken on the current batch (the memory takes the batch at step 0)
        self.last_loss: torch.Tensor | None = None
        self.id_score_type, self.score_type = node.ID_SCORE_TYPE, node.SCORE_TYPE
        self.use_ood_loss, self.detect_ood, self.update_alpha = node.USE_OOD_LOSS, node.DETECT_OOD, node.UPDATE_ALPHA
        self.open_set = bool(self.use_ood_loss or self.detect_ood)
        self.gamma, self.beta_ood, self.loss_ood = float(node.GAMMA), float(node.BETA_OOD), node.LOSS_OOD
        # The threshold between in- and out-of-distribution scores; a parameter (so reset() restores it), trained
        # only with UPDATE_ALPHA, in the optimizer's second group as the reference's add_param_group.
        device = next(model.parameters()).device
        self.alpha = nn.Parameter(torch.tensor([float(node.ALPHA)], device=device), requires_grad=self.update_alpha)
        self.last_cosines: torch.Tensor | None = None   # the reported batch's cosines, for ood_scores

    def cost_info(self) -> dict:
        """Per test batch: OPTIM.STEPS forward + backward passes on the adapted set(s), then one forward to
        predict (plus, with ADAPT_ON memory, one no-grad forward of the batch for the memory)."""
        memory = self.memory.per_class_sample * self.num_classes if self.memory is not None else 0
        return {"views_per_image": 1, "steps_per_batch": self.steps, "adapt_on": self.adapt_on,
                "max_memory_images_per_step": memory,
                "forward_passes_per_batch": self.steps * (2 if self.adapt_on == "batch_and_memory" else 1) + 1
                + (1 if self.adapt_on == "memory" else 0),
                "backward_passes_per_batch": self.steps}

    def reset_extra_state(self) -> None:
        if self.memory is not None:
            self.memory.clear()
        self.step_on_batch = 0
        self.last_loss = None
        self.last_cosines = None

    def setup_optimizer(self) -> torch.optim.Optimizer:
        optimizer = super().setup_optimizer()
        if self.update_alpha:       # the reference: optimizer.add_param_group({"params": alpha}), the same lr
            optimizer.add_param_group({"params": [self.alpha]})
        return optimizer

    # ------------------------------------------------------------------ adaptation
    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            pre = self.model.encode_image(x)
        return F.normalize(pre.float(), dim=-1)

    def set_loss(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """BETA_TTA * L_tta - BETA_REG * L_reg on one set of images."""
        tta = contrastive_loss(features, text, self.logit_scale, self.loss_kind, self.loss_sides)
        reg = mean_prediction_entropy(self.logit_scale * features @ text.t())
        return self.beta_tta * tta - self.beta_reg * reg

    @torch.no_grad()
    def remember(self, x: torch.Tensor, features: torch.Tensor, text: torch.Tensor) -> None:
        cosines = features.detach() @ text.t()
        confidence = cliptta_ood_scores(cosines, self.id_score_type, self.confidence_logit_scale)
        self.memory.add(x, cosines.topk(1, dim=1).indices[:, 0], confidence)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> None:
        text = self.model.text_features()[0].float()
        first_step = self.step_on_batch == 0
        self.step_on_batch += 1
        if self.open_set:
            loss = self.open_set_loss(x, text, first_step)
            self.optimizer_step(loss)
            self.last_loss = loss.detach()
            return
        loss = 0.0
        if self.adapt_on == "batch_and_memory" or self.adapt_on == "batch":
            features = self.image_features(x)
            loss = self.set_loss(features, text)
            if first_step and self.memory is not None:
                self.remember(x, features, text)
        elif first_step:
            with torch.no_grad():
                self.remember(x, self.image_features(x), text)
        if self.memory is not None:
            stored = self.memory.sample().to(x.device)
            loss = loss + self.set_loss(self.image_features(stored), text)
        self.optimizer_step(loss)
        self.last_loss = loss.detach()

    # ------------------------------------------------------------------ open-set parts
    @torch.no_grad()
    def in_distribution(self, scores: torch.Tensor) -> torch.Tensor:
        """The filter (the reference's filter_id): s > alpha with UPDATE_ALPHA, else s > Otsu's threshold of s."""
        if self.update_alpha:
            return scores > self.alpha
        return scores > torch.tensor([threshold_otsu(scores)], dtype=scores.dtype, device=scores.device)

    def open_set_loss(self, x: torch.Tensor, text: torch.Tensor, first_step: bool) -> torch.Tensor:
        """One step of the reference's cliptta_otsu._forward_and_adapt, in its order of operations:
        BETA_TTA * (L_tta(ID images) + L_tta(memory)) - BETA_REG * (L_reg(batch) + L_reg(memory)) + BETA_OOD * L_ood.
        Its init_otsu (a no-grad pass before the batch's first step) scores the same weights as step 0, so step 0's
        scores set alpha. An empty ID set (every image filtered out) or an empty memory adds no term: the
        reference's mean over no image is NaN, which would turn every parameter NaN."""
        features = self.image_features(x)
        cosines = features @ text.t()
        reg = mean_prediction_entropy(self.logit_scale * cosines)
        scores = cliptta_ood_scores(cosines, self.score_type, self.confidence_logit_scale)
        ood = 0.0
        if self.use_ood_loss:
            if first_step:
                with torch.no_grad():
                    self.alpha.fill_(threshold_otsu(scores))
            ood = otsu_loss(scores, self.alpha, self.gamma, self.loss_ood)
        if self.detect_ood:
            keep = self.in_distribution(scores.detach())
            x, features = x[keep], features[keep]
        tta = (contrastive_loss(features, text, self.logit_scale, self.loss_kind, self.loss_sides)
               if len(features) else cosines.sum() * 0.0)
        if self.memory is not None:
            if first_step:
                self.remember(x, features, text)
            if len(self.memory):
                stored = self.image_features(self.memory.sample().to(x.device))
                tta = tta + contrastive_loss(stored, text, self.logit_scale, self.loss_kind, self.loss_sides)
                reg = reg + mean_prediction_entropy(self.logit_scale * (stored @ text.t()))
        return self.beta_tta * tta - self.beta_reg * reg + self.beta_ood * ood

    @torch.no_grad()
    def episode_logits(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """The batch classified by the adapted model: LOGIT_SCALE * cos (the authors' softmax(100 * cos))."""
        self.step_on_batch = 0
        features, text = self.image_features(x), self.model.text_features()[0].float()
        self.last_cosines = features @ text.t()
        return self.logit_scale * features @ text.t()

    def ood_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The reference's final scores: get_scores of type SCORE_TYPE on the reported batch's cosines (times
        CONFIDENCE_LOGIT_SCALE, the code's ood_logit_scale), higher = more in-distribution."""
        if self.last_cosines is None or self.last_cosines.shape != logits.shape:
            raise RuntimeError(f"{self.method_name}: ood_scores is for the batch just reported (none kept for "
                               f"logits of shape {tuple(logits.shape)})")
        return cliptta_ood_scores(self.last_cosines, self.score_type, self.confidence_logit_scale)


@register_method("cliptta_otsu")
class CLIPTTAOtsu(CLIPTTA):
    """The authors' open-set CLIPTTA (scripts/open_set/*/cliptta.sh; their class cliptta_otsu.CLIPTTA): the
    CLIPTTA node with DETECT_OOD on, OOD images filtered by an Otsu threshold (conf/methods/cliptta_otsu.yaml)."""
    config_defaults = {}     # the CLIPTTA node is declared once, by cliptta

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        if not cfg.CLIPTTA.DETECT_OOD:
            raise ConfigError("cliptta_otsu filters out-of-distribution images by a threshold: CLIPTTA.DETECT_OOD "
                              "must be True (cliptta without it is the closed-set method)")
        super().check_setup(cfg, model_spec, class_names)
