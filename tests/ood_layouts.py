"""Tiny synthetic OOD sets written in exactly the layouts users have on disk (datasets/ood_arrays.py): SVHN's
test .mat, CLIPTTA's SVHN-C, Tiny-ImageNet's validation set and Hendrycks' Tiny-ImageNet-C. Each writer returns
what it wrote, for tests to compare what is read against."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datasets.ood_arrays import TINY_IMAGENET_CLASSES, TINY_IMAGENET_WNIDS


def write_svhn(root: Path, n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """root/SVHN/test_32x32.mat as torchvision downloads it: a MATLAB 5 file with X uint8 (32, 32, 3, n) and y
    double (n, 1) holding 1..10, 10 meaning the digit 0 (every digit appears when n >= 10). Returns (images
    (n, 32, 32, 3) uint8 with image k = X[:, :, :, k], digits (n,) in 0..9)."""
    import scipy.io
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    digits = np.arange(n) % 10
    rng.shuffle(digits)
    out = Path(root) / "SVHN"
    out.mkdir(parents=True, exist_ok=True)
    y = np.where(digits == 0, 10, digits).astype(np.float64).reshape(n, 1)
    scipy.io.savemat(out / "test_32x32.mat", {"X": np.transpose(images, (1, 2, 3, 0)), "y": y})
    return images, digits


def write_svhn_c(root: Path, corruptions, n: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    """root/SVHN-C/<corruption>.npy as CLIPTTA's SVHN-C: uint8 (5n, 32, 32, 3), severity s in rows [(s-1)n, sn).
    Its labels are SVHN's: write root/SVHN/test_32x32.mat with write_svhn(root, n) too. Returns each
    corruption's array."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "SVHN-C"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for corruption in corruptions:
        written[corruption] = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(out / f"{corruption}.npy", written[corruption])
    return written


def distinct_colours(count: int, seed: int) -> np.ndarray:
    """``count`` different RGB colours (count, 3) uint8: a uniformly coloured JPEG decodes to its colour within a
    step or two, so an image read back can be matched to the one written."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(16 ** 3, size=count, replace=False)
    return np.stack([codes // 256, codes // 16 % 16, codes % 16], axis=1).astype(np.uint8) * 16 + 8


def write_tiny_imagenet_lists(root: Path) -> Path:
    """root/tiny-imagenet-200/wnids.txt (the 200 wnids, download order) and words.txt ('<wnid>\\t<lemma>, ...'
    for those wnids and a few others, in wnid order, as WordNet's full list is). Returns the folder."""
    out = Path(root) / "tiny-imagenet-200"
    out.mkdir(parents=True, exist_ok=True)
    (out / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in TINY_IMAGENET_WNIDS))
    words = dict(zip(TINY_IMAGENET_WNIDS, (f"{name}, another lemma" for name in TINY_IMAGENET_CLASSES)))
    words.update({"n00001740": "entity", "n99999999": "not a class, of this set"})
    (out / "words.txt").write_text("".join(f"{wnid}\t{words[wnid]}\n" for wnid in sorted(words)))
    return out


def write_tiny_imagenet(root: Path, n: int = 12, size: int = 64, seed: int = 0) -> list[tuple[str, int, np.ndarray]]:
    """root/tiny-imagenet-200 as downloaded, its val part: wnids.txt, words.txt, val/images/val_<k>.JPEG (size x
    size, each one uniform colour of distinct_colours) and val/val_annotations.txt listing them as
    '<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>' in file order, with classes drawn at random. Returns
    (file name, class index, colour) per listed image, in the list's order."""
    out = write_tiny_imagenet_lists(root)
    rng = np.random.default_rng(seed)
    (out / "val" / "images").mkdir(parents=True, exist_ok=True)
    written, lines = [], []
    for k, (label, colour) in enumerate(zip(rng.integers(0, 200, n), distinct_colours(n, seed))):
        name = f"val_{k}.JPEG"
        Image.fromarray(np.tile(colour, (size, size, 1))).save(out / "val" / "images" / name, "JPEG", quality=95)
        lines.append(f"{name}\t{TINY_IMAGENET_WNIDS[label]}\t0\t3\t{size - 5}\t{size - 1}\n")
        written.append((name, int(label), colour))
    (out / "val" / "val_annotations.txt").write_text("".join(lines))
    return written


def write_tiny_imagenet_c(root: Path, corruptions, severities=(5,), per_class: int = 1, size: int = 64,
                          seed: int = 0) -> dict[tuple[str, int], list[tuple[str, int, np.ndarray]]]:
    """root/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/val_<k>.JPEG as Hendrycks' release (a folder per each
    of the 200 wnids, per_class uniformly coloured images in each) and the wnids.txt/words.txt it is read with.
    Returns, per (corruption, severity), (wnid/file, class index, colour) in wnids.txt order, then file name order
    within a folder (the order the reader lists them in)."""
    write_tiny_imagenet_lists(root)
    written = {}
    for number, (corruption, severity) in enumerate((c, s) for c in corruptions for s in severities):
        folder = Path(root) / "Tiny-ImageNet-C" / corruption / str(severity)
        colours = iter(distinct_colours(200 * per_class, seed + number))
        written[corruption, severity] = []
        for label, wnid in enumerate(TINY_IMAGENET_WNIDS):
            (folder / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                colour = next(colours)
                Image.fromarray(np.tile(colour, (size, size, 1))).save(folder / wnid / f"val_{k}.JPEG", "JPEG")
                written[corruption, severity].append((f"{wnid}/val_{k}.JPEG", label, colour))
        written[corruption, severity].sort(key=lambda entry: (entry[1], entry[0]))
    return written
