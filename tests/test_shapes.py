"""The synthetic Shapes set (datasets/shapes.py) and its registered -C version."""
import json

import numpy as np
import pytest

import datasets
from datasets.cifar_c import CifarC
from datasets.shapes import SHAPE_CLASSES, SPLIT_SEEDS, balanced_labels, clean_split, generate_shapes, render_shape
from datasets.transforms import clip_image_transform
from tests.synthetic import Transformed, tiny_cfg, write_cifar_c


def test_generation_is_deterministic_from_the_seed():
    a_images, a_labels = generate_shapes(30, seed=4)
    b_images, b_labels = generate_shapes(30, seed=4)
    assert a_images.dtype == np.uint8 and a_images.shape == (30, 32, 32, 3) and a_labels.dtype == np.int64
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    c_images, _ = generate_shapes(30, seed=5)
    assert not np.array_equal(a_images, c_images)


def test_image_depends_only_on_seed_index_and_label():
    images, labels = generate_shapes(12, seed=2)
    for i in (0, 7, 11):
        np.testing.assert_array_equal(images[i], render_shape(int(labels[i]), np.random.default_rng([2, 1, i])))


@pytest.mark.parametrize("n", [50, 53, 7])
def test_classes_are_balanced(n):
    _, labels = generate_shapes(n, seed=0)
    counts = np.bincount(labels, minlength=len(SHAPE_CLASSES))
    assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert set(balanced_labels(1000, 10, np.random.default_rng(0)).tolist()) == set(range(10))


def test_splits_are_disjoint_and_images_are_not_trivial():
    train, _ = clean_split("train", 40)
    test, test_labels = clean_split("test", 40)
    assert SPLIT_SEEDS["train"] != SPLIT_SEEDS["test"]
    flat_train = {img.tobytes() for img in train}
    assert not any(img.tobytes() in flat_train for img in test)
    # every class is drawn: a foreground that differs from the background in every image
    for c in range(len(SHAPE_CLASSES)):
        image = render_shape(c, np.random.default_rng(c))
        assert image.shape == (32, 32, 3) and image.std() > 10
    with pytest.raises(ValueError, match="unknown Shapes split"):
        clean_split("val", 3)
    with pytest.raises(ValueError, match=">= 1"):
        generate_shapes(0, seed=0)


def test_class_names_read_as_prompts():
    assert len(SHAPE_CLASSES) == len(set(SHAPE_CLASSES)) == 10
    assert all(name.isalpha() and name.islower() for name in SHAPE_CLASSES)


def test_shapes_c_is_registered_and_read_by_the_cifar_c_loader(tmp_path):
    dataset = datasets.get_dataset("shapes_c")
    assert isinstance(dataset, CifarC) and dataset.folder == "Shapes-C"
    assert list(dataset.class_names) == SHAPE_CLASSES
    root = write_cifar_c(tmp_path, ["fog"], per_severity=6, folder="Shapes-C", seed=3)
    cfg = tiny_cfg(DATA_DIR=str(tmp_path), CORRUPTION__DATASET="shapes_c", CORRUPTION__TYPE=["fog"],
                   CORRUPTION__NUM_EX=4)
    domain = Transformed(dataset.build_domain(cfg, "fog", 2), clip_image_transform(32))
    assert len(domain) == 4
    image, label = domain[1]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, np.load(root / "fog.npy")[6 + 1], atol=1e-3)
    assert label == int(np.load(root / "labels.npy")[6 + 1])
    assert dataset.describe(cfg) == {}
    (root / "meta.json").write_text(json.dumps({"seed": 0}))
    assert dataset.describe(cfg) == {"generator": {"seed": 0}}
    with pytest.raises(datasets.DatasetError, match="Shapes-C"):
        dataset.build_domain(tiny_cfg(DATA_DIR=str(tmp_path / "nowhere")), "fog", 5)
