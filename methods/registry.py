"""The one method registry: name -> class, filled by the ``@register_method`` decorator."""
from __future__ import annotations

import difflib

METHODS: dict[str, type] = {}
ALIASES: dict[str, str] = {}


def register_method(name: str, aliases: tuple[str, ...] = ()):
    def decorate(cls):
        for key in (name, *aliases):
            if key in METHODS or key in ALIASES:
                raise ValueError(f"method name '{key}' is registered twice")
        METHODS[name] = cls
        ALIASES.update({alias: name for alias in aliases})
        cls.method_name = name
        return cls
    return decorate


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS) + list(ALIASES), n=3, cutoff=0.4)
        raise KeyError(f"Unknown method MODEL.ADAPTATION '{name}'. Nearest: {near}; registered: {sorted(METHODS)}"
                       f" (aliases: {ALIASES}). A method in your own module is registered by naming the module "
                       f"in MODEL.EXTRA_MODULES.")
    return name


def get_method_class(name: str) -> type:
    return METHODS[canonical_name(name)]
