"""Speed and memory of every method at the paper's shapes, with the compute of the real model (ViT-B-16 with
random weights: the suite never falls back to weights silently, MODEL.WEIGHTS none says so explicitly).

For each shape (CIFAR-10-C: 10 classes, batch 200; CIFAR-100-C: 100 classes, batch 200; ImageNet-C: 1000 classes,
batch 64; TPT and VTE at their configs' batch of 1 image with 64 views), every method's shipped config runs
--warmup untimed and --steps timed batches; printed: ms per batch, images/s, peak memory. Beside them: the image
tower's forward + backward alone (the floor of one adaptation step), BATCLIP's straightforward step
(scripts/bench_batclip_step.py), and the data loader's images/s with the default worker count (CIFAR-C: 32x32
up-sampled to 224; ImageNet-C: JPEG decoding) against what the fastest adapting method consumes.

    python scripts/bench_methods.py --device cuda --write docs/performance.md     # on a GPU
    python scripts/bench_methods.py --device cpu --shapes cifar10 --batch 8 --steps 1 --warmup 1   # a CPU check
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import methods  # noqa: E402
from conf import config_names  # noqa: E402
from datasets import get_dataset  # noqa: E402
from datasets.transforms import clip_image_transform  # noqa: E402
from harness.build import check_method, load_cfg, needs_source_data  # noqa: E402
from harness.cli import entry_point  # noqa: E402
from harness.results import package_versions  # noqa: E402
from harness.stream import SegmentStream, make_loader  # noqa: E402
from models import build_auxiliary_clip, build_zero_shot_clip, model_spec  # noqa: E402
from models.build import resolve_auxiliary_weights  # noqa: E402

SHAPES = {"cifar10": ("cifar10_c", 200), "cifar100": ("cifar100_c", 200), "imagenet": ("imagenet_c", 64)}
MIB = 2 ** 20


def _step_bench():
    spec = importlib.util.spec_from_file_location("bench_batclip_step", REPO_ROOT / "scripts" / "bench_batclip_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STEP = _step_bench()


def timed(step, x, device, warmup: int, steps: int) -> tuple[float, int | None]:
    """(seconds per call, peak bytes) of ``step(x)``."""
    with STEP.PeakMemory(device) as memory:
        for _ in range(warmup):
            step(x)
        STEP.sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(x)
        STEP.sync(device)
        seconds = (time.perf_counter() - start) / steps
    return seconds, memory.bytes


def method_rows(shape: str, args, device) -> list[dict]:
    dataset_name, paper_batch = SHAPES[shape]
    dataset = get_dataset(dataset_name)
    rows = []
    names = sorted(n.split("/")[1] for n in config_names() if n.startswith(dataset_name + "/"))
    for config in [n for n in names if args.methods == ["all"] or n in args.methods]:
        # DPE's CuPL descriptions (files not shipped) change only the text features computed once at start-up
        cupl = ["DPE.TEXT_PROTOTYPES", "templates"] if config == "dpe" else []
        # A config shipped for a ResNet CLIP (the BatchNorm methods: RN50) runs on --resnet-arch
        own_tower = model_spec(load_cfg(f"conf/{dataset_name}/{config}.yaml").MODEL.ARCH).image_tower
        arch = args.resnet_arch if own_tower == "resnet" else args.arch
        opts = ["MODEL.ARCH", arch, "MODEL.WEIGHTS", "none", "DEVICE", str(device), *cupl]
        cfg = load_cfg(f"conf/{dataset_name}/{config}.yaml", opts)
        # A further CLIP the method needs (RLCF's reward model): the benchmarked architecture, random weights too
        auxiliary_keys = methods.METHODS.get(cfg.MODEL.ADAPTATION).auxiliary_models
        if auxiliary_keys:
            opts += [v for keys in auxiliary_keys.values() for v in (keys[0], arch, keys[1], "none")]
            cfg = load_cfg(f"conf/{dataset_name}/{config}.yaml", opts)
        check_method(cfg)
        batch = args.batch or (cfg.TEST.BATCH_SIZE if cfg.TEST.BATCH_SIZE == 1 else paper_batch)
        templates = dataset.prompt_templates(cfg)
        torch.manual_seed(0)
        model, _ = build_zero_shot_clip(cfg, dataset.class_names, templates, device)
        auxiliary = {keyword: build_auxiliary_clip(cfg, resolve_auxiliary_weights(cfg, *keys), dataset.class_names,
                                                   templates, device)[0]
                     for keyword, keys in auxiliary_keys.items()}
        x = torch.rand(batch, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
        x = x.to(device)
        if needs_source_data(cfg, methods.METHODS.get(cfg.MODEL.ADAPTATION)):
            # EATA's Fisher term, computed at set-up (not timed): one batch of random source images stands in
            auxiliary["source_loader"] = [(torch.rand_like(x), torch.zeros(batch, dtype=torch.long))]
        method = methods.build_method(cfg, model, len(dataset.class_names), **auxiliary)
        method.begin_stream((args.warmup + args.steps) * batch)
        seconds, peak = timed(method, x, device, args.warmup, args.steps)
        rows.append({"shape": shape, "method": config, "batch": batch, "seconds": seconds, "peak": peak,
                     "precision": method.precision_info()})
        if config == "batclip":
            rows.append(_floor_row(shape, model, x, device, args))
            rows.append(_straightforward_row(shape, cfg, model, dataset, x, device, args))
        del model, method
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _floor_row(shape, model, x, device, args) -> dict:
    """The image tower's forward + backward to its norm parameters: what any image-tower adaptation step costs."""
    def step(images):
        model.zero_grad(set_to_none=True)
        model.encode_image(images).float().square().mean().backward()
    seconds, peak = timed(step, x, device, args.warmup, args.steps)
    return {"shape": shape, "method": "(image tower fwd+bwd)", "batch": len(x), "seconds": seconds, "peak": peak}


