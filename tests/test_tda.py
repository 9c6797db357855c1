"""TDA against a plain per-image transcription of the reference (kdiAAA/TDA tda_runner.py + utils.py): python
dicts of lists for the caches, ``sorted`` by entropy, keys concatenated class by class, one-hot / mask values,
views encoded one at a time. On the tiny CLIP with images of several kinds, so that several classes are
predicted and both caches fill and overflow (the reference loop counts it)."""
import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method, load_cfg
from methods.augmentations import AugmentedViews
from methods.caches import ClassQueues
from methods.tda import negative_cache_logits, positive_cache_logits
from tests.synthetic import reproducible_run_on_cifar10c, run_in_batches, tiny_cfg, varied_stream

CFG_FILE = "conf/cifar10_c/tda.yaml"
N_IMAGES = 40


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def stream(n=N_IMAGES, seed=0):
    return varied_stream(n, seed)


# ------------------------------------------------------------------ the plain reference
def _update_cache(cache, pred, item, capacity, events):
    """tda_runner.update_cache, with a count of the full-queue events (replaced or rejected)."""
    if pred in cache:
        if len(cache[pred]) < capacity:
            cache[pred].append(item)
        else:
            events.append("replace" if item[1] < cache[pred][-1][1] else "reject")
            if item[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
        cache[pred] = sorted(cache[pred], key=lambda entry: entry[1])
    else:
        cache[pred] = [item]


def _cache_logits(feature, cache, alpha, beta, num_classes, mask=None):
    """tda_runner.compute_cache_logits: keys class by class (sorted class index), values one-hot or the mask."""
    keys, values = [], []
    for label in sorted(cache):
        for item in cache[label]:
            keys.append(item[0])
            values.append(item[2] if mask else F.one_hot(torch.tensor(label), num_classes).float())
    keys, values = torch.stack(keys).t(), torch.stack(values)
    if mask:
        values = ((values > mask[0]) & (values < mask[1])).float()
    affinity = feature @ keys
    return alpha * ((-1) * (beta - beta * affinity)).exp() @ values


@torch.no_grad()
def reference_tda(clip, mean, std, images, cfg):
    """The reference's run_test_tda, one image at a time, with its get_clip_logits."""
    t = cfg.TDA
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    text = F.normalize(torch.cat([clip.encode_text(tokenizer([f"a photo of a {name}."])) for name in CIFAR10_CLASSES]),
                       dim=-1)
    num_classes = len(CIFAR10_CLASSES)
    scale = 100.0 if t.LOGIT_SCALE == "fixed_100" else clip.logit_scale.exp().item()
    max_entropy = math.log2(num_classes) if t.ENTROPY_NORMALISATION == "log2" else math.log(num_classes)
    n_views = cfg.TEST.N_AUGMENTATIONS
    views_of = AugmentedViews(n_views, seed=cfg.RNG_SEED)
    pos_cache, neg_cache, pos_events, neg_events, outputs = {}, {}, [], [], []
    for image in images:
        views = views_of(image[None])[0]
        features = torch.cat([F.normalize(clip.encode_image((v[None] - mean) / std), dim=-1) for v in views])
        logits = scale * features @ text.t()
        if n_views > 1:
            entropies = [-(p * p.log()).sum().item() for p in logits.softmax(-1)]
            chosen = sorted(range(n_views), key=lambda i: entropies[i])[:int(n_views * t.SELECTION_P)]
            output = logits[chosen]
            feature = features[chosen].mean(0)
            clip_logits = output.mean(0)
            prob_map = output.softmax(-1).mean(0)
            loss = -(prob_map * prob_map.log()).sum()
        else:
            feature, clip_logits = features[0], logits[0]
            prob_map = clip_logits.softmax(-1)
            loss = -(prob_map * clip_logits.log_softmax(-1)).sum()
        pred = int(clip_logits.argmax())
        if t.POSITIVE_ENABLED:
            _update_cache(pos_cache, pred, [feature, loss], t.POSITIVE_SHOT_CAPACITY, pos_events)
        if t.NEGATIVE_ENABLED and t.NEGATIVE_ENTROPY_LOWER < float(loss / max_entropy) < t.NEGATIVE_ENTROPY_UPPER:
            _update_cache(neg_cache, pred, [feature, loss, prob_map], t.NEGATIVE_SHOT_CAPACITY, neg_events)
        final = clip_logits.clone()
        if t.POSITIVE_ENABLED and pos_cache:
            final += _cache_logits(feature, pos_cache, t.POSITIVE_ALPHA, t.POSITIVE_BETA, num_classes)
        if t.NEGATIVE_ENABLED and neg_cache:
            final -= _cache_logits(feature, neg_cache, t.NEGATIVE_ALPHA, t.NEGATIVE_BETA, num_classes,
                                   (t.NEGATIVE_MASK_LOWER, t.NEGATIVE_MASK_UPPER))
        outputs.append(final)
    return torch.stack(outputs), pos_cache, neg_cache, pos_events, neg_events


# ------------------------------------------------------------------ against the reference
CASES = {
    "defaults_one_view": {},
    "eight_views_keep_two": {"TEST__N_AUGMENTATIONS": 8, "TDA__SELECTION_P": 0.25},
    "entropy_normalised_by_ln": {"TDA__ENTROPY_NORMALISATION": "ln"},
    "model_logit_scale": {"TDA__LOGIT_SCALE": "model", "TDA__NEGATIVE_ENTROPY_LOWER": 0.6,
                          "TDA__NEGATIVE_ENTROPY_UPPER": 0.69},
    "positive_only": {"TDA__NEGATIVE_ENABLED": False},
    "negative_only_small_caches": {"TDA__POSITIVE_ENABLED": False, "TDA__NEGATIVE_SHOT_CAPACITY": 1},
    "other_hyper_parameters": {"TDA__POSITIVE_SHOT_CAPACITY": 2, "TDA__POSITIVE_ALPHA": 1.0,
                               "TDA__POSITIVE_BETA": 8.0, "TDA__NEGATIVE_ALPHA": 0.5, "TDA__NEGATIVE_BETA": 2.0,
                               "TDA__NEGATIVE_MASK_LOWER": 0.1, "TDA__NEGATIVE_MASK_UPPER": 0.6},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tda_matches_plain_reference(case, tiny_clip):
    cfg = _cfg(RNG_SEED=3, **CASES[case])
    images = stream(24 if cfg.TEST.N_AUGMENTATIONS > 1 else N_IMAGES)
    method = methods.build_method(cfg, tiny_clip, 10)
    out = run_in_batches(method, images, 4)
    ref, pos_cache, neg_cache, pos_events, neg_events = reference_tda(tiny_clip.clip, tiny_clip.mean,
                                                                      tiny_clip.std, images, cfg)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    # the stream exercised what it should: several classes, full queues replaced and rejected
    for enabled, cache, events, counts, entropies in (
            (cfg.TDA.POSITIVE_ENABLED, pos_cache, pos_events, method.positive_cache.counts,
             method.positive_cache.scores),
            (cfg.TDA.NEGATIVE_ENABLED, neg_cache, neg_events, method.negative_cache.counts,
             method.negative_cache.scores)):
        if not enabled:
            assert cache == {} and int(counts.sum()) == 0
            continue
        assert len(cache) >= 2 and {"replace", "reject"} <= set(events), (sorted(cache), events)
        assert counts.tolist() == [len(cache.get(c, [])) for c in range(10)]
        for label, entries in cache.items():       # the same entries, in the same (entropy) order
            torch.testing.assert_close(entropies[label, :len(entries)], torch.stack([e[1] for e in entries]),
                                       atol=1e-5, rtol=1e-5)


def test_batch_of_four_gives_the_logits_of_batch_size_one(tiny_clip):
    cfg = _cfg(TEST__N_AUGMENTATIONS=8, TDA__SELECTION_P=0.25)
    images = stream(16)
    one = run_in_batches(methods.build_method(cfg, copy.deepcopy(tiny_clip), 10), images, 1)
    four = run_in_batches(methods.build_method(cfg, tiny_clip, 10), images, 4)
    torch.testing.assert_close(four, one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(four[8:], run_in_batches(methods.build_method(cfg, copy.deepcopy(tiny_clip), 10),
                                                       images[8:], 4))   # the caches of images 0-7 matter


def test_first_image_is_in_the_cache_before_its_own_prediction(tiny_clip):
    # one view, affinity of a normalised feature with itself = 1: the positive cache adds exactly alpha to the
    # pseudo-label's logit (the image's own entry), nothing else
    cfg = _cfg(TDA__NEGATIVE_ENABLED=False)
    method = methods.build_method(cfg, tiny_clip, 10)
    image = stream(1)
    with torch.no_grad():
        out = tiny_clip(image, return_features=True)
    zero_shot = 100.0 * out.image_features @ out.text_features.t()
    expected = zero_shot + 2.0 * F.one_hot(zero_shot.argmax(1), 10)
    torch.testing.assert_close(method(image), expected, atol=1e-5, rtol=1e-6)


def test_cache_queue_appends_replaces_the_worst_and_keeps_ties_in_order():
    queue = ClassQueues(num_classes=2, capacity=2, dim=3, extra_dim=2)
    keys, entropies, counts, probs = queue.keys, queue.scores, queue.counts, queue.extras

    def insert(k, entropy):
        queue.insert(1, torch.full((3,), float(k)), torch.tensor(entropy), torch.full((2,), float(k)))

    insert(1, 0.5)
    insert(2, 0.25)                              # appended, then sorted: [0.25 (2), 0.5 (1)]
    assert entropies[1].tolist() == [0.25, 0.5] and keys[1, :, 0].tolist() == [2, 1]
    insert(3, 0.5)                               # full, not strictly lower than the worst: rejected
    assert keys[1, :, 0].tolist() == [2, 1] and entropies[1].tolist() == [0.25, 0.5]
    insert(4, 0.375)                             # replaces the worst (0.5)
    assert entropies[1].tolist() == [0.25, 0.375] and keys[1, :, 0].tolist() == [2, 4]
    assert probs[1, :, 0].tolist() == [2, 4] and counts.tolist() == [0, 2]
    insert(5, 0.25)                              # replaces 0.375; the tie with 0.25 keeps the older entry first
    assert keys[1, :, 0].tolist() == [2, 5] and entropies[1].tolist() == [0.25, 0.25]
    assert keys[0].abs().sum() == 0 and entropies[0].tolist() == [math.inf, math.inf]


def test_cache_logits_by_hand():
    keys = torch.zeros(3, 2, 2)
    keys[0, 0] = torch.tensor([1.0, 0.0])       # class 0: one entry
    keys[2, 0] = torch.tensor([0.0, 1.0])       # class 2: two entries
    keys[2, 1] = torch.tensor([0.6, 0.8])
    counts = torch.tensor([1, 0, 2])
    query = torch.tensor([0.6, 0.8])
    # affinities: class 0 -> 0.6; class 2 -> 0.8 and 1.0; alpha 2, beta 5
    expected = torch.tensor([2 * math.exp(-5 * 0.4), 0.0, 2 * (math.exp(-5 * 0.2) + 1.0)])
    torch.testing.assert_close(positive_cache_logits(query, keys, counts, 2.0, 5.0), expected)
    probs = torch.zeros(3, 2, 3)
    probs[0, 0] = torch.tensor([0.02, 0.5, 0.48])   # mask (0.03, 1): classes 1, 2
    probs[2, 0] = torch.tensor([0.9, 0.05, 0.05])   # classes 0, 1, 2
    probs[2, 1] = torch.tensor([1.0, 0.0, 0.0])     # none (1.0 is not < 1.0)
    probs[1, 0] = torch.tensor([0.5, 0.5, 0.5])     # empty slot: ignored
    w0, w20 = math.exp(-0.4), math.exp(-0.2)        # beta 1
    expected = 0.117 * torch.tensor([w20, w0 + w20, w0 + w20])
    torch.testing.assert_close(negative_cache_logits(query, keys, counts, probs, 0.117, 1.0, 0.03, 1.0), expected)


def test_the_choice_keys_change_the_result(tiny_clip):
    images = stream()
    base = run_in_batches(methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10), images, 8)
    for overrides in ({"TDA__ENTROPY_NORMALISATION": "ln"}, {"TDA__LOGIT_SCALE": "model"}):
        other = run_in_batches(methods.build_method(_cfg(**overrides), copy.deepcopy(tiny_clip), 10), images, 8)
        assert not torch.allclose(other, base), overrides


# ------------------------------------------------------------------ state, determinism, refusals, harness
def assert_reset_empties_the_caches(method, images, n_views: int, seed: int) -> None:
    """After ``images`` fill both caches of a TDA-like ``method`` (TDA, BoostAdapter), ``reset()`` gives back its
    fresh state (every buffer, shapes included) and the view stream's start, so the run replays bit for bit."""
    fresh_state = {k: v.clone() for k, v in method.state_dict().items()}
    first = run_in_batches(method, images, 4)
    assert int(method.positive_cache.counts.sum()) > 0 and int(method.negative_cache.counts.sum()) > 0
    method.reset()
    state = method.state_dict()
    assert state.keys() == fresh_state.keys() and all(torch.equal(state[k], fresh_state[k]) for k in state)
    assert torch.equal(method.views.rng_state(), AugmentedViews(n_views, seed=seed).rng_state())
    assert torch.equal(run_in_batches(method, images, 4), first)


def assert_the_seed_decides_the_views(build, images) -> None:
    """``build(seed)`` twice with one seed gives the same outputs, with another seed other views and outputs."""
    runs = [run_in_batches(build(seed), images, 4) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_reset_restores_the_empty_caches_exactly(tiny_clip):
    cfg = _cfg(TEST__N_AUGMENTATIONS=4, TDA__SELECTION_P=0.5)
    assert_reset_empties_the_caches(methods.build_method(cfg, tiny_clip, 10), stream(12), 4, cfg.RNG_SEED)


def test_same_seed_same_output_other_seed_other_views(tiny_clip):
    assert_the_seed_decides_the_views(lambda seed: methods.build_method(
        _cfg(RNG_SEED=seed, TEST__N_AUGMENTATIONS=4, TDA__SELECTION_P=0.5), copy.deepcopy(tiny_clip), 10), stream(8))


def test_bad_tda_config_is_refused_before_the_model_loads():
    with pytest.raises(ConfigError, match="TDA.SELECTION_P"):
        check_method(_cfg(TEST__N_AUGMENTATIONS=8, TDA__SELECTION_P=0.1))    # int(8 * 0.1) = 0 views
    check_method(_cfg(TEST__N_AUGMENTATIONS=1, TDA__SELECTION_P=0.1))        # one view: the image itself
    with pytest.raises(ConfigError, match="TDA.NEGATIVE_ENTROPY_LOWER"):
        check_method(_cfg(TDA__NEGATIVE_ENTROPY_LOWER=0.5, TDA__NEGATIVE_ENTROPY_UPPER=0.5))
    with pytest.raises(ConfigError, match="TDA.NEGATIVE_MASK_LOWER"):
        check_method(_cfg(TDA__NEGATIVE_MASK_LOWER=0.7, TDA__NEGATIVE_MASK_UPPER=0.2))
    with pytest.raises(ConfigError, match="TDA.POSITIVE_SHOT_CAPACITY"):
        _cfg(TDA__POSITIVE_SHOT_CAPACITY=0)
    with pytest.raises(ConfigError, match="TDA.LOGIT_SCALE"):
        _cfg(TDA__LOGIT_SCALE="learned")
    with pytest.raises(ConfigError, match="TDA.ENTROPY_NORMALISATION"):
        _cfg(TDA__ENTROPY_NORMALISATION="log10")


def test_shipped_per_dataset_values_are_the_references():
    # configs/imagenet_{a,v,r,s}.yaml of kdiAAA/TDA (positive alpha, beta); the rest are its shared values
    expected = {"imagenet_a": (64, "tda", 2.0, 5.0), "imagenet_v2": (64, "tda", 1.0, 8.0),
                "imagenet_r": (64, "tda", 1.0, 8.0), "imagenet_sketch": (64, "tda", 2.363, 7.45),
                "cifar10_c": (1, "custom", 2.0, 5.0), "cifar100_c": (1, "custom", 2.0, 5.0),
                "imagenet_c": (1, "custom", 2.0, 5.0)}
    for dataset, (views, prompt_mode, alpha, beta) in expected.items():
        cfg = load_cfg(f"conf/{dataset}/tda.yaml")
        t = cfg.TDA
        assert (cfg.TEST.N_AUGMENTATIONS, cfg.CLIP.PROMPT_MODE, t.POSITIVE_ALPHA, t.POSITIVE_BETA) == \
            (views, prompt_mode, alpha, beta), dataset
        assert (t.POSITIVE_SHOT_CAPACITY, t.NEGATIVE_SHOT_CAPACITY, t.NEGATIVE_ALPHA, t.NEGATIVE_BETA,
                t.NEGATIVE_ENTROPY_LOWER, t.NEGATIVE_ENTROPY_UPPER, t.NEGATIVE_MASK_LOWER,
                t.NEGATIVE_MASK_UPPER) == (3, 2, 0.117, 1.0, 0.2, 0.5, 0.03, 1.0), dataset
        assert (t.SELECTION_P, t.LOGIT_SCALE, t.ENTROPY_NORMALISATION, cfg.MIXED_PRECISION) == \
            (0.1, "fixed_100", "log2", True), dataset


def test_tda_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise", "fog"], 6, TEST__BATCH_SIZE=4)
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": 1, "backward_passes_per_image": 0}
