import copy
import sys
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method
from methods.augmentations import AugmentedViews
from methods.dpe import PrototypeCache, alignment_loss, cache_logits
from tests.synthetic import reproducible_run_on_cifar10c, tiny_cfg

N_VIEWS, SELECTION_P, CAPACITY = 8, 0.25, 2          # keeps 2 of 8 views; queues of 2 fill and replace quickly
N_IMAGES = 30
# Strong enough to move predictions on the tiny CLIP; the threshold lets some images update the textual
# prototypes and others not (checked in the test).
OPTIONS = {"DPE__SHOT_CAPACITY": CAPACITY, "DPE__ALPHA": 0.5, "DPE__BETA": 4.0, "DPE__LR_TEXT": 0.002,
           "DPE__LR_IMAGE": 0.004, "DPE__ALIGN_WEIGHT": 0.3, "DPE__ALIGN_TEMPERATURE": 0.05,
           "DPE__TEXT_UPDATE_THRESHOLD": 0.62}


def _cfg(**overrides):
    """The tests' DPE: textual prototypes from the templates alone unless a test gives a CuPL file; the tiny CLIP's
    own logit scale (its learned one is far from 100) unless a test asks for the reference's fixed 100."""
    return tiny_cfg(**{"MODEL__ADAPTATION": "dpe", "TEST__N_AUGMENTATIONS": N_VIEWS, "DPE__SELECTION_P": SELECTION_P,
                       "DPE__TEXT_PROTOTYPES": "templates", "DPE__LOGIT_SCALE": "model", **OPTIONS, **overrides})


def _cupl_cfg(path, **overrides):
    return _cfg(DPE__TEXT_PROTOTYPES="templates_and_cupl", DPE__CUPL_PROMPTS=str(path), **overrides)


