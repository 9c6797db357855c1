"""The corruption generator (datasets/corruptions.py, scripts/make_corrupted.py): every corruption on small
images, determinism from the seed, the exact RobustBench layout, and clear errors."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("imagecorruptions")
from imagecorruptions import corrupt  # noqa: E402

from datasets.corruptions import CORRUPTIONS as CORRUPTIONS_15  # noqa: E402
from datasets.corruptions import (ALL_CORRUPTIONS, CorruptionError, corrupt_images, corruption_seed,  # noqa: E402
                                  load_image_folder, write_corrupted)

REPO = Path(__file__).resolve().parent.parent


def _images(n=3, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content (a gradient plus a block) so that blurs visibly change it
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1).astype(np.uint8)
    out = np.repeat(base[None], n, 0)
    for i in range(n):
        y, x = rng.integers(4, h // 2, 2)
        out[i, y:y + 10, x:x + 10] = rng.integers(0, 256, 3)
    return out


@pytest.mark.parametrize("shape", [(32, 32), (32, 40)])
def test_every_corruption_runs_on_small_images_and_keeps_shape(shape):
    images = _images(1, *shape)
    for name in ALL_CORRUPTIONS:
        for severity in (1, 5):
            out = corrupt_images(images, name, severity, seed=0)
            assert out.dtype == np.uint8 and out.shape == images.shape, (name, severity)
            if name not in ("saturate", "zoom_blur"):   # both can be no-ops on some pixel values
                assert not np.array_equal(out, images), f"{name} s{severity} left the image unchanged"


def test_severity_blocks_match_the_library_and_the_seed_contract():
    images = _images(4)
    # deterministic corruptions: exactly the library's output, severity by severity
    for name in ("contrast", "brightness", "pixelate"):
        for s in range(1, 6):
            expected = np.stack([corrupt(img, severity=s, corruption_name=name) for img in images])
            np.testing.assert_array_equal(corrupt_images(images, name, s, seed=3), expected)
    # random ones: numpy's global RNG seeded once per (corruption, severity), images in order
    np.random.seed(corruption_seed(7, "gaussian_noise", 2))
    expected = np.stack([corrupt(img, severity=2, corruption_name="gaussian_noise") for img in images])
    np.testing.assert_array_equal(corrupt_images(images, "gaussian_noise", 2, seed=7), expected)
    # glass_blur / impulse_noise get an explicit per-image seed drawn from that RNG
    np.random.seed(corruption_seed(7, "glass_blur", 5))
    expected = np.stack([corrupt(img, severity=5, corruption_name="glass_blur", seed=int(np.random.randint(2 ** 31)))
                         for img in images])
    np.testing.assert_array_equal(corrupt_images(images, "glass_blur", 5, seed=7), expected)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
                                  "snow", "frost", "fog", "elastic_transform"])
def test_random_corruptions_are_deterministic_from_the_seed(name):
    images = _images(3)
    state = np.random.get_state()
    a = corrupt_images(images, name, 4, seed=11)
    np.random.seed(999)   # the caller's global RNG must not matter ...
    b = corrupt_images(images, name, 4, seed=11)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, corrupt_images(images, name, 4, seed=12))
    np.random.set_state(state)
    corrupt_images(images, name, 4, seed=11)
    # ... and is restored afterwards
    assert np.random.get_state()[1].tolist() == state[1].tolist()


def test_seeds_differ_per_corruption_and_severity():
    seeds = {corruption_seed(0, c, s) for c in ALL_CORRUPTIONS for s in range(1, 6)}
    assert len(seeds) == len(ALL_CORRUPTIONS) * 5


def test_write_corrupted_layout_is_exact_and_read_by_the_loader(tmp_path):
    import datasets
    from datasets.transforms import clip_image_transform
    from tests.synthetic import Transformed, tiny_cfg
    images = _images(6)
    labels = np.array([0, 1, 2, 9, 3, 0])
    out = write_corrupted(images, labels, tmp_path / "Shapes-C", ["gaussian_noise", "contrast"], seed=5,
                          class_names=["c"] * 10, source="unit test", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["contrast.npy", "gaussian_noise.npy", "labels.npy",
                                                     "meta.json"]
    stored_labels = np.load(out / "labels.npy")
    assert stored_labels.dtype == np.uint8 and stored_labels.tolist() == labels.tolist() * 5
    for name in ("gaussian_noise", "contrast"):
        arr = np.load(out / f"{name}.npy")
        assert arr.dtype == np.uint8 and arr.shape == (30, 32, 32, 3)
        for s in range(1, 6):
            np.testing.assert_array_equal(arr[(s - 1) * 6:s * 6], corrupt_images(images, name, s, seed=5))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["images_per_severity"] == 6 and meta["corruptions"] == ["contrast",
                                                                                                "gaussian_noise"]
    # the suite's CIFAR-C loader (through the registered shapes_c data set) reads severity blocks back
    cfg = tiny_cfg(DATA_DIR=str(tmp_path), CORRUPTION__DATASET="shapes_c", CORRUPTION__TYPE=["contrast"])
    dataset = Transformed(datasets.get_dataset("shapes_c").build_domain(cfg, "contrast", 3), clip_image_transform(32))
    image, label = dataset[4]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, np.load(out / "contrast.npy")[12 + 4],
                               atol=1e-3)
    assert label == 3


def test_output_of_one_corruption_does_not_depend_on_the_others(tmp_path):
    images, labels = _images(3), np.array([0, 1, 2])
    write_corrupted(images, labels, tmp_path / "a", ["gaussian_noise"], seed=1, progress=False)
    write_corrupted(images, labels, tmp_path / "b", ["fog", "gaussian_noise"], seed=1, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "gaussian_noise.npy"),
                                  np.load(tmp_path / "b" / "gaussian_noise.npy"))


def test_worker_processes_give_identical_files(tmp_path):
    images, labels = _images(3), np.array([0, 1, 2])
    write_corrupted(images, labels, tmp_path / "one", ["glass_blur", "fog"], seed=4, progress=False)
    write_corrupted(images, labels, tmp_path / "two", ["glass_blur", "fog"], seed=4, progress=False, workers=2)
    for name in ("glass_blur", "fog", "labels"):
        np.testing.assert_array_equal(np.load(tmp_path / "one" / f"{name}.npy"),
                                      np.load(tmp_path / "two" / f"{name}.npy"))


def test_keep_existing_skips_written_files(tmp_path):
    images, labels = _images(2), np.array([0, 1])
    out = write_corrupted(images, labels, tmp_path / "X-C", ["contrast"], progress=False)
    marker = np.zeros((10, 32, 32, 3), np.uint8)
    np.save(out / "contrast.npy", marker)
    write_corrupted(images, labels, out, ["contrast", "fog"], progress=False, overwrite=False)
    np.testing.assert_array_equal(np.load(out / "contrast.npy"), marker)
    assert np.load(out / "fog.npy").shape == (10, 32, 32, 3)


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(CorruptionError, match="at least 32x32"):
        corrupt_images(np.zeros((1, 16, 16, 3), np.uint8), "fog", 1)
    with pytest.raises(CorruptionError, match="uint8"):
        corrupt_images(np.zeros((1, 32, 32, 3), np.float32), "fog", 1)
    with pytest.raises(CorruptionError, match="gaussian_noise"):
        corrupt_images(_images(1), "gausian_noise", 1)
    with pytest.raises(CorruptionError, match="severity"):
        corrupt_images(_images(1), "fog", 6)
    with pytest.raises(CorruptionError, match=r"labels must be integers of shape \(2,\)"):
        write_corrupted(_images(2), np.array([0, 1, 2]), tmp_path, ["fog"], progress=False)


def test_image_folder_is_read_with_sorted_class_labels(tmp_path):
    rng = np.random.default_rng(0)
    for cls, count in (("zebra", 2), ("ant", 1)):
        (tmp_path / cls).mkdir()
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / cls / f"{k}.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    images, labels, classes = load_image_folder(tmp_path)
    assert classes == ["ant", "zebra"] and labels.tolist() == [0, 1, 1] and images.shape == (3, 40, 48, 3)
    np.testing.assert_array_equal(images[1], np.asarray(Image.open(tmp_path / "zebra" / "0.png")))
    resized, _, _ = load_image_folder(tmp_path, size=32)
    assert resized.shape == (3, 32, 32, 3)
    Image.fromarray(np.zeros((33, 33, 3), np.uint8)).save(tmp_path / "ant" / "odd.png")
    with pytest.raises(CorruptionError, match="pass a size"):
        load_image_folder(tmp_path)
    with pytest.raises(CorruptionError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_cli_writes_the_layout_from_arrays(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import make_corrupted
    images, labels = _images(2), np.array([1, 0])
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    assert make_corrupted.main(["--images", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                                "--out", str(tmp_path / "data"), "--name", "Mine", "--corruptions", "fog",
                                "--no-progress"]) == 0
    assert np.load(tmp_path / "data" / "Mine-C" / "fog.npy").shape == (10, 32, 32, 3)
    assert make_corrupted.main(["--images", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "x.npy"),
                                "--out", str(tmp_path / "data"), "--name", "Bad", "--no-progress"]) == 2
    assert "labels must be integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        make_corrupted.main(["--help"])
    assert exit_info.value.code == 0 and "RobustBench" in capsys.readouterr().out


def test_the_fifteen_are_the_benchmark_corruptions():
    assert ALL_CORRUPTIONS[:15] == CORRUPTIONS_15
