"""AdaContrast, contrastive test-time adaptation (Chen et al., CVPR 2022), as the anchor suite's
classification/methods/adacontrast.py (mariodoebler/test-time-adaptation) on CLIP.

The anchor's split of the model (its BaseModel, which has no CLIP branch) is defined here: the encoder is the image
tower, its feature the image embedding before normalisation; the classifier head is CLIP's zero-shot head,
logit_scale * normalize(feature) @ text_features^T, with the text features frozen. The key encoder is an EMA copy of
the image tower (methods/teachers.py, M_TEACHER.MOMENTUM, every parameter: update_all=True), with its own
BatchNorm statistics. Per batch, with views weak w, strong q and strong k (made as the anchor's "twss" transforms):
1. the student on w (train mode): features f_w, logits; pseudo-labels p = argmax softmax for the first 1024 images,
   afterwards the mean probabilities of the NUM_NEIGHBORS nearest entries of the feature bank (DIST_TYPE);
2. the student on q; the key encoder takes its EMA step from the student, then encodes k (normalised);
3. instance logits [q.k, q.queue] / CONTRAST.TEMPERATURE; the queue (QUEUE_SIZE keys and labels) takes k and p;
   with CONTRAST_TYPE class_aware the queue entries whose (new) label equals p are masked out (-inf);
4. loss = ALPHA CE(logits of q (weak_strong) or w (weak_weak), p) + BETA CE(instance logits, 0)
   + ETA (-entropy of the batch's mean softmax); one optimizer step;
5. the key encoder on w gives the features and softmax probabilities the bank (a ring of QUEUE_SIZE or more) takes;
6. the reported logits: the adapted student on the test image in eval mode (BatchNorm on its running statistics,
   which the two training-mode forwards updated): ADAPT_THEN_PREDICT.

Random numbers (the queue's initial contents, every view's parameters) come from CPU generators seeded with RNG_SEED
and restarted by reset(), never the global RNG. See docs/adacontrast.md."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from conf.errors import ConfigError
from conf.options import Option
from methods.base import ADAPT_THEN_PREDICT, backbone_refusal
from methods.frames import free_weights_and_biases, trainable_weights_and_biases
from methods.registry import register_method
from methods.teachers import MeanTeacher

# The strong views: "auto" as the anchor's get_transform ("moco-v2-light" on CIFAR(-C), ImageNet-C and CCC,
# "moco-v2" with a random resized crop elsewhere), or either one named.
STRONG_AUGMENTATIONS = ("auto", "moco-v2-light", "moco-v2")
LIGHT_AUGMENTATION_DATASETS = ("cifar10", "cifar100", "cifar10_c", "cifar100_c", "imagenet_c", "ccc")
NN_BATCH = 64                     # soft_k_nearest_neighbors' chunk of query features


class MocoViews:
    """The anchor's weak ("plain") and strong (moco-v2 / moco-v2-light) transforms of augmentations/
    transforms_adacontrast.py on [0, 1] tensors at the model's input size, image by image (the data loader's order:
    weak, then the two strong views); parameters drawn from ``generator`` in torchvision's order. Resize and
    RandomCrop to the input's own size draw nothing and change nothing."""

    def __init__(self, generator: torch.Generator, resized_crop: bool):
        self.generator = generator
        self.resized_crop = resized_crop

    def _rand(self) -> float:
        return torch.rand(1, generator=self.generator).item()

    def _uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high, generator=self.generator).item()

    def weak(self, img: torch.Tensor) -> torch.Tensor:
        return TF.hflip(img) if self._rand() < 0.5 else img

    def random_resized_crop(self, img: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop(size, scale=(0.2, 1.0)) back to the input's size (torchvision's get_params)."""
        height, width = img.shape[-2:]
        area, log_ratio = height * width, (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target_area = area * self._uniform(0.2, 1.0)
            aspect = math.exp(self._uniform(*log_ratio))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,), generator=self.generator).item())
                j = int(torch.randint(0, width - w + 1, size=(1,), generator=self.generator).item())
                return TF.resized_crop(img, i, j, h, w, [height, width], antialias=True)
        return img      # torchvision's fallback centre crop of the whole image (ratio within bounds)

    def color_jitter(self, img: torch.Tensor) -> torch.Tensor:
        """ColorJitter(0.4, 0.4, 0.4, 0.1): order and factors drawn first, then applied."""
        order = torch.randperm(4, generator=self.generator).tolist()
        factors = [self._uniform(0.6, 1.4), self._uniform(0.6, 1.4), self._uniform(0.6, 1.4), self._uniform(-0.1, 0.1)]
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for fn_id in order:
            img = adjust[fn_id](img, factors[fn_id])
        return img

    def strong(self, img: torch.Tensor) -> torch.Tensor:
        if self.resized_crop:
            img = self.random_resized_crop(img)
        if not 0.8 < self._rand():                 # RandomApply(p=0.8): skipped when p < rand
            img = self.color_jitter(img)
        if self._rand() < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if not 0.5 < self._rand():
            sigma = self._uniform(0.1, 2.0)        # the reference draws it with python's random, blurs with PIL
            img = TF.gaussian_blur(img, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])
        return TF.hflip(img) if self._rand() < 0.5 else img

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weak, strong_q, strong_k = [], [], []
        for img in images:
            weak.append(self.weak(img))
            strong_q.append(self.strong(img))
            strong_k.append(self.strong(img))
        return torch.stack(weak), torch.stack(strong_q), torch.stack(strong_k)


def nearest_neighbor_probs(features, bank_features, bank_probs, dist_type: str, num_neighbors: int):
    """soft_k_nearest_neighbors: mean bank probabilities of the nearest entries, in chunks of 64 queries."""
    pred_probs = []
    for feats in features.split(NN_BATCH):
        if dist_type == "euclidean":
            distances = torch.cdist(feats, bank_features)
        else:
            distances = 1 - torch.matmul(F.normalize(feats, dim=1), F.normalize(bank_features, dim=1).T)
        idxs = distances.sort()[1][:, :num_neighbors]
        pred_probs.append(bank_probs[idxs, :].mean(1))
    pred_probs = torch.cat(pred_probs)
    return pred_probs.max(dim=1)[1], pred_probs


def diversity(logits: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """div(): minus the entropy of the batch's mean softmax."""
    probs_mean = F.softmax(logits, dim=1).mean(dim=0)
    return -torch.sum(-probs_mean * torch.log(probs_mean + epsilon))