def _images(n=N_IMAGES, seed=5):
    """Images of a few dominant colours, so the tiny CLIP's pseudo-labels spread over several classes."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.rand(n, 3, 32, 32, generator=g) + 0.7 * torch.rand(n, 3, 1, 1, generator=g)


def _entropy(logits):
    p = logits.softmax(-1)
    return -(p * p.log()).sum()


def _reference_dpe(model, images, *, n_views=N_VIEWS, k=2, capacity=CAPACITY, alpha=0.5, beta=4.0, lr_text=0.002,
                   lr_image=0.004, align=0.3, temperature=0.05, threshold=0.62, normaliser="log2", steps=1,
                   predict_from="image", seed=1, text=None, scale=None):
    """DPE written out plainly, image by image: views drawn per image with the method's seed and encoded one at a
    time, python-sorted entropies, queues as python lists of (feature, score) kept sorted by ``sorted``, the
    residuals as plain tensors optimised by a new torch.optim.AdamW each step, cache logits and InfoNCE as loops."""
    num_classes = model.num_classes
    scale = model.clip.logit_scale.exp().item() if scale is None else scale
    views = AugmentedViews(n_views, seed=seed)
    text_global = (model.text_features()[0] if text is None else text).detach().clone()
    max_entropy = math.log2(num_classes) if normaliser == "log2" else math.log(num_classes)
    cache, n_updates, outputs, events = {}, 0, [], {"append": 0, "replace": 0, "reject": 0}

    def cache_terms(query, keys, classes):
        terms = [torch.zeros(()) for _ in range(num_classes)]
        for j, c in enumerate(classes):
            terms[c] = alpha * torch.exp(-beta * (1 - query @ keys[j]))
        return torch.stack(terms)

    def confident(logits, count):
        ent = [_entropy(row).item() for row in logits]
        return sorted(range(len(ent)), key=lambda i: ent[i])[:count]

    for image in images:
        image_views = views(image[None])[0]
        with torch.no_grad():
            feats = torch.stack([F.normalize(model.encode_image(v[None])[0], dim=-1) for v in image_views])
            logits = scale * feats @ F.normalize(text_global, dim=-1).t()
        selected = confident(logits, k)
        mean_p = logits[selected].softmax(-1).mean(0)
        score = (-(mean_p * mean_p.log()).sum() / max_entropy).item()
        pred = int(logits[selected].mean(0).argmax())
        query = feats[selected].mean(0)
        queue = cache.setdefault(pred, [])
        if len(queue) < capacity:
            queue.append((query, score))
            events["append"] += 1
        elif score < queue[-1][1]:
            queue[-1] = (query, score)
            events["replace"] += 1
        else:
            events["reject"] += 1
        cache[pred] = sorted(queue, key=lambda item: item[1])
        classes = sorted(cache)
        keys = torch.stack([sum(f for f, _ in cache[c]) / len(cache[c]) for c in classes])

        text_residual = torch.zeros_like(text_global, requires_grad=True)
        visual_residual = torch.zeros_like(keys, requires_grad=True)
        for _ in range(steps):
            text_now = F.normalize(text_global + text_residual, dim=-1)
            keys_now = F.normalize(keys + visual_residual, dim=-1)
            final = (scale * feats[selected] @ text_now.t()).mean(0) + cache_terms(query, keys_now, classes)
            loss = _entropy(final)
            nce = []
            for a in range(len(classes)):
                sims = torch.stack([F.cosine_similarity(keys_now[a], text_now[classes[b]], dim=0)
                                    for b in range(len(classes))]) / temperature
                nce.append(-(sims.log_softmax(0)[a]))
            loss = loss + align * torch.stack(nce).mean()
            optimizer = torch.optim.AdamW([{"params": [text_residual], "lr": lr_text},
                                           {"params": [visual_residual], "lr": lr_image}],
                                          eps=1e-3, weight_decay=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            text_now = F.normalize(text_global + text_residual, dim=-1)
            keys_now = F.normalize(keys + visual_residual, dim=-1)
            all_views = scale * feats @ text_now.t()
            if predict_from == "image":
                query_now, clip_logits = feats[0], all_views[0]
            else:
                again = confident(all_views, k)
                query_now, clip_logits = feats[again].mean(0), all_views[again].mean(0)
            final = clip_logits + cache_terms(query_now, keys_now, classes)
            if _entropy(final).item() / max_entropy < threshold:
                n_updates += 1
                text_global = text_global * (n_updates / (n_updates + 1)) + text_now * (1 / (n_updates + 1))
        outputs.append(final)
    return torch.stack(outputs), {"cache": cache, "text": text_global, "updates": n_updates, "events": events}


def _assert_state_matches(method, state):
    torch.testing.assert_close(method.text_prototypes, state["text"], atol=2e-5, rtol=1e-4)
    assert int(method.text_updates) == state["updates"]
    cache = method.cache
    assert [int(n) for n in cache.counts] == [len(state["cache"].get(c, [])) for c in range(10)]
    for c, queue in state["cache"].items():
        scores = torch.tensor([s for _, s in queue], dtype=torch.float64)
        torch.testing.assert_close(cache.scores[c, :len(queue)], scores, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cache.keys[c, :len(queue)], torch.stack([f for f, _ in queue]),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [
    {},                                                                          # the defaults of the YAMLs
    {"OPTIM__STEPS": 2, "DPE__PREDICT_FROM": "confident_views"},                 # ImageNet-A's prediction
    {"DPE__ENTROPY_NORMALISER": "ln", "DPE__TEXT_UPDATE_THRESHOLD": 0.89},        # a true normalised entropy
    {"DPE__LOGIT_SCALE": "fixed_100", "DPE__TEXT_UPDATE_THRESHOLD": 0.05},        # the reference's 100 * cos
])
def test_dpe_matches_plain_reference(tiny_clip, case):
    reference_model = copy.deepcopy(tiny_clip)
    method = methods.build_method(_cfg(RNG_SEED=1, **case), tiny_clip, 10)
    assert method.n_selected == 2 and method.views_per_image == N_VIEWS
    images = _images()
    out = torch.cat([method(batch) for batch in images.split(3)])
    ref_out, state = _reference_dpe(
        reference_model, images, steps=case.get("OPTIM__STEPS", 1),
        predict_from=case.get("DPE__PREDICT_FROM", "image"), normaliser=case.get("DPE__ENTROPY_NORMALISER", "log2"),
        threshold=case.get("DPE__TEXT_UPDATE_THRESHOLD", 0.62),
        scale=100.0 if case.get("DPE__LOGIT_SCALE") == "fixed_100" else None)
    # The run exercised everything: queues filled, replaced and rejected; several classes queued; some images
    # evolved the textual prototypes and some did not.
    events = state["events"]
    assert events["replace"] > 0 and events["reject"] > 0 and len(state["cache"]) >= 3, events
    assert 0 < state["updates"] < N_IMAGES, state["updates"]
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=1e-4)
    assert torch.equal(out.argmax(1), ref_out.argmax(1))
    _assert_state_matches(method, state)


def test_the_adaptation_changes_the_predictions(tiny_clip):
    """Guard against a reference comparison that passes because nothing happens: the residuals and the
    prototypes change the logits against zero-shot CLIP plus the cache logits of the unadapted prototypes."""
    images = _images()
    adapted = methods.build_method(_cfg(RNG_SEED=1), copy.deepcopy(tiny_clip), 10)(images)
    frozen = methods.build_method(_cfg(RNG_SEED=1, DPE__LR_TEXT=0.0, DPE__LR_IMAGE=0.0,
                                       DPE__TEXT_UPDATE_THRESHOLD=0.0), copy.deepcopy(tiny_clip), 10)(images)
    with torch.no_grad():
        zero_shot = tiny_clip(images)
    assert (adapted - frozen).abs().max() > 1e-2
    assert (frozen - zero_shot).abs().max() > 1e-2          # the cache logits alone


def test_a_batch_of_four_gives_what_four_batches_of_one_give(tiny_clip):
    images = _images(12)
    batched = methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10)
    single = methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10)
    out4 = torch.cat([batched(b) for b in images.split(4)])
    out1 = torch.cat([single(b) for b in images.split(1)])
    torch.testing.assert_close(out4, out1, atol=1e-6, rtol=1e-6)
    assert torch.equal(out4.argmax(1), out1.argmax(1))
    for key, value in batched.state_dict().items():
        torch.testing.assert_close(value, single.state_dict()[key], atol=1e-6, rtol=1e-6)


def test_a_single_view_keeps_the_image_itself(tiny_clip):
    """TEST.N_AUGMENTATIONS 1 (the reference's fine-grained sets): no selection, the image is its own query."""
    reference_model = copy.deepcopy(tiny_clip)
    method = methods.build_method(_cfg(TEST__N_AUGMENTATIONS=1, RNG_SEED=1), tiny_clip, 10)
    assert method.n_selected == 1
    images = _images(20)
    out = method(images)
    ref_out, state = _reference_dpe(reference_model, images, n_views=1, k=1)
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=1e-4)
    _assert_state_matches(method, state)


