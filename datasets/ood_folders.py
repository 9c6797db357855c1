"""OOD sets read from image folders and from image lists, in the layouts their releases unpack to (datasets.ood_sets
describes the interface; docs/ood_sets.md the sets):

  textures             DATA_DIR/dtd/images/<class>/<image>              all 5,640 DTD images, 47 classes
  places               DATA_DIR/ood_data/Places/<folder>/<image>        CLIPTTA's; MOS's subset: Places/images/
  places_c             DATA_DIR/ood_data/Places-C/<corruption>/<severity>/<folder>/<image>      (CLIPTTA's)
  places365            DATA_DIR/places365/{val_256/ or val_large/, places365_val.txt, categories_places365.txt}
  ninco                DATA_DIR/ood_data/NINCO/NINCO_OOD_classes/<class>/<image>        64 classes (CLIPTTA's)
  ninco_c              DATA_DIR/ood_data/NINCO-C/<corruption>/<severity>/images/<class>/<image>  (CLIPTTA's)
  lsun, lsun_resize    DATA_DIR/LSUN/test/<image>, DATA_DIR/LSUN_resize/LSUN_resize/<image>    (ODIN's archives)
  openood_<name>       DATA_DIR/benchmark_imglist/imagenet/test_<name>.txt, images under DATA_DIR/images_largescale/
                       (Textures: DATA_DIR/images_classic/), as OpenOOD's ImglistDataset reads them

A folder set whose class folders are not fixed (Places, Places-C, NINCO-C, LSUN) is read as CLIPTTA's torchvision
ImageFolder reads it: every folder under the root is a class, in sorted order. Every problem that needs no
decoding is a DatasetError naming the path (and, for a list, the line) when the run is planned.
"""
from __future__ import annotations

from pathlib import Path

from datasets.base import CLEAN, DatasetError, ImageDataset
from datasets.coop_sets import SplitImages, coop_class_names
from datasets.folders import ImageFiles, check_no_severity, read_class_folders, refuse_repeated_images
from datasets.ood_sets import CorruptedOodSet, OodSet, check_ood_domain, register_ood_set

