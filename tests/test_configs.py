from pathlib import Path

import pytest

import methods
from conf import ConfigError, config_names
from harness.build import load_cfg
from harness.identity import config_hash
from tests.record import config_record, read_record, recorded_names
from tests.synthetic import AUTHORS_OURS_YAML, tiny_cfg

# What every shipped config sets: the keys that differ from the defaults, and the config hash (the run folder's name),
# from its record (tests/record.py). The first 59 were recorded from the files they replaced when configs were
# composed (their keys are unchanged since); the hashes moved once when the identity stopped covering other
# methods' nodes at their defaults (issue 16), so that adding a method moves no other config's hash.
SHIPPED = {name: read_record(name) for name in recorded_names()}


@pytest.mark.parametrize("name", config_names())
def test_every_shipped_config_loads(name):
    cfg = load_cfg(f"conf/{name}.yaml")
    assert cfg.CORRUPTION.DATASET == name.split("/")[0]
    assert cfg.MODEL.ADAPTATION  # resolved against the registry by load_cfg


def test_there_are_configs_for_the_three_corruption_benchmarks():
    names = set(config_names())
    assert {"cifar10_c/source", "cifar100_c/source", "imagenet_c/source"} <= names


def test_the_compositions_are_the_configs_that_were_shipped():
    missing = sorted(set(config_names()) - set(SHIPPED))
    assert not missing, f"no record of {missing}: write them with `python -m tests.record {' '.join(missing)}`"
    stale = sorted(set(SHIPPED) - set(config_names()))
    assert not stale, f"records of configs no longer shipped: {stale}: `python -m tests.record --prune` deletes them"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_composition_equals_the_file_it_replaced(name):
    recorded = {key: SHIPPED[name][key] for key in ("config_hash", "differs_from_defaults")}
    assert config_record(name) == recorded, f"conf/{name}.yaml no longer composes what its record holds; if the " \
                                            f"change is meant: `python -m tests.record {name}`, and say why"
    assert load_cfg(name) == load_cfg(f"conf/{name}.yaml")      # the short name means the same


def test_a_real_file_and_a_missing_composition(tmp_path):
    with pytest.raises(ConfigError, match=r"conf/methods/rpl.yaml is not shipped for data set pacs"):
        load_cfg("conf/pacs/rpl.yaml")
    with pytest.raises(ConfigError, match=r"configs shipped for pacs: \['batclip', 'clipartt', 'source', 'tent'\]"):
        load_cfg("conf/pacs/no_such_method.yaml")
    own = tmp_path / "conf" / "pacs" / "tent.yaml"           # a real file is read as it is, not composed
    own.parent.mkdir(parents=True)
    own.write_text("CORRUPTION: {DATASET: pacs, TYPE: [photo], SEVERITY: [0]}\nMODEL: {ADAPTATION: tent}\n")
    cfg = load_cfg(own)
    assert list(cfg.CORRUPTION.TYPE) == ["photo"] and cfg.OPTIM.METHOD == "Adam"
    with pytest.raises(ConfigError, match="is a method config"):
        load_cfg("conf/methods/tent.yaml")


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


def test_keys_that_change_nothing_warn():
    from harness.build import config_warnings, read_config
    for name in config_names():
        loaded = read_config(f"conf/{name}.yaml")
        assert config_warnings(loaded.cfg, loaded.keys_set) == [], name
    warnings = config_warnings(tiny_cfg("conf/cifar10_c/vte.yaml", TEST__WINDOW_LENGTH=4, OPTIM__STEPS=3,
                                        MODEL__EPISODIC=True, SAR__RHO=0.1, SAR__MARGIN_E0=0.3))
    assert warnings == [
        "TEST.WINDOW_LENGTH = 4 has no effect in this suite (no method of this suite uses a sliding window)",
        "OPTIM.STEPS = 3 has no effect: vte trains nothing",
        "MODEL.EPISODIC = True has no effect: vte trains nothing",
        "SAR.MARGIN_E0, SAR.RHO set, but method vte does not read the SAR keys",
    ]


def test_declared_options_cover_every_method_node():
    """Every method's keys are in the schema with their defaults (the tiny tests rely on the same defaults); plug-ins
    other tests imported are not in a config that does not name them."""
    import conf
    cfg = tiny_cfg()
    for node, keys in methods.declared_nodes(conf.PLUGIN_MODULES).items():
        assert set(cfg[node]) == set(keys), node


def test_a_config_does_not_take_the_keys_of_plugins_other_configs_of_the_process_imported(tmp_path):
    # A process that loads several configs (a grid, scripts/compare.py): a plug-in named by one config must not
    # enter the keys, dump and hash of another, else that config's run folder and identity depend on what was
    # loaded before it in the same process.
    module = tmp_path / "other_plugin_method.py"
    module.write_text(
        "from methods.base import TTAMethod\n"
        "from methods.registry import register_method\n"
        "@register_method('other_plugin_method')\n"
        "class OtherPlugin(TTAMethod):\n"
        "    config_defaults = {'OTHERPLUGIN': {'BETA': 0.5}}\n"
        "    def forward_and_adapt(self, x):\n"
        "        return self.model(x)\n")
    before = load_cfg("conf/cifar10_c/tent.yaml")
    with_plugin = load_cfg("conf/cifar10_c/source.yaml", ["MODEL.EXTRA_MODULES", f"['{module}']",
                                                          "MODEL.ADAPTATION", "other_plugin_method"])
    assert with_plugin.OTHERPLUGIN.BETA == 0.5
    after = load_cfg("conf/cifar10_c/tent.yaml")
    assert "OTHERPLUGIN" not in after and after.dump() == before.dump()
    assert config_hash(after) == config_hash(before)
    with pytest.raises(ConfigError, match="Unknown config key 'OTHERPLUGIN.BETA'"):
        load_cfg("conf/cifar10_c/tent.yaml", ["OTHERPLUGIN.BETA", "0.1"])
    # warnings still look at the nodes a config has: a key of another method's node set in the plug-in's config
    from harness.build import config_warnings
    assert config_warnings(after) == config_warnings(before) == []
    flagged = load_cfg("conf/cifar10_c/source.yaml", ["MODEL.EXTRA_MODULES", f"['{module}']",
                                                      "MODEL.ADAPTATION", "other_plugin_method", "SAR.RHO", "0.1"])
    assert any(w.startswith("SAR.RHO set, but method other_plugin_method") for w in config_warnings(flagged))


