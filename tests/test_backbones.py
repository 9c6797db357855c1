"""Backbones: every registered method on the tiny CLIP of every model family (models.FAMILIES), and what the suite
knows of the real open_clip architectures of each family.

On each family a method either keeps the whole contract of tests/test_method_contract.py (builds, two batches,
reset replays, ...) or its check_setup refuses the architecture in one line, before any model loads, naming the
method, MODEL.ARCH and the tower or family; nothing else (no error from inside the model)."""
import importlib.util

import open_clip
import pytest
import timm
import torch

import methods
from conf import ConfigError, config_names
from harness.build import check_method
from harness.identity import config_hash, identity_keys
from models import build_zero_shot_clip, model_spec, resolve_model_weights
from models.architectures import FAMILIES, WeightsError, register_model_configs
from models.weights import resolve_weights
from tests.synthetic import tiny_cfg
from tests.test_method_contract import check_contract, contract_cfg, models_by_dataset, suite_methods  # noqa: F401

# The tiny CLIP of each family (models/model_configs/; the timm towers in models/tiny_towers.py).
TINY_ARCH_BY_FAMILY = {"vit": "tiny-clip-test", "resnet": "tiny-clip-test-rn64", "timm": "tiny-clip-test-eva",
                       "siglip": "tiny-clip-test-sigmoid"}
# Data sets whose configs stand for a method, smallest class list first.
PREFERRED_DATASETS = ("shapes_c", "cifar10_c", "imagenet_c")


def representative_config(method: str) -> str:
    """A shipped composition of ``method``: its config named after it (every method has one:
    test_representative_configs_run_their_method) on the first of PREFERRED_DATASETS it is shipped for."""
    names = [n for n in config_names() if n.split("/")[1] == method]
    rank = {d: k for k, d in enumerate(PREFERRED_DATASETS)}
    return min(names, key=lambda n: (rank.get(n.split("/")[0], len(rank)), n))


def test_representative_configs_run_their_method():
    for method in suite_methods():
        assert methods.METHODS.canonical(contract_cfg(representative_config(method)).MODEL.ADAPTATION) == method


def test_every_family_has_a_tiny_clip_of_that_family():
    assert set(TINY_ARCH_BY_FAMILY) == set(FAMILIES)
    for family, arch in TINY_ARCH_BY_FAMILY.items():
        spec = model_spec(arch)
        assert spec.family == family


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(suite_methods()))
def test_method_runs_or_refuses_the_family(method, family, models_by_dataset):
    arch = TINY_ARCH_BY_FAMILY[family]
    cfg = contract_cfg(representative_config(method), MODEL__ARCH=arch)
    try:
        check_method(cfg)
    except ConfigError as refusal:
        message, spec = str(refusal), model_spec(arch)
        assert "\n" not in message
        assert f"MODEL.ARCH={arch}" in message and method.lower() in message.lower(), message
        assert spec.family in message.lower() or spec.image_tower in message.lower(), message
        return
    check_contract(cfg, models_by_dataset)


# The real open_clip architecture of each family the issue names: (arch, family, image tower, ViT blocks, text tower).
REAL_ARCHITECTURES = [
    ("ViT-B-32", "vit", "vit", 12, "clip"),
    ("ViT-B-16", "vit", "vit", 12, "clip"),
    ("ViT-L-14", "vit", "vit", 24, "clip"),
    ("RN50", "resnet", "resnet", None, "clip"),
    ("EVA02-B-16", "timm", "timm", None, "custom"),
    ("ViT-B-16-SigLIP", "siglip", "timm", None, "custom"),
]


@pytest.mark.parametrize("arch, family, tower, blocks, text_tower", REAL_ARCHITECTURES)
def test_model_spec_classifies_the_real_architectures(arch, family, tower, blocks, text_tower):
    spec = model_spec(arch)
    assert (spec.family, spec.image_tower, spec.vision_layers, spec.text_tower) == (family, tower, blocks, text_tower)
    assert spec.has_logit_bias == (family == "siglip")


