"""ImageNet-A, -R, -V2 and -Sketch on synthetic folders in the anchor suite's layouts."""
from pathlib import Path

import pytest
import torch

import datasets
from datasets.class_names import IMAGENET_CLASSES
from datasets.imagenet_c import imagenet_wnids
from datasets.imagenet_variants import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS
from harness.run import evaluate
from tests.synthetic import tiny_cfg
from tests.synthetic import write_image_folders

# Hand-built from the ImageNet-A authors' 1000 -> 200 table (Hendrycks' thousand_k_to_200, as the anchor suite
# ships it): ImageNet class index -> ImageNet-A label.
A_1000_TO_200 = {6: 0, 11: 1, 13: 2, 15: 3, 17: 4, 22: 5, 23: 6, 27: 7, 30: 8, 37: 9, 39: 10, 42: 11,
                 456: 90, 457: 91, 461: 92, 462: 93, 971: 192, 980: 194, 986: 197, 987: 198, 988: 199}
# ImageNet-R: wnid -> (ImageNet class index, ImageNet-R label, CLIP name), from its 200-wnid list by hand.
R_HAND = {"n01443537": (1, 0, "goldfish"), "n01484850": (2, 1, "great white shark"),
          "n01494475": (4, 2, "hammerhead shark"), "n01498041": (6, 3, "stingray"), "n01514859": (8, 4, "hen"),
          "n02106662": (235, 57, "German Shepherd Dog"), "n12267677": (988, 199, "acorn")}
VARIANTS = {"imagenet_a": ("imagenet-a", "ImageNet-A", 200), "imagenet_r": ("imagenet-r", "ImageNet-R", 200),
            "imagenet_v2": ("imagenet-v2/imagenetv2-matched-frequency-format-val", "ImageNet-V2", 1000),
            "imagenet_sketch": ("ImageNet-Sketch/sketch", "ImageNet-Sketch", 1000)}


def cfg_for(data_dir, name, **overrides):
    return tiny_cfg(f"conf/{name}/source.yaml", DATA_DIR=str(data_dir), **overrides)


def test_registered_single_domain_sets():
    for name, (_, domain, n_classes) in VARIANTS.items():
        ds = datasets.get_dataset(name)
        assert list(ds.domains) == [domain] and ds.has_severities is False
        assert len(ds.class_names) == n_classes
        for method in ("source", "batclip"):
            cfg = tiny_cfg(f"conf/{name}/{method}.yaml")
            assert list(cfg.CORRUPTION.TYPE) == [domain] and list(cfg.CORRUPTION.SEVERITY) == [0]
    assert datasets.get_dataset("imagenet_v2").class_names == IMAGENET_CLASSES
    assert datasets.get_dataset("imagenet_sketch").class_names == IMAGENET_CLASSES


def test_stored_200_class_lists():
    all_wnids = set(imagenet_wnids())
    for wnids in (IMAGENET_A_WNIDS, IMAGENET_R_WNIDS):
        assert len(wnids) == len(set(wnids)) == 200 and list(wnids) == sorted(wnids)
        assert set(wnids) <= all_wnids
    assert len(set(IMAGENET_A_WNIDS) & set(IMAGENET_R_WNIDS)) == 86
    a_names = datasets.get_dataset("imagenet_a").class_names
    for k, label in A_1000_TO_200.items():
        assert IMAGENET_A_WNIDS[label] == imagenet_wnids()[k] and a_names[label] == IMAGENET_CLASSES[k]
    assert a_names[:4] == ["stingray", "goldfinch", "junco", "American robin"]
    r_names = datasets.get_dataset("imagenet_r").class_names
    for wnid, (k, label, clip_name) in R_HAND.items():
        assert imagenet_wnids()[k] == wnid and IMAGENET_R_WNIDS[label] == wnid and r_names[label] == clip_name


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_200_class_sets_label_by_hand_mapping(tmp_path, name):
    folder = VARIANTS[name][0]
    wnids = IMAGENET_A_WNIDS if name == "imagenet_a" else IMAGENET_R_WNIDS
    write_image_folders(tmp_path / folder, wnids, per_class=1, size=4)
    (tmp_path / folder / "README.txt").write_text("the real archives ship one")
    ds = datasets.get_dataset(name).build_domain(cfg_for(tmp_path, name), VARIANTS[name][1], 0)
    by_wnid = {Path(f).parent.name: y for f, y in zip(ds.files, ds.labels)}
    assert len(ds) == 200 and sorted(by_wnid.values()) == list(range(200))
    if name == "imagenet_a":
        hand = {imagenet_wnids()[k]: label for k, label in A_1000_TO_200.items()}
    else:
        hand = {wnid: label for wnid, (_, label, _) in R_HAND.items()}
    for wnid, label in hand.items():
        assert by_wnid[wnid] == label
    names = datasets.get_dataset(name).class_names
    for wnid, label in by_wnid.items():    # label -> the CLIP name of that wnid's ImageNet class
        assert names[label] == IMAGENET_CLASSES[imagenet_wnids().index(wnid)]


