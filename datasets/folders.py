"""Shared reading of image files and of class-folder data sets (``<root>/<class folder>/<image>``): ImageNet-C,
the domain-generalisation sets (DomainBed layout) and the ImageNet variants. Registers no data set.

Every problem is reported as a DatasetError naming the path: a missing root, a missing or unexpected class
folder, an empty class folder; an unreadable image is reported when it is read (``ImageFiles``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from datasets.base import DatasetError, ImageDataset, select_subset

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}



class ImageFiles(ImageDataset):
    """(PIL image, label) for a list of image files, decoded when read."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files, self.labels = files, labels

    def source_files(self) -> list[Path]:
        return list(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.files[i]) as image:
                image.load()
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"Cannot read image {self.files[i]}: {err}") from err
        return image, self.labels[i]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden files (.DS_Store, macOS ._ forks) skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def read_class_folders(root: Path, class_folders: Sequence[str], what: str,
                       layout: str) -> tuple[list[Path], list[int]]:
    """All images under ``root/<class folder>/``, labelled by the folder's position in ``class_folders``.

    ``root`` must hold exactly these class folders (hidden ones ignored), each with at least one image, so that
    class indices cannot shift silently when a folder is missing (as they would with torchvision's ImageFolder).
    """
    if not root.is_dir():
        raise DatasetError(f"{what}: directory {root} does not exist. Expected the layout {layout}; "
                           f"set DATA_DIR to the folder that contains it.")
    present = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    missing = [c for c in class_folders if c not in present]
    if missing:
        raise DatasetError(f"{what}: {len(missing)} of {len(class_folders)} class folders are missing under "
                           f"{root}, e.g. {root / missing[0]} (expected the layout {layout}; missing: "
                           f"{missing[:10]})")
    unexpected = sorted(present - set(class_folders))
    if unexpected:
        raise DatasetError(f"{what}: {root} holds folders that are not classes of this data set: "
                           f"{unexpected[:10]} (expected exactly the {len(class_folders)} class folders of "
                           f"{layout})")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_folders):
        images = list_images(root / name)
        if not images:
            raise DatasetError(f"{what}: class folder {root / name} holds no images (suffixes "
                               f"{sorted(IMAGE_SUFFIXES)})")
        files += images
        labels += [label] * len(images)
    return files, labels


def check_no_severity(name: str, severity: int) -> None:
    """Severity-less data sets run once per domain with severity 0 (harness.settings ignores
    CORRUPTION.SEVERITY for them); any other value means a caller mistook the data set for a corruption one."""
    if severity != 0:
        raise DatasetError(f"{name} has no severities: its domains are read with severity 0, got {severity}")


def take_subset(cfg, files: list[Path], labels: list[int], where: Path) -> tuple[list[Path], list[int]]:
    """CORRUPTION.NUM_EX images (-1 = all) of a class-folder set (datasets.base.select_subset). The authors'
    suite reads such a set with torchvision's ImageFolder, which lists class folders and files in name order (so
    ImageNet-V2's folder "10" comes before "2"); their subset, and their stream order of the whole set
    (TEST.STREAM_ORDER authors), start from that order."""
    whole = cfg.CORRUPTION.NUM_EX < 0
    pairs = list(zip(files, labels))
    their_listing = cfg.TEST.STREAM_ORDER == "authors" if whole else cfg.CORRUPTION.SUBSET == "authors"
    if their_listing:
        pairs.sort(key=lambda pair: (pair[0].parent.name, pair[0].name))
    if not whole:
        pairs = select_subset(pairs, cfg, where)
    return [f for f, _ in pairs], [label for _, label in pairs]
