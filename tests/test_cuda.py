"""The CUDA paths, on a GPU: every method's CUDA fp32 run agrees with its CPU run, BATCLIP under its authors'
precision (fp16 autocast, GradScaler from 1000) predicts as in fp32 on the overwhelming share of samples and
counts the steps its scaler skips, the norm baselines run with MIXED_PRECISION, runs are repeatable, and the
harness runs end to end with pinned memory and loader workers.

Marked ``cuda``: skipped, with the reason printed, where no GPU is present; on a GPU machine run them alone with
``pytest -m cuda``. They use the tiny CLIPs (the committed, trained Shapes CLIP where predictions must mean
something) and small batches, so they take seconds."""
import copy

import numpy as np
import pytest
import torch

import methods
from conf import config_names
from datasets.shapes import SHAPE_CLASSES, clean_split
from harness.build import check_method
from models import build_zero_shot_clip
from tests.synthetic import small_run_overrides, tiny_auxiliary_models, tiny_cfg

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device here; on a GPU machine run `pytest -m cuda`")]

# One config per registered method (CIFAR-10-C's), in fp32 everywhere for the CPU comparison.
PER_METHOD = sorted(n for n in config_names() if n.startswith("cifar10_c/"))
# fp32 everywhere: the suite's MIXED_PRECISION, BATCLIP's AUTOCAST and every method's own MIXED_PRECISION key.
FP32 = {"BATCLIP__AUTOCAST": False, "MIXED_PRECISION": False,
        **{f"{cls.mixed_precision_node}__MIXED_PRECISION": False for _, cls in methods.METHODS.items()
           if cls.mixed_precision_node}}
TOLERANCE = dict(rtol=2e-3, atol=2e-3)


@pytest.fixture(autouse=True)
def _exact_cuda_matmuls():
    """TF32 would make CUDA differ from the CPU by more than float rounding."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def method_pair(name: str, **overrides):
    """The same method on the CPU and on CUDA, around the same initial weights."""
    dataset, config = name.split("/")
    extra = {k: v for k, v in small_run_overrides(dataset, config).items() if not k.startswith("CORRUPTION__")}
    built = []
    for device in ("cpu", "cuda"):
        cfg = tiny_cfg(f"conf/{name}.yaml", DEVICE=device, **{**extra, **overrides})
        check_method(cfg)
        torch.manual_seed(0)
        model, _ = build_zero_shot_clip(cfg, [f"class {i}" for i in range(10)], list(cfg.CLIP.PROMPT_TEMPLATE), "cpu")
        auxiliary = {k: v.to(device) for k, v in tiny_auxiliary_models(cfg, model).items()}
        built.append(methods.build_method(cfg, copy.deepcopy(model).to(device), 10, **auxiliary))
        built[-1].begin_stream(3 * 8)                # the stream of test_cuda_fp32_agrees_with_the_cpu
    return built


def batches(n: int, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 3, 32, 32, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("name", PER_METHOD)
def test_cuda_fp32_agrees_with_the_cpu(name):
    cpu, gpu = method_pair(name, **FP32)
    for x in batches(3):
        torch.manual_seed(1)
        expected = cpu(x)
        torch.manual_seed(1)
        got = gpu(x.cuda()).cpu()
        torch.testing.assert_close(got, expected, **TOLERANCE)
    for p_cpu, p_gpu, name_ in zip(cpu.params, gpu.params, cpu.param_names):
        torch.testing.assert_close(p_gpu.detach().cpu(), p_cpu.detach(), **TOLERANCE, msg=name_)


def shapes_batches(n: int, size: int = 64):
    images, labels = clean_split("test", n * size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return list(x.split(size)), labels


def shapes_method(config: str, **overrides):
    cfg = tiny_cfg(f"conf/shapes_c/{config}.yaml", MODEL__ARCH="tiny-clip-shapes",
                   MODEL__WEIGHTS="models/checkpoints/tiny-clip-shapes.pt", DEVICE="cuda", **overrides)
    model, _ = build_zero_shot_clip(cfg, SHAPE_CLASSES, list(cfg.CLIP.PROMPT_TEMPLATE), "cuda")
    return methods.build_method(cfg, model, len(SHAPE_CLASSES))


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(np.mean(np.concatenate([(x.argmax(1) == y.argmax(1)).cpu().numpy() for x, y in zip(a, b)])))


def test_batclip_fp16_autocast_predicts_as_fp32_and_counts_skipped_steps():
    xs, _ = shapes_batches(10)
    half = shapes_method("batclip")                                   # the authors' precision: the default
    full = shapes_method("batclip", BATCLIP__AUTOCAST=False)
    assert half.precision_info()["autocast"] == "float16" and half.precision_info()["grad_scaler_init"] == 1000.0
    assert full.precision_info()["autocast"] is None and full.scaler is None
    share = agreement([half(x.cuda()) for x in xs], [full(x.cuda()) for x in xs])
    print(f"BATCLIP fp16 autocast vs fp32: {100 * share:.2f}% of {sum(len(x) for x in xs)} predictions agree; "
          f"{half.scaler_skipped_steps} of {len(xs)} scaler steps skipped")
    assert share >= 0.98
    assert isinstance(half.scaler_skipped_steps, int) and 0 <= half.scaler_skipped_steps <= len(xs)


@pytest.mark.parametrize("config", ["tent", "source"])
def test_norm_baselines_with_mixed_precision(config):
    xs, _ = shapes_batches(5)
    mixed = shapes_method(config, MIXED_PRECISION=True)
    full = shapes_method(config)
    assert mixed.precision_info()["autocast"] == "float16"
    outputs = [mixed(x.cuda()) for x in xs]
    assert all(torch.isfinite(o).all() for o in outputs)
    share = agreement(outputs, [full(x.cuda()) for x in xs])
    print(f"{config} with MIXED_PRECISION vs fp32: {100 * share:.2f}% of predictions agree")
    assert share >= 0.98


@pytest.mark.parametrize("name", PER_METHOD)
def test_cuda_runs_repeat_exactly(name):
    """Same config and seed on the same GPU: identical logits (every method here avoids atomics-based kernels in
    its own code; cuBLAS and cuDNN are deterministic for these shapes with TF32 off)."""
    outputs = []
    for _ in range(2):
        _, gpu = method_pair(name, **FP32)
        torch.manual_seed(1)
        outputs.append([gpu(x.cuda()).cpu() for x in batches(2)])
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_the_harness_runs_on_cuda_with_pinned_memory_and_workers(tmp_path):
    from harness.run import evaluate
    from tests.synthetic import write_cifar_c
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=16)
    cfg = tiny_cfg("conf/cifar10_c/batclip.yaml", DEVICE="cuda", TEST__NUM_WORKERS=2, TEST__BATCH_SIZE=8,
                   DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=["gaussian_noise", "fog"])
    payload = evaluate(cfg, progress=False)
    prov = payload["provenance"]
    assert prov["device"].startswith("cuda") and prov["method_precision"]["autocast"] == "float16"
    assert [r["n"] for r in payload["records"]] == [16, 16] and prov["grad_scaler_skipped_steps"] is not None
