"""CLIPTTA (methods/cliptta.py) against plain re-computations: the loss on hand-computed 2 x 2 cases, one and
several optimizer steps against a loop-written loss and torch.optim.Adam on a deep copy of the tiny CLIP (every
CLIPTTA.ADAPT_ON, LOSS and LOSS_SIDES value), the memory against a sorted python version, reset, determinism,
refusals, and one run through the harness."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import methods
from conf import ConfigError
from harness.build import check_method
from methods.cliptta import ClassConfidentMemory, contrastive_loss
from methods.losses import mean_prediction_entropy
from tests.synthetic import reproducible_run_on_cifar10c, tiny_cfg

CFG_FILE = "conf/cifar10_c/cliptta.yaml"
BATCH = 8


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def _images(seed, n=BATCH):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the loss, by hand
TEXT_2D = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
# x0 predicts class 0, x1 class 1: logits 10 * [[0.8, 0.6], [0.28, 0.96]] (not symmetric).
IMAGES_2D = torch.tensor([[0.8, 0.6], [0.28, 0.96]], dtype=torch.float64)


def _binary_entropy(d):
    """Entropy of softmax([d, 0]) = softmax of a two-logit row whose logits differ by d."""
    p = 1.0 / (1.0 + math.exp(-d))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_soft_loss_on_a_2x2_case_equals_the_hand_computed_value():
    # image side: rows [8, 6] and [2.8, 9.6]; text side: columns [8, 2.8] and [6, 9.6]
    image_side = (_binary_entropy(2.0) + _binary_entropy(6.8)) / 2
    text_side = (_binary_entropy(5.2) + _binary_entropy(3.6)) / 2
    assert image_side == pytest.approx(0.18700612773556075, abs=1e-12)
    assert (image_side + text_side) / 2 == pytest.approx(0.13268717088571175, abs=1e-12)
    got = contrastive_loss(IMAGES_2D, TEXT_2D, 10.0, "soft", "image")
    assert got.item() == pytest.approx(0.18700612773556075, abs=1e-9)
    got = contrastive_loss(IMAGES_2D, TEXT_2D, 10.0, "soft", "symmetric")
    assert got.item() == pytest.approx(0.13268717088571175, abs=1e-9)


def test_hard_loss_on_a_2x2_case_equals_the_hand_computed_value():
    # -log softmax(row)[diagonal]: log(1 + exp(other - own))
    image_side = (math.log(1 + math.exp(6 - 8)) + math.log(1 + math.exp(2.8 - 9.6))) / 2
    text_side = (math.log(1 + math.exp(2.8 - 8)) + math.log(1 + math.exp(6 - 9.6))) / 2
    assert image_side == pytest.approx(0.06402058320171859, abs=1e-12)
    got = contrastive_loss(IMAGES_2D, TEXT_2D, 10.0, "hard", "image")
    assert got.item() == pytest.approx(image_side, abs=1e-9)
    got = contrastive_loss(IMAGES_2D, TEXT_2D, 10.0, "hard", "symmetric")
    assert got.item() == pytest.approx((image_side + text_side) / 2, abs=1e-9)
    assert got.item() == pytest.approx(0.0401249158303257, abs=1e-9)


def test_the_same_pseudo_caption_twice_gives_log_2():
    # both images predict class 0: both columns are z0, so every row is [a, a] (entropy ln 2), and both
    # columns are [8, 9.6] (entropy of softmax([1.6, 0]))
    images = torch.tensor([[0.8, 0.6], [0.96, 0.28]], dtype=torch.float64)
    got = contrastive_loss(images, TEXT_2D, 10.0, "soft", "image").item()
    assert got == pytest.approx(math.log(2), abs=1e-12)
    got = contrastive_loss(images, TEXT_2D, 10.0, "soft", "symmetric").item()
    assert got == pytest.approx((math.log(2) + _binary_entropy(1.6)) / 2, abs=1e-12)


def test_regulariser_on_a_2x2_case_equals_the_hand_computed_value():
    p0 = 1 / (1 + math.exp(-2.0))          # softmax([8, 6])[0]
    p1 = 1 / (1 + math.exp(-6.8))          # softmax([2.8, 9.6])[1]
    mean = [(p0 + 1 - p1) / 2, (1 - p0 + p1) / 2]
    expected = -sum(p * math.log(p + 1e-6) for p in mean)
    assert expected == pytest.approx(0.6861562138090717, abs=1e-12)
    logits = 10.0 * IMAGES_2D @ TEXT_2D.t()
    assert mean_prediction_entropy(logits).item() == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------- plain re-computation on the tiny CLIP
def _plain_row_loss(row, own, kind):
    """soft: entropy of softmax(row); hard: -log softmax(row)[own]."""
    p = torch.exp(row - row.max()) / torch.exp(row - row.max()).sum()
    return -(p * torch.log(p)).sum() if kind == "soft" else -torch.log(p[own])


def _plain_set_loss(features, text, node):
    """BETA_TTA * L_tta - BETA_REG * L_reg written out with loops over images from the definitions."""
    scale, n, classes = node.LOGIT_SCALE, features.shape[0], text.shape[0]
    predicted = [max(range(classes), key=lambda c: float(features[i].detach() @ text[c])) for i in range(n)]
    matrix = torch.stack([torch.stack([scale * (features[i] * text[predicted[j]]).sum() for j in range(n)])
                          for i in range(n)])
    image_side = sum(_plain_row_loss(matrix[i], i, node.LOSS) for i in range(n)) / n
    if node.LOSS_SIDES == "symmetric":
        text_side = sum(_plain_row_loss(matrix[:, j], j, node.LOSS) for j in range(n)) / n
    else:
        text_side = image_side
    tta = (image_side + text_side) / 2
    probs = [torch.softmax(scale * features[i] @ text.t(), 0) for i in range(n)]
    mean = sum(probs) / n
    reg = -(mean * torch.log(mean + 1e-6)).sum()
    return node.BETA_TTA * tta - node.BETA_REG * reg


def _plain_memory(images, features, text, node, memory=None):
    """Per predicted class, the NUM_SHOTS images of highest max softmax(CONFIDENCE_LOGIT_SCALE * cos)."""
    memory = memory if memory is not None else {}
    for i in range(images.shape[0]):
        cos = [float(features[i] @ text[c]) for c in range(text.shape[0])]
        label = max(range(len(cos)), key=lambda c: cos[c])
        confidence = float(torch.softmax(node.CONFIDENCE_LOGIT_SCALE * torch.tensor(cos), 0).max())
        memory.setdefault(label, []).append((confidence, images[i]))
    for label in memory:
        memory[label] = sorted(memory[label], key=lambda item: -item[0])[:node.NUM_SHOTS]
    return memory


def _visual_layernorm_params(model):
    return [p for m in model.clip.visual.modules() if isinstance(m, nn.LayerNorm) for p in (m.weight, m.bias)]


def _plain_run(model, batches, node, optim, steps):
    """The method's steps on a deep copy: plain loss, plain memory (whole classes drawn: the configs here keep
    SAMPLE_SIZE >= NUM_SHOTS * C), torch.optim.Adam, predictions with the adapted model."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    params = _visual_layernorm_params(ref)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=optim.LR, betas=(optim.BETA, 0.999), eps=node.ADAM_EPS)
    text = ref.text_features()[0]

    def features(x):
        return nn.functional.normalize(ref.clip.encode_image(ref.normalize(x)), dim=-1)

    memory, outputs = {}, []
    for x in batches:
        for step in range(steps):
            with torch.enable_grad():
                batch_features = features(x)
                loss = 0.0
                if node.ADAPT_ON != "memory":
                    loss = _plain_set_loss(batch_features, text, node)
                if node.ADAPT_ON != "batch":
                    if step == 0:
                        memory = _plain_memory(x, batch_features.detach(), text, node, memory)
                    stored = torch.stack([img for label in sorted(memory) for _, img in memory[label]])
                    loss = loss + _plain_set_loss(features(stored), text, node)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            outputs.append(node.LOGIT_SCALE * features(x) @ text.t())
    return outputs, params


