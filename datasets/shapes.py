"""Shapes: a small synthetic image set drawn procedurally, and Shapes-C, its corrupted version.

The clean set is the suite's embedded default benchmark (no downloads): ten classes of filled shapes,
32x32 like CIFAR, each image with a random foreground colour, a random two-colour gradient background,
random position, size and a small rotation. Everything is a pure function of (seed, number of images),
so the demo's training set, its held-out test set and the -C benchmark built from it are identical on
every machine.

Shapes-C (``shapes_c``) is read exactly like CIFAR-10-C, from the RobustBench layout written by
``scripts/make_corrupted.py`` / ``scripts/demo.py``:

    DATA_DIR/Shapes-C/<corruption>.npy : uint8 (5N, 32, 32, 3), severity s in rows [(s-1)N, sN)
    DATA_DIR/Shapes-C/labels.npy       : (5N,) labels
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datasets.base import register_dataset
from datasets.cifar_c import CifarC
from datasets.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS

# Names chosen to read well in a prompt ("a photo of a crescent.").
SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "arrow", "crescent", "ring"]

# The clean splits are different seeds of the same generator: the demo CLIP trains on "train", its zero-shot
# accuracy is measured on "test", and Shapes-C is made from "test" (never seen in training).
SPLIT_SEEDS = {"train": 0, "test": 1}
IMAGE_SIZE = 32
# Shapes are drawn at SUPERSAMPLE x the final size and box-filtered down, so their edges are anti-aliased.
SUPERSAMPLE = 4
# Rotation stays small so that "square" and "diamond" (a tall rhombus) remain distinct classes.
MAX_ROTATION_DEG = 20.0
# Minimum difference in luminance (0..1) between the shape and the mean background colour.
MIN_CONTRAST = 0.3


def _luminance(rgb: np.ndarray) -> float:
    return float(np.dot(rgb, [0.299, 0.587, 0.114]) / 255.0)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    pts = np.stack([x, y + 2.5], 1)     # roughly centred on the origin
    return pts / np.abs(pts).max()


# Polygons in a unit frame (y up, radius about 1); circles, rings and crescents are drawn as ellipses.
_POLYGONS = {
    "square": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "triangle": np.array([[0.0, 1.0], [-0.9, -0.6], [0.9, -0.6]]),
    "star": _star(),
    "cross": np.array([[-0.3, 1], [0.3, 1], [0.3, 0.3], [1, 0.3], [1, -0.3], [0.3, -0.3], [0.3, -1], [-0.3, -1],
                       [-0.3, -0.3], [-1, -0.3], [-1, 0.3], [-0.3, 0.3]]),
    "heart": _heart(),
    "diamond": np.array([[0.0, 1.0], [0.6, 0.0], [0.0, -1.0], [-0.6, 0.0]]),
    "arrow": np.array([[-1, 0.25], [0.2, 0.25], [0.2, 0.65], [1, 0], [0.2, -0.65], [0.2, -0.25], [-1, -0.25]]),
}


def _shape_mask(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """An L-mode mask (255 inside the shape) of a randomly placed, scaled and rotated shape."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    radius = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    if name == "arrow":     # an arrow may point in any of the four directions
        angle += rng.integers(4) * math.pi / 2

    def circle(x, y, r, fill):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if name == "circle":
        circle(cx, cy, radius, 255)
    elif name == "ring":
        circle(cx, cy, radius, 255)
        circle(cx, cy, radius * rng.uniform(0.5, 0.65), 0)
    elif name == "crescent":
        circle(cx, cy, radius, 255)
        bite = rng.uniform(0, 2 * math.pi)
        offset = radius * rng.uniform(0.35, 0.5)
        circle(cx + offset * math.cos(bite), cy + offset * math.sin(bite), radius * 0.85, 0)
    else:
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = _POLYGONS[name] @ rot.T * radius
        draw.polygon([(cx + x, cy - y) for x, y in pts], fill=255)   # image y points down
    return mask


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """A linear gradient between two random colours in a random direction; returns (image, mean colour)."""
    c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    t = np.clip((xx * math.cos(theta) + yy * math.sin(theta)) + 0.5, 0, 1)[..., None]
    image = (1 - t) * c0 + t * c1
    return Image.fromarray(np.round(image).astype(np.uint8)), image.reshape(-1, 3).mean(0)


def render_shape(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (size, size, 3) uint8 of class ``label``, drawn with ``rng``."""
    big = size * SUPERSAMPLE
    background, mean_bg = _background(rng, big)
    while True:     # a foreground colour that stands out from the background
        colour = rng.integers(0, 256, 3)
        if abs(_luminance(colour) - _luminance(mean_bg)) >= MIN_CONTRAST:
            break
    foreground = Image.new("RGB", (big, big), tuple(int(c) for c in colour))
    image = Image.composite(foreground, background, _shape_mask(SHAPE_CLASSES[label], rng, big))
    return np.asarray(image.resize((size, size), Image.BOX))


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels, each class n // C or n // C + 1 times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def generate_shapes(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, size, size, 3) uint8 and their labels (n,) int64, a pure function of (n, seed, size)."""
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    labels = balanced_labels(n, len(SHAPE_CLASSES), np.random.default_rng([seed, 0]))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        # One generator per image: image i depends on (seed, i, its label) only.
        images[i] = render_shape(int(label), np.random.default_rng([seed, 1, i]), size)
    return images, labels


def clean_split(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The clean "train" or "test" split with ``n`` images."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown Shapes split '{split}'; choose one of {sorted(SPLIT_SEEDS)}")
    return generate_shapes(n, SPLIT_SEEDS[split])


@register_dataset
class ShapesC(CifarC):
    """The corrupted Shapes test split, read by the CIFAR-C loader (same layout, same code path)."""
    name = "shapes_c"
    folder = "Shapes-C"
    class_names = SHAPE_CLASSES
    # imagecorruptions implements the CIFAR extras too, so they can be generated and evaluated alike.
    domains = CORRUPTIONS + EXTRA_CORRUPTIONS

    def describe(self, cfg) -> dict:
        """The generator's record (seed, source, library version) when the folder has one."""
        meta = Path(cfg.DATA_DIR).expanduser() / self.folder / "meta.json"
        try:
            return {"generator": json.loads(meta.read_text())}
        except (OSError, ValueError):
            return {}
