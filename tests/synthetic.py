"""Small synthetic data sets written in exactly the real on-disk layouts, and config helpers."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from harness.build import load_cfg


# A YAML exactly as written for the authors' BATCLIP suite (their cfgs/cifar10_c/ours.yaml format and keys).
AUTHORS_OURS_YAML = """
CORRUPTION:
  DATASET: cifar10_c
  SEVERITY:
    - 5
  TYPE:
    - gaussian_noise
    - shot_noise
MODEL:
  ADAPTATION: ours
  ARCH: ViT-B-16
  WEIGHTS: openai
  USE_CLIP: True
  EPISODIC: False
OPTIM:
  LR: 1e-3
  METHOD: AdamW  #1e-3, AdamW for vit-b16, 32
  STEPS: 1
  BETA: 0.9
  WD: 0.01
TEST:
  BATCH_SIZE: 200
CLIP:
  PRECISION: "fp32"
  FREEZE_TEXT_ENCODER: False
  PROMPT_MODE: "custom"
  PROMPT_TEMPLATE: ["a photo of a {}."]
"""


def write_cifar_c(root: Path, corruptions, per_severity: int = 20, num_classes: int = 10,
                  folder: str = "CIFAR-10-C", seed: int = 0, size: int = 32) -> Path:
    """DATA_DIR/<folder>/<corruption>.npy (5 severity blocks) + labels.npy, like RobustBench's files."""
    rng = np.random.default_rng(seed)
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, num_classes, per_severity).astype(np.uint8)
    np.save(out / "labels.npy", np.tile(labels, 5))
    for c in corruptions:
        np.save(out / f"{c}.npy", rng.integers(0, 256, (5 * per_severity, size, size, 3), dtype=np.uint8))
    return out


class LabelledPart:
    """A segment's stand-in for the stream order (harness.stream.task_stream_order reads its length and labels)."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)


def without_cost(records: list[dict]) -> list[dict]:
    """Records without their "cost" (harness/cost.py: wall times and peak memory, the only fields that differ between
    two runs of one config), to compare the records of two runs."""
    return [{k: v for k, v in r.items() if k != "cost"} for r in records]


def reproducible_run_on_cifar10c(tmp_path: Path, make_cfg, domains, per_severity: int, **overrides) -> dict:
    """A config run twice through the harness on a synthetic CIFAR-10-C of ``domains`` (``per_severity`` images
    each): checks that both runs read every image and record the same results (same seed), returns the first
    payload. ``make_cfg(**overrides)`` builds the test's config."""
    from harness.run import evaluate
    write_cifar_c(tmp_path, list(domains), per_severity=per_severity)
    payloads = [evaluate(make_cfg(DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / f"out{run}"),
                                  CORRUPTION__TYPE=list(domains), **overrides), progress=False) for run in range(2)]
    assert [(r["domain"], r["n"]) for r in payloads[0]["records"]] == [(d, per_severity) for d in domains]
    assert without_cost(payloads[0]["records"]) == without_cost(payloads[1]["records"])   # reproducible under the seed
    return payloads[0]


def write_imagenet_c(root: Path, corruptions, severities=(5,), wnids=None, per_class: int = 2,
                     size: int = 40, seed: int = 0) -> list[str]:
    """DATA_DIR/ImageNet-C/<corruption>/<severity>/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG; returns the
    'wnid/file' entries (the same files exist for every corruption and severity)."""
    from datasets.imagenet_c import imagenet_wnids
    rng = np.random.default_rng(seed)
    wnids = list(wnids or imagenet_wnids()[:4])
    entries = [f"{w}/ILSVRC2012_val_{1000 * k + j:08d}.JPEG" for k, w in enumerate(wnids) for j in range(per_class)]
    for c in corruptions:
        for s in severities:
            for e in entries:
                path = Path(root) / "ImageNet-C" / c / str(s) / e
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")
    return entries


