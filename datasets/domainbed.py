"""Domain-generalisation benchmarks in the DomainBed layout: DATA_DIR/<folder>/<domain>/<class>/<image>.

OfficeHome (office_home/), PACS (PACS/), VLCS (VLCS/), TerraIncognita (terra_incognita/). Each domain is one
task (CORRUPTION.TYPE holds domain names, in the paper's table order by default); there are no severities.
Class indices are the sorted class-folder names (as DomainBed's ImageFolder orders them), the same in every
domain; the prompt names are the folder names made readable, with a per-set override table where the folder
name is a poor prompt.
"""
from __future__ import annotations

from pathlib import Path


from datasets.base import BenchmarkDataset, DatasetError, ImageDataset, register_dataset
from datasets.class_names import IMAGENET_TEMPLATES
from datasets.folders import ImageFiles, check_no_severity, read_class_folders, take_subset


def readable(folder_name: str) -> str:
    """Folder name -> prompt name: underscores read as spaces, lower case ("Alarm_Clock" -> "alarm clock")."""
    return folder_name.replace("_", " ").lower()


class DomainBedDataset(BenchmarkDataset):
    folder = ""
    class_folders: tuple[str, ...] = ()
    # Folder name -> prompt name, where readable(folder) is a poor prompt.
    class_name_overrides: dict[str, str] = {}
    # Domain -> other folder names accepted for it on disk (copies that renamed the folder).
    domain_folder_aliases: dict[str, tuple[str, ...]] = {}
    # CLIP.PROMPT_MODE ensemble: CLIP's 80 ImageNet templates (generic object templates).
    ensemble_templates = IMAGENET_TEMPLATES
    has_severities = False
    domain_label = "domain"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = set(cls.class_name_overrides) - set(cls.class_folders)
        assert not unknown, f"{cls.__name__}: overrides for unknown class folders {unknown}"
        # Sorted like DomainBed's ImageFolder, so index c means the same class in every domain.
        cls.class_folders = tuple(sorted(cls.class_folders))
        cls.class_names = [cls.class_name_overrides.get(f, readable(f)) for f in cls.class_folders]

    def layout(self, base: Path) -> str:
        return f"{base}/<domain>/<class>/<image> with domains {list(self.domains)}"

    def domain_root(self, base: Path, domain: str) -> Path:
        for name in (domain, *self.domain_folder_aliases.get(domain, ())):
            if (base / name).is_dir():
                return base / name
        return base / domain

    def build_domain(self, cfg, domain: str, severity: int) -> ImageDataset:
        self.check_domain(domain)
        check_no_severity(self.name, severity)
        base = Path(cfg.DATA_DIR).expanduser() / self.folder
        if not base.is_dir():
            raise DatasetError(f"{self.name}: directory {base} does not exist. Expected the DomainBed layout "
                               f"{self.layout(base)}; set DATA_DIR to the folder that contains '{self.folder}/'.")
        root = self.domain_root(base, domain)
        files, labels = read_class_folders(root, self.class_folders, f"{self.name} domain '{domain}'",
                                           self.layout(base))
        files, labels = take_subset(cfg, files, labels, root)
        return ImageFiles(files, labels)


@register_dataset
class OfficeHome(DomainBedDataset):
    name = "office_home"
    folder = "office_home"
    domains = ["Art", "Clipart", "Product", "Real World"]
    domain_folder_aliases = {"Real World": ("Real_World",)}
    class_folders = (
        "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar",
        "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser",
        "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer",
        "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse",
        "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin",
        "Radio", "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
        "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
    )
    class_name_overrides = {
        "TV": "TV",                        # an acronym, not "tv"
        "Postit_Notes": "post-it notes",
        "Flipflops": "flip-flops",
        "ToothBrush": "toothbrush",
        "Mouse": "computer mouse",         # OfficeHome's mice are computer mice, not the animal
    }


@register_dataset
class PACS(DomainBedDataset):
    name = "pacs"
    folder = "PACS"
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    class_folders = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


@register_dataset
class VLCS(DomainBedDataset):
    name = "vlcs"
    folder = "VLCS"
    domains = ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    class_folders = ("bird", "car", "chair", "dog", "person")


@register_dataset
class TerraIncognita(DomainBedDataset):
    name = "terra_incognita"
    folder = "terra_incognita"
    domains = ["location_38", "location_43", "location_46", "location_100"]
    class_folders = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")
    class_name_overrides = {
        "empty": "empty scene",            # camera-trap frames with no animal; "a photo of a empty." says nothing
    }
