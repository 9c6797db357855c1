"""LAME against an independent transcription of the anchor suite's classification/methods/lame.py (and CLIPTTA's
ttavlm/methods/lame.py for LAME.UNARY_LOGITS cosine) on both tiny CLIP towers: every batch's assignments equal,
the comparison failing when one line of the transcription changes, transductive over the batch and stateless
across batches, refusals, reset and configs."""
import copy
import math

import pytest
import torch

import methods
from conf import ConfigError
from harness.build import check_method, config_warnings
from tests.synthetic import tiny_cfg

N_IMAGES, N_BATCHES = 12, 3
# Measured (fp32, both towers, every affinity): max |Y - Y_ref| = 6e-8 (default CPU path), 1.2e-7 (AVX2).
TOLERANCE = 5e-7


def _cfg(arch="tiny-clip-test", **overrides):
    return tiny_cfg(MODEL__ARCH=arch, MODEL__ADAPTATION="lame", **overrides)


def _batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(N_IMAGES, 3, 32, 32, generator=generator) for _ in range(N_BATCHES)]


# ------------------------------------------------------------------ the transcription (anchor lame.py, line by line)
def reference_lame(model, images, affinity="rbf", knn=5, force_symmetry=False, cosine_unary=False, change=None):
    """Y of the anchor's LAME.forward_and_adapt: features = the encoder's output (CLIP's image embedding),
    outputs = the classifier's (ZeroShotCLIP's logits), the kernel from the normalised features."""
    with torch.no_grad():
        features = model.encode_image(images)
        normalised = features / features.norm(dim=1, keepdim=True)
        text = model.text_features()[0]
        scale = 1.0 if cosine_unary else model.logit_scale
        outputs = scale * normalised @ text.T
        unary = -torch.log(outputs.softmax(dim=1) + 1e-10)
        x = torch.nn.functional.normalize(features, p=2, dim=-1)
        n = x.size(0)
        dist = torch.stack([torch.stack([torch.sqrt(((x[i] - x[j]) ** 2).sum()) for j in range(n)])
                            for i in range(n)])
        if affinity == "kNN":
            kernel = torch.zeros(n, n)
            for i in range(n):
                order = sorted(range(n), key=lambda j: (float(dist[i, j]), j != i))
                for j in order[1:min(knn + 1, n)]:
                    kernel[i, j] = 1.0
        elif affinity == "rbf":
            k = min(knn + 1 if change == "rbf_bandwidth" else knn, n)
            kth = torch.stack([torch.sort(dist[i]).values[k - 1] for i in range(n)])
            sigma = kth.mean()
            kernel = torch.exp(-dist ** 2 / (2 * sigma ** 2))
        else:
            kernel = x @ x.T
        if force_symmetry:
            kernel = 0.5 * (kernel + kernel.T)
        if change == "kernel_transposed":
            kernel = kernel.T
        return _laplacian(unary, kernel, change)


def _laplacian(unary, kernel, change):
    old_energy = float("inf")
    y = (-unary).softmax(-1)
    for i in range(100):
        pairwise = (0.5 if change == "half_laplacian" else 1.0) * kernel @ y
        y = (-unary + pairwise).softmax(-1)
        energy = float((unary * y - pairwise * y + y * torch.log(y.clip(1e-20))).sum())
        if i > 1 and abs(energy - old_energy) <= 1e-8 * abs(old_energy):
            break
        old_energy = energy
    return y


def _run_ours(model, batches, **overrides):
    method = methods.build_method(_cfg(**overrides), model, 10)
    return [method(b).exp() for b in batches], method


@pytest.mark.parametrize("tower", ["vit", "resnet"])
@pytest.mark.parametrize("affinity,force_symmetry,cosine", [("rbf", False, False), ("kNN", False, False),
                                                            ("kNN", True, False), ("linear", False, False),
                                                            ("kNN", False, True)])
