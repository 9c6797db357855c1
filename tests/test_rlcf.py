"""RLCF (methods/rlcf.py) against a plain transcription of its reference's per-image loop (mzhaoshuai/RLCF,
TPT/tpt_cls_rl.py ``test_time_tuning``, TPT/clip_reward.py ``CLIPRewards``), with a second tiny CLIP of other
weights (or another architecture, or another input size) as the reward model."""
import copy
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
from methods.rlcf import baseline_subtracted
from models import build_zero_shot_clip
from models.clip import ZeroShotCLIP
from tests.synthetic import tiny_cfg
from tests.test_tpt import (adamw_step, assert_only_the_context_changes, assert_reset_restores_the_prompt,
                             reference_text_features)

CFG_FILE = "conf/cifar10_c/rlcf.yaml"
N_VIEWS, SELECTION_P = 8, 0.25          # keeps 2 views; the YAMLs' 64 / 0.1 keep 6
REWARD = {"RLCF__REWARD_ARCH": "tiny-clip-test", "RLCF__REWARD_WEIGHTS": "none"}


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "RLCF__SELECTION_P": SELECTION_P, **REWARD,
                                 **overrides})


def _reward_model(kind="seed1"):
    """A second tiny CLIP: other random weights ("seed1", "seed2"), another architecture ("shapes": width 64,
    4 image layers), or another input size ("size48": the reward images are resized)."""
    seed = {"seed1": 1, "seed2": 9, "shapes": 3, "size48": 4}[kind]   # cosines of both signs
    torch.manual_seed(seed)
    if kind == "size48":
        clip = open_clip.create_model("tiny-clip-test", pretrained=None, force_image_size=48).eval()
        return ZeroShotCLIP(clip, open_clip.get_tokenizer("tiny-clip-test"), CIFAR10_CLASSES, ["a photo of a {}."],
                            open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    cfg = tiny_cfg(None, MODEL__ARCH="tiny-clip-shapes") if kind == "shapes" else tiny_cfg()
    return build_zero_shot_clip(cfg, CIFAR10_CLASSES, ["a photo of a {}."], "cpu")[0]


def _reward_text_features(reward):
    """CLIPRewards.set_class_features(tokenized_classes=prompt_learner.tokenized_prompts): the reward CLIP's text
    tower on "a photo of a <class>.", its own embeddings of "a photo of a" in place."""
    clip = reward.clip
    ctx = clip.token_embedding(open_clip.get_tokenizer("tiny-clip-test")(["a photo of a"]))[0, 1:5]
    return reference_text_features(clip, ctx).detach()


def _reward_image_feature(reward, view):
    """CLIPRewards.extract_image_features of one view: CLIP's normalisation (the reference's transform), bicubic
    resize with align_corners where the reward model's resolution differs, encode, L2-normalise."""
    image = ((view - reward.mean[0]) / reward.std[0])[None]
    if image.shape[-1] != reward.image_size:
        image = F.interpolate(image, size=reward.image_size, mode="bicubic", align_corners=True)
    feature = reward.clip.encode_image(image)[0]
    return feature / feature.norm()


def _post_process(scores, baseline, amplify):
    """rewards_post_process on lists: each view's K rewards (process_batch 0) or all of them (1) minus their mean,
    divided by the unbiased std + 1e-5 when amplified; untouched without reward_process or for one sample."""
    groups = [scores] if baseline == "batch" else [[s] for s in scores]
    groups = [[r for row in group for r in row] for group in groups]
    out = []
    for group in groups:
        n = len(group)
        if baseline != "none" and n > 1:
            mean = sum(group) / n
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1)) + 1e-5 if amplify else 1.0
            group = [(r - mean) / std for r in group]
        out += group
    return out


