"""Declared options: a config key's default and the values it accepts.

Suite keys (conf/defaults.py) and method keys (a method class's ``config_defaults``) are declared the same way: a
plain value is a default that accepts any value of its type; ``Option(default, ...)`` adds the accepted values,

    Option(0.8, within="(0, 1]")                      # an interval; "inf" for no bound, ( ) open, [ ] closed
    Option("present", choices=("present", "all"))     # one of these
    Option(-1, valid=lambda n: n == -1 or n >= 1, expected="-1 (all) or a count >= 1")
    Option("", reads_file=True)                       # a file the run reads ("" none): it must exist, and its
                                                      # content enters the run's identity (harness/build.py)

The run plan (harness/build.py) checks every option of the suite and of the chosen method before anything
loads, so a method never writes ``if not 0 < q <= 1: raise ...`` itself."""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from conf.errors import ConfigError

_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?inf|[-+0-9.eE]+)\s*,\s*(-?inf|[-+0-9.eE]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Option:
    default: Any
    choices: tuple | None = None
    within: str | None = None
    valid: Callable[[Any], bool] | None = None
    expected: str = ""
    reads_file: bool = False

    def __post_init__(self):
        if self.within is not None and not _INTERVAL.match(self.within):
            raise ValueError(f"Option(within={self.within!r}): write an interval such as '(0, 1]' or '[1, inf)'")
        if self.valid is not None and not self.expected:
            raise ValueError("Option(valid=...) needs expected='...' to describe the accepted values")

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.within is not None:
            return f"a number in {self.within.strip()}"
        return self.expected or "any value"

    def accepts(self, value) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.within is not None and not _in_interval(value, self.within):
            return False
        return self.valid is None or bool(self.valid(value))

    def check(self, key: str, value) -> None:
        if self.reads_file and value and not Path(str(value)).expanduser().is_file():
            what = "a folder, not a file" if Path(str(value)).expanduser().is_dir() else "no such file"
            raise ConfigError(f"{key} = {value!r}: {what}")
        if self.accepts(value):
            return
        hint = ""
        if self.choices is not None and isinstance(value, str):
            near = difflib.get_close_matches(value, [str(c) for c in self.choices], n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{key} = {value!r}: expected {self.describe()}{hint}")


def _in_interval(value, interval: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    left, low, high, right = _INTERVAL.match(interval).groups()
    low, high = float(low), float(high)
    above = value > low if left == "(" else value >= low
    below = value < high if right == ")" else value <= high
    return above and below


def default_of(declared):
    """The default of a declared value (an Option or a plain default)."""
    return declared.default if isinstance(declared, Option) else declared


def defaults_tree(tree: dict) -> dict:
    """A declaration tree {"NODE": {"KEY": Option | value}} with every Option replaced by its default."""
    return {k: defaults_tree(v) if isinstance(v, dict) else default_of(v) for k, v in tree.items()}


def options_of(tree: dict, prefix: str = "") -> dict[str, Option]:
    """{"NODE.KEY": Option} for every declared Option of a tree (plain defaults carry no constraint)."""
    found: dict[str, Option] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(options_of(value, f"{prefix}{key}."))
        elif isinstance(value, Option):
            found[f"{prefix}{key}"] = value
    return found
