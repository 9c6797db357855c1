"""OGA: online Gaussian adaptation (Fuchs, Zanella, De Vleeschouwer, "Online Gaussian Adaptation of Vision-Language
Models", arXiv 2501.04352, 2025; official code cfuchs2023/OGA ``OGA/OGA_core.py`` class ``GaussAdapt``,
``runner.py``'s OGA branch, ``main.py``'s arguments). Nothing is trained.

Per batch, as ``runner.py`` (the reference works on precomputed, L2-normalised image features with no views; here
the model computes them from the images):

1. Zero-shot: logits ``100 * f @ t.T`` (OGA.LOGIT_SCALE), taken to float64, their softmax ``p``, pseudo-label
   ``argmax p``, entropy ``-sum p log(p + OGA.ENTROPY_EPSILON)`` (the runner's 1e-9, not ``get_entropy``'s unused
   1e-6).
2. Memory (``update_memory``, image by image in stream order): per class OGA.SHOT_CAPACITY slots of features with
   their entropies, stored in OGA.MEMORY_DTYPE (the reference's float16); every slot's entropy starts at ln(K). An
   image goes to its pseudo-label's slot of highest entropy (the first of equal ones) when its entropy, rounded to
   the memory's dtype, is below some slot's.
3. When some image of the batch entered the memory: the means (``__update_mu``, the mean over all slots with empty
   ones zero, i.e. divided by the capacity, OGA.MEAN) replace the text prototypes of the classes holding at least
   OGA.MEAN_MIN_SAMPLES (2) samples; the covariance of all stored samples centred on their class means (once some
   class holds 3) and its inverse (``__update_sigma``, OGA.SIG_TYPE: shrinkage ``d pinv((n-1) S + tr(S) I)`` while
   n <= 4d samples, ``pinv(S)`` after).
4. Prediction with the updated model (``get_log_probs``, ``get_MAP`` with ``simplex_p=True``): Gaussian
   log-likelihoods with a shared covariance, ``softmax(OGA.TAU * log-likelihood)`` times ``p``, renormalised. The
   reported logits are the log of that posterior (``methods.losses.log_probabilities``).

OGA.PREDICTION ``after_batch`` is the reference: the whole batch updates the memory, then every image of the batch
is classified (the result depends on TEST.BATCH_SIZE, 32 in the reference's runs); ``per_image`` classifies each
image right after its own update (the reference with ``--batch_size 1``; any batch size then gives the same). The
memory after a batch never depends on the batch size. The per-image memory decisions are made on the host (the
entropies are exact in Python floats), the writes of a batch are one indexed store; the means, the covariance and
the log-likelihoods are tensor expressions over all classes and the whole batch. The state is buffers, so
``reset()`` restores it exactly.
"""
from __future__ import annotations

import torch

from conf.options import Option
from methods.base import TRAINING_FREE, TTAMethod
from methods.caches import REFERENCE_LOGIT_SCALE
from methods.losses import log_probabilities
from methods.registry import register_method

SIG_TYPES = ("RidgeMoorePenrose", "Ridge", "MoorePenrose")
MEMORY_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# The covariance is estimated once some class holds more than this many samples (``__update_sigma``: "> 2").
COVARIANCE_MIN_CLASS_SAMPLES = 2


