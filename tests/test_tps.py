"""TPS (methods/tps.py) against a plain transcription of its reference's per-image loop (elaine-sui/TPS,
shift_classification.py ``test_time_adapt_eval`` / ``test_time_tuning`` / ``run_shift_iter``,
model/learnable_shift.py ``TestTimeShiftTuning``, model/shifter.py ``Shifter``, utils/save_class_embeds.py and
utils/save_concepts.py for the cached prototypes; TTA-VLM's instance_method/tps.py for TPS.SELECTION first_step)."""
import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method, load_cfg
from methods.augmentations import AugmentedViews
from methods.tps import descriptor_sentence
from tests.synthetic import tiny_cfg
from tests.test_tpt import adamw_step, reference_avg_entropy

CFG_FILE = "conf/cifar10_c/tps.yaml"
N_VIEWS, SELECTION_P = 8, 0.25          # keeps 2 views; the YAMLs' 64 / 0.1 keep 6
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "a drawing of a {}."]
DESCRIPTORS = ["a long tail", "has four legs", "used for transport", "often seen outdoors", "metallic surface"]


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "TPS__SELECTION_P": SELECTION_P, **overrides})


@pytest.fixture
def tiny_clip3():
    """The tiny CLIP with three templates, so that the prototypes are a true mean (not one unit vector)."""
    from models import build_zero_shot_clip
    torch.manual_seed(0)
    model, _ = build_zero_shot_clip(tiny_cfg(), CIFAR10_CLASSES, TEMPLATES, "cpu")
    return model


@pytest.fixture
def descriptions_file(tmp_path):
    """A descriptors JSON as the authors' gpt4_descriptors: a different number of descriptors per class."""
    path = tmp_path / "cifar10-gpt4.json"
    path.write_text(json.dumps({c: DESCRIPTORS[:2 + k % 4] for k, c in enumerate(CIFAR10_CLASSES)}))
    return str(path)


# ---------------------------------------------------------------------------------------------- the transcription
def _encode_normalised(clip, prompts):
    """save_class_embeds.py / save_concepts.py: clip.encode_text of the full 77 tokens, then F.normalize."""
    tokens = open_clip.get_tokenizer("tiny-clip-test")(prompts)
    return F.normalize(clip.encode_text(tokens), dim=-1)


def _make_descriptor_sentence(descriptor):
    if descriptor.startswith('a') or descriptor.startswith('an'):
        return f"which is {descriptor}"
    elif descriptor.startswith('has') or descriptor.startswith('often') or descriptor.startswith('typically') \
            or descriptor.startswith('may') or descriptor.startswith('can'):
        return f"which {descriptor}"
    elif descriptor.startswith('used'):
        return f"which is {descriptor}"
    else:
        return f"which has {descriptor}"


@torch.no_grad()
def _reference_text_embeds(clip, prototypes, descriptions, pooling):
    """TestTimeShiftTuning.__init__'s ``text_embeds`` (C, D), from the cached per-class embeddings."""
    class_embeds = torch.stack([_encode_normalised(clip, [t.format(c) for t in TEMPLATES]).mean(dim=0)
                                for c in CIFAR10_CLASSES])                          # load_class_embeds
    if prototypes == "templates":
        return class_embeds
    concept_embeds = torch.stack([_encode_normalised(clip, [f"{c}, " + _make_descriptor_sentence(d)
                                                            for d in descriptions[c]]).mean(dim=0)
                                  for c in CIFAR10_CLASSES])                        # load_concept_embeds
    if prototypes == "descriptions":
        return concept_embeds
    if pooling == "macro":
        n_concepts = torch.tensor([len(descriptions[c]) for c in CIFAR10_CLASSES]).unsqueeze(-1)
        n_templates = torch.ones_like(n_concepts) * len(TEMPLATES)       # the reference: 80, its template count
        return (concept_embeds * n_concepts + class_embeds * n_templates) / (n_concepts + n_templates)
    return (concept_embeds + class_embeds) / 2