def test_prototype_cache_keeps_sorted_queues_like_python_lists():
    torch.manual_seed(0)
    cache = PrototypeCache(num_classes=3, capacity=3, dim=4)
    reference = {}
    for step in range(60):
        label = int(torch.randint(0, 3, ()))
        score = float(torch.randint(1, 6, ())) / 10            # few distinct scores: ties are frequent
        feature = torch.full((4,), float(step))
        cache.insert(label, feature, score)
        queue = reference.setdefault(label, [])
        if len(queue) < 3:
            queue.append((feature, score))
        elif score < queue[-1][1]:
            queue[-1] = (feature, score)
        reference[label] = sorted(queue, key=lambda item: item[1])
    for label, queue in reference.items():
        assert cache.scores[label].tolist() == pytest.approx([s for _, s in queue])
        assert cache.keys[label, :, 0].tolist() == [f[0].item() for f, _ in queue]   # ties: older first
    classes, prototypes = cache.prototypes()
    assert classes.tolist() == sorted(reference)
    for j, label in enumerate(classes.tolist()):
        torch.testing.assert_close(prototypes[j], torch.stack([f for f, _ in reference[label]]).mean(0))


def test_cache_logits_and_alignment_loss_by_hand():
    query = torch.tensor([[0.6, 0.8]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = cache_logits(query, prototypes, torch.tensor([1, 3]), num_classes=4, alpha=2.0, beta=3.0)
    expected = [0.0, 2.0 * math.exp(-3.0 * 0.4), 0.0, 2.0 * math.exp(-3.0 * 0.2)]
    torch.testing.assert_close(out, torch.tensor([expected]))
    visual = torch.tensor([[2.0, 0.0], [0.0, 1.0]])               # renormalised inside, as info-nce-pytorch
    textual = torch.tensor([[0.6, 0.8], [0.0, 3.0]])
    t = 0.5
    row0 = [0.6 / t, 0.0 / t]
    row1 = [0.8 / t, 1.0 / t]
    nll = [-(row0[0] - math.log(sum(math.exp(v) for v in row0))), -(row1[1] - math.log(sum(math.exp(v) for v in row1)))]
    assert alignment_loss(visual, textual, t).item() == pytest.approx(sum(nll) / 2, rel=1e-6)


def test_reset_restores_all_state_exactly(tiny_clip):
    cfg = _cfg()
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    fresh_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    method = methods.build_method(cfg, tiny_clip, 10)
    images = _images(10)
    first = method(images)
    assert int(method.cache.counts.sum()) > 0 and int(method.text_updates) > 0     # something to restore
    method.reset()
    state = method.state_dict()
    assert state.keys() == fresh_state.keys()
    for key, value in state.items():
        assert torch.equal(value, fresh_state[key]), key
    assert {"text_prototypes", "text_updates", "cache.keys", "cache.scores", "cache.counts"} <= set(state)
    assert torch.equal(method.views.rng_state(), AugmentedViews(N_VIEWS, seed=cfg.RNG_SEED).rng_state())
    assert torch.equal(method(images), first)                            # replays bit for bit
    assert torch.equal(fresh(images), first)


def test_same_seed_same_output_and_clip_untouched(tiny_clip):
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    images = _images(8)
    a = methods.build_method(_cfg(RNG_SEED=3), tiny_clip, 10)(images)
    assert all(torch.equal(v, before[k]) for k, v in tiny_clip.state_dict().items())
    assert all(not p.requires_grad for p in tiny_clip.parameters())
    b = methods.build_method(_cfg(RNG_SEED=3), copy.deepcopy(tiny_clip), 10)(images)
    c = methods.build_method(_cfg(RNG_SEED=4), copy.deepcopy(tiny_clip), 10)(images)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)                                         # other views


def test_episodic_forgets_the_queues_and_prototypes_before_every_image(tiny_clip):
    method = methods.build_method(_cfg(MODEL__EPISODIC=True, RNG_SEED=1), copy.deepcopy(tiny_clip), 10)
    images = _images(6)
    out = method(images)
    assert int(method.cache.counts.sum()) == 1
    views = AugmentedViews(N_VIEWS, seed=1)
    for i, image in enumerate(images):       # each image as the first image of a fresh method, same views
        fresh = methods.build_method(_cfg(RNG_SEED=1), copy.deepcopy(tiny_clip), 10)
        fresh.views = copy.deepcopy(views)
        torch.testing.assert_close(out[i:i + 1], fresh(image[None]), atol=1e-6, rtol=1e-6)
        views(image[None])


def _cupl_file(tmp_path, names=CIFAR10_CLASSES):
    descriptions = {n.replace("_", " "): [f"A {n} seen from afar.", f"Some {n} in the wild."] for n in names}
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(descriptions))
    return path


