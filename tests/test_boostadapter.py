"""BoostAdapter against a plain per-image transcription of the official code (taolinzhang/BoostAdapter runner.py
``run_test_tda`` in mode boostadapter, with utils.py's ``get_clip_logits``, ``select_confident_samples``,
``get_output_entropy``): python dicts of lists for the caches, ``update_cache`` as written (append, ``sorted`` by
entropy, truncate), a ``deepcopy`` of the positive cache that takes the boosting views, keys concatenated class by
class with one-hot / mask values, views encoded one at a time. On the tiny CLIP with images of several kinds, so
that several classes are predicted and the caches (and the boosting caches) fill and overflow."""
import copy
import math
import operator

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method, load_cfg
from methods.augmentations import AugmentedViews
from methods.boostadapter import boosted_class_entries
from methods.caches import ClassQueues
from tests.synthetic import reproducible_run_on_cifar10c, run_in_batches, tiny_cfg, varied_stream
from tests.test_tda import assert_reset_empties_the_caches, assert_the_seed_decides_the_views

CFG_FILE = "conf/cifar10_c/boostadapter.yaml"
N_IMAGES = 24
# Measured on this machine's CPU: logits (up to 32 in size) within 2.3e-5 of the transcription, cache entropies
# within 6.4e-6 (views encoded in one batch here, one by one there; fp32 sums in another order); the tolerances are
# set a few times above.
LOGIT_ATOL = 1e-4
SCORE_ATOL = 3e-5
PROB_ATOL = 1e-5      # the negative entries' probability maps: measured 2.6e-6
KEY_ATOL = 1e-6       # the entries' features


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def stream(n=N_IMAGES, seed=0):
    return varied_stream(n, seed)


# ------------------------------------------------------------------ the plain reference
def _update_cache(cache, pred, item, capacity, events):
    """runner.update_cache with fifo=False, as written, with a count of the truncations (an entry dropped)."""
    if pred in cache:
        cache[pred].append(item)
        cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
        if len(cache[pred]) > capacity:
            events.append("replace" if cache[pred][-1] is not item else "reject")
        cache[pred] = cache[pred][:capacity]
    else:
        cache[pred] = [item]


def _cache_logits(feature, cache, alpha, beta, num_classes, mask=None):
    """runner.compute_cache_logits: keys class by class (sorted class index), values one-hot or the mask."""
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


def _entropy(logits):
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def _epsilon_entropy(probs):
    """TTA-VLM's Entropy."""
    return -(probs * torch.log(probs + 1e-5)).sum(-1)