def _shifted(text_embeds, shift, mutation):
    """get_text_features, Shifter.forward, then the forward's F.normalize."""
    text_features = F.normalize(text_embeds, dim=-1) if mutation != "unnormalised_prototypes" else text_embeds
    text_features = text_features + shift                                 # x += self.shift
    return F.normalize(text_features, dim=-1) if mutation != "shift_not_renormalised" else text_features


def _reference_tps(model, images, seed, steps, options, mutation=None, lr=5e-3, wd=0.01, k=2, episodic=True):
    """The per-image loop as written there: per image, the shift and optimizer reset, the views (same seed, image by
    image), every view's feature one view at a time, per step the python-sorted entropies (every step; TTA-VLM: at
    the first step only), avg_entropy, a hand-written AdamW step; then the image classified with the shifted
    prototypes. ``mutation`` changes one line (to show the comparison can fail)."""
    clip = model.clip
    text_embeds = _reference_text_embeds(clip, options.get("prototypes", "templates"), options.get("descriptions"),
                                         options.get("pooling", "micro"))
    views = AugmentedViews(N_VIEWS, options.get("augmentation", "crop_flip"), seed=seed)
    shape = text_embeds.shape if options.get("shift", "per_class") == "per_class" else text_embeds.shape[1:]
    every_step = options.get("selection", "every_step") == "every_step" and mutation != "select_once"
    zero = torch.zeros(shape)
    shift, m, v, t = zero.clone(), zero.clone(), zero.clone(), 0
    scale = clip.logit_scale.exp().item()
    outputs = []
    for image in images:
        image_views = views(image[None])[0]
        if episodic:                                                  # model.reset(); optimizer.load_state_dict
            shift, m, v, t = zero.clone(), zero.clone(), zero.clone(), 0
        feats = torch.stack([F.normalize(model.encode_image(view[None])[0], dim=-1) for view in image_views])
        feats = feats.detach()
        selected = None
        for _ in range(steps):
            shift_var = shift.clone().requires_grad_(True)
            logits = (scale * _shifted(text_embeds, shift_var, mutation) @ feats.T).T
            if selected is None or every_step:                         # select_confident_samples
                ent = [-(p * p.log()).sum().item() for p in logits.detach().softmax(-1)]
                selected = sorted(range(N_VIEWS), key=lambda i: ent[i])[:k]
            loss = reference_avg_entropy(logits[selected])
            (grad,) = torch.autograd.grad(loss, shift_var)
            t += 1
            shift, m, v = adamw_step(shift, grad, m, v, t, lr, wd)
        with torch.no_grad():
            outputs.append((scale * _shifted(text_embeds, shift, mutation) @ feats[:1].T).T)
    return torch.cat(outputs), shift


def _run(model, images, descriptions=None, **cfg):
    if descriptions is not None:
        cfg["TPS__DESCRIPTIONS"] = descriptions
    method = methods.build_method(_cfg(RNG_SEED=3, **cfg), model, 10)
    return method(images), method.shift.detach().clone(), method


