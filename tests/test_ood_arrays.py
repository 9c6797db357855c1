"""The OOD sets read from arrays and list files (datasets/ood_arrays.py) and a benchmark read as an OOD set: each
read from tiny files in its real layout (tests/ood_layouts.py) gives the images and labels that CLIPTTA's readers
(transcribed below, on torchvision's own SVHN reader) give, and every malformed input is one DatasetError line
naming the path and what was expected."""
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from datasets.base import DatasetError
from datasets.class_names import CIFAR10_CLASSES, CIFAR100_CLASSES
from datasets.corruptions import CORRUPTIONS
from datasets.ood_arrays import TINY_IMAGENET_CLASSES, TINY_IMAGENET_WNIDS, _svhn_pixels
from datasets.ood_sets import get_ood_set, overlapping_classes
from harness.build import load_cfg
from tests.ood_layouts import (write_svhn, write_svhn_c, write_tiny_imagenet, write_tiny_imagenet_c,
                               write_tiny_imagenet_lists)
from tests.synthetic import write_cifar_c

N = 7   # SVHN test images written: fewer than 10 leaves digits out, which nothing may rely on


def _cfg(root, *opts):
    return load_cfg(None, ["DATA_DIR", str(root), *opts])


def _read(ood_name, root, domain="none", severity=0):
    return get_ood_set(ood_name).build(_cfg(root), domain, severity)


def _refused(match, ood_name, root, domain="none", severity=0):
    with pytest.raises(DatasetError, match=match) as info:
        _read(ood_name, root, domain, severity).check_files()
    assert "\n" not in str(info.value)
    return str(info.value)


def _pixels(dataset):
    return [np.asarray(dataset[k][0]) for k in range(len(dataset))]


# --- references: torchvision's SVHN as CLIPTTA reads it (ttavlm/datasets/svhn.py, svhnc.py) ---

def _torchvision_svhn(root):
    """torchvision.datasets.SVHN(root/SVHN, split='test') itself, its md5 check of the real file skipped."""
    from torchvision.datasets import SVHN

    class Unchecked(SVHN):
        def _check_integrity(self):
            return True
    return Unchecked(str(root / "SVHN"), split="test")


def _cliptta_svhn_item(svhn, index):
    """SVHNDataset.__getitem__: the (3, 32, 32) row of torchvision's data, transposed to (32, 32, 3)."""
    img, target = svhn.data[index], int(svhn.labels[index])
    return np.asarray(Image.fromarray(np.transpose(img, (1, 2, 0)))), target


def _cliptta_svhn_c(root, corruption, severity, block_start=None):
    """SVHNCDataset: np.load of SVHN-C/<corruption>.npy sliced [(severity - 1) N, severity N), N = len(labels),
    with torchvision's labels. ``block_start`` replaces the slice's start (to show a changed line is caught)."""
    svhn = _torchvision_svhn(root)
    corrupted = np.load(root / "SVHN-C" / f"{corruption}.npy")
    start = (severity - 1) * len(svhn.labels) if block_start is None else block_start
    data = corrupted[start: start + len(svhn.labels)]
    return [(np.asarray(Image.fromarray(img)), int(svhn.labels[k])) for k, img in enumerate(data)]


def test_svhn_reads_what_torchvision_reads(tmp_path):
    images, digits = write_svhn(tmp_path, n=N)
    dataset = _read("svhn", tmp_path)
    dataset.check_files()
    assert len(dataset) == N and dataset.image_shape == (32, 32, 3)
    svhn = _torchvision_svhn(tmp_path)
    for k in range(N):
        image, label = dataset[k]
        assert image.mode == "RGB" and label == digits[k]
        expected_pixels, expected_label = _cliptta_svhn_item(svhn, k)
        assert np.array_equal(np.asarray(image), expected_pixels) and label == expected_label
        assert np.array_equal(np.asarray(image), images[k])          # what was written
    assert dataset.source_files() == [tmp_path / "SVHN" / "test_32x32.mat"]


def test_svhn_images_are_read_once_per_process_and_not_pickled(tmp_path):
    images, _ = write_svhn(tmp_path, n=N)
    dataset = _read("svhn", tmp_path)
    _svhn_pixels.cache_clear()
    dataset[0], dataset[1], _read("svhn", tmp_path)[2]
    assert _svhn_pixels.cache_info().misses == 1                    # two data sets, one read of the file
    shipped = pickle.dumps(dataset)
    assert len(shipped) < images.nbytes / 4                          # the images stay out of the pickle
    assert np.array_equal(np.asarray(pickle.loads(shipped)[3][0]), images[3])