@torch.no_grad()
def reference_boostadapter(clip, mean, std, images, cfg, change=None):
    """run_test_tda (mode boostadapter), one image at a time. ``change`` alters one line (see the test that the
    comparison then fails)."""
    b = cfg.BOOSTADAPTER
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    text = F.normalize(torch.cat([clip.encode_text(tokenizer([f"a photo of a {name}."])) for name in CIFAR10_CLASSES]),
                       dim=-1)
    num_classes = len(CIFAR10_CLASSES)
    scale = 100.0 if b.LOGIT_SCALE == "fixed_100" else clip.logit_scale.exp().item()
    n_views = cfg.TEST.N_AUGMENTATIONS
    views_of = AugmentedViews(n_views, b.VIEW_AUGMENTATION, seed=cfg.RNG_SEED)
    delta = 0 if change == "no_delta" else b.BOOST_DELTA
    pos_cache, neg_cache, events, outputs, boosted = {}, {}, {"pos": [], "neg": [], "boost": []}, [], []
    for image in images:
        views = views_of(image[None])[0]
        ori_feat = torch.cat([F.normalize(clip.encode_image((v[None] - mean) / std), dim=-1) for v in views])
        ori_output = scale * ori_feat @ text.t()
        entropies = [e.item() for e in _entropy(ori_output)]
        by_entropy = sorted(range(n_views), key=lambda i: entropies[i])          # select_confident_samples
        if n_views > 1 and b.PREDICT_FROM == "confident_views":                     # infer_ori_image False
            output = ori_output[by_entropy[:int(n_views * 0.1 if change == "p" else n_views * b.SELECTION_P)]]
            feature, clip_logits = ori_feat[by_entropy[:len(output)]].mean(0), output.mean(0)
            log_probs = output - output.logsumexp(-1, keepdim=True)                  # avg_entropy
            avg = (log_probs.logsumexp(0) - math.log(len(output))).clamp(min=torch.finfo(torch.float32).min)
            loss = -(avg * avg.exp()).sum()
            prob_map = output.softmax(-1).mean(0)
        else:
            feature, clip_logits = ori_feat[0], ori_output[0]
            loss, prob_map = _entropy(clip_logits), clip_logits.softmax(-1)
        if b.ENTROPY == "epsilon":
            loss = _epsilon_entropy(prob_map)
        pred = int(clip_logits.argmax())
        if b.POSITIVE_ENABLED:
            _update_cache(pos_cache, pred, [feature, loss], b.POSITIVE_SHOT_CAPACITY, events["pos"])
            select = by_entropy[:int(n_views * b.SELECTION_P)]
            select_feat, select_output = ori_feat[select], ori_output[select]
            if b.ENTROPY == "epsilon":
                select_entropy = _epsilon_entropy(select_output.softmax(-1))
            else:                                                                    # get_output_entropy
                log_probs = select_output - select_output.logsumexp(-1, keepdim=True)
                select_entropy = -(log_probs * log_probs.exp()).sum(-1)
            cur_pos_cache = pos_cache if change == "no_copy" else copy.deepcopy(pos_cache)
            for i in range(len(select)):
                _update_cache(cur_pos_cache, int(select_output[i].argmax()), [select_feat[i], select_entropy[i].item()],
                              b.POSITIVE_SHOT_CAPACITY + delta, events["boost"])
            boosted.append(cur_pos_cache)
        if b.NEGATIVE_ENABLED and b.NEGATIVE_ENTROPY_LOWER < float(loss / math.log2(num_classes)) < \
                b.NEGATIVE_ENTROPY_UPPER:
            _update_cache(neg_cache, pred, [feature, loss, prob_map], b.NEGATIVE_SHOT_CAPACITY, events["neg"])
        final = clip_logits.clone()
        if b.POSITIVE_ENABLED and pos_cache:
            final += _cache_logits(feature, cur_pos_cache, b.POSITIVE_ALPHA, b.POSITIVE_BETA, num_classes)
        if b.NEGATIVE_ENABLED and neg_cache:
            final -= _cache_logits(feature, neg_cache, b.NEGATIVE_ALPHA, b.NEGATIVE_BETA, num_classes,
                                   (b.NEGATIVE_MASK_LOWER, b.NEGATIVE_MASK_UPPER))
        outputs.append(final)
    return torch.stack(outputs), pos_cache, neg_cache, events, boosted


def _assert_same_cache(queues, cache, with_probs=False):
    """The method's ClassQueues hold the transcription's entries, class by class, in the same (entropy) order."""
    assert queues.counts.tolist() == [len(cache.get(c, [])) for c in range(queues.counts.shape[0])]
    for label, entries in cache.items():
        n = len(entries)
        torch.testing.assert_close(queues.scores[label, :n], torch.stack([torch.as_tensor(e[1]) for e in entries]),
                                   atol=SCORE_ATOL, rtol=0)
        torch.testing.assert_close(queues.keys[label, :n], torch.stack([e[0] for e in entries]), atol=KEY_ATOL,
                                   rtol=0)
        if with_probs:
            torch.testing.assert_close(queues.extras[label, :n], torch.stack([e[2] for e in entries]),
                                       atol=PROB_ATOL, rtol=0)


