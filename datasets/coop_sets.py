"""The ten fine-grained / cross-domain sets of CLIP's zero-shot evaluations, in CoOp's on-disk layout
(KaiyangZhou/CoOp DATASETS.md; TDA, TPT and DPE read the same folders):

  caltech101     DATA_DIR/caltech-101/{101_ObjectCategories/, split_zhou_Caltech101.json}          100 classes
  dtd            DATA_DIR/dtd/{images/, split_zhou_DescribableTextures.json}                        47 classes
  eurosat        DATA_DIR/eurosat/{2750/, split_zhou_EuroSAT.json}                                  10 classes
  fgvc_aircraft  DATA_DIR/fgvc_aircraft/{images/, variants.txt, images_variant_test.txt}           100 classes
  food101        DATA_DIR/food-101/{images/, split_zhou_Food101.json}                               101 classes
  flowers102     DATA_DIR/oxford_flowers/{jpg/, split_zhou_OxfordFlowers.json}                      102 classes
  oxford_pets    DATA_DIR/oxford_pets/{images/, split_zhou_OxfordPets.json}                          37 classes
  stanford_cars  DATA_DIR/stanford_cars/{cars_test/, split_zhou_StanfordCars.json}                  196 classes
  sun397         DATA_DIR/sun397/{SUN397/, split_zhou_SUN397.json}                                  397 classes
  ucf101         DATA_DIR/ucf101/{UCF-101-midframes/, split_zhou_UCF101.json}                       101 classes

Each is one data set with a single domain and no severities, read as CoOp's and TDA's code reads its test split:
the "test" list of the user's split_zhou_<Name>.json ([image path relative to the image folder, label, class
name] triples; StanfordCars' paths are relative to the set's folder), or for FGVCAircraft the dataset's own
images_variant_test.txt ("<image id> <variant>", image images/<id>.jpg, label = the variant's line in variants.txt).
The split files are not shipped (users have them from CoOp). Labels are the split file's; the class names are
CoOp's (datasets/coop_classes/<set>.txt, label order, as its dataset classes write them into the split files,
e.g. EuroSAT's renamed "Annual Crop Land"), and the split file must agree with them. Prompts read a name with its
underscores as spaces, as CoOp's zero-shot CLIP and TDA's classifier do ("apple_pie" -> "apple pie").
Everything that needs no decoding is checked when the run is planned (build_domain): a missing folder or split
file, a malformed one, a class name that differs, a listed image that is not there.
"""
from __future__ import annotations

import json
from pathlib import Path


from datasets.base import BenchmarkDataset, DatasetError, ImageDataset, register_dataset, select_subset
from datasets.class_names import IMAGENET_TEMPLATES, TDA_SELECTED_TEMPLATES
from datasets.folders import ImageFiles, check_no_severity, refuse_repeated_images

CLASS_LIST_DIR = Path(__file__).resolve().parent / "coop_classes"
COOP_LAYOUTS = "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp)"


def coop_class_names(name: str) -> tuple[str, ...]:
    """CoOp's class names of one set in label order, as its split files write them (one per line)."""
    return tuple(line for line in (CLASS_LIST_DIR / f"{name}.txt").read_text(encoding="utf-8").split("\n") if line)


class _RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_repeated_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a key given twice in one object is an error, not the last one silently."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


class SplitImages(ImageFiles):
    """The images of a test split; the split's own files (which set the labels) are part of what it reads."""

    def __init__(self, files: list[Path], labels: list[int], split_files: list[Path]):
        super().__init__(files, labels)
        self.split_files = split_files

    def source_files(self) -> list[Path]:
        return list(self.split_files) + list(self.files)


