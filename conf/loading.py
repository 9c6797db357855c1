"""Reading a config: defaults <- the YAML file, or the composition it names <- command-line ``KEY VALUE`` pairs.

A ``ConfigSource`` reads the file (or the files of the composition it names) once; everything later asked of the
config's text (the plug-ins it names, its method, the keys it sets) and the merge itself read that one copy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import yaml
from yacs.config import CfgNode as CN

from conf.compose import config_layers
from conf.errors import ConfigError
from conf.schema import defaults, flat_keys, merge_mapping, merge_pairs, typed_value


@dataclass(frozen=True)
class ConfigSource:
    """A config's layers, read once: the (source, mapping) layers of its file or composition, in merge order,
    then the command line's ``KEY VALUE`` pairs."""
    layers: tuple[tuple[str, dict], ...]
    opts: tuple[str, ...]

    @classmethod
    def read(cls, cfg_file=None, opts=None) -> ConfigSource:
        """The layers of ``cfg_file`` (none: the defaults alone) and ``opts``."""
        return cls(tuple(config_layers(cfg_file)) if cfg_file else (), tuple(str(o) for o in opts or []))

    @classmethod
    def of_text(cls, text: str, source: str) -> ConfigSource:
        """A whole config written as YAML text (a dumped config: what a grid hands each job), named ``source``."""
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys")
        return cls(((source, data),), ())

    def _requested(self, key: str, default) -> list:
        """Every value the layers and the command line give MODEL.<key>, in order (read before the schema is
        built)."""
        found = [data["MODEL"][key] for _, data in self.layers if key in (data.get("MODEL") or {})]
        for name, value in zip(self.opts[0::2], self.opts[1::2]):
            if name == f"MODEL.{key}":
                found.append(typed_value(name, value, default, "the command-line overrides"))
        return found

    def plugins(self) -> list[str]:
        """The modules MODEL.EXTRA_MODULES names (imported before the schema is built: they may declare keys)."""
        return [str(m) for value in self._requested("EXTRA_MODULES", []) for m in (value or [])]

    def method(self) -> str | None:
        """The MODEL.ADAPTATION the layers and the command line end with (None: the default's)."""
        found = self._requested("ADAPTATION", "")
        return str(found[-1]) if found else None

    def keys_set(self) -> frozenset[str]:
        """The keys the file (or its composition) and the command line set, nodes included ("OPTIM",
        "OPTIM.LR"): what harness/build.py's config_warnings tells apart from a default left as it is."""
        keys = {key for _, data in self.layers for key in flat_keys(data)}
        return frozenset(keys | set(self.opts[0::2]))


def load_config(source: ConfigSource, nodes: Mapping[str, dict] | None = None) -> CN:
    """defaults (suite keys + ``nodes``) <- the source's layers (conf/compose.py) <- its ``KEY VALUE`` pairs; not
    frozen, values not checked beyond their types (harness/build.py checks them against the registries and the
    declared options)."""
    cfg = defaults(nodes)
    for name, data in source.layers:
        merge_mapping(cfg, data, name)
    merge_pairs(cfg, list(source.opts))
    return cfg
