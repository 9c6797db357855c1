"""Reading a config: defaults <- the YAML file, or the composition it names <- command-line ``KEY VALUE`` pairs."""
from __future__ import annotations

from typing import Mapping

from yacs.config import CfgNode as CN

from conf.compose import config_layers
from conf.schema import defaults, merge_mapping, merge_pairs, typed_value


def _requested(cfg_file, opts, key: str, default) -> list:
    """Every value the config file's layers and the command line give MODEL.<key>, in order (read before the schema
    is built)."""
    found = []
    for _, data in (config_layers(cfg_file) if cfg_file else []):
        model = data.get("MODEL") or {}
        if key in model:
            found.append(model[key])
    opts = [str(o) for o in opts or []]
    for name, value in zip(opts[0::2], opts[1::2]):
        if name == f"MODEL.{key}":
            found.append(typed_value(name, value, default, "the command-line overrides"))
    return found


def requested_plugins(cfg_file, opts) -> list[str]:
    """The modules MODEL.EXTRA_MODULES names in the config and on the command line (imported before the schema is
    built, because they may declare config keys)."""
    return [str(m) for value in _requested(cfg_file, opts, "EXTRA_MODULES", []) for m in (value or [])]


def requested_method(cfg_file, opts) -> str | None:
    """The MODEL.ADAPTATION the config file and the command line end with (None: the default's)."""
    found = _requested(cfg_file, opts, "ADAPTATION", "")
    return str(found[-1]) if found else None


def keys_set_by(cfg_file) -> frozenset[str]:
    """The leaf keys the config file (or the composition it names) sets."""
    from conf.schema import flat_keys
    keys: set[str] = set()
    for _, data in (config_layers(cfg_file) if cfg_file else []):
        keys.update(flat_keys(data))
    return frozenset(keys)


def load_config(cfg_file=None, opts=None, nodes: Mapping[str, dict] | None = None) -> CN:
    """defaults (suite keys + ``nodes``) <- the YAML file (or the composition it names, conf/compose.py) <-
    ``KEY VALUE`` pairs; not frozen, values not checked beyond their types (harness/build.py checks them against the
    registries and the declared options)."""
    cfg = defaults(nodes)
    for source, data in (config_layers(cfg_file) if cfg_file else []):
        merge_mapping(cfg, data, source)
    merge_pairs(cfg, list(opts or []))
    return cfg
