"""CIFAR-10-C and CIFAR-100-C in RobustBench's layout, memory-mapped.

DATA_DIR/CIFAR-10-C/<corruption>.npy : uint8 (N, H, W, 3), five equal severity blocks of N/5 rows
DATA_DIR/CIFAR-10-C/labels.npy       : (N,) integer labels (the same N/5 labels repeated per severity)
DATA_DIR/cifar-10-batches-py/test_batch (cifar-100-python/test): the clean test set, domain "none"

The real files hold 32x32 images. Other sizes (a -C set made with scripts/make_corrupted.py from larger images)
are read as they are: the model's transform resizes every image to its input size, and the results record the
size read (provenance.data.image_shapes).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from PIL import Image

from datasets.base import CLEAN, BenchmarkDataset, DatasetError, ImageDataset, register_dataset, select_subset
from datasets.class_names import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR_TEMPLATES
from datasets.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, NUM_SEVERITIES, held_severities


class NpyImages(ImageDataset):
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


def load_mmap(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"Missing {what}: {path}")
    try:
        return np.load(path, mmap_mode="r")
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"Cannot read {what} {path} as a .npy array: {err}") from err


class CleanImages(ImageDataset):
    """(PIL image, label) for rows of an in-memory uint8 (N, H, W, 3) array read from one file."""

    # The authors' loader reads the clean CIFAR test set through torchvision (no sample list), so it neither
    # shuffles nor sorts it: their stream is the file's order (harness.stream.authors_stream_order).
    authors_file_order = True

    def __init__(self, path: Path, images: np.ndarray, labels: np.ndarray):
        self.path, self.images, self.labels = path, images, labels
        self.image_shape = tuple(int(v) for v in images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i]), int(self.labels[i])

    def source_files(self) -> list[Path]:
        return [self.path]


class CifarC(BenchmarkDataset):
    folder = ""
    ensemble_templates = CIFAR_TEMPLATES
    # The clean test set (domain "none"), in torchvision's on-disk format: DATA_DIR/<clean_file>, a pickled dict
    # with b"data" (N, 3072) uint8 and the labels under ``clean_labels_key``. "" = this data set has none.
    clean_file = ""
    clean_labels_key = b"labels"

    def clean_test_set(self, cfg) -> ImageDataset:
        """The clean test images in the file's order. The authors' suite reads them with torchvision's CIFAR class,
        which has no sample list, so it never shuffles or subsamples them: CORRUPTION.NUM_EX means something only
        with CORRUPTION.SUBSET first_n."""
        path = Path(cfg.DATA_DIR).expanduser() / self.clean_file
        layout = (f"torchvision's format: {path}, a pickled dict with b'data' (N, 3072) uint8 and "
                  f"{self.clean_labels_key!r} (torchvision.datasets.{'CIFAR10' if '10-' in self.clean_file else 'CIFAR100'}"
                  f"(DATA_DIR, train=False, download=True) writes it)")
        if not path.is_file():
            raise DatasetError(f"{self.name} clean test set (CORRUPTION.TYPE none): {path} does not exist; expected "
                               f"{layout}")
        try:
            with open(path, "rb") as f:
                content = pickle.load(f, encoding="bytes")
            data = np.asarray(content[b"data"], dtype=np.uint8)
            labels = np.asarray(content[self.clean_labels_key])
        except Exception as err:  # noqa: BLE001 - any failure: not the expected file
            raise DatasetError(f"{path}: not a CIFAR test batch in {layout} ({type(err).__name__})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
            raise DatasetError(f"{path}: expected b'data' (N, 3072) and N labels, got {data.shape} and {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(self.class_names):
            raise DatasetError(f"{path}: labels must be integers in [0, {len(self.class_names)})")
        if cfg.CORRUPTION.NUM_EX >= 0 and cfg.CORRUPTION.SUBSET == "authors":
            raise DatasetError(f"{path}: the authors' suite ignores CORRUPTION.NUM_EX for the clean CIFAR test set "
                               f"(it reads all {len(data)} images in file order); use NUM_EX -1, or CORRUPTION.SUBSET "
                               f"first_n for the first NUM_EX")
        rows = np.asarray(select_subset(range(len(data)), cfg, path), dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)[rows]
        return CleanImages(path, np.ascontiguousarray(images), labels[rows].astype(np.int64))

    def layout(self, root: Path) -> str:
        return (f"{root}/<corruption>.npy as uint8 (N, 32, 32, 3) with N = 5 x images per severity "
                f"(severity s in rows [(s-1)N/5, sN/5)), and {root}/labels.npy as integers (N,)")

    def build_domain(self, cfg, domain: str, severity: int) -> ImageDataset:
        self.check_domain(domain)
        if domain == CLEAN:
            return self.clean_test_set(cfg)
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
        images = load_mmap(root / f"{domain}.npy", f"{self.name} corruption file (expected {self.layout(root)})")
        labels = load_mmap(root / "labels.npy", f"{self.name} labels file (expected {self.layout(root)})")
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
        start = held.index(severity) * block
        # The severity block's rows in file order (RobustBench's and the authors' sample list), NUM_EX of them.
        rows = np.asarray(select_subset(range(start, start + block), cfg, root / f"{domain}.npy"), dtype=np.int64)
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
    domains = CORRUPTIONS + EXTRA_CORRUPTIONS + [CLEAN]
    clean_file = "cifar-10-batches-py/test_batch"


@register_dataset
class Cifar100C(CifarC):
    name = "cifar100_c"
    folder = "CIFAR-100-C"
    class_names = CIFAR100_CLASSES
    domains = CORRUPTIONS + EXTRA_CORRUPTIONS + [CLEAN]
    clean_file = "cifar-100-python/test"
    clean_labels_key = b"fine_labels"


