import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from conf import ConfigError
from datasets import DatasetError, get_dataset
from datasets.imagenet_c import imagenet_wnids
from datasets.transforms import clip_image_transform
from tests.synthetic import Transformed, tiny_cfg, write_cifar_c, write_imagenet_c

T32 = clip_image_transform(32)


def cfg_for(tmp_path, **kw):
    return tiny_cfg(None, DATA_DIR=str(tmp_path), **kw)


# ----------------------------------------------------------------------------- CIFAR-C
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_cifar_c_reads_the_severity_block_memory_mapped(tmp_path, severity):
    write_cifar_c(tmp_path, ["fog"], per_severity=8)
    ds = Transformed(get_dataset("cifar10_c").build_domain(cfg_for(tmp_path), "fog", severity), T32)
    raw = np.load(tmp_path / "CIFAR-10-C" / "fog.npy")
    labels = np.load(tmp_path / "CIFAR-10-C" / "labels.npy")
    assert len(ds) == 8
    for i in range(8):
        image, label = ds[i]
        row = (severity - 1) * 8 + i
        assert torch.equal(image, torch.from_numpy(raw[row]).permute(2, 0, 1).float() / 255)
        assert label == labels[row]
    assert isinstance(ds.part._images, np.memmap)


def test_cifar_c_upsamples_per_image_with_bicubic(tmp_path):
    write_cifar_c(tmp_path, ["fog"], per_severity=2)
    ds = Transformed(get_dataset("cifar10_c").build_domain(cfg_for(tmp_path), "fog", 5), clip_image_transform(224))
    image, _ = ds[0]
    raw = np.load(tmp_path / "CIFAR-10-C" / "fog.npy")[8]
    expected = np.asarray(Image.fromarray(raw).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    assert image.shape == (3, 224, 224)
    torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_cifar_c_num_ex_first_n_takes_the_first_images_of_the_block(tmp_path):
    write_cifar_c(tmp_path, ["fog"], per_severity=8)
    ds = get_dataset("cifar10_c").build_domain(cfg_for(tmp_path, CORRUPTION__NUM_EX=3, CORRUPTION__SUBSET="first_n"),
                                               "fog", 2)
    assert list(ds.indices) == [8, 9, 10]


def test_cifar100_c_has_the_four_extra_corruptions(tmp_path):
    write_cifar_c(tmp_path, ["saturate"], per_severity=4, num_classes=100, folder="CIFAR-100-C")
    ds = Transformed(get_dataset("cifar100_c").build_domain(cfg_for(tmp_path), "saturate", 5), T32)
    assert len(ds) == 4 and len(get_dataset("cifar100_c").class_names) == 100
    assert {"speckle_noise", "gaussian_blur", "spatter", "saturate"} <= set(get_dataset("cifar100_c").domains)


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


@pytest.mark.parametrize("case, needle", [
    ("no_dir", "does not exist"),
    ("no_file", "fog.npy"),
    ("no_labels", "labels.npy"),
    ("wrong_shape", "(N, H, W, 3)"),
    ("label_count", "labels.npy"),
    ("not_divisible", "5 equal severity blocks"),
    ("too_few", "NUM_EX 100"),
    ("bad_label", "labels must lie"),
])
def test_cifar_c_errors_name_the_path_and_the_expectation(tmp_path, case, needle):
    root = tmp_path / "CIFAR-10-C"
    images = np.zeros((10, 32, 32, 3), np.uint8)
    labels = np.zeros(10, np.uint8)
    if case != "no_dir":
        root.mkdir()
    if case not in ("no_dir", "no_file"):
        _write(root / "fog.npy", {"wrong_shape": np.zeros((10, 32, 32), np.uint8),
                                  "not_divisible": np.zeros((9, 32, 32, 3), np.uint8)}.get(case, images))
    if case not in ("no_dir", "no_labels", "no_file"):
        _write(root / "labels.npy", {"label_count": np.zeros(7, np.uint8), "not_divisible": np.zeros(9, np.uint8),
                                     "bad_label": np.full(10, 12, np.uint8)}.get(case, labels))
    kw = {"CORRUPTION__NUM_EX": 100} if case == "too_few" else {}
    with pytest.raises(DatasetError) as err:
        get_dataset("cifar10_c").build_domain(cfg_for(tmp_path, **kw), "fog", 5)
    assert needle in str(err.value) and str(root) in str(err.value)


def test_unknown_corruption_and_dataset_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="gaussian_noise"):
        get_dataset("cifar10_c").build_domain(cfg_for(tmp_path), "gaussian_nois", 5)
    with pytest.raises(ConfigError, match="imagenet_c"):
        datasets.get_dataset("imagenet-c")


