"""SETTING -> the sequence of tasks the harness runs.

A task is a list of segments (domain, severity) that form one stream, whether the method is reset before
it, and how the segments' samples are ordered in the stream. Accuracy is always counted per segment.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    domain: str
    severity: int


@dataclass
class Task:
    segments: list[Segment]
    reset: bool                 # reset the method to the source state before this task
    order: str = "sequential"   # "sequential": segment after segment; "shuffled": all samples mixed


def _domain_major(cfg) -> list[Segment]:
    return [Segment(d, s) for d in cfg.CORRUPTION.TYPE for s in cfg.CORRUPTION.SEVERITY]


def reset_each_shift(cfg) -> list[Task]:
    return [Task([seg], reset=True) for seg in _domain_major(cfg)]


def continual(cfg) -> list[Task]:
    return [Task([seg], reset=(i == 0)) for i, seg in enumerate(_domain_major(cfg))]


SETTINGS = {"reset_each_shift": reset_each_shift, "continual": continual}


def build_tasks(cfg) -> list[Task]:
    return SETTINGS[cfg.SETTING](cfg)