def test_a_new_method_moves_no_other_configs_hash_or_keys(tmp_path):
    """The nodes of methods a run does not use, at their defaults, are not part of its identity: a plug-in that
    declares a node and is loaded with its own config (so its node is in that config's schema, at defaults) leaves
    a BATCLIP config's hash and identity keys as they are; BATCLIP's own node, or another method's node set away
    from its defaults, stays in."""
    from harness.identity import identity_keys, unread_default_nodes
    module = tmp_path / "new_node_method.py"
    module.write_text(
        "from methods.base import TTAMethod\n"
        "from methods.registry import register_method\n"
        "@register_method('new_node_method')\n"
        "class NewNode(TTAMethod):\n"
        "    config_defaults = {'NEWNODE': {'GAMMA': 0.5}}\n"
        "    def forward_and_adapt(self, x):\n"
        "        return self.model(x)\n")
    plugin = ["MODEL.EXTRA_MODULES", f"['{module}']"]
    alone = load_cfg("conf/cifar10_c/batclip.yaml")
    beside = load_cfg("conf/cifar10_c/batclip.yaml", plugin)       # the new node is in this config, at defaults
    assert "NEWNODE" in beside and "NEWNODE" not in alone
    assert "NEWNODE" in unread_default_nodes(beside) and "BATCLIP" not in unread_default_nodes(beside)
    # MODEL.EXTRA_MODULES is a key of its own; leave it out to compare what the node does
    strip = ("MODEL.EXTRA_MODULES",)
    assert identity_keys(beside, strip) == identity_keys(alone, strip)
    assert identity_keys(alone)["BATCLIP.ENTROPY_WEIGHT"] == 1.0        # its own node, at defaults, stays in
    assert not any(k.startswith(("TPT.", "SAR.")) for k in identity_keys(alone))
    # the same from a stored YAML dump, as reporting reads it
    assert identity_keys(beside.dump(), strip) == identity_keys(alone.dump(), strip)
    set_away = load_cfg("conf/cifar10_c/batclip.yaml", plugin + ["NEWNODE.GAMMA", "0.25"])
    assert "NEWNODE.GAMMA" in identity_keys(set_away)
    assert config_hash(set_away) != config_hash(beside)
    tpt_set = load_cfg("conf/cifar10_c/batclip.yaml", ["TPT.SELECTION_P", "0.2"])
    assert config_hash(tpt_set) != config_hash(alone) and "TPT.SELECTION_P" in identity_keys(tpt_set)


def test_every_shipped_config_is_a_file_a_user_can_copy():
    """conf/<dataset>/<method>.yaml exist as the compositions' files, exactly as scripts/compose_configs.py writes
    them, and no file composes what is no longer shipped."""
    from conf.compose import composition_files, stale_composition_files
    wrong = sorted(str(p) for p, text in composition_files().items() if not p.is_file() or p.read_text() != text)
    stale = stale_composition_files()
    assert not wrong and not stale, (f"missing or changed: {wrong[:3]}{' ...' if len(wrong) > 3 else ''}; stale: "
                                     f"{stale}: write them with `python scripts/compose_configs.py` (`python -m tests.record` "
                                     f"with a new config's name does it too)")
    assert len(composition_files()) == len(config_names())


def test_a_copy_of_a_shipped_config_with_keys_added(tmp_path):
    shipped = load_cfg("conf/cifar10_c/tent.yaml")
    assert load_cfg("conf/cifar10_c/tent.yaml") == load_cfg("cifar10_c/tent")   # the file is the composition
    own = tmp_path / "my_tent.yaml"
    own.write_text(Path("conf/cifar10_c/tent.yaml").read_text() + "OPTIM: {LR: 1.0e-4}\n")
    mine = load_cfg(own)
    assert mine.OPTIM.LR == 1.0e-4 and shipped.OPTIM.LR != 1.0e-4
    mine.defrost()
    mine.OPTIM.LR = shipped.OPTIM.LR
    assert mine == shipped                                    # the rest is the composition's


@pytest.mark.parametrize("compose, message", [
    ("[conf/datasets/cifar10_c.yaml]", r"my.yaml: COMPOSE is \['conf/datasets/cifar10_c.yaml'\]; expected COMPOSE: \["),
    ("[conf/datasets/nope.yaml, conf/methods/tent.yaml]", r"my.yaml: COMPOSE names conf/datasets/nope.yaml, which "
                                                          r"does not exist"),
    ("[conf/datasets/pacs.yaml, conf/methods/rpl.yaml]", r"conf/methods/rpl.yaml is not shipped for data set pacs"),
])
def test_a_wrong_composition_is_refused_in_one_line(tmp_path, compose, message):
    own = tmp_path / "my.yaml"
    own.write_text(f"COMPOSE: {compose}\n")
    with pytest.raises(ConfigError, match=message):
        load_cfg(own)
