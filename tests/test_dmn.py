"""DMN (zero-shot) and DMN-weak against a plain per-image transcription of the references: YBZh/DMN dmn_main.py
(``direct_inference``, ``select_confident_samples``, ``DualMem.update_memory_bank`` and ``get_image_pred``,
fix_clip.get_text_features) and, for the keys that choose TTA-VLM's way, TomSheng21/tta-vlm online_method/dmn.py
and dmn_weak.py. Python lists of [feature, entropy] slots per class, views encoded one at a time, the read-out
class by class over the memory's full slot tensor (empty slots zero) as the reference writes it. On the tiny CLIP
with images of several kinds and small memories, so that several classes fill, overflow, replace and reject."""
import copy
import json

import open_clip
import pytest
import torch

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method, load_cfg
from methods.augmentations import AugmentedViews
from methods.dmn import DynamicMemory
from models.clip import ZeroShotCLIP
from tests.synthetic import reproducible_run_on_cifar10c, tiny_cfg, varied_stream

N_IMAGES = 40
# Measured on a 2-core x86 CPU over the cases below: largest difference of the scores 1.9e-6, of the memory
# features 1.5e-7 and of the entropies 4.8e-7 (views encoded in one batch here, one by one in the transcription;
# batched read-out); the tolerance is a few times above. A changed line of the transcription moves the scores by
# 0.05 or more (test_the_comparison_fails_when_one_line_of_the_transcription_changes).
ATOL, RTOL = 1e-5, 1e-5


def _cfg(config="dmn", **overrides):
    return tiny_cfg(f"conf/cifar10_c/{config}.yaml", **overrides)


def stream(n=N_IMAGES, seed=0):
    return varied_stream(n, seed)


def _model_for(cfg, tiny_clip):
    """The tiny CLIP with the config's templates (the fixture's are "a photo of a {}.")."""
    if list(cfg.CLIP.PROMPT_TEMPLATE) == tiny_clip.templates:
        return tiny_clip
    return ZeroShotCLIP(tiny_clip.clip, tiny_clip.tokenizer, tiny_clip.class_names, list(cfg.CLIP.PROMPT_TEMPLATE),
                        tiny_clip.mean.flatten().tolist(), tiny_clip.std.flatten().tolist())


def _scores(method, images, batch_size):
    """The reference's scores P_0 + MEMORY_WEIGHT * P_mem of a stream: the method reports their log."""
    return torch.cat([method(batch) for batch in images.split(batch_size)]).exp()


def _cupl_file(tmp_path, names=CIFAR10_CLASSES):
    descriptions = {name.replace("_", " "): [f"a blurry picture of a {name}.", f"{name}, seen from afar."]
                    for name in names}
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(descriptions))
    return path


# ------------------------------------------------------------------ the plain reference
def _text_features(clip, templates, cupl):
    """fix_clip.get_text_features: per class every prompt's feature normalised, averaged, renormalised."""
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    text_feat = []
    for name in CIFAR10_CLASSES:
        name = name.replace("_", " ")
        text_prompts = [template.format(name) for template in templates]
        if cupl is not None:
            text_prompts += cupl[name]
        class_embeddings = clip.encode_text(tokenizer(text_prompts))
        class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
        class_embedding_mean = class_embeddings.mean(dim=0)
        text_feat.append(class_embedding_mean / class_embedding_mean.norm())
    return torch.stack(text_feat)


def _pseudo_label(logits, img_text, n_views, d):
    """The mean prediction of the confident views: the reference's select_confident_samples on probabilities
    (mean of their probabilities), or TTA-VLM's on logits (softmax of their mean logits); one view: the image."""
    if n_views == 1:
        return img_text[0]
    top = int(n_views * d.SELECTION_P)
    if d.PSEUDO_LABEL == "mean_probabilities":
        batch_entropy = [-(p * torch.log(p + 1e-6)).sum().item() for p in img_text]
        idx = sorted(range(n_views), key=lambda i: batch_entropy[i])[:top]
        return img_text[idx].mean(0)
    batch_entropy = [-(l.softmax(0) * l.log_softmax(0)).sum().item() for l in logits]
    idx = sorted(range(n_views), key=lambda i: batch_entropy[i])[:top]
    return logits[idx].mean(0).softmax(0)


