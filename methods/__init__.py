"""Test-time adaptation methods. Importing this package registers the built-in methods.

Add a method: write one file with a ``TTAMethod`` subclass decorated ``@register_method("name")``
in this folder (every module here is imported, so nothing else needs editing), or anywhere else and name
it in MODEL.EXTRA_MODULES; then one YAML per data set."""
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

from methods.base import TTAMethod
from methods.registry import ALIASES, METHODS, canonical_name, get_method_class, register_method

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"methods.{_module.name}")


def import_extra_modules(modules) -> None:
    """Import user modules (dotted names or .py paths) so that their @register_method/@register_dataset run."""
    for entry in modules:
        entry = str(entry)
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"MODEL.EXTRA_MODULES: file {path} does not exist")
            name = f"extra_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(entry)


def build_method(cfg, model, num_classes: int) -> TTAMethod:
    return get_method_class(cfg.MODEL.ADAPTATION)(cfg, model, num_classes)


__all__ = ["TTAMethod", "METHODS", "ALIASES", "register_method", "get_method_class", "canonical_name",
           "build_method", "import_extra_modules"]