@pytest.mark.parametrize("adapt_on,loss,sides", [
    ("batch_and_memory", "soft", "image"),      # the CIFAR configs
    ("memory", "soft", "image"),                # the ImageNet-C config
    ("batch", "soft", "image"),
    ("batch_and_memory", "soft", "symmetric"),  # the paper's two-sided loss
    ("batch_and_memory", "hard", "image"),
    ("batch", "hard", "symmetric"),
])
def test_steps_match_a_plain_recomputation(tiny_clip, adapt_on, loss, sides):
    cfg = _cfg(CLIPTTA__ADAPT_ON=adapt_on, CLIPTTA__LOSS=loss, CLIPTTA__LOSS_SIDES=sides, OPTIM__STEPS=2,
               OPTIM__LR=1e-3, CLIPTTA__NUM_SHOTS=2, CLIPTTA__SAMPLE_SIZE=20, CLIPTTA__BETA_REG=0.5)
    batches = [_images(1), _images(2)]
    source = copy.deepcopy(tiny_clip)
    expected, ref_params = _plain_run(tiny_clip, batches, cfg.CLIPTTA, cfg.OPTIM, steps=2)
    method = methods.build_method(cfg, tiny_clip, 10)
    for x, want in zip(batches, expected):
        torch.testing.assert_close(method(x), want, rtol=1e-4, atol=1e-4)
    params = _visual_layernorm_params(method.model)
    assert len(params) == len(ref_params) == len(method.params)
    moved = [not torch.equal(p, q) for p, q in zip(params, _visual_layernorm_params(source))]
    assert any(moved)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_only_the_image_towers_layernorms_adapt(tiny_clip):
    method = methods.build_method(_cfg(), tiny_clip, 10)
    assert method.param_names and all(n.startswith("clip.visual.") and n.endswith((".weight", ".bias"))
                                      for n in method.param_names)
    assert {id(p) for p in method.params} == {id(p) for p in _visual_layernorm_params(method.model)}
    assert isinstance(method.optimizer, torch.optim.Adam)
    assert method.optimizer.defaults["eps"] == 1e-6 and method.optimizer.defaults["lr"] == 1e-4