# ------------------------------------------------------------------ against the reference
CASES = {
    "defaults_64_views": {},
    "confident_views_query": {"TEST__N_AUGMENTATIONS": 16, "BOOSTADAPTER__SELECTION_P": 0.25,
                              "BOOSTADAPTER__PREDICT_FROM": "confident_views"},
    "tta_vlm_entropy_and_model_scale": {"TEST__N_AUGMENTATIONS": 16, "BOOSTADAPTER__SELECTION_P": 0.25,
                                        "BOOSTADAPTER__ENTROPY": "epsilon", "BOOSTADAPTER__LOGIT_SCALE": "model",
                                        "BOOSTADAPTER__NEGATIVE_ENTROPY_LOWER": 0.6,
                                        "BOOSTADAPTER__NEGATIVE_ENTROPY_UPPER": 0.69},
    "augmix_views_no_delta": {"TEST__N_AUGMENTATIONS": 8, "BOOSTADAPTER__SELECTION_P": 0.5,
                              "BOOSTADAPTER__VIEW_AUGMENTATION": "augmix", "BOOSTADAPTER__BOOST_DELTA": 0},
    "one_view_no_boosting": {"TEST__N_AUGMENTATIONS": 1},
    "positive_only_small_capacity": {"TEST__N_AUGMENTATIONS": 16, "BOOSTADAPTER__SELECTION_P": 0.25,
                                     "BOOSTADAPTER__NEGATIVE_ENABLED": False,
                                     "BOOSTADAPTER__POSITIVE_SHOT_CAPACITY": 1, "BOOSTADAPTER__BOOST_DELTA": 1},
    "negative_only": {"TEST__N_AUGMENTATIONS": 16, "BOOSTADAPTER__SELECTION_P": 0.25,
                      "BOOSTADAPTER__POSITIVE_ENABLED": False},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_boostadapter_matches_plain_reference(case, tiny_clip):
    cfg = _cfg(RNG_SEED=3, **CASES[case])
    images = stream()
    method = methods.build_method(cfg, tiny_clip, 10)
    out = run_in_batches(method, images, 4)
    ref, pos_cache, neg_cache, events, boosted = reference_boostadapter(tiny_clip.clip, tiny_clip.mean,
                                                                        tiny_clip.std, images, cfg)
    torch.testing.assert_close(out, ref, atol=LOGIT_ATOL, rtol=0)
    b = cfg.BOOSTADAPTER
    # the adapted state after the stream: both caches entry by entry; the boosting caches were never kept
    for enabled, queues, cache, name, with_probs in ((b.POSITIVE_ENABLED, method.positive_cache, pos_cache, "pos", 0),
                                                     (b.NEGATIVE_ENABLED, method.negative_cache, neg_cache, "neg", 1)):
        if not enabled:
            assert cache == {} and int(queues.counts.sum()) == 0
            continue
        _assert_same_cache(queues, cache, with_probs)
        # the stream exercised what it should: several classes, full queues replaced and rejected
        assert len(cache) >= 2 and {"replace", "reject"} <= set(events[name]), (sorted(cache), events[name])
    if b.POSITIVE_ENABLED and cfg.TEST.N_AUGMENTATIONS > 1:
        assert {"replace", "reject"} <= set(events["boost"]), events["boost"]
        assert any(len(entries) > b.POSITIVE_SHOT_CAPACITY for entries in boosted[-1].values()) == (b.BOOST_DELTA > 0)


@pytest.mark.parametrize("change", ["no_copy", "no_delta", "p"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, change):
    """The boosting views kept in the positive cache for later images (no deepcopy), the boosting cache at the
    positive cache's capacity (no delta), or the confident-view fraction of the query at the reference's
    hard-coded 0.1 instead of the key: the transcription no longer matches, far beyond the tolerance."""
    overrides = {"TEST__N_AUGMENTATIONS": 16, "BOOSTADAPTER__SELECTION_P": 0.25}
    if change == "p":
        overrides["BOOSTADAPTER__PREDICT_FROM"] = "confident_views"
    cfg = _cfg(RNG_SEED=3, **overrides)
    images = stream()
    out = run_in_batches(methods.build_method(cfg, tiny_clip, 10), images, 4)
    same = reference_boostadapter(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, cfg)[0]
    changed = reference_boostadapter(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, cfg, change)[0]
    torch.testing.assert_close(out, same, atol=LOGIT_ATOL, rtol=0)
    # measured: 5.4 (no_copy), 6.0 (no_delta), 5.3 (p) at the largest logit difference
    assert (out - changed).abs().max() > 1000 * LOGIT_ATOL


def test_boosting_cache_equals_inserting_the_views_one_by_one():
    """``boosted_class_entries`` (one stable sort per class) against update_cache applied view by view to a deep
    copy, with ties between the queue's entries and the views, and between views."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        capacity, delta = 1 + trial % 3, trial % 4
        queue, cache = ClassQueues(4, capacity, 2), {}
        for _ in range(6):
            label, key = int(torch.randint(4, (1,), generator=g)), torch.rand(2, generator=g)
            score = float(torch.randint(5, (1,), generator=g)) / 4          # coarse scores: ties
            queue.insert(label, key, score)
            _update_cache(cache, label, [key, score], capacity, [])
        n_views = 1 + trial % 7
        keys = torch.rand(n_views, 2, generator=g)
        scores = torch.randint(5, (n_views,), generator=g).float() / 4
        labels = torch.randint(4, (n_views,), generator=g).tolist()
        boosted = copy.deepcopy(cache)
        for key, score, label in zip(keys, scores.tolist(), labels):
            _update_cache(boosted, label, [key, score], capacity + delta, [])
        entries = boosted_class_entries(queue, keys, scores, labels, capacity + delta)
        assert sorted(entries) == sorted(set(labels))
        for label, (class_keys, class_scores) in entries.items():
            assert class_scores.tolist() == [e[1] for e in boosted[label]]
            assert torch.equal(class_keys, torch.stack([e[0] for e in boosted[label]]))


def test_batch_of_four_gives_the_logits_of_batch_size_one(tiny_clip):
    cfg = _cfg(TEST__N_AUGMENTATIONS=16, BOOSTADAPTER__SELECTION_P=0.25)
    images = stream(16)
    one_method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    one = run_in_batches(one_method, images, 1)
    four_method = methods.build_method(cfg, tiny_clip, 10)
    four = run_in_batches(four_method, images, 4)
    torch.testing.assert_close(four, one, atol=1e-5, rtol=0)
    for name in ("positive_cache", "negative_cache"):
        for buffer in ("keys", "scores", "counts", "extras"):
            torch.testing.assert_close(getattr(getattr(four_method, name), buffer),
                                       getattr(getattr(one_method, name), buffer), atol=1e-5, rtol=0)
    assert not torch.allclose(four[8:], run_in_batches(methods.build_method(cfg, copy.deepcopy(tiny_clip), 10),
                                                       images[8:], 4))   # the caches of images 0-7 matter


def test_one_view_is_tda_and_the_boosting_views_change_the_result(tiny_clip):
    """With one view there is no boosting view (int(1 * 0.1) = 0): the image enters the positive cache before its
    own prediction, which adds exactly alpha to its pseudo-label (TDA's first step); with views the boosting
    cache changes the logits."""
    method = methods.build_method(_cfg(TEST__N_AUGMENTATIONS=1, BOOSTADAPTER__NEGATIVE_ENABLED=False), tiny_clip, 10)
    assert method.n_boosting_views == 0
    image = stream(1)
    with torch.no_grad():
        out = tiny_clip(image, return_features=True)
    zero_shot = 100.0 * out.image_features @ out.text_features.t()
    torch.testing.assert_close(method(image), zero_shot + 2.0 * F.one_hot(zero_shot.argmax(1), 10),
                               atol=1e-5, rtol=1e-6)
    images = stream(8)
    base = run_in_batches(methods.build_method(_cfg(TEST__N_AUGMENTATIONS=16, BOOSTADAPTER__SELECTION_P=0.25),
                                               copy.deepcopy(tiny_clip), 10), images, 4)
    no_boost = run_in_batches(methods.build_method(_cfg(TEST__N_AUGMENTATIONS=16, BOOSTADAPTER__SELECTION_P=0.25,
                                                        BOOSTADAPTER__POSITIVE_SHOT_CAPACITY=1,
                                                        BOOSTADAPTER__BOOST_DELTA=0), copy.deepcopy(tiny_clip), 10),
                              images, 4)
    assert not torch.allclose(base, no_boost)


def test_the_choice_keys_change_the_result(tiny_clip):
    """Every choice key changes the logits; TTA-VLM's epsilon entropy changes the cache entries' entropies (the
    logits only where it flips an order or the negative band, which these 12 images do not)."""
    images = stream(12)
    common = {"TEST__N_AUGMENTATIONS": 16, "BOOSTADAPTER__SELECTION_P": 0.25}

    def run(**overrides):
        method = methods.build_method(_cfg(**common, **overrides), copy.deepcopy(tiny_clip), 10)
        return run_in_batches(method, images, 4), method.positive_cache.scores

    base, base_scores = run()
    for overrides in ({"BOOSTADAPTER__PREDICT_FROM": "confident_views"}, {"BOOSTADAPTER__LOGIT_SCALE": "model"},
                      {"BOOSTADAPTER__VIEW_AUGMENTATION": "augmix"}, {"BOOSTADAPTER__BOOST_DELTA": 0}):
        assert not torch.allclose(run(**overrides)[0], base), overrides
    scores = run(BOOSTADAPTER__ENTROPY="epsilon")[1]
    filled = base_scores.isfinite()
    assert torch.equal(scores.isfinite(), filled) and (scores[filled] - base_scores[filled]).abs().max() > 1e-5


# ------------------------------------------------------------------ state, determinism, refusals, harness
def test_reset_restores_the_empty_caches_exactly(tiny_clip):
    cfg = _cfg(TEST__N_AUGMENTATIONS=8, BOOSTADAPTER__SELECTION_P=0.5)
    assert_reset_empties_the_caches(methods.build_method(cfg, tiny_clip, 10), stream(12), 8, cfg.RNG_SEED)


def test_same_seed_same_output_other_seed_other_views(tiny_clip):
    assert_the_seed_decides_the_views(lambda seed: methods.build_method(
        _cfg(RNG_SEED=seed, TEST__N_AUGMENTATIONS=8, BOOSTADAPTER__SELECTION_P=0.5), copy.deepcopy(tiny_clip), 10),
        stream(8))


def test_bad_boostadapter_config_is_refused_before_the_model_loads():
    with pytest.raises(ConfigError, match="BOOSTADAPTER.SELECTION_P"):
        check_method(_cfg(TEST__N_AUGMENTATIONS=8, BOOSTADAPTER__SELECTION_P=0.1))    # int(8 * 0.1) = 0 views
    check_method(_cfg(TEST__N_AUGMENTATIONS=1, BOOSTADAPTER__SELECTION_P=0.1))        # one view: the image itself
    with pytest.raises(ConfigError, match="BOOSTADAPTER.NEGATIVE_ENTROPY_LOWER"):
        check_method(_cfg(BOOSTADAPTER__NEGATIVE_ENTROPY_LOWER=0.5, BOOSTADAPTER__NEGATIVE_ENTROPY_UPPER=0.5))
    with pytest.raises(ConfigError, match="BOOSTADAPTER.NEGATIVE_MASK_LOWER"):
        check_method(_cfg(BOOSTADAPTER__NEGATIVE_MASK_LOWER=0.7, BOOSTADAPTER__NEGATIVE_MASK_UPPER=0.2))
    for key, bad in (("POSITIVE_SHOT_CAPACITY", 0), ("BOOST_DELTA", -1), ("LOGIT_SCALE", "learned"),
                     ("ENTROPY", "log10"), ("PREDICT_FROM", "mean"), ("VIEW_AUGMENTATION", "randaugment"),
                     ("SELECTION_P", 1.5)):
        with pytest.raises(ConfigError, match=f"BOOSTADAPTER.{key}"):
            _cfg(**{f"BOOSTADAPTER__{key}": bad})


def test_shipped_per_dataset_values_are_the_references():
    # configs/<set>.yaml of taolinzhang/BoostAdapter: positive alpha, beta, delta; the query as infer_ori_image
    expected = {"imagenet_a": (2.0, 5.0, 3, "confident_views"), "imagenet_v2": (1.0, 8.0, 1, "confident_views"),
                "imagenet_r": (1.0, 8.0, 3, "confident_views"), "imagenet_sketch": (2.363, 7.45, 1, "confident_views"),
                "caltech101": (5.0, 5.0, 2, "image"), "dtd": (2.0, 3.0, 0, "image"), "eurosat": (4.0, 8.0, 0, "image"),
                "fgvc_aircraft": (2.0, 2.0, 2, "image"), "food101": (1.0, 1.0, 3, "image"),
                "flowers102": (1.0, 5.0, 0, "image"), "oxford_pets": (2.0, 7.0, 0, "image"),
                "stanford_cars": (1.0, 7.0, 3, "image"), "sun397": (2.0, 3.0, 1, "image"),
                "ucf101": (3.0, 8.0, 0, "image"), "imagenet_c": (2.0, 5.0, 3, "image"),
                "cifar10_c": (2.0, 5.0, 3, "image"), "shapes_c": (2.0, 5.0, 3, "image")}
    for dataset, (alpha, beta, delta, predict_from) in expected.items():
        cfg = load_cfg(f"conf/{dataset}/boostadapter.yaml")
        b = cfg.BOOSTADAPTER
        assert (b.POSITIVE_ALPHA, b.POSITIVE_BETA, b.BOOST_DELTA, b.PREDICT_FROM) == \
            (alpha, beta, delta, predict_from), dataset
        assert (b.POSITIVE_SHOT_CAPACITY, b.NEGATIVE_SHOT_CAPACITY, b.NEGATIVE_ALPHA, b.NEGATIVE_BETA,
                b.NEGATIVE_ENTROPY_LOWER, b.NEGATIVE_ENTROPY_UPPER, b.NEGATIVE_MASK_LOWER,
                b.NEGATIVE_MASK_UPPER) == (3, 2, 0.117, 1.0, 0.2, 0.5, 0.03, 1.0), dataset
        assert (b.SELECTION_P, b.VIEW_AUGMENTATION, b.LOGIT_SCALE, b.ENTROPY, cfg.MIXED_PRECISION) == \
            (0.1, "crop_flip", "fixed_100", "exact", True), dataset
        views = 1 if dataset == "imagenet_c" else 64          # the reference's ImageNet loader: no views
        prompt_mode = "custom" if dataset in ("cifar10_c", "shapes_c") else "tda"
        assert (cfg.TEST.N_AUGMENTATIONS, cfg.CLIP.PROMPT_MODE) == (views, prompt_mode), dataset


def test_boostadapter_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise", "fog"], 6, TEST__BATCH_SIZE=4,
                                           TEST__N_AUGMENTATIONS=8, BOOSTADAPTER__SELECTION_P=0.25)
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": 8, "backward_passes_per_image": 0}
