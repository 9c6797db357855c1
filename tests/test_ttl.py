"""TTL (methods/ttl.py) against a plain transcription of its reference's per-image loop (the official
Razaimam45/TTL-Test-Time-Low-Rank-Adaptation ttl.py ``test_time_adapt_eval`` / ``test_time_tuning``, deyo.py
``forward_and_adapt_sar`` with its default flags, the LoRA of clip/custom_clip.py; the LoRA attention written as
TTA-VLM's ``LoRAMultiheadAttention`` / ``LoRALinear``)."""
import copy
import math

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import check_method
from methods.augmentations import AugmentedViews
from methods.ttl import QueryValueLoRA, lora_attention, weighted_view_entropy
from tests.synthetic import tiny_cfg
from tests.test_tpt import adamw_step

CFG_FILE = "conf/cifar10_c/ttl.yaml"
N_VIEWS = 8                              # the YAMLs' 64 views cost 8x the time


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **{"TEST__N_AUGMENTATIONS": N_VIEWS, "TTL__LAYERS": [0, 1], **overrides})


# ---------------------------------------------------------------------------------------------- the transcription
class _ReferenceLoRAAttention(nn.Module):
    """TTA-VLM's LoRAMultiheadAttention with its LoRALinear q and v projections, as written there (sequence
    first; open_clip's tower is batch first, so the input and output are transposed around it). ``a`` are the
    reference's (d_in, r) A, ``b`` its (r, d_out) B: {"q": ..., "v": ...}."""

    def __init__(self, attn, a, b, scaling, mutation=None):
        super().__init__()
        self.attn, self.a, self.b, self.scaling, self.mutation = attn, a, b, scaling, mutation
        self.num_heads = attn.num_heads
        self.embed_dim = attn.embed_dim
        self.head_dim = self.embed_dim // self.num_heads

    def _lora_linear(self, x, weight, bias, name):
        orig_output = F.linear(x, weight, bias)
        if name == "q" and self.mutation == "query_lora_left_out":
            return orig_output
        lora_output = F.linear(F.linear(x, self.a[name].T), self.b[name].T) * self.scaling
        return orig_output + lora_output

    def forward(self, x_q, x_k, x_v, need_weights=None, attn_mask=None):
        x_q, x_k, x_v = x_q.transpose(0, 1), x_k.transpose(0, 1), x_v.transpose(0, 1)
        seq_len, batch_size, _ = x_q.shape
        w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        d = self.embed_dim
        q = self._lora_linear(x_q, w[:d], bias[:d], "q")
        k = F.linear(x_k, w[d:2 * d], bias[d:2 * d])
        v = self._lora_linear(x_v, w[2 * d:], bias[2 * d:], "v")
        q = q.reshape(seq_len, batch_size * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.reshape(seq_len, batch_size * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.reshape(seq_len, batch_size * self.num_heads, self.head_dim).transpose(0, 1)
        attn_scores = torch.bmm(q, k.transpose(1, 2)) / (self.head_dim ** 0.5)
        attn_weights = F.softmax(attn_scores, dim=-1)
        attn_output = torch.bmm(attn_weights, v)
        attn_output = attn_output.transpose(0, 1).reshape(seq_len, batch_size, self.embed_dim)
        return self.attn.out_proj(attn_output).transpose(0, 1), None


def _initial_a(seed, layers, width, rank=16):
    """The A of every block, drawn as the method promises: one generator seeded with RNG_SEED, xavier normal on
    peft's (r, d_in) weight, q before v, blocks in order; returned in the reference's (d_in, r) layout."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in layers:
        q = nn.init.xavier_normal_(torch.empty(rank, width), generator=generator)
        v = nn.init.xavier_normal_(torch.empty(rank, width), generator=generator)
        draws.append({"q": q.T.clone(), "v": v.T.clone()})
    return draws


def _reference_ttl(model, images, seed, steps, episodic, layers, augmentation="crop_flip", nested=True, top=None,
                   lr=5e-3, wd=0.01, rank=16, alpha=32, margin=0.4, mutation=None):
    """The official per-image loop written out: LoRA_reset + optimizer.load_state_dict before every image (episodic),
    tta_steps x DeYO(steps=tta_steps) updates (``nested``), each: all views in one forward, per-view entropies,
    the views with H <= ln(1000) (``top``: --filter_ent's lowest-entropy fraction instead), coeff = 1 / exp(H.detach()
    - 0.4), loss = mean(H * coeff), hand-written AdamW; then the image itself classified. Returns the logits of
    every forward (per image: each update's views, then the image), the reported logits and the final A and B."""
    clip = model.clip
    blocks = clip.visual.transformer.resblocks
    width = blocks[0].attn.embed_dim
    dtype = blocks[0].attn.in_proj_weight.dtype
    a0 = [{n: t.to(dtype) for n, t in d.items()} for d in _initial_a(seed, layers, width, rank)]
    a = [{n: t.clone() for n, t in d.items()} for d in a0]
    b = [{"q": torch.zeros(rank, width, dtype=dtype), "v": torch.zeros(rank, width, dtype=dtype)} for _ in layers]
    for i, layer in enumerate(layers):
        blocks[layer].attn = _ReferenceLoRAAttention(blocks[layer].attn, a[i], b[i], alpha / rank, mutation)
    params = [(d, n) for i in range(len(layers)) for d, n in ((a[i], "q"), (b[i], "q"), (a[i], "v"), (b[i], "v"))]
    tokens = open_clip.get_tokenizer("tiny-clip-test")([f"a photo of a {c}." for c in CIFAR10_CLASSES])
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tokens), dim=-1)
    scale = clip.logit_scale.exp().item()
    views = AugmentedViews(N_VIEWS, augmentation, seed=seed)
    m = [torch.zeros_like(d[n]) for d, n in params]
    v = [torch.zeros_like(d[n]) for d, n in params]
    t = 0
    forwards, outputs = [], []
    for image in images:
        image_views = views(image[None])[0]
        if episodic:
            for i in range(len(layers)):
                a[i]["q"].copy_(a0[i]["q"]), a[i]["v"].copy_(a0[i]["v"]), b[i]["q"].zero_(), b[i]["v"].zero_()
            m, v, t = [torch.zeros_like(x) for x in m], [torch.zeros_like(x) for x in v], 0
        for _ in range(steps):
            for _ in range(steps if nested else 1):
                for d, n in params:
                    d[n].requires_grad_(True)
                logits = scale * F.normalize(model.encode_image(image_views), dim=-1) @ text.t()
                forwards.append(logits.detach())
                entropys = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
                if top is None:
                    filter_ids_1 = torch.where(entropys <= math.log(1000))
                else:
                    filter_ids_1 = torch.argsort(entropys, descending=False)[:int(entropys.size()[0] * top)]
                entropys = entropys[filter_ids_1]
                if mutation == "no_coefficient":
                    coeff = torch.ones_like(entropys)
                elif mutation == "coefficient_not_detached":
                    coeff = 1 / (torch.exp(entropys - margin))
                else:
                    coeff = 1 / (torch.exp((entropys.clone().detach()) - margin))
                loss = entropys.mul(coeff).mean(0)
                grads = torch.autograd.grad(loss, [d[n] for d, n in params], allow_unused=True)   # (mutations)
                t += 1
                with torch.no_grad():
                    for j, ((d, n), grad) in enumerate(zip(params, grads)):
                        d[n].requires_grad_(False)
                        grad = torch.zeros_like(d[n]) if grad is None else grad
                        new, m[j], v[j] = adamw_step(d[n], grad, m[j], v[j], t, lr, wd)
                        d[n].copy_(new)
        with torch.no_grad():
            output = scale * F.normalize(model.encode_image(image_views[:1]), dim=-1) @ text.t()
        forwards.append(output)
        outputs.append(output)
    return forwards, torch.cat(outputs), a, b


def _run(tiny_clip, images, float64=False, **cfg):
    """The method on ``images``, with the logits of every forward of the model it makes (a forward hook).
    ``float64``: model, LoRA and text features in float64 (the suite's text features are fp32 otherwise)."""
    if float64:
        tiny_clip.double()
        with torch.no_grad():
            pre = tiny_clip.encode_tokens(tiny_clip.tokens)
        tiny_clip._text_cache = (F.normalize(pre, dim=-1), pre)
    method = methods.build_method(_cfg(RNG_SEED=3, **cfg), tiny_clip, 10)
    if float64:
        method.lora.double()
    forwards = []
    handle = method.model.register_forward_hook(lambda module, args, out: forwards.append(out.detach().clone()))
    out = method(images)
    handle.remove()
    return out, forwards, method


def _lora_state(method):
    """The method's A and B in the reference's layout ((d_in, r) and (r, d_out))."""
    return ([{"q": m.q_A.detach().T, "v": m.v_A.detach().T} for m in method.lora],
            [{"q": m.q_B.detach().T, "v": m.v_B.detach().T} for m in method.lora])


def _assert_state_close(method, ref_a, ref_b, atol):
    a, b = _lora_state(method)
    for mine, theirs in zip(a + b, ref_a + ref_b):
        for name in ("q", "v"):
            torch.testing.assert_close(mine[name], theirs[name], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- the comparison
@pytest.mark.parametrize("episodic,steps,nested,augmentation,layers,top", [
    (True, 1, True, "crop_flip", [0, 1], None), (True, 2, True, "augmix", [1], None),
    (False, 1, True, "crop_flip", [0, 1], None), (True, 2, False, "crop_flip", [0, 1], None),
    (True, 2, True, "crop_flip", [0, 1], 0.5)])
def test_ttl_matches_plain_reference(tiny_clip, episodic, steps, nested, augmentation, layers, top):
    reference_model = copy.deepcopy(tiny_clip)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    out, forwards, method = _run(tiny_clip, images, MODEL__EPISODIC=episodic, OPTIM__STEPS=steps,
                                 TTL__NESTED_STEPS=nested, TTL__VIEW_AUGMENTATION=augmentation, TTL__LAYERS=layers,
                                 TTL__SELECTION_P=top if top is not None else 1.0)
    ref_forwards, ref_out, ref_a, ref_b = _reference_ttl(reference_model, images, seed=3, steps=steps,
                                                         episodic=episodic, layers=layers, augmentation=augmentation,
                                                         nested=nested, top=top)
    assert len(forwards) == len(ref_forwards) == 3 * ((steps * steps if nested else steps) + 1)
    # measured in fp32: logits of every forward within 2.1e-5, A within 1.7e-6, B within 2.7e-5 (rounding: one
    # projection vs three, scaled_dot_product_attention vs bmm-softmax-bmm, AdamW written out; Adam's
    # m / sqrt(v) turns the relative rounding of a near-zero gradient entry into up to that much of lr = 5e-3).
    # In float64 (the next test) the same comparison agrees to 1e-13.
    for mine, theirs in zip(forwards, ref_forwards):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=0)
    _assert_state_close(method, ref_a, ref_b, atol=1e-4)
    assert any(m.q_B.abs().max() > 0 for m in method.lora)          # the LoRA did move


@pytest.mark.parametrize("top", [None, 0.5])
def test_ttl_matches_plain_reference_in_float64(tiny_clip, top):
    """The fp32 differences above are rounding: in float64, every forward's logits and the adapted A and B agree
    to 1e-13 (measured 4e-14 and 8e-14)."""
    reference_model = copy.deepcopy(tiny_clip).double()
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    out, forwards, method = _run(tiny_clip, images, float64=True, OPTIM__STEPS=2,
                                 TTL__SELECTION_P=top if top is not None else 1.0)
    ref_forwards, _, ref_a, ref_b = _reference_ttl(reference_model, images, seed=3, steps=2, episodic=True,
                                                   layers=[0, 1], top=top)
    assert len(forwards) == len(ref_forwards) and forwards[0].dtype == torch.float64
    for mine, theirs in zip(forwards, ref_forwards):
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=0)
    _assert_state_close(method, ref_a, ref_b, atol=1e-12)