# ---------------------------------------------------------------------- the memory
def test_memory_keeps_the_most_confident_per_class_like_a_sorted_list():
    gen = torch.Generator().manual_seed(0)
    memory = ClassConfidentMemory(num_shots=3, num_classes=4, sample_size=100, seed=0)
    plain = {}
    for _ in range(4):
        images = torch.rand(10, 3, 2, 2, generator=gen)
        labels = torch.randint(0, 4, (10,), generator=gen)
        confidences = torch.rand(10, generator=gen)
        memory.add(images, labels, confidences)
        for i in range(10):
            plain.setdefault(int(labels[i]), []).append((float(confidences[i]), images[i]))
        plain = {c: sorted(items, key=lambda item: -item[0])[:3] for c, items in plain.items()}
    for c in range(4):
        want = plain.get(c, [])
        assert memory.class_counts()[c] == len(want)
        if want:
            torch.testing.assert_close(memory.images[c], torch.stack([img for _, img in want]), rtol=0, atol=0)
    # sample_size capped at 3 * 4 = 12, 3 per class: everything, class by class
    stored = torch.cat([torch.stack([img for _, img in plain[c]]) for c in sorted(plain)])
    torch.testing.assert_close(memory.sample(), stored, rtol=0, atol=0)


def test_memory_sample_draws_per_class_from_its_own_seeded_generator():
    memory = ClassConfidentMemory(num_shots=5, num_classes=3, sample_size=4, seed=7)   # 4 // 3 = 1 per class
    images = torch.arange(15, dtype=torch.float32).view(15, 1, 1, 1)
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    memory.add(images, labels, torch.linspace(1, 0, 15))           # confidences decreasing: order kept
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        want = [float(images[5 * c + int(torch.randperm(5, generator=generator)[0])]) for c in range(3)]
        assert memory.sample().flatten().tolist() == want
    memory.clear()
    assert len(memory) == 0
    memory.add(images, labels, torch.linspace(1, 0, 15))
    generator = torch.Generator().manual_seed(7)
    first = [float(images[5 * c + int(torch.randperm(5, generator=generator)[0])]) for c in range(3)]
    assert memory.sample().flatten().tolist() == first             # clear() restarts the draws


