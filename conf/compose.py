"""Composed configs: a data set's protocol and a method's hyper-parameters live apart and are put together.

    conf/datasets/<dataset>.yaml   the protocol: domains, severity, setting, batch size, backbone, prompt
    conf/methods/<config>.yaml     a method's keys, and under PER_DATASET the data sets it is shipped for, each
                                   with the values that differ there (the paper's per-data-set learning rates)

``conf/<dataset>/<config>.yaml`` (also ``<dataset>/<config>``) names their composition: defaults <- protocol <-
method <- PER_DATASET[<dataset>]. A real file at such a path is read as it is, like any other YAML file (the
authors' files, a user's own)."""
from __future__ import annotations

from pathlib import Path

from conf.errors import ConfigError
from conf.schema import read_yaml

CONF_DIR = Path(__file__).resolve().parent
DATASETS_DIR = CONF_DIR / "datasets"
METHODS_DIR = CONF_DIR / "methods"
PER_DATASET = "PER_DATASET"


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(CONF_DIR.parent))
    except ValueError:
        return str(path)


def method_config(config: str) -> tuple[dict, dict]:
    """(the method's keys, its PER_DATASET table) of conf/methods/<config>.yaml."""
    path = METHODS_DIR / f"{config}.yaml"
    data = read_yaml(path)
    per_dataset = data.pop(PER_DATASET, None)
    if not isinstance(per_dataset, dict) or not per_dataset:
        raise ConfigError(f"{_display(path)}: a method config lists its data sets under {PER_DATASET} "
                          f"(<dataset>: {{}} or the keys that differ there)")
    return data, per_dataset


def config_names() -> list[str]:
    """Every shipped composition, as "<dataset>/<config>"."""
    names = []
    for path in sorted(METHODS_DIR.glob("*.yaml")):
        names += [f"{dataset}/{path.stem}" for dataset in method_config(path.stem)[1]]
    return sorted(names)


def composed_layers(dataset: str, config: str) -> list[tuple[str, dict]]:
    """The (source, mapping) layers of one composition, in merge order."""
    protocol = DATASETS_DIR / f"{dataset}.yaml"
    method_path = METHODS_DIR / f"{config}.yaml"
    keys, per_dataset = method_config(config)
    if dataset not in per_dataset:
        raise ConfigError(f"{_display(method_path)} is not shipped for data set {dataset} (its {PER_DATASET}: "
                          f"{sorted(per_dataset)}); add an entry there, or give a config file of your own")
    if not protocol.is_file():
        raise ConfigError(f"{_display(method_path)} lists data set {dataset} under {PER_DATASET}, but "
                          f"{_display(protocol)} does not exist")
    return [(_display(protocol), read_yaml(protocol)), (_display(method_path), keys),
            (f"{_display(method_path)} ({PER_DATASET}.{dataset})", per_dataset[dataset] or {})]


def composed_name(path: Path) -> tuple[str, str] | None:
    """(dataset, config) when ``path`` names a composition: conf/<dataset>/<config>[.yaml] or <dataset>/<config>,
    with a protocol for <dataset> and a method config <config>."""
    parts = Path(path).with_suffix("").parts if Path(path).suffix in (".yaml", ".yml") else Path(path).parts
    if len(parts) < 2 or (len(parts) > 2 and parts[-3] != CONF_DIR.name):
        return None
    dataset, config = parts[-2], parts[-1]
    if (DATASETS_DIR / f"{dataset}.yaml").is_file() and (METHODS_DIR / f"{config}.yaml").is_file():
        return dataset, config
    return None


def config_layers(cfg_file) -> list[tuple[str, dict]]:
    """The (source, mapping) layers a config file or a composed name stands for."""
    path = Path(cfg_file)
    if path.is_file():
        data = read_yaml(path)
        if PER_DATASET in data:
            raise ConfigError(f"{path} is a method config; run it on a data set as conf/<dataset>/{path.stem}.yaml "
                              f"(its data sets: {sorted(data[PER_DATASET] or {})})")
        return [(str(path), data)]
    name = composed_name(path)
    if name is not None:
        return composed_layers(*name)
    hint = ""
    if len(path.parts) >= 2 and path.parts[-2] in {p.stem for p in DATASETS_DIR.glob("*.yaml")}:
        shipped = [n.split("/")[1] for n in config_names() if n.startswith(path.parts[-2] + "/")]
        hint = f"; configs shipped for {path.parts[-2]}: {shipped}"
    raise ConfigError(f"Config file {path} does not exist{hint}")
