"""The suite's one registry mechanism: methods, data sets and settings are each a ``Registry`` of named objects,
filled by decorators in the modules that define them. Modules outside the suite register theirs when named in the
one plug-in key, MODEL.EXTRA_MODULES (``import_plugins``)."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

from conf.errors import ConfigError

PLUGIN_KEY = "MODEL.EXTRA_MODULES"


class Registry:
    """name -> object (with aliases). ``kind`` and ``key`` name the registry in messages ("method",
    "MODEL.ADAPTATION")."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._objects: dict[str, object] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, obj, aliases: Iterable[str] = ()) -> None:
        for key in (name, *aliases):
            if key in self._objects or key in self._aliases:
                raise ValueError(f"{self.kind} name '{key}' is registered twice")
        self._objects[name] = obj
        self._aliases.update({alias: name for alias in aliases})

    def register(self, name: str | None = None, aliases: Iterable[str] = ()):
        """Decorator; the name defaults to the object's ``name`` attribute."""
        def decorate(obj):
            self.add(name or obj.name, obj, tuple(aliases))
            return obj
        return decorate

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` or of the alias ``name``; an unknown name is a ConfigError that lists
        the nearest and all registered names."""
        name = self._aliases.get(name, name)
        if name in self._objects:
            return name
        near = difflib.get_close_matches(str(name), list(self._objects) + list(self._aliases), n=3, cutoff=0.4)
        aliases = f" (aliases: {self._aliases})" if self._aliases else ""
        raise ConfigError(f"Unknown {self.kind} {self.key} '{name}'. Nearest: {near}; registered: "
                          f"{sorted(self._objects)}{aliases}. Register one of your own by naming its module in "
                          f"{PLUGIN_KEY}.")

    def get(self, name: str):
        return self._objects[self.canonical(name)]

    def names(self) -> list[str]:
        return list(self._objects)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def items(self):
        return self._objects.items()

    def __contains__(self, name) -> bool:
        return name in self._objects or name in self._aliases

    def __iter__(self):
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)


# The modules import_plugins has imported, by name: a config's schema leaves out the nodes of those it does not
# name itself, so that a config's keys and hash do not depend on which other configs this process loaded before.
PLUGIN_MODULES: set[str] = set()


def plugin_module_name(entry) -> str:
    """The module name an entry of MODEL.EXTRA_MODULES is imported under."""
    entry = str(entry)
    return f"extra_{Path(entry).stem}" if entry.endswith(".py") else entry


def import_plugins(modules: Iterable[str]) -> None:
    """Import the modules named in MODEL.EXTRA_MODULES (dotted names or .py paths) so that their
    ``@register_method`` / ``@register_dataset`` / ``@register_setting`` decorators run."""
    for entry in modules:
        entry = str(entry)
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{PLUGIN_KEY}: file {path} does not exist")
            name = plugin_module_name(entry)
            if name in sys.modules:
                loaded = getattr(sys.modules[name], "__file__", None)
                if loaded and Path(loaded).resolve() != path and Path(loaded).read_bytes() != path.read_bytes():
                    raise ConfigError(f"{PLUGIN_KEY}: {path} and {loaded} both import as module '{name}' in this "
                                      f"process (a plug-in is named after its file) but differ; rename one of them")
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            PLUGIN_MODULES.add(name)
        else:
            fresh = entry not in sys.modules     # a module imported otherwise (a built-in one) is no plug-in
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as err:
                if err.name and entry.startswith(err.name):
                    raise ConfigError(f"{PLUGIN_KEY}: no module named '{entry}' (give a dotted module name on the "
                                      f"Python path or a path to a .py file)") from None
                raise
            if fresh:
                PLUGIN_MODULES.add(entry)
