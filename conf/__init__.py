"""Configuration: yacs defaults (conf/defaults.py) + the nodes each registered method declares, merged with a
YAML file and command-line ``KEY VALUE`` pairs. Unknown keys fail with the key and its nearest valid names."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml
from yacs.config import CfgNode as CN

from conf.defaults import base_defaults

CONF_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    pass


def build_defaults() -> CN:
    """Suite defaults plus every registered method's ``config_defaults`` (imported here, not at module
    import, so that user modules named in MODEL.EXTRA_MODULES can register first)."""
    import methods
    cfg = base_defaults()
    owners: dict[str, str] = {}
    for name, cls in sorted(methods.METHODS.items()):
        for node, keys in cls.config_defaults.items():
            if node in cfg and node not in owners:
                raise ConfigError(f"method '{name}' declares config node {node}, which is a suite-wide node")
            if node in owners:
                raise ConfigError(f"config node {node} is declared by both '{owners[node]}' and '{name}'")
            owners[node] = name
            cfg[node] = CN(copy.deepcopy(keys))
    return cfg


def _flat_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, full + "."))
    return keys


def _check_keys(defaults: CN, keys: list[str], source: str) -> None:
    valid = _flat_keys(defaults)
    valid_set = set(valid)
    for key in keys:
        if key not in valid_set:
            near = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
            leaf = key.rsplit(".", 1)[-1]
            near += [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k not in near]
            raise ConfigError(f"Unknown config key '{key}' in {source}. Nearest valid keys: {near[:6] or 'none'}")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _extra_modules(file_data: dict, opts: list) -> list:
    found = list((file_data.get("MODEL") or {}).get("EXTRA_MODULES", []) or [])
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "MODEL.EXTRA_MODULES":
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
            found += parsed if isinstance(parsed, list) else [parsed]
    return found


def load_cfg(cfg_file: str | Path | None = None, opts: list | None = None, freeze: bool = True) -> CN:
    """Defaults <- YAML file <- ``KEY VALUE`` pairs."""
    opts = [str(o) for o in (opts or [])]
    if len(opts) % 2:
        raise ConfigError(f"Command-line overrides come in KEY VALUE pairs; got an odd number: {opts}")
    file_data = _read_yaml(Path(cfg_file)) if cfg_file else {}
    import methods
    methods.import_extra_modules(_extra_modules(file_data, opts))
    cfg = build_defaults()
    if cfg_file:
        _check_keys(cfg, _flat_keys(file_data), str(cfg_file))
        cfg.merge_from_other_cfg(CN(file_data))
    _check_keys(cfg, opts[0::2], "the command-line overrides")
    cfg.merge_from_list(opts)
    validate(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def validate(cfg: CN) -> None:
    import datasets
    import methods
    if not cfg.MODEL.USE_CLIP:
        raise ConfigError("MODEL.USE_CLIP False: this suite evaluates CLIP models only")
    try:
        methods.canonical_name(cfg.MODEL.ADAPTATION)
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    try:
        dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
    except datasets.DatasetError as err:
        raise ConfigError(str(err)) from None
    for domain in cfg.CORRUPTION.TYPE:
        try:
            dataset.check_domain(domain)
        except datasets.DatasetError as err:
            raise ConfigError(str(err)) from None
    from harness.settings import SETTINGS
    if cfg.SETTING not in SETTINGS:
        near = difflib.get_close_matches(cfg.SETTING, list(SETTINGS), n=3, cutoff=0.3)
        raise ConfigError(f"Unknown SETTING '{cfg.SETTING}'. Nearest: {near}; available: {sorted(SETTINGS)}")
    if cfg.CLIP.PROMPT_MODE not in ("custom", "ensemble"):
        raise ConfigError(f"CLIP.PROMPT_MODE must be 'custom' or 'ensemble', got '{cfg.CLIP.PROMPT_MODE}'")


def all_config_files() -> list[Path]:
    return sorted(CONF_DIR.glob("*/*.yaml"))