def test_svhn_c_severity_blocks_are_cliptta_slices(tmp_path):
    _, digits = write_svhn(tmp_path, n=N)
    written = write_svhn_c(tmp_path, ["fog", "snow"], n=N)
    for corruption in ("fog", "snow"):
        for severity in range(1, 6):
            dataset = _read("svhn_c", tmp_path, corruption, severity)
            assert len(dataset) == N
            reference = _cliptta_svhn_c(tmp_path, corruption, severity)
            for k in range(N):
                image, label = dataset[k]
                assert np.array_equal(np.asarray(image), reference[k][0]) and label == reference[k][1] == digits[k]
                assert np.array_equal(np.asarray(image), written[corruption][(severity - 1) * N + k])
    clean = _read("svhn_c", tmp_path, "none", 3)
    assert np.array_equal(np.stack(_pixels(clean)), np.stack(_pixels(_read("svhn", tmp_path))))


@pytest.mark.parametrize("severities", [(1, 2, 3, 4, 5), (5,)])
def test_svhn_c_made_by_make_corrupted_is_read(tmp_path, severities):
    """docs/ood_sets.md's recipe: SVHN's test images through datasets.corruptions.write_corrupted (what
    scripts/make_corrupted.py --name SVHN runs) give DATA_DIR/SVHN-C, read with SVHN's labels."""
    pytest.importorskip("imagecorruptions")
    from datasets.corruptions import write_corrupted
    images, digits = write_svhn(tmp_path, n=N)
    write_corrupted(images, digits, tmp_path / "SVHN-C", corruptions=["brightness"], progress=False,
                    severities=severities)
    written = np.load(tmp_path / "SVHN-C" / "brightness.npy")
    for block, severity in enumerate(severities):
        dataset = _read("svhn_c", tmp_path, "brightness", severity)
        assert np.array_equal(np.stack(_pixels(dataset)), written[block * N: (block + 1) * N])
        assert [label for _, label in (dataset[k] for k in range(N))] == list(digits)