@pytest.mark.parametrize("mutation", ["coefficient_not_detached", "no_coefficient", "query_lora_left_out"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, mutation):
    """One line of the transcription changed (the coefficient not detached, no coefficient, no LoRA on the query),
    the adapted LoRA moves far beyond the tolerance of the comparison above. (ENTROPY_MARGIN only scales the loss
    by a constant, which Adam's update does not see, so changing 0.4 is not such a line; see docs/ttl.md.)"""
    reference_model = copy.deepcopy(tiny_clip)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    _, _, method = _run(tiny_clip, images, OPTIM__STEPS=2)
    _, _, ref_a, ref_b = _reference_ttl(reference_model, images, seed=3, steps=2, episodic=True, layers=[0, 1],
                                        mutation=mutation)
    a, b = _lora_state(method)
    gap = max((mine[n] - theirs[n]).abs().max().item() for mine, theirs in zip(a + b, ref_a + ref_b) for n in "qv")
    assert gap > 50 * 1e-4, gap      # measured: 0.040, 0.0099, 0.025; the comparison's tolerance: 1e-4


# ---------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_attention_is_multihead_attention_plus_the_low_rank_deltas(batch_first):
    """With B = 0 it is nn.MultiheadAttention (4 heads, so the head split is checked); with B random it is the
    references' LoRA attention written out."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 64) if batch_first else torch.randn(7, 3, 64)
    lora = QueryValueLoRA(torch.randn(16, 64), torch.randn(16, 64), 2.0)
    with torch.no_grad():
        torch.testing.assert_close(lora_attention(attn, lora, x, x, x), attn(x, x, x, need_weights=False)[0],
                                   atol=1e-6, rtol=0)     # measured: 6e-8
        lora.q_B.normal_(), lora.v_B.normal_()
        reference = _ReferenceLoRAAttention(attn, {"q": lora.q_A.T, "v": lora.v_A.T},
                                            {"q": lora.q_B.T, "v": lora.v_B.T}, 2.0)
        xb = x if batch_first else x.transpose(0, 1)
        expected = reference(xb, xb, xb)[0]
        expected = expected if batch_first else expected.transpose(0, 1)
        torch.testing.assert_close(lora_attention(attn, lora, x, x, x), expected, atol=1e-4, rtol=1e-5)
        assert (lora_attention(attn, lora, x, x, x) - attn(x, x, x, need_weights=False)[0]).abs().max() > 1


def test_the_loss_is_deyos_weighted_entropy_and_the_ln1000_filter():
    torch.manual_seed(0)
    logits = torch.randn(6, 10) * 3
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    expected = (entropy * torch.exp(-(entropy - 0.4))).mean()
    torch.testing.assert_close(weighted_view_entropy(logits, 0.4, 6, math.log(1000)), expected)
    lowest = entropy.sort().values[:3]
    expected = (lowest * torch.exp(-(lowest - 0.4))).mean()
    torch.testing.assert_close(weighted_view_entropy(logits, 0.4, 3, None), expected)
    # 2000 classes: a uniform view has entropy ln 2000 > ln 1000, and the official filter drops it
    wide = torch.cat([torch.zeros(1, 2000), torch.randn(1, 2000) * 20])
    kept = -(wide[1:].softmax(1) * wide[1:].log_softmax(1)).sum(1)
    expected = (kept * torch.exp(-(kept - 0.4))).mean()
    torch.testing.assert_close(weighted_view_entropy(wide, 0.4, 2, math.log(1000)), expected)
    assert weighted_view_entropy(wide[:1], 0.4, 1, math.log(1000)) is None          # no view left: no step
    assert weighted_view_entropy(wide[:1], 0.4, 1, None) is not None                # TTA-VLM: no filter
    # the coefficient is detached: the gradient is coeff * dH, not d(H * coeff)
    x = logits.clone().requires_grad_(True)
    weighted_view_entropy(x, 0.4, 6, None).backward()
    y = logits.clone().requires_grad_(True)
    h = -(y.softmax(1) * y.log_softmax(1)).sum(1)
    (h * torch.exp(-(h.detach() - 0.4))).mean().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_a_is_drawn_from_the_seed_whatever_ran_before(tiny_clip):
    torch.manual_seed(123)
    first = methods.build_method(_cfg(RNG_SEED=5), copy.deepcopy(tiny_clip), 10)
    torch.rand(100)
    torch.manual_seed(7)
    second = methods.build_method(_cfg(RNG_SEED=5), copy.deepcopy(tiny_clip), 10)
    other = methods.build_method(_cfg(RNG_SEED=6), tiny_clip, 10)
    for p, q, r in zip(first.params, second.params, other.params):
        assert torch.equal(p, q)
    assert not torch.equal(first.lora[0].q_A, other.lora[0].q_A)
    assert not torch.equal(first.lora[0].q_A, first.lora[0].v_A)
    assert all(torch.equal(m.q_B, torch.zeros_like(m.q_B)) for m in first.lora)
    std = math.sqrt(2 / (16 + 64))                                     # xavier normal of a (16, 64) weight
    assert abs(torch.cat([m.q_A.flatten() for m in first.lora]).std().item() - std) < 0.1 * std


def test_the_model_is_left_untouched_and_only_the_lora_moves(tiny_clip):
    method = methods.build_method(_cfg(), tiny_clip, 10)
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    assert method.param_names == [f"lora.{i}.{n}" for i in (0, 1) for n in ("q_A", "q_B", "v_A", "v_B")]
    assert method.num_trainable_params() == 2 * 4 * 16 * 64
    method(torch.rand(2, 3, 32, 32))
    after = tiny_clip.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(b.attn) is nn.MultiheadAttention for b in tiny_clip.clip.visual.transformer.resblocks)
    assert not all(torch.equal(m.q_B, torch.zeros_like(m.q_B)) for m in method.lora)


def test_dropout_is_inactive_and_the_tower_is_in_eval_mode(tiny_clip):
    """Both references call model.eval(), so their LoRA dropout (0.05) never acts; the method runs the tower in
    eval mode and has no dropout: two runs give the same logits."""
    method = methods.build_method(_cfg(), tiny_clip, 10)
    assert not tiny_clip.training and not any(m.training for m in tiny_clip.modules())
    images = torch.rand(1, 3, 32, 32)
    first = method(images)
    method.reset()
    assert torch.equal(method(images), first)


def test_a_batch_of_four_gives_what_four_batches_of_one_give(tiny_clip):
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32)
    cfg = _cfg(RNG_SEED=3, TTL__VIEW_AUGMENTATION="augmix")
    batched = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    single = methods.build_method(cfg, tiny_clip, 10)
    out4 = batched(images)
    out1 = torch.cat([single(b) for b in images.split(1)])
    torch.testing.assert_close(out4, out1, atol=0, rtol=0)     # image by image either way: bit for bit


def test_reset_restores_all_state_exactly(tiny_clip):
    cfg = _cfg(MODEL__EPISODIC=False)
    fresh = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    method = methods.build_method(cfg, tiny_clip, 10)
    initial = [p.detach().clone() for p in method.params]
    images = torch.rand(2, 3, 32, 32)
    expected = fresh(images)
    method(torch.rand(3, 3, 32, 32))
    method(torch.rand(1, 3, 32, 32))
    assert method.optimizer.state_dict()["state"]
    assert not all(torch.equal(p, q) for p, q in zip(method.params, initial))
    method.reset()
    assert all(torch.equal(p, q) for p, q in zip(method.params, initial))      # A its initial draw, B zero
    assert method.optimizer.state_dict()["state"] == {}
    assert torch.equal(method.views.rng_state(), AugmentedViews(N_VIEWS, seed=cfg.RNG_SEED).rng_state())
    assert method.performed_updates == 0
    assert torch.equal(method(images), expected)


def test_the_episodic_reset_restores_the_initial_lora_before_every_image(tiny_clip):
    method = methods.build_method(_cfg(), tiny_clip, 10)
    initial = [p.detach().clone() for p in method.params]
    method(torch.rand(1, 3, 32, 32))
    method.reset_episode()
    assert all(torch.equal(p, q) for p, q in zip(method.params, initial))
    assert method.optimizer.state_dict()["state"] == {}


def test_bad_ttl_config_is_refused():
    with pytest.raises(ConfigError, match=r"TTL.LAYERS = \[1, 2\] names a block beyond the 2 blocks"):
        check_method(_cfg(TTL__LAYERS=[1, 2]))
    for layers in ([], [1, 0], [-1], [0, 0]):
        with pytest.raises(ConfigError, match="TTL.LAYERS"):
            check_method(_cfg(TTL__LAYERS=layers))
    for key, value in [("RANK", 0), ("ALPHA", 0.0), ("ENTROPY_MARGIN", -1.0), ("A_INIT", "orthogonal"),
                       ("SELECTION_P", 0.0), ("VIEW_AUGMENTATION", "rotate")]:
        with pytest.raises(ConfigError, match=f"TTL.{key}"):
            check_method(_cfg(**{f"TTL__{key}": value}))
    with pytest.raises(ConfigError, match="TTL.SELECTION_P"):
        check_method(_cfg(TTL__SELECTION_P=0.1))              # int(8 * 0.1) = 0 views
    with pytest.raises(ConfigError, match="ttl adds LoRA to the attention of a ViT image tower; MODEL.ARCH=RN50"):
        check_method(_cfg(MODEL__ARCH="RN50"))


def test_shipped_values_are_the_reference_scripts():
    from harness.build import load_cfg
    for dataset in ("imagenet_c", "imagenet_a", "imagenet_sketch", "dtd", "eurosat", "cifar10_c", "shapes_c"):
        cfg = load_cfg(f"conf/{dataset}/ttl.yaml")
        assert (list(cfg.TTL.LAYERS), cfg.TTL.RANK, cfg.TTL.ALPHA, cfg.TTL.ENTROPY_MARGIN) == ([9, 10, 11], 16, 32.0,
                                                                                             0.4), dataset
        assert (cfg.TEST.N_AUGMENTATIONS, cfg.TTL.SELECTION_P, cfg.TTL.VIEW_AUGMENTATION) == (64, 1.0, "crop_flip")
        assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.OPTIM.WD, cfg.OPTIM.STEPS, cfg.MODEL.EPISODIC) == (
            "AdamW", 5e-3, 0.01, 1, True)
        assert cfg.TTL.MAX_ENTROPY_FILTER and cfg.TTL.NESTED_STEPS and cfg.TTL.A_INIT == "xavier"
