"""Tiny synthetic OOD sets written in the layouts their releases unpack to (datasets/ood_folders.py), with
small random images (tests.synthetic.write_image_folders). Each writer takes DATA_DIR and returns the image files
it wrote, in the order the set reads them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from datasets.coop_sets import coop_class_names
from datasets.ood_folders import NINCO_CLASS_FOLDERS
from tests.synthetic import write_image_folders


def _in_read_order(files: list[Path]) -> list[Path]:
    """write_image_folders writes classes in reverse; the sets read class folders and files in name order."""
    return sorted(files, key=lambda f: (f.parent.name, f.name))


def write_textures(data_dir: Path, per_class: int = 1, seed: int = 0) -> list[Path]:
    """DATA_DIR/dtd/images/<class>/<image> for DTD's 47 class folders."""
    return _in_read_order(write_image_folders(Path(data_dir) / "dtd" / "images", coop_class_names("dtd"),
                                              per_class, seed=seed))


def write_places(data_dir: Path, n: int = 4, seed: int = 1, folder: str = "images") -> list[Path]:
    """DATA_DIR/ood_data/Places/images/<image>: MOS's Places subset as CLIPTTA reads it (one ImageFolder class)."""
    return write_image_folders(Path(data_dir) / "ood_data" / "Places", [folder], n, seed=seed)


def write_places_c(data_dir: Path, corruptions: Sequence[str], severities: Sequence[int] = (5,), n: int = 3,
                   seed: int = 2) -> dict[tuple[str, int], list[Path]]:
    """DATA_DIR/ood_data/Places-C/<corruption>/<severity>/images/<image>; returns {(corruption, severity): files}."""
    written = {}
    for k, (corruption, severity) in enumerate((c, s) for c in corruptions for s in severities):
        root = Path(data_dir) / "ood_data" / "Places-C" / corruption / str(severity)
        written[corruption, severity] = write_image_folders(root, ["images"], n, seed=seed + k)
    return written


# A few real Places365 categories in the release's form, for the synthetic category file.
PLACES365_CATEGORIES = ("/a/airfield", "/a/apartment_building/outdoor", "/b/bakery/shop", "/c/campsite")


def write_places365(data_dir: Path, labels: Sequence[int] = (2, 0, 3, 2, 1), folder: str = "val_256",
                    categories: Sequence[str] = PLACES365_CATEGORIES, seed: int = 3) -> list[Path]:
    """DATA_DIR/places365/{<folder>/Places365_val_<8 digits>.jpg-named images, places365_val.txt
    ("Places365_val_00000001.jpg 165"), categories_places365.txt ("/a/airfield 0")}; the k-th listed image has
    labels[k]."""
    base = Path(data_dir) / "places365"
    written = write_image_folders(base, [folder], len(labels), seed=seed)
    files = []
    for k, path in enumerate(sorted(written)):
        files.append(path.rename(path.with_name(f"Places365_val_{k + 1:08d}.jpg")))
    (base / "places365_val.txt").write_text("".join(f"{f.name} {y}\n" for f, y in zip(files, labels)))
    (base / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(categories)))
    return files


def write_ninco(data_dir: Path, per_class: int = 1, seed: int = 4,
                class_folders: Sequence[str] = NINCO_CLASS_FOLDERS) -> list[Path]:
    """DATA_DIR/ood_data/NINCO/NINCO_OOD_classes/<class>/<image> for NINCO's 64 class folders."""
    root = Path(data_dir) / "ood_data" / "NINCO" / "NINCO_OOD_classes"
    return _in_read_order(write_image_folders(root, class_folders, per_class, seed=seed))


def write_ninco_c(data_dir: Path, corruption: str, severity: int, class_folders: Sequence[str] = ("bagpipe", "door"),
                  per_class: int = 2, seed: int = 5) -> list[Path]:
    """DATA_DIR/ood_data/NINCO-C/<corruption>/<severity>/images/<class>/<image>."""
    root = Path(data_dir) / "ood_data" / "NINCO-C" / corruption / str(severity) / "images"
    return _in_read_order(write_image_folders(root, class_folders, per_class, seed=seed))


def write_lsun(data_dir: Path, n: int = 4, resized: bool = False, seed: int = 6) -> list[Path]:
    """ODIN's archives unpacked in DATA_DIR: LSUN/test/<image> (crops) or LSUN_resize/LSUN_resize/<image>."""
    root, folder = (Path(data_dir) / "LSUN_resize", "LSUN_resize") if resized else (Path(data_dir) / "LSUN", "test")
    return write_image_folders(root, [folder], n, seed=seed)


# How OpenOOD's lists name their images, by list: (image root, folder of the listed paths), as the first lines of
# the real v1.5 lists read (sun/ and places/ of the v1 lists assumed alike: those lists were not seen).
OPENOOD_IMAGE_FOLDERS = {
    "inaturalist": ("images_largescale", "inaturalist/images"),
    "sun": ("images_largescale", "sun/images"),
    "places": ("images_largescale", "places/images"),
    "textures": ("images_classic", "texture/banded"),
    "openimage_o": ("images_largescale", "openimage_o/images"),
    "ninco": ("images_largescale", "ninco/bagpipe"),
    "ssb_hard": ("images_largescale", "ssb_hard/n11622368"),
}


def write_openood_list(data_dir: Path, list_name: str, n: int = 3, seed: int = 7) -> list[Path]:
    """DATA_DIR/benchmark_imglist/imagenet/test_<list_name>.txt ("<path relative to the image root> -1") and its
    images under DATA_DIR/images_largescale/ (Textures: images_classic/), as OpenOOD's download script lays them."""
    image_root, folder = OPENOOD_IMAGE_FOLDERS[list_name]
    root = Path(data_dir) / image_root
    files = sorted(write_image_folders(root, [folder], n, seed=seed))
    lists = Path(data_dir) / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"test_{list_name}.txt").write_text("".join(f"{f.relative_to(root).as_posix()} -1\n" for f in files))
    return files