def _update_memory(memory, pseudo_label, feature, entropy, d, events):
    """update_memory_bank (REPLACEMENT lower_entropy) or TTA-VLM's MemoryBank.update (always)."""
    entries = memory[pseudo_label]
    if len(entries) < d.MEMORY_SIZE:
        entries.append([feature, entropy])
        events.append("append")
        return
    if d.REPLACEMENT == "lower_entropy" and not any(entropy < entry[1] for entry in entries):
        events.append("reject")
        return
    worst = max(range(len(entries)), key=lambda j: entries[j][1])
    entries[worst] = [feature, entropy]
    events.append("replace")


def _read_out(memory, text, img_feat, d, scale):
    """get_image_pred, similarity_weighted: the memory slots (zeros when empty) and the text feature as keys and
    values, class by class."""
    adaptive = []
    for c in range(len(text)):
        slots = [entry[0] for entry in memory[c]] + [torch.zeros_like(img_feat)] * (d.MEMORY_SIZE - len(memory[c]))
        memorized = torch.stack(slots + [text[c]])
        keys = memorized / memorized.norm(dim=-1, keepdim=True)
        keys[memorized.sum(-1) == 0] = 0
        query = img_feat / img_feat.norm()
        similarity = torch.exp(-d.BETA * (-(query * keys).sum(-1) + 1))
        feat = (keys * similarity.unsqueeze(-1)).sum(0)
        feat = feat / feat.norm()
        adaptive.append(feat / feat.norm())
    return (scale * torch.stack(adaptive) @ img_feat).softmax(-1)


@torch.no_grad()
def reference_dmn(clip, mean, std, images, cfg, cupl=None, change=None):
    """direct_inference, one image at a time, n_shot 0. ``change``: one line changed, for the test that shows the
    comparison would catch it."""
    d = cfg.DMN
    text = _text_features(clip, cfg.CLIP.PROMPT_TEMPLATE, cupl)
    scale = clip.logit_scale.exp().item()
    n_views = cfg.TEST.N_AUGMENTATIONS
    views_of = AugmentedViews(n_views, d.VIEW_AUGMENTATION, seed=cfg.RNG_SEED)
    memory, events, outputs = {c: [] for c in range(len(CIFAR10_CLASSES))}, [], []
    for image in images:
        views = views_of(image[None])[0]
        features = torch.cat([clip.encode_image((v[None] - mean) / std) for v in views])
        features = features / features.norm(dim=-1, keepdim=True)
        logits = scale * features @ text.t()
        img_text = logits.softmax(-1)
        mean_prob = _pseudo_label(logits, img_text, n_views, d)
        entropy = -(mean_prob * torch.log(mean_prob + d.ENTROPY_EPSILON)).sum()
        if change == "read_before_insert":
            img_global_pred = _read_out(memory, text, features[0], d, scale)
        stored = features.mean(0) if change == "store_mean_of_views" else features[0]
        _update_memory(memory, int(mean_prob.argmax()), stored, entropy, d, events)
        if change != "read_before_insert":
            img_global_pred = _read_out(memory, text, features[0], d, scale)
        outputs.append(img_text[0] + d.MEMORY_WEIGHT * img_global_pred)
    return torch.stack(outputs), memory, events


