import copy

import pytest
import torch

from tests.synthetic import tiny_cfg


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """The tests' tiny CLIP runs far faster on one thread than with threads contending for a small CPU (and one
    thread keeps CPU results bit-reproducible across machines with different core counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _tiny_clip_session():
    from models import build_zero_shot_clip
    from datasets.class_names import CIFAR10_CLASSES
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model, _ = build_zero_shot_clip(cfg, CIFAR10_CLASSES, ["a photo of a {}."], "cpu")
    return model


@pytest.fixture
def tiny_clip(_tiny_clip_session):
    """A fresh copy of the tiny zero-shot CLIP (10 CIFAR classes, random but fixed weights)."""
    return copy.deepcopy(_tiny_clip_session)
