import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES, CIFAR_TEMPLATES
from harness.build import check_method
from methods.augmentations import AugmentedViews
from models.clip import ZeroShotCLIP
from tests.synthetic import reproducible_run_on_cifar10c, tiny_cfg

CFG_FILE = "conf/cifar10_c/vte.yaml"
N_VIEWS, SELECTION_P = 8, 0.25          # keeps 2 views; the YAMLs' 64 / 0.1 keep 6



def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "VTE__SELECTION_P": SELECTION_P, **overrides})


@pytest.fixture
def ensemble_clip(tiny_clip):
    """The tiny CLIP with the 18 CIFAR templates, as the VTE YAML's CLIP.PROMPT_MODE ensemble builds it."""
    return ZeroShotCLIP(tiny_clip.clip, open_clip.get_tokenizer("tiny-clip-test"), CIFAR10_CLASSES,
                        CIFAR_TEMPLATES, tiny_clip.mean.flatten().tolist(), tiny_clip.std.flatten().tolist())


@torch.no_grad()
def _reference_vte(clip, mean, std, images, seed, augmentation="crop_flip", k=2):
    """VTE written out plainly: untruncated text tower per template, views of the same seed encoded one at a
    time, python-sorted entropies, mean of the k most confident normalised features (not renormalised)."""
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    text = []
    for name in CIFAR10_CLASSES:
        per_template = [F.normalize(clip.encode_text(tokenizer([t.format(name)]))[0], dim=-1) for t in CIFAR_TEMPLATES]
        text.append(F.normalize(torch.stack(per_template).mean(0), dim=-1))
    text = torch.stack(text)
    scale = clip.logit_scale.exp()
    outputs = []
    for image_views in AugmentedViews(N_VIEWS, augmentation, seed=seed)(images):
        feats = [F.normalize(clip.encode_image((view[None] - mean) / std)[0], dim=-1) for view in image_views]
        entropies = [-(p * p.log()).sum().item() for p in [(scale * f @ text.t()).softmax(-1) for f in feats]]
        chosen = sorted(range(len(feats)), key=lambda i: entropies[i])[:k]
        ensembled = torch.stack([feats[i] for i in chosen]).mean(0)
        outputs.append(scale * ensembled @ text.t())
    return torch.stack(outputs)


@pytest.mark.parametrize("augmentation", ["crop_flip", "augmix"])
def test_vte_matches_plain_reference(ensemble_clip, augmentation):
    method = methods.build_method(_cfg(RNG_SEED=5, VTE__VIEW_AUGMENTATION=augmentation), ensemble_clip, 10)
    assert method.views_per_image == N_VIEWS and method.n_selected == 2
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    out = method(images)
    ref = _reference_vte(ensemble_clip.clip, ensemble_clip.mean, ensemble_clip.std, images, seed=5,
                         augmentation=augmentation)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_single_view_is_the_zero_shot_ensemble_prediction(ensemble_clip):
    # one view, all of it kept: the original image itself, its normalised feature, the ensemble head
    method = methods.build_method(_cfg(TEST__N_AUGMENTATIONS=1, VTE__SELECTION_P=1.0), ensemble_clip, 10)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method(images), ensemble_clip(images), atol=1e-5, rtol=1e-5)


def test_vte_changes_no_state(ensemble_clip):
    method = methods.build_method(_cfg(), ensemble_clip, 10)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    assert any(k.startswith("model.clip.") for k in before) and method.num_trainable_params() == 0
    method(torch.rand(2, 3, 32, 32))
    after = method.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_reset_restores_all_state_exactly(ensemble_clip):
    cfg = _cfg()
    fresh = methods.build_method(cfg, copy.deepcopy(ensemble_clip), 10)
    method = methods.build_method(cfg, ensemble_clip, 10)
    images = torch.rand(2, 3, 32, 32)
    expected = fresh(images)
    assert not torch.equal(method(images), method(images))            # the view stream moves on ...
    method.reset()
    assert torch.equal(method.views.rng_state(), AugmentedViews(N_VIEWS, seed=cfg.RNG_SEED).rng_state())
    assert torch.equal(method(images), expected)                       # ... and reset() restarts it


def test_bad_vte_config_is_refused(ensemble_clip):
    with pytest.raises(ConfigError, match="VTE.SELECTION_P"):
        check_method(_cfg(VTE__SELECTION_P=0.1))
    with pytest.raises(ConfigError, match="VTE.VIEW_AUGMENTATION"):
        check_method(_cfg(VTE__VIEW_AUGMENTATION="mixup"))


def test_vte_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise", "fog"], 4, TEST__BATCH_SIZE=3)
    assert payload["provenance"]["model"]["num_templates"] == len(CIFAR_TEMPLATES) == 18
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": N_VIEWS, "backward_passes_per_image": 0}
