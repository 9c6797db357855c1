"""The ten CoOp-layout sets (datasets/coop_sets.py) on synthetic copies of CoOp's on-disk layout: labels and class
names against hand-made mappings, each refusal in one line before any model loads, the CoOp / TDA templates, the
stream order, and one run through the harness per set."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import datasets
from datasets import DatasetError
from datasets.class_names import IMAGENET_TEMPLATES
from harness.build import build_plan
from harness.settings import build_tasks
from harness.run import evaluate
from harness.stream import task_stream_order
from tests.synthetic import ALL_LAYOUT_DOMAINS, COOP_SETS, tiny_cfg, write_coop_set

# Per set: (folder under DATA_DIR, image folder inside it, split file or None, number of classes, domain).
LAYOUT = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100, "Caltech101"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", 47, "DTD"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", 10, "EuroSAT"),
    "fgvc_aircraft": ("fgvc_aircraft", "images", None, 100, "FGVCAircraft"),
    "food101": ("food-101", "images", "split_zhou_Food101.json", 101, "Food101"),
    "flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102, "Flowers102"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", 37, "OxfordPets"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", 196, "StanfordCars"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", 397, "SUN397"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101, "UCF101"),
}

# Hand-made: test entries as CoOp's split files write them (image path, label, CoOp's class name), taken from its
# dataset code (renamings, sorted folders, SUN397's reversed path parts) and real split files; for FGVCAircraft
# (image id, label = line of the variant in variants.txt, variant).
HAND = {
    "caltech101": [("Faces/image_0426.jpg", 0, "face"), ("airplanes/image_0001.jpg", 4, "airplane"),
                   ("car_side/image_0007.jpg", 18, "car_side"), ("yin_yang/image_0021.jpg", 99, "yin_yang")],
    "dtd": [("banded/banded_0060.jpg", 0, "banded"), ("polka-dotted/polka-dotted_0101.jpg", 30, "polka-dotted"),
            ("zigzagged/zigzagged_0092.jpg", 46, "zigzagged")],
    "eurosat": [("AnnualCrop/AnnualCrop_1048.jpg", 0, "Annual Crop Land"),
                ("Highway/Highway_12.jpg", 3, "Highway or Road"), ("SeaLake/SeaLake_35.jpg", 9, "Sea or Lake")],
    "fgvc_aircraft": [("1514522", 0, "707-320"), ("0056978", 73, "F/A-18"), ("0061418", 37, "BAE 146-200"),
                      ("1234567", 99, "Yak-42")],
    "food101": [("apple_pie/1005649.jpg", 0, "apple_pie"), ("cheese_plate/1000.jpg", 16, "cheese_plate"),
                ("cheesecake/2000.jpg", 17, "cheesecake"), ("waffles/1001.jpg", 100, "waffles")],
    "flowers102": [("image_00172.jpg", 76, "passion flower"), ("image_06734.jpg", 0, "pink primrose"),
                   ("image_08014.jpg", 101, "blackberry lily")],
    "oxford_pets": [("Abyssinian_201.jpg", 0, "abyssinian"),
                    ("american_pit_bull_terrier_10.jpg", 2, "american_pit_bull_terrier"),
                    ("yorkshire_terrier_9.jpg", 36, "yorkshire_terrier")],
    "stanford_cars": [("cars_test/00001.jpg", 180, "2007 Suzuki Aerio Sedan"),
                      ("cars_test/00002.jpg", 0, "2000 AM General Hummer SUV"),
                      ("cars_test/08041.jpg", 31, "2007 BMW X5 SUV")],
    "sun397": [("a/abbey/sun_aaa.jpg", 0, "abbey"),
               ("a/apartment_building/outdoor/sun_b.jpg", 8, "outdoor apartment_building"),
               ("t/theater/indoor_procenium/sun_c.jpg", 351, "indoor_procenium theater"),
               ("y/youth_hostel/sun_d.jpg", 396, "youth_hostel")],
    "ucf101": [("Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg", 0, "Apply_Eye_Makeup"),
               ("Playing_Daf/v_PlayingDaf_g01_c01.jpg", 59, "Playing_Daf"), ("Yo_Yo/v_YoYo_g07_c04.jpg", 100, "Yo_Yo")],
}
# The prompt name of the HAND entries (CoOp's zero-shot CLIP and TDA read "_" as a space).
PROMPT_NAMES = {"caltech101": ["face", "airplane", "car side", "yin yang"],
                "oxford_pets": ["abyssinian", "american pit bull terrier", "yorkshire terrier"],
                "sun397": ["abbey", "outdoor apartment building", "indoor procenium theater", "youth hostel"],
                "ucf101": ["Apply Eye Makeup", "Playing Daf", "Yo Yo"],
                "fgvc_aircraft": ["707-320", "F/A-18", "BAE 146-200", "Yak-42"],
                "eurosat": ["Annual Crop Land", "Highway or Road", "Sea or Lake"]}
# CoOp trainers/zsclip.py CUSTOM_TEMPLATES; TDA datasets/<set>.py `template`.
SELECTED = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
            "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
TEMPLATES = {  # set: (coop, tda)
    "caltech101": (["a photo of a {}."], SELECTED),
    "dtd": (["{} texture."], ["{} texture."]),
    "eurosat": (["a centered satellite photo of {}."], ["a centered satellite photo of {}."]),
    "fgvc_aircraft": (["a photo of a {}, a type of aircraft."], ["a photo of a {}, a type of aircraft."]),
    "food101": (["a photo of {}, a type of food."], ["a photo of {}, a type of food."]),
    "flowers102": (["a photo of a {}, a type of flower."], ["a photo of a {}, a type of flower."]),
    "oxford_pets": (["a photo of a {}, a type of pet."], ["a photo of a {}, a type of pet."]),
    "stanford_cars": (["a photo of a {}."], SELECTED),
    "sun397": (["a photo of a {}."], SELECTED),
    "ucf101": (["a photo of a person doing {}."], ["a photo of a person doing {}."]),
}


def cfg_for(data_dir, name, **overrides):
    return tiny_cfg(f"conf/{name}/source.yaml", DATA_DIR=str(data_dir), **overrides)


def image(path: Path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, "JPEG")


def write_hand(data_dir: Path, name: str) -> Path:
    """The HAND entries of one set, written by hand: images, and the split file (or FGVC's two lists)."""
    folder, image_folder, split_file, _, _ = LAYOUT[name]
    base = data_dir / folder
    for k, (relative, _, _) in enumerate(HAND[name]):
        image(base / "images" / f"{relative}.jpg" if split_file is None else base / image_folder / relative, k)
    if split_file is None:
        (base / "variants.txt").write_text("\n".join(datasets.get_dataset(name).coop_names) + "\n")
        (base / "images_variant_test.txt").write_text("".join(f"{i} {v}\n" for i, _, v in HAND[name]))
    else:
        entries = [list(e) for e in HAND[name]]
        (base / split_file).write_text(json.dumps({"train": entries[:1], "val": entries[1:2], "test": entries}))
    return base


def test_registered_single_domain_sets_and_protocols():
    for name, (_, _, _, n_classes, domain) in LAYOUT.items():
        ds = datasets.get_dataset(name)
        assert list(ds.domains) == [domain] == ALL_LAYOUT_DOMAINS[name]
        assert ds.has_severities is False and ds.domain_label == "dataset"
        assert len(ds.coop_names) == len(set(ds.coop_names)) == len(ds.class_names) == n_classes
        assert list(ds.ensemble_templates) == IMAGENET_TEMPLATES and len(IMAGENET_TEMPLATES) == 80
        cfg = tiny_cfg(f"conf/{name}/source.yaml")
        assert list(cfg.CORRUPTION.TYPE) == [domain] and list(cfg.CORRUPTION.SEVERITY) == [0]
        assert cfg.CORRUPTION.DATASET == name and cfg.MODEL.ADAPTATION == "source"
        assert cfg.CLIP.PROMPT_MODE == "coop" and cfg.TEST.BATCH_SIZE == 64 and cfg.SETTING == "reset_each_shift"
        protocol = yaml.safe_load(Path(f"conf/datasets/{name}.yaml").read_text())   # tiny_cfg replaces the model
        assert protocol["MODEL"] == {"ARCH": "ViT-B-16", "WEIGHTS": "openai"}
    assert sorted(LAYOUT) == sorted(COOP_SETS)


@pytest.mark.parametrize("name", COOP_SETS)
def test_class_names_against_a_hand_made_mapping(name):
    ds = datasets.get_dataset(name)
    for k, (_, label, coop_name) in enumerate(HAND[name]):
        assert ds.coop_names[label] == coop_name
        assert ds.class_names[label] == PROMPT_NAMES.get(name, [c.replace("_", " ") for _, _, c in HAND[name]])[k]
    assert all("_" not in c for c in ds.class_names)


def test_renamed_and_ordered_class_names():
    # EuroSAT: CoOp's NEW_CNAMES, in the order of the sorted folder names.
    assert datasets.get_dataset("eurosat").class_names == [
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
        "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
    # Caltech101: sorted folder names, capitals first, BACKGROUND_Google and Faces_easy left out, 4 renamed.
    assert datasets.get_dataset("caltech101").class_names[:6] == [
        "face", "leopard", "motorbike", "accordion", "airplane", "anchor"]
    # Food101: Python's sort of the folder names puts "cheese_plate" before "cheesecake" ('_' < 'c').
    food = datasets.get_dataset("food101").coop_names
    assert list(food) == sorted(food) and food[16:18] == ("cheese_plate", "cheesecake")
    # SUN397: ClassName.txt order (the sorted paths) with CoOp's reversed parts.
    sun = datasets.get_dataset("sun397").coop_names
    paths = ["/".join(name.split(" ")[::-1]) for name in sun]
    assert paths == sorted(paths) and sun[9] == "indoor apse"
    # Flowers102: cat_to_name.json by label 1..102.
    assert datasets.get_dataset("flowers102").class_names[:3] == ["pink primrose", "hard-leaved pocket orchid",
                                                                   "canterbury bells"]


@pytest.mark.parametrize("name", COOP_SETS)
def test_hand_written_split_reads_with_its_labels(tmp_path, name):
    base = write_hand(tmp_path, name)
    folder, image_folder, split_file, _, domain = LAYOUT[name]
    ds = datasets.get_dataset(name).build_domain(cfg_for(tmp_path, name), domain, 0)
    if split_file is None:
        expected = [base / "images" / f"{i}.jpg" for i, _, _ in HAND[name]]
    else:
        expected = [base / image_folder / relative for relative, _, _ in HAND[name]]
    assert [Path(f) for f in ds.files] == expected       # the list's order, not sorted
    assert ds.labels == [label for _, label, _ in HAND[name]]
    picture, label = ds[1]
    assert isinstance(picture, Image.Image) and label == HAND[name][1][1]
    lists = [base / "variants.txt", base / "images_variant_test.txt"] if split_file is None else [base / split_file]
    assert ds.source_files() == lists + expected        # the list that sets the labels is part of the identity


@pytest.mark.parametrize("name", COOP_SETS)
def test_synthetic_copy_of_every_class_reads_back(tmp_path, name):
    base = write_coop_set(tmp_path, name, per_class=1, seed=3, size=4)
    ds = datasets.get_dataset(name).build_domain(cfg_for(tmp_path, name), LAYOUT[name][4], 0)
    assert sorted(ds.labels) == list(range(LAYOUT[name][3]))
    folder, image_folder, split_file, _, _ = LAYOUT[name]
    if split_file is None:        # FGVC: label = line of the variant in variants.txt, read here independently
        variants = (base / "variants.txt").read_text().splitlines()
        lines = [line.split(" ", 1) for line in (base / "images_variant_test.txt").read_text().splitlines()]
        assert [(str(f), y) for f, y in zip(ds.files, ds.labels)] == [
            (str(base / "images" / f"{i}.jpg"), variants.index(v)) for i, v in lines]
    else:
        test = json.loads((base / split_file).read_text())["test"]
        assert [(str(f), y) for f, y in zip(ds.files, ds.labels)] == [
            (str(base / image_folder / p), y) for p, y, _ in test]
        assert ds.labels != sorted(ds.labels)           # the writer's order is shuffled: the file's order is kept


def _refusal(tmp_path, name) -> str:
    cfg = tiny_cfg(f"conf/{name}/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"))
    with pytest.raises(DatasetError) as err:
        evaluate(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def no_model_loading(monkeypatch):
    import harness.run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(harness.run, "build_zero_shot_clip", refuse)


@pytest.mark.parametrize("name", COOP_SETS)
def test_each_refusal_is_one_line_at_plan_time(tmp_path, name, no_model_loading):
    folder, image_folder, split_file, _, _ = LAYOUT[name]
    base = tmp_path / folder
    # Missing folder.
    assert f"{base} does not exist" in _refusal(tmp_path, name)
    write_hand(tmp_path, name)
    list_file = base / (split_file or "images_variant_test.txt")
    good = list_file.read_text()
    # Missing split file (FGVC: its test list, then variants.txt).
    list_file.unlink()
    assert f"{list_file} does not exist" in _refusal(tmp_path, name)
    list_file.write_text(good)
    if split_file is None:
        variants = (base / "variants.txt").read_text()
        (base / "variants.txt").unlink()
        assert f"{base / 'variants.txt'} does not exist" in _refusal(tmp_path, name)
        (base / "variants.txt").write_text(variants)
        # A variant that is not in variants.txt (FGVC's malformed list).
        list_file.write_text(good + "7654321 Boeing 999\n")
        assert f"{list_file} line 5 '7654321 Boeing 999' does not end in a variant" in _refusal(tmp_path, name)
        list_file.write_text(good)
        # Class-name mismatch: another variants.txt.
        (base / "variants.txt").write_text(variants.replace("F/A-18\n", "F-18\n"))
        assert f"{base / 'variants.txt'} names label 73 'F-18', FGVC-Aircraft's variants.txt names it 'F/A-18'" \
            in _refusal(tmp_path, name)
        (base / "variants.txt").write_text(variants)
    else:
        # Malformed: not JSON, no test list, a test entry of the wrong shape.
        list_file.write_text(good[:-5])
        assert f"split file {list_file} is not valid JSON" in _refusal(tmp_path, name)
        list_file.write_text(json.dumps({"train": [], "val": []}))
        assert f"split file {list_file} has no non-empty \"test\" list" in _refusal(tmp_path, name)
        list_file.write_text(json.dumps({"test": [["a.jpg", "3", "x"]]}))
        assert "test entry 0 is ['a.jpg', '3', 'x']" in _refusal(tmp_path, name)
        list_file.write_text(json.dumps({"test": [["a.jpg", LAYOUT[name][3], "x"]]}))
        assert f"test entry 0 has label {LAYOUT[name][3]}" in _refusal(tmp_path, name)
        # Class-name mismatch: the first differing label is named.
        entries = [list(e) for e in HAND[name]]
        entries[2][2], entries[1][2] = "renamed two", "renamed one"
        list_file.write_text(json.dumps({"test": entries}))
        assert (f"split file {list_file} names label {min(entries[1][1], entries[2][1])} 'renamed "
                in _refusal(tmp_path, name))
        list_file.write_text(good)
    # An image listed but absent.
    relative = HAND[name][1][0]
    gone = base / "images" / f"{relative}.jpg" if split_file is None else base / image_folder / relative
    gone.unlink()
    message = _refusal(tmp_path, name)
    assert f"1 of the {len(HAND[name])} test images listed in {list_file} do not exist, e.g. {gone}" in message
    image(gone)     # intact again: it reads
    assert len(datasets.get_dataset(name).build_domain(cfg_for(tmp_path, name), LAYOUT[name][4], 0)) == len(HAND[name])


@pytest.mark.parametrize("name", COOP_SETS)
def test_an_image_listed_twice_or_a_key_given_twice_is_refused(tmp_path, name, no_model_loading):
    """Each test image once: a repeated entry would count twice, one under two labels is wrong under one of them;
    a JSON split with a key given twice would keep the last one silently."""
    folder, image_folder, split_file, _, _ = LAYOUT[name]
    base = write_hand(tmp_path, name)
    list_file = base / (split_file or "images_variant_test.txt")
    entries = [list(e) for e in HAND[name]]
    if split_file is None:
        lines = [f"{i} {v}" for i, _, v in HAND[name]]
        list_file.write_text("\n".join(lines + [lines[1]]) + "\n")
        repeated = base / "images" / f"{HAND[name][1][0]}.jpg"
        assert f"{list_file} lists {repeated} twice (line 2 and line 5)" in _refusal(tmp_path, name)
        list_file.write_text("\n".join(lines + ["", f"{HAND[name][1][0]} {HAND[name][0][2]}"]) + "\n")
        assert (f"{list_file} lists {repeated} under two labels, {HAND[name][1][1]} (line 2) and "
                f"{HAND[name][0][1]} (line 6)") in _refusal(tmp_path, name)
    else:
        repeated = base / image_folder / entries[1][0]
        list_file.write_text(json.dumps({"test": entries + [entries[1]]}))
        assert f"{list_file} lists {repeated} twice (test entry 1 and test entry {len(entries)})" in \
            _refusal(tmp_path, name)
        other = [entries[1][0], entries[0][1], entries[0][2]]
        list_file.write_text(json.dumps({"test": entries + [other]}))
        assert (f"{list_file} lists {repeated} under two labels, {entries[1][1]} (test entry 1) and "
                f"{entries[0][1]} (test entry {len(entries)})") in _refusal(tmp_path, name)
        list_file.write_text('{"test": %s, "test": %s}' % (json.dumps(entries[:1]), json.dumps(entries)))
        assert f"split file {list_file} gives the key 'test' twice" in _refusal(tmp_path, name)


def test_severity_and_domain_are_checked(tmp_path):
    write_hand(tmp_path, "dtd")
    dtd = datasets.get_dataset("dtd")
    with pytest.raises(DatasetError, match=r"dtd has no severities.*got 3"):
        dtd.build_domain(cfg_for(tmp_path, "dtd"), "DTD", 3)
    with pytest.raises(DatasetError, match=r"'Textures' is not a domain of dtd"):
        dtd.build_domain(cfg_for(tmp_path, "dtd"), "Textures", 0)


@pytest.mark.parametrize("name", COOP_SETS)
def test_prompt_modes_give_coop_and_tda_templates(tmp_path, name):
    write_hand(tmp_path, name)
    coop, tda = TEMPLATES[name]
    for mode, expected in (("coop", coop), ("tda", tda), ("ensemble", IMAGENET_TEMPLATES),
                           ("custom", ["a photo of a {}."])):
        plan = build_plan(cfg_for(tmp_path, name, CLIP__PROMPT_MODE=mode))
        assert plan.templates == expected, mode


def test_stream_order_and_subsets_follow_the_file_order(tmp_path):
    base = write_coop_set(tmp_path, "ucf101", per_class=1, seed=5, size=4)
    listed = [str(base / "UCF-101-midframes" / p) for p, _, _ in
              json.loads((base / "split_zhou_UCF101.json").read_text())["test"]]
    ucf = datasets.get_dataset("ucf101")

    def files(**overrides):
        return [str(f) for f in ucf.build_domain(cfg_for(tmp_path, "ucf101", **overrides), "UCF101", 0).files]
    assert files() == listed
    assert files(CORRUPTION__NUM_EX=7, CORRUPTION__SUBSET="first_n") == listed[:7]
    # SUBSET authors: the BATCLIP authors' rule on the file's list, written out here.
    rng = random.Random(1)
    shuffled = list(listed)
    rng.shuffle(shuffled)
    assert files(CORRUPTION__NUM_EX=7, CORRUPTION__SUBSET="authors") == rng.sample(shuffled, 7)
    # STREAM_ORDER authors over the whole set: random.shuffle of the file's order seeded with RNG_SEED.
    cfg = cfg_for(tmp_path, "ucf101", TEST__STREAM_ORDER="authors")
    task = build_tasks(cfg, ucf)[0]
    part = ucf.build_domain(cfg, "UCF101", 0)
    order = task_stream_order(cfg, task, 0, [part])
    expected = list(range(len(listed)))
    random.Random(1).shuffle(expected)
    assert order.tolist() == expected


@pytest.mark.parametrize("name", COOP_SETS)
def test_end_to_end_source_run(tmp_path, name):
    write_coop_set(tmp_path, name, per_class=1, labels=[0, 1, 2, 3, 4, 5, 6][:LAYOUT[name][3]], seed=1, size=8)
    cfg = tiny_cfg(f"conf/{name}/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   TEST__BATCH_SIZE=3)
    payload = evaluate(cfg, progress=False)
    assert payload["dataset"] == name and payload["domain_label"] == "dataset"
    assert [(r["domain"], r["severity"], r["n"]) for r in payload["records"]] == [(LAYOUT[name][4], 0, 7)]
    assert payload["provenance"]["data"]["test_list"].startswith(LAYOUT[name][0] + "/")
