"""ImageNet-C: DATA_DIR/ImageNet-C/<corruption>/<severity>/<wnid>/<file>.JPEG (already 224x224).

CORRUPTION.IMAGENET_C_LIST chooses the images:
- robustbench_5000: RobustBench's canonical 5,000-image list (the paper's protocol), read from the installed
  robustbench distribution's data files without importing the package (its import is broken today);
- all: every image found under the severity folder (50,000 for the real data set);
- a path to a text file in the same format (one ``wnid/file`` per line).
The class index is the wnid's position in the sorted list of the 1000 ImageNet wnids. The domain "none" is the clean
ImageNet validation set, DATA_DIR/imagenet/val/<wnid>/<image> (or DATA_DIR/imagenet2012/val), read with the same
list (RobustBench's 5,000 ImageNet-C images are validation images).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path


from datasets.base import CLEAN, BenchmarkDataset, DatasetError, ImageDataset, register_dataset, select_subset
from datasets.class_names import (COOP_IMAGENET_TEMPLATES, IMAGENET_CLASSES, IMAGENET_TEMPLATES,
                                  TDA_SELECTED_TEMPLATES)
from datasets.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from datasets.folders import IMAGE_SUFFIXES, ImageFiles, refuse_repeated_images

_HELPER = "robustbench/helper_files/"


def _robustbench_file(name: str) -> Path:
    try:
        dist = metadata.distribution("robustbench")
    except metadata.PackageNotFoundError:
        raise DatasetError(
            f"The canonical ImageNet-C list ({_HELPER}{name}) comes from the robustbench package, which is not "
            f"installed. Install it without its dependencies (its pins conflict with open_clip): "
            f"'pip install --no-deps robustbench', or set CORRUPTION.IMAGENET_C_LIST to 'all' or to a list "
            f"file.") from None
    path = Path(dist.locate_file(_HELPER + name))
    if not path.is_file():
        raise DatasetError(f"robustbench is installed but its data file {path} is missing")
    return path


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet wnids in sorted order (class index = position)."""
    mapping = json.loads(_robustbench_file("imagenet_class_to_id_map.json").read_text())
    wnids = tuple(sorted(mapping))
    assert len(wnids) == 1000 and all(mapping[w] == i for i, w in enumerate(wnids))
    return wnids


def read_image_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"ImageNet-C image list {path} does not exist (CORRUPTION.IMAGENET_C_LIST)")
    numbered = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    entries = [entry for _, entry in numbered]
    bad = [e for e in entries if len(Path(e).parts) != 2]
    if bad:
        raise DatasetError(f"{path}: every line must be 'wnid/file.JPEG'; bad lines such as {bad[:3]}")
    # the label is the entry's class folder: a repeated line is the same image under the same label
    refuse_repeated_images("ImageNet-C", entries, [Path(e).parts[0] for e in entries],
                           [f"line {n}" for n, _ in numbered], path)
    return entries


@register_dataset
class ImageNetC(BenchmarkDataset):
    name = "imagenet_c"
    folder = "ImageNet-C"
    class_names = IMAGENET_CLASSES
    ensemble_templates = IMAGENET_TEMPLATES
    # ImageNet's (CoOp's, TDA's) templates: its clean domain is the ImageNet validation set.
    coop_templates = COOP_IMAGENET_TEMPLATES
    tda_templates = TDA_SELECTED_TEMPLATES
    domains = CORRUPTIONS + EXTRA_CORRUPTIONS + [CLEAN]

    def input_files(self, cfg) -> dict[str, str]:
        choice = cfg.CORRUPTION.IMAGENET_C_LIST
        if choice == "all":
            return {}
        path = _robustbench_file("imagenet_test_image_ids.txt") if choice == "robustbench_5000" else choice
        return {"CORRUPTION.IMAGENET_C_LIST": str(path)}

    def image_list(self, cfg) -> tuple[str, list[str] | None]:
        choice = cfg.CORRUPTION.IMAGENET_C_LIST
        if choice == "all":
            return "all", None
        if choice == "robustbench_5000":
            return choice, read_image_list(_robustbench_file("imagenet_test_image_ids.txt"))
        return str(Path(choice).resolve()), read_image_list(Path(choice).expanduser())

    @staticmethod
    def all_images(root: Path, wnid_index: dict[str, int], layout: str) -> list[str]:
        """Every image under ``root``, which must hold a non-empty folder for each of the 1000 classes (a missing
        one would silently shrink the evaluation)."""
        folders = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        unknown = sorted(folders - set(wnid_index))
        if unknown:
            raise DatasetError(f"ImageNet-C {root}: folders {unknown[:5]} are not ImageNet wnids")
        entries = sorted(f"{d}/{f.name}" for d in folders for f in (root / d).iterdir()
                         if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        present = {e.split("/")[0] for e in entries}
        missing = sorted(set(wnid_index) - present)
        if missing:
            raise DatasetError(f"ImageNet-C {root}: {len(missing)} of the 1000 class folders are missing or hold no "
                               f"image, e.g. {root / missing[0]} (CORRUPTION.IMAGENET_C_LIST all reads every class "
                               f"of {layout}; a list file reads a chosen subset)")
        return entries

    def config_warnings(self, cfg, keys_set: frozenset[str] | None = None) -> list[str]:
        warnings = []
        default_list = cfg.CORRUPTION.IMAGENET_C_LIST == "robustbench_5000"
        if CLEAN in cfg.CORRUPTION.TYPE and default_list:
            warnings.append("CORRUPTION.TYPE none reads RobustBench's 5,000 validation images "
                            "(CORRUPTION.IMAGENET_C_LIST); the authors' suite reads all 50,000 for 'none': set "
                            "CORRUPTION.IMAGENET_C_LIST all to match")
        if ("correlated" in cfg.SETTING and default_list and keys_set is not None
                and "CORRUPTION.IMAGENET_C_LIST" not in keys_set):
            warnings.append(f"SETTING {cfg.SETTING}: the authors' suite reads ImageNet-C from its 50,000-image list "
                            f"in correlated settings; this run reads RobustBench's 5,000 (CORRUPTION.IMAGENET_C_LIST; "
                            f"set it to say which)")
        return warnings

    def describe(self, cfg) -> dict:
        return {"imagenet_c_list": cfg.CORRUPTION.IMAGENET_C_LIST}

    def clean_root(self, cfg) -> Path:
        """The ImageNet validation set in class folders: DATA_DIR/imagenet/val (or the anchor suite's
        DATA_DIR/imagenet2012/val)."""
        data = Path(cfg.DATA_DIR).expanduser()
        for root in (data / "imagenet" / "val", data / "imagenet2012" / "val"):
            if root.is_dir():
                return root
        return data / "imagenet" / "val"

    def build_domain(self, cfg, domain: str, severity: int) -> ImageDataset:
        self.check_domain(domain)
        if domain == CLEAN:
            root = self.clean_root(cfg)
            layout = f"{root}/<wnid>/<image>.JPEG (the ImageNet validation set in class folders)"
            what = "ImageNet validation set (CORRUPTION.TYPE none)"
        else:
            base = Path(cfg.DATA_DIR).expanduser() / self.folder
            root = base / domain / str(severity)
            layout = f"{base}/<corruption>/<severity>/<wnid>/<image>.JPEG"
            what = "ImageNet-C"
        if not root.is_dir():
            raise DatasetError(f"{what}: directory {root} does not exist. Expected the layout {layout}; set "
                               f"DATA_DIR to the folder that contains it.")
        wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
        choice = cfg.CORRUPTION.IMAGENET_C_LIST
        if cfg.CORRUPTION.NUM_EX >= 0 and cfg.CORRUPTION.SUBSET == "authors" and choice in ("robustbench_5000", "all"):
            if domain != CLEAN:
                raise DatasetError(
                    f"{what} {root}: with CORRUPTION.NUM_EX the authors' suite samples from its own 50,000-image list "
                    f"in that file's order (datasets/imagenet_list/imagenet_val_ids_50k.txt of "
                    f"mariodoebler/test-time-adaptation): give that file as CORRUPTION.IMAGENET_C_LIST, or set "
                    f"CORRUPTION.SUBSET first_n for the first NUM_EX of the {choice} list")
            if choice == "robustbench_5000":
                raise DatasetError(f"{what} {root}: with CORRUPTION.NUM_EX the authors' suite samples from all 50,000 "
                                   f"validation images: set CORRUPTION.IMAGENET_C_LIST all (or CORRUPTION.SUBSET "
                                   f"first_n for the first NUM_EX of RobustBench's 5,000)")
        _, entries = self.image_list(cfg)
        if entries is None:
            entries = self.all_images(root, wnid_index, layout)
        entries = select_subset(entries, cfg, f"{root} ({choice} list)")
        unknown = sorted({e.split("/")[0] for e in entries} - set(wnid_index))
        if unknown:
            raise DatasetError(f"{what} {root}: folders {unknown[:5]} are not ImageNet wnids")
        files = [root / e for e in entries]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DatasetError(f"{what}: {len(missing)} of {len(files)} listed images are missing, e.g. "
                               f"{missing[0]} (layout {layout}; list {choice})")
        return ImageFiles(files, [wnid_index[e.split("/")[0]] for e in entries])