def test_cupl_descriptions_join_the_templates(tiny_clip, tmp_path):
    path = _cupl_file(tmp_path)
    method = methods.build_method(_cupl_cfg(path), copy.deepcopy(tiny_clip), 10)
    clip = tiny_clip.clip
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    descriptions = json.loads(path.read_text())
    expected = []
    for name in CIFAR10_CLASSES:
        texts = [f"a photo of a {name}."] + descriptions[name]
        with torch.no_grad():
            features = F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)   # untruncated 77 tokens
        expected.append(F.normalize(features.mean(0), dim=-1))
    torch.testing.assert_close(method.text_prototypes, torch.stack(expected), atol=1e-5, rtol=1e-5)
    plain = methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10)
    assert (plain.text_prototypes - method.text_prototypes).abs().max() > 1e-3
    torch.testing.assert_close(plain.text_prototypes, tiny_clip.text_features()[0])


def test_bad_dpe_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="DPE.SELECTION_P"):
        check_method(_cfg(DPE__SELECTION_P=0.1))                     # int(8 * 0.1) = 0 views
    with pytest.raises(ConfigError, match="DPE.VIEW_AUGMENTATION = 'mixup'"):
        _cfg(DPE__VIEW_AUGMENTATION="mixup")
    with pytest.raises(ConfigError, match="DPE.ENTROPY_NORMALISER = 'log10'"):
        _cfg(DPE__ENTROPY_NORMALISER="log10")
    with pytest.raises(ConfigError, match="DPE.PREDICT_FROM = 'views'"):
        _cfg(DPE__PREDICT_FROM="views")
    with pytest.raises(ConfigError, match="DPE.SHOT_CAPACITY = 0"):
        _cfg(DPE__SHOT_CAPACITY=0)
    with pytest.raises(ConfigError, match="DPE.CUPL_PROMPTS = '.*missing.json': no such file"):
        check_method(_cupl_cfg(tmp_path / "missing.json"))
    partial = _cupl_file(tmp_path, CIFAR10_CLASSES[:9])
    with pytest.raises(ConfigError, match="no list of descriptions for class 'truck'"):
        check_method(_cupl_cfg(partial))
    # the reference's prototypes need its CuPL file: no silent fall-back to the templates alone
    with pytest.raises(ConfigError, match=r"DPE.TEXT_PROTOTYPES templates_and_cupl .* needs DPE.CUPL_PROMPTS: .*"
                                          r"gpt3_prompts/CuPL_prompts_<set>.json; or set DPE.TEXT_PROTOTYPES "
                                          r"templates"):
        check_method(_cfg(DPE__TEXT_PROTOTYPES="templates_and_cupl"))
    with pytest.raises(ConfigError, match=r"CuPL_prompts_imagenet.json"):
        check_method(tiny_cfg("conf/imagenet_a/dpe.yaml"))
    with pytest.raises(ConfigError, match="is given but DPE.TEXT_PROTOTYPES templates does not read it"):
        check_method(_cfg(DPE__CUPL_PROMPTS=str(_cupl_file(tmp_path))))
    with pytest.raises(ConfigError, match="DPE.TEXT_PROTOTYPES = 'cupl'"):
        _cfg(DPE__TEXT_PROTOTYPES="cupl")
    check_method(_cfg(TEST__N_AUGMENTATIONS=1, DPE__SELECTION_P=0.1))   # one view: the image itself


