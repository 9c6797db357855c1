import time

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conf import ConfigError
from models import ZeroShotCLIP, load_clip
from models.weights import WeightsError
from tests.synthetic import tiny_cfg


# ----------------------------------------------------------------------------- weights
def test_uncached_tag_offline_fails_fast_with_tag_cache_and_local_file_hint():
    start = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        load_clip("ViT-B-16", "openai", allow_download=False)
    assert time.perf_counter() - start < 30
    msg = str(err.value)
    assert "openai" in msg and "ViT-B-16" in msg and "cache" in msg and "MODEL.WEIGHTS /path/to" in msg


def test_uncached_tag_with_unreachable_hub_fails_without_trying_to_download(monkeypatch):
    import models.weights as weights
    monkeypatch.setattr(weights, "_hub_reachable", lambda timeout=3.0: False)
    called = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: called.append(1))
    with pytest.raises(WeightsError, match="cannot be reached"):
        load_clip("ViT-B-16", "openai", allow_download=True)
    assert not called


def test_unknown_tag_lists_the_valid_tags():
    with pytest.raises(WeightsError, match="laion2b_s34b_b88k"):
        load_clip("ViT-B-16", "no_such_tag")


def test_unknown_arch_suggests_nearest_names():
    with pytest.raises(WeightsError, match="ViT-B-16"):
        load_clip("VIT-B-16", "none")


def test_missing_checkpoint_path_is_named(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_clip("tiny-clip-test", str(tmp_path / "weights.pt"))


def test_local_checkpoint_loads_exactly_and_none_is_random(tmp_path):
    torch.manual_seed(1)
    first = load_clip("tiny-clip-test", "none").model
    path = tmp_path / "tiny.pt"
    torch.save(first.state_dict(), path)
    torch.manual_seed(2)
    other = load_clip("tiny-clip-test", "none").model
    loaded = load_clip("tiny-clip-test", str(path))
    assert loaded.weights_source == str(path.resolve())
    for (name, a), b, c in zip(first.state_dict().items(), loaded.model.state_dict().values(),
                               other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))


# ----------------------------------------------------------------------------- zero-shot head
def test_logits_are_logit_scale_times_cosine(tiny_clip):
    x = torch.rand(5, 3, 32, 32)
    out = tiny_clip(x, return_features=True)
    clip = tiny_clip.clip
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    img = clip.encode_image((x - mean) / std)
    tokens = open_clip.get_tokenizer("tiny-clip-test")([f"a photo of a {c}." for c in tiny_clip.class_names])
    txt = clip.encode_text(tokens)
    expected = clip.logit_scale.exp() * F.cosine_similarity(img[:, None], txt[None], dim=-1)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.image_pre_features, img)
    torch.testing.assert_close(out.text_pre_features, txt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(5))


def test_template_ensemble_averages_normalised_features_then_renormalises(tiny_clip):
    templates = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}"]
    model = ZeroShotCLIP(tiny_clip.clip, open_clip.get_tokenizer("tiny-clip-test"), ["cat", "dog"], templates,
                         open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    normalised, pre = model.text_features()
    tok = open_clip.get_tokenizer("tiny-clip-test")
    for c, name in enumerate(["cat", "dog"]):
        feats = tiny_clip.clip.encode_text(tok([t.format(name) for t in templates]))
        expected = F.normalize(F.normalize(feats, dim=-1).mean(0), dim=0)
        torch.testing.assert_close(normalised[c], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pre[c], feats.mean(0), rtol=1e-4, atol=1e-5)


def test_text_features_cached_when_frozen_and_recomputed_with_grad_when_trainable(tiny_clip):
    tiny_clip.requires_grad_(False)
    first, _ = tiny_clip.text_features()
    assert tiny_clip.text_features()[0] is first and not first.requires_grad
    tiny_clip.clip.ln_final.requires_grad_(True)
    live, _ = tiny_clip.text_features()
    assert live.requires_grad and live is not tiny_clip.text_features()[0]
    torch.testing.assert_close(live.detach(), first)


def test_text_cache_is_dropped_when_weights_are_loaded(tiny_clip):
    tiny_clip.requires_grad_(False)
    before, _ = tiny_clip.text_features()
    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    state["clip.ln_final.bias"] += 0.5  # (scaling the weight would not change normalised features)
    tiny_clip.load_state_dict(state)
    after, _ = tiny_clip.text_features()
    assert not torch.allclose(before, after)


def test_images_are_cast_to_the_image_tower_dtype_never_half(tiny_clip):
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert tiny_clip(x).dtype == torch.float32


def test_build_zero_shot_clip_records_provenance_and_refuses_fp16_on_cpu():
    from models import build_zero_shot_clip
    model, info = build_zero_shot_clip(tiny_cfg(), ["a", "b"], ["{}"], "cpu")
    assert info["arch"] == "tiny-clip-test" and info["weights_source"] == "random" and info["precision"] == "fp32"
    with pytest.raises(ConfigError, match="CUDA"):
        build_zero_shot_clip(tiny_cfg(None, CLIP__PRECISION="fp16"), ["a"], ["{}"], "cpu")