def write_image_folders(root: Path, class_folders, per_class=2, seed=0, size=None) -> list[Path]:
    """root/<class>/<image>.png with small random RGB images (size x size, or varying sizes when None); classes
    written in reverse order so that nothing can rely on creation order. Returns the files written."""
    rng = np.random.default_rng(seed)
    files = []
    for name in reversed(list(class_folders)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            h, w = (size, size) if size else rng.integers(5, 20, size=2)
            path = root / name / f"img_{k:03d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return files


# CoOp's folder names where its split renames the class (Caltech101's NEW_CNAMES; EuroSAT's, whose folders are
# the original class names), for writing image paths as the real split files list them.
COOP_CLASS_FOLDERS = {
    "caltech101": {"face": "Faces", "leopard": "Leopards", "motorbike": "Motorbikes", "airplane": "airplanes"},
    "eurosat": {"Annual Crop Land": "AnnualCrop", "Forest": "Forest",
                "Herbaceous Vegetation Land": "HerbaceousVegetation", "Highway or Road": "Highway",
                "Industrial Buildings": "Industrial", "Pasture Land": "Pasture",
                "Permanent Crop Land": "PermanentCrop", "Residential Buildings": "Residential", "River": "River",
                "Sea or Lake": "SeaLake"},
}


def coop_relative_path(dataset: str, class_name: str, k: int) -> str:
    """Image k of a class as CoOp's split files list it (relative to the set's image folder; StanfordCars' to the
    set's folder; FGVCAircraft's images/<id>.jpg is given by its id), e.g. caltech101 "Faces/image_0003.jpg",
    sun397 "a/apartment_building/outdoor/sun_k0003.jpg"."""
    folder = COOP_CLASS_FOLDERS.get(dataset, {}).get(class_name, class_name)
    if dataset in ("caltech101",):
        return f"{folder}/image_{k:04d}.jpg"
    if dataset in ("dtd", "eurosat"):
        return f"{folder}/{folder}_{k:04d}.jpg"
    if dataset == "food101":
        return f"{folder}/{1000 * k + 7}.jpg"
    if dataset == "oxford_pets":
        return f"{folder}_{k}.jpg"
    if dataset == "ucf101":
        return f"{folder}/v_{folder.replace('_', '')}_g{k + 1:02d}_c01.jpg"
    if dataset == "sun397":     # CoOp's name is the path's parts after the letter, reversed
        parts = class_name.split(" ")[::-1]
        return f"{parts[0][0]}/{'/'.join(parts)}/sun_k{k:04d}.jpg"
    raise ValueError(f"{dataset}: its paths do not follow the class (numbered files)")


def write_coop_set(root: Path, dataset: str, per_class: int = 1, labels=None, seed: int = 0, size: int = 16) -> Path:
    """DATA_DIR/<folder>/ of one CoOp-layout set (datasets/coop_sets.py) with ``per_class`` small JPEGs for each
    class in ``labels`` (default all): the images at the paths its real split lists, and split_zhou_<Name>.json
    ({"train", "val", "test"} lists of [path, label, CoOp class name]; the test list in a seeded, not sorted, order),
    or for fgvc_aircraft variants.txt and images_variant_test.txt. Returns the set's folder."""
    import json

    import datasets
    ds = datasets.get_dataset(dataset)
    rng = np.random.default_rng(seed)
    base = Path(root) / ds.folder
    labels = list(range(len(ds.coop_names))) if labels is None else list(labels)
    items = [(label, k) for label in labels for k in range(per_class)]
    items = [items[i] for i in rng.permutation(len(items))]
    entries = []
    for n, (label, k) in enumerate(items):
        name = ds.coop_names[label]
        if dataset == "fgvc_aircraft":
            relative = f"{1000000 + 37 * n:07d}"
            path = base / "images" / f"{relative}.jpg"
        elif dataset == "flowers102":
            relative = f"image_{n + 1:05d}.jpg"
            path = base / ds.image_folder / relative
        elif dataset == "stanford_cars":
            relative = f"cars_test/{n + 1:05d}.jpg"
            path = base / relative
        else:
            relative = coop_relative_path(dataset, name, k)
            path = base / ds.image_folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")
        entries.append([relative, label, name])
    if dataset == "fgvc_aircraft":
        (base / "variants.txt").write_text("".join(f"{name}\n" for name in ds.coop_names))
        (base / "images_variant_test.txt").write_text("".join(f"{r} {name}\n" for r, _, name in entries))
    else:
        split = {"train": entries[:1], "val": entries[1:2], "test": entries}
        (base / ds.list_file).write_text(json.dumps(split, indent=4))
    return base


# The tiny CLIP with random weights, on the CPU, without DataLoader workers.
TINY_OPTS = ["MODEL.ARCH", "tiny-clip-test", "MODEL.WEIGHTS", "none", "TEST.NUM_WORKERS", "0", "DEVICE", "cpu"]
# The tiny stand-in of each image-tower family: a config written for a ResNet CLIP (RN50: BatchNorm, which the
# BatchNorm methods need) runs on the tiny ResNet, every other on the tiny ViT.
TINY_ARCH_BY_TOWER = {"resnet": "tiny-clip-test-rn"}


@functools.lru_cache(maxsize=None)
def tiny_arch(arch: str) -> str:
    """The tiny CLIP that stands in for ``arch`` in the tests: the one with the same image-tower family."""
    from models import model_spec
    return TINY_ARCH_BY_TOWER.get(model_spec(arch).image_tower, TINY_OPTS[1])


def tiny_opts(cfg_file=None) -> list[str]:
    """TINY_OPTS with the tiny CLIP of the config file's tower family (tiny_arch)."""
    opts = list(TINY_OPTS)
    if cfg_file is not None:
        path = Path(cfg_file)
        if path.is_file():
            stat = path.stat()
            opts[1] = _tiny_arch_of_file(str(path), stat.st_mtime_ns, stat.st_size)
        else:      # a name load_cfg resolves otherwise (a plug-in's config in a copied checkout)
            opts[1] = tiny_arch(load_cfg(cfg_file).MODEL.ARCH)
    return opts


@functools.lru_cache(maxsize=None)
def _tiny_arch_of_file(path: str, mtime_ns: int, size: int) -> str:
    """tiny_arch of a config file's MODEL.ARCH, once per version of the file (a composed file's parts are the
    shipped method and data-set configs, which the tests do not edit)."""
    return tiny_arch(load_cfg(path).MODEL.ARCH)


def tiny_cfg(cfg_file=None, **overrides):
    """A config for the tiny CLIP of the file's tower family (tiny_opts); overrides as KEY=value with dots written as
    '__' (e.g. CORRUPTION__NUM_EX=8)."""
    opts = tiny_opts(cfg_file if "MODEL__ARCH" not in overrides else None)
    for key, value in overrides.items():
        opts += [key.replace("__", "."), value if isinstance(value, str) else repr(value)]
    return load_cfg(cfg_file, opts)


# Every data-set layout the suite reads, small enough for one test run of every shipped config: the data set
# name -> the domains written for it (each with GOLDEN_IMAGES_PER_DOMAIN images or more).
ALL_LAYOUT_DOMAINS = {
    "cifar10_c": ["gaussian_noise", "fog"],
    "cifar100_c": ["gaussian_noise", "fog"],
    "shapes_c": ["gaussian_noise", "fog"],
    "imagenet_c": ["gaussian_noise", "fog"],
    "office_home": ["Art", "Clipart"],
    "pacs": ["art_painting", "cartoon"],
    "vlcs": ["Caltech101", "LabelMe"],
    "terra_incognita": ["location_38", "location_43"],
    "imagenet_a": ["ImageNet-A"],
    "imagenet_r": ["ImageNet-R"],
    "imagenet_v2": ["ImageNet-V2"],
    "imagenet_sketch": ["ImageNet-Sketch"],
    "caltech101": ["Caltech101"],
    "dtd": ["DTD"],
    "eurosat": ["EuroSAT"],
    "fgvc_aircraft": ["FGVCAircraft"],
    "food101": ["Food101"],
    "flowers102": ["Flowers102"],
    "oxford_pets": ["OxfordPets"],
    "stanford_cars": ["StanfordCars"],
    "sun397": ["SUN397"],
    "ucf101": ["UCF101"],
}

# The CoOp-layout sets (datasets/coop_sets.py).
COOP_SETS = ["caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "flowers102", "oxford_pets", "stanford_cars",
             "sun397", "ucf101"]


def write_all_layouts(root: Path) -> Path:
    """One DATA_DIR holding a small synthetic copy of every data set in its real on-disk layout (the domains of
    ALL_LAYOUT_DOMAINS; severity 5 for the corruption sets). Deterministic: the same files on every call."""
    import datasets
    root = Path(root)
    for seed, (name, folder, classes) in enumerate([("cifar10_c", "CIFAR-10-C", 10), ("cifar100_c", "CIFAR-100-C", 100),
                                                    ("shapes_c", "Shapes-C", 10)]):
        write_cifar_c(root, ALL_LAYOUT_DOMAINS[name], per_severity=8, num_classes=classes, folder=folder, seed=seed)
    entries = write_imagenet_c(root, ALL_LAYOUT_DOMAINS["imagenet_c"], severities=(5,), per_class=2, size=40, seed=3)
    (root / IMAGENET_C_SMALL_LIST).write_text("\n".join(sorted(entries)) + "\n")
    folders = {"office_home": "office_home", "pacs": "PACS", "vlcs": "VLCS", "terra_incognita": "terra_incognita"}
    for seed, (name, folder) in enumerate(folders.items(), start=4):
        ds = datasets.get_dataset(name)
        for k, domain in enumerate(ALL_LAYOUT_DOMAINS[name]):
            write_image_folders(root / folder / domain, ds.class_folders, per_class=2, seed=10 * seed + k, size=16)
    for seed, name in enumerate(["imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch"], start=8):
        ds = datasets.get_dataset(name)
        write_image_folders(root / ds.folder, ds.class_folders(), per_class=1, seed=seed, size=16)
    for seed, name in enumerate(COOP_SETS, start=12):     # 12 images of 6 classes spread over the labels
        classes = len(datasets.get_dataset(name).coop_names)
        write_coop_set(root, name, per_class=2, labels=[k * (classes - 1) // 5 for k in range(6)], seed=seed)
    return root


# ImageNet-C's image list in write_all_layouts' copy (4 classes; "all" needs the 1000).
IMAGENET_C_SMALL_LIST = "imagenet_c_small_list.txt"


def small_run_overrides(dataset: str, config: str, data_dir: Path | None = None) -> dict:
    """What a shipped config needs besides the tiny model and the ALL_LAYOUT_DOMAINS data (in ``data_dir``) to
    run in a test: the domains written, 8 images per domain in batches of 4, ImageNet-C's images as listed, DPE's
    textual prototypes from the templates alone (no CuPL file), and cuts for the tiny model (SAR's 3 excluded blocks
    and TTL's blocks 9-11 exceed its 2; RLCF's ViT-L/14 reward model is a second tiny CLIP; WATT-P's 50 repeats and
    the 80 x 1000 ensemble prompts of ImageNet-C VTE, ImageNet-Sketch TDA, DPE and BoostAdapter, and ImageNet, -V2 and
    -Sketch TPS
    would cost a minute each)."""
    # The first 8 images (whatever the folders hold) in the suite's own stream order: what the golden runs recorded
    # (the authors' order needs their seeded subset; tests/test_stream_order.py checks it).
    overrides = {"CORRUPTION__TYPE": ALL_LAYOUT_DOMAINS[dataset], "CORRUPTION__NUM_EX": 8, "TEST__BATCH_SIZE": 4,
                 "CORRUPTION__SUBSET": "first_n", "TEST__STREAM_ORDER": "suite"}
    if data_dir is not None:
        overrides["CORRUPTION__IMAGENET_C_LIST"] = str(Path(data_dir) / IMAGENET_C_SMALL_LIST)
    if config == "sar":
        overrides["SAR__EXCLUDED_DEEPEST_BLOCKS"] = 1
    if config == "ttl":          # the reference's blocks 9-11 exceed the tiny tower's 2
        overrides["TTL__LAYERS"] = [0, 1]
    if config == "tca":          # the reference's condensing blocks 3, 6, 9 exceed the tiny tower's 2
        overrides["TCA__LAYERS"] = [0, 1]
    if config == "watt_p":
        overrides["WATT__REPEATS"] = 2
    if config == "dpe":          # the reference's CuPL files are not shipped: the templates alone
        overrides["DPE__TEXT_PROTOTYPES"] = "templates"
    if (dataset, config) in (("imagenet_c", "vte"), ("imagenet_sketch", "tda"), ("imagenet_sketch", "dpe"),
                             ("imagenet_sketch", "boostadapter"),
                             ("imagenet_c", "tps"), ("imagenet_v2", "tps"), ("imagenet_sketch", "tps")):
        overrides["CLIP__PROMPT_MODE"] = "custom"
    if config == "rlcf":         # the authors' ViT-L/14 reward model is not here: a second tiny CLIP
        overrides["RLCF__REWARD_ARCH"], overrides["RLCF__REWARD_WEIGHTS"] = "tiny-clip-test", "none"
    return overrides


def tiny_auxiliary_models(cfg, model, seed: int = 1) -> dict:
    """The further CLIPs ``cfg``'s method declares (TTAMethod.auxiliary_models), built as a run builds them, for
    ``model``'s classes and templates; random weights drawn from ``seed`` (not the adapted model's)."""
    import torch

    import methods
    from models.build import build_auxiliary_clip, resolve_auxiliary_weights
    built = {}
    for keyword, keys in methods.METHODS.get(cfg.MODEL.ADAPTATION).auxiliary_models.items():
        torch.manual_seed(seed)
        built[keyword] = build_auxiliary_clip(cfg, resolve_auxiliary_weights(cfg, *keys), model.class_names,
                                              model.templates, "cpu")[0]
    return built


class Transformed:
    """A domain's (PIL image, label) items with ``transform`` applied to the image, as the harness's stream does."""

    def __init__(self, part, transform):
        self.part, self.transform = part, transform

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int):
        image, label = self.part[i]
        return self.transform(image), label


def varied_stream(n: int, seed: int = 0):
    """``n`` 32-px images: noise, flat colours, blocky patterns and dark noise in turn. The tiny CLIP predicts
    several classes on these, with normalised entropies on both sides of TDA's negative-cache bounds, so the
    online methods' caches and memories fill, replace and reject."""
    import torch
    g = torch.Generator().manual_seed(seed)
    images = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            x = torch.rand(3, 32, 32, generator=g)
        elif kind == 1:
            x = torch.rand(3, 1, 1, generator=g).expand(3, 32, 32).clone()
        elif kind == 2:
            x = (torch.rand(3, 4, 4, generator=g) > 0.5).float().repeat_interleave(8, 1).repeat_interleave(8, 2)
        else:
            x = torch.rand(3, 32, 32, generator=g) ** 4
        images.append(x)
    return torch.stack(images)


def run_in_batches(method, images, batch_size):
    """The method over ``images`` in batches of ``batch_size``, its outputs concatenated."""
    import torch
    return torch.cat([method(batch) for batch in images.split(batch_size)])


# ------------------------------------------------------------------ source training sets (TTAMethod.source_data)

def write_cifar_train(root: Path, name: str = "cifar10", per_file: int = 6, seed: int = 0) -> list[Path]:
    """DATA_DIR/cifar-10-batches-py/data_batch_1..5 (or cifar-100-python/train) in torchvision's pickled format,
    ``per_file`` random 32x32 images each; returns the files written."""
    import pickle

    from datasets.source_sets import CIFAR_TRAIN
    folder, files, key = CIFAR_TRAIN[name]
    classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        content = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                   key: [int(v) for v in rng.integers(0, classes, per_file)]}
        (root / folder / file).write_bytes(pickle.dumps(content))
        written.append(root / folder / file)
    return written


def write_source_sets(root: Path) -> Path:
    """The source training sets of the corruption benchmarks in their layouts (datasets/source_sets.py), small:
    CIFAR-10 (5 x 6 images), CIFAR-100 (12) and ImageNet (4 classes x 2 images) train; files already there are
    kept (deterministic contents, so that a data directory shared by tests is written once)."""
    from datasets.imagenet_c import imagenet_wnids
    root = Path(root)
    if not (root / "cifar-10-batches-py" / "data_batch_5").is_file():
        write_cifar_train(root, "cifar10", per_file=6, seed=20)
    if not (root / "cifar-100-python" / "train").is_file():
        write_cifar_train(root, "cifar100", per_file=12, seed=21)
    if not (root / "imagenet" / "train").is_dir():
        write_image_folders(root / "imagenet" / "train", imagenet_wnids()[:4], per_class=2, seed=22, size=40)
    return root


def tiny_source_data(cfg, model, seed: int = 2, batches: int = 2, batch_size: int = 4) -> dict:
    """What a run hands a method that reads source data (TTAMethod.source_data) with ``cfg``: {"source_loader":
    batches of random [0, 1] images (batch_size, 3, S, S) at the model's input size S with labels}; {} for any other
    method or config."""
    import torch

    import methods
    from harness.build import needs_source_data
    if not needs_source_data(cfg, methods.METHODS.get(cfg.MODEL.ADAPTATION)):
        return {}
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    return {"source_loader": [(torch.rand(batch_size, 3, size, size, generator=g),
                               torch.zeros(batch_size, dtype=torch.long)) for _ in range(batches)]}