@pytest.mark.parametrize("arch, family, tower, blocks, text_tower", REAL_ARCHITECTURES)
def test_real_weights_are_never_replaced_by_random_ones(arch, family, tower, blocks, text_tower, tmp_path,
                                                        monkeypatch):
    """A pretrained tag that is not cached, without download, is refused in words; an unknown tag names the known
    ones (the weights a run of this family can use). The tokenizer's check, which comes first, has its own test."""
    monkeypatch.setattr("models.weights.check_tokenizer", lambda arch: None)
    tag = open_clip.list_pretrained_tags_by_model(arch)[0]
    with pytest.raises(WeightsError, match=f"'{arch}' / pretrained tag '{tag}' are not in the local cache"):
        resolve_weights(arch, tag, cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(WeightsError, match=f"Tags of '{arch}': \\['{tag}'"):
        resolve_weights(arch, "no-such-tag", cache_dir=str(tmp_path), allow_download=False)


@pytest.mark.parametrize("tiny, real", [("tiny-clip-test-eva", "EVA02-B-16"),
                                        ("tiny-clip-test-sigmoid", "ViT-B-16-SigLIP")])
def test_tiny_timm_towers_are_the_real_towers_recipes(tiny, real):
    """The tiny tower is built by the same timm class, with the same pooling, as the real config's tower (built on
    the meta device: no memory, no weights)."""
    register_model_configs()
    tiny_trunk = timm.create_model(open_clip.get_model_config(tiny)["vision_cfg"]["timm_model_name"])
    with torch.device("meta"):
        real_trunk = timm.create_model(open_clip.get_model_config(real)["vision_cfg"]["timm_model_name"])
    assert type(tiny_trunk) is type(real_trunk) and tiny_trunk.global_pool == real_trunk.global_pool
    assert tiny_trunk.patch_embed.img_size == (32, 32)


def tiny_model(arch: str, class_names=("cat", "dog", "car"), seed: int = 0):
    cfg = tiny_cfg(MODEL__ARCH=arch)
    torch.manual_seed(seed)
    return build_zero_shot_clip(cfg, list(class_names), ["a photo of a {}."], "cpu")[0]


@pytest.mark.parametrize("arch", sorted(TINY_ARCH_BY_FAMILY.values()))
def test_logits_are_scaled_cosines_plus_the_bias_of_a_sigmoid_model(arch):
    """ZeroShotCLIP's logits against open_clip's own forward (its normalised features, exp(logit_scale) and
    logit_bias): logit_scale.exp() * cos, plus logit_bias where the model has one (SigLIP) and nothing else."""
    model = tiny_model(arch)
    if model_spec(arch).has_logit_bias:
        with torch.no_grad():
            model.clip.logit_bias.fill_(-3.25)          # not the init value, so a bias taken from elsewhere shows
    else:
        assert getattr(model.clip, "logit_bias", None) is None
    batch = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full_tokens = model.tokenizer([f"a photo of a {name}." for name in model.class_names])   # untruncated
        image_features, text_features, scale, *bias = model.clip(model.normalize(batch), full_tokens)
        expected = scale * image_features @ text_features.t() + (bias[0] if bias else 0)
        torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-5)
        # MODEL.SIGLIP_PROBABILITIES softmax: the bias cancels, every probability is that of the scaled cosines
        torch.testing.assert_close(model(batch).softmax(-1), (scale * image_features @ text_features.t()).softmax(-1),
                                   rtol=1e-5, atol=1e-6)


def test_siglip_probabilities_sigmoid_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        tiny_cfg(MODEL__ARCH="tiny-clip-test-sigmoid", MODEL__SIGLIP_PROBABILITIES="sigmoid")
    message = str(refused.value)
    assert "\n" not in message and "MODEL.SIGLIP_PROBABILITIES" in message and "'sigmoid' is not implemented" in message


def test_siglip_probabilities_at_its_default_is_out_of_every_identity():
    cfg = tiny_cfg("conf/cifar10_c/tent.yaml")
    without = cfg.clone()
    without.defrost()
    del without.MODEL["SIGLIP_PROBABILITIES"]
    assert config_hash(cfg) == config_hash(without)
    assert identity_keys(cfg) == identity_keys(without)
    assert "MODEL.SIGLIP_PROBABILITIES" not in identity_keys(cfg) and "MODEL.ARCH" in identity_keys(cfg)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed here")
def test_a_real_siglip_without_its_tokenizers_package_is_refused_before_loading():
    cfg = tiny_cfg(MODEL__ARCH="ViT-B-16-SigLIP")      # random weights: nothing to download, the tokenizer decides
    with pytest.raises(WeightsError) as refused:
        resolve_model_weights(cfg)
    message = str(refused.value)
    assert "\n" not in message and "MODEL.ARCH=ViT-B-16-SigLIP" in message and "transformers" in message
    resolve_model_weights(tiny_cfg(MODEL__ARCH="tiny-clip-test-sigmoid"))    # open_clip's own tokenizer: accepted


@pytest.mark.parametrize("family", ["resnet", "timm", "siglip"])
def test_sar_without_excluded_blocks_serves_towers_without_vit_blocks(family, models_by_dataset):
    """SAR's refusal above is of SAR.EXCLUDED_DEEPEST_BLOCKS > 0 (blocks are a ViT's); at 0 it adapts every norm layer
    of any tower."""
    cfg = contract_cfg(representative_config("sar"), MODEL__ARCH=TINY_ARCH_BY_FAMILY[family],
                       SAR__EXCLUDED_DEEPEST_BLOCKS=0)
    check_method(cfg)
    check_contract(cfg, models_by_dataset)