def test_lame_matches_the_transcription(tiny_clip, tiny_clip_rn, tower, affinity, force_symmetry, cosine):
    model = tiny_clip if tower == "vit" else tiny_clip_rn
    arch = "tiny-clip-test" if tower == "vit" else "tiny-clip-test-rn"
    batches = _batches()
    reference_model = copy.deepcopy(model)
    ours, _ = _run_ours(model, batches, arch=arch, LAME__AFFINITY=affinity, LAME__FORCE_SYMMETRY=force_symmetry,
                        LAME__UNARY_LOGITS="cosine" if cosine else "model")
    for batch, y in zip(batches, ours):
        expected = reference_lame(reference_model, batch, affinity, 5, force_symmetry, cosine)
        torch.testing.assert_close(y, expected, atol=TOLERANCE, rtol=0)
    # The model is untouched: every parameter and buffer as before.
    for (name, a), (_, b) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("change", ["rbf_bandwidth", "kernel_transposed", "half_laplacian"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, change):
    """With kNN's 0/1 kernel (asymmetric) the transposed kernel changes Y; the rbf bandwidth (the k-th or the
    (k+1)-th distance) and the Laplacian term's weight matter for the default affinity."""
    batches = _batches()
    affinity = "kNN" if change == "kernel_transposed" else "rbf"
    reference_model = copy.deepcopy(tiny_clip)
    ours, _ = _run_ours(tiny_clip, batches, LAME__AFFINITY=affinity)
    difference = max(float((y - reference_lame(reference_model, b, affinity, change=change)).abs().max())
                     for b, y in zip(batches, ours))
    # measured: 4.2e-3 (rbf bandwidth), 0.79 (transposed kernel), 0.70 (half the Laplacian term); tolerance 5e-7
    assert difference > 10 * TOLERANCE


def test_the_batch_is_the_unit_and_nothing_carries_over(tiny_clip):
    """Transductive: an image's assignment depends on the rest of its batch (the batch split in two gives
    something else); stateless: the same batch gives the same output whatever came before."""
    batches = _batches(1)
    method = methods.build_method(_cfg(LAME__AFFINITY="kNN"), tiny_clip, 10)
    whole = method(batches[0])
    halves = torch.cat([method(h) for h in batches[0].split(N_IMAGES // 2)])
    assert (whole - halves).abs().max() > 1e-3
    method(batches[1])
    assert torch.equal(method(batches[0]), whole)


def test_batch_of_one_and_identical_images(tiny_clip):
    """rbf's bandwidth is 0 for one image or identical ones (the reference: NaN); ours takes its limit."""
    method = methods.build_method(_cfg(), tiny_clip, 10)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for batch in (image, image.repeat(3, 1, 1, 1)):
        out = method(batch)
        assert torch.isfinite(out).all()
        with torch.no_grad():
            zero_shot = tiny_clip(batch).softmax(1)
        # W = all ones on the copies: each row's exponent gains n * Y, the argmax stays the zero-shot one.
        assert out.argmax(1).tolist() == zero_shot.argmax(1).tolist()


def test_reset_and_no_parameters(tiny_clip):
    batches = _batches(2)
    method = methods.build_method(_cfg(), tiny_clip, 10)
    assert method.optimizer is None and method.num_trainable_params() == 0
    first = method(batches[0])
    method(batches[1])
    method.reset()
    assert torch.equal(method(batches[0]), first)
    assert method.cost_info() == {"views_per_image": 1, "forward_passes_per_batch": 1,
                                  "backward_passes_per_batch": 0}


def test_bad_lame_config_is_refused():
    with pytest.raises(ConfigError, match="LAME.AFFINITY"):
        check_method(_cfg(LAME__AFFINITY="knn"))
    with pytest.raises(ConfigError, match="LAME.KNN"):
        check_method(_cfg(LAME__KNN=0))
    with pytest.raises(ConfigError, match="LAME.UNARY_LOGITS"):
        check_method(_cfg(LAME__UNARY_LOGITS="scaled"))


def test_sigma_is_inert_as_in_the_anchor_suite(tiny_clip):
    assert any("LAME.SIGMA" in w for w in config_warnings(_cfg(LAME__SIGMA=2.0)))
    batch = _batches()[0]
    a = methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10)(batch)
    b = methods.build_method(_cfg(LAME__SIGMA=2.0), tiny_clip, 10)(batch)
    assert torch.equal(a, b)


def test_shipped_configs_are_the_anchor_suites():
    for dataset, batch_size in [("cifar10_c", 200), ("cifar100_c", 200), ("imagenet_c", 64), ("shapes_c", 200)]:
        cfg = tiny_cfg(f"conf/{dataset}/lame.yaml")
        assert (cfg.LAME.AFFINITY, cfg.LAME.KNN, cfg.LAME.SIGMA, cfg.LAME.FORCE_SYMMETRY) == ("rbf", 5, 1.0, False)
        assert cfg.LAME.UNARY_LOGITS == "model" and cfg.TEST.BATCH_SIZE == batch_size, dataset
    assert math.isclose(tiny_cfg("conf/cifar10_c/lame.yaml").LAME.SIGMA, 1.0)