@pytest.mark.parametrize("changed", ["block start off by one", "h and w swapped"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tmp_path, changed):
    write_svhn(tmp_path, n=N)
    write_svhn_c(tmp_path, ["fog"], n=N)
    if changed == "block start off by one":
        ours = _pixels(_read("svhn_c", tmp_path, "fog", 2))
        theirs = [pixels for pixels, _ in _cliptta_svhn_c(tmp_path, "fog", 2, block_start=N + 1)]
    else:
        ours = _pixels(_read("svhn", tmp_path))
        svhn = _torchvision_svhn(tmp_path)
        theirs = [np.transpose(svhn.data[k], (2, 1, 0)) for k in range(N)]
    assert not any(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_the_domains_and_classes_are_declared():
    for name in ("svhn_c", "tiny_imagenet_c"):
        ood = get_ood_set(name)
        assert ood.has_severities and list(ood.domains) == ["none", *CORRUPTIONS]
    for name in ("svhn", "tiny_imagenet"):
        assert list(get_ood_set(name).domains) == ["none"] and not get_ood_set(name).has_severities
    assert list(get_ood_set("svhn").class_names) == [str(d) for d in range(10)]
    assert overlapping_classes(CIFAR10_CLASSES + CIFAR100_CLASSES, get_ood_set("svhn_c").class_names) == []


def test_tiny_imagenet_classes_are_its_wnids_first_lemmas():
    # Spot checks against Tiny-ImageNet's wnids.txt (line 1, 23, 200) and words.txt.
    assert len(TINY_IMAGENET_WNIDS) == len(set(TINY_IMAGENET_WNIDS)) == len(TINY_IMAGENET_CLASSES) == 200
    assert (TINY_IMAGENET_WNIDS[0], TINY_IMAGENET_CLASSES[0]) == ("n02124075", "Egyptian cat")
    assert (TINY_IMAGENET_WNIDS[22], TINY_IMAGENET_CLASSES[22]) == ("n01443537", "goldfish")
    assert (TINY_IMAGENET_WNIDS[199], TINY_IMAGENET_CLASSES[199]) == ("n02504458", "African elephant")
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in TINY_IMAGENET_WNIDS)
    assert list(get_ood_set("tiny_imagenet_c").class_names) == list(TINY_IMAGENET_CLASSES)
    # CIFAR-10 names none of them; CIFAR-100 shares these (so the harness refuses that pair, as it should).
    assert overlapping_classes(CIFAR10_CLASSES, TINY_IMAGENET_CLASSES) == []
    assert overlapping_classes(CIFAR100_CLASSES, TINY_IMAGENET_CLASSES) == [
        "bee", "chimpanzee", "cockroach", "lawn mower", "lion", "mushroom", "orange", "plate", "snail", "tractor"]


def _close_to(image, colour):
    """A uniformly coloured JPEG decodes within a few steps of its colour (measured: at most 1 at quality 95, 3 at
    PIL's default 75); distinct_colours differ by 16 or more in some channel, so the match is unambiguous."""
    return np.abs(np.asarray(image.convert("RGB")).astype(int) - colour.astype(int)).max() <= 8


def test_tiny_imagenet_val_reads_the_annotation_list_in_order(tmp_path):
    written = write_tiny_imagenet(tmp_path, n=9)
    dataset = _read("tiny_imagenet", tmp_path)
    dataset.check_files()
    assert len(dataset) == 9
    assert [p.name for p in dataset.source_files()] == [name for name, _, _ in written]
    for k, (_, label, colour) in enumerate(written):
        image, read_label = dataset[k]
        assert read_label == label and _close_to(image, colour)
    # CLIPTTA's TinyImageNetPaths: label = ids.index(nid) for each annotation line
    listing = (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines()
    ids = [line.strip() for line in open(tmp_path / "tiny-imagenet-200" / "wnids.txt")]
    assert dataset.labels == [ids.index(line.split()[1]) for line in listing]


def test_tiny_imagenet_c_reads_every_class_folder_and_none_is_the_val_set(tmp_path):
    written = write_tiny_imagenet_c(tmp_path, ["fog"], severities=(3,), size=16)
    val = write_tiny_imagenet(tmp_path, n=4, size=16)
    dataset = _read("tiny_imagenet_c", tmp_path, "fog", 3)
    dataset.check_files()
    assert len(dataset) == 200 and dataset.labels == list(range(200))
    for k, (relative, label, colour) in enumerate(written["fog", 3]):
        assert dataset.files[k].relative_to(tmp_path / "Tiny-ImageNet-C" / "fog" / "3").as_posix() == relative
        image, read_label = dataset[k]
        assert read_label == label and _close_to(image, colour)
    clean = _read("tiny_imagenet_c", tmp_path, "none", 5)
    assert [p.name for p in clean.source_files()] == [name for name, _, _ in val]


def test_a_benchmark_is_read_whole_as_an_ood_set(tmp_path):
    root = write_cifar_c(tmp_path, ["fog"], per_severity=6, num_classes=100, folder="CIFAR-100-C", seed=4)
    ood = get_ood_set("cifar100_c")
    assert list(ood.class_names) == CIFAR100_CLASSES and ood.has_severities
    cfg = _cfg(tmp_path, "CORRUPTION.DATASET", "cifar10_c", "CORRUPTION.NUM_EX", "2")
    dataset = ood.build(cfg, "fog", 5)
    images, labels = np.load(root / "fog.npy"), np.load(root / "labels.npy")
    assert len(dataset) == 6                                          # NUM_EX 2 is the in-distribution set's
    for k in range(6):
        image, label = dataset[k]
        assert np.array_equal(np.asarray(image), images[24 + k]) and label == labels[24 + k]
    assert overlapping_classes(CIFAR10_CLASSES, CIFAR100_CLASSES) == []
    assert overlapping_classes(["Aquarium-Fish", "cat", "lawn_mower"], CIFAR100_CLASSES) == ["Aquarium-Fish",
                                                                                              "lawn_mower"]


# --- refusals: one DatasetError line naming the path and what was expected ---

def _save_mat(path, **variables):
    import scipy.io
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables)


def test_svhn_refusals(tmp_path):
    mat = tmp_path / "SVHN" / "test_32x32.mat"
    _refused(re.escape(f"{mat} does not exist") + ".*split='test'", "svhn", tmp_path)
    mat.parent.mkdir()
    mat.write_bytes(b"not a mat file at all")
    _refused(re.escape(f"{mat} cannot be read as a MATLAB 5 file"), "svhn", tmp_path)
    images = np.zeros((32, 32, 3, 4), np.uint8)
    _save_mat(mat, X=images, labels=np.ones((4, 1)))
    _refused(re.escape(f"{mat} holds the variables ['X', 'labels'], not X and y"), "svhn", tmp_path)
    _save_mat(mat, X=np.zeros((32, 32, 4), np.uint8), y=np.ones((4, 1)))
    _refused(re.escape(f"{mat}: X is uint8 (32, 32, 4); expected"), "svhn", tmp_path)
    _save_mat(mat, X=images.astype(np.float64), y=np.ones((4, 1)))
    _refused(re.escape(f"{mat}: X is double (32, 32, 3, 4)"), "svhn", tmp_path)
    _save_mat(mat, X=images, y=np.ones((5, 1)))
    _refused(re.escape(f"{mat}: y has the shape (5, 1); expected (4, 1)"), "svhn", tmp_path)
    _save_mat(mat, X=images, y=np.array([[1], [2], [11], [3]]))
    _refused(re.escape(f"{mat}: y must hold the integers 1..10") + r".*\[1, 11\]", "svhn", tmp_path)
    _save_mat(mat, X=images, y=np.array([[1.5], [2], [10], [3]]))
    _refused(re.escape(f"{mat}: y must hold the integers 1..10"), "svhn", tmp_path)
    write_svhn(tmp_path, n=N)
    with pytest.raises(DatasetError, match="svhn has no severities"):
        _read("svhn", tmp_path, "none", 5)
    _refused(r"'fog' is not a domain of the OOD set svhn\. Nearest: \[\]; all: \['none'\]", "svhn", tmp_path, "fog")
    dataset = _read("svhn", tmp_path)
    mat.write_bytes(b"HDF5 what a v7.3 save without header looks like")
    with pytest.raises(DatasetError, match=re.escape(f"{mat} is not a MATLAB file: it begins with b'HDF5 w'")):
        dataset.check_files()


def test_svhn_c_refusals(tmp_path):
    folder = tmp_path / "SVHN-C"
    _refused(re.escape(f"svhn_c: directory {folder} does not exist; expected CLIPTTA's SVHN-C"), "svhn_c", tmp_path,
             "fog", 5)
    write_svhn_c(tmp_path, ["fog"], n=N)
    _refused(re.escape(f"SVHN test set {tmp_path / 'SVHN' / 'test_32x32.mat'} does not exist"), "svhn_c", tmp_path,
             "fog", 5)
    write_svhn(tmp_path, n=N)
    _refused(re.escape(f"Missing svhn_c corruption file (expected {folder}/<corruption>.npy") + ".*"
             + re.escape(f"): {folder / 'snow.npy'}"), "svhn_c", tmp_path, "snow", 5)
    np.save(folder / "snow.npy", np.zeros((5 * N + 1, 32, 32, 3), np.uint8))
    _refused(re.escape(f"{folder / 'snow.npy'} has {5 * N + 1} rows; expected 5 x {N} = {5 * N}: 5 severity "
                       f"blocks of the {N} images of {tmp_path / 'SVHN' / 'test_32x32.mat'}"),
             "svhn_c", tmp_path, "snow", 5)
    np.save(folder / "snow.npy", np.zeros((5 * N, 32, 32), np.uint8))
    _refused(re.escape(f"{folder / 'snow.npy'}: expected a uint8 array (N, H, W, 3), got uint8 ({5 * N}, 32, 32)"),
             "svhn_c", tmp_path, "snow", 5)
    for severity in (0, 6):
        _refused(f"OOD set svhn_c: severity {severity} is not in 1..5", "svhn_c", tmp_path, "fog", severity)
    _refused(r"'speckle_noise' is not a domain of the OOD set svhn_c", "svhn_c", tmp_path, "speckle_noise", 5)
    (folder / "meta.json").write_text('{"severities": [5]}')       # scripts/make_corrupted.py --severities 5
    _refused(re.escape(f"{folder}: its files hold severities [5] only"), "svhn_c", tmp_path, "fog", 3)
    _refused(re.escape(f"{folder / 'fog.npy'} has {5 * N} rows; expected 1 x {N} = {N}"), "svhn_c", tmp_path,
             "fog", 5)


def _rewrite(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


@pytest.fixture
def tiny_root(tmp_path):
    write_tiny_imagenet(tmp_path, n=5, size=8)
    return tmp_path


def test_tiny_imagenet_list_refusals(tiny_root):
    root = tiny_root / "tiny-imagenet-200"
    wnids, listing = root / "wnids.txt", root / "val" / "val_annotations.txt"
    listing.write_text(listing.read_text().replace("\t", "  "))   # any whitespace separates, as in CLIPTTA
    assert len(_read("tiny_imagenet", tiny_root)) == 5
    first = listing.read_text().split()[1]
    _rewrite(listing, first, "n99999999")
    _refused(re.escape(f"{listing}: line 1 names the wnid n99999999, which {wnids} does not list"),
             "tiny_imagenet", tiny_root)
    listing.write_text("val_0.JPEG\tn02124075\t0\t0\t8\n")
    _refused(re.escape(f"{listing}: line 1 has 5 fields; expected '<file>\\t<wnid>"), "tiny_imagenet", tiny_root)
    listing.write_text("\n")
    _refused(re.escape(f"{listing} lists no image; expected"), "tiny_imagenet", tiny_root)
    listing.write_text("val_0.JPEG n02124075 0 0 8 8\nval_0.JPEG n04067472 0 0 8 8\n")
    _refused(re.escape(f"{listing} lists val_0.JPEG under two labels, 0 (line 1) and 1 (line 2)"),
             "tiny_imagenet", tiny_root)
    listing.write_text("val_0.JPEG n02124075 0 0 8 8\nval_77.JPEG n04067472 0 0 8 8\n")
    _refused(re.escape(f"1 of the 2 images that {listing} lists are missing, e.g. {root / 'val/images/val_77.JPEG'}"),
             "tiny_imagenet", tiny_root)
    listing.unlink()
    _refused(re.escape(f"Tiny-ImageNet: {listing} does not exist; expected"), "tiny_imagenet", tiny_root)


def test_tiny_imagenet_class_list_refusals(tiny_root):
    root = tiny_root / "tiny-imagenet-200"
    wnids, words = root / "wnids.txt", root / "words.txt"
    lines = wnids.read_text().splitlines()
    wnids.write_text("\n".join([lines[1], lines[0], *lines[2:]]))
    _refused(re.escape(f"{wnids}: wnid 1 is n04067472, expected n02124075: Tiny-ImageNet's 200 wnids"),
             "tiny_imagenet", tiny_root)
    wnids.write_text("\n".join(lines[:-1]))
    _refused(re.escape(f"{wnids}: wnid 200 is the end of the file, expected n02504458"), "tiny_imagenet", tiny_root)
    wnids.write_text("\n".join(lines))
    _rewrite(words, "n04067472\t", "n04067473\t")
    _refused(re.escape(f"{words} has no line for n04067472 of {wnids}"), "tiny_imagenet", tiny_root)
    write_tiny_imagenet_lists(tiny_root)
    _rewrite(words, "\tEgyptian cat,", "\tEgyptian kitty,")
    _refused(re.escape(f"{words}: the first lemma of n02124075 is 'Egyptian kitty', expected 'Egyptian cat'"),
             "tiny_imagenet", tiny_root)
    words.unlink()
    _refused(re.escape(f"Tiny-ImageNet: {words} does not exist"), "tiny_imagenet_c", tiny_root, "none", 5)


def test_tiny_imagenet_c_refusals(tmp_path):
    severity_folder = tmp_path / "Tiny-ImageNet-C" / "fog" / "5"
    write_tiny_imagenet_lists(tmp_path)
    _refused(re.escape(f"Tiny-ImageNet-C: directory {tmp_path / 'Tiny-ImageNet-C' / 'snow' / '5'} does not exist"),
             "tiny_imagenet_c", tmp_path, "snow", 5)
    write_tiny_imagenet_c(tmp_path, ["fog"], size=8)
    for image in (severity_folder / "n04067472").iterdir():
        image.unlink()
    _refused(re.escape(f"class folder {severity_folder / 'n04067472'} holds no images"), "tiny_imagenet_c",
             tmp_path, "fog", 5)
    (severity_folder / "n04067472").rmdir()
    _refused(re.escape(f"1 of 200 class folders are missing under {severity_folder}, e.g. "
                       f"{severity_folder / 'n04067472'}"), "tiny_imagenet_c", tmp_path, "fog", 5)
    (severity_folder / "n04067472").mkdir()
    (severity_folder / "n04067472" / "a.JPEG").write_bytes(b"")
    _refused(re.escape(f"Image {severity_folder / 'n04067472' / 'a.JPEG'} is empty (0 bytes)"), "tiny_imagenet_c",
             tmp_path, "fog", 5)
    (severity_folder / "n99999999").mkdir()
    _refused(re.escape(f"{severity_folder} holds folders that are not classes of this data set: ['n99999999']"),
             "tiny_imagenet_c", tmp_path, "fog", 5)
    _refused(r"'saturate' is not a domain of the OOD set tiny_imagenet_c", "tiny_imagenet_c", tmp_path, "saturate", 5)
    _refused("OOD set tiny_imagenet_c: severity 0 is not in 1..5", "tiny_imagenet_c", tmp_path, "fog", 0)
