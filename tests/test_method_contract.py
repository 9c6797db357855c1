"""The contract every registered method keeps, checked for every shipped config of every method (as timm tests
every registered model): a method added later with its conf/methods/<name>.yaml is covered without a new test.

For each composition conf/<dataset>/<config>.yaml: the config loads and passes the run plan's method checks; the
method builds on the tiny CLIP with the data set's classes and runs two batches; a predict-then-adapt method
reports for the first batch exactly what the unadapted model predicts; nothing but the method's declared
parameters moves in the model; reset() restores every piece of state, so the first batch replays bit for bit;
and the method reports the precision it computes in (what the results' provenance records)."""
import copy

import pytest
import torch
import torch.nn as nn

import datasets
import methods
from conf import config_names, import_plugins
from harness.build import check_method, load_cfg
from methods.base import PREDICT_BEFORE_UPDATE, PREDICT_THEN_ADAPT, PROTOCOLS
from methods.frames import use_batch_statistics
from models import build_zero_shot_clip
from tests.synthetic import small_run_overrides, tiny_auxiliary_models, tiny_cfg, tiny_source_data

BATCH = 4


def suite_methods() -> dict[str, type]:
    """The methods the suite itself registers (tests register probes of their own)."""
    return {name: cls for name, cls in methods.METHODS.items() if cls.__module__.startswith("methods.")}


def configured_methods() -> set[str]:
    return {methods.METHODS.canonical(load_cfg(f"conf/{name}.yaml").MODEL.ADAPTATION) for name in config_names()}


def test_every_registered_method_is_shipped_with_a_config():
    missing = sorted(set(suite_methods()) - configured_methods())
    assert not missing, f"registered methods without conf/methods/<name>.yaml: {missing}"


@pytest.fixture(scope="module")
def models_by_dataset():
    """One tiny CLIP (fixed random weights) per data set's classes and prompt mode, copied for every test."""
    cache = {}

    def model_for(cfg):
        dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
        templates = dataset.prompt_templates(cfg)
        key = (dataset.name, tuple(templates), cfg.MODEL.ARCH)
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = build_zero_shot_clip(cfg, dataset.class_names, templates, "cpu")[0]
        return copy.deepcopy(cache[key])
    return model_for