# ----------------------------------------------------------------------------- ImageNet-C
def test_imagenet_c_with_a_list_file_maps_wnids_to_sorted_class_indices(tmp_path):
    wnids = [imagenet_wnids()[i] for i in (0, 7, 999)]
    entries = write_imagenet_c(tmp_path, ["fog"], wnids=wnids, per_class=2)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(reversed(entries)) + "\n")
    ds = Transformed(get_dataset("imagenet_c").build_domain(cfg_for(tmp_path, CORRUPTION__IMAGENET_C_LIST=str(listing)),
                                                "fog", 5), clip_image_transform(32))
    assert len(ds) == 6
    assert ds.part.labels == [999, 999, 7, 7, 0, 0]
    image, _ = ds[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1


def test_imagenet_c_all_walks_every_image_and_num_ex_limits(tmp_path):
    write_imagenet_c(tmp_path, ["fog"], wnids=imagenet_wnids(), per_class=1, size=8)
    (tmp_path / "ImageNet-C" / "fog" / "5" / imagenet_wnids()[3] / "extra.JPEG").write_bytes(
        (tmp_path / "ImageNet-C" / "fog" / "5" / imagenet_wnids()[3]).iterdir().__next__().read_bytes())
    spec = get_dataset("imagenet_c")
    ds = spec.build_domain(cfg_for(tmp_path, CORRUPTION__IMAGENET_C_LIST="all"), "fog", 5)
    assert len(ds) == 1001 and ds.labels[:5] == [0, 1, 2, 3, 3]
    first_n = dict(CORRUPTION__IMAGENET_C_LIST="all", CORRUPTION__SUBSET="first_n")
    assert len(spec.build_domain(cfg_for(tmp_path, CORRUPTION__NUM_EX=5, **first_n), "fog", 5)) == 5
    with pytest.raises(DatasetError, match="holds only 1001"):
        spec.build_domain(cfg_for(tmp_path, CORRUPTION__NUM_EX=1002, **first_n), "fog", 5)
    # a missing or empty class folder would silently shrink the 50,000-image evaluation: refused
    missing = tmp_path / "ImageNet-C" / "fog" / "5" / imagenet_wnids()[7]
    for image in missing.iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=rf"1 of the 1000 class folders are missing or hold no image, e.g. "
                                           rf".*{imagenet_wnids()[7]}"):
        spec.build_domain(cfg_for(tmp_path, CORRUPTION__IMAGENET_C_LIST="all"), "fog", 5)


def test_imagenet_c_default_is_robustbench_canonical_5000_list():
    from datasets.imagenet_c import _robustbench_file, read_image_list
    entries = read_image_list(_robustbench_file("imagenet_test_image_ids.txt"))
    assert len(entries) == 5000 and len(set(entries)) == 5000
    assert {e.split("/")[0] for e in entries} <= set(imagenet_wnids())
    assert tiny_cfg().CORRUPTION.IMAGENET_C_LIST == "robustbench_5000"
    assert get_dataset("imagenet_c").describe(tiny_cfg()) == {"imagenet_c_list": "robustbench_5000"}


def test_imagenet_c_errors(tmp_path):
    spec = get_dataset("imagenet_c")
    with pytest.raises(DatasetError, match=r"ImageNet-C/fog/5 does not exist"):
        spec.build_domain(cfg_for(tmp_path), "fog", 5)
    write_imagenet_c(tmp_path, ["fog"], per_class=1)
    # the canonical list names images the synthetic copy does not have
    with pytest.raises(DatasetError, match="listed images are missing"):
        spec.build_domain(cfg_for(tmp_path), "fog", 5)
    (tmp_path / "ImageNet-C" / "fog" / "5" / "not_a_wnid").mkdir()
    (tmp_path / "ImageNet-C" / "fog" / "5" / "not_a_wnid" / "x.JPEG").write_bytes(b"")
    with pytest.raises(DatasetError, match="not ImageNet wnids"):
        spec.build_domain(cfg_for(tmp_path, CORRUPTION__IMAGENET_C_LIST="all"), "fog", 5)


def test_unreadable_image_names_the_file(tmp_path):
    wnid = imagenet_wnids()[0]
    path = tmp_path / "ImageNet-C" / "fog" / "5" / wnid / "broken.JPEG"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{wnid}/broken.JPEG\n")
    ds = Transformed(get_dataset("imagenet_c").build_domain(cfg_for(tmp_path, CORRUPTION__IMAGENET_C_LIST=str(listing)),
                                                            "fog", 5), T32)
    with pytest.raises(DatasetError, match="broken.JPEG"):
        ds[0]
