"""The data-set registry and what every benchmark data set provides to the harness."""
from __future__ import annotations

import difflib
import random
from typing import Sequence

from conf.errors import UserError
from conf.registry import Registry


class DatasetError(UserError):
    """A data set is missing or malformed; the message names the path and what was expected."""


class ImageDataset:
    """The images of one domain as a run reads them: ``len()``, and ``[i]`` -> (PIL image, class index), what
    torch's DataLoader needs of a data set. Not torch's Dataset class, which adds nothing the harness uses and
    imports torch: the data-set registry loads without torch (the commands that only read files need it)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int):
        raise NotImplementedError

    def check_files(self) -> None:
        """The cheap checks of what will be read, run when the run is planned (before the model loads): a
        DatasetError naming the first file that cannot be an image. Decoding is left to the run."""


class BenchmarkDataset:
    """One benchmark (CIFAR-10-C, ImageNet-C, PACS, ...): its classes, its domains, and how to read one
    domain (at one severity) from DATA_DIR as an ImageDataset of (PIL image, class index) pairs. The harness
    applies the model's image transform; a data set only reads.

    Subclasses set the class attributes and implement ``build_domain``; register them with
    ``@register_dataset`` (docs/adding_a_dataset.md)."""
    name: str = ""
    class_names: Sequence[str] = ()
    # Templates for CLIP.PROMPT_MODE ensemble (CLIP's 18 CIFAR / 80 ImageNet templates).
    ensemble_templates: Sequence[str] = ()
    # CLIP.PROMPT_MODE coop: CoOp's per-data-set template (KaiyangZhou/CoOp trainers/zsclip.py CUSTOM_TEMPLATES).
    coop_templates: Sequence[str] = ()
    # CLIP.PROMPT_MODE tda: the per-data-set templates of TDA's code (kdiAAA/TDA datasets/<set>.py), which DPE
    # reuses; a list is averaged as an ensemble.
    tda_templates: Sequence[str] = ()
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

    def build_domain(self, cfg, domain: str, severity: int) -> ImageDataset:
        """The images of one domain at one severity, checked: every file this needs exists and has the expected
        layout, or a DatasetError names the path. Reading an image happens later, in the DataLoader. The data set
        lists the files it reads in ``source_files()`` (the run's identity covers them)."""
        raise NotImplementedError

    def prompt_templates(self, cfg) -> list[str]:
        """The templates of the zero-shot head for CLIP.PROMPT_MODE (custom: CLIP.PROMPT_TEMPLATE)."""
        mode = cfg.CLIP.PROMPT_MODE
        if mode == "custom":
            return list(cfg.CLIP.PROMPT_TEMPLATE)
        templates = {"ensemble": self.ensemble_templates, "coop": self.coop_templates,
                     "tda": self.tda_templates}[mode]
        if not templates:
            raise DatasetError(f"CLIP.PROMPT_MODE {mode}: {self.name} has no {mode} templates; use custom with "
                               f"CLIP.PROMPT_TEMPLATE, or a mode it has: {self.prompt_modes()}")
        return list(templates)

    def prompt_modes(self) -> list[str]:
        """The CLIP.PROMPT_MODE values this data set can serve."""
        return ["custom"] + [mode for mode, templates in (("ensemble", self.ensemble_templates),
                                                         ("coop", self.coop_templates),
                                                         ("tda", self.tda_templates)) if templates]

    def describe(self, cfg) -> dict:
        """Data-set facts recorded in the results (e.g. which ImageNet-C list was used)."""
        return {}

    def input_files(self, cfg) -> dict[str, str]:
        """The files that say which images are read and with which labels (list and split files), by what names
        them: their content enters the run's identity (the images themselves by path, size and time)."""
        return {}

    def config_warnings(self, cfg, keys_set: frozenset[str] | None = None) -> list[str]:
        """Where this data set reads what the config asks differently from the authors' suite (logged).
        ``keys_set``: the keys the config's file and command line set (None: not known)."""
        return []


# The clean test set of a corruption benchmark, as a domain (CORRUPTION.TYPE ['none'], as in the authors' suite).
CLEAN = "none"


def select_subset(items: list, cfg, where) -> list:
    """CORRUPTION.NUM_EX of a domain's ``items`` (-1: all of them, in the given order).

    ``items`` must be in the order the authors' suite's loader lists them. CORRUPTION.SUBSET "authors" draws what
    their ``get_test_loader`` draws: Python's ``random`` seeded with RNG_SEED shuffles the list, then
    ``random.sample`` takes NUM_EX of it (the sample's order is kept). "first_n": RobustBench's first NUM_EX."""
    n = cfg.CORRUPTION.NUM_EX
    if n < 0:
        return list(items)
    if n > len(items):
        raise DatasetError(f"{where}: CORRUPTION.NUM_EX {n} requested but it holds only {len(items)} images")
    if cfg.CORRUPTION.SUBSET == "first_n":
        return list(items[:n])
    rng = random.Random(cfg.RNG_SEED)
    shuffled = list(items)
    rng.shuffle(shuffled)
    return rng.sample(shuffled, n)


DATASETS = Registry("data set", "CORRUPTION.DATASET")


def register_dataset(cls: type[BenchmarkDataset]) -> type[BenchmarkDataset]:
    """Class decorator: registers one instance under ``cls.name`` (and the names in ``cls.aliases``)."""
    DATASETS.add(cls.name, cls(), getattr(cls, "aliases", ()))
    return cls


def get_dataset(name: str) -> BenchmarkDataset:
    return DATASETS.get(name)
