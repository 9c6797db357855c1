"""CLIP.TRUNCATE_TEXT: running the causal text transformer on tokens cut after the longest prompt's EOT
gives the same text features (and the same gradients on the LayerNorms) as open_clip's encode_text on the
full 77-token sequences."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from datasets.class_names import CIFAR10_CLASSES, CIFAR_TEMPLATES
from methods.frames import configure_norm_adaptation, norm_parameters
from models import build_zero_shot_clip
from models.clip import ZeroShotCLIP
from tests.synthetic import tiny_cfg

TOL = dict(rtol=1e-5, atol=1e-5)


def full_length_features(clip, class_names, templates):
    """The untruncated reference: open_clip's encode_text on 77-token prompts, class by class;
    (normalised ensemble mean, renormalised; mean of the unnormalised features)."""
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    normalised, pre = [], []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates])
        assert tokens.shape[1] == 77
        out = clip.encode_text(tokens)
        normalised.append(F.normalize(F.normalize(out, dim=-1).mean(0), dim=-1))
        pre.append(out.mean(0))
    return torch.stack(normalised), torch.stack(pre)


def zero_shot(clip, templates, truncate=True):
    return ZeroShotCLIP(clip, open_clip.get_tokenizer("tiny-clip-test"), CIFAR10_CLASSES, templates,
                        open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, truncate_text=truncate)


TEMPLATE_SETS = {"single": ["a photo of a {}."], "ensemble": list(CIFAR_TEMPLATES)}


@pytest.mark.parametrize("templates", list(TEMPLATE_SETS))
def test_truncated_features_equal_full_77_token_features(tiny_clip, templates):
    model = zero_shot(tiny_clip.clip, TEMPLATE_SETS[templates])
    assert model.truncate_text and model.tokens.shape[1] < 77
    with torch.no_grad():
        normalised, pre = model.text_features()
        ref_normalised, ref_pre = full_length_features(model.clip, CIFAR10_CLASSES, TEMPLATE_SETS[templates])
    torch.testing.assert_close(normalised, ref_normalised, **TOL)
    torch.testing.assert_close(pre, ref_pre, **TOL)


@pytest.mark.parametrize("templates", list(TEMPLATE_SETS))
def test_truncated_gradients_on_layernorms_equal_full_length_gradients(tiny_clip, templates):
    model = zero_shot(tiny_clip.clip, TEMPLATE_SETS[templates])
    reference_clip = copy.deepcopy(model.clip)
    for m in (model, reference_clip):
        configure_norm_adaptation(m)
    probe = torch.randn(10, model.clip.text_projection.shape[1], generator=torch.Generator().manual_seed(0))
    normalised, pre = model.text_features()            # recomputed with gradient: text LayerNorms train
    assert normalised.requires_grad
    ((normalised * probe).sum() + (pre * probe).sum() ** 2 * 1e-3).backward()
    ref_normalised, ref_pre = full_length_features(reference_clip, CIFAR10_CLASSES, TEMPLATE_SETS[templates])
    ((ref_normalised * probe).sum() + (ref_pre * probe).sum() ** 2 * 1e-3).backward()
    params, names = norm_parameters(model.clip)
    ref_params, _ = norm_parameters(reference_clip)
    text_grads = 0
    for name, p, q in zip(names, params, ref_params):
        if name.startswith("visual."):
            continue                                    # the image tower takes no part here
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
        text_grads += 1
    assert text_grads == 10    # 2 blocks x (ln_1, ln_2) + ln_final, weight and bias


def test_key_switches_truncation_off(tmp_path):
    torch.manual_seed(0)
    full, _ = build_zero_shot_clip(tiny_cfg(None, CLIP__TRUNCATE_TEXT=False), CIFAR10_CLASSES,
                                   ["a photo of a {}."], "cpu")
    assert not full.truncate_text and full.tokens.shape[1] == 77
    cut = zero_shot(full.clip, ["a photo of a {}."], truncate=True)
    assert cut.tokens.shape[1] < 77
    torch.testing.assert_close(cut.tokens, full.tokens[:, : cut.tokens.shape[1]], rtol=0, atol=0)
    assert (full.tokens[:, cut.tokens.shape[1]:] == 0).all()   # only padding was cut
    with torch.no_grad():
        torch.testing.assert_close(cut.text_features()[0], full.text_features()[0], **TOL)
