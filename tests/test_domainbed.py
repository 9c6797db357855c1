"""Domain-generalisation data sets (OfficeHome, PACS, VLCS, TerraIncognita) on synthetic copies of the DomainBed
layout DATA_DIR/<folder>/<domain>/<class>/<image>, written with PIL."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from conf import ConfigError
from datasets.transforms import clip_image_transform
from harness.run import evaluate
from harness.stream import SegmentStream, stream_order
from tests.synthetic import Transformed, tiny_cfg, write_image_folders

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def write_pacs(data_dir: Path, per_class=2, domains=PACS_DOMAINS) -> Path:
    for i, domain in enumerate(domains):
        write_image_folders(data_dir / "PACS" / domain, PACS_CLASSES, per_class, seed=i)
    return data_dir / "PACS"


def cfg_for(data_dir, dataset="pacs", **overrides):
    return tiny_cfg(f"conf/{dataset}/source.yaml", DATA_DIR=str(data_dir), **overrides)


def identity(image):
    return image


def test_registered_with_paper_domains_and_readable_class_names():
    expected_domains = {
        "office_home": ["Art", "Clipart", "Product", "Real World"],
        "pacs": ["art_painting", "cartoon", "photo", "sketch"],
        "vlcs": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
        "terra_incognita": ["location_38", "location_43", "location_46", "location_100"],
    }
    for name, domains in expected_domains.items():
        ds = datasets.get_dataset(name)
        assert list(ds.domains) == domains
        assert ds.has_severities is False and ds.domain_label == "domain"
        assert len(ds.ensemble_templates) == 80
    assert datasets.get_dataset("pacs").class_names == PACS_CLASSES
    assert datasets.get_dataset("vlcs").class_names == ["bird", "car", "chair", "dog", "person"]
    assert datasets.get_dataset("terra_incognita").class_names == [
        "bird", "bobcat", "cat", "coyote", "dog", "empty scene", "opossum", "rabbit", "raccoon", "squirrel"]
    office = datasets.get_dataset("office_home")
    assert len(office.class_names) == len(set(office.class_names)) == 65
    # Sorted folder names, case-sensitive like DomainBed's ImageFolder: "TV" comes before "Table".
    assert office.class_folders[:3] == ("Alarm_Clock", "Backpack", "Batteries")
    assert office.class_folders[58:60] == ("TV", "Table")
    names = dict(zip(office.class_folders, office.class_names))
    assert names["Alarm_Clock"] == "alarm clock" and names["Trash_Can"] == "trash can"
    assert names["TV"] == "TV" and names["Postit_Notes"] == "post-it notes" and names["Mouse"] == "computer mouse"
    assert all("_" not in n for n in office.class_names)


def test_yaml_domain_lists_are_the_paper_order():
    for name in ("office_home", "pacs", "vlcs", "terra_incognita"):
        for method in ("source", "tent", "batclip"):
            cfg = tiny_cfg(f"conf/{name}/{method}.yaml")
            assert list(cfg.CORRUPTION.TYPE) == list(datasets.get_dataset(name).domains)
            assert list(cfg.CORRUPTION.SEVERITY) == [0] and cfg.CORRUPTION.DATASET == name
            assert cfg.MODEL.ADAPTATION == method and cfg.TEST.BATCH_SIZE == 64


def test_labels_follow_sorted_class_folders_in_every_domain(tmp_path):
    write_pacs(tmp_path, per_class=3)
    # Clutter that is not an image or is hidden must be ignored.
    (tmp_path / "PACS" / "photo" / "dog" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "PACS" / "photo" / "dog" / "notes.txt").write_text("x")
    (tmp_path / "PACS" / "photo" / ".hidden_folder").mkdir()
    pacs = datasets.get_dataset("pacs")
    cfg = cfg_for(tmp_path)
    for domain in PACS_DOMAINS:
        ds = pacs.build_domain(cfg, domain, 0)
        assert len(ds) == 3 * len(PACS_CLASSES)
        for path, label in zip(ds.files, ds.labels):
            assert Path(path).parent.parent.name == domain
            assert label == sorted(PACS_CLASSES).index(Path(path).parent.name)
        image, label = ds[0]
        assert isinstance(image, Image.Image) and label == 0


def test_class_order_is_sorted_whatever_the_declaration_order(tmp_path):
    from datasets.domainbed import DomainBedDataset

    class Toy(DomainBedDataset):   # not registered
        name, folder, domains = "toy", "toy", ["one", "two"]
        class_folders = ("zebra", "Mouse_Deer", "ant")
        class_name_overrides = {"ant": "ant colony"}

    toy = Toy()
    assert toy.class_folders == ("Mouse_Deer", "ant", "zebra")
    assert toy.class_names == ["mouse deer", "ant colony", "zebra"]
    for i, domain in enumerate(toy.domains):
        write_image_folders(tmp_path / "toy" / domain, ["ant", "zebra", "Mouse_Deer"], per_class=2, seed=i)
        ds = toy.build_domain(cfg_for(tmp_path), domain, 0)
        assert [(Path(f).parent.name, y) for f, y in zip(ds.files, ds.labels)] == [
            ("Mouse_Deer", 0), ("Mouse_Deer", 0), ("ant", 1), ("ant", 1), ("zebra", 2), ("zebra", 2)]


def test_real_world_folder_alias(tmp_path):
    office = datasets.get_dataset("office_home")
    write_image_folders(tmp_path / "office_home" / "Real_World", office.class_folders, per_class=1)
    ds = office.build_domain(cfg_for(tmp_path, "office_home"), "Real World", 0)
    assert len(ds) == 65 and sorted(set(ds.labels)) == list(range(65))


def test_missing_class_folder_is_named(tmp_path):
    root = write_pacs(tmp_path, domains=["photo"])
    for f in (root / "photo" / "giraffe").iterdir():
        f.unlink()
    (root / "photo" / "giraffe").rmdir()
    with pytest.raises(datasets.DatasetError, match=r"missing.*photo/giraffe"):
        datasets.get_dataset("pacs").build_domain(cfg_for(tmp_path), "photo", 0)


def test_empty_class_folder_is_named(tmp_path):
    root = write_pacs(tmp_path, domains=["sketch"])
    for f in (root / "sketch" / "horse").iterdir():
        f.unlink()
    (root / "sketch" / "horse" / "readme.txt").write_text("not an image")
    with pytest.raises(datasets.DatasetError, match=r"sketch/horse holds no images"):
        datasets.get_dataset("pacs").build_domain(cfg_for(tmp_path), "sketch", 0)


def test_unexpected_class_folder_is_named(tmp_path):
    root = write_pacs(tmp_path, domains=["cartoon"])
    write_image_folders(root / "cartoon", ["unicorn"], per_class=1)
    with pytest.raises(datasets.DatasetError, match=r"not classes.*unicorn"):
        datasets.get_dataset("pacs").build_domain(cfg_for(tmp_path), "cartoon", 0)


def test_missing_domain_and_data_dir_are_named(tmp_path):
    pacs = datasets.get_dataset("pacs")
    with pytest.raises(datasets.DatasetError, match=r"PACS does not exist.*DomainBed layout"):
        pacs.build_domain(cfg_for(tmp_path), "photo", 0)
    write_pacs(tmp_path, domains=["photo"])
    with pytest.raises(datasets.DatasetError, match=r"PACS/cartoon does not exist"):
        pacs.build_domain(cfg_for(tmp_path), "cartoon", 0)


def test_unreadable_image_names_the_file(tmp_path):
    root = write_pacs(tmp_path, domains=["photo"], per_class=1)
    broken = root / "photo" / "dog" / "img_000.png"
    broken.write_bytes(b"this is not a png")
    ds = datasets.get_dataset("pacs").build_domain(cfg_for(tmp_path), "photo", 0)
    index = [Path(f) for f in ds.files].index(broken)
    with pytest.raises(datasets.DatasetError, match=r"Cannot read image .*photo/dog/img_000.png"):
        ds[index]
    ds[(index + 1) % len(ds)]   # the others still read


def test_unknown_domain_in_corruption_type():
    with pytest.raises(ConfigError, match=r"'photos' is not a domain of pacs.*'photo'"):
        tiny_cfg("conf/pacs/source.yaml", CORRUPTION__TYPE=["photo", "photos"])
    with pytest.raises(datasets.DatasetError, match=r"'Real_World' is not a domain of office_home"):
        datasets.get_dataset("office_home").build_domain(tiny_cfg("conf/office_home/source.yaml"), "Real_World", 0)


def test_severity_other_than_zero_is_refused(tmp_path):
    write_pacs(tmp_path, domains=["photo"])
    with pytest.raises(datasets.DatasetError, match=r"pacs has no severities.*got 5"):
        datasets.get_dataset("pacs").build_domain(cfg_for(tmp_path), "photo", 5)


def test_num_ex_takes_a_fixed_subset(tmp_path):
    write_pacs(tmp_path, domains=["photo"], per_class=4)
    pacs = datasets.get_dataset("pacs")
    full = pacs.build_domain(cfg_for(tmp_path), "photo", 0)
    a = pacs.build_domain(cfg_for(tmp_path, CORRUPTION__NUM_EX=9), "photo", 0)
    b = pacs.build_domain(cfg_for(tmp_path, CORRUPTION__NUM_EX=9), "photo", 0)
    assert len(a) == 9 and a.files == b.files and a.labels == b.labels
    pairs = list(zip(full.files, full.labels))
    assert all(p in pairs for p in zip(a.files, a.labels))
    assert len(set(a.labels)) > 1          # not simply the first class folder
    with pytest.raises(datasets.DatasetError, match=r"NUM_EX 29 requested but it holds only 28"):
        pacs.build_domain(cfg_for(tmp_path, CORRUPTION__NUM_EX=29), "photo", 0)


def _stream_files(cfg, domain):
    part = datasets.get_dataset("pacs").build_domain(cfg, domain, 0)
    stream = SegmentStream([part], stream_order([len(part)], "sequential", cfg.RNG_SEED), identity)
    return [part.files[stream.locate(i)[1]] for i in range(len(stream))]


def test_every_method_sees_the_same_order(tmp_path):
    write_pacs(tmp_path, domains=["art_painting"], per_class=3)
    orders = [_stream_files(tiny_cfg(f"conf/pacs/{m}.yaml", DATA_DIR=str(tmp_path)), "art_painting")
              for m in ("source", "tent", "batclip")]
    assert orders[0] == orders[1] == orders[2]
    # Independently: the harness's seeded permutation of the sorted listing, not the listing itself.
    listing = sorted((tmp_path / "PACS" / "art_painting").glob("*/*.png"))
    perm = np.random.default_rng([1, 0x5EED]).permutation(len(listing))
    assert [Path(f) for f in orders[0]] == [listing[k] for k in perm]
    assert orders[0] != listing
    other_seed = _stream_files(tiny_cfg("conf/pacs/source.yaml", DATA_DIR=str(tmp_path), RNG_SEED=2), "art_painting")
    assert other_seed != orders[0] and sorted(other_seed) == sorted(orders[0])


def _to_8bit_rgb(array16: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(array16.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def test_every_image_mode_and_size_goes_through_clip_preprocessing(tmp_path):
    size = 24
    rng = np.random.default_rng(3)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    cases = {   # class folder -> image (mode, odd sizes, wide and tall)
        "dog": Image.fromarray(rng.integers(0, 256, (13, 7), dtype=np.uint8)),                 # L
        "elephant": Image.fromarray(rng.integers(0, 256, (9, 31, 4), dtype=np.uint8)),         # RGBA
        "giraffe": Image.fromarray(rgb(40, 17)).convert("P", palette=Image.Palette.ADAPTIVE),  # P
        "guitar": Image.fromarray(rng.integers(0, 65536, (11, 15), dtype=np.uint16)),          # I;16
        "horse": Image.fromarray(rgb(3, 50)).convert("LA"),                                     # LA
        "house": Image.fromarray(rgb(60, 45)).convert("CMYK"),                                  # CMYK (as JPEG)
        "person": Image.fromarray(rgb(1, 1)),                                                   # RGB, 1 x 1
    }
    assert [im.mode for im in cases.values()] == ["L", "RGBA", "P", "I;16", "LA", "CMYK", "RGB"]
    root = tmp_path / "PACS" / "photo"
    for name, image in cases.items():
        (root / name).mkdir(parents=True)
        image.save(root / name / ("x.jpg" if image.mode == "CMYK" else "x.png"))
    transform = clip_image_transform(size, "bicubic")
    ds = Transformed(datasets.get_dataset("pacs").build_domain(cfg_for(tmp_path), "photo", 0), transform)
    for i, path in enumerate(ds.part.files):
        tensor, label = ds[i]
        assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
        assert 0.0 <= tensor.min() and tensor.max() <= 1.0
        with Image.open(path) as raw:
            raw.load()
            if raw.mode == "I;16":
                rgb_first = _to_8bit_rgb(np.asarray(raw))
                assert tensor.mean() < 0.9   # scaled, not saturated to white by Pillow's I;16 -> RGB clip
            else:
                rgb_first = raw.convert("RGB")
        assert torch.equal(tensor, transform(rgb_first)), f"{path} ({raw.mode})"


def test_end_to_end_source_on_synthetic_pacs(tmp_path):
    write_pacs(tmp_path, per_class=2)
    cfg = tiny_cfg("conf/pacs/source.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["sketch", "photo"], CORRUPTION__SEVERITY=[3, 5], TEST__BATCH_SIZE=5)
    payload = evaluate(cfg, progress=False)   # severities are ignored: each domain once, severity 0
    assert payload["dataset"] == "pacs" and payload["domain_label"] == "domain"
    assert [r["domain"] for r in payload["records"]] == ["sketch", "photo"]
    assert all(r["n"] == 14 and r["severity"] == 0 for r in payload["records"])
    run_dir = next((tmp_path / "out" / "pacs" / "source").iterdir())
    assert json.loads((run_dir / "results.json").read_text())["records"] == payload["records"]
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["domain"] for r in rows] == ["sketch", "photo", "mean"]


@pytest.mark.parametrize("method", ["tent", "batclip"])
def test_adapting_methods_run_on_synthetic_pacs(tmp_path, method):
    write_pacs(tmp_path, per_class=1, domains=["cartoon"])
    cfg = tiny_cfg(f"conf/pacs/{method}.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["cartoon"], TEST__BATCH_SIZE=4)
    payload = evaluate(cfg, progress=False)
    assert [(r["domain"], r["severity"], r["n"]) for r in payload["records"]] == [("cartoon", 0, 7)]
    assert payload["method"] == method and payload["provenance"]["adapted_parameters"] > 0