# The registered benchmark sets whose classes are ImageNet-1k classes: what a curated ImageNet OOD set (MOS's
# iNaturalist/SUN/Places, NINCO, OpenOOD's lists) was cleaned against.
IMAGENET_1K_SETS = ("imagenet_c", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# NINCO's 64 class folders as its release (zenodo.org/record/8013288, NINCO_all.tar.gz) names them, sorted as
# ImageFolder sorts them (j-cb/NINCO data/NINCO_OOD_classes.csv; two hold spaces).
NINCO_CLASS_FOLDERS = (
    "Caracal caracal caracal", "amphiuma_means", "aphanizomenon_flosaquae", "araneus_gemma",
    "arctocephalus_galapagoensis", "bagpipe", "batrachoseps_attenuatus", "cable", "chicken_quesadilla",
    "cirsium_pitcheri", "creme_brulee", "ctenolepisma_longicaudata", "cup_cakes", "darlingtonia_californica",
    "dendrolagus_lumholtzi", "donuts", "door", "empty_water_dispencer", "epithelantha_micromeris",
    "erysimum_franciscanum", "f_field_road", "f_forest_path", "ferocactus_pilosus", "fire_extinguisher", "fireworks",
    "french_fries", "glass_of_milk", "gramophone", "haemulon_sciurus", "high heels", "hindu_temple",
    "hippopus_hippopus", "lasionycteris_noctivagans", "lathyrus_odoratus", "lepomis_auritus",
    "leptoglossus_phyllopus", "mbira", "microcystis_wesenbergii", "octopus_bimaculoides", "octopus_rubescens",
    "ozotoceros_bezoarticus", "platycephalus_fuscus", "polistes_dominula", "pseudorca_crassidens", "pyramid", "s_sky",
    "sarpa_salpa", "sarracenia_alata", "scissors", "sepia_apama", "sepia_officinalis", "sepioteuthis_australis",
    "shuttlecock", "skipper_caterpillar", "spaghetti_bolognese", "stapler", "streptopus_lanceolatus",
    "tapirus_bairdii", "triturus_marmoratus", "tursiops_aduncus", "vaccinium_reticulatum", "waffles", "walker",
    "windsor_chair")

# ODIN's LSUN crops are the LSUN test set: 10,000 images of these 10 scene categories, not labelled in the
# archive. Named for the overlap check (CIFAR-100's "bridge" is one of them).
LSUN_SCENES = ("bedroom", "bridge", "church outdoor", "classroom", "conference room", "dining room", "kitchen",
               "living room", "restaurant", "tower")


def present_class_folders(root: Path, what: str, layout: str) -> tuple[str, ...]:
    """The class folders under ``root`` as torchvision's ImageFolder finds them (sorted names; hidden ones
    skipped), for a set whose releases name their folders freely; at least one."""
    if not root.is_dir():
        raise DatasetError(f"{what}: directory {root} does not exist. Expected the layout {layout}; set DATA_DIR to "
                           f"the folder that contains it.")
    folders = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not folders:
        raise DatasetError(f"{what}: {root} holds no class folder; expected the layout {layout} (images directly "
                           f"in {root} are not read, as ImageFolder does not read them)")
    return folders


def read_labelled_list(list_path: Path, image_root: Path, what: str, labels_allowed) -> tuple[list[Path], list[int]]:
    """"<image path relative to image_root> <integer label>" per line, split at the first space as OpenOOD's
    ImglistDataset splits it (Places365's places365_val.txt has the same form). Refuses a missing or empty list,
    a malformed line, a label not in ``labels_allowed``, a missing image and a repeated one, naming file and line."""
    if not list_path.is_file():
        raise DatasetError(f"{what}: image list {list_path} does not exist (its images are read from {image_root})")
    files: list[Path] = []
    labels: list[int] = []
    places: list[str] = []
    for number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name, _, text = line.strip().partition(" ")
        label = _integer(text)
        if label is None or name.startswith("/"):
            raise DatasetError(f"{what}: {list_path} line {number} is {line!r}; expected '<image path relative to "
                               f"{image_root}> <integer label>'")
        if label not in labels_allowed:
            raise DatasetError(f"{what}: {list_path} line {number} has label {label}; expected "
                               f"{_describe_labels(labels_allowed)}")
        path = image_root / name
        if not path.is_file():
            raise DatasetError(f"{what}: {list_path} line {number} names {path}, which does not exist")
        files.append(path)
        labels.append(label)
        places.append(f"line {number}")
    if not files:
        raise DatasetError(f"{what}: image list {list_path} lists no image")
    refuse_repeated_images(what, files, labels, places, list_path)
    return files, labels


def _integer(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _describe_labels(labels_allowed) -> str:
    if isinstance(labels_allowed, range):
        return f"a label in {labels_allowed.start}..{labels_allowed.stop - 1}"
    return f"the label {' or '.join(map(str, sorted(labels_allowed)))} (an OOD image in OpenOOD's lists)"


class ClassFolderOod(OodSet):
    """A set read from ``DATA_DIR/<folder>/<class>/<image>``: the fixed ``class_folders`` (a missing or extra one
    refused), or, when that is empty, the folders present (ImageFolder's reading)."""
    folder = ""
    class_folders: tuple[str, ...] = ()

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        check_ood_domain(self, domain)
        check_no_severity(self.name, severity)
        root = Path(cfg.DATA_DIR).expanduser() / self.folder
        return self.read_root(root)

    def read_root(self, root: Path) -> ImageFiles:
        layout = f"DATA_DIR/{self.layout}"
        folders = self.class_folders or present_class_folders(root, f"OOD set {self.name}", layout)
        files, labels = read_class_folders(root, folders, f"OOD set {self.name}", layout)
        return ImageFiles(files, labels)

    def describe(self, cfg) -> dict:
        return {"ood_root": str(Path(cfg.DATA_DIR).expanduser() / self.folder)}


class CorruptedClassFolderOod(CorruptedOodSet, ClassFolderOod):
    """Corruptions of a folder set in ``DATA_DIR/<folder>/<corruption>/<severity>/<below>/<class>/<image>``; the
    domain ``none`` is the clean set ``clean_set``, read at no severity."""
    clean_set = ""
    below = ""

    def read_clean(self, cfg) -> ImageDataset:
        return OOD_FOLDER_SETS[self.clean_set].build(cfg, CLEAN, 0)

    def read_corrupted(self, cfg, domain: str, severity: int) -> ImageDataset:
        root = Path(cfg.DATA_DIR).expanduser() / self.folder / domain / str(severity)
        return self.read_root(root / self.below if self.below else root)


OOD_FOLDER_SETS: dict[str, OodSet] = {}


def register(cls: type[OodSet]) -> type[OodSet]:
    """register_ood_set, keeping the instance for the sets that read another one (a corrupted set's clean domain)."""
    register_ood_set(cls)
    OOD_FOLDER_SETS[cls.name] = cls()
    return cls


@register
class Textures(ClassFolderOod):
    name = "textures"
    folder = "dtd/images"
    class_folders = coop_class_names("dtd")     # DTD's folder names are CoOp's class names
    class_names = class_folders
    layout = "dtd/images/<class>/<image>.jpg (every DTD image, not the CoOp split; the folders the dtd set reads)"


@register
class Places(ClassFolderOod):
    name = "places"
    folder = "ood_data/Places"
    disjoint_from = IMAGENET_1K_SETS
    layout = "ood_data/Places/<folder>/<image>.jpg (MOS's Places subset: ood_data/Places/images/<image>.jpg)"


@register
class PlacesC(CorruptedClassFolderOod):
    name = "places_c"
    folder = "ood_data/Places-C"
    clean_set = "places"
    disjoint_from = IMAGENET_1K_SETS
    layout = "ood_data/Places-C/<corruption>/<severity>/<folder>/<image>.jpg"


@register
class Ninco(ClassFolderOod):
    name = "ninco"
    folder = "ood_data/NINCO/NINCO_OOD_classes"
    class_folders = NINCO_CLASS_FOLDERS
    class_names = NINCO_CLASS_FOLDERS
    disjoint_from = IMAGENET_1K_SETS
    layout = "ood_data/NINCO/NINCO_OOD_classes/<class>/<image> (the 64 class folders of NINCO_all.tar.gz)"


@register
class NincoC(CorruptedClassFolderOod):
    name = "ninco_c"
    folder = "ood_data/NINCO-C"
    below = "images"
    clean_set = "ninco"
    class_names = NINCO_CLASS_FOLDERS
    disjoint_from = IMAGENET_1K_SETS
    layout = "ood_data/NINCO-C/<corruption>/<severity>/images/<class>/<image>"


@register
class Lsun(ClassFolderOod):
    name = "lsun"
    folder = "LSUN"
    class_names = LSUN_SCENES
    layout = "LSUN/test/<image>.jpg (ODIN's LSUN.tar.gz, the crops)"


@register
class LsunResize(ClassFolderOod):
    name = "lsun_resize"
    folder = "LSUN_resize"
    class_names = LSUN_SCENES
    layout = "LSUN_resize/LSUN_resize/<image>.jpg (ODIN's LSUN_resize.tar.gz)"


def places365_class_name(category: str) -> str:
    """A Places365 category as a class name: its letter folder dropped, the rest read as words
    ("/a/airfield" -> "airfield", "/b/bakery/shop" -> "bakery shop")."""
    return " ".join(category.strip("/").split("/")[1:]).replace("_", " ")


@register
class Places365(OodSet):
    name = "places365"
    # Read from the release's categories_places365.txt: class_names_for(cfg).
    layout = ("places365/{val_256/ (or val_large/), places365_val.txt, categories_places365.txt} (the official "
              "Places365 validation set)")

    @staticmethod
    def base(cfg) -> Path:
        return Path(cfg.DATA_DIR).expanduser() / "places365"

    def image_folder(self, cfg) -> Path:
        """val_256 where present (the 256x256 release), else val_large."""
        base = self.base(cfg)
        for name in ("val_256", "val_large"):
            if (base / name).is_dir():
                return base / name
        raise DatasetError(f"OOD set places365: neither {base / 'val_256'} nor {base / 'val_large'} exists; expected "
                           f"DATA_DIR/{self.layout}")

    def categories(self, cfg) -> tuple[str, ...]:
        """categories_places365.txt: "/a/airfield 0", one per line, numbered 0, 1, ... in order."""
        path = self.base(cfg) / "categories_places365.txt"
        if not path.is_file():
            raise DatasetError(f"OOD set places365: category file {path} does not exist; expected DATA_DIR/"
                               f"{self.layout}")
        names = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            category, _, index = line.strip().rpartition(" ")
            if not category.startswith("/") or index != str(len(names)):
                raise DatasetError(f"OOD set places365: {path} line {number} is {line!r}; expected '/<letter>/"
                                   f"<category> {len(names)}'")
            names.append(places365_class_name(category))
        return tuple(names)

    def class_names_for(self, cfg) -> tuple[str, ...]:
        return self.categories(cfg)

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        check_ood_domain(self, domain)
        check_no_severity(self.name, severity)
        categories = self.categories(cfg)
        list_path = self.base(cfg) / "places365_val.txt"
        files, labels = read_labelled_list(list_path, self.image_folder(cfg), "OOD set places365",
                                           range(len(categories)))
        return SplitImages(files, labels, [list_path, self.base(cfg) / "categories_places365.txt"])

    def describe(self, cfg) -> dict:
        return {"places365_images": self.image_folder(cfg).name,
                "image_list": str(self.base(cfg) / "places365_val.txt")}


class OpenOodList(OodSet):
    """One of OpenOOD's ImageNet OOD test lists: benchmark_imglist/imagenet/test_<list_name>.txt, each line
    "<path relative to the image root> -1" (-1: no ImageNet class)."""
    list_name = ""
    image_root = "images_largescale"
    disjoint_from = IMAGENET_1K_SETS

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.layout = (f"benchmark_imglist/imagenet/test_{cls.list_name}.txt with the images under "
                      f"{cls.image_root}/ (OpenOOD's scripts/download/download.py)")

    def list_path(self, cfg) -> Path:
        return Path(cfg.DATA_DIR).expanduser() / "benchmark_imglist" / "imagenet" / f"test_{self.list_name}.txt"

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        check_ood_domain(self, domain)
        check_no_severity(self.name, severity)
        root = Path(cfg.DATA_DIR).expanduser() / self.image_root
        files, labels = read_labelled_list(self.list_path(cfg), root, f"OOD set {self.name}", {-1})
        return SplitImages(files, labels, [self.list_path(cfg)])

    def describe(self, cfg) -> dict:
        return {"image_list": str(self.list_path(cfg))}


def _openood_list(name: str, list_name: str, image_root: str = "images_largescale") -> None:
    register(type(f"OpenOod_{list_name}", (OpenOodList,),
                  {"name": name, "list_name": list_name, "image_root": image_root, "__module__": __name__}))


# OpenOOD v1's far-OOD lists (MOS's subsets; configs/datasets/imagenet/imagenet_ood.yml before v1.5) and v1.5's
# (openood/evaluation_api/datasets.py). Textures is read from images_classic/, the others from images_largescale/.
for _name, _list, _root in (("openood_inaturalist", "inaturalist", "images_largescale"),
                            ("openood_sun", "sun", "images_largescale"),
                            ("openood_places", "places", "images_largescale"),
                            ("openood_textures", "textures", "images_classic"),
                            ("openood_openimage_o", "openimage_o", "images_largescale"),
                            ("openood_ninco", "ninco", "images_largescale"),
                            ("openood_ssb_hard", "ssb_hard", "images_largescale")):
    _openood_list(_name, _list, _root)
