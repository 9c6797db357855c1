"""The data-set registry and what every benchmark data set provides to the harness."""
from __future__ import annotations

import difflib
from typing import Sequence

from torch.utils.data import Dataset

from conf.errors import UserError
from conf.registry import Registry


class DatasetError(UserError):
    """A data set is missing or malformed; the message names the path and what was expected."""


class BenchmarkDataset:
    """One benchmark (CIFAR-10-C, ImageNet-C, PACS, ...): its classes, its domains, and how to read one
    domain (at one severity) from DATA_DIR as a torch Dataset of (PIL image, class index) pairs. The harness
    applies the model's image transform; a data set only reads.

    Subclasses set the class attributes and implement ``build_domain``; register them with
    ``@register_dataset`` (docs/adding_a_dataset.md)."""
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

    def build_domain(self, cfg, domain: str, severity: int) -> Dataset:
        """The images of one domain at one severity, checked: every file this needs exists and has the expected
        layout, or a DatasetError names the path. Reading an image happens later, in the DataLoader. The Dataset
        lists the files it reads in ``source_files()`` (the run's identity covers them)."""
        raise NotImplementedError

    def describe(self, cfg) -> dict:
        """Data-set facts recorded in the results (e.g. which ImageNet-C list was used)."""
        return {}


DATASETS = Registry("data set", "CORRUPTION.DATASET")


def register_dataset(cls: type[BenchmarkDataset]) -> type[BenchmarkDataset]:
    """Class decorator: registers one instance under ``cls.name``."""
    DATASETS.add(cls.name, cls())
    return cls


def get_dataset(name: str) -> BenchmarkDataset:
    return DATASETS.get(name)
