"""The source training sets a method reads before adaptation (EATA's Fisher information), in the layouts users have,
and the anchor suite's rule for how many of their images, and which, are used. Registers no data set.

CORRUPTION.DATASET -> its source training split (the anchor's get_source_loader: the name before "_"):
- cifar10_c  -> CIFAR-10 train,  DATA_DIR/cifar-10-batches-py/data_batch_1..5 (torchvision's pickles);
- cifar100_c -> CIFAR-100 train, DATA_DIR/cifar-100-python/train;
- imagenet_c -> ImageNet train,  DATA_DIR/imagenet/train/<wnid>/<image> or DATA_DIR/imagenet2012/train/... (the
  anchor's folder), class folders and files in name order (torchvision's ImageFolder);
- shapes_c   -> the Shapes training split the demo's CLIP was trained on (models/checkpoints/tiny-clip-shapes.json:
  ``datasets.shapes.clean_split("train", 20000)``), generated image by image: a pure function, no folder.
Images come as (PIL image, label), as the clean test sets; the harness applies the test images' transform.

Selection (the anchor's get_source_loader, reduced when SOURCE.PERCENTAGE < 1 or SOURCE.NUM_SAMPLES >= 0): both
must then be > 0, and min(NUM_SAMPLES, N) images are drawn with ``random.sample(range(N), n)`` after
``random.seed(RNG_SEED)`` (their conf.py seeds Python's generator, nothing draws from it before), in that order
(their DataLoader shuffles them once more with torch's global generator, whose state there depends on the model
built before it; this order is the seeded draw's own). Otherwise all N images, in the split's order."""
from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import numpy as np

from datasets.base import DatasetError, ImageDataset
from datasets.cifar_c import CleanImages
from datasets.folders import ImageFiles, list_images

# CORRUPTION.DATASET -> the name of its source training set
SOURCE_SETS = {"cifar10_c": "cifar10", "cifar100_c": "cifar100", "imagenet_c": "imagenet", "shapes_c": "shapes"}
CIFAR_TRAIN = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], b"labels"),
               "cifar100": ("cifar-100-python", ["train"], b"fine_labels")}
IMAGENET_TRAIN_ROOTS = ("imagenet/train", "imagenet2012/train")
SHAPES_TRAIN_SIZE = 20000        # the demo CLIP's training split (models/checkpoints/tiny-clip-shapes.json)


def select_source_indices(total: int, num_samples: int, percentage: float, seed: int) -> list[int]:
    """The positions of the source images used, in their order: the anchor's get_source_loader rule."""
    if percentage < 1.0 or num_samples >= 0:
        if not percentage > 0.0 or not num_samples > 0:
            raise DatasetError(f"SOURCE.NUM_SAMPLES {num_samples} with SOURCE.PERCENTAGE {percentage}: the anchor "
                               f"suite's get_source_loader needs NUM_SAMPLES > 0 and PERCENTAGE > 0 to reduce the "
                               f"source set (it then takes min(NUM_SAMPLES, N) images)")
        count = min(num_samples, total)
        return random.Random(seed).sample(range(total), count)
    return list(range(total))


class SourceImages(CleanImages):
    """Rows of a CIFAR training set read from its pickled batch files."""

    def __init__(self, paths: list[Path], images: np.ndarray, labels: np.ndarray, set_name: str, rows: list[int],
                 total: int):
        super().__init__(paths[0], images, labels)
        self.paths, self.set_name, self.rows, self.total = paths, set_name, rows, total

    def source_files(self) -> list[Path]:
        return list(self.paths)


