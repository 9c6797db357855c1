"""SETTING -> the sequence of tasks the harness runs.

A task is a list of segments (domain, severity) that form one stream, whether the method is reset to the source
state before it, how the segments' samples are ordered in the stream, and whether the stream is sorted by label
(temporally correlated). Accuracy is always counted per segment.

The settings follow the anchor suite (mariodoebler/test-time-adaptation, classification/test_time.py and
datasets/data_loading.py):

- ``reset_each_shift``: domain after domain; the method is reset at the start of every domain. With several
  severities the severities of one domain follow each other without a reset (as in the anchor suite).
- ``continual``: domain after domain, severity after severity; reset once, at the very start.
- ``gradual``: like continual, but every domain runs through the severities 1,2,3,4,5,4,3,2,1 when
  CORRUPTION.SEVERITY holds one value (the anchor suite's sequence); with several values, those values in order.
  Needs a data set with severities.
- ``mixed_domains``: for each severity, the samples of all domains shuffled into one stream (reset once, at the
  start); accuracy still reported per domain.
- ``correlated``: like continual, but each domain's stream is sorted by class label (TEST.DELTA_DIRICHLET = 0) or
  ordered by Dirichlet-distributed class chunks with concentration TEST.DELTA_DIRICHLET (> 0).
- ``<setting>_correlated`` for reset_each_shift, gradual and mixed_domains: that setting with the label
  correlation applied to each stream (for mixed_domains: to the whole mixed stream).

Data sets without severities (``dataset.has_severities`` False, e.g. domain generalisation) have one segment per
domain with severity 0; CORRUPTION.SEVERITY is ignored for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import datasets
from conf.errors import UserError
from conf.registry import Registry

# The anchor suite's per-domain severity sequence for SETTING gradual (CORRUPTION.SEVERITY with one value).
GRADUAL_SEVERITIES = [1, 2, 3, 4, 5, 4, 3, 2, 1]
# Severity recorded for domains of data sets that have no severities.
NO_SEVERITY = 0


class SettingError(UserError):
    """A SETTING cannot run as configured (e.g. gradual on a data set without severities)."""


SETTINGS = Registry("setting", "SETTING")


def register_setting(name: str):
    """Decorator for a function (cfg, has_severities) -> list[Task]."""
    return SETTINGS.register(name)


@dataclass(frozen=True)
class Segment:
    domain: str
    severity: int


@dataclass
class Task:
    segments: list[Segment]
    reset: bool                 # reset the method to the source state before this task
    order: str = "sequential"   # "sequential": segment after segment; "shuffled": all samples mixed
    # "none", "label" (sorted by class label), "dirichlet" (anchor suite) or "stata" (StatA's sampler), the last
    # two with concentration TEST.DELTA_DIRICHLET
    correlation: str = "none"
    dirichlet_delta: float = 0.0


def _severities(cfg, has_severities: bool) -> list[int]:
    return [int(s) for s in cfg.CORRUPTION.SEVERITY] if has_severities else [NO_SEVERITY]


def _domain_major(cfg, has_severities: bool) -> list[Segment]:
    return [Segment(d, s) for d in cfg.CORRUPTION.TYPE for s in _severities(cfg, has_severities)]


@register_setting("reset_each_shift")
def reset_each_shift(cfg, has_severities: bool) -> list[Task]:
    # Reset when a new domain starts; several severities of one domain share its adaptation (anchor suite).
    tasks, previous = [], None
    for seg in _domain_major(cfg, has_severities):
        tasks.append(Task([seg], reset=seg.domain != previous))
        previous = seg.domain
    return tasks


@register_setting("continual")
def continual(cfg, has_severities: bool) -> list[Task]:
    return [Task([seg], reset=(i == 0)) for i, seg in enumerate(_domain_major(cfg, has_severities))]


@register_setting("gradual")
def gradual(cfg, has_severities: bool) -> list[Task]:
    if not has_severities:
        raise SettingError(f"SETTING gradual varies the severity, but data set '{cfg.CORRUPTION.DATASET}' has no "
                           f"severities; use continual or reset_each_shift")
    severities = (GRADUAL_SEVERITIES if len(cfg.CORRUPTION.SEVERITY) == 1
                  else [int(s) for s in cfg.CORRUPTION.SEVERITY])
    segments = [Segment(d, s) for d in cfg.CORRUPTION.TYPE for s in severities]
    return [Task([seg], reset=(i == 0)) for i, seg in enumerate(segments)]


@register_setting("mixed_domains")
def mixed_domains(cfg, has_severities: bool) -> list[Task]:
    return [Task([Segment(d, s) for d in cfg.CORRUPTION.TYPE], reset=(i == 0), order="shuffled")
            for i, s in enumerate(_severities(cfg, has_severities))]


def _correlated(base):
    def build(cfg, has_severities: bool) -> list[Task]:
        delta = float(cfg.TEST.DELTA_DIRICHLET)
        tasks = base(cfg, has_severities)
        for task in tasks:
            task.correlation = ("stata" if cfg.TEST.CORRELATION_SAMPLER == "stata" else "dirichlet") if delta > 0 \
                else "label"
            task.dirichlet_delta = delta
        return tasks
    build.__name__ = f"{base.__name__}_correlated"
    return build


# The anchor suite's "correlated" never resets between domains (only reset_each_shift* does).
SETTINGS.add("correlated", _correlated(continual))
for _base in (reset_each_shift, gradual, mixed_domains):
    SETTINGS.add(f"{_base.__name__}_correlated", _correlated(_base))


def build_tasks(cfg, dataset=None) -> list[Task]:
    """The tasks of cfg's SETTING on cfg's data set (or on ``dataset``, when given)."""
    dataset = dataset if dataset is not None else datasets.get_dataset(cfg.CORRUPTION.DATASET)
    return SETTINGS.get(cfg.SETTING)(cfg, bool(getattr(dataset, "has_severities", True)))


def tasks_to_run(tasks: list[Task], wanted: set[int]) -> list[int]:
    """The task indices to run so that every wanted task starts from the state it would have in a full run:
    a task that is not reset continues from its predecessor's state, so its predecessor runs too, back to the
    nearest task that resets."""
    run = set(wanted)
    for index in sorted(wanted, reverse=True):
        k = index
        while k > 0 and not tasks[k].reset:
            k -= 1
            run.add(k)
    return sorted(run)
