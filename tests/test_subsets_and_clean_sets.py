"""CORRUPTION.NUM_EX selects the images the authors' loaders select (CORRUPTION.SUBSET authors, the default), or
RobustBench's first n (first_n); the clean test sets are the domain "none"; the ImageNet variants read
CORRUPTION.TYPE [""] as the whole set. Each data set here encodes every image's index in its pixels, and the
expected selection is computed by the authors' rule written out in plain Python (their get_test_loader:
random.seed(RNG_SEED); random.shuffle(samples); random.sample(samples, NUM_EX))."""
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from conf import ConfigError
from datasets import DatasetError, get_dataset
from harness.build import load_cfg
from harness.run import evaluate
from tests.synthetic import TINY_OPTS


def authors_sample(samples: list, seed: int, n: int) -> list:
    """Their get_test_loader, step by step, with the module-level generator as they use it."""
    samples = list(samples)
    random.seed(seed)
    random.shuffle(samples)
    return random.sample(samples, k=min(n, len(samples)))


def encoded(index: int, size: int = 32) -> np.ndarray:
    """An image whose first two pixels hold its index."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[0, 0] = (index % 256, index // 256, 7)
    return image


def decoded(image) -> int:
    pixel = np.asarray(image)[0, 0]
    return int(pixel[0]) + 256 * int(pixel[1])


def cfg(*opts):
    return load_cfg(None, [*TINY_OPTS, *opts])


def write_indexed_cifar_c(root, per_severity=40):
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    np.save(folder / "fog.npy", np.stack([encoded(i) for i in range(5 * per_severity)]))
    np.save(folder / "labels.npy", (np.arange(5 * per_severity) % 10).astype(np.uint8))


@pytest.mark.parametrize("seed, n, severity", [(1, 7, 5), (3, 40, 2), (0, 1, 1)])
def test_cifar_c_subset_is_the_authors_sample(tmp_path, seed, n, severity):
    write_indexed_cifar_c(tmp_path)
    c = cfg("DATA_DIR", str(tmp_path), "RNG_SEED", str(seed), "CORRUPTION.NUM_EX", str(n),
            "CORRUPTION.TYPE", "[fog]", "CORRUPTION.SEVERITY", f"[{severity}]")
    part = get_dataset("cifar10_c").build_domain(c, "fog", severity)
    rows = list(range((severity - 1) * 40, severity * 40))               # their sample list: the block, file order
    assert [decoded(part[i][0]) for i in range(len(part))] == authors_sample(rows, seed, n)
    first = get_dataset("cifar10_c").build_domain(
        cfg("DATA_DIR", str(tmp_path), "CORRUPTION.NUM_EX", str(n), "CORRUPTION.SUBSET", "first_n"), "fog", severity)
    assert [decoded(first[i][0]) for i in range(len(first))] == rows[:n]


def test_folder_subset_follows_imagefolder_order_imagenet_v2(tmp_path):
    """ImageNet-V2's folders are class indices; torchvision's ImageFolder (their loader) lists them as strings
    ("0", "1", "10", "100", ...), so the authors' sample is drawn from that order, not from class order."""
    root = tmp_path / "imagenet-v2" / "imagenetv2-matched-frequency-format-val"
    for k in range(1000):
        (root / str(k)).mkdir(parents=True)
        for j in range(2 if k < 3 else 1):
            Image.fromarray(encoded(2 * k + j, 8)).save(root / str(k) / f"img{j}.png")
    c = cfg("DATA_DIR", str(tmp_path), "CORRUPTION.DATASET", "imagenet_v2", "CORRUPTION.TYPE", '[""]',
            "CORRUPTION.NUM_EX", "25", "RNG_SEED", "4")
    part = get_dataset("imagenet_v2").build_domain(c, "ImageNet-V2", 0)
    listing = [(str(k), f"img{j}.png", 2 * k + j) for k in range(1000) for j in range(2 if k < 3 else 1)]
    imagefolder = sorted(listing)                                       # class names as strings, then files
    expected = authors_sample(imagefolder, 4, 25)
    assert [decoded(part[i][0]) for i in range(len(part))] == [index for _, _, index in expected]
    assert [part[i][1] for i in range(len(part))] == [int(folder) for folder, _, _ in expected]


