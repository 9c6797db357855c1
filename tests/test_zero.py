import copy
import math
from collections import Counter

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method
from methods.augmentations import AugmentedViews
from methods.zero import reported_logits, view_votes, zero_vote
from tests.synthetic import reproducible_run_on_cifar10c, tiny_cfg

CFG_FILE = "conf/cifar10_c/zero.yaml"
N_VIEWS, SELECTION_P = 8, 0.25          # 2 views vote (the YAML's 64 / 0.3 keep 19): ties are frequent


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "ZERO__SELECTION_P": SELECTION_P, **overrides})


# ---------------------------------------------------------------------------------------------- the plain loop
def _argmax(values):
    """First index of the largest value (as torch.argmax)."""
    return max(range(len(values)), key=lambda c: (values[c], -c))


def _entropy(cosines, scale):
    logits = [scale * c for c in cosines]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


def _plain_zero(cos, scale, k, vote, tie_break, eps=None):
    """ZERO for one image written out: cos is a list of V lists of C floats. Python-sorted entropies (stable), votes
    counted with a Counter (one_hot) or summed softmax(cos / eps) in float64 (eps_softmax), the reference's
    greedy_break and break_sample_tie as read in its code. Returns (votes, prediction, used_fallback)."""
    n_classes = len(cos[0])
    order = sorted(range(len(cos)), key=lambda v: _entropy(cos[v], scale))
    confident, discarded = order[:k], order[k:]
    if vote == "one_hot":
        counts = Counter(_argmax(cos[v]) for v in confident)
        votes = [float(counts[c]) for c in range(n_classes)]
    else:
        votes = [0.0] * n_classes
        for v in confident:
            scaled = [x / eps for x in cos[v]]
            top = max(scaled)
            weights = [math.exp(x - top) for x in scaled]
            votes = [s + w / sum(weights) for s, w in zip(votes, weights)]
    tied = [c for c in range(n_classes) if votes[c] == max(votes)]
    used_fallback = False
    if len(tied) > 1 and tie_break != "lowest_index":
        winner = next((_argmax(cos[v]) for v in discarded if _argmax(cos[v]) in tied), None)
        if winner is None:
            used_fallback = True
            logit = list(cos[discarded[0]])
            if tie_break == "reference":       # logit[~ties] = -inf: ~c = -c - 1, i.e. class C - 1 - c
                for c in tied:
                    logit[n_classes - 1 - c] = -math.inf
            else:
                logit = [x if c in tied else -math.inf for c, x in enumerate(logit)]
            winner = _argmax(logit)
        votes[winner] += 1
    return votes, _argmax(votes), used_fallback