def test_200_class_set_errors_name_the_path(tmp_path):
    root = tmp_path / "imagenet-a"
    write_image_folders(root, IMAGENET_A_WNIDS[1:], per_class=1, size=4)
    a = datasets.get_dataset("imagenet_a")
    with pytest.raises(datasets.DatasetError, match=r"1 of 200 class folders are missing.*imagenet-a/n01498041"):
        a.build_domain(cfg_for(tmp_path, "imagenet_a"), "ImageNet-A", 0)
    write_image_folders(root, [IMAGENET_A_WNIDS[0], "n01440764"], per_class=1, size=4)   # tench: not in A
    with pytest.raises(datasets.DatasetError, match=r"not classes of this data set: \['n01440764'\]"):
        a.build_domain(cfg_for(tmp_path, "imagenet_a"), "ImageNet-A", 0)
    with pytest.raises(datasets.DatasetError, match=r"imagenet-r does not exist"):
        datasets.get_dataset("imagenet_r").build_domain(cfg_for(tmp_path, "imagenet_r"), "ImageNet-R", 0)
    with pytest.raises(datasets.DatasetError, match=r"'ImageNet-B' is not a domain of imagenet_a"):
        a.build_domain(cfg_for(tmp_path, "imagenet_a"), "ImageNet-B", 0)


def test_imagenet_v2_folder_name_is_the_class_index(tmp_path):
    folder = VARIANTS["imagenet_v2"][0]
    write_image_folders(tmp_path / folder, [str(i) for i in range(1000)], per_class=1, size=2)
    ds = datasets.get_dataset("imagenet_v2").build_domain(cfg_for(tmp_path, "imagenet_v2"), "ImageNet-V2", 0)
    assert len(ds) == 1000
    # Folder "10" is class 10 (not 2, its rank among the folder names sorted as strings).
    assert all(y == int(Path(f).parent.name) for f, y in zip(ds.files, ds.labels))


def test_imagenet_sketch_labels_are_wnid_positions(tmp_path):
    folder = VARIANTS["imagenet_sketch"][0]
    write_image_folders(tmp_path / folder, imagenet_wnids(), per_class=1, size=2)
    ds = datasets.get_dataset("imagenet_sketch").build_domain(cfg_for(tmp_path, "imagenet_sketch"),
                                                              "ImageNet-Sketch", 0)
    by_wnid = {Path(f).parent.name: y for f, y in zip(ds.files, ds.labels)}
    assert len(ds) == 1000 and by_wnid["n01440764"] == 0 and by_wnid["n15075141"] == 999
    assert by_wnid["n01498041"] == 6 and IMAGENET_CLASSES[6] == "stingray"


def test_end_to_end_source_on_synthetic_imagenet_r(tmp_path):
    write_image_folders(tmp_path / "imagenet-r", IMAGENET_R_WNIDS, per_class=1, size=4)
    cfg = tiny_cfg("conf/imagenet_r/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__NUM_EX=12, TEST__BATCH_SIZE=6)
    payload = evaluate(cfg, progress=False)
    assert payload["domain_label"] == "dataset"
    assert [(r["domain"], r["severity"], r["n"]) for r in payload["records"]] == [("ImageNet-R", 0, 12)]
    # The harness builds the zero-shot head from the data set's 200 names: logits over 200 classes.
    from models import build_zero_shot_clip
    model, _ = build_zero_shot_clip(cfg, datasets.get_dataset("imagenet_r").class_names, ["a photo of a {}."], "cpu")
    assert model(torch.rand(2, 3, model.image_size, model.image_size)).shape == (2, 200)