def test_imagenet_c_subset_needs_their_list_and_draws_from_its_order(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    entries = []
    for w in wnids:
        for j in range(4):
            entries.append(f"{w}/ILSVRC2012_val_{len(entries):08d}.JPEG")
    for e in entries:
        path = tmp_path / "ImageNet-C" / "fog" / "5" / e
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(encoded(entries.index(e), 16)).save(path, format="PNG")   # lossless, whatever the suffix
    listing = tmp_path / "their_50k_list.txt"
    order = entries[5:] + entries[:5]                                   # a file order of its own
    listing.write_text("\n".join(order) + "\n")
    base = ("DATA_DIR", str(tmp_path), "CORRUPTION.DATASET", "imagenet_c", "CORRUPTION.NUM_EX", "5")
    part = get_dataset("imagenet_c").build_domain(cfg(*base, "CORRUPTION.IMAGENET_C_LIST", str(listing)), "fog", 5)
    assert [decoded(part[i][0]) for i in range(5)] == [entries.index(e) for e in authors_sample(order, 1, 5)]
    with pytest.raises(DatasetError, match="its own 50,000-image list .* give that file as CORRUPTION.IMAGENET_C_LIST"):
        get_dataset("imagenet_c").build_domain(cfg(*base), "fog", 5)


def test_clean_cifar_test_sets_are_the_none_domain(tmp_path):
    images = np.stack([encoded(i) for i in range(30)])
    for folder, name, key, classes in (("cifar-10-batches-py", "test_batch", b"labels", 10),
                                       ("cifar-100-python", "test", b"fine_labels", 100)):
        (tmp_path / folder).mkdir()
        labels = [(7 * i) % classes for i in range(30)]
        with open(tmp_path / folder / name, "wb") as f:
            pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(30, -1), key: labels}, f)
        dataset = "cifar10_c" if classes == 10 else "cifar100_c"
        part = get_dataset(dataset).build_domain(cfg("DATA_DIR", str(tmp_path), "CORRUPTION.DATASET", dataset),
                                                 "none", 5)
        assert [decoded(part[i][0]) for i in range(30)] == list(range(30))          # the file's order, all of it
        assert [part[i][1] for i in range(30)] == labels
        with pytest.raises(DatasetError, match="ignores CORRUPTION.NUM_EX for the clean CIFAR test set"):
            get_dataset(dataset).build_domain(cfg("DATA_DIR", str(tmp_path), "CORRUPTION.DATASET", dataset,
                                                  "CORRUPTION.NUM_EX", "5"), "none", 5)
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py/test_batch does not exist; expected torchvision"):
        get_dataset("cifar10_c").build_domain(cfg("DATA_DIR", str(tmp_path / "elsewhere")), "none", 5)


def test_clean_beside_corrupted_runs_and_tabulates_as_clean(tmp_path):
    from harness.report import tables_from_results, to_markdown
    write_indexed_cifar_c(tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.stack([encoded(i) for i in range(12)]).transpose(0, 3, 1, 2).reshape(12, -1),
                     b"labels": [i % 10 for i in range(12)]}, f)
    c = load_cfg("conf/cifar10_c/source.yaml", [*TINY_OPTS, "DATA_DIR", str(tmp_path), "SAVE_DIR", str(tmp_path / "o"),
                                                "CORRUPTION.TYPE", "[none, fog]", "TEST.BATCH_SIZE", "4"])
    payload = evaluate(c, progress=False)
    assert [(r["domain"], r["n"]) for r in payload["records"]] == [("none", 12), ("fog", 40)]
    table = to_markdown(tables_from_results([payload], with_paper=False)[0])
    assert "| method | clean | fog | mean |" in table


def test_clean_imagenet_validation_in_class_folders(tmp_path):
    entries = ["n01440764/ILSVRC2012_val_00000001.JPEG", "n01443537/ILSVRC2012_val_00000002.JPEG"]
    for i, e in enumerate(entries):
        path = tmp_path / "imagenet2012" / "val" / e                     # the anchor suite's folder is accepted
        path.parent.mkdir(parents=True)
        Image.fromarray(encoded(i, 16)).save(path, format="PNG")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(entries) + "\n")
    part = get_dataset("imagenet_c").build_domain(cfg("DATA_DIR", str(tmp_path), "CORRUPTION.DATASET", "imagenet_c",
                                                      "CORRUPTION.IMAGENET_C_LIST", str(listing)), "none", 5)
    assert [decoded(part[i][0]) for i in range(2)] == [0, 1] and part.labels == [0, 1]
    with pytest.raises(DatasetError, match=r"ImageNet validation set .*imagenet/val does not exist"):
        get_dataset("imagenet_c").build_domain(cfg("DATA_DIR", str(tmp_path / "x"), "CORRUPTION.DATASET",
                                                   "imagenet_c"), "none", 5)


def test_imagenet_variants_whole_set_spellings():
    for types in ('[""]', None):
        opts = ["CORRUPTION.DATASET", "imagenet_k"] + (["CORRUPTION.TYPE", types] if types else [])
        c = cfg(*opts, "CORRUPTION.SEVERITY", '[""]')
        assert c.CORRUPTION.DATASET == "imagenet_sketch" and list(c.CORRUPTION.TYPE) == ["ImageNet-Sketch"]
    with pytest.raises(ConfigError, match=r"CORRUPTION.SEVERITY = \[''\]: cifar10_c needs a list of severities"):
        cfg("CORRUPTION.SEVERITY", '[""]')
