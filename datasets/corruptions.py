"""Make a corrupted benchmark (the RobustBench CIFAR-C layout) from any clean image set.

    <out>/<name>-C/<corruption>.npy : uint8 (5N, H, W, 3), severity s in rows [(s-1)N, sN)
    (with ``severities`` a subset of 1..5: one block of N rows per listed severity, in ascending order; meta.json
    lists them, and the loader refuses a severity the files do not hold)
    <out>/<name>-C/labels.npy       : (5N,) labels (uint8 when they fit, as in the real files), N repeated 5x
    <out>/<name>-C/meta.json        : how it was made (seed, source, class names, library version)

The corruption functions are Hendrycks' ImageNet-C ones, from the maintained ``imagecorruptions-imaug``
package (imported as ``imagecorruptions``; install with ``pip install '.[corruptions]'``). They draw their
randomness from numpy's global RNG, so the global RNG is seeded once per (corruption, severity) from the
user's seed (and restored afterwards); glass_blur and impulse_noise take an explicit per-image seed instead
(they would otherwise draw fresh OS entropy), which is drawn from that same seeded RNG. The result is a
pure function of (images, corruption, severity, seed), whichever other corruptions are made beside it.

Note: the severity constants are ImageNet-C's (the library has no CIFAR-10-C set); on 32x32 images the
blurs are relatively stronger than in CIFAR-10-C.

The corruption names live here: CORRUPTIONS (the benchmark's 15) and EXTRA_CORRUPTIONS (the 4 more that CIFAR-C and
ImageNet-C ship). imagecorruptions and tqdm are imported lazily.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from conf.errors import UserError
from conf.files import atomic_write, atomic_write_text

# The 15 ImageNet-C corruptions of the benchmark (Hendrycks & Dietterich, 2019), in the order of the papers' tables.
CORRUPTIONS = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
]
# The 4 held-out corruptions that CIFAR-10-C, CIFAR-100-C and ImageNet-C ship beside them.
EXTRA_CORRUPTIONS = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
NUM_SEVERITIES = 5
SEVERITIES = tuple(range(1, NUM_SEVERITIES + 1))
# Every corruption the library implements, in its order; a corruption's index here enters its seed, so adding
# or removing corruptions from a run never changes the images of the others.
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS
# Corruptions whose library code ignores numpy's global RNG and takes a ``seed`` argument instead.
_SEED_ARGUMENT = {"glass_blur", "impulse_noise"}
# The library refuses images smaller than this (its blur kernels and frost crops assume it).
MIN_SIZE = 32
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class CorruptionError(UserError):
    """Bad input to the corruption generator; the message names what was expected."""


def _corrupt_fn():
    try:
        from imagecorruptions import corrupt
    except ImportError as err:
        raise CorruptionError("The corruption generator needs the 'imagecorruptions' module: "
                              "pip install imagecorruptions-imaug (or pip install '.[corruptions]')") from err
    return corrupt


def check_images(images: np.ndarray, labels: np.ndarray | None = None) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CorruptionError(f"images must be a uint8 numpy array (N, H, W, 3); got "
                              f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    if len(images) == 0:
        raise CorruptionError("images: the array holds no image")
    if min(images.shape[1:3]) < MIN_SIZE:
        raise CorruptionError(f"images are {images.shape[1]}x{images.shape[2]}; the ImageNet-C corruption "
                              f"functions need at least {MIN_SIZE}x{MIN_SIZE} pixels")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise CorruptionError(f"labels must be integers of shape ({len(images)},) to match the images; got "
                                  f"{labels.dtype} {labels.shape}")
        if len(labels) and labels.min() < 0:
            raise CorruptionError(f"labels must be >= 0; found {labels.min()}")


def check_corruption(name: str, severity: int | None = None) -> None:
    if name not in ALL_CORRUPTIONS:
        import difflib
        near = difflib.get_close_matches(name, ALL_CORRUPTIONS, n=3, cutoff=0.4)
        raise CorruptionError(f"unknown corruption '{name}'. Nearest: {near}; available: {ALL_CORRUPTIONS}")
    if severity is not None and severity not in range(1, NUM_SEVERITIES + 1):
        raise CorruptionError(f"severity must be an integer in 1..{NUM_SEVERITIES}, got {severity!r}")


def corruption_seed(seed: int, corruption: str, severity: int) -> int:
    """The 32-bit seed of numpy's global RNG for one (corruption, severity)."""
    check_corruption(corruption, severity)
    entropy = [int(seed) & 0xFFFFFFFF, ALL_CORRUPTIONS.index(corruption), int(severity)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int = 0, progress=None) -> np.ndarray:
    """All ``images`` (N, H, W, 3) uint8 corrupted with one corruption at one severity; same shape, uint8.

    ``progress``: an optional tqdm bar, advanced by one per image."""
    check_images(images)
    corrupt = _corrupt_fn()
    rng_seed = corruption_seed(seed, corruption, severity)
    saved = np.random.get_state()
    np.random.seed(rng_seed)
    try:
        out = np.empty_like(images)
        for i, image in enumerate(images):
            kwargs = {"seed": int(np.random.randint(2 ** 31))} if corruption in _SEED_ARGUMENT else {}
            result = np.asarray(corrupt(np.ascontiguousarray(image), severity=severity,
                                        corruption_name=corruption, **kwargs))
            if result.shape != image.shape:
                raise CorruptionError(f"{corruption} severity {severity} returned shape {result.shape} for an "
                                      f"image of shape {image.shape}")
            out[i] = result
            if progress is not None:
                progress.update(1)
    finally:
        np.random.set_state(saved)
    return out


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """An interrupted run never leaves a truncated .npy behind (conf.files.atomic_write)."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:     # a file object: np.save would append .npy to a path
            np.save(f, array)
    atomic_write(path, save)


_WORKER_IMAGES: np.ndarray | None = None


def _init_worker(images: np.ndarray) -> None:
    global _WORKER_IMAGES
    _WORKER_IMAGES = images


def _corrupt_job(corruption: str, severity: int, seed: int) -> tuple[str, int, np.ndarray]:
    return corruption, severity, corrupt_images(_WORKER_IMAGES, corruption, severity, seed)


def write_corrupted(images: np.ndarray, labels: np.ndarray, out_dir: str | Path,
                    corruptions: Sequence[str] = CORRUPTIONS, seed: int = 0,
                    class_names: Sequence[str] | None = None, source: str = "", progress=True,
                    overwrite: bool = True, workers: int = 1, severities: Sequence[int] = SEVERITIES) -> Path:
    """Write ``out_dir/<corruption>.npy`` (one block per severity of ``severities``, all five by default) and
    ``out_dir/labels.npy``; returns ``out_dir``. ``progress``: True for a tqdm bar of the images, False for none, or
    a function ``(total, label)`` returning the bar to count them on (a tqdm-like context manager, such as
    harness.progress.Progress).

    With ``overwrite`` False, corruption files that already exist are kept (resuming an interrupted run; they
    must hold the same severities). ``workers`` > 1 corrupts (corruption, severity) blocks in that many
    processes; every block is seeded on its own, so the files are identical whatever the number of workers and
    whichever severities are written beside a block."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    corruptions, severities = _checked_request(images, labels, corruptions, severities, workers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    held = held_severities(out_dir)
    if not overwrite and _existing(out_dir) and held != severities:
        raise CorruptionError(f"{out_dir} holds severities {held}, not {severities}: keep those, or write the "
                              f"folder anew (without --keep-existing)")
    todo = [c for c in corruptions if overwrite or not (out_dir / f"{c}.npy").is_file()]
    jobs = [(name, severity) for name in todo for severity in severities]

    n = len(images)
    with _progress_bar(progress, len(jobs) * n, f"corrupting -> {out_dir}") as bar:
        if workers == 1:
            for name in todo:
                blocks = []
                for severity in severities:
                    bar.set_postfix_str(f"{name} s{severity}")
                    blocks.append(corrupt_images(images, name, severity, seed, progress=bar))
                _atomic_save(out_dir / f"{name}.npy", np.concatenate(blocks))
        else:
            _corrupt_in_processes(images, jobs, seed, workers, out_dir, bar, len(severities))
    label_dtype = np.uint8 if labels.max() < 256 else np.int64
    _atomic_save(out_dir / "labels.npy", np.tile(labels.astype(label_dtype), len(severities)))
    from importlib import metadata
    try:
        version = metadata.version("imagecorruptions-imaug")
    except metadata.PackageNotFoundError:
        version = None
    meta = {"seed": int(seed), "images_per_severity": n, "image_shape": list(images.shape[1:]),
            "severities": severities, "corruptions": sorted(set(corruptions) | _existing(out_dir)),
            "class_names": list(class_names) if class_names is not None else None, "source": source,
            "library": f"imagecorruptions-imaug {version}"}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return out_dir


