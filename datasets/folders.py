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
# How the image formats PIL reads here begin (a file that begins otherwise fails to decode, mid-run).
IMAGE_SIGNATURES = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",), "GIF": (b"GIF87a", b"GIF89a"),
                    "BMP": (b"BM",), "TIFF": (b"II*\x00", b"MM\x00*"), "PPM/PGM": (b"P6", b"P5", b"P3", b"P2"),
                    "WEBP": (b"RIFF",)}



class ImageFiles(ImageDataset):
    """(PIL image, label) for a list of image files, decoded when read."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files, self.labels = files, labels

    def source_files(self) -> list[Path]:
        return list(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def check_files(self) -> None:
        """Every file is there, not empty, and begins as an image format does (a few bytes read per file)."""
        for path in self.files:
            try:
                with open(path, "rb") as handle:
                    head = handle.read(12)
            except OSError as err:
                raise DatasetError(f"Cannot read image {path}: {err.strerror or err}") from None
            if not head:
                raise DatasetError(f"Image {path} is empty (0 bytes): an interrupted copy? Replace it or remove it "
                                   f"from the data set")
            if not any(head.startswith(sig) for sigs in IMAGE_SIGNATURES.values() for sig in sigs):
                raise DatasetError(f"{path} is not an image: it begins with {head[:8]!r}, not as "
                                   f"{', '.join(IMAGE_SIGNATURES)} files do (a damaged or mislabelled file?)")

    def __getitem__(self, i: int):
        try:
            with Image.open(self.files[i]) as image:
                image.load()
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"Cannot read image {self.files[i]}: {err}") from err
        return image, self.labels[i]


def refuse_repeated_images(what: str, files: Sequence[Path], labels: Sequence[int], places: Sequence[str],
                           listed_in: Path) -> None:
    """A test list names every image once: an image listed twice would count twice, and one listed under two
    labels cannot be right under both. DatasetError naming the list file, the image and both places (``places``:
    where each entry stands, e.g. "line 7")."""
    first: dict[Path, int] = {}
    for k, path in enumerate(files):
        seen = first.setdefault(Path(path), k)
        if seen == k:
            continue
        if labels[seen] != labels[k]:
            raise DatasetError(f"{what}: {listed_in} lists {path} under two labels, {labels[seen]} ({places[seen]}) "
                               f"and {labels[k]} ({places[k]}); expected each test image once")
        raise DatasetError(f"{what}: {listed_in} lists {path} twice ({places[seen]} and {places[k]}); expected "
                           f"each test image once")


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
