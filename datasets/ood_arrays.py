"""OOD sets read from arrays and list files (datasets/ood_sets.py): SVHN (torchvision's .mat), SVHN-C (CLIPTTA's
.npy files), Tiny-ImageNet's validation set (its annotation list) and Tiny-ImageNet-C (Hendrycks' class folders).

DATA_DIR/SVHN/test_32x32.mat                      : X uint8 (32, 32, 3, N), y (N, 1) with 10 meaning the digit 0
DATA_DIR/SVHN-C/<corruption>.npy                  : uint8 (5N, 32, 32, 3), severity s in rows [(s-1)N, sN)
DATA_DIR/tiny-imagenet-200/{wnids,words}.txt      : the 200 wnids (class index = line), WordNet's lemmas
DATA_DIR/tiny-imagenet-200/val/val_annotations.txt: "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per val/images/<file>
DATA_DIR/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/<image>.JPEG

Registers the OOD sets svhn, svhn_c, tiny_imagenet and tiny_imagenet_c; no benchmark data set."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.base import DatasetError, ImageDataset
from datasets.cifar_c import NpyImages, load_mmap
from datasets.corruptions import held_severities
from datasets.folders import ImageFiles, check_no_severity, read_class_folders, refuse_repeated_images
from datasets.ood_sets import CorruptedOodSet, OodSet, check_ood_domain, register_ood_set

SVHN_FILE = "SVHN/test_32x32.mat"
SVHN_C_FOLDER = "SVHN-C"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_C_FOLDER = "Tiny-ImageNet-C"
# SVHN's classes are the digits: no CIFAR or ImageNet class is named by a digit, so the overlap check passes.
SVHN_CLASSES = tuple(str(digit) for digit in range(10))

# Tiny-ImageNet's 200 classes in the order of its wnids.txt (class index = line), each with the first lemma of its
# words.txt entry. Shipped so that the overlap check runs before any file is read; the files are checked against it.
_TINY_IMAGENET = """\
n02124075 Egyptian cat|n04067472 reel|n04540053 volleyball|n04099969 rocking chair|n07749582 lemon
n01641577 bullfrog|n02802426 basketball|n09246464 cliff|n07920052 espresso|n03970156 plunger
n03891332 parking meter|n02106662 German shepherd|n03201208 dining table|n02279972 monarch
n02132136 brown bear|n04146614 school bus|n07873807 pizza|n02364673 guinea pig|n04507155 umbrella
n03854065 organ|n03838899 oboe|n03733131 maypole|n01443537 goldfish|n07875152 potpie|n03544143 hourglass
n09428293 seashore|n03085013 computer keyboard|n02437312 Arabian camel|n07614500 ice cream|n03804744 nail
n04265275 space heater|n02963159 cardigan|n02486410 baboon|n01944390 snail|n09256479 coral reef
n02058221 albatross|n04275548 spider web|n02321529 sea cucumber|n02769748 backpack
n02099712 Labrador retriever|n07695742 pretzel|n02056570 king penguin|n02281406 sulphur butterfly
n01774750 tarantula|n02509815 lesser panda|n03983396 pop bottle|n07753592 banana|n04254777 sock
n02233338 cockroach|n04008634 projectile|n02823428 beer bottle|n02236044 mantis|n03393912 freight car
n07583066 guacamole|n04074963 remote control|n01629819 European fire salamander|n09332890 lakeside
n02481823 chimpanzee|n03902125 pay-phone|n03404251 fur coat|n09193705 alp|n03637318 lampshade|n04456115 torch
n02666196 abacus|n03796401 moving van|n02795169 barrel|n02123045 tabby|n01855672 goose|n01882714 koala
n02917067 bullet train|n02988304 CD player|n04398044 teapot|n02843684 birdhouse|n02423022 gazelle
n02669723 academic gown|n04465501 tractor|n02165456 ladybug|n03770439 miniskirt|n02099601 golden retriever
n04486054 triumphal arch|n02950826 cannon|n03814639 neck brace|n04259630 sombrero|n03424325 gasmask
n02948072 candle|n03179701 desk|n03400231 frying pan|n02206856 bee|n03160309 dam|n01984695 spiny lobster
n03977966 police van|n03584254 iPod|n04023962 punching bag|n02814860 beacon|n01910747 jellyfish|n04596742 wok
n03992509 potter's wheel|n04133789 sandal|n03937543 pill bottle|n02927161 butcher shop|n01945685 slug
n02395406 hog|n02125311 cougar|n03126707 crane|n04532106 vestment|n02268443 dragonfly|n02977058 cash machine
n07734744 mushroom|n03599486 jinrikisha|n04562935 water tower|n03014705 chest|n04251144 snorkel
n04356056 sunglasses|n02190166 fly|n03670208 limousine|n02002724 black stork|n02074367 dugong
n04285008 sports car|n04560804 water jug|n04366367 suspension bridge|n02403003 ox|n07615774 ice lolly
n04501370 turnstile|n03026506 Christmas stocking|n02906734 broom|n01770393 scorpion|n04597913 wooden spoon
n03930313 picket fence|n04118538 rugby ball|n04179913 sewing machine|n04311004 steel arch bridge
n02123394 Persian cat|n04070727 refrigerator|n02793495 barn|n02730930 apron|n02094433 Yorkshire terrier
n04371430 swimming trunks|n04328186 stopwatch|n03649909 lawn mower|n04417672 thatch|n03388043 fountain
n01774384 black widow|n02837789 bikini|n07579787 plate|n04399382 teddy|n02791270 barbershop
n03089624 confectionery|n02814533 beach wagon|n04149813 scoreboard|n07747607 orange|n03355925 flagpole
n01983481 American lobster|n04487081 trolleybus|n03250847 drumstick|n03255030 dumbbell|n02892201 brass
n02883205 bow tie|n03100240 convertible|n02415577 bighorn|n02480495 orangutan|n01698640 American alligator
n01784675 centipede|n04376876 syringe|n03444034 go-kart|n01917289 brain coral|n01950731 sea slug
n03042490 cliff dwelling|n07711569 mashed potato|n04532670 viaduct|n03763968 military uniform
n07768694 pomegranate|n02999410 chain|n03617480 kimono|n06596364 comic book|n01768244 trilobite
n02410509 bison|n03976657 pole|n01742172 boa constrictor|n03980874 poncho|n02808440 bathtub
n02226429 grasshopper|n02231487 walking stick|n02085620 Chihuahua|n01644900 tailed frog|n02129165 lion
n02699494 altar|n03837869 obelisk|n02815834 beaker|n07720875 bell pepper|n02788148 bannister|n02909870 bucket
n03706229 magnetic compass|n07871810 meat loaf|n03447447 gondola|n02113799 standard poodle|n12267677 acorn
n03662601 lifeboat|n02841315 binoculars|n07715103 cauliflower|n02504458 African elephant"""
_TINY_ENTRIES = [entry.split(" ", 1) for entry in _TINY_IMAGENET.replace("\n", "|").split("|")]
TINY_IMAGENET_WNIDS = tuple(wnid for wnid, _ in _TINY_ENTRIES)
TINY_IMAGENET_CLASSES = tuple(name for _, name in _TINY_ENTRIES)
SVHN_LAYOUT = (f"DATA_DIR/{SVHN_FILE}: X uint8 (32, 32, 3, N) and y (N, 1) holding 1..10, 10 meaning the digit 0 "
               f"(torchvision.datasets.SVHN(DATA_DIR/SVHN, split='test', download=True) writes it)")


def _data_dir(cfg) -> Path:
    return Path(cfg.DATA_DIR).expanduser()


def _mat_variables(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The variables of a MATLAB 5 file by name, as (shape, MATLAB class), read from their headers only."""
    import scipy.io      # here: only these sets need scipy, which is slow to import
    if not path.is_file():
        raise DatasetError(f"SVHN test set {path} does not exist; expected {SVHN_LAYOUT}")
    try:
        return {name: (tuple(shape), kind) for name, shape, kind in scipy.io.whosmat(str(path))}
    except Exception as err:  # noqa: BLE001 - any failure: not the expected file
        raise DatasetError(f"{path} cannot be read as a MATLAB 5 file ({type(err).__name__}: {err}); expected "
                           f"{SVHN_LAYOUT}") from None