def _assert_same_memory(memory, reference_memory):
    """Class by class, slot by slot: the same features and entropies in the same slots."""
    assert memory.counts.tolist() == [len(reference_memory[c]) for c in range(len(reference_memory))]
    for c, entries in reference_memory.items():
        for slot, (feature, entropy) in enumerate(entries):
            torch.testing.assert_close(memory.features[c, slot], feature, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(memory.entropies[c, slot], entropy, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ against the reference
SMALL = {"DMN__MEMORY_SIZE": 3}
CASES = {
    "reference_eight_views": {**SMALL, "TEST__N_AUGMENTATIONS": 8, "DMN__SELECTION_P": 0.25},
    "reference_one_view": {"DMN__MEMORY_SIZE": 2, "TEST__N_AUGMENTATIONS": 1},
    "tta_vlm_choices": {**SMALL, "TEST__N_AUGMENTATIONS": 8, "DMN__SELECTION_P": 0.25,
                        "DMN__PSEUDO_LABEL": "mean_logits", "DMN__REPLACEMENT": "always",
                        "DMN__ENTROPY_EPSILON": 1e-5},
    "augmix_templates_other_weights": {"DMN__MEMORY_SIZE": 4, "TEST__N_AUGMENTATIONS": 4, "DMN__SELECTION_P": 0.5,
                                       "DMN__VIEW_AUGMENTATION": "augmix", "DMN__BETA": 2.0,
                                       "DMN__MEMORY_WEIGHT": 3.0,
                                       "CLIP__PROMPT_TEMPLATE": ["a photo of a {}.", "art of the {}."]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dmn_matches_plain_reference(case, tiny_clip):
    cfg = _cfg(RNG_SEED=3, **CASES[case])
    images = stream(24 if cfg.TEST.N_AUGMENTATIONS > 1 else N_IMAGES)
    method = methods.build_method(cfg, _model_for(cfg, tiny_clip), 10)
    out = _scores(method, images, 4)
    ref, memory, events = reference_dmn(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, cfg)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    _assert_same_memory(method.memory, memory)
    # the stream exercised what it should: several classes, full memories replaced (and rejected by the reference)
    assert sum(1 for entries in memory.values() if entries) >= 2
    assert {"append", "replace"} <= set(events), events
    if cfg.DMN.REPLACEMENT == "lower_entropy":
        assert "reject" in events, events


def test_dmn_weak_matches_plain_reference(tiny_clip):
    cfg = _cfg("dmn_weak", DMN__MEMORY_SIZE=2)
    images = stream()
    method = methods.build_method(cfg, tiny_clip, 10)
    assert type(method).method_name == "dmn_weak"
    out = _scores(method, images, 8)
    ref, memory, events = reference_dmn(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, cfg)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    _assert_same_memory(method.memory, memory)
    assert {"append", "replace"} <= set(events)


def test_cupl_descriptions_join_the_templates(tiny_clip, tmp_path):
    path = _cupl_file(tmp_path)
    cfg = _cfg(DMN__TEXT_PROMPTS="templates_and_cupl", DMN__CUPL_PROMPTS=str(path), **CASES["reference_one_view"])
    check_method(cfg)
    images = stream(16)
    method = methods.build_method(cfg, tiny_clip, 10)
    out = _scores(method, images, 4)
    ref, memory, _ = reference_dmn(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, cfg,
                                   cupl=json.loads(path.read_text()))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    _assert_same_memory(method.memory, memory)
    plain = _scores(methods.build_method(_cfg(**CASES["reference_one_view"]), tiny_clip, 10), images, 4)
    assert not torch.allclose(plain, out, atol=1e-3)


@pytest.mark.parametrize("changed", ["read_before_insert", "store_mean_of_views"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, changed):
    """The image enters the memory before its read-out, and the memory keeps the image's own feature: with either
    line changed, the transcription no longer matches."""
    cfg = _cfg(RNG_SEED=3, **CASES["reference_eight_views"])
    images = stream(24)
    out = _scores(methods.build_method(cfg, tiny_clip, 10), images, 4)
    ref, _, _ = reference_dmn(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, cfg, change=changed)
    assert (out - ref).abs().max() > 1000 * ATOL      # measured: 0.97 and 0.05


# ------------------------------------------------------------------ the memory by hand
def test_memory_appends_then_replaces_the_worst_only_when_better():
    memory = DynamicMemory(num_classes=2, size=2, dim=3)

    def insert(k, entropy, always=False):
        memory.insert(1, torch.full((3,), float(k)), torch.tensor(entropy), always)

    insert(1, 0.5)
    insert(2, 0.25)                              # slot order, not sorted
    assert memory.features[1, :, 0].tolist() == [1, 2] and memory.entropies[1].tolist() == [0.5, 0.25]
    insert(3, 0.5)                               # not lower than any entry: rejected
    assert memory.features[1, :, 0].tolist() == [1, 2]
    insert(4, 0.375)                             # lower than 0.5: replaces it, in its slot
    assert memory.features[1, :, 0].tolist() == [4, 2] and memory.entropies[1].tolist() == [0.375, 0.25]
    insert(5, 0.75, always=True)                 # TTA-VLM: the worst goes whatever the new entropy
    assert memory.features[1, :, 0].tolist() == [5, 2] and memory.counts.tolist() == [0, 2]
    assert memory.features[0].abs().sum() == 0


def test_read_out_by_hand():
    memory = DynamicMemory(num_classes=2, size=2, dim=2)
    memory.insert(0, torch.tensor([0.6, 0.8]), torch.tensor(0.1), False)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([0.0, 1.0])
    beta = 2.0
    # class 0: entry (0.6, 0.8) with q.k 0.8 and text (1, 0) with q.k 0; class 1: its text alone, q.k 1
    w_entry, w_text = torch.exp(torch.tensor(-beta * 0.2)), torch.exp(torch.tensor(-beta * 1.0))
    class0 = torch.nn.functional.normalize(w_entry * torch.tensor([0.6, 0.8]) + w_text * torch.tensor([1.0, 0.0]),
                                           dim=0)
    expected = torch.stack([class0, torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(memory.read_out(query, text, beta), expected)


# ------------------------------------------------------------------ batches, keys, state, refusals, harness
def test_batch_of_four_gives_the_scores_of_batch_size_one(tiny_clip):
    cfg = _cfg(**CASES["reference_eight_views"])
    images = stream(16)
    one = _scores(methods.build_method(cfg, copy.deepcopy(tiny_clip), 10), images, 1)
    four_method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    four = _scores(four_method, images, 4)
    torch.testing.assert_close(four, one, atol=ATOL, rtol=RTOL)
    later = _scores(methods.build_method(cfg, tiny_clip, 10), images[8:], 4)
    assert not torch.allclose(four[8:], later)      # the memory of images 0-7 matters


def test_the_choice_keys_change_the_result(tiny_clip):
    base_overrides = {**CASES["reference_eight_views"], "DMN__MEMORY_SIZE": 2}
    images = stream(24)
    base_method = methods.build_method(_cfg(**base_overrides), copy.deepcopy(tiny_clip), 10)
    base = _scores(base_method, images, 8)
    for overrides in ({"DMN__REPLACEMENT": "always"}, {"DMN__MEMORY_WEIGHT": 0.3}, {"DMN__BETA": 1.0}):
        method = methods.build_method(_cfg(**base_overrides, **overrides), copy.deepcopy(tiny_clip), 10)
        assert not torch.allclose(_scores(method, images, 8), base), overrides
    # TTA-VLM's pseudo-label and epsilon: on this stream the same labels, other entropies in the memory
    for overrides in ({"DMN__PSEUDO_LABEL": "mean_logits"}, {"DMN__ENTROPY_EPSILON": 1e-5}):
        method = methods.build_method(_cfg(**base_overrides, **overrides), copy.deepcopy(tiny_clip), 10)
        _scores(method, images, 8)
        assert not torch.allclose(method.memory.entropies, base_method.memory.entropies), overrides


def test_reset_restores_the_empty_memory_exactly(tiny_clip):
    cfg = _cfg(TEST__N_AUGMENTATIONS=4, DMN__SELECTION_P=0.5, DMN__MEMORY_SIZE=2)
    method = methods.build_method(cfg, tiny_clip, 10)
    fresh_state = {k: v.clone() for k, v in method.state_dict().items()}
    images = stream(12)
    first = _scores(method, images, 4)
    assert int(method.memory.counts.sum()) > 0
    method.reset()
    state = method.state_dict()
    assert state.keys() == fresh_state.keys() and all(torch.equal(state[k], fresh_state[k]) for k in state)
    assert int(method.memory.counts.sum()) == 0 and method.memory.features.abs().sum() == 0
    assert torch.equal(method.views.rng_state(), AugmentedViews(4, seed=cfg.RNG_SEED).rng_state())
    assert torch.equal(_scores(method, images, 4), first)


def test_bad_dmn_config_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="DMN.SELECTION_P"):
        check_method(_cfg(TEST__N_AUGMENTATIONS=8, DMN__SELECTION_P=0.1))    # int(8 * 0.1) = 0 views
    check_method(_cfg(TEST__N_AUGMENTATIONS=1))                              # one view: the image itself
    for key, value in (("MEMORY_SIZE", 0), ("BETA", -1.0), ("MEMORY_WEIGHT", -0.5), ("ENTROPY_EPSILON", -1e-8),
                       ("SELECTION_P", 0.0), ("PSEUDO_LABEL", "median"), ("REPLACEMENT", "never"),
                       ("TEXT_PROMPTS", "cupl"), ("VIEW_AUGMENTATION", "randaugment")):
        with pytest.raises(ConfigError, match=f"DMN.{key}"):
            _cfg(**{f"DMN__{key}": value})
    with pytest.raises(ConfigError, match="DMN.CUPL_PROMPTS"):              # CuPL asked, no file given
        check_method(_cfg(DMN__TEXT_PROMPTS="templates_and_cupl"))
    with pytest.raises(ConfigError, match="DMN.CUPL_PROMPTS"):
        check_method(_cfg(DMN__TEXT_PROMPTS="templates_and_cupl", DMN__CUPL_PROMPTS=str(tmp_path / "none.json")))
    partial = _cupl_file(tmp_path, CIFAR10_CLASSES[:9])
    with pytest.raises(ConfigError, match=f"DMN.CUPL_PROMPTS.*'{CIFAR10_CLASSES[9]}'"):
        check_method(_cfg(DMN__TEXT_PROMPTS="templates_and_cupl", DMN__CUPL_PROMPTS=str(partial)))
    with pytest.raises(ConfigError, match="DMN.CUPL_PROMPTS .* DMN.TEXT_PROMPTS templates does not read it"):
        check_method(_cfg(DMN__CUPL_PROMPTS=str(_cupl_file(tmp_path))))
    with pytest.raises(ConfigError, match="dmn_weak .* TEST.N_AUGMENTATIONS must be 1, got 32"):
        check_method(_cfg("dmn_weak", TEST__N_AUGMENTATIONS=32))


def test_shipped_values_are_the_references():
    # YBZh/DMN: the dynamic memory's weight its search found per set (camera_ready_dmn_tf_*_0.txt, n_shot 0)
    weights = {"imagenet_c": 1.0, "imagenet_a": 3.0, "imagenet_v2": 1.0, "imagenet_r": 0.3, "imagenet_sketch": 1.0,
               "caltech101": 0.3, "dtd": 10.0, "eurosat": 0.3, "fgvc_aircraft": 1.0, "food101": 0.3,
               "flowers102": 10.0, "oxford_pets": 1.0, "stanford_cars": 0.3, "sun397": 3.0, "ucf101": 0.3}
    tip = ["a bad photo of the {}.", "a {} in a video game.", "a origami {}.", "a photo of the small {}.",
           "art of the {}.", "a photo of the large {}.", "itap of a {}."]
    for dataset, weight in weights.items():
        cfg = load_cfg(f"conf/{dataset}/dmn.yaml")
        d = cfg.DMN
        fine_grained = not dataset.startswith("imagenet")
        assert (cfg.TEST.N_AUGMENTATIONS, d.SELECTION_P, d.MEMORY_SIZE, d.BETA, d.MEMORY_WEIGHT) == \
            (32, 0.1, 50, 5.5, weight), dataset
        assert d.VIEW_AUGMENTATION == ("augmix" if fine_grained else "crop_flip"), dataset
        assert (d.PSEUDO_LABEL, d.ENTROPY_EPSILON, d.REPLACEMENT) == ("mean_probabilities", 1e-8, "lower_entropy")
        assert cfg.CLIP.PROMPT_MODE == "custom"
        assert (list(cfg.CLIP.PROMPT_TEMPLATE) == tip) == (dataset in {"caltech101", "sun397"} or not fine_grained)
    assert load_cfg("conf/stanford_cars/dmn.yaml").CLIP.PROMPT_TEMPLATE == ["a photo of a {}, a type of car."]
    for dataset in weights:          # TTA-VLM's DMN_WEAK: the same on every set
        cfg = load_cfg(f"conf/{dataset}/dmn_weak.yaml")
        d = cfg.DMN
        assert (cfg.TEST.N_AUGMENTATIONS, d.MEMORY_SIZE, d.BETA, d.MEMORY_WEIGHT, d.ENTROPY_EPSILON,
                d.REPLACEMENT, list(cfg.CLIP.PROMPT_TEMPLATE)) == (1, 50, 5.5, 1.0, 1e-5, "always",
                                                                   ["a photo of a {}."]), dataset


@pytest.mark.parametrize("config", ["dmn", "dmn_weak"])
def test_dmn_end_to_end_on_synthetic_cifar10c(tmp_path, config):
    payload = reproducible_run_on_cifar10c(tmp_path, lambda **o: _cfg(config, **o), ["gaussian_noise", "fog"], 6,
                                           TEST__BATCH_SIZE=4, TEST__N_AUGMENTATIONS=4 if config == "dmn" else 1,
                                           DMN__SELECTION_P=0.5)
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": 4 if config == "dmn" else 1,
                                                    "backward_passes_per_image": 0}