def _straightforward_row(shape, cfg, model, dataset, x, device, args) -> dict:
    plain = STEP.StraightforwardBatclip(cfg, model, dataset.class_names, cfg.CLIP.PROMPT_TEMPLATE[0], device,
                                        cfg.BATCLIP.AUTOCAST)
    try:
        seconds, peak = timed(plain.step, x, device, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        return {"shape": shape, "method": "(batclip straightforward)", "batch": len(x), "seconds": None,
                "peak": None}
    return {"shape": shape, "method": "(batclip straightforward)", "batch": len(x), "seconds": seconds, "peak": peak}


def loader_rows(args, device) -> list[dict]:
    """Images/s of the harness's loader (default TEST.NUM_WORKERS) on synthetic files in the real layouts."""
    cfg = load_cfg("conf/cifar10_c/source.yaml", ["DEVICE", str(device)])
    transform = clip_image_transform(224)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        n = args.loader_images
        cifar = root / "CIFAR-10-C"
        cifar.mkdir()
        np.save(cifar / "fog.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
        np.save(cifar / "labels.npy", np.tile(rng.integers(0, 10, n), 5).astype(np.uint8))
        cifar_part = get_dataset("cifar10_c").build_domain(load_cfg("conf/cifar10_c/source.yaml",
                                                                    ["DATA_DIR", str(root)]), "fog", 5)
        wnid = "n01440764"
        folder = root / "ImageNet-C" / "fog" / "5" / wnid
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i:05d}.JPEG",
                                                                                        quality=85)
        (root / "list.txt").write_text("".join(f"{wnid}/{i:05d}.JPEG\n" for i in range(n)))
        imagenet_part = get_dataset("imagenet_c").build_domain(load_cfg(
            "conf/imagenet_c/source.yaml", ["DATA_DIR", str(root), "CORRUPTION.IMAGENET_C_LIST",
                                            str(root / "list.txt")]), "fog", 5)
        for label, part, batch in (("CIFAR-C, 32 -> 224 bicubic", cifar_part, 200),
                                   ("ImageNet-C, JPEG decode", imagenet_part, 64)):
            stream = SegmentStream([part], np.arange(len(part)), transform)
            loader = make_loader(stream, _with_batch(cfg, batch), device)
            start = time.perf_counter()
            seen = sum(len(images) for images, _, _ in loader)
            rows.append({"loader": label, "workers": cfg.TEST.NUM_WORKERS, "images_per_s": seen /
                         (time.perf_counter() - start)})
    return rows


def _with_batch(cfg, batch: int):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.BATCH_SIZE = batch
    return cfg


def report(rows, loaders, device, args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    versions = package_versions()
    lines = [f"Device: {name}; {args.arch} random weights; torch {versions['torch']}, open_clip "
             f"{versions['open_clip_torch']}, Python {platform.python_version()}.",
             f"Command: `python scripts/bench_methods.py {' '.join(args.argv)}`", "",
             "| shape | method | batch | ms / batch | images / s | peak memory (MiB) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ms = "out of memory" if r["seconds"] is None else f"{1e3 * r['seconds']:.1f}"
        ips = "-" if r["seconds"] is None else f"{r['batch'] / r['seconds']:.3g}"
        peak = "-" if r["peak"] is None else f"{r['peak'] / MIB:.0f}"
        lines.append(f"| {r['shape']} | {r['method']} | {r['batch']} | {ms} | {ips} | {peak} |")
    if loaders:
        lines += ["", "| data loader | workers | images / s |", "|---|---:|---:|"]
        lines += [f"| {r['loader']} | {r['workers']} | {r['images_per_s']:.0f} |" for r in loaders]
    return "\n".join(lines) + "\n"


@entry_point
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--resnet-arch", default="RN50", help="for the configs shipped for a ResNet CLIP (bntest, ...)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["all"], help="config names, or all")
    parser.add_argument("--batch", type=int, default=0, help="override every batch size (0: the paper's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loader-images", type=int, default=512, help="images per loader measurement (0: skip)")
    parser.add_argument("--write", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    args.argv = argv
    device = torch.device(args.device)
    rows = [row for shape in args.shapes for row in method_rows(shape, args, device)]
    loaders = loader_rows(args, device) if args.loader_images else []
    text = report(rows, loaders, device, args)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