def _images(n=3, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- the method
CASES = {
    "main": ({}, 1),
    "three_steps_augmix": ({"augmentation": "augmix"}, 3),
    "shared_first_step": ({"shift": "shared", "selection": "first_step"}, 2),
    "first_step_three_steps": ({"selection": "first_step"}, 3),
    "descriptions_micro": ({"prototypes": "templates_and_descriptions"}, 2),
    "descriptions_macro": ({"prototypes": "templates_and_descriptions", "pooling": "macro"}, 1),
    "descriptions_only_shared": ({"prototypes": "descriptions", "shift": "shared"}, 2),
}
KEYS = {"augmentation": "TPS__VIEW_AUGMENTATION", "shift": "TPS__SHIFT", "selection": "TPS__SELECTION",
        "prototypes": "TPS__PROTOTYPES", "pooling": "TPS__POOLING"}


@pytest.mark.parametrize("case", CASES)
def test_tps_matches_plain_reference(tiny_clip3, descriptions_file, case):
    options, steps = CASES[case]
    reference_model = copy.deepcopy(tiny_clip3)
    images = _images()
    uses_file = options.get("prototypes", "templates") != "templates"
    out, shift, method = _run(tiny_clip3, images, descriptions_file if uses_file else None, OPTIM__STEPS=steps,
                              **{KEYS[k]: v for k, v in options.items()})
    assert method.views_per_image == N_VIEWS and method.n_selected == 2
    descriptions = json.loads(open(descriptions_file).read())
    ref_out, ref_shift = _reference_tps(reference_model, images, 3, steps, {**options, "descriptions": descriptions})
    # measured: logits within 5.5e-6, shift within 1.1e-6 (shared shift; per class 7e-8): fp32 rounding of the
    # truncated text tokens and the batched views, which Adam's normalised step carries into the shift
    torch.testing.assert_close(out, ref_out, atol=3e-5, rtol=0)
    torch.testing.assert_close(shift, ref_shift, atol=5e-6, rtol=0)
    assert shift.abs().max() > 1e-3                          # not vacuous: the shift moved
    with torch.no_grad():
        assert (out - tiny_clip3(images)).abs().max() > 1e-3   # ... and the prediction moved with it


def test_not_episodic_carries_the_shift_over(tiny_clip3):
    reference_model = copy.deepcopy(tiny_clip3)
    images = _images()
    out, shift, _ = _run(tiny_clip3, images, MODEL__EPISODIC=False, OPTIM__STEPS=2)
    ref_out, ref_shift = _reference_tps(reference_model, images, 3, 2, {}, episodic=False)
    torch.testing.assert_close(out, ref_out, atol=3e-5, rtol=0)
    torch.testing.assert_close(shift, ref_shift, atol=5e-6, rtol=0)


@pytest.mark.parametrize("mutation", ["select_once", "unnormalised_prototypes", "shift_not_renormalised"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip3, mutation):
    """Choosing the views once instead of every step, adding the shift to the unnormalised prototype mean, or
    not renormalising the shifted prototype: each moves the shift far beyond the comparison's tolerance."""
    reference_model = copy.deepcopy(tiny_clip3)
    images = _images()
    out, shift, _ = _run(tiny_clip3, images, OPTIM__STEPS=3)
    ref_out, ref_shift = _reference_tps(reference_model, images, 3, 3, {}, mutation=mutation)
    # measured: logits 3e-2, 0.16 and 7e-2 away (select_once leaves the last image's shift alone: its views
    # happen to keep their ranks, but an earlier image's do not)
    assert (out - ref_out).abs().max() > 100 * 3e-5
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, ref_out, atol=3e-5, rtol=0)


def test_descriptor_sentence_is_the_authors():
    for d in ["a long tail", "angular wings", "an eye", "has fur", "often wet", "typically red", "may fly",
              "can swim", "used for work", "stripes", ""]:
        assert descriptor_sentence(d) == _make_descriptor_sentence(d), d


def test_a_batch_of_four_gives_what_four_batches_of_one_give(tiny_clip3):
    images = _images(4, seed=1)
    cfg = _cfg(RNG_SEED=3, TPS__VIEW_AUGMENTATION="augmix", OPTIM__STEPS=2)
    batched = methods.build_method(cfg, copy.deepcopy(tiny_clip3), 10)
    single = methods.build_method(cfg, tiny_clip3, 10)
    out4 = batched(images)
    out1 = torch.cat([single(b) for b in images.split(1)])
    torch.testing.assert_close(out4, out1, atol=1e-5, rtol=1e-6)   # the same views; encoder batching only
    assert out4.argmax(1).tolist() == out1.argmax(1).tolist()


@pytest.mark.parametrize("shift,entries", [("per_class", 10 * 32), ("shared", 32)])
def test_only_the_shift_changes(tiny_clip, shift, entries):
    method = methods.build_method(_cfg(TPS__SHIFT=shift), tiny_clip, 10)
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    assert method.param_names == ["shift"] and method.num_trainable_params() == entries
    method(torch.rand(2, 3, 32, 32))
    after = tiny_clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert method.shift.detach().abs().max() > 0
    assert list(method._snapshot["module"]) == ["shift"]          # the prototypes are frozen: never copied


def test_reset_restores_all_state_exactly(tiny_clip):
    cfg = _cfg(MODEL__EPISODIC=False)       # the shift carries over between images, so reset has work to do
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    method = methods.build_method(cfg, tiny_clip, 10)
    images = torch.rand(2, 3, 32, 32)
    expected = fresh(images)
    method(torch.rand(3, 3, 32, 32))
    method(torch.rand(1, 3, 32, 32))
    assert method.optimizer.state_dict()["state"] and method.shift.detach().abs().max() > 0
    method.reset()
    assert torch.equal(method.shift, torch.zeros_like(method.shift))
    assert method.optimizer.state_dict()["state"] == {}
    assert torch.equal(method.views.rng_state(), AugmentedViews(N_VIEWS, seed=cfg.RNG_SEED).rng_state())
    assert method.performed_updates == 0
    assert torch.equal(method(images), expected)


def test_bad_tps_config_is_refused(tmp_path, descriptions_file):
    for key, value, match in [("TPS__SHIFT", "per_view", "TPS.SHIFT"), ("TPS__PROTOTYPES", "cupl", "TPS.PROTOTYPES"),
                              ("TPS__POOLING", "max", "TPS.POOLING"), ("TPS__SELECTION", "never", "TPS.SELECTION"),
                              ("TPS__SELECTION_P", 0.1, "TPS.SELECTION_P"),
                              ("TPS__SELECTION_P", 0.0, "TPS.SELECTION_P"),
                              ("TPS__VIEW_AUGMENTATION", "mixup", "TPS.VIEW_AUGMENTATION")]:
        with pytest.raises(ConfigError, match=match):
            check_method(_cfg(**{key: value}))
    with pytest.raises(ConfigError, match="TPS.PROTOTYPES templates_and_descriptions needs TPS.DESCRIPTIONS"):
        check_method(_cfg(TPS__PROTOTYPES="templates_and_descriptions"))
    with pytest.raises(ConfigError, match="is given but TPS.PROTOTYPES templates does not read it"):
        check_method(_cfg(TPS__DESCRIPTIONS=descriptions_file))
    with pytest.raises(ConfigError, match="TPS.DESCRIPTIONS"):
        check_method(_cfg(TPS__PROTOTYPES="descriptions", TPS__DESCRIPTIONS=str(tmp_path / "missing.json")))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"airplane": ["wings"]}))
    with pytest.raises(ConfigError, match="no non-empty list of descriptors for class 'automobile'"):
        check_method(_cfg(TPS__PROTOTYPES="descriptions", TPS__DESCRIPTIONS=str(partial)))
    check_method(_cfg(TPS__PROTOTYPES="descriptions", TPS__DESCRIPTIONS=descriptions_file))


def test_shipped_configs_are_the_authors_main_run():
    for dataset, views in [("imagenet_c", "crop_flip"), ("imagenet_a", "crop_flip"), ("imagenet_sketch", "crop_flip"),
                           ("dtd", "augmix"), ("eurosat", "augmix"), ("cifar10_c", "crop_flip")]:
        cfg = load_cfg(f"conf/{dataset}/tps.yaml")
        assert cfg.TPS.VIEW_AUGMENTATION == views, dataset
        assert (cfg.TPS.SHIFT, cfg.TPS.PROTOTYPES, cfg.TPS.SELECTION, cfg.CLIP.PROMPT_MODE) == \
            ("per_class", "templates", "every_step", "ensemble"), dataset
        assert (cfg.TEST.N_AUGMENTATIONS, cfg.TPS.SELECTION_P, cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.OPTIM.STEPS,
                cfg.MODEL.EPISODIC) == (64, 0.1, "AdamW", 5e-3, 1, True), dataset
