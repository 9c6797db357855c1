"""The config schema and how a config is read: defaults <- YAML file <- command-line ``KEY VALUE`` pairs.

Pure: this module knows the suite's keys (conf/defaults.py) and whatever extra nodes its caller declares (the
methods' ``config_defaults``, collected by harness/build.py); it imports nothing of the suite's upper layers.
Unknown keys fail with their nearest valid names, values of the wrong type with the key, the value and the
expected type, a file that is not YAML with its name and line."""
from __future__ import annotations

import ast
import difflib
import logging
from pathlib import Path
from typing import Mapping

import yaml
from yacs.config import CfgNode as CN

from conf.defaults import FOREIGN_KEYS, FOREIGN_METHOD_NODES, INERT_KEYS, SUITE_OPTIONS
from conf.errors import ConfigError
from conf.options import Option, defaults_tree, options_of

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the schema

def declaration_tree(nodes: Mapping[str, dict] | None = None) -> dict:
    """The suite's declarations plus extra nodes {"NODE": {"KEY": Option | default}} (a method's keys)."""
    tree = dict(SUITE_OPTIONS)
    for node, keys in (nodes or {}).items():
        if node in SUITE_OPTIONS:
            raise ConfigError(f"config node {node} is a suite-wide node; a method declares nodes of its own")
        tree[node] = keys
    return tree


def defaults(nodes: Mapping[str, dict] | None = None) -> CN:
    """A fresh config holding every default (not frozen)."""
    return CN(defaults_tree(declaration_tree(nodes)))


def declared_options(nodes: Mapping[str, dict] | None = None) -> dict[str, Option]:
    """{"NODE.KEY": Option} of every key that declares its accepted values."""
    return options_of(declaration_tree(nodes))


def flat_keys(node, prefix: str = "") -> list[str]:
    """Every key of a nested mapping, nodes included ("OPTIM", "OPTIM.LR", ...)."""
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys.extend(flat_keys(value, f"{prefix}{key}."))
    return keys


def _unknown_key(defaults_cfg: CN, key: str, source: str) -> ConfigError:
    node = key.split(".")[0]
    why = FOREIGN_KEYS.get(key) or FOREIGN_KEYS.get(node)
    if why is None and node in FOREIGN_METHOD_NODES:
        why = f"{node} configures a method of the authors' suite that this suite does not have"
    if why:
        return ConfigError(f"Config key '{key}' in {source} is not supported: {why}")
    valid = flat_keys(defaults_cfg)
    near = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    near += [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k not in near]
    return ConfigError(f"Unknown config key '{key}' in {source}. Nearest valid keys: {near[:6] or 'none'}")


# ------------------------------------------------------------------------------------------------ values

def _type_name(value) -> str:
    return {bool: "a boolean (True/False)", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list"}.get(type(value), type(value).__name__)


def decode_value(value):
    """As yacs decodes a value: strings through ast.literal_eval (YAML reads ``1e-3`` as a string)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def typed_value(key: str, raw, default, source: str):
    """``raw`` converted to the type of the key's default, or a ConfigError naming key, value and expected type.
    As yacs, with two additions: an integer where a number is expected, and on the command line a YAML-style list
    (``[fog, snow]``, as written in our YAML files) where a list is expected."""
    value = decode_value(raw)
    if isinstance(default, (list, tuple)) and isinstance(value, str) and value.strip().startswith("["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    hint = ""
    if isinstance(default, (list, tuple)):
        hint = f"; write a list, e.g. {key} \"['a', 'b']\""
    elif isinstance(default, int) and isinstance(value, float) and value.is_integer():
        hint = f"; write {int(value)}"
    raise ConfigError(f"{key} = {raw!r} in {source}: expected {_type_name(default)}, got {_type_name(value)}"
                      f"{hint}")


def _merge(cfg: CN, data: Mapping, source: str, defaults_cfg: CN, prefix: str = "") -> None:
    for key, raw in data.items():
        full = f"{prefix}{key}"
        if key not in cfg:
            while isinstance(raw, Mapping) and raw:     # name the first leaf of an unknown group: EATA.MARGIN_E0
                key, raw = next(iter(raw.items()))
                full = f"{full}.{key}"
            raise _unknown_key(defaults_cfg, full, source)
        if isinstance(cfg[key], CN):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{full} in {source} is a group of keys ({', '.join(cfg[key])}); got the value "
                                  f"{raw!r}")
            _merge(cfg[key], raw, source, defaults_cfg, f"{full}.")
        else:
            if isinstance(raw, Mapping):
                raise ConfigError(f"{full} in {source} is a single value, not a group of keys; got {dict(raw)}")
            cfg[key] = typed_value(full, raw, cfg[key], source)


def read_yaml(path: Path) -> dict:
    """A YAML config file as a mapping; a missing file or bad YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def merge_mapping(cfg: CN, data: Mapping, source: str) -> None:
    """Merge a nested mapping of keys (a YAML file's content) into cfg."""
    _merge(cfg, data, source, cfg.clone())


def merge_pairs(cfg: CN, opts: list) -> None:
    """Merge command-line ``KEY VALUE`` pairs into cfg."""
    opts = [str(o) for o in opts]
    if len(opts) % 2:
        raise ConfigError(f"Command-line overrides come in KEY VALUE pairs; got an odd number: {opts}")
    data: dict = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parents)} is given both as a value and as a group of keys")
        node[leaf] = value
    _merge(cfg, data, "the command-line overrides", cfg.clone())


def check_values(cfg: CN, options: Mapping[str, Option], keys=None) -> None:
    """Every declared option (or those in ``keys``) holds an accepted value; else a ConfigError naming it."""
    for key, option in options.items():
        if keys is not None and key not in keys:
            continue
        node = cfg
        for part in key.split("."):
            node = node[part]
        option.check(key, node)


def inert_settings(cfg: CN) -> list[str]:
    """Warnings for the keys of INERT_KEYS set to another value than their default."""
    base = defaults()
    warnings = []
    for key, why in INERT_KEYS.items():
        value, default = cfg, base
        for part in key.split("."):
            value, default = value[part], default[part]
        if value != default:
            warnings.append(f"{key} = {value!r} has no effect in this suite ({why})")
    return warnings