def _checked_request(images, labels, corruptions, severities, workers) -> tuple[list[str], list[int]]:
    """The corruptions and the sorted severities asked for, each checked (CorruptionError names what is wrong)."""
    check_images(images, labels)
    corruptions = list(corruptions)
    if not corruptions:
        raise CorruptionError("no corruption requested")
    for name in corruptions:
        check_corruption(name)
    if workers < 1:
        raise CorruptionError(f"workers must be >= 1, got {workers}")
    severities = sorted({int(s) for s in severities})
    if not severities:
        raise CorruptionError("no severity requested")
    for severity in severities:
        check_corruption(corruptions[0], severity)
    return corruptions, severities


def _progress_bar(progress, total: int, label: str):
    """write_corrupted's ``progress``: a bar factory ``(total, label)``, else a tqdm bar (none when False)."""
    if callable(progress):
        return progress(total, label)
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="img", disable=not progress)


def _corrupt_in_processes(images, jobs, seed, workers, out_dir: Path, bar, blocks_per_file: int) -> None:
    """Blocks in worker processes; each corruption's file is written once all its blocks are back."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    done: dict[str, dict[int, np.ndarray]] = {}
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(images,)) as pool:
        futures = [pool.submit(_corrupt_job, name, severity, seed) for name, severity in jobs]
        for future in as_completed(futures):
            name, severity, block = future.result()
            bar.update(len(block))
            blocks = done.setdefault(name, {})
            blocks[severity] = block
            if len(blocks) == blocks_per_file:
                _atomic_save(out_dir / f"{name}.npy", np.concatenate([blocks[s] for s in sorted(blocks)]))
                del done[name]


def held_severities(folder: Path) -> list[int]:
    """The severities the files of a -C folder hold, in file order: those meta.json lists (written by
    write_corrupted), else all five (RobustBench's files have no meta.json)."""
    try:
        listed = json.loads((Path(folder) / "meta.json").read_text()).get("severities")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list) and listed and all(isinstance(s, int) for s in listed):
        return sorted(listed)
    return list(SEVERITIES)


