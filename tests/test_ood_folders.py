"""The OOD sets read from image folders and image lists (datasets/ood_folders.py), on synthetic copies of their
releases' layouts (tests/ood_folder_layouts.py): the right images (decoded pixels equal the written files'),
labels and class names, and every refusal as one DatasetError line naming the path."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets  # noqa: F401  (registers every set)
from datasets.base import CLEAN, DatasetError
from datasets.coop_sets import coop_class_names
from datasets.ood_folders import IMAGENET_1K_SETS, LSUN_SCENES, NINCO_CLASS_FOLDERS, places365_class_name
from datasets.ood_sets import OOD_SETS, get_ood_set, overlapping_classes
from tests.ood_folder_layouts import (OPENOOD_IMAGE_FOLDERS, PLACES365_CATEGORIES, write_lsun, write_ninco,
                                      write_ninco_c, write_openood_list, write_places, write_places365,
                                      write_places_c, write_textures)
from tests.synthetic import tiny_cfg

OPENOOD_SETS = ["openood_inaturalist", "openood_sun", "openood_places", "openood_textures", "openood_openimage_o",
                "openood_ninco", "openood_ssb_hard"]


@pytest.fixture(scope="module")
def base_cfg():
    return tiny_cfg()


def cfg_at(base_cfg, data_dir: Path):
    cfg = base_cfg.clone()
    cfg.defrost()
    cfg.DATA_DIR = str(data_dir)
    return cfg


def assert_reads(dataset, files, labels):
    """The set lists exactly ``files`` in this order, with ``labels``, and decodes each to the written pixels."""
    assert dataset.source_files()[-len(files):] == list(files) and len(dataset) == len(files)
    dataset.check_files()
    for i, (path, label) in enumerate(zip(files, labels)):
        image, got = dataset[i]
        assert got == label
        with Image.open(path) as written:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(written.convert("RGB")))


def refusal(build, *fragments):
    with pytest.raises(DatasetError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def test_registered_sets_declare_classes_domains_and_layouts():
    names = {"textures", "places", "places_c", "places365", "ninco", "ninco_c", "lsun", "lsun_resize", *OPENOOD_SETS}
    assert names <= set(OOD_SETS.names())
    for name in names:
        ood = get_ood_set(name)
        assert ood.name == name and ood.layout
        assert ood.class_names or ood.disjoint_from or name == "places365"   # places365: its category file
        assert set(ood.disjoint_from) <= set(datasets.DATASETS.names())
    assert tuple(get_ood_set("textures").class_names) == coop_class_names("dtd") and len(coop_class_names("dtd")) == 47
    assert len(NINCO_CLASS_FOLDERS) == 64 == len(set(NINCO_CLASS_FOLDERS))
    assert tuple(get_ood_set("ninco").class_names) == NINCO_CLASS_FOLDERS == tuple(sorted(NINCO_CLASS_FOLDERS))
    assert tuple(get_ood_set("lsun").class_names) == LSUN_SCENES
    for name in ("places", "places_c", "ninco", "ninco_c", *OPENOOD_SETS):
        assert tuple(get_ood_set(name).disjoint_from) == IMAGENET_1K_SETS
    for name in ("places_c", "ninco_c"):
        ood = get_ood_set(name)
        assert ood.has_severities and ood.domains[0] == CLEAN and len(ood.domains) == 16
    # LSUN's scenes include a CIFAR-100 class: the overlap check sees it by name.
    assert overlapping_classes(datasets.get_dataset("cifar100_c").class_names, LSUN_SCENES) == ["bridge"]
    assert overlapping_classes(datasets.get_dataset("cifar10_c").class_names, LSUN_SCENES) == []


def test_textures_reads_every_dtd_image_by_class_folder(tmp_path, base_cfg):
    files = write_textures(tmp_path, per_class=1)
    (tmp_path / "dtd" / "images" / "waffled" / ".directory").write_text("x")    # clutter the release holds
    dataset = get_ood_set("textures").build(cfg_at(base_cfg, tmp_path), CLEAN, 0)
    assert_reads(dataset, files, list(range(47)))
    assert [f.parent.name for f in files] == list(coop_class_names("dtd"))
    (tmp_path / "dtd" / "images" / "zigzagged" / files[-1].name).unlink()
    (tmp_path / "dtd" / "images" / "zigzagged").rmdir()
    refusal(lambda: get_ood_set("textures").build(cfg_at(base_cfg, tmp_path), CLEAN, 0),
            tmp_path / "dtd" / "images" / "zigzagged", "OOD set textures")


def test_places_and_places_c(tmp_path, base_cfg):
    cfg = cfg_at(base_cfg, tmp_path)
    clean = write_places(tmp_path, n=4)
    corrupted = write_places_c(tmp_path, ["gaussian_noise", "fog"], severities=(3, 5), n=2)
    assert_reads(get_ood_set("places").build(cfg, CLEAN, 0), clean, [0] * 4)
    assert_reads(get_ood_set("places_c").build(cfg, CLEAN, 5), clean, [0] * 4)      # none = the clean Places
    for (corruption, severity), files in corrupted.items():
        assert_reads(get_ood_set("places_c").build(cfg, corruption, severity), files, [0, 0])
    assert get_ood_set("places").describe(cfg) == {"ood_root": str(tmp_path / "ood_data" / "Places")}
    refusal(lambda: get_ood_set("places_c").build(cfg, "fog", 1), tmp_path / "ood_data" / "Places-C" / "fog" / "1")
    refusal(lambda: get_ood_set("places_c").build(cfg, "fog", 6), "places_c", "severity 6")
    refusal(lambda: get_ood_set("places_c").build(cfg, "fogg", 5), "'fogg'", "Nearest: ['fog'")
    refusal(lambda: get_ood_set("places").build(cfg, CLEAN, 5), "places has no severities")
    # Images directly in Places/ (no class folder) are what ImageFolder would refuse too.
    flat = tmp_path / "flat"
    (flat / "ood_data" / "Places").mkdir(parents=True)
    refusal(lambda: get_ood_set("places").build(cfg_at(base_cfg, flat), CLEAN, 0),
            flat / "ood_data" / "Places", "no class folder")
    refusal(lambda: get_ood_set("places").build(cfg_at(base_cfg, tmp_path / "none"), CLEAN, 0),
            tmp_path / "none" / "ood_data" / "Places", "does not exist")
    empty = clean[0].parent.parent / "empty"
    empty.mkdir()
    refusal(lambda: get_ood_set("places").build(cfg, CLEAN, 0), empty, "holds no images")


def test_places365_reads_the_validation_list_with_category_names(tmp_path, base_cfg):
    labels = [2, 0, 3, 2, 1]
    files = write_places365(tmp_path, labels)
    cfg = cfg_at(base_cfg, tmp_path)
    places365 = get_ood_set("places365")
    assert places365.class_names_for(cfg) == ("airfield", "apartment building outdoor", "bakery shop", "campsite")
    assert [places365_class_name(c) for c in PLACES365_CATEGORIES[:1]] == ["airfield"]
    dataset = places365.build(cfg, CLEAN, 0)
    assert_reads(dataset, files, labels)
    base = tmp_path / "places365"
    assert dataset.source_files()[:2] == [base / "places365_val.txt", base / "categories_places365.txt"]
    assert places365.describe(cfg) == {"places365_images": "val_256", "image_list": str(base / "places365_val.txt")}
    # val_large is read where val_256 is absent, and recorded.
    (base / "val_256").rename(base / "val_large")
    assert places365.describe(cfg)["places365_images"] == "val_large"
    assert len(places365.build(cfg, CLEAN, 0)) == 5


@pytest.mark.parametrize("line, fragments", [
    ("Places365_val_00000009.jpg 1", ["line 6", "Places365_val_00000009.jpg", "does not exist"]),
    ("Places365_val_00000001.jpg 4", ["line 6", "label 4", "0..3"]),
    ("Places365_val_00000001.jpg", ["line 6", "<integer label>"]),
    ("Places365_val_00000001.jpg 0", ["twice", "line 1", "line 6"]),
    ("Places365_val_00000001.jpg 1", ["two labels", "line 1", "line 6"]),
])
def test_places365_refuses_a_bad_list_line_by_path_and_line(tmp_path, base_cfg, line, fragments):
    write_places365(tmp_path, labels=[0, 1, 2, 3, 0])
    listed = tmp_path / "places365" / "places365_val.txt"
    listed.write_text(listed.read_text() + line + "\n")
    refusal(lambda: get_ood_set("places365").build(cfg_at(base_cfg, tmp_path), CLEAN, 0), listed, *fragments)


def test_places365_refuses_missing_files_and_a_misnumbered_category_file(tmp_path, base_cfg):
    write_places365(tmp_path)
    cfg, base = cfg_at(base_cfg, tmp_path), tmp_path / "places365"
    categories = base / "categories_places365.txt"
    categories.write_text("/a/airfield 0\n/b/bakery/shop 2\n")
    refusal(lambda: get_ood_set("places365").build(cfg, CLEAN, 0), categories, "line 2", "1'")
    categories.unlink()
    refusal(lambda: get_ood_set("places365").build(cfg, CLEAN, 0), categories, "does not exist")
    write_places365(tmp_path)
    (base / "places365_val.txt").unlink()
    refusal(lambda: get_ood_set("places365").build(cfg, CLEAN, 0), base / "places365_val.txt", "does not exist")
    for image in (base / "val_256").iterdir():
        image.unlink()
    (base / "val_256").rmdir()
    refusal(lambda: get_ood_set("places365").build(cfg, CLEAN, 0), base / "val_256", base / "val_large")


def test_ninco_reads_its_64_class_folders_and_ninco_c_its_corruptions(tmp_path, base_cfg):
    cfg = cfg_at(base_cfg, tmp_path)
    files = write_ninco(tmp_path, per_class=1)
    assert_reads(get_ood_set("ninco").build(cfg, CLEAN, 0), files, list(range(64)))
    corrupted = write_ninco_c(tmp_path, "snow", 4, class_folders=("door", "bagpipe"), per_class=2)
    assert_reads(get_ood_set("ninco_c").build(cfg, "snow", 4), corrupted, [0, 0, 1, 1])    # bagpipe, door
    assert len(get_ood_set("ninco_c").build(cfg, CLEAN, 3)) == 64
    refusal(lambda: get_ood_set("ninco_c").build(cfg, "snow", 5),
            tmp_path / "ood_data" / "NINCO-C" / "snow" / "5" / "images")
    (tmp_path / "ood_data" / "NINCO" / "NINCO_OOD_classes" / "not_a_ninco_class").mkdir()
    refusal(lambda: get_ood_set("ninco").build(cfg, CLEAN, 0), "not_a_ninco_class", "not classes")
    whole = tmp_path / "other"
    write_ninco(whole, class_folders=NINCO_CLASS_FOLDERS[1:])
    refusal(lambda: get_ood_set("ninco").build(cfg_at(base_cfg, whole), CLEAN, 0), "Caracal caracal caracal",
            "1 of 64 class folders are missing")


@pytest.mark.parametrize("name, resized", [("lsun", False), ("lsun_resize", True)])
def test_lsun_reads_odin_archives(tmp_path, base_cfg, name, resized):
    files = write_lsun(tmp_path, n=3, resized=resized)
    assert_reads(get_ood_set(name).build(cfg_at(base_cfg, tmp_path), CLEAN, 0), files, [0, 0, 0])
    expected = tmp_path / ("LSUN_resize" if resized else "LSUN")
    refusal(lambda: get_ood_set(name).build(cfg_at(base_cfg, tmp_path / "x"), CLEAN, 0), tmp_path / "x" / expected.name)


@pytest.mark.parametrize("name", OPENOOD_SETS)
def test_openood_lists_read_every_listed_image(tmp_path, base_cfg, name):
    list_name = name.removeprefix("openood_")
    files = write_openood_list(tmp_path, list_name, n=3)
    cfg = cfg_at(base_cfg, tmp_path)
    dataset = get_ood_set(name).build(cfg, CLEAN, 0)
    list_path = tmp_path / "benchmark_imglist" / "imagenet" / f"test_{list_name}.txt"
    assert_reads(dataset, files, [-1, -1, -1])
    assert dataset.source_files()[0] == list_path
    assert get_ood_set(name).describe(cfg) == {"image_list": str(list_path)}
    assert files[0].is_relative_to(tmp_path / OPENOOD_IMAGE_FOLDERS[list_name][0])


@pytest.mark.parametrize("line, fragments", [
    ("ninco/bagpipe/missing.jpg -1", ["line 4", "images_largescale/ninco/bagpipe/missing.jpg", "does not exist"]),
    ("ninco/bagpipe/img_000.png 7", ["line 4", "label 7", "label -1"]),
    ("ninco/bagpipe/img_000.png -1", ["twice", "line 1", "line 4"]),
    ("/abs/ninco/x.jpg -1", ["line 4", "relative to"]),
    ("ninco/bagpipe/img_000.png {'label': 3}", ["line 4", "<integer label>"]),
])
def test_openood_refuses_a_bad_list_line_naming_list_and_image(tmp_path, base_cfg, line, fragments):
    write_openood_list(tmp_path, "ninco", n=3)
    list_path = tmp_path / "benchmark_imglist" / "imagenet" / "test_ninco.txt"
    list_path.write_text(list_path.read_text() + line + "\n")
    refusal(lambda: get_ood_set("openood_ninco").build(cfg_at(base_cfg, tmp_path), CLEAN, 0), list_path, *fragments)


def test_openood_refuses_a_missing_or_empty_list(tmp_path, base_cfg):
    cfg = cfg_at(base_cfg, tmp_path)
    list_path = tmp_path / "benchmark_imglist" / "imagenet" / "test_inaturalist.txt"
    refusal(lambda: get_ood_set("openood_inaturalist").build(cfg, CLEAN, 0), list_path, "does not exist",
            tmp_path / "images_largescale")
    list_path.parent.mkdir(parents=True)
    list_path.write_text("\n")
    refusal(lambda: get_ood_set("openood_inaturalist").build(cfg, CLEAN, 0), list_path, "lists no image")
    refusal(lambda: get_ood_set("openood_inaturalist").build(cfg, "fog", 0), "'fog'", "openood_inaturalist")


def test_the_pixel_and_order_comparison_fails_when_two_files_swap(tmp_path, base_cfg):
    files = write_lsun(tmp_path, n=2)
    dataset = get_ood_set("lsun").build(cfg_at(base_cfg, tmp_path), CLEAN, 0)
    dataset.files = dataset.files[::-1]
    with pytest.raises(AssertionError):
        assert_reads(dataset, files, [0, 0])
