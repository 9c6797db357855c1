"""CIFAR-10-C and CIFAR-100-C in RobustBench's layout, memory-mapped.

DATA_DIR/CIFAR-10-C/<corruption>.npy : uint8 (N, H, W, 3), five equal severity blocks of N/5 rows
DATA_DIR/CIFAR-10-C/labels.npy       : (N,) integer labels (the same N/5 labels repeated per severity)

The real files hold 32x32 images. Other sizes (a -C set made with scripts/make_corrupted.py from larger images)
are read as they are: the model's transform resizes every image to its input size, and the results record the
size read (provenance.data.image_shapes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from PIL import Image
from torch.utils.data import Dataset

from datasets.base import BenchmarkDataset, DatasetError, register_dataset
from datasets.class_names import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR_TEMPLATES
from datasets.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, NUM_SEVERITIES, held_severities


class NpyImages(Dataset):
    """(PIL image, label) for rows ``indices`` of a memory-mapped (N, H, W, 3) uint8 array; the file is opened
    lazily so the dataset pickles cheaply into DataLoader workers."""

    def __init__(self, path: Path, indices: np.ndarray, labels: np.ndarray, labels_path: Path,
                 image_shape: tuple[int, ...]):
        self.path, self.indices, self.labels, self.labels_path = path, indices, labels, labels_path
        self.image_shape = tuple(int(v) for v in image_shape)
        self._images = None

    def source_files(self) -> list[Path]:
        return [self.path, self.labels_path]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return Image.fromarray(np.asarray(self._images[self.indices[i]])), int(self.labels[i])

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


def _load_mmap(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"Missing {what}: {path}")
    try:
        return np.load(path, mmap_mode="r")
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"Cannot read {what} {path} as a .npy array: {err}") from err


class CifarC(BenchmarkDataset):
    folder = ""
    ensemble_templates = CIFAR_TEMPLATES

    def layout(self, root: Path) -> str:
        return (f"{root}/<corruption>.npy as uint8 (N, 32, 32, 3) with N = 5 x images per severity "
                f"(severity s in rows [(s-1)N/5, sN/5)), and {root}/labels.npy as integers (N,)")

    def build_domain(self, cfg, domain: str, severity: int) -> Dataset:
        self.check_domain(domain)
        root = Path(cfg.DATA_DIR).expanduser() / self.folder
        if not root.is_dir():
            raise DatasetError(f"{self.name}: data directory {root} does not exist. Expected the RobustBench "
                               f"layout: {self.layout(root)}. Set DATA_DIR to the folder that contains "
                               f"'{self.folder}/'.")
        if not 1 <= severity <= NUM_SEVERITIES:
            raise DatasetError(f"{self.name}: severity {severity} is not in 1..5 (CORRUPTION.SEVERITY)")
        held = held_severities(root)
        if severity not in held:
            raise DatasetError(f"{root}: its files hold severities {held} only ({root / 'meta.json'}); severity "
                               f"{severity} needs them written with scripts/make_corrupted.py --severities")
        images = _load_mmap(root / f"{domain}.npy", f"{self.name} corruption file (expected {self.layout(root)})")
        labels = _load_mmap(root / "labels.npy", f"{self.name} labels file (expected {self.layout(root)})")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DatasetError(f"{root / (domain + '.npy')}: expected a uint8 array (N, H, W, 3), got "
                               f"{images.dtype} {images.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{root / 'labels.npy'}: expected integer class labels, got dtype {labels.dtype}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DatasetError(f"{root / 'labels.npy'}: expected shape ({len(images)},) to match "
                               f"{domain}.npy, got {labels.shape}")
        if len(images) % len(held) or len(images) == 0:
            raise DatasetError(f"{root / (domain + '.npy')}: {len(images)} rows cannot be split into "
                               f"{len(held)} equal severity blocks (severities {held})")
        block = len(images) // len(held)
        n = block if cfg.CORRUPTION.NUM_EX < 0 else cfg.CORRUPTION.NUM_EX
        if n > block:
            raise DatasetError(f"{root / (domain + '.npy')}: CORRUPTION.NUM_EX {n} requested but the "
                               f"severity block holds only {block} images")
        # Like RobustBench: the first n images of the severity block (the harness fixes their order).
        start = held.index(severity) * block
        rows = np.arange(start, start + n)
        block_labels = np.asarray(labels[rows]).astype(np.int64)
        if block_labels.min() < 0 or block_labels.max() >= len(self.class_names):
            raise DatasetError(f"{root / 'labels.npy'}: labels must lie in [0, {len(self.class_names)}), "
                               f"found [{block_labels.min()}, {block_labels.max()}]")
        return NpyImages(root / f"{domain}.npy", rows, block_labels, root / "labels.npy", images.shape[1:])


@register_dataset
class Cifar10C(CifarC):
    name = "cifar10_c"
    folder = "CIFAR-10-C"
    class_names = CIFAR10_CLASSES
    domains = CORRUPTIONS + EXTRA_CORRUPTIONS


@register_dataset
class Cifar100C(CifarC):
    name = "cifar100_c"
    folder = "CIFAR-100-C"
    class_names = CIFAR100_CLASSES
    domains = CORRUPTIONS + EXTRA_CORRUPTIONS


