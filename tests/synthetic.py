"""Small synthetic data sets written in exactly the real on-disk layouts, and config helpers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from conf import load_cfg


# A YAML exactly as written for the authors' BATCLIP suite (their cfgs/cifar10_c/ours.yaml format and keys).
AUTHORS_OURS_YAML = """
CORRUPTION:
  DATASET: cifar10_c
  SEVERITY:
    - 5
  TYPE:
    - gaussian_noise
    - shot_noise
MODEL:
  ADAPTATION: ours
  ARCH: ViT-B-16
  WEIGHTS: openai
  USE_CLIP: True
  EPISODIC: False
OPTIM:
  LR: 1e-3
  METHOD: AdamW  #1e-3, AdamW for vit-b16, 32
  STEPS: 1
  BETA: 0.9
  WD: 0.01
TEST:
  BATCH_SIZE: 200
CLIP:
  PRECISION: "fp32"
  FREEZE_TEXT_ENCODER: False
  PROMPT_MODE: "custom"
  PROMPT_TEMPLATE: ["a photo of a {}."]
"""


def write_cifar_c(root: Path, corruptions, per_severity: int = 20, num_classes: int = 10,
                  folder: str = "CIFAR-10-C", seed: int = 0, size: int = 32) -> Path:
    """DATA_DIR/<folder>/<corruption>.npy (5 severity blocks) + labels.npy, like RobustBench's files."""
    rng = np.random.default_rng(seed)
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, num_classes, per_severity).astype(np.uint8)
    np.save(out / "labels.npy", np.tile(labels, 5))
    for c in corruptions:
        np.save(out / f"{c}.npy", rng.integers(0, 256, (5 * per_severity, size, size, 3), dtype=np.uint8))
    return out


def write_imagenet_c(root: Path, corruptions, severities=(5,), wnids=None, per_class: int = 2,
                     size: int = 40, seed: int = 0) -> list[str]:
    """DATA_DIR/ImageNet-C/<corruption>/<severity>/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG; returns the
    'wnid/file' entries (the same files exist for every corruption and severity)."""
    from datasets.imagenet_c import imagenet_wnids
    rng = np.random.default_rng(seed)
    wnids = list(wnids or imagenet_wnids()[:4])
    entries = [f"{w}/ILSVRC2012_val_{1000 * k + j:08d}.JPEG" for k, w in enumerate(wnids) for j in range(per_class)]
    for c in corruptions:
        for s in severities:
            for e in entries:
                path = Path(root) / "ImageNet-C" / c / str(s) / e
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")
    return entries


def write_image_folders(root: Path, class_folders, per_class=2, seed=0, size=None) -> list[Path]:
    """root/<class>/<image>.png with small random RGB images (size x size, or varying sizes when None); classes
    written in reverse order so that nothing can rely on creation order. Returns the files written."""
    rng = np.random.default_rng(seed)
    files = []
    for name in reversed(list(class_folders)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            h, w = (size, size) if size else rng.integers(5, 20, size=2)
            path = root / name / f"img_{k:03d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return files


def tiny_cfg(cfg_file=None, **overrides):
    """A config for the tiny CLIP with random weights, on CPU, no workers; overrides as KEY=value with
    dots written as '__' (e.g. CORRUPTION__NUM_EX=8)."""
    opts = ["MODEL.ARCH", "tiny-clip-test", "MODEL.WEIGHTS", "none", "TEST.NUM_WORKERS", "0", "DEVICE", "cpu"]
    for key, value in overrides.items():
        opts += [key.replace("__", "."), value if isinstance(value, str) else repr(value)]
    return load_cfg(cfg_file, opts)
