"""Test-time adaptation methods. Importing this package registers the built-in methods.

Add a method: write one file with a ``TTAMethod`` subclass decorated ``@register_method("name")`` in this folder
(every module here is imported, so nothing else needs editing), or anywhere else and name it in
MODEL.EXTRA_MODULES; then one method config, conf/methods/<name>.yaml."""
import importlib
import pkgutil

from methods.base import TTAMethod
from methods.registry import METHODS, declared_nodes, own_nodes, register_method

# Modules that hold shared code, not a method.
_INFRASTRUCTURE = {"base", "registry", "augmentations"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"methods.{_module.name}")


def build_method(cfg, model, num_classes: int) -> TTAMethod:
    """The method of MODEL.ADAPTATION around ``model``: constructed, then set up."""
    return METHODS.get(cfg.MODEL.ADAPTATION)(cfg, model, num_classes).setup()


__all__ = ["TTAMethod", "METHODS", "register_method", "build_method", "own_nodes", "declared_nodes"]