def _tie_prone_cosines(batch, n_views=8, n_classes=5, seed=0):
    """fp32 cosines (B, V, C): small integers / 8 (exact ties within views and between vote counts), each view scaled
    by its own factor so that the views' entropies are distinct and far apart."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 5, (batch, n_views, n_classes), generator=g).float() / 8
    factors = 1 + 0.25 * torch.stack([torch.randperm(n_views, generator=g) for _ in range(batch)]).float()
    return levels * factors[..., None]


# ---------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("tie_break", ["reference", "discarded_views", "lowest_index"])
def test_one_hot_vote_matches_counter_loop_with_ties(tie_break):
    cos, scale, k = _tie_prone_cosines(300), torch.tensor(10.0), 3
    result = zero_vote(cos, scale, k, "one_hot", tie_break)
    fallbacks = 0
    for b in range(cos.shape[0]):
        votes, prediction, used_fallback = _plain_zero(cos[b].tolist(), 10.0, k, "one_hot", tie_break)
        assert result.votes[b].tolist() == votes, b
        assert int(result.prediction[b]) == prediction, b
        fallbacks += used_fallback
    assert int(result.tied.sum()) > 50                  # ties are exercised ...
    if tie_break != "lowest_index":
        assert fallbacks > 0                            # ... and so is the reference's fallback


def test_fallback_by_hand():
    # 4 views, 5 classes, k = 2: the confident views vote 0 and 1 (a tie), both discarded views vote 3.
    cos = torch.tensor([[[0.9, 0.0, 0.0, 0.0, 0.0],        # entropy lowest
                         [0.0, 0.8, 0.0, 0.0, 0.0],
                         [0.1, 0.2, 0.5, 0.9, 0.3],        # most confident discarded view
                         [0.0, 0.0, 0.0, 0.4, 0.1]]])
    scale = torch.tensor(10.0)
    # reference: masks classes 4 - 0 = 4 and 4 - 1 = 3 of view 2, argmax of [0.1, 0.2, 0.5] -> class 2 (not tied!)
    ref = zero_vote(cos, scale, 2, "one_hot", "reference")
    assert ref.votes.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]] and int(ref.prediction) == 0
    # the intended fallback: view 2 restricted to the tied classes {0, 1} -> class 1
    intended = zero_vote(cos, scale, 2, "one_hot", "discarded_views")
    assert intended.votes.tolist() == [[1.0, 2.0, 0.0, 0.0, 0.0]] and int(intended.prediction) == 1
    plain = zero_vote(cos, scale, 2, "one_hot", "lowest_index")
    assert plain.votes.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]] and int(plain.prediction) == 0
    # a discarded view that votes a tied class decides: view 3 now votes class 1
    cos[0, 3] = torch.tensor([0.0, 0.5, 0.0, 0.4, 0.1])
    greedy = zero_vote(cos, scale, 2, "one_hot", "reference")
    assert greedy.votes.tolist() == [[1.0, 2.0, 0.0, 0.0, 0.0]] and greedy.confident.tolist() == [[0, 1]]


def test_eps_softmax_vote_by_hand():
    # two classes one fp16 ulp-step of eps apart: cos / eps differ by exactly 1
    cos16 = torch.tensor([[0.5, 0.5 - 2 ** -10]], dtype=torch.float16)
    e = math.exp(-1)
    torch.testing.assert_close(view_votes(cos16, "eps_softmax"), torch.tensor([[1 / (1 + e), e / (1 + e)]]))
    # the same cosines in fp32: eps = 2^-23, a gap of 8192 -> one vote
    assert view_votes(cos16.float(), "eps_softmax").tolist() == [[1.0, 0.0]]
    assert view_votes(cos16, "one_hot").tolist() == [[1.0, 0.0]]
    # an exact tie splits the vote in half (the reference's p_bar then ties exactly)
    assert view_votes(torch.tensor([[0.3, 0.3, 0.1]]), "eps_softmax").tolist() == [[0.5, 0.5, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eps_softmax_vote_matches_plain_loop(dtype):
    g = torch.Generator().manual_seed(3)
    # distinct cosines 0.25 + j (v + 1) 2^-11 within each view v: soft votes in fp16 (eps = 2^-10, cos / eps steps of
    # (v + 1) / 2), whole votes in fp32; the spread grows with v, so the views' entropies are far apart
    steps = torch.stack([torch.stack([torch.randperm(6, generator=g) for _ in range(8)]) for _ in range(40)])
    cos = (0.25 + steps * (torch.arange(8) + 1)[None, :, None] * 2 ** -11).to(dtype)
    k, eps = 3, torch.finfo(dtype).eps
    result = zero_vote(cos, torch.tensor(100.0), k, "eps_softmax", "reference")
    soft = 0
    for b in range(cos.shape[0]):
        votes, prediction, _ = _plain_zero(cos[b].float().tolist(), 100.0, k, "eps_softmax", "reference", eps=eps)
        torch.testing.assert_close(result.votes[b], torch.tensor(votes, dtype=torch.float32), atol=1e-5, rtol=0)
        soft += sum(0.01 < v % 1 < 0.99 for v in votes)
        if not result.tied[b]:                         # exact-tie detection depends on the float32 sums
            assert int(result.prediction[b]) == prediction
    assert (soft > 0) == (dtype == torch.float16)      # fp16: split votes; fp32: whole votes


def test_batch_size_independence_of_the_kernel():
    cos = _tie_prone_cosines(12)
    for vote in ("one_hot", "eps_softmax"):
        whole = zero_vote(cos, torch.tensor(10.0), 3, vote, "reference")
        singles = [zero_vote(cos[b:b + 1], torch.tensor(10.0), 3, vote, "reference") for b in range(12)]
        assert torch.equal(whole.votes, torch.cat([s.votes for s in singles]))
        assert torch.equal(whole.prediction, torch.cat([s.prediction for s in singles]))


def test_reported_logits_argmax_is_the_prediction():
    cos = _tie_prone_cosines(300)
    for tie_break in ("reference", "lowest_index"):
        result = zero_vote(cos, torch.tensor(10.0), 3, "one_hot", tie_break)
        for kind in ("log_marginal", "votes"):
            logits = reported_logits(result.votes, result.prediction, kind)
            assert logits.dtype == torch.float32 and torch.equal(logits.argmax(dim=1), result.prediction)
            assert bool(torch.isfinite(logits).all())
        log_marginal = reported_logits(result.votes, result.prediction, "log_marginal")
        # softmax of the reported logits is the vote share (0 for classes without a vote)
        torch.testing.assert_close(log_marginal.softmax(dim=1), result.votes / result.votes.sum(1, keepdim=True))
        assert torch.equal(reported_logits(result.votes, result.prediction, "votes"), result.votes)


def test_log_marginal_keeps_argmax_where_log_shares_round_together():
    # 50 classes; class 1's sum is the float32 after class 0's: their log shares can round to the same value, and
    # class 1 (the prediction) must still be the argmax
    for base in torch.linspace(2.0, 30.0, 5000):
        votes = torch.full((1, 50), float(base) - 0.5)
        votes[0, 0], votes[0, 1] = base, torch.nextafter(base, torch.tensor(math.inf))
        shares = (votes / votes.sum(1, keepdim=True)).log()
        if shares[0, 0] == shares[0, 1]:
            break
    else:
        pytest.fail("no colliding pair found")
    logits = reported_logits(votes, votes.argmax(1), "log_marginal")
    assert int(logits.argmax(1)) == 1 and logits[0, 1] == torch.nextafter(shares[0, 1], torch.tensor(math.inf))
    assert torch.equal(logits[0, 2:], shares[0, 2:]) and logits[0, 0] == shares[0, 0]


# ---------------------------------------------------------------------------------------------- the method
def _images(n=10, seed=1):
    """Blocky images (4x4 colour patches upsampled): their views disagree often enough to tie on the tiny CLIP."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=32, mode="nearest")