@register_method("adacontrast")
class AdaContrast(MeanTeacher):
    protocol = ADAPT_THEN_PREDICT      # the student after the batch's update, on the test image (eval mode)
    config_defaults = {
        "ADACONTRAST": {
            "QUEUE_SIZE": Option(16384, within="[1, inf)"),      # MoCo queue length and feature-bank size
            # class_aware: queue keys whose pseudo-label equals the query's are not negatives; "standard": every
            # queued key is (the anchor masks for class_aware only, any other value contrasts with all)
            "CONTRAST_TYPE": Option("class_aware", choices=("class_aware", "standard")),
            # Unused by the anchor (always plain cross-entropy): a non-default value is a config warning
            "CE_TYPE": Option("standard", choices=("standard", "symmetric", "smoothed", "soft")),
            "ALPHA": Option(1.0, within="[0, inf)"),      # weight of the classification loss
            "BETA": Option(1.0, within="[0, inf)"),       # weight of the instance (contrastive) loss
            "ETA": Option(1.0, within="[0, inf)"),        # weight of the diversity loss (0: not computed)
            "DIST_TYPE": Option("cosine", choices=("cosine", "euclidean")),     # nearest-neighbour distance
            # Which logits the pseudo-labels supervise: the strong view q (weak_strong) or the weak view w;
            # the anchor raises for its other names (weak_all, self_all)
            "CE_SUP_TYPE": Option("weak_strong", choices=("weak_weak", "weak_strong")),
            # Overwritten by the anchor (argmax for the first 1024 images, nearest neighbours after): a
            # non-default value is a config warning
            "REFINE_METHOD": "nearest_neighbors",
            "NUM_NEIGHBORS": Option(10, within="[1, inf)"),
            # Ours: the strong views (STRONG_AUGMENTATIONS); "auto" is the anchor's choice by data set
            "STRONG_AUGMENTATION": Option("auto", choices=STRONG_AUGMENTATIONS),
        },
        "CONTRAST": {
            "TEMPERATURE": Option(0.1, within="(0, inf)"),     # of the instance logits (T_moco)
            "PROJECTION_DIM": 128,       # unused by the anchor's AdaContrast (no projector): warned when set
            "MODE": "all",               # unused by the anchor's AdaContrast: warned when set
        },
    }
    refine_warmup_samples = 1024       # the anchor's hard-coded argmax phase before nearest-neighbour refinement

    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        super().check_setup(cfg, model_spec, class_names)
        if model_spec.image_tower == "timm":
            raise backbone_refusal(cls.method_name, cfg, model_spec, "its MoCo queue is sized by the image tower's "
                                   "output_dim, which open_clip's timm towers do not expose")
        if not cfg.CLIP.FREEZE_TEXT_ENCODER:
            raise ConfigError("adacontrast adapts the image tower, its head the frozen text features; "
                              "CLIP.FREEZE_TEXT_ENCODER must be True, got False")

    @classmethod
    def config_warnings(cls, cfg) -> list[str]:
        unused = {"ADACONTRAST.CE_TYPE": (cfg.ADACONTRAST.CE_TYPE, "standard"),
                  "ADACONTRAST.REFINE_METHOD": (cfg.ADACONTRAST.REFINE_METHOD, "nearest_neighbors"),
                  "CONTRAST.PROJECTION_DIM": (cfg.CONTRAST.PROJECTION_DIM, 128),
                  "CONTRAST.MODE": (cfg.CONTRAST.MODE, "all")}
        return [f"{key} {value} has no effect: the anchor's AdaContrast does not read it (docs/adacontrast.md)"
                for key, (value, default) in unused.items() if value != default]

    def __init__(self, cfg, model: nn.Module, num_classes: int):
        super().__init__(cfg, model, num_classes)
        a = cfg.ADACONTRAST
        self.queue_size, self.num_neighbors = int(a.QUEUE_SIZE), int(a.NUM_NEIGHBORS)
        self.alpha, self.beta, self.eta = float(a.ALPHA), float(a.BETA), float(a.ETA)
        self.class_aware = a.CONTRAST_TYPE == "class_aware"
        self.dist_type, self.ce_sup_type = a.DIST_TYPE, a.CE_SUP_TYPE
        self.temperature = float(cfg.CONTRAST.TEMPERATURE)
        strong = a.STRONG_AUGMENTATION
        if strong == "auto":
            strong = "moco-v2-light" if cfg.CORRUPTION.DATASET in LIGHT_AUGMENTATION_DATASETS else "moco-v2"
        self.resized_crop = strong == "moco-v2"

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        """The anchor's configure_model on the image tower: train mode (BatchNorm on batch statistics, running
        statistics updated, used for the reported eval-mode logits); its weights and biases adapt."""
        self.model.eval()
        self.model.requires_grad_(False)
        free_weights_and_biases(self.model.clip.visual)

    def collect_params(self) -> tuple[list[nn.Parameter], list[str]]:
        """The anchor's collect_params: every trainable ``weight`` and ``bias`` (named_modules order)."""
        return trainable_weights_and_biases(self.model, self.method_name, self.cfg.MODEL.ARCH)

    def setup_state(self) -> None:
        self.register_teacher(self.model.clip.visual.named_parameters(prefix="clip.visual"))
        # The key encoder's own BatchNorm statistics (it runs in train mode; its running statistics never serve)
        self.teacher_buffer_names = [n for n, _ in self.model.clip.visual.named_buffers(prefix="clip.visual")]
        for index, (_, b) in enumerate(self.model.clip.visual.named_buffers(prefix="clip.visual")):
            self.register_buffer(f"teacher_buffer_{index}", b.detach().clone())
        # The MoCo queue: AdaMoCo's randn features (normalised per key) and randint labels, from RNG_SEED
        queue_random = torch.Generator().manual_seed(int(self.cfg.RNG_SEED))
        dim = int(self.model.clip.visual.output_dim)
        dtype = next(self.model.clip.visual.parameters()).dtype
        mem_feat = F.normalize(torch.randn(dim, self.queue_size, generator=queue_random), dim=0)
        mem_labels = torch.randint(0, self.num_classes, (self.queue_size,), generator=queue_random)
        self.register_buffer("mem_feat", mem_feat.to(device=self.device, dtype=dtype))
        self.register_buffer("mem_labels", mem_labels.to(self.device))
        self.reset_extra_state()

    def reset_extra_state(self) -> None:
        self.queue_ptr = 0
        self.first_x_samples = 0
        self.bank_features, self.bank_probs, self.bank_ptr = None, None, 0
        self.make_views = MocoViews(torch.Generator().manual_seed(int(self.cfg.RNG_SEED)), self.resized_crop)

    def reset_episode(self) -> None:
        """MODEL.EPISODIC: the anchor's reset, which leaves the data loader's random stream alone."""
        views = self.make_views
        self.reset()
        self.make_views = views

    # ------------------------------------------------------------------ the two encoders
    def student(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images, return_features=True)
        return out.image_pre_features, out.logits

    @torch.no_grad()
    def key_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = dict(zip(self.teacher_names, self.teacher_tensors()))
        weights.update({n: getattr(self, f"teacher_buffer_{i}") for i, n in enumerate(self.teacher_buffer_names)})
        out = torch.func.functional_call(self.model, weights, (images,), {"return_features": True})
        return out.image_pre_features, out.logits

    # ------------------------------------------------------------------ per batch
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x, self.make_views(x)))

    @torch.no_grad()
    def pseudo_labels(self, feats_w: torch.Tensor, logits_w: torch.Tensor) -> torch.Tensor:
        """refine_predictions with the anchor's schedule: argmax until 1024 images were seen, neighbours after."""
        if self.first_x_samples >= self.refine_warmup_samples:
            return nearest_neighbor_probs(feats_w, self.bank_features, self.bank_probs, self.dist_type,
                                          self.num_neighbors)[0]
        self.first_x_samples += len(feats_w)
        return F.softmax(logits_w, dim=1).argmax(dim=1)

    @torch.no_grad()
    def update_memory(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        idxs_replace = torch.arange(self.queue_ptr, self.queue_ptr + len(keys), device=keys.device) % self.queue_size
        self.mem_feat[:, idxs_replace] = keys.T.to(self.mem_feat.dtype)
        self.mem_labels[idxs_replace] = labels
        self.queue_ptr = (self.queue_ptr + len(keys)) % self.queue_size

    def loss(self, views) -> torch.Tensor:
        images_w, images_q, images_k = views
        feats_w, logits_w = self.student(images_w)
        labels = self.pseudo_labels(feats_w, logits_w)
        feats_q, logits_q = self.student(images_q)
        q = F.normalize(feats_q, dim=1)
        self.update_teacher()
        k = F.normalize(self.key_encoder(images_k)[0], dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.mem_feat.clone().detach().to(q.dtype)])
        logits_ins = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        self.update_memory(k, labels)
        if self.class_aware:
            mask = torch.ones_like(logits_ins, dtype=torch.bool)
            mask[:, 1:] = labels.reshape(-1, 1) != self.mem_labels
            logits_ins = torch.where(mask, logits_ins, torch.tensor([float("-inf")], device=logits_ins.device))
        loss_ins = F.cross_entropy(logits_ins, torch.zeros(len(logits_ins), dtype=torch.long, device=q.device))
        supervised = logits_q if self.ce_sup_type == "weak_strong" else logits_w
        loss = self.alpha * F.cross_entropy(supervised, labels) + self.beta * loss_ins
        if self.eta > 0:
            loss = loss + self.eta * diversity(supervised)
        return loss

    @torch.no_grad()
    def update_bank(self, features: torch.Tensor, logits: torch.Tensor) -> None:
        """update_labels: the bank grows by whole batches until it holds QUEUE_SIZE or more, then is a ring."""
        probs = F.softmax(logits, dim=1)
        end = self.bank_ptr + len(features)
        if self.bank_features is None or self.bank_features.shape[0] < self.queue_size:
            grown = self.bank_features is not None
            self.bank_features = torch.cat([self.bank_features, features]) if grown else features.clone()
            self.bank_probs = torch.cat([self.bank_probs, probs]) if grown else probs.clone()
        else:
            idxs_replace = torch.arange(self.bank_ptr, end, device=features.device) % len(self.bank_features)
            self.bank_features[idxs_replace, :] = features
            self.bank_probs[idxs_replace, :] = probs
        self.bank_ptr = end % len(self.bank_features)

    @torch.enable_grad()
    def forward_and_adapt(self, batch) -> None:
        _, views = batch
        self.model.clip.visual.train()
        with self.autocast():
            loss = self.loss(views)
        self.optimizer_step(loss)
        self.update_bank(*self.key_encoder(views[0]))     # outside autocast, as the anchor

    @torch.no_grad()
    def episode_logits(self, batch, outputs) -> torch.Tensor:
        self.model.clip.visual.eval()
        return self.model(batch[0]).float()

    def cost_info(self) -> dict:
        """Per image: the student on the weak and a strong view and the test image, the key encoder on a strong
        and the weak view; one backward pass."""
        return {"views_per_image": 3, "backward_passes_per_image": 1}
