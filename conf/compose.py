"""Composed configs: a data set's protocol and a method's hyper-parameters live apart and are put together.

    conf/datasets/<dataset>.yaml   the protocol: domains, severity, setting, batch size, backbone, prompt
    conf/methods/<config>.yaml     a method's keys, and under PER_DATASET the data sets it is shipped for, each
                                   with the values that differ there (the paper's per-data-set learning rates)

``conf/<dataset>/<config>.yaml`` is their composition: defaults <- protocol <- method <- PER_DATASET[<dataset>]. Each
shipped one is a real file of one key, written by ``python scripts/compose_configs.py`` (tests/test_configs.py checks them)::

    COMPOSE: [conf/datasets/cifar10_c.yaml, conf/methods/tent.yaml]

A copy of it (anywhere) is a config of one's own: keys added below COMPOSE apply on top. ``<dataset>/<config>``
names a composition too. Any other YAML file is read as it is (the authors' files, a user's own)."""
from __future__ import annotations

from pathlib import Path

from conf.errors import ConfigError
from conf.schema import read_yaml

CONF_DIR = Path(__file__).resolve().parent
DATASETS_DIR = CONF_DIR / "datasets"
METHODS_DIR = CONF_DIR / "methods"
PER_DATASET = "PER_DATASET"
COMPOSE = "COMPOSE"


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(CONF_DIR.parent))
    except ValueError:
        return str(path)


def method_config(path: Path) -> tuple[dict, dict]:
    """(the method's keys, its PER_DATASET table) of a method config (conf/methods/<config>.yaml)."""
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
        names += [f"{dataset}/{path.stem}" for dataset in method_config(path)[1]]
    return sorted(names)


def composed_layers(dataset: str, config: str) -> list[tuple[str, dict]]:
    """The (source, mapping) layers of one shipped composition, in merge order."""
    return layers_of(DATASETS_DIR / f"{dataset}.yaml", METHODS_DIR / f"{config}.yaml")


def layers_of(protocol: Path, method_path: Path) -> list[tuple[str, dict]]:
    """The layers of a protocol file (its stem names the data set) and a method config file: the protocol, the
    method's keys, its PER_DATASET entry for the data set."""
    dataset = protocol.stem
    keys, per_dataset = method_config(method_path)
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


def composition_file_text(dataset: str, config: str) -> str:
    """The shipped file conf/<dataset>/<config>.yaml."""
    return (f"# {config} on {dataset}: the data set's protocol, then the method config with its {PER_DATASET}.{dataset} "
            f"entry.\n# Written by scripts/compose_configs.py; a copy with keys added below is a config of your own.\n"
            f"{COMPOSE}: [{_display(DATASETS_DIR / f'{dataset}.yaml')}, {_display(METHODS_DIR / f'{config}.yaml')}]\n")


def _composed_files(path: Path, data: dict) -> tuple[Path, Path]:
    """(protocol, method config) of a file's ``COMPOSE: [<protocol>.yaml, <method config>.yaml]``, relative to the
    suite's folder unless absolute."""
    parts = data.pop(COMPOSE)
    if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)):
        raise ConfigError(f"{path}: {COMPOSE} is {parts!r}; expected {COMPOSE}: [conf/datasets/<dataset>.yaml, "
                          f"conf/methods/<method>.yaml]")
    files = tuple(Path(p) if Path(p).is_absolute() else CONF_DIR.parent / p for p in parts)
    for part in files:
        if not part.is_file():
            raise ConfigError(f"{path}: {COMPOSE} names {_display(part)}, which does not exist")
    return files


def config_layers(cfg_file) -> list[tuple[str, dict]]:
    """The (source, mapping) layers a config file or a composed name stands for."""
    path = Path(cfg_file)
    if path.is_file():
        data = read_yaml(path)
        if PER_DATASET in data:
            raise ConfigError(f"{path} is a method config; run it on a data set as conf/<dataset>/{path.stem}.yaml "
                              f"(its data sets: {sorted(data[PER_DATASET] or {})})")
        if COMPOSE in data:
            layers = layers_of(*_composed_files(path, data))
            return layers + ([(str(path), data)] if data else [])
        return [(str(path), data)]
    name = composed_name(path)
    if name is not None:
        return composed_layers(*name)
    hint = ""
    if len(path.parts) >= 2 and path.parts[-2] in {p.stem for p in DATASETS_DIR.glob("*.yaml")}:
        shipped = [n.split("/")[1] for n in config_names() if n.startswith(path.parts[-2] + "/")]
        hint = f"; configs shipped for {path.parts[-2]}: {shipped}"
    raise ConfigError(f"Config file {path} does not exist{hint}")


def composition_files() -> dict[Path, str]:
    """Every shipped composition's file and its text."""
    return {CONF_DIR / f"{name}.yaml": composition_file_text(*name.split("/")) for name in config_names()}


def stale_composition_files() -> list[Path]:
    """Files conf/<dataset>/<config>.yaml that compose something no longer shipped."""
    wanted = set(composition_files())
    return sorted(p for p in CONF_DIR.glob("*/*.yaml") if p.parent not in (DATASETS_DIR, METHODS_DIR)
                  and p not in wanted and COMPOSE in read_yaml(p))


def write_composition_files() -> None:
    """(Re)write every shipped composition's file; delete those of compositions no longer shipped."""
    files, written, stale = composition_files(), 0, stale_composition_files()
    for path, text in files.items():
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            written += 1
            print(f"wrote {_display(path)}")
    for path in stale:
        path.unlink()
        print(f"deleted {_display(path)} (no longer in its method config's {PER_DATASET})")
    print(f"{len(files)} shipped configs in {_display(CONF_DIR)}/: {written} written, {len(stale)} deleted")