class CoopDataset(BenchmarkDataset):
    """A set in CoOp's layout: DATA_DIR/<folder>/ holds the images (under <image_folder>/) and the test list.

    The test stream is the split's test list in the file's order (the order CoOp's and TDA's data sources keep);
    CORRUPTION.NUM_EX draws from it by CORRUPTION.SUBSET (datasets.base.select_subset), and TEST.STREAM_ORDER
    authors shuffles it as the BATCLIP authors' get_test_loader shuffles a sample list (harness.stream)."""
    folder = ""             # relative to DATA_DIR
    image_folder = ""       # relative to folder; the split's paths are relative to it
    layout_files = ()       # what DATA_DIR/<folder>/ must hold, for the messages
    ensemble_templates = IMAGENET_TEMPLATES     # CLIP's generic ImageNet templates: no set-specific ensemble here
    has_severities = False
    domain_label = "dataset"
    coop_names: tuple[str, ...] = ()     # CoOp's names in label order, as its split files write them

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:    # a registered set, not an intermediate class
            cls.coop_names = coop_class_names(cls.name)
            cls.class_names = [n.replace("_", " ") for n in cls.coop_names]

    def layout(self, base: Path) -> str:
        return f"{base}/{{{', '.join(self.layout_files)}}} as in {COOP_LAYOUTS}"

    def base(self, cfg) -> Path:
        base = Path(cfg.DATA_DIR).expanduser() / self.folder
        if not base.is_dir():
            raise DatasetError(f"{self.name}: directory {base} does not exist. Expected the layout "
                               f"{self.layout(base)}; set DATA_DIR to the folder that contains '{self.folder}/'.")
        return base

    def build_domain(self, cfg, domain: str, severity: int) -> ImageDataset:
        self.check_domain(domain)
        check_no_severity(self.name, severity)
        base = self.base(cfg)
        files, labels, split_files = self.read_test_list(base)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DatasetError(f"{self.name}: {len(missing)} of the {len(files)} test images listed in "
                               f"{split_files[-1]} do not exist, e.g. {missing[0]} (expected the layout "
                               f"{self.layout(base)})")
        if cfg.CORRUPTION.NUM_EX >= 0:
            pairs = select_subset(list(zip(files, labels)), cfg, base)
            files, labels = [f for f, _ in pairs], [y for _, y in pairs]
        return SplitImages(files, labels, split_files)

    def read_test_list(self, base: Path) -> tuple[list[Path], list[int], list[Path]]:
        """The test images (paths), their labels, and the files that list them."""
        raise NotImplementedError

    def describe(self, cfg) -> dict:
        return {"test_list": str(Path(self.folder) / self.list_file)}

    def input_files(self, cfg) -> dict[str, str]:
        base = Path(cfg.DATA_DIR).expanduser() / self.folder
        return {name: str(base / name) for name in self.layout_files if not name.endswith("/")}


class CoopSplitDataset(CoopDataset):
    """The test list is the "test" entry of CoOp's split_zhou_<Name>.json in DATA_DIR/<folder>/."""
    split_name = ""         # split_zhou_<split_name>.json

    @property
    def list_file(self) -> str:
        return f"split_zhou_{self.split_name}.json"

    @property
    def layout_files(self) -> tuple[str, ...]:
        return (f"{self.image_folder}/", self.list_file) if self.image_folder else ("cars_test/", self.list_file)

    def read_test_list(self, base: Path) -> tuple[list[Path], list[int], list[Path]]:
        path = base / self.list_file
        expected = (f"expected CoOp's split file, a JSON object whose \"test\" is a list of [image path relative to "
                    f"{base / self.image_folder}, label, class name]; download it as {COOP_LAYOUTS} says")
        if not path.is_file():
            raise DatasetError(f"{self.name}: split file {path} does not exist ({expected})")
        try:
            split = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_repeated_keys)
        except _RepeatedKey as err:
            raise DatasetError(f"{self.name}: split file {path} gives the key {err.key!r} twice (JSON keeps the last "
                               f"one silently); {expected}") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise DatasetError(f"{self.name}: split file {path} is not valid JSON ({err}); {expected}") from None
        test = split.get("test") if isinstance(split, dict) else None
        if not isinstance(test, list) or not test:
            raise DatasetError(f"{self.name}: split file {path} has no non-empty \"test\" list; {expected}")
        root = base / self.image_folder
        files, labels = [], []
        mismatch = {}
        for k, entry in enumerate(test):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool) and isinstance(entry[2], str)):
                raise DatasetError(f"{self.name}: split file {path}, test entry {k} is {entry!r}; {expected}")
            relative, label, class_name = entry
            if not 0 <= label < len(self.coop_names):
                raise DatasetError(f"{self.name}: split file {path}, test entry {k} has label {label}; {self.name} "
                                   f"has {len(self.coop_names)} classes (labels 0..{len(self.coop_names) - 1})")
            if class_name != self.coop_names[label]:
                mismatch.setdefault(label, class_name)
            files.append(root / relative)
            labels.append(label)
        refuse_repeated_images(self.name, files, labels, [f"test entry {k}" for k in range(len(files))], path)
        if mismatch:
            label = min(mismatch)
            raise DatasetError(f"{self.name}: split file {path} names label {label} '{mismatch[label]}', CoOp's split "
                               f"names it '{self.coop_names[label]}' ({len(mismatch)} labels differ); expected CoOp's "
                               f"split_zhou_{self.split_name}.json")
        return files, labels, [path]


@register_dataset
class Caltech101(CoopSplitDataset):
    name = "caltech101"
    domains = ["Caltech101"]
    folder, image_folder, split_name = "caltech-101", "101_ObjectCategories", "Caltech101"
    coop_templates = ["a photo of a {}."]
    tda_templates = TDA_SELECTED_TEMPLATES


@register_dataset
class DTD(CoopSplitDataset):
    name = "dtd"
    domains = ["DTD"]
    folder, image_folder, split_name = "dtd", "images", "DescribableTextures"
    coop_templates = ["{} texture."]
    tda_templates = ["{} texture."]