def _existing(out_dir: Path) -> set[str]:
    return {p.stem for p in out_dir.glob("*.npy") if p.stem in ALL_CORRUPTIONS}


def load_image_folder(root: str | Path, size: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``root/<class>/<image>`` -> (images (N, H, W, 3) uint8, labels (N,), class names = sorted folder names).

    Images must share one size unless ``size`` is given: then each is resized (shortest side, bicubic) and
    centre-cropped to size x size."""
    from PIL import Image
    root = Path(root)
    if not root.is_dir():
        raise CorruptionError(f"image folder {root} does not exist (expected <root>/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise CorruptionError(f"{root} has no class sub-folders (expected <root>/<class>/<image>)")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(path) as img:
                img = img.convert("RGB")
                if size is not None:
                    scale = size / min(img.size)
                    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                                     Image.BICUBIC)
                    left, top = (img.width - size) // 2, (img.height - size) // 2
                    img = img.crop((left, top, left + size, top + size))
                array = np.asarray(img, dtype=np.uint8)
            if images and array.shape != images[0].shape:
                raise CorruptionError(f"{path} is {array.shape[1]}x{array.shape[0]} but earlier images are "
                                      f"{images[0].shape[1]}x{images[0].shape[0]}; pass a size to resize them all")
            images.append(array)
            labels.append(label)
    if not images:
        raise CorruptionError(f"no image files ({sorted(_IMAGE_SUFFIXES)}) under {root}/<class>/")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes
