"""ImageNet variants in the anchor suite's layouts (mariodoebler/test-time-adaptation, conf.complete_data_dir_path):

  imagenet_a       DATA_DIR/imagenet-a/<wnid>/<image>                                    200 classes
  imagenet_r       DATA_DIR/imagenet-r/<wnid>/<image>                                    200 classes
  imagenet_v2      DATA_DIR/imagenet-v2/imagenetv2-matched-frequency-format-val/<0..999>/<image>   1000 classes
  imagenet_sketch  DATA_DIR/ImageNet-Sketch/sketch/<wnid>/<image>                        1000 classes

Each is a data set with a single domain (its name). ImageNet-A and ImageNet-R predict among their own 200
classes only (as their authors and the anchor suite evaluate them): the prompts are the 200 CLIP names, the
labels 0..199 in sorted-wnid order. ImageNet-V2's folder name is the class index itself (folder "10" is class
10; the anchor suite's ImageFolder orders them as strings and needs a remapping mask, we read the number).
Class index = position of the wnid in the sorted 1000 ImageNet wnids (datasets.imagenet_c.imagenet_wnids).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path


from datasets.base import BenchmarkDataset, ImageDataset, register_dataset
from datasets.class_names import (COOP_IMAGENET_TEMPLATES, IMAGENET_CLASSES, IMAGENET_TEMPLATES,
                                  TDA_SELECTED_TEMPLATES)
from datasets.folders import ImageFiles, check_no_severity, read_class_folders, take_subset
from datasets.imagenet_c import imagenet_wnids

WNID_DIR = Path(__file__).resolve().parent / "wnids"


def _wnids(name: str) -> tuple[str, ...]:
    return tuple((WNID_DIR / f"{name}.txt").read_text().split())


# The 200 ImageNet-A classes (Hendrycks et al., "Natural Adversarial Examples") and the 200 ImageNet-R classes
# (Hendrycks et al., "The Many Faces of Robustness"), sorted; one wnid per line in datasets/wnids/.
IMAGENET_A_WNIDS = _wnids("imagenet_a")
IMAGENET_R_WNIDS = _wnids("imagenet_r")


class ImageNetVariant(BenchmarkDataset):
    folder = ""                 # relative to DATA_DIR
    ensemble_templates = IMAGENET_TEMPLATES
    coop_templates = COOP_IMAGENET_TEMPLATES
    tda_templates = TDA_SELECTED_TEMPLATES
    has_severities = False
    domain_label = "dataset"

    def class_folders(self) -> tuple[str, ...]:
        """Folder names in label order."""
        raise NotImplementedError

    def imagenet_indices(self) -> tuple[int, ...]:
        """For each label, its index among the 1000 ImageNet classes."""
        raise NotImplementedError

    @cached_property
    def class_names(self) -> list[str]:
        # Computed on first use: the wnid order comes from the robustbench data files.
        return [IMAGENET_CLASSES[i] for i in self.imagenet_indices()]

    def build_domain(self, cfg, domain: str, severity: int) -> ImageDataset:
        self.check_domain(domain)
        check_no_severity(self.name, severity)
        root = Path(cfg.DATA_DIR).expanduser() / self.folder
        layout = f"{root}/<{'class index' if self.name == 'imagenet_v2' else 'wnid'}>/<image>"
        files, labels = read_class_folders(root, self.class_folders(), self.name, layout)
        files, labels = take_subset(cfg, files, labels, root)
        return ImageFiles(files, labels)


class WnidSubset(ImageNetVariant):
    """A data set whose class folders are wnids: ``wnids`` (sorted) are its classes, label = position."""
    wnids: tuple[str, ...] = ()

    def class_folders(self) -> tuple[str, ...]:
        return self.wnids or imagenet_wnids()

    def imagenet_indices(self) -> tuple[int, ...]:
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        return tuple(index[w] for w in self.class_folders())


@register_dataset
class ImageNetA(WnidSubset):
    name = "imagenet_a"
    folder = "imagenet-a"
    domains = ["ImageNet-A"]
    wnids = IMAGENET_A_WNIDS


@register_dataset
class ImageNetR(WnidSubset):
    name = "imagenet_r"
    folder = "imagenet-r"
    domains = ["ImageNet-R"]
    wnids = IMAGENET_R_WNIDS
    tda_templates = IMAGENET_TEMPLATES


@register_dataset
class ImageNetSketch(WnidSubset):
    name = "imagenet_sketch"
    aliases = ("imagenet_k",)   # the authors' suite's name
    folder = "ImageNet-Sketch/sketch"
    domains = ["ImageNet-Sketch"]
    wnids = ()                  # all 1000
    tda_templates = IMAGENET_TEMPLATES


@register_dataset
class ImageNetV2(ImageNetVariant):
    name = "imagenet_v2"
    folder = "imagenet-v2/imagenetv2-matched-frequency-format-val"
    domains = ["ImageNet-V2"]

    def class_folders(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(1000))

    def imagenet_indices(self) -> tuple[int, ...]:
        return tuple(range(1000))
