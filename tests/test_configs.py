import pytest

from conf import ConfigError, all_config_files
from harness.build import load_cfg
from tests.synthetic import AUTHORS_OURS_YAML, tiny_cfg


@pytest.mark.parametrize("path", all_config_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_loads(path):
    cfg = load_cfg(path)
    assert cfg.CORRUPTION.DATASET == path.parent.name
    assert cfg.MODEL.ADAPTATION  # resolved against the registry by load_cfg


def test_there_are_configs_for_the_three_corruption_benchmarks():
    names = {(p.parent.name, p.stem) for p in all_config_files()}
    assert {("cifar10_c", "source"), ("cifar100_c", "source"), ("imagenet_c", "source")} <= names


def test_authors_yaml_loads_unchanged_and_means_the_same(tmp_path):
    path = tmp_path / "ours.yaml"
    path.write_text(AUTHORS_OURS_YAML)
    cfg = load_cfg(path)
    assert cfg.OPTIM.LR == pytest.approx(1e-3) and cfg.OPTIM.METHOD == "AdamW" and cfg.OPTIM.WD == 0.01
    assert cfg.CORRUPTION.TYPE == ["gaussian_noise", "shot_noise"] and cfg.CORRUPTION.SEVERITY == [5]
    assert cfg.TEST.BATCH_SIZE == 200 and cfg.CLIP.FREEZE_TEXT_ENCODER is False


def test_command_line_overrides_follow_yacs():
    cfg = load_cfg("conf/cifar10_c/source.yaml", ["OPTIM.LR", "0.01", "CORRUPTION.SEVERITY", "[3, 5]",
                                                  "MODEL.EPISODIC", "True", "RNG_SEED", "7"])
    assert cfg.OPTIM.LR == 0.01 and cfg.CORRUPTION.SEVERITY == [3, 5] and cfg.MODEL.EPISODIC is True
    assert cfg.RNG_SEED == 7 and cfg.CORRUPTION.DATASET == "cifar10_c"


def test_unknown_key_on_command_line_names_key_and_nearest():
    with pytest.raises(ConfigError) as err:
        load_cfg("conf/cifar10_c/source.yaml", ["OPTIM.LRR", "0.1"])
    assert "OPTIM.LRR" in str(err.value) and "OPTIM.LR" in str(err.value)


def test_unknown_key_in_yaml_names_file_key_and_nearest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("TEST:\n  BATCH_SIZ: 4\n")
    with pytest.raises(ConfigError) as err:
        load_cfg(path)
    msg = str(err.value)
    assert "TEST.BATCH_SIZ" in msg and "TEST.BATCH_SIZE" in msg and str(path) in msg


def test_unknown_node_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("OPTIMIZER:\n  LR: 4\n")
    with pytest.raises(ConfigError, match="OPTIMIZER"):
        load_cfg(path)


@pytest.mark.parametrize("opts, needle", [
    (["MODEL.ADAPTATION", "tentt"], "Unknown method"),
    (["CORRUPTION.DATASET", "cifar10c"], "cifar10_c"),
    (["CORRUPTION.TYPE", "['gausian_noise']"], "gaussian_noise"),
    (["SETTING", "reset_each_shif"], "reset_each_shift"),
    (["MODEL.USE_CLIP", "False"], "CLIP"),
    (["OPTIM.LR"], "pairs"),
])
def test_bad_values_fail_clearly(opts, needle):
    with pytest.raises(ConfigError, match=needle):
        load_cfg("conf/cifar10_c/source.yaml", opts)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_cfg(tmp_path / "nope.yaml")


def test_method_keys_come_from_the_method_class_and_external_modules_register(tmp_path):
    module = tmp_path / "my_method.py"
    module.write_text(
        "from methods.base import TTAMethod\n"
        "from methods.registry import register_method\n"
        "@register_method('my_external_method')\n"
        "class Mine(TTAMethod):\n"
        "    config_defaults = {'MINE': {'ALPHA': 0.5}}\n"
        "    def forward_and_adapt(self, x):\n"
        "        return self.model(x)\n")
    cfg = tiny_cfg(None, MODEL__EXTRA_MODULES=[str(module)], MODEL__ADAPTATION="my_external_method",
                   MINE__ALPHA=0.25)
    assert cfg.MINE.ALPHA == 0.25