@torch.no_grad()
def _plain_method(clip, mean, std, images, seed, vote, tie_break, k=2):
    """The method written out: views of the same seed encoded one at a time, text features from open_clip directly,
    then the plain per-image ZERO above."""
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    text = F.normalize(clip.encode_text(tokenizer([f"a photo of a {c}." for c in CIFAR10_CLASSES])), dim=-1)
    scale = float(clip.logit_scale.exp())
    out = []
    for image_views in AugmentedViews(N_VIEWS, seed=seed)(images):
        feats = [F.normalize(clip.encode_image((view[None] - mean) / std)[0], dim=-1) for view in image_views]
        cos = [(f @ text.t()).tolist() for f in feats]
        out.append(_plain_zero(cos, scale, k, vote, tie_break, eps=torch.finfo(torch.float32).eps))
    return out


@pytest.mark.parametrize("vote", ["one_hot", "eps_softmax"])
def test_zero_matches_plain_loop_on_tiny_clip(tiny_clip, vote):
    images = _images()
    method = methods.build_method(_cfg(RNG_SEED=5, ZERO__VOTE=vote, ZERO__LOGITS="votes"), tiny_clip, 10)
    assert method.views_per_image == N_VIEWS and method.n_selected == 2
    out = method(images)
    expected = _plain_method(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, 5, vote, "reference")
    torch.testing.assert_close(out, torch.tensor([v for v, _, _ in expected]), atol=1e-6, rtol=0)
    assert out.argmax(1).tolist() == [p for _, p, _ in expected]
    # the test is not vacuous: some images tie and get a tie-break bonus, and predictions differ between images
    assert any(round(sum(v)) == 3 for v, _, _ in expected) and len({p for _, p, _ in expected}) > 1