def images(seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


def batchnorm_statistics(model: nn.Module) -> set[str]:
    """The state_dict names of the BatchNorm running statistics under ``model``."""
    return {f"{name}.{buffer}" for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for buffer in ("running_mean", "running_var", "num_batches_tracked")}


def unadapted_logits(reference: nn.Module, adapted: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """What ``reference`` (a copy of the model before the method was built) predicts for ``batch`` when it normalises
    as the method's model does: the BatchNorm layers the method set to batch statistics (TENT and the norm frame on
    a ResNet tower, methods.frames.use_batch_statistics) do so in the copy too; every other layer in eval mode."""
    on_batch_statistics = {name for name, m in adapted.named_modules()
                           if isinstance(m, nn.BatchNorm2d) and m.training and not m.track_running_stats}
    for name, m in reference.named_modules():
        if name in on_batch_statistics:
            use_batch_statistics(m)
    with torch.no_grad():
        return reference(batch)


def first_without_steps(cfg, model, size: int = 32) -> torch.Tensor:
    """The first batch's logits of a method whose optimizer steps do nothing: a method that predicts before the
    batch's update reports the same logits as with its steps (nothing of the batch's own update reaches them)."""
    auxiliary = {**tiny_auxiliary_models(cfg, model), **tiny_source_data(cfg, model)}
    torch.manual_seed(cfg.RNG_SEED)
    method = methods.build_method(cfg, model, model.num_classes, **auxiliary)
    method.optimizer.step = lambda *args, **kwargs: None
    method.begin_stream(2 * BATCH)
    return method(images(1, size))


def contract_cfg(name: str, **overrides):
    """The shipped composition ``name`` (<dataset>/<config>) on its tiny CLIP, cut as small_run_overrides cuts it
    (the data-set keys aside: the contract feeds images of its own); ``overrides`` as tiny_cfg takes them."""
    dataset, config = name.split("/")
    cuts = {k: v for k, v in small_run_overrides(dataset, config).items() if not k.startswith("CORRUPTION__")}
    return tiny_cfg(f"conf/{name}.yaml", **{**cuts, **overrides})


@pytest.mark.parametrize("name", config_names())
def test_method_keeps_the_contract(name, models_by_dataset):
    cfg = contract_cfg(name)
    check_method(cfg)
    check_contract(cfg, models_by_dataset)


def check_contract(cfg, models_by_dataset) -> None:
    """The contract of the module docstring for ``cfg``, whose method checks (check_method) passed."""
    cls = methods.METHODS.get(cfg.MODEL.ADAPTATION)
    assert cls.protocol in PROTOCOLS and cls.episode in ("batch", "image")

    model = models_by_dataset(cfg)
    size = model.image_size
    reference = copy.deepcopy(model)
    auxiliary = {**tiny_auxiliary_models(cfg, model), **tiny_source_data(cfg, model)}   # + source data (EATA)
    torch.manual_seed(cfg.RNG_SEED)
    method = methods.build_method(cfg, model, model.num_classes, **auxiliary)
    method.begin_stream(2 * BATCH)                   # as the harness does after every reset
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in method.state_dict().items()}
    optimizer_before = copy.deepcopy(method.optimizer.state_dict()) if method.optimizer else None

    first = method(images(1, size))
    second = method(images(2, size))
    for logits in (first, second):
        assert logits.shape == (BATCH, model.num_classes) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    if cls.protocol == PREDICT_THEN_ADAPT:
        torch.testing.assert_close(first, unadapted_logits(reference, model, images(1, size)), rtol=1e-5, atol=1e-5)
    if cls.protocol in (PREDICT_THEN_ADAPT, PREDICT_BEFORE_UPDATE) and method.optimizer is not None:
        torch.testing.assert_close(first_without_steps(cfg, models_by_dataset(cfg), size), first, rtol=0, atol=0)

    adapted = {f"model.{n}" if not n.startswith(("model.", "prompt_learner.")) else n for n in method.param_names}
    # BatchNorm running statistics are state that a train-mode forward updates (AdaContrast's anchor on a ResNet
    # tower), not parameters; reset must restore them like everything else (method.state_dict() holds the model's).
    moved = {f"model.{k}" for k, v in model.state_dict().items()
             if not torch.equal(v, before[k]) and k not in batchnorm_statistics(model)}
    assert moved <= adapted, f"{sorted(moved - adapted)} changed but are not the method's parameters"

    method.reset()
    for key, value in method.state_dict().items():
        assert torch.equal(value, state_before[key]), f"reset left {key} changed"
    if method.optimizer is not None:
        assert str(method.optimizer.state_dict()) == str(optimizer_before), "reset left the optimizer changed"
    torch.manual_seed(cfg.RNG_SEED)                  # as the harness seeds every task that resets
    method.begin_stream(2 * BATCH)
    torch.testing.assert_close(method(images(1, size)), first, rtol=0, atol=0)      # the stream replays bit for bit
    torch.testing.assert_close(method(images(2, size)), second, rtol=0, atol=0)

    precision = method.precision_info()
    assert precision["weights"] == ["float32"] and precision["autocast"] is None
    assert precision["grad_scaler_init"] is None     # no fp16 autocast, so no scaler, on the CPU


def test_a_subclass_of_a_method_registers_reads_its_parents_keys_and_runs(tmp_path, tiny_clip):
    module = tmp_path / "my_rpl.py"
    module.write_text(
        "from conf import Option\n"
        "from methods.registry import register_method\n"
        "from methods.rpl import RPL\n"
        "@register_method('my_rpl')\n"
        "class MyRPL(RPL):\n"
        "    config_defaults = {'MY_RPL': {'SCALE': Option(2.0, within='(0, inf)')}}\n"
        "    def __init__(self, cfg, model, num_classes):\n"
        "        super().__init__(cfg, model, num_classes)\n"
        "        self.scale = cfg.MY_RPL.SCALE\n"
        "    def loss(self, logits):\n"
        "        return self.scale * super().loss(logits)\n")
    import_plugins([str(module)])
    cfg = tiny_cfg(MODEL__ADAPTATION="my_rpl", RPL__Q=0.5, MY_RPL__SCALE=3.0)
    method = methods.build_method(cfg, tiny_clip, 10)
    assert method.q == 0.5 and method.scale == 3.0 and method.method_name == "my_rpl"
    assert method(images(1)).shape == (BATCH, 10)
    assert cfg.RPL.Q == 0.5                          # the parent's node, declared once, shared
    from conf import ConfigError
    with pytest.raises(ConfigError, match=r"MY_RPL.SCALE = -1.0: expected a number in \(0, inf\)"):
        tiny_cfg(MODEL__ADAPTATION="my_rpl", MY_RPL__SCALE=-1.0)
    with pytest.raises(ConfigError, match=r"RPL.Q = 2.0"):
        tiny_cfg(MODEL__ADAPTATION="my_rpl", RPL__Q=2.0)