def _reference_rlcf(model, reward, images, seed, steps, episodic, augmentation="crop_flip", sample_k=3,
                    baseline="view", amplify=False, weight=2.5, clamp=True, ctx0=None, lr=7e-3, wd=5e-4, k=2):
    """RLCF's per-image loop written out plainly: per image, the views (same seed, image by image); at the first
    step every view encoded one at a time, python-sorted entropies, the k most confident kept and their reward
    features taken; at later steps only those views encoded and classified; per kept view its sample_k most probable
    classes, reward weight * max(cos, 0) post-processed, loss = mean(reward * CE); hand-written AdamW; then the
    image itself classified. Returns (outputs, final context, every step's logits)."""
    clip = model.clip
    views = AugmentedViews(N_VIEWS, augmentation, seed=seed)
    if ctx0 is None:
        ctx0 = clip.token_embedding(open_clip.get_tokenizer("tiny-clip-test")(["a photo of a"]))[0, 1:5].detach()
    ctx, m, v, t = ctx0.clone(), torch.zeros_like(ctx0), torch.zeros_like(ctx0), 0
    scale = clip.logit_scale.exp().item()
    reward_text = _reward_text_features(reward)

    def encode(view):
        return F.normalize(model.encode_image(view[None])[0], dim=-1).detach()

    outputs, step_logits = [], []
    for image in images:
        image_views = views(image[None])[0]
        if episodic:
            ctx, m, v, t = ctx0.clone(), torch.zeros_like(ctx0), torch.zeros_like(ctx0), 0
        selected = None
        for _ in range(steps):
            ctx_var = ctx.clone().requires_grad_(True)
            text = reference_text_features(clip, ctx_var)
            if selected is None:
                logits = scale * torch.stack([encode(view) for view in image_views]) @ text.t()
                ent = [-(p * p.log()).sum().item() for p in logits.detach().softmax(-1)]
                selected = sorted(range(N_VIEWS), key=lambda i: ent[i])[:k]
                output = logits[selected]
                with torch.no_grad():
                    reward_images = [_reward_image_feature(reward, image_views[i]) for i in selected]
            else:
                output = scale * torch.stack([encode(image_views[i]) for i in selected]) @ text.t()
            step_logits.append(output.detach())
            samples = [sorted(range(10), key=lambda c: -row[c].item())[:sample_k] for row in output.detach()]
            scores = []
            for j, classes in enumerate(samples):
                cosines = [weight * (reward_text[c] * reward_images[j]).sum().item() for c in classes]
                scores.append([max(s, 0.0) if clamp else s for s in cosines])
            rewards = _post_process(scores, baseline, amplify)
            losses = [torch.logsumexp(output[j], 0) - output[j, c] for j, cs in enumerate(samples) for c in cs]
            loss = sum(r * ce for r, ce in zip(rewards, losses)) / len(losses)
            (grad,) = torch.autograd.grad(loss, ctx_var)
            t += 1
            ctx, m, v = adamw_step(ctx, grad, m, v, t, lr, wd)
        with torch.no_grad():
            outputs.append(scale * encode(image_views[0])[None] @ reference_text_features(clip, ctx).t())
    return torch.cat(outputs), ctx, step_logits


def _run(tiny_clip, images, reward, **cfg):
    """The method on ``images``; returns (outputs, final context, every step's logits of the kept views, method)."""
    method = methods.build_method(_cfg(RNG_SEED=3, **cfg), tiny_clip, 10, reward_model=reward)
    steps, step = [], method.forward_and_adapt
    method.forward_and_adapt = lambda unit: steps.append(step(unit)) or steps[-1]
    return method(images), method.prompt_learner.ctx.detach().clone(), steps, method