def test_unused_optim_keys_are_named():
    from methods.dpe import DPE
    assert DPE.config_warnings(_cfg()) == []
    (warning,) = DPE.config_warnings(_cfg(OPTIM__LR=0.01, OPTIM__WD=0.5))
    assert "OPTIM.LR 0.01" in warning and "OPTIM.WD 0.5" in warning and "DPE.LR_TEXT" in warning


def test_dpe_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise"], 6, TEST__BATCH_SIZE=4)
    assert payload["provenance"]["method_cost"] == {"views_per_image": N_VIEWS, "backward_passes_per_image": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_follows_the_cpu_run(tiny_clip):
    images = _images(12)
    cpu = methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10)(images)
    gpu_method = methods.build_method(_cfg(DEVICE="cuda"), copy.deepcopy(tiny_clip).cuda(), 10)
    assert gpu_method.residual_dtype() == torch.float16
    assert gpu_method.precision_info()["autocast"] == "float16"
    assert gpu_method.precision_info()["grad_scaler_init"] is None
    gpu = gpu_method(images.cuda()).cpu()
    assert (gpu.argmax(1) == cpu.argmax(1)).float().mean() >= 0.75
    torch.testing.assert_close(gpu, cpu, atol=0.1, rtol=0.05)


def test_at_alpha_15_on_one_view_the_update_follows_the_references_entropy(tiny_clip, monkeypatch):
    """DPE's caltech101 regime (ALPHA 15, the fixed 100 scale; one view, the image itself): the final logits are
    nearly one-hot and the fp32 gradient of their entropy is mostly rounding (tests/test_tpt.py measures it against
    fp64). The method's update is the reference's, whose entropy is TPT's avg_entropy (x - logsumexp(x)): the plain
    loop with that formula agrees; with the same entropy written p log p (the same value) it does not."""
    from tests.test_tpt import reference_avg_entropy
    images = _images()
    case = dict(DPE__ALPHA=15.0, DPE__LOGIT_SCALE="fixed_100", TEST__N_AUGMENTATIONS=1, DPE__SELECTION_P=1.0)
    method = methods.build_method(_cfg(RNG_SEED=1, **case), copy.deepcopy(tiny_clip), 10)
    out = torch.cat([method(batch) for batch in images.split(3)])
    found = {}
    for name, entropy in (("p log p", _entropy), ("reference", lambda final: reference_avg_entropy(final[None]))):
        monkeypatch.setattr(sys.modules[__name__], "_entropy", entropy)
        found[name] = _reference_dpe(copy.deepcopy(tiny_clip), images, n_views=1, k=1, alpha=15.0, scale=100.0)
    reference, state = found["reference"]
    torch.testing.assert_close(out, reference, atol=1e-3, rtol=0)
    torch.testing.assert_close(method.text_prototypes, state["text"], atol=1e-5, rtol=0)
    assert float((out - found["p log p"][0]).abs().max()) > 5e-3      # the regime: the formula decides the update