def test_the_memory_takes_each_batch_once_at_its_first_step(tiny_clip):
    cfg = _cfg(OPTIM__STEPS=3, CLIPTTA__NUM_SHOTS=BATCH)       # room for every image: a second add would show
    method = methods.build_method(cfg, tiny_clip, 10)
    method(_images(1))
    assert len(method.memory) == BATCH            # three adds of the batch would hold 3 x BATCH (capped per class)
    assert method.step_on_batch == 0              # the next batch starts at its first step again


def test_sample_sizes_of_the_shipped_configs():
    # CIFAR-10-C: 40 // 10 = 4 = NUM_SHOTS (the whole memory); CIFAR-100-C: 128 // 100 = 1; ImageNet-C: 64 // 1000 -> 1
    for dataset, classes, shots, per_class in (("cifar10_c", 10, 4, 4), ("cifar100_c", 100, 16, 1),
                                               ("imagenet_c", 1000, 16, 1)):
        node = tiny_cfg(f"conf/{dataset}/cliptta.yaml").CLIPTTA
        memory = ClassConfidentMemory(node.NUM_SHOTS, classes, node.SAMPLE_SIZE, 0)
        assert (node.NUM_SHOTS, memory.per_class_sample) == (shots, per_class)
        # the ImageNet script's class (cliptta_old) uses max(SAMPLE_SIZE, C): the same per-class draw
        assert ClassConfidentMemory(node.NUM_SHOTS, classes, max(node.SAMPLE_SIZE, classes), 0).per_class_sample \
            == per_class


