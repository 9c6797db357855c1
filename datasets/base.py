"""The data-set registry and what every benchmark data set provides to the harness."""
from __future__ import annotations

import difflib
from typing import Callable, Sequence

from torch.utils.data import Dataset


class DatasetError(RuntimeError):
    """A data set is missing or malformed; the message names the path and what was expected."""


class BenchmarkDataset:
    """One benchmark (CIFAR-10-C, ImageNet-C, PACS, ...): its classes, its domains, and how to read one
    domain (at one severity) from DATA_DIR as a torch Dataset of (image tensor, label) pairs.

    Subclasses set the class attributes and implement ``build_domain``; register them with
    ``@register_dataset``."""
    name: str = ""
    class_names: Sequence[str] = ()
    # Templates for CLIP.PROMPT_MODE ensemble.
    ensemble_templates: Sequence[str] = ()
    domains: Sequence[str] = ()
    # Whether domains come in severities (corruptions) or not (domain generalisation).
    has_severities: bool = True
    # Name of the domain column in tables.
    domain_label: str = "corruption"

    def check_domain(self, domain: str) -> None:
        if domain not in self.domains:
            near = difflib.get_close_matches(domain, self.domains, n=3, cutoff=0.4)
            raise DatasetError(f"'{domain}' is not a domain of {self.name} (CORRUPTION.TYPE). "
                               f"Nearest: {near}; all: {list(self.domains)}")

    def build_domain(self, cfg, domain: str, severity: int, transform: Callable) -> Dataset:
        raise NotImplementedError

    def describe(self, cfg) -> dict:
        """Data-set facts recorded in the results (e.g. which ImageNet-C list was used)."""
        return {}


DATASETS: dict[str, BenchmarkDataset] = {}


def register_dataset(cls: type[BenchmarkDataset]) -> type[BenchmarkDataset]:
    if cls.name in DATASETS:
        raise ValueError(f"data set '{cls.name}' is registered twice")
    DATASETS[cls.name] = cls()
    return cls


def get_dataset(name: str) -> BenchmarkDataset:
    if name not in DATASETS:
        near = difflib.get_close_matches(name, list(DATASETS), n=3, cutoff=0.4)
        raise DatasetError(f"Unknown data set CORRUPTION.DATASET '{name}'. Nearest: {near}; "
                           f"registered: {sorted(DATASETS)}")
    return DATASETS[name]
