"""Benchmark data sets, read in the layouts users already have on disk.

Importing this package imports every module in it, and so registers every built-in data set
(``@register_dataset``); ``get_dataset(name)`` returns one."""
import importlib
import pkgutil

from datasets.base import DATASETS, BenchmarkDataset, DatasetError, get_dataset, register_dataset

# Modules that define no data set.
_INFRASTRUCTURE = {"base", "class_names", "transforms", "folders", "corruptions", "source_sets", "ood_sets"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"datasets.{_module.name}")

__all__ = ["DATASETS", "BenchmarkDataset", "DatasetError", "get_dataset", "register_dataset"]