@register_method("oga")
class OGA(TTAMethod):
    protocol = TRAINING_FREE
    config_defaults = {"OGA": {
        # Samples kept per class (main.py --shot_capacity 8).
        "SHOT_CAPACITY": Option(8, within="[1, inf)"),
        # Temperature of the Gaussian log-likelihoods in the MAP (main.py's OGA --tau 0.05; get_MAP's signature
        # default 0.01 and update_memory's 0.03 are never used by the runner).
        "TAU": Option(0.05, within="[0, inf)"),
        # The covariance estimator (main.py --sig_type RidgeMoorePenrose: shrinkage while n <= 4d, pinv after;
        # Ridge: shrinkage always; MoorePenrose: pinv always).
        "SIG_TYPE": Option("RidgeMoorePenrose", choices=SIG_TYPES),
        # Renormalise the class means to unit norm (main.py --normalize_mu, default False).
        "NORMALIZE_MU": False,
        # A class's mean replaces its text prototype once it holds at least this many samples (__update_mu:
        # ">= 2", its comment "# was >2").
        "MEAN_MIN_SAMPLES": Option(2, within="[1, inf)"),
        # "capacity": the code's torch.mean over all SHOT_CAPACITY slots, empty ones zero (the sum divided by the
        # capacity); "stored": the sum divided by the number of stored samples (the paper's empirical mean).
        "MEAN": Option("capacity", choices=("capacity", "stored")),
        # The epsilon of the zero-shot entropy -sum p log(p + eps) (runner.py: 1e-9).
        "ENTROPY_EPSILON": Option(1e-9, within="[0, inf)"),
        # The memory's features and entropies: "float16" as the reference, or "float32".
        "MEMORY_DTYPE": Option("float16", choices=("float16", "float32")),
        # Scale of the zero-shot logits: "fixed_100" as the code (temp = 100), or "model" (the model's logit_scale).
        "LOGIT_SCALE": Option("fixed_100", choices=("fixed_100", "model")),
        # "after_batch": the batch updates the memory, then all its images are classified (runner.py); "per_image":
        # each image is classified right after its own update (the reference with --batch_size 1).
        "PREDICTION": Option("after_batch", choices=("after_batch", "per_image")),
    }}

    def __init__(self, cfg, model, num_classes):
        super().__init__(cfg, model, num_classes)
        o = cfg.OGA
        self.shot_capacity = int(o.SHOT_CAPACITY)
        self.tau = float(o.TAU)
        self.sig_type = o.SIG_TYPE
        self.normalize_mu = bool(o.NORMALIZE_MU)
        self.mean_min_samples = int(o.MEAN_MIN_SAMPLES)
        self.mean_over_stored = o.MEAN == "stored"
        self.entropy_epsilon = float(o.ENTROPY_EPSILON)
        self.memory_dtype = MEMORY_DTYPES[o.MEMORY_DTYPE]
        self.fixed_scale = o.LOGIT_SCALE == "fixed_100"
        self.per_image = o.PREDICTION == "per_image"

    def setup_scaler(self):
        """Nothing is trained: no gradient scaler (MIXED_PRECISION sets fp16 autocast of the encoder only)."""
        return None

    def setup_state(self) -> None:
        """GaussAdapt's state at construction, as buffers (reset() restores it exactly)."""
        text = self.model.text_features()[0].float()
        k, d, s, dev = self.num_classes, text.shape[1], self.shot_capacity, self.device
        self.register_buffer("mus", text.clone())                              # the text prototypes
        # float32 as the reference's; the text features' dtype (float64 under tests/test_fragility.py's fp64 run)
        self.register_buffer("sigma", torch.eye(d, dtype=text.dtype, device=dev) / d)
        self.register_buffer("inv_sigma", d * torch.eye(d, dtype=text.dtype, device=dev))
        self.register_buffer("memory_state", torch.zeros(k, s, dtype=torch.bool, device=dev))
        self.register_buffer("memory", torch.zeros(k, s, d, dtype=self.memory_dtype, device=dev))
        self.register_buffer("memory_soft_labels", torch.zeros(k, s, dtype=self.memory_dtype, device=dev))
        # __init_entropy: -log(1/K) in float32, times ones of the memory's dtype
        max_entropy = -torch.log(torch.tensor(1 / k))
        self.register_buffer("memory_entropy", max_entropy * torch.ones(k, s, dtype=self.memory_dtype, device=dev))

    def cost_info(self) -> dict:
        return {"views_per_image": 1, "backward_passes_per_image": 0}

    # ------------------------------------------------------------------ the model
    def _update_mu(self) -> None:
        """__update_mu: the means of the classes holding at least MEAN_MIN_SAMPLES samples."""
        filled = self.memory_state[..., None] * self.memory
        if self.mean_over_stored:
            means = filled.float().sum(1) / self.memory_state.sum(1).clamp_min(1)[:, None]
        else:
            means = torch.mean(filled, dim=1).float()
        mask = self.memory_state.sum(1) >= self.mean_min_samples
        mus = torch.where(mask[:, None], means, self.mus)
        if self.normalize_mu:
            mus = torch.where(mask[:, None], mus / torch.linalg.norm(mus, dim=-1, keepdim=True), mus)
        self.mus.copy_(mus)

    def _update_sigma(self) -> None:
        """__update_sigma: the stored samples (class by class, slot order) centred on their class means."""
        if not bool((self.memory_state.sum(-1) > COVARIANCE_MIN_CLASS_SAMPLES).any()):
            return
        k, s, d = self.memory.shape
        state = self.memory_state.reshape(-1)
        labels = torch.arange(k, device=self.memory.device).repeat_interleave(s)[state]
        centred = self.memory.reshape(k * s, d)[state] - self.mus[labels]           # (n, d) in float32
        n = centred.shape[0]
        eye = torch.eye(d, device=centred.device)
        if self.sig_type == "RidgeMoorePenrose":
            c = centred - centred.mean(dim=0)[None, :]
            m = c.T @ c / (n - 1)
            if n <= 4 * d:
                inv = d * torch.linalg.pinv((n - 1) * m + torch.diagonal(m).sum() * eye)
            else:
                inv = torch.linalg.pinv(m)
        else:
            m = centred.T.cov()
            if self.sig_type == "Ridge":
                inv = d * torch.linalg.pinv((n - 1) * m + torch.diagonal(m).sum() * eye)
            else:
                inv = torch.linalg.pinv(m)
        self.sigma.copy_(m)
        self.inv_sigma.copy_(inv)

    def _refresh(self) -> None:
        self._update_mu()
        self._update_sigma()

    def _posterior(self, x: torch.Tensor, zs_probs: torch.Tensor) -> torch.Tensor:
        """get_log_probs and get_MAP(simplex_p=True): float64 posteriors (B, K)."""
        W = torch.einsum("nd, dc -> cn", self.mus, self.inv_sigma)
        b = -torch.einsum("nd, dc, nc -> n", self.mus, self.inv_sigma, self.mus) / 2
        q = -torch.einsum("nd, dc, nc -> n", x, self.inv_sigma, x) / 2
        log_probs = x @ W + b
        log_probs += q[:, None]
        z = zs_probs * (self.tau * log_probs).softmax(-1)
        return z / torch.sum(z, dim=1, keepdim=True)

    # ------------------------------------------------------------------ the stream
    def _decide(self, labels, entropies):
        """The memory writes of a batch, image by image (__update_memory_entropy) on host copies of the entropies:
        a list per image of (class, slot) or None. Python floats hold the memory's fp16/fp32 values exactly."""
        rows = self.memory_entropy.tolist()
        writes = []
        for label, entropy in zip(labels, entropies):
            row = rows[label]
            if any(entropy < e for e in row):
                slot = row.index(max(row))                   # torch.argmax: the first maximum
                row[slot] = entropy
                writes.append((label, slot))
            else:
                writes.append(None)
        return writes

    def _write(self, writes, indices, features, entropies, soft) -> None:
        """The writes of ``indices`` (images of the batch, in order; a later write to a slot wins)."""
        final = {}
        for i in indices:
            if writes[i] is not None:
                final[writes[i]] = i
        if not final:
            return
        cls = torch.tensor([c for c, _ in final], device=self.device)
        slot = torch.tensor([s for _, s in final], device=self.device)
        src = torch.tensor(list(final.values()), device=self.device)
        self.memory[cls, slot] = features[src].to(self.memory_dtype)
        self.memory_entropy[cls, slot] = entropies[src]
        self.memory_state[cls, slot] = True
        self.memory_soft_labels[cls, slot] = soft[src]

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model(x, return_features=True)
        features, text = out.image_features.float(), out.text_features.float()
        scale = REFERENCE_LOGIT_SCALE if self.fixed_scale else self.model.logit_scale.float()
        zs_logits = (scale * features @ text.T).double()
        zs_probs = zs_logits.softmax(-1)
        entropy = -torch.sum(torch.log(zs_probs + self.entropy_epsilon) * zs_probs, dim=-1)
        labels = zs_logits.argmax(-1)
        # the comparison entropy < memory_entropy[label] promotes the 0-d float64 entropy to the memory's dtype
        entropy_stored = entropy.to(self.memory_dtype)
        soft = zs_probs.gather(1, labels[:, None])[:, 0].to(self.memory_dtype)
        writes = self._decide(labels.tolist(), entropy_stored.tolist())
        if not self.per_image:
            self._write(writes, range(len(writes)), features, entropy_stored, soft)
            if any(w is not None for w in writes):
                self._refresh()
            z = self._posterior(features, zs_probs)
        else:
            rows = []
            for i, w in enumerate(writes):
                if w is not None:
                    self._write(writes, [i], features, entropy_stored, soft)
                    self._refresh()
                rows.append(self._posterior(features[i:i + 1], zs_probs[i:i + 1]))
            z = torch.cat(rows)
        return log_probabilities(z.float())
