"""Train the demo's tiny CLIP contrastively on the clean Shapes training split (CPU, a few minutes).

    python scripts/train_demo_clip.py                       # writes models/checkpoints/tiny-clip-shapes.pt

Each training image gets a caption from a random prompt template and its class name ("a blurry photo of a
star."), so zero-shot prompts work afterwards. The loss is CLIP's symmetric image-text InfoNCE; because ten
classes repeat many times in a batch, every caption of the image's class counts as a positive (uniform
soft targets over them) instead of a false negative. Only clean images are seen in training: no noise, blur
or colour augmentation, so the corruptions of Shapes-C are a real distribution shift for the model.

Deterministic from --seed for a given --threads (float sums depend on the thread count). The checkpoint
is an open_clip state_dict (fp16 storage; loaded back into the fp32 model by
``open_clip.create_model(arch, pretrained=path)``), with a JSON record beside it holding the settings and
the clean zero-shot accuracy on the held-out test split, measured on the checkpoint as saved.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.cli import entry_point  # noqa: E402

DEFAULT_ARCH = "tiny-clip-shapes"
# The prompt used by the demo configs (conf/shapes_c/*.yaml), so the recorded accuracy is the demo's.
EVAL_TEMPLATE = "a photo of a {}."


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float [0, 1] (N, 3, H, W), as the harness' ToTensor gives."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


def build_model(arch: str, class_names, templates, weights: str = "none"):
    """The harness' zero-shot model (same normalisation and text path) around an open_clip ``arch``."""
    from models.clip import zero_shot_head
    from models.weights import load_clip
    return zero_shot_head(load_clip(arch, weights), arch, class_names, templates)


@torch.no_grad()
def zero_shot_accuracy(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(to_tensor(images[start:start + batch_size]))
        correct += int((logits.argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(images)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(1)).sum(1).mean()


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(args) -> dict:
    from datasets.class_names import CIFAR_TEMPLATES
    from datasets.shapes import SHAPE_CLASSES, clean_split

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    images, labels = clean_split("train", args.train_size)
    x_all, y_all = to_tensor(images), torch.from_numpy(labels)
    print(f"clean Shapes train split: {len(images)} images ({time.perf_counter() - t0:.1f} s)", flush=True)

    templates = list(CIFAR_TEMPLATES)
    model = build_model(args.arch, SHAPE_CLASSES, templates)
    clip = model.clip
    clip.train()
    decay = [p for p in clip.parameters() if p.ndim >= 2]
    no_decay = [p for p in clip.parameters() if p.ndim < 2]     # norms, biases, logit scale
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed)
    num_templates = len(templates)
    order, cursor = torch.randperm(len(x_all), generator=generator), 0
    start = time.perf_counter()
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(x_all), generator=generator), 0
        idx = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        x, y = x_all[idx], y_all[idx]
        # One random caption per image; model.tokens holds every (class, template) caption, class-major.
        caption = y * num_templates + torch.randint(num_templates, (len(y),), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        text = F.normalize(model.encode_tokens(model.tokens), dim=-1)[caption]
        image = F.normalize(model.encode_image(x), dim=-1)
        logits = clip.logit_scale.exp() * image @ text.t()
        positives = (y[:, None] == y[None, :]).float()
        targets = positives / positives.sum(1, keepdim=True)
        loss = 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.t(), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))   # CLIP's cap on the temperature
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.4f}  logit scale "
                  f"{clip.logit_scale.exp().item():6.2f}  {time.perf_counter() - start:6.1f} s", flush=True)
    train_seconds = time.perf_counter() - start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if args.storage == "fp16" else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in clip.state_dict().items()}
    torch.save(state, out)

    # The recorded accuracy is measured on the checkpoint as saved, loaded the way the suite loads it.
    test_images, test_labels = clean_split("test", args.test_size)
    reloaded = build_model(args.arch, SHAPE_CLASSES, [EVAL_TEMPLATE], weights=str(out))
    accuracy = zero_shot_accuracy(reloaded, test_images, test_labels)
    train_accuracy = zero_shot_accuracy(reloaded, images[:args.test_size], labels[:args.test_size])
    record = {
        "arch": args.arch, "checkpoint": out.name, "storage": args.storage,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "bytes": out.stat().st_size,
        "num_parameters": sum(p.numel() for p in clip.parameters()),
        "train": {k: getattr(args, k) for k in ("seed", "train_size", "steps", "batch_size", "lr", "wd", "warmup",
                                                "threads")},
        "train_seconds": round(train_seconds, 1),
        "eval_template": EVAL_TEMPLATE,
        "clean_zero_shot_accuracy": {"split": "test", "n": args.test_size, "accuracy": accuracy},
        "clean_train_accuracy": {"split": "train", "n": args.test_size, "accuracy": train_accuracy},
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out} ({out.stat().st_size / 2 ** 20:.2f} MiB, {args.storage}); training took "
          f"{train_seconds:.0f} s")
    print(f"clean zero-shot accuracy ('{EVAL_TEMPLATE}'): test {100 * accuracy:.2f}% (n={args.test_size}), "
          f"train {100 * train_accuracy:.2f}%")
    return record


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="open_clip model name (models/model_configs/)")
    parser.add_argument("--out", default=str(REPO_ROOT / "models" / "checkpoints" / f"{DEFAULT_ARCH}.pt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=20000, help="clean training images")
    parser.add_argument("--test-size", type=int, default=2000, help="held-out clean images for the accuracy")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--wd", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (fixed for reproducibility; 1 copes best with a busy machine)")
    parser.add_argument("--storage", choices=("fp16", "fp32"), default="fp16", help="checkpoint tensor dtype")
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        train(args)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