def test_batch_size_does_not_change_an_images_result(tiny_clip):
    """Given its views, an image's result does not depend on the other images of the batch: the batch of 10 equals
    the per-image loop (which encodes every view alone), also in log_marginal form."""
    images = _images()
    method = methods.build_method(_cfg(RNG_SEED=2), tiny_clip, 10)
    out = method(images)
    expected = _plain_method(tiny_clip.clip, tiny_clip.mean, tiny_clip.std, images, 2, "eps_softmax", "reference")
    votes = torch.tensor([v for v, _, _ in expected])
    torch.testing.assert_close(out.softmax(1), votes / votes.sum(1, keepdim=True), atol=1e-6, rtol=0)


def test_single_view_is_the_zero_shot_prediction(tiny_clip):
    method = methods.build_method(_cfg(TEST__N_AUGMENTATIONS=1, ZERO__SELECTION_P=1.0, ZERO__VOTE="one_hot",
                                       ZERO__TIE_BREAK="lowest_index"), tiny_clip, 10)
    images = _images(6)
    with torch.no_grad():
        zero_shot = tiny_clip(images).argmax(1)
    out = method(images)
    assert torch.equal(out.argmax(1), zero_shot)
    floor = math.log(torch.finfo(torch.float32).tiny)                  # a class without a vote: share 0, floored
    assert torch.equal(out, torch.where(F.one_hot(zero_shot, 10).bool(), 0.0, floor))


def test_zero_changes_no_state(tiny_clip):
    method = methods.build_method(_cfg(), tiny_clip, 10)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    assert method.num_trainable_params() == 0 and method.cost_info() == {"views_per_image": N_VIEWS,
                                                                         "backward_passes_per_image": 0}
    method(_images(2))
    after = method.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_reset_restores_all_state_exactly_and_is_deterministic(tiny_clip):
    cfg = _cfg(ZERO__LOGITS="votes")
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    method = methods.build_method(cfg, tiny_clip, 10)
    images = _images(4)
    expected = fresh(images)
    first = method(images)
    assert torch.equal(first, expected)                                # same seed, same output
    method(_images(3, seed=7))
    method.reset()
    assert torch.equal(method.views.rng_state(), AugmentedViews(N_VIEWS, seed=cfg.RNG_SEED).rng_state())
    assert torch.equal(method(images), expected)                       # reset() restarts the view stream


def test_bad_zero_config_is_refused():
    with pytest.raises(ConfigError, match="ZERO.SELECTION_P"):
        check_method(_cfg(ZERO__SELECTION_P=0.1))                      # int(8 * 0.1) = 0 views
    with pytest.raises(ConfigError, match="ZERO.SELECTION_P = 1.0 keeps all 8 views"):
        check_method(_cfg(ZERO__SELECTION_P=1.0))                      # no discarded view for the tie-break
    check_method(_cfg(ZERO__SELECTION_P=1.0, ZERO__TIE_BREAK="lowest_index"))
    for key, value in [("VOTE", "hard"), ("TIE_BREAK", "random"), ("LOGITS", "probs"),
                       ("VIEW_AUGMENTATION", "no_such_augmentation")]:
        with pytest.raises(ConfigError, match=f"ZERO.{key}"):
            check_method(_cfg(**{f"ZERO__{key}": value}))


def test_zero_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise", "fog"], 4, TEST__BATCH_SIZE=3)
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": N_VIEWS, "backward_passes_per_image": 0}
