"""Test-time adaptation methods.

Add a method: write one file with a ``TTAMethod`` subclass decorated ``@register_method("name")`` in this folder
(every module here is imported, so nothing else needs editing), or anywhere else and name it in
MODEL.EXTRA_MODULES; then one method config, conf/methods/<name>.yaml. It builds on ``methods.base``, the frames
and parameter helpers of ``methods.frames``, the kernels of ``methods.losses`` and ``methods.caches``, and imports
no other method's module.

Importing this package runs no method module (they import torch): ``METHODS``, ``TTAMethod``, ``build_method``
and the modules themselves import every built-in method, and so register them, on first use. What the config
schema needs of them (``declared_nodes``, ``method_declarations``) is read without torch where no method module
has run yet (methods/declarations.py), for the commands that only read files."""
import importlib

from methods.declarations import declared_nodes, load_builtin_methods, method_declarations
from methods.registry import own_nodes, register_method

_LOADED = {"METHODS": ("methods.registry", "METHODS"), "TTAMethod": ("methods.base", "TTAMethod")}


def build_method(cfg, model, num_classes: int, **auxiliary_models):
    """The method of MODEL.ADAPTATION around ``model``: constructed, then set up. ``auxiliary_models``: the further
    CLIPs its class declares (``TTAMethod.auxiliary_models``), by keyword."""
    load_builtin_methods()
    from methods.registry import METHODS
    return METHODS.get(cfg.MODEL.ADAPTATION)(cfg, model, num_classes, **auxiliary_models).setup()


def __getattr__(name: str):
    """METHODS and TTAMethod with the built-in methods registered; a submodule (methods.base, methods.tpt, ...)."""
    if name in _LOADED:
        load_builtin_methods()
        module, attribute = _LOADED[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = ["TTAMethod", "METHODS", "register_method", "build_method", "own_nodes", "declared_nodes",
           "method_declarations", "load_builtin_methods"]
