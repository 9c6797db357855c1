"""OGA (methods/oga.py) against a plain transcription of its official code (cfuchs2023/OGA ``OGA/OGA_core.py``
class ``GaussAdapt`` and ``runner.py``'s OGA branch): the memory, its entropies and soft labels as the reference's
float16 tensors, ``update_memory``'s loop over the batch's samples, ``__update_mu``, ``__update_sigma``'s
concatenation over classes and its three estimators, ``get_log_probs``, ``get_MAP(simplex_p=True)``, and the
runner's zero-shot logits (float64, temp 100), entropy (+1e-9) and batch loop (update on the batch, then predict
it); the images encoded one at a time, as the reference's precomputed features."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method, load_cfg
from tests.synthetic import reproducible_run_on_cifar10c, run_in_batches, tiny_cfg, varied_stream

CFG_FILE = "conf/cifar10_c/oga.yaml"
# The tiny CLIP's d = 32: 4d = 128 stored samples switch RidgeMoorePenrose to the pseudo-inverse. With 64 slots
# per class the 400 images of varied_stream fill class 7's memory and replace its entries, pass the other
# predicted classes' counts through 1, 2 and 3, and store 147 > 128 samples at the end (the switch mid-stream).
N_IMAGES = 400
SHOT_CAPACITY = 64


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def stream(n=N_IMAGES, seed=0):
    return varied_stream(n, seed)


# ------------------------------------------------------------------ the plain reference
class ReferenceGaussAdapt:
    """GaussAdapt as written (loops where it loops); ``changed`` alters one line (the test that the comparison can
    fail)."""

    def __init__(self, clip_prototypes, shot_capacity=8, sig_type="RidgeMoorePenrose", dtype=torch.float16,
                 changed=None):
        K, d = clip_prototypes.shape
        self.shot_capacity, self.K, self.d, self.sig_type, self.changed = shot_capacity, K, d, sig_type, changed
        self.mus = clip_prototypes.clone().type(torch.float32)
        self.Sig = 1 / d * torch.eye(d, dtype=torch.float32)
        self.inv_Sig = d * torch.eye(d, dtype=torch.float32)
        self.memory_state = torch.zeros((K, shot_capacity), dtype=torch.bool)
        self.memory = torch.zeros((K, shot_capacity, d), dtype=dtype)
        self.memory_soft_labels = torch.zeros((K, shot_capacity), dtype=dtype)
        max_entropy = -torch.log(torch.tensor(1 / self.K))
        self.memory_entropy = max_entropy * torch.ones((K, shot_capacity), dtype=dtype)
        self.regimes = set()            # which covariance branches the stream took
        self.updates = 0                # update_sigma calls; the first in the pinv regime: pinv_from
        self.pinv_from = None

    def update_memory_entropy(self, x, text_prob, entropy, pseudo_label):
        if torch.any(entropy < self.memory_entropy[pseudo_label, :]):
            if self.changed == "replace_lowest_entropy":
                idx_max = torch.argmin(self.memory_entropy[pseudo_label, :])
            else:
                idx_max = torch.argmax(self.memory_entropy[pseudo_label, :])
            self.memory[pseudo_label, idx_max] = x[...]
            self.memory_entropy[pseudo_label, idx_max] = entropy
            self.memory_state[pseudo_label, idx_max] = True
            self.memory_soft_labels[pseudo_label, idx_max] = text_prob[pseudo_label]
            return True
        return False

    def update_memory(self, features, zs_probs, zs_entropy, zs_labels, normalize_mu=False):
        updated = False
        for ji in range(zs_labels.shape[0]):
            if self.update_memory_entropy(features[ji, :], zs_probs[ji, :], zs_entropy[ji], zs_labels[ji]):
                updated = True
        if updated:
            self.update_mu(normalize_mu)
            self.update_sigma()

    def update_mu(self, normalize_mu=False, min_samples=2, over_stored=False):
        if over_stored:
            means = (self.memory_state[..., None] * self.memory).float().sum(1) / \
                self.memory_state.sum(1).clamp_min(1)[:, None]
        else:
            means = torch.mean(self.memory_state[..., None] * self.memory, dim=1).float()
        if self.changed == "mean_mask_above_2":
            min_samples = 3
        mask = torch.sum(self.memory_state, dim=1) >= min_samples
        self.mus[mask, :] = means[mask, :].type(torch.float32)
        if normalize_mu:
            self.mus[mask, :] = self.mus[mask, :] / torch.linalg.norm(self.mus[mask, :], dim=-1, keepdims=True)

    def update_sigma(self):
        d = self.mus.shape[-1]
        if not torch.any(torch.sum(self.memory_state, dim=-1) > 2):
            return
        x = self.memory.view((self.K * self.shot_capacity, d))
        x_labels = torch.tensor([k for k in range(self.K) for _ in range(self.shot_capacity)])
        x_mem_state = self.memory_state.view((self.K * self.shot_capacity))
        center_vecs = torch.cat([x[torch.logical_and(x_mem_state, x_labels == k)] - self.mus[k:k + 1, :]
                                 for k in range(self.K)])
        if self.sig_type == "Ridge":
            M = center_vecs.T.cov()
            trace = torch.sum(M[range(d), range(d)])
            n, d = center_vecs.shape
            self.inv_Sig = d * torch.linalg.pinv((n - 1) * M + trace * torch.eye(d))
            self.Sig = M
        elif self.sig_type == "RidgeMoorePenrose":
            n = torch.sum(self.memory_state)
            center_vec_mean = center_vecs.mean(dim=0)
            c_center_vecs = center_vecs - center_vec_mean[None, :]
            M = c_center_vecs.T @ c_center_vecs / (n - 1)
            if n <= 4 * d and self.changed != "always_pinv":
                self.regimes.add("shrinkage")
                trace = torch.sum(M[range(d), range(d)])
                self.inv_Sig = d * torch.linalg.pinv((n - 1) * M + trace * torch.eye(d))
            else:
                self.regimes.add("pinv")
                self.pinv_from = self.pinv_from or self.batches
                self.inv_Sig = torch.linalg.pinv(M.type(torch.float32))
            self.Sig = M
        else:
            M = center_vecs.T.cov()
            self.Sig = M
            self.inv_Sig = torch.linalg.pinv(M.type(torch.float32))

    def get_log_probs(self, x):
        W = torch.einsum("nd, dc -> cn", self.mus, self.inv_Sig)
        b = -torch.einsum("nd, dc, nc -> n", self.mus, self.inv_Sig, self.mus) / 2
        Q = -torch.einsum("nd, dc, nc -> n", x.float(), self.inv_Sig, x.float()) / 2
        log_probs = x.float() @ W + b
        log_probs += Q[:, None]
        return log_probs

    def get_MAP(self, y_hat, memory_logits, tau):
        p_ = (tau * memory_logits).softmax(-1)
        z = y_hat * p_
        return z / torch.sum(z, dim=1, keepdims=True)


def reference_text(clip):
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    return F.normalize(torch.cat([clip.encode_text(tokenizer([f"a photo of a {name}."]))
                                  for name in CIFAR10_CLASSES]), dim=-1)


@torch.no_grad()
def reference_oga(model, images, batch_size, shot_capacity=SHOT_CAPACITY, tau=0.05, sig_type="RidgeMoorePenrose",
                  normalize_mu=False, dtype=torch.float16, changed=None):
    """runner.py's OGA branch on the features of ``images`` (encoded one at a time, normalised): the posteriors z
    of every image, and the GaussAdapt at the end."""
    text = reference_text(model.clip)
    features = torch.cat([F.normalize(model.clip.encode_image((image[None] - model.mean) / model.std), dim=-1)
                          for image in images])
    temp = 100
    zs_logits = torch.zeros((features.shape[0], 10), dtype=torch.float64)
    zs_logits[...] = temp * features @ text.T
    zs_pred = torch.argmax(zs_logits, dim=-1)
    zs_probs = zs_logits.softmax(-1)
    zs_entropy = -torch.sum(torch.log(zs_probs + 1e-9) * zs_probs, dim=-1)
    oga = ReferenceGaussAdapt(text, shot_capacity=shot_capacity, sig_type=sig_type, dtype=dtype, changed=changed)
    outputs = []
    for start in range(0, features.shape[0], batch_size):
        oga.batches = start
        indices = slice(start, start + batch_size)
        oga.update_memory(features[indices], zs_probs[indices], zs_entropy[indices], zs_pred[indices],
                          normalize_mu=normalize_mu)
        outputs.append(oga.get_MAP(zs_probs[indices], oga.get_log_probs(features[indices]), tau=tau))
    return torch.cat(outputs), oga


def _ours(cfg, tiny_clip, images, batch_size):
    method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    return run_in_batches(method, images, batch_size).softmax(1).double(), method


# Measured on a 2-core x86 CPU (batched against one-at-a-time image encoding, whose 1e-7 differences can move a
# feature across an fp16 rounding boundary of the memory: one fp16 ulp, 1.2e-4): posteriors within 5.1e-6 while
# the covariance is the shrinkage estimate (3.9e-5 with TAU 0.2; ATOL 1e-4); after the switch to pinv(S), whose inverse reaches 4e5
# (the tiny CLIP's features are nearly collinear), within 2.1e-3 (PINV_ATOL 1e-2), the predictions equal; means
# 2.1e-7; the inverse covariance 1.6e-5 (shrinkage) and 1.2e-3 (pinv) of its largest entry.
ATOL = 1e-4
PINV_ATOL = 1e-2
MEMORY_ATOL = 5e-4        # 4 fp16 ulps of a unit feature's entries (measured: one, 1.2e-4)


def assert_same_posteriors(ours, z, pinv_from):
    pinv_from = len(z) if pinv_from is None else pinv_from
    torch.testing.assert_close(ours[:pinv_from], z[:pinv_from], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[pinv_from:], z[pinv_from:], atol=PINV_ATOL, rtol=0)
    assert torch.equal(ours.argmax(1), z.argmax(1))


def assert_same_state(method, reference):
    assert torch.equal(method.memory_state, reference.memory_state)
    torch.testing.assert_close(method.memory, reference.memory, atol=MEMORY_ATOL, rtol=0)
    # entropies up to ln 10: one fp16 ulp is 2e-3 (measured: equal in fp16, 1e-7 in fp32)
    torch.testing.assert_close(method.memory_entropy, reference.memory_entropy, atol=4e-3, rtol=0)
    torch.testing.assert_close(method.memory_soft_labels, reference.memory_soft_labels, atol=MEMORY_ATOL, rtol=0)
    torch.testing.assert_close(method.mus, reference.mus, atol=2e-6, rtol=0)
    scale = float(reference.inv_Sig.abs().max())
    tol = 1e-4 if reference.pinv_from is None else 1e-2
    assert float((method.inv_sigma - reference.inv_Sig).abs().max()) <= tol * scale


# ------------------------------------------------------------------ against the reference
CASES = {
    "defaults": ({}, {}),
    "fp32_memory": ({"OGA__MEMORY_DTYPE": "float32"}, {"dtype": torch.float32}),
    "ridge_normalised_means": ({"OGA__SIG_TYPE": "Ridge", "OGA__NORMALIZE_MU": True, "OGA__TAU": 0.2},
                               {"sig_type": "Ridge", "normalize_mu": True, "tau": 0.2}),
}


@pytest.mark.parametrize("case", CASES)
def test_oga_matches_plain_reference(case, tiny_clip):
    ours_overrides, reference_kwargs = CASES[case]
    images = stream()
    z, reference = reference_oga(tiny_clip, images, 8, **reference_kwargs)
    ours, method = _ours(_cfg(OGA__SHOT_CAPACITY=SHOT_CAPACITY, **ours_overrides), tiny_clip, images, 8)
    if case == "defaults":     # the stream takes every branch
        assert reference.regimes == {"shrinkage", "pinv"}
        counts = reference.memory_state.sum(1)
        assert int(counts.max()) == SHOT_CAPACITY and int(counts.sum()) > 4 * 32
    assert_same_posteriors(ours, z, reference.pinv_from)
    assert_same_state(method, reference)


def test_moore_penrose_matches_plain_reference(tiny_clip):
    """pinv(S) from the first covariance on (n < d at first: S is singular): the first 64 images, whose inverse
    stays moderate; measured within 6e-3 on the stream of the other cases, which is why it is kept short)."""
    images = stream(64)
    z, reference = reference_oga(tiny_clip, images, 8, sig_type="MoorePenrose", shot_capacity=8)
    ours, method = _ours(_cfg(OGA__SHOT_CAPACITY=8, OGA__SIG_TYPE="MoorePenrose"), tiny_clip, images, 8)
    torch.testing.assert_close(ours, z, atol=PINV_ATOL, rtol=0)
    assert torch.equal(ours.argmax(1), z.argmax(1))


# The largest posterior change of each one-line change over the images before the pinv switch (measured: 0.74,
# 0.11, 0.99, i.e. >1000 x ATOL).
@pytest.mark.parametrize("changed", ["replace_lowest_entropy", "mean_mask_above_2", "always_pinv"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(changed, tiny_clip):
    images = stream()
    z, reference = reference_oga(tiny_clip, images, 8)
    changed_z, _ = reference_oga(tiny_clip, images, 8, changed=changed)
    before = reference.pinv_from
    assert float((changed_z[:before] - z[:before]).abs().max()) >= 100 * ATOL


# ------------------------------------------------------------------ batches, keys, state, refusals, harness
def test_batch_of_four_is_four_batches_of_one(tiny_clip):
    images = stream(48)
    for prediction in ("per_image", "after_batch"):
        cfg = _cfg(OGA__SHOT_CAPACITY=4, OGA__PREDICTION=prediction)
        one, one_method = _ours(cfg, tiny_clip, images, 1)
        four, four_method = _ours(cfg, tiny_clip, images, 4)
        for name, buffer in one_method.named_buffers():       # the state never depends on the batch size
            torch.testing.assert_close(dict(four_method.named_buffers())[name], buffer, atol=1e-6, rtol=1e-5)
        if prediction == "per_image":
            torch.testing.assert_close(four, one, atol=1e-6, rtol=1e-5)
        else:                 # the reference: the whole batch updates, then is classified
            z, _ = reference_oga(tiny_clip, images, 4, shot_capacity=4)
            torch.testing.assert_close(four, z, atol=ATOL, rtol=0)
            assert not torch.allclose(four, one)
    later, _ = _ours(_cfg(OGA__SHOT_CAPACITY=4), tiny_clip, images[24:], 4)
    assert not torch.allclose(four[24:], later)          # the memory of images 0-23 matters


def test_reset_restores_the_fresh_state_exactly(tiny_clip):
    method = methods.build_method(_cfg(OGA__SHOT_CAPACITY=4), tiny_clip, 10)
    fresh = {k: v.clone() for k, v in method.state_dict().items()}
    assert fresh["memory"].dtype == torch.float16 and fresh["memory_entropy"].dtype == torch.float16
    images = stream(40)
    first = run_in_batches(method, images, 8)
    assert int(method.memory_state.sum()) > 0
    method.reset()
    state = method.state_dict()
    assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in state)
    assert torch.equal(run_in_batches(method, images, 8), first)


def test_the_choice_keys_change_the_result(tiny_clip):
    images = stream(200)
    base_overrides = {"OGA__SHOT_CAPACITY": 32}
    base, base_method = _ours(_cfg(**base_overrides), tiny_clip, images, 8)
    for overrides in ({"OGA__SHOT_CAPACITY": 8}, {"OGA__TAU": 0.2},
                      {"OGA__SIG_TYPE": "MoorePenrose"}, {"OGA__NORMALIZE_MU": True}, {"OGA__MEAN_MIN_SAMPLES": 3},
                      {"OGA__MEAN": "stored"}, {"OGA__LOGIT_SCALE": "model"}, {"OGA__PREDICTION": "per_image"},
                      {"OGA__MEMORY_DTYPE": "float32"}, {"OGA__ENTROPY_EPSILON": 1e-2}):
        out, method = _ours(_cfg(**{**base_overrides, **overrides}), tiny_clip, images, 8)
        assert not torch.allclose(out, base, atol=1e-7, rtol=0), overrides
    # Ridge is RidgeMoorePenrose up to 4d = 128 stored samples: after them, another inverse
    long = stream()
    default, _ = _ours(_cfg(OGA__SHOT_CAPACITY=SHOT_CAPACITY), tiny_clip, long, 8)
    ridge, _ = _ours(_cfg(OGA__SHOT_CAPACITY=SHOT_CAPACITY, OGA__SIG_TYPE="Ridge"), tiny_clip, long, 8)
    assert float((ridge - default).abs().max()) > 0.1


def test_bad_oga_config_is_refused_before_the_model_loads():
    for key, value in (("SHOT_CAPACITY", 0), ("TAU", -0.1), ("SIG_TYPE", "Ledoit"), ("MEAN_MIN_SAMPLES", 0),
                       ("MEAN", "median"), ("ENTROPY_EPSILON", -1e-9), ("MEMORY_DTYPE", "bfloat16"),
                       ("LOGIT_SCALE", "learned"), ("PREDICTION", "before_batch")):
        with pytest.raises(ConfigError, match=f"OGA.{key}"):
            check_method(_cfg(**{f"OGA__{key}": value}))


def test_shipped_values_are_the_references():
    # cfuchs2023/OGA main.py: --batch_size 32 --shot_capacity 8, OGA's --tau 0.05 --sig_type RidgeMoorePenrose
    # --normalize_mu False; --prompts_types standard: the template of its datasets/<set>.py
    templates = {"imagenet_c": "a photo of a {}.", "caltech101": "a photo of a {}.", "dtd": "{} texture",
                 "eurosat": "a centered satellite photo of {}.", "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
                 "food101": "a photo of {}, a type of food.", "flowers102": "a photo of a {}, a type of flower.",
                 "oxford_pets": "a photo of a {}, a type of pet.", "stanford_cars": "a photo of a {}.",
                 "sun397": "a photo of a {}.", "ucf101": "a photo of a person doing {}.",
                 "shapes_c": "a photo of a {}.", "cifar10_c": "a photo of a {}."}
    for dataset, template in templates.items():
        cfg = load_cfg(f"conf/{dataset}/oga.yaml")
        o = cfg.OGA
        assert (cfg.TEST.BATCH_SIZE, o.SHOT_CAPACITY, o.TAU, o.SIG_TYPE, o.NORMALIZE_MU) == \
            (32, 8, 0.05, "RidgeMoorePenrose", False), dataset
        assert (o.MEAN_MIN_SAMPLES, o.MEAN, o.ENTROPY_EPSILON, o.MEMORY_DTYPE, o.LOGIT_SCALE, o.PREDICTION) == \
            (2, "capacity", 1e-9, "float16", "fixed_100", "after_batch"), dataset
        assert (cfg.CLIP.PROMPT_MODE, list(cfg.CLIP.PROMPT_TEMPLATE)) == ("custom", [template]), dataset
    assert load_cfg("conf/imagenet_c/oga.yaml").CORRUPTION.TYPE == ["none"]


def test_oga_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise", "fog"], 6, TEST__BATCH_SIZE=4,
                                           OGA__SHOT_CAPACITY=2)
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": 1, "backward_passes_per_image": 0}