CASES = {   # (episodic, steps, views, sample_k, baseline, standardize, reward model)
    "authors": (True, 3, "crop_flip", 3, "view", False, "seed1"),
    "augmix_batch_std": (True, 2, "augmix", 2, "batch", True, "seed2"),
    "continual": (False, 2, "crop_flip", 3, "view", False, "seed1"),
    "raw_rewards_top1": (True, 2, "crop_flip", 1, "none", False, "seed2"),
    "other_arch": (True, 3, "crop_flip", 3, "view", True, "shapes"),
    "resized": (True, 2, "crop_flip", 3, "view", False, "size48"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rlcf_matches_plain_reference(tiny_clip, case):
    episodic, steps, augmentation, sample_k, baseline, standardize, reward_kind = CASES[case]
    reward = _reward_model(reward_kind)
    reference_model = copy.deepcopy(tiny_clip)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    out, ctx, step_logits, method = _run(
        tiny_clip, images, copy.deepcopy(reward), MODEL__EPISODIC=episodic, OPTIM__STEPS=steps,
        RLCF__VIEW_AUGMENTATION=augmentation, RLCF__SAMPLE_K=sample_k, RLCF__REWARD_BASELINE=baseline,
        RLCF__REWARD_STANDARDIZE=standardize)
    assert method.views_per_image == N_VIEWS and method.n_selected == 2
    ref_out, ref_ctx, ref_steps = _reference_rlcf(reference_model, reward, images, seed=3, steps=steps,
                                                  episodic=episodic, augmentation=augmentation, sample_k=sample_k,
                                                  baseline=baseline, amplify=standardize)
    assert len(step_logits) == len(ref_steps) == 3 * steps
    assert (ctx - method.prompt_learner.ctx_init).abs().max() > 1e-3          # the prompt did move
    # measured over the cases: step logits within 7e-6, outputs within 1.1e-5, context within 1.9e-7 (fp32 rounding
    # of other summation orders: views encoded together, not one at a time)
    for ours, theirs in zip(step_logits, ref_steps):
        torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=5e-5, rtol=0)
    torch.testing.assert_close(ctx, ref_ctx, atol=1e-6, rtol=0)


@pytest.mark.parametrize("changed", ["no_clamp", "no_baseline", "batch_baseline", "top2", "reward_model"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, changed):
    """The reward moves the prompt well beyond the tolerance of the comparison above: without the clamp at 0,
    without the baseline, with the image's baseline for the view's, with 2 samples instead of 3, or with the
    rewards of another reward model, the transcription no longer matches. (Another CLIPScore weight is not among
    them: it scales the loss, which Adam's update all but ignores.)"""
    reward = _reward_model("seed1")
    reference_model = copy.deepcopy(tiny_clip)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    out, ctx, _, _ = _run(tiny_clip, images, copy.deepcopy(reward))
    kwargs = {"no_clamp": dict(clamp=False), "no_baseline": dict(baseline="none"),
              "batch_baseline": dict(baseline="batch"), "top2": dict(sample_k=2),
              "reward_model": dict(reward=_reward_model("seed2"))}[changed]
    kwargs = {"reward": reward, **kwargs}
    _, ref_ctx, _ = _reference_rlcf(reference_model, images=images, seed=3, steps=3, episodic=True, **kwargs)
    assert (ctx - ref_ctx).abs().max() > 100 * 1e-6      # measured: 1.4e-3 (batch baseline) to 4.0e-2 (reward model)


def test_the_reward_model_decides_the_result(tiny_clip):
    """Another reward model gives another prompt; the adapted model alone does not decide it."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    _, ctx1, _, _ = _run(copy.deepcopy(tiny_clip), images, _reward_model("seed1"))
    _, ctx2, _, _ = _run(copy.deepcopy(tiny_clip), images, _reward_model("seed2"))
    assert (ctx1 - ctx2).abs().max() > 1e-4


def test_post_processing_is_the_references():
    torch.manual_seed(0)
    scores = torch.rand(6, 3) * 2.5
    for baseline in ("view", "batch", "none"):
        for amplify in (False, True):
            expected = torch.tensor(_post_process(scores.tolist(), baseline, amplify)).view(6, 3)
            torch.testing.assert_close(baseline_subtracted(scores, baseline, amplify), expected, atol=1e-6, rtol=0)
    one = torch.rand(4, 1)                 # one sample per view: the reference leaves the rewards raw
    assert torch.equal(baseline_subtracted(one, "view", False), one)


def test_a_batch_of_four_gives_what_four_batches_of_one_give(tiny_clip):
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32)
    cfg = _cfg(RNG_SEED=3, RLCF__VIEW_AUGMENTATION="augmix")
    reward = _reward_model("seed1")
    batched = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10, reward_model=copy.deepcopy(reward))
    single = methods.build_method(cfg, tiny_clip, 10, reward_model=reward)
    out4 = batched(images)
    out1 = torch.cat([single(b) for b in images.split(1)])
    torch.testing.assert_close(out4, out1, atol=1e-5, rtol=1e-6)
    assert out4.argmax(1).tolist() == out1.argmax(1).tolist()


def test_only_the_context_tokens_change_and_the_reward_model_stays_out(tiny_clip):
    reward = _reward_model("seed1")
    reward_before = {k: v.clone() for k, v in reward.state_dict().items()}
    method = methods.build_method(_cfg(), tiny_clip, 10, reward_model=reward)
    assert_only_the_context_changes(method, tiny_clip, torch.rand(2, 3, 32, 32))
    assert all(torch.equal(reward_before[k], v) for k, v in reward.state_dict().items())
    assert not any(p.requires_grad for p in reward.parameters())
    assert not any(name.startswith("reward_model") for name in method.state_dict())


def test_reset_restores_all_state_exactly(tiny_clip):
    cfg = _cfg(MODEL__EPISODIC=False)
    reward = _reward_model("seed1")
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10, reward_model=copy.deepcopy(reward))
    method = methods.build_method(cfg, tiny_clip, 10, reward_model=reward)
    assert_reset_restores_the_prompt(fresh, method, N_VIEWS, cfg.RNG_SEED)


def test_a_coop_context_file_is_the_initial_prompt(tiny_clip, tmp_path):
    """--load: the checkpoint's state_dict["ctx"] is the context the episode starts from and returns to."""
    torch.manual_seed(5)
    coop = torch.randn(4, 32) * 0.02
    path = tmp_path / "coop.pth.tar"
    torch.save({"state_dict": {"ctx": coop, "token_prefix": torch.zeros(1)}, "epoch": 50}, path)
    reward = _reward_model("seed1")
    reference_model = copy.deepcopy(tiny_clip)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    out, ctx, _, method = _run(tiny_clip, images, copy.deepcopy(reward), RLCF__COOP_CTX=str(path))
    assert torch.equal(method.prompt_learner.ctx_init, coop)
    ref_out, ref_ctx, _ = _reference_rlcf(reference_model, reward, images, seed=3, steps=3, episodic=True, ctx0=coop)
    torch.testing.assert_close(out, ref_out, atol=5e-5, rtol=0)
    torch.testing.assert_close(ctx, ref_ctx, atol=1e-6, rtol=0)
    method.reset()
    assert torch.equal(method.prompt_learner.ctx.detach(), coop)
    torch.save({"state_dict": {"ctx": torch.zeros(16, 32)}}, path)
    with pytest.raises(ConfigError, match=r"RLCF.COOP_CTX .*\(16, 32\)"):
        methods.build_method(_cfg(RLCF__COOP_CTX=str(path)), tiny_clip, 10, reward_model=reward)


def test_bad_rlcf_config_is_refused(tiny_clip):
    for key in ("REWARD_ARCH", "REWARD_WEIGHTS"):
        with pytest.raises(ConfigError, match=f"RLCF.{key} is empty.*ViT-L-14 with openai"):
            check_method(_cfg(**{f"RLCF__{key}": ""}))
    with pytest.raises(ConfigError, match="RLCF.SAMPLE_K = 11 .* 10"):
        check_method(_cfg(RLCF__SAMPLE_K=11))
    with pytest.raises(ConfigError, match="RLCF.SAMPLE_K"):
        check_method(_cfg(RLCF__SAMPLE_K=0))
    with pytest.raises(ConfigError, match="RLCF.CLIPSCORE_WEIGHT"):
        check_method(_cfg(RLCF__CLIPSCORE_WEIGHT=0.0))
    with pytest.raises(ConfigError, match="RLCF.REWARD_BASELINE"):
        check_method(_cfg(RLCF__REWARD_BASELINE="mean"))
    with pytest.raises(ConfigError, match="RLCF.N_CTX"):
        check_method(_cfg(RLCF__N_CTX=3))
    with pytest.raises(ConfigError, match="RLCF.SELECTION_P"):
        check_method(_cfg(RLCF__SELECTION_P=0.1))
    with pytest.raises(ConfigError, match="RLCF.COOP_CTX"):
        _cfg(RLCF__COOP_CTX="/nonexistent/coop.pth.tar")
    with pytest.raises(ConfigError, match="RLCF.REWARD_ARCH and RLCF.REWARD_WEIGHTS"):
        methods.build_method(_cfg(), tiny_clip, 10)


def test_shipped_values_are_the_reference_scripts():
    from harness.build import load_cfg
    for dataset, steps, views in [("imagenet_c", 3, "crop_flip"), ("imagenet_a", 3, "crop_flip"),
                                  ("imagenet_sketch", 3, "crop_flip"), ("dtd", 5, "augmix"),
                                  ("eurosat", 5, "augmix"), ("cifar10_c", 3, "crop_flip")]:
        cfg = load_cfg(f"conf/{dataset}/rlcf.yaml")
        assert (cfg.OPTIM.STEPS, cfg.RLCF.VIEW_AUGMENTATION) == (steps, views), dataset
        assert (cfg.TEST.N_AUGMENTATIONS, cfg.RLCF.SELECTION_P, cfg.OPTIM.LR, cfg.OPTIM.WD) == (64, 0.1, 7e-3, 5e-4)
        assert (cfg.RLCF.REWARD_ARCH, cfg.RLCF.REWARD_WEIGHTS, cfg.RLCF.SAMPLE_K) == ("ViT-L-14", "openai", 3)
        assert (cfg.RLCF.REWARD_BASELINE, cfg.RLCF.REWARD_STANDARDIZE, cfg.OPTIM.METHOD) == ("view", False, "AdamW")