# ---------------------------------------------------------------------- state
def test_reset_is_exact(tiny_clip):
    cfg = _cfg(OPTIM__STEPS=2, CLIPTTA__NUM_SHOTS=3, CLIPTTA__SAMPLE_SIZE=10)   # 1 per class: random draws
    method = methods.build_method(cfg, tiny_clip, 10)
    fresh_state = {k: v.clone() for k, v in method.state_dict().items()}
    fresh_optimizer = str(method.optimizer.state_dict())
    first = [method(_images(s)) for s in (1, 2, 3)]
    assert len(method.memory) > 0
    method.reset()
    assert len(method.memory) == 0 and method.step_on_batch == 0 and method.last_loss is None
    for key, value in method.state_dict().items():
        assert torch.equal(value, fresh_state[key]), key
    assert str(method.optimizer.state_dict()) == fresh_optimizer
    again = [method(_images(s)) for s in (1, 2, 3)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_same_seed_same_output(tiny_clip):
    cfg = _cfg(OPTIM__STEPS=2, CLIPTTA__NUM_SHOTS=3, CLIPTTA__SAMPLE_SIZE=10)
    runs = []
    for _ in range(2):
        method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
        runs.append([method(_images(s)) for s in (1, 2)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = methods.build_method(_cfg(OPTIM__STEPS=2, CLIPTTA__NUM_SHOTS=3, CLIPTTA__SAMPLE_SIZE=10, RNG_SEED=5),
                                 copy.deepcopy(tiny_clip), 10)
    assert other.memory.seed == 5


def test_episodic_empties_the_memory_before_every_batch(tiny_clip):
    method = methods.build_method(_cfg(MODEL__EPISODIC=True, CLIPTTA__NUM_SHOTS=BATCH), tiny_clip, 10)
    fresh = methods.build_method(_cfg(CLIPTTA__NUM_SHOTS=BATCH), copy.deepcopy(tiny_clip), 10)
    method(_images(1))
    torch.testing.assert_close(method(_images(2)), fresh(_images(2)), rtol=0, atol=0)
    assert len(method.memory) == BATCH


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides,message", [
    ({"CLIPTTA__ADAPT_ON": "both"}, r"CLIPTTA.ADAPT_ON = 'both': expected one of"),
    ({"CLIPTTA__LOSS": "entropy"}, r"CLIPTTA.LOSS = 'entropy'"),
    ({"CLIPTTA__LOSS_SIDES": "text"}, r"CLIPTTA.LOSS_SIDES = 'text'"),
    ({"CLIPTTA__NUM_SHOTS": 0}, r"CLIPTTA.NUM_SHOTS = 0"),
    ({"CLIPTTA__BETA_REG": -1.0}, r"CLIPTTA.BETA_REG = -1.0"),
    ({"CLIPTTA__USE_OOD_LOSS": True, "CLIPTTA__ADAPT_ON": "memory"}, r"CLIPTTA.DETECT_OOD / USE_OOD_LOSS need"),
    ({"CLIPTTA__DETECT_OOD": True, "CLIPTTA__ADAPT_ON": "memory"}, r"cliptta_old has no open-set parts"),
    ({"CLIPTTA__SCORE_TYPE": "sim"}, r"CLIPTTA.SCORE_TYPE = 'sim'"),
    ({"CLIPTTA__LOSS_OOD": "otsu"}, r"CLIPTTA.LOSS_OOD = 'otsu'"),
    ({"CLIPTTA__GAMMA": 0.0}, r"CLIPTTA.GAMMA = 0.0"),
    ({"CLIP__FREEZE_TEXT_ENCODER": False}, r"FREEZE_TEXT_ENCODER must be True"),
    ({"CLIP__PRECISION": "fp16"}, r"CLIP.PRECISION fp32"),
    ({"MODEL__RESET_AFTER_NUM_UPDATES": 5}, r"MODEL.RESET_AFTER_NUM_UPDATES must be 0"),
])
def test_refusals_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_method(_cfg(**overrides))


def test_shipped_configs_follow_the_authors_scripts():
    c10, c100, inet = (tiny_cfg(f"conf/{d}/cliptta.yaml") for d in ("cifar10_c", "cifar100_c", "imagenet_c"))
    for cfg in (c10, c100, inet):
        assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.OPTIM.STEPS, cfg.OPTIM.WD) == ("Adam", 1e-4, 10, 0.0)
        assert (cfg.CLIPTTA.BETA_TTA, cfg.CLIPTTA.BETA_REG, cfg.CLIPTTA.LOSS) == (1.0, 1.0, "soft")
        assert cfg.MIXED_PRECISION and cfg.CLIP.FREEZE_TEXT_ENCODER
    assert (c10.CLIPTTA.ADAPT_ON, c10.CLIPTTA.NUM_SHOTS, c10.CLIPTTA.SAMPLE_SIZE, c10.TEST.BATCH_SIZE) == \
        ("batch_and_memory", 4, 40, 128)
    assert (c100.CLIPTTA.ADAPT_ON, c100.CLIPTTA.NUM_SHOTS, c100.CLIPTTA.SAMPLE_SIZE) == ("batch_and_memory", 16, 128)
    assert (inet.CLIPTTA.ADAPT_ON, inet.CLIPTTA.NUM_SHOTS, inet.CLIPTTA.SAMPLE_SIZE, inet.TEST.BATCH_SIZE) == \
        ("memory", 16, 64, 256)
    assert c10.CLIP.PROMPT_TEMPLATE == ["a photo of a {}"] and inet.CLIP.PROMPT_TEMPLATE == ["A photo of a {}."]


# ---------------------------------------------------------------------- the harness
def test_one_run_through_the_harness(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise", "fog"], 6, OPTIM__STEPS=2,
                                           TEST__BATCH_SIZE=3)
    assert payload["provenance"]["method_cost"] == {
        "views_per_image": 1, "steps_per_batch": 2, "adapt_on": "batch_and_memory",
        "max_memory_images_per_step": 40, "forward_passes_per_batch": 5, "backward_passes_per_batch": 2}
    assert payload["provenance"]["adapted_parameters"] > 0
