#!/usr/bin/env python
"""Time one BATCLIP step (forward of both towers, loss, backward, optimizer step) and its peak memory:
our implementation (methods/batclip.py: vectorised loss, text tokens cut after the longest prompt's EOT)
against a straightforward one written independently below (per-class Python loops for L_pm and L_sp as in
the authors' code, open_clip's encode_text on the full 77-token prompts), on the same model and inputs.

Two shapes: CIFAR (10 classes, batch 200) and ImageNet (1000 classes, batch 64). Random CLIP weights
(MODEL.WEIGHTS none; speed does not depend on the weights). Before timing, the two losses are computed in
fp32 on the same batch and must agree (an extra cross-check of the vectorised loss).

    .venv/bin/python scripts/bench_batclip_step.py                      # ViT-B-16, both shapes
    .venv/bin/python scripts/bench_batclip_step.py --arch tiny-clip-test --batch 8   # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from harness.build import load_cfg  # noqa: E402
from harness.cli import entry_point  # noqa: E402
from datasets.class_names import CIFAR10_CLASSES, IMAGENET_CLASSES  # noqa: E402
from methods.batclip import batclip_loss, precision_plan  # noqa: E402
from models import build_zero_shot_clip  # noqa: E402

SHAPES = {"cifar": ("conf/cifar10_c/batclip.yaml", CIFAR10_CLASSES, 200),
          "imagenet": ("conf/imagenet_c/batclip.yaml", IMAGENET_CLASSES, 64)}
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory of a block: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak resident set
    size (VmHWM, reset through /proc/self/clear_refs) minus the resident size before the block."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.note = device, None, ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS
            except OSError:
                self.note = " (VmHWM not resettable: lower bound)"
            self.start = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.bytes = _proc_status_kib("VmHWM") * 1024 - self.start
        return False


# ---------------------------------------------------------------------------------------------- the straightforward step
class StraightforwardBatclip:
    """BATCLIP written plainly: full-length text, a loop over the pseudo-label classes for each term."""

    def __init__(self, cfg, zero_shot, class_names, template, device, use_autocast):
        self.clip = zero_shot.clip
        self.mean, self.std = zero_shot.mean, zero_shot.std
        self.tokens = zero_shot.tokenizer([template.format(c) for c in class_names]).to(device)   # (C, 77)
        self.params = [p for p in self.clip.parameters() if p.requires_grad]
        self.cfg, self.device = cfg, device
        self.plan = precision_plan(device.type, use_autocast)
        self.fresh_optimizer()

    def fresh_optimizer(self):
        o = self.cfg.OPTIM
        opt = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[o.METHOD]
        self.optimizer = opt(self.params, lr=o.LR, betas=(o.BETA, 0.999), weight_decay=o.WD)
        # Disabled (fp32), the scaler passes loss and step through unchanged.
        self.scaler = torch.amp.GradScaler("cuda", init_scale=self.cfg.BATCLIP.GRAD_SCALER_INIT,
                                           enabled=self.plan.grad_scaler)

    def forward(self, x, autocast: bool):
        ctx = (torch.autocast(self.device.type, dtype=self.plan.autocast_dtype)
               if autocast and self.plan.autocast_dtype is not None else contextlib.nullcontext())
        with ctx:
            image_pre = self.clip.encode_image((x - self.mean) / self.std)
            text_pre = self.clip.encode_text(self.tokens)
            image = image_pre / image_pre.norm(dim=1, keepdim=True)
            text = text_pre / text_pre.norm(dim=1, keepdim=True)
            logits = self.clip.logit_scale.detach().exp() * image @ text.t()
        return logits.float(), image_pre.float(), text.float()

    @staticmethod
    def loss(logits, image_pre, text):
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        labels = logits.argmax(1)
        classes = torch.unique(labels).tolist()
        means = [image_pre[labels == c].mean(0) for c in classes]
        projection = sum(torch.dot(m, text[c]) for m, c in zip(means, classes)) / len(classes)
        units = [m / m.norm() for m in means]
        separation = logits.new_zeros(())
        for i in range(len(units)):
            for j in range(len(units)):
                if i != j:
                    separation = separation + (1 - torch.dot(units[i], units[j]))
        return entropy - projection - separation

    def step(self, x):
        loss = self.loss(*self.forward(x, autocast=True))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


# ---------------------------------------------------------------------------------------------- bench
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(name, args, device):
    """The same model (seeded random weights), config and images in every process."""
    yaml, class_names, default_batch = SHAPES[name]
    cfg = load_cfg(ROOT / yaml, ["MODEL.ARCH", args.arch, "MODEL.WEIGHTS", "none", "DEVICE", str(device),
                                 "BATCLIP.AUTOCAST", str(not args.no_autocast)])
    template = cfg.CLIP.PROMPT_TEMPLATE[0]
    torch.manual_seed(0)
    model, info = build_zero_shot_clip(cfg, class_names, [template], device)
    ours = methods.build_method(cfg, model, len(class_names))      # frees the norm affines of both towers
    plain = StraightforwardBatclip(cfg, model, class_names, template, device, cfg.BATCLIP.AUTOCAST)
    batch = args.batch or default_batch
    size = model.image_size
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, info, ours, plain, x


def worker(spec, args, device):
    """One implementation in a fresh process, so that the peak resident size is its own."""
    name, impl = spec.split(":")
    model, info, ours, plain, x = setup(name, args, device)
    step = ours.forward if impl == "ours" else plain.step
    times = []
    with PeakMemory(device) as mem:
        for _ in range(args.warmup):
            step(x)
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            step(x)
            sync(device)
            times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "peak_bytes": mem.bytes, "note": mem.note}))


def cross_check(name, args, device):
    """fp32, source weights, one batch: the two implementations give the same pseudo-labels and loss."""
    model, info, ours, plain, x = setup(name, args, device)
    with torch.no_grad():
        out = model(x, return_features=True)
        ours_loss = batclip_loss(out.logits, out.image_pre_features, out.text_features).total
        logits, image_pre, text = plain.forward(x, autocast=False)
        plain_loss = plain.loss(logits, image_pre, text)
    assert torch.equal(out.logits.argmax(1), logits.argmax(1)), "pseudo-labels differ between implementations"
    torch.testing.assert_close(ours_loss, plain_loss, rtol=1e-4, atol=1e-3 * (1 + abs(plain_loss.item())))
    return info, ours, plain, x, ours_loss.item(), plain_loss.item()


def bench_shape(name, args, device, argv):
    info, ours, plain, x, ours_loss, plain_loss = cross_check(name, args, device)
    batch, classes = x.shape[0], plain.tokens.shape[0]
    autocast = "fp16" if ours.precision.autocast_dtype else "off (fp32)"
    del ours, plain, x
    print(f"\n{name}: {classes} classes, batch {batch}, {args.arch} ({info['num_parameters']:,} params, "
          f"random weights), {device}, autocast {autocast}, text tokens {info['text_tokens_length']} (ours) "
          f"vs 77, median of {args.repeats} step(s) after {args.warmup} warm-up")
    print(f"  cross-check (fp32): loss ours {ours_loss:.6f} vs straightforward {plain_loss:.6f}")
    results = {}
    mib = 2 ** 20
    for impl in ("straightforward", "ours"):
        run = subprocess.run([sys.executable, __file__, *argv, "--worker", f"{name}:{impl}"], capture_output=True,
                             text=True, cwd=ROOT)
        if run.returncode:
            # e.g. out of memory: say so and still measure the other implementation
            last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
            print(f"  {impl:16s} failed (exit {run.returncode}): {last[:300]}")
            continue
        r = results[impl] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"  {impl:16s} {r['seconds'] * 1e3:9.1f} ms/step  {batch / r['seconds']:9.1f} images/s  "
              f"peak memory {r['peak_bytes'] / mib:9.1f} MiB{r['note']}")
    if len(results) < 2:
        return
    plain_r, ours_r = results["straightforward"], results["ours"]
    print(f"  speed-up {plain_r['seconds'] / ours_r['seconds']:.2f}x, peak memory straightforward / ours "
          f"{plain_r['peak_bytes'] / max(ours_r['peak_bytes'], 1):.2f}x")


@entry_point
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip architecture (random weights)")
    parser.add_argument("--shape", choices=["cifar", "imagenet", "both"], default="both")
    parser.add_argument("--batch", type=int, default=0, help="image batch (default: 200 CIFAR, 64 ImageNet)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--no-autocast", action="store_true", help="fp32 on CUDA too (BATCLIP.AUTOCAST False)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps (the median is reported)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if args.worker:
        worker(args.worker, args, device)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    for name in (["cifar", "imagenet"] if args.shape == "both" else [args.shape]):
        bench_shape(name, args, device, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