@register_dataset
class EuroSAT(CoopSplitDataset):
    name = "eurosat"
    domains = ["EuroSAT"]
    folder, image_folder, split_name = "eurosat", "2750", "EuroSAT"
    coop_templates = ["a centered satellite photo of {}."]
    tda_templates = ["a centered satellite photo of {}."]


@register_dataset
class Food101(CoopSplitDataset):
    name = "food101"
    domains = ["Food101"]
    folder, image_folder, split_name = "food-101", "images", "Food101"
    coop_templates = ["a photo of {}, a type of food."]
    tda_templates = ["a photo of {}, a type of food."]


@register_dataset
class Flowers102(CoopSplitDataset):
    name = "flowers102"
    domains = ["Flowers102"]
    folder, image_folder, split_name = "oxford_flowers", "jpg", "OxfordFlowers"
    coop_templates = ["a photo of a {}, a type of flower."]
    tda_templates = ["a photo of a {}, a type of flower."]


@register_dataset
class OxfordPets(CoopSplitDataset):
    name = "oxford_pets"
    domains = ["OxfordPets"]
    folder, image_folder, split_name = "oxford_pets", "images", "OxfordPets"
    coop_templates = ["a photo of a {}, a type of pet."]
    tda_templates = ["a photo of a {}, a type of pet."]


@register_dataset
class StanfordCars(CoopSplitDataset):
    name = "stanford_cars"
    domains = ["StanfordCars"]
    # CoOp's StanfordCars split lists "cars_test/<file>", relative to the set's folder itself.
    folder, image_folder, split_name = "stanford_cars", "", "StanfordCars"
    coop_templates = ["a photo of a {}."]
    tda_templates = TDA_SELECTED_TEMPLATES


@register_dataset
class SUN397(CoopSplitDataset):
    name = "sun397"
    domains = ["SUN397"]
    folder, image_folder, split_name = "sun397", "SUN397", "SUN397"
    coop_templates = ["a photo of a {}."]
    tda_templates = TDA_SELECTED_TEMPLATES


@register_dataset
class UCF101(CoopSplitDataset):
    name = "ucf101"
    domains = ["UCF101"]
    folder, image_folder, split_name = "ucf101", "UCF-101-midframes", "UCF101"
    coop_templates = ["a photo of a person doing {}."]
    tda_templates = ["a photo of a person doing {}."]


@register_dataset
class FGVCAircraft(CoopDataset):
    """No split file: CoOp reads the data set's own variants.txt (the classes, label = line) and
    images_variant_test.txt ("<image id> <variant name>", the image is images/<id>.jpg)."""
    name = "fgvc_aircraft"
    domains = ["FGVCAircraft"]
    folder, image_folder = "fgvc_aircraft", "images"
    list_file = "images_variant_test.txt"
    layout_files = ("images/", "variants.txt", "images_variant_test.txt")
    coop_templates = ["a photo of a {}, a type of aircraft."]
    tda_templates = ["a photo of a {}, a type of aircraft."]

    def read_test_list(self, base: Path) -> tuple[list[Path], list[int], list[Path]]:
        expected = f"expected the layout {self.layout(base)}: the data/ folder of fgvc-aircraft-2013b"
        variants_file, test_file = base / "variants.txt", base / self.list_file
        for path in (variants_file, test_file):
            if not path.is_file():
                raise DatasetError(f"{self.name}: {path} does not exist ({expected})")
        variants = [line.strip() for line in variants_file.read_text().splitlines()]
        while variants and not variants[-1]:
            variants.pop()
        if variants != list(self.coop_names):
            label = next((k for k, (theirs, ours) in enumerate(zip(variants, self.coop_names)) if theirs != ours),
                         min(len(variants), len(self.coop_names)))
            theirs = repr(variants[label]) if label < len(variants) else "nothing"
            ours = repr(self.coop_names[label]) if label < len(self.coop_names) else "nothing"
            raise DatasetError(f"{self.name}: {variants_file} names label {label} {theirs}, FGVC-Aircraft's "
                               f"variants.txt names it {ours} ({expected})")
        label_of = {name: label for label, name in enumerate(self.coop_names)}
        files, labels, places = [], [], []
        for number, line in enumerate(test_file.read_text().splitlines(), start=1):
            parts = line.strip().split(" ")
            if parts == [""]:
                continue
            variant = " ".join(parts[1:])
            if variant not in label_of:
                raise DatasetError(f"{self.name}: {test_file} line {number} {line.strip()!r} does not end in a variant "
                                   f"of variants.txt ('<image id> <variant>' expected)")
            files.append(base / self.image_folder / f"{parts[0]}.jpg")
            labels.append(label_of[variant])
            places.append(f"line {number}")
        if not files:
            raise DatasetError(f"{self.name}: {test_file} lists no images ({expected})")
        refuse_repeated_images(self.name, files, labels, places, test_file)
        return files, labels, [variants_file, test_file]