class GeneratedShapes(ImageDataset):
    """Images ``indices`` of the Shapes training split of ``total`` images, rendered when read (as
    datasets.shapes.generate_shapes renders them: image i from (seed, i, its label))."""

    def __init__(self, indices: list[int], total: int = SHAPES_TRAIN_SIZE):
        from datasets.shapes import SHAPE_CLASSES, SPLIT_SEEDS, balanced_labels
        self.seed, self.indices, self.total = SPLIT_SEEDS["train"], list(indices), total
        self.set_name, self.rows = "shapes", self.indices
        self.all_labels = balanced_labels(total, len(SHAPE_CLASSES), np.random.default_rng([self.seed, 0]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        from PIL import Image

        from datasets.shapes import IMAGE_SIZE, render_shape
        i = self.indices[k]
        label = int(self.all_labels[i])
        return Image.fromarray(render_shape(label, np.random.default_rng([self.seed, 1, i]), IMAGE_SIZE)), label

    def source_files(self) -> list[Path]:
        return []


def source_set_name(dataset_name: str) -> str:
    if dataset_name not in SOURCE_SETS:
        raise DatasetError(f"{dataset_name} has no source training set in this suite (source data is read for "
                           f"{', '.join(sorted(SOURCE_SETS))})")
    return SOURCE_SETS[dataset_name]


def _read_cifar_train(data_dir: Path, name: str, cfg) -> SourceImages:
    folder, files, key = CIFAR_TRAIN[name]
    paths = [data_dir / folder / f for f in files]
    layout = f"{data_dir / folder}/{{{','.join(files)}}} (torchvision.datasets.{name.upper()}(DATA_DIR, train=True, " \
             f"download=True) writes them)"
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]} does not exist: the {name} training set is expected as {layout}")
    data, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                content = pickle.load(f, encoding="bytes")
            data.append(np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(content[key], dtype=np.int64))
        except Exception as err:  # noqa: BLE001 - any failure: not the expected file
            raise DatasetError(f"{path}: not a CIFAR training batch in {layout} ({type(err).__name__})") from None
    images = np.concatenate(data).transpose(0, 2, 3, 1)
    rows = select_source_indices(len(images), cfg.SOURCE.NUM_SAMPLES, cfg.SOURCE.PERCENTAGE, cfg.RNG_SEED)
    return SourceImages(paths, np.ascontiguousarray(images[rows]), np.concatenate(labels)[rows], name, rows,
                        len(images))


def _read_imagenet_train(data_dir: Path, cfg) -> ImageFiles:
    from datasets.imagenet_c import imagenet_wnids
    roots = [data_dir / r for r in IMAGENET_TRAIN_ROOTS]
    root = next((r for r in roots if r.is_dir()), None)
    if root is None:
        raise DatasetError(f"{roots[0]} (or {roots[1]}) does not exist: the ImageNet training set is expected as "
                           f"{roots[0]}/<wnid>/<image>.JPEG")
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [f for f in folders if f not in wnid_index]
    if unknown:
        raise DatasetError(f"{root}: folders {unknown[:5]} are not ImageNet wnids (expected {root}/<wnid>/<image>)")
    files, labels = [], []
    for folder in folders:
        images = list_images(root / folder)
        files += images
        labels += [wnid_index[folder]] * len(images)
    if not files:
        raise DatasetError(f"{root} holds no images: the ImageNet training set is expected as {root}/<wnid>/<image>")
    rows = select_source_indices(len(files), cfg.SOURCE.NUM_SAMPLES, cfg.SOURCE.PERCENTAGE, cfg.RNG_SEED)
    selected = ImageFiles([files[r] for r in rows], [labels[r] for r in rows])
    selected.set_name, selected.rows, selected.total = "imagenet", rows, len(files)
    return selected


def build_source_set(cfg) -> ImageDataset:
    """The selected source training images of CORRUPTION.DATASET, checked (DatasetError names the path)."""
    name = source_set_name(cfg.CORRUPTION.DATASET)
    data_dir = Path(cfg.DATA_DIR).expanduser()
    if name in CIFAR_TRAIN:
        return _read_cifar_train(data_dir, name, cfg)
    if name == "imagenet":
        images = _read_imagenet_train(data_dir, cfg)
        images.check_files()
        return images
    indices = select_source_indices(SHAPES_TRAIN_SIZE, cfg.SOURCE.NUM_SAMPLES, cfg.SOURCE.PERCENTAGE, cfg.RNG_SEED)
    return GeneratedShapes(indices)


def source_selection(images: ImageDataset) -> dict:
    """What identifies the selected source images beside their files (harness.build fingerprints those): the set,
    its size and the positions drawn."""
    return {"set": images.set_name, "of": images.total, "rows": list(images.rows)}
