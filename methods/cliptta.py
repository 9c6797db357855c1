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
``cliptta_old`` (memory sample only): CLIPTTA.ADAPT_ON selects (docs/cliptta.md). Their open-set parts (OOD
scores, the Otsu/OCE loss, ID filtering, ``cliptta_otsu``'s thresholds) are not implemented: this is closed-set
only, and no key asks for them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT
from methods.frames import NormAffineTTA
from methods.losses import mean_prediction_entropy, softmax_entropy
from methods.registry import register_method

ADAPT_SETS = ("batch_and_memory", "memory", "batch")
CONTRASTIVE_LOSSES = ("soft", "hard")
LOSS_SIDES = ("image", "symmetric")


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
        # Scale of the cosines for the memory's confidence max softmax (the code's ood_logit_scale, 1.0).
        "CONFIDENCE_LOGIT_SCALE": Option(1.0, within="(0, inf)"),
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
        confidence = (self.confidence_logit_scale * cosines).softmax(1).max(1).values
        self.memory.add(x, cosines.topk(1, dim=1).indices[:, 0], confidence)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> None:
        text = self.model.text_features()[0].float()
        first_step = self.step_on_batch == 0
        self.step_on_batch += 1
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

    @torch.no_grad()
    def episode_logits(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """The batch classified by the adapted model: LOGIT_SCALE * cos (the authors' softmax(100 * cos))."""
        self.step_on_batch = 0
        return self.logit_scale * self.image_features(x) @ self.model.text_features()[0].float().t()