def svhn_digits(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """The digits (N,) of SVHN's test file, its 10 read as 0 as torchvision does, and the shape of one image; X's
    shape and y are checked without reading X."""
    import scipy.io
    found = _mat_variables(path)
    if "X" not in found or "y" not in found:
        raise DatasetError(f"{path} holds the variables {sorted(found)}, not X and y; expected {SVHN_LAYOUT}")
    (x_shape, x_class), (y_shape, _) = found["X"], found["y"]
    if len(x_shape) != 4 or x_shape[2] != 3 or x_class != "uint8" or x_shape[3] == 0:
        raise DatasetError(f"{path}: X is {x_class} {x_shape}; expected {SVHN_LAYOUT}")
    n = x_shape[3]
    if y_shape not in ((n, 1), (1, n)):
        raise DatasetError(f"{path}: y has the shape {y_shape}; expected ({n}, 1), a label for each of X's {n} images")
    y = np.asarray(scipy.io.loadmat(str(path), variable_names=["y"])["y"]).reshape(-1)
    digits = y.astype(np.int64)
    if not np.array_equal(digits, y) or digits.min() < 0 or digits.max() > 10:
        raise DatasetError(f"{path}: y must hold the integers 1..10 (10 meaning the digit 0), found values in "
                           f"[{y.min()}, {y.max()}]")
    digits[digits == 10] = 0
    return digits, tuple(x_shape[:3])


@functools.lru_cache(maxsize=1)
def _svhn_pixels(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """SVHN's images as (N, 32, 32, 3) uint8, image n = X[:, :, :, n] as torchvision reads it, loaded once per
    process and version of the file (mtime_ns, size): a .mat cannot be memory-mapped (it may be compressed)."""
    import scipy.io
    return np.ascontiguousarray(np.transpose(scipy.io.loadmat(path, variable_names=["X"])["X"], (3, 0, 1, 2)))


class MatImages(ImageDataset):
    """(PIL image, digit) for SVHN's test file. The images are read at the first image asked for and kept by the
    process (_svhn_pixels); they are not pickled, so a DataLoader worker reads the file once instead of receiving
    26,032 images through a pipe, and a forked one that finds them loaded shares them."""

    def __init__(self, path: Path, labels: np.ndarray, image_shape: tuple[int, ...]):
        self.path, self.labels, self.image_shape = path, labels, tuple(int(v) for v in image_shape)
        self._images = None

    def source_files(self) -> list[Path]:
        return [self.path]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self._images is None:
            stat = os.stat(self.path)
            self._images = _svhn_pixels(str(self.path), stat.st_mtime_ns, stat.st_size)
        return Image.fromarray(self._images[i]), int(self.labels[i])

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def check_files(self) -> None:
        """The file is there and begins as MATLAB files do (its text header)."""
        try:
            with open(self.path, "rb") as handle:
                head = handle.read(6)
        except OSError as err:
            raise DatasetError(f"Cannot read {self.path}: {err.strerror or err}") from None
        if head != b"MATLAB":
            raise DatasetError(f"{self.path} is not a MATLAB file: it begins with {head!r}; expected {SVHN_LAYOUT}")


def read_svhn_test(cfg) -> MatImages:
    path = _data_dir(cfg) / SVHN_FILE
    digits, image_shape = svhn_digits(path)
    return MatImages(path, digits, image_shape)


def read_svhn_c(cfg, domain: str, severity: int) -> NpyImages:
    """Severity ``severity`` of CLIPTTA's SVHN-C file of ``domain``: rows [(s-1)N, sN) with N the images of SVHN's
    test file, whose labels they share (CLIPTTA's SVHNCDataset). A file made by scripts/make_corrupted.py with
    fewer severities (its meta.json) holds one block per listed severity."""
    data = _data_dir(cfg)
    root = data / SVHN_C_FOLDER
    layout = (f"{root}/<corruption>.npy as uint8 (5N, 32, 32, 3), severity s in rows [(s-1)N, sN), N = the images "
              f"of {data / SVHN_FILE}")
    if not root.is_dir():
        raise DatasetError(f"svhn_c: directory {root} does not exist; expected CLIPTTA's SVHN-C: {layout}")
    held = held_severities(root)
    if severity not in held:
        raise DatasetError(f"{root}: its files hold severities {held} only ({root / 'meta.json'}); severity "
                           f"{severity} is not among them")
    digits, _ = svhn_digits(data / SVHN_FILE)
    path = root / f"{domain}.npy"
    images = load_mmap(path, f"svhn_c corruption file (expected {layout})")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{path}: expected a uint8 array (N, H, W, 3), got {images.dtype} {images.shape}")
    n = len(digits)
    if len(images) != len(held) * n:
        raise DatasetError(f"{path} has {len(images)} rows; expected {len(held)} x {n} = {len(held) * n}: "
                           f"{len(held)} severity blocks of the {n} images of {data / SVHN_FILE}")
    start = held.index(severity) * n
    return NpyImages(path, np.arange(start, start + n), digits, data / SVHN_FILE, images.shape[1:])


def _text_lines(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"Tiny-ImageNet: {path} does not exist; expected {layout}")
    return path.read_text().splitlines()


def tiny_imagenet_wnids(root: Path) -> tuple[str, ...]:
    """``root``/wnids.txt (root: DATA_DIR/tiny-imagenet-200), which must list TINY_IMAGENET_WNIDS in their order
    (the class index is the line), and ``root``/words.txt, whose first lemma of each must be its class name in
    TINY_IMAGENET_CLASSES (the names the overlap check used)."""
    layout = f"{root}/wnids.txt and {root}/words.txt as Tiny-ImageNet's download has them"
    wnids_path, words_path = root / "wnids.txt", root / "words.txt"
    wnids = tuple(line.strip() for line in _text_lines(wnids_path, layout) if line.strip())
    if wnids != TINY_IMAGENET_WNIDS:
        k = next((i for i, (got, want) in enumerate(zip(wnids, TINY_IMAGENET_WNIDS)) if got != want),
                 min(len(wnids), len(TINY_IMAGENET_WNIDS)))
        got = wnids[k] if k < len(wnids) else "the end of the file"
        want = TINY_IMAGENET_WNIDS[k] if k < len(TINY_IMAGENET_WNIDS) else "the end of the file"
        raise DatasetError(f"{wnids_path}: wnid {k + 1} is {got}, expected {want}: Tiny-ImageNet's 200 wnids in its "
                           f"download's order (the class index is the line)")
    lemmas = {}
    for line in _text_lines(words_path, layout):
        wnid, _, words = line.partition("\t")
        if wnid in TINY_IMAGENET_WNIDS:
            lemmas[wnid] = words.split(",")[0].strip()
    for wnid, name in zip(wnids, TINY_IMAGENET_CLASSES):
        if wnid not in lemmas:
            raise DatasetError(f"{words_path} has no line for {wnid} of {wnids_path}; expected '<wnid>\\t<lemma>, "
                               f"<lemma>, ...' for each wnid")
        if lemmas[wnid] != name:
            raise DatasetError(f"{words_path}: the first lemma of {wnid} is {lemmas[wnid]!r}, expected {name!r} "
                               f"(the class name the overlap check used)")
    return wnids


def _val_annotations(listing: Path, wnid_index: dict[str, int], layout: str) -> tuple[list[str], list[int]]:
    """(file names, class indices) of val_annotations.txt, in its order (CLIPTTA's TinyImageNetPaths)."""
    names, labels, places = [], [], []
    for number, line in enumerate(_text_lines(listing, layout), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise DatasetError(f"{listing}: line {number} has {len(fields)} fields; expected "
                               f"'<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>'")
        if fields[1] not in wnid_index:
            raise DatasetError(f"{listing}: line {number} names the wnid {fields[1]}, which "
                               f"{listing.parent.parent / 'wnids.txt'} does not list")
        names.append(fields[0])
        labels.append(wnid_index[fields[1]])
        places.append(f"line {number}")
    if not names:
        raise DatasetError(f"{listing} lists no image; expected {layout}")
    refuse_repeated_images("Tiny-ImageNet val", names, labels, places, listing)
    return names, labels


def read_tiny_imagenet_val(cfg) -> ImageFiles:
    """The validation images that val_annotations.txt lists, in its order, labelled by wnids.txt."""
    root = _data_dir(cfg) / TINY_IMAGENET_FOLDER
    layout = (f"{root}/val/val_annotations.txt ('<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>' per line) listing "
              f"{root}/val/images/<file>, and {root}/wnids.txt, {root}/words.txt")
    if not root.is_dir():
        raise DatasetError(f"Tiny-ImageNet: directory {root} does not exist; expected {layout}")
    wnid_index = {wnid: k for k, wnid in enumerate(tiny_imagenet_wnids(root))}
    names, labels = _val_annotations(root / "val" / "val_annotations.txt", wnid_index, layout)
    files = [root / "val" / "images" / name for name in names]
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise DatasetError(f"Tiny-ImageNet val: {len(missing)} of the {len(files)} images that "
                           f"{root / 'val' / 'val_annotations.txt'} lists are missing, e.g. {missing[0]}")
    return ImageFiles(files, labels)


def read_tiny_imagenet_c(cfg, domain: str, severity: int) -> ImageFiles:
    """Every image under Tiny-ImageNet-C/<domain>/<severity>/, which must hold a non-empty folder for each of the
    200 wnids of wnids.txt and nothing else; wnid order, then file names (CLIPTTA lists them as os.listdir does)."""
    data = _data_dir(cfg)
    wnids = tiny_imagenet_wnids(data / TINY_IMAGENET_FOLDER)
    base = data / TINY_IMAGENET_C_FOLDER
    layout = (f"{base}/<corruption>/<severity>/<wnid>/<image>.JPEG (Hendrycks' Tiny-ImageNet-C) with "
              f"{data / TINY_IMAGENET_FOLDER}/wnids.txt")
    files, labels = read_class_folders(base / domain / str(severity), wnids, "Tiny-ImageNet-C", layout)
    return ImageFiles(files, labels)


@register_ood_set
class Svhn(OodSet):
    name = "svhn"
    class_names = SVHN_CLASSES
    layout = f"DATA_DIR/{SVHN_FILE} (torchvision's SVHN test split, 26,032 images)"

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        check_ood_domain(self, domain)
        check_no_severity(self.name, severity)
        return read_svhn_test(cfg)

    def describe(self, cfg) -> dict:
        return {"file": SVHN_FILE}


@register_ood_set
class SvhnC(CorruptedOodSet):
    name = "svhn_c"
    class_names = SVHN_CLASSES
    layout = (f"DATA_DIR/{SVHN_C_FOLDER}/<corruption>.npy (CLIPTTA's SVHN-C), labels and domain none from "
              f"DATA_DIR/{SVHN_FILE}")

    def read_clean(self, cfg) -> ImageDataset:
        return read_svhn_test(cfg)

    def read_corrupted(self, cfg, domain: str, severity: int) -> ImageDataset:
        return read_svhn_c(cfg, domain, severity)

    def describe(self, cfg) -> dict:
        return {"folder": SVHN_C_FOLDER, "labels_file": SVHN_FILE}


@register_ood_set
class TinyImageNet(OodSet):
    name = "tiny_imagenet"
    class_names = TINY_IMAGENET_CLASSES
    layout = f"DATA_DIR/{TINY_IMAGENET_FOLDER}/val (the 10,000 images of val/val_annotations.txt)"

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        check_ood_domain(self, domain)
        check_no_severity(self.name, severity)
        return read_tiny_imagenet_val(cfg)

    def describe(self, cfg) -> dict:
        return {"list_file": f"{TINY_IMAGENET_FOLDER}/val/val_annotations.txt"}


@register_ood_set
class TinyImageNetC(CorruptedOodSet):
    # Hendrycks' Tiny-ImageNet-C release holds the 15 benchmark corruptions (not the 4 extra ones of CIFAR-10-C).
    name = "tiny_imagenet_c"
    class_names = TINY_IMAGENET_CLASSES
    layout = (f"DATA_DIR/{TINY_IMAGENET_C_FOLDER}/<corruption>/<severity>/<wnid>/*.JPEG; domain none: "
              f"DATA_DIR/{TINY_IMAGENET_FOLDER}/val")

    def read_clean(self, cfg) -> ImageDataset:
        return read_tiny_imagenet_val(cfg)

    def read_corrupted(self, cfg, domain: str, severity: int) -> ImageDataset:
        return read_tiny_imagenet_c(cfg, domain, severity)

    def describe(self, cfg) -> dict:
        return {"folder": TINY_IMAGENET_C_FOLDER, "class_list": f"{TINY_IMAGENET_FOLDER}/wnids.txt"}
