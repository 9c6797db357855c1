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


@pytest.fixture(scope="session")
def _tiny_clip_rn_session():
    from models import build_zero_shot_clip
    from datasets.class_names import CIFAR10_CLASSES
    torch.manual_seed(0)
    model, _ = build_zero_shot_clip(tiny_cfg(MODEL__ARCH="tiny-clip-test-rn"), CIFAR10_CLASSES,
                                    ["a photo of a {}."], "cpu")
    # Random weights leave every BatchNorm at mean 0, variance 1 and affine (1, 0): source statistics and affine
    # parameters of their own make a method that mixes them with the batch's (or adapts them) testable.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.clip.visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


@pytest.fixture
def tiny_clip_rn(_tiny_clip_rn_session):
    """A fresh copy of the tiny zero-shot CLIP with a ModifiedResNet image tower (BatchNorm; open_clip's RN50
    family): models/model_configs/tiny-clip-test-rn.json, 10 CIFAR classes, random but fixed weights and
    BatchNorm source statistics."""
    return copy.deepcopy(_tiny_clip_rn_session)
