"""Out-of-distribution (OOD) data sets for open-set streams (harness/open_set.py): images of classes that none of
the in-distribution set's classes names, read in the layouts users have on disk. Registers no benchmark data set.

An OOD set names its classes (for the class-overlap check against the in-distribution set), its domains (a set
without corruptions has the one domain ``none``; a corrupted one has ``none`` and its corruptions, at severities
1..5) and reads one domain as an ImageDataset of (PIL image, class index within the OOD set). The harness gives
every OOD image the label -1 and an ``is_ood`` flag that it keeps to itself.

Every registered benchmark data set (``datasets.DATASETS``) is also an OOD set under its own name, e.g.
``cifar100_c`` beside ``cifar10_c`` as CLIPTTA does (``get_ood_set``)."""
from __future__ import annotations

import difflib
from typing import Sequence

from conf.errors import ConfigError
from conf.registry import Registry
from datasets.base import CLEAN, DATASETS, BenchmarkDataset, DatasetError, ImageDataset
from datasets.corruptions import CORRUPTIONS, NUM_SEVERITIES

OOD_SETS = Registry("OOD data set", "OPEN_SET.OOD_DATASET")


class OodSet:
    """One out-of-distribution data set. Subclasses set the class attributes and implement ``build``; register
    them with ``@register_ood_set``."""
    name: str = ""
    # Its classes, for the overlap check (names compared lower-cased, '_' and '-' read as spaces). Empty only
    # for a set whose curators removed every class of the in-distribution sets named in ``disjoint_from``.
    class_names: Sequence[str] = ()
    disjoint_from: Sequence[str] = ()
    domains: Sequence[str] = (CLEAN,)
    has_severities: bool = False
    # One line: where it is read from under DATA_DIR (messages and docs).
    layout: str = ""

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        """The images of one domain (at one severity where the set has severities), checked as a benchmark's
        ``build_domain`` is: every file it needs exists, or a DatasetError names the path. The ImageDataset lists
        its files in ``source_files()`` and has ``check_files()``."""
        raise NotImplementedError

    def describe(self, cfg) -> dict:
        """Facts recorded in the results' provenance (which list file, how many images)."""
        return {}

    def class_names_for(self, cfg) -> Sequence[str]:
        """The class names for the overlap check, when the run is planned; a set that reads them from its
        release (Places365's category file) overrides this."""
        return tuple(self.class_names)


def check_ood_domain(ood: OodSet, domain: str) -> None:
    """A DatasetError naming the OOD set's domains where ``domain`` is not one of them."""
    if domain not in ood.domains:
        near = difflib.get_close_matches(str(domain), list(ood.domains), n=3, cutoff=0.4)
        raise DatasetError(f"'{domain}' is not a domain of the OOD set {ood.name}. Nearest: {near}; all: "
                           f"{list(ood.domains)}")


def check_ood_severity(ood: OodSet, severity: int) -> None:
    if not 1 <= severity <= NUM_SEVERITIES:
        raise DatasetError(f"OOD set {ood.name}: severity {severity} is not in 1..{NUM_SEVERITIES}")


class CorruptedOodSet(OodSet):
    """An OOD set with the clean domain ``none`` (no severity) and the 15 corruptions at severities 1..5: ``build``
    checks the domain and severity, then reads ``read_clean`` or ``read_corrupted``."""
    domains = (CLEAN, *CORRUPTIONS)
    has_severities = True

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        check_ood_domain(self, domain)
        if domain == CLEAN:
            return self.read_clean(cfg)
        check_ood_severity(self, severity)
        return self.read_corrupted(cfg, domain, severity)

    def read_clean(self, cfg) -> ImageDataset:
        raise NotImplementedError

    def read_corrupted(self, cfg, domain: str, severity: int) -> ImageDataset:
        raise NotImplementedError


def register_ood_set(cls: type[OodSet]) -> type[OodSet]:
    OOD_SETS.add(cls.name, cls(), getattr(cls, "aliases", ()))
    return cls


class BenchmarkAsOod(OodSet):
    """A registered benchmark data set read as an OOD set: its classes and domains; a domain is read whole
    (CORRUPTION.NUM_EX of the run applies to the in-distribution set only)."""

    def __init__(self, dataset: BenchmarkDataset):
        self.dataset = dataset
        self.name = dataset.name
        self.class_names = tuple(dataset.class_names)
        self.domains = tuple(dataset.domains)
        self.has_severities = bool(getattr(dataset, "has_severities", True))
        self.layout = f"as the benchmark data set {dataset.name} (docs/adding_a_dataset.md)"

    def build(self, cfg, domain: str, severity: int) -> ImageDataset:
        own = cfg.clone()
        own.defrost()
        own.CORRUPTION.DATASET = self.dataset.name
        own.CORRUPTION.NUM_EX = -1
        return self.dataset.build_domain(own, domain, severity)

    def describe(self, cfg) -> dict:
        return dict(self.dataset.describe(cfg))


def get_ood_set(name: str) -> OodSet:
    """The OOD set registered as ``name``, or the benchmark data set of that name read as one; an unknown name
    is a ConfigError naming OPEN_SET.OOD_DATASET and the nearest names."""
    if name in OOD_SETS:
        return OOD_SETS.get(name)
    if name in DATASETS:
        return BenchmarkAsOod(DATASETS.get(name))
    known = sorted(OOD_SETS.names()) + sorted(DATASETS.names())
    near = difflib.get_close_matches(str(name), known, n=3, cutoff=0.4)
    raise ConfigError(f"Unknown OPEN_SET.OOD_DATASET '{name}'. Nearest: {near}; OOD sets: {sorted(OOD_SETS.names())}; "
                      f"any benchmark data set: {sorted(DATASETS.names())}")


def normalised_class_name(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def overlapping_classes(in_distribution: Sequence[str], ood: Sequence[str]) -> list[str]:
    """The class names the two lists share (after normalised_class_name), in the in-distribution set's order."""
    theirs = {normalised_class_name(c) for c in ood}
    return [c for c in in_distribution if normalised_class_name(c) in theirs]
