"""Logging for runs and entry points: our records readable in a terminal and in a cluster job's log file.

open_clip logs its routine steps (parsing the model name, loading the config, ...) at INFO on the root logger;
they are dropped below WARNING so that they do not drown the run's own records. Progress is harness/progress.py:
a bar on a terminal (these records printed above it), a plain line a minute in a file, never carriage-return
residue on the lines of the log records."""
from __future__ import annotations

import logging
import sys

from conf.files import WriteError

NOISY_LIBRARIES = ("open_clip", "submitit")


class LibraryNoiseFilter(logging.Filter):
    """Drops records below WARNING that come from the files of NOISY_LIBRARIES."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        path = record.pathname.replace("\\", "/")
        return not any(f"/{name}/" in path for name in NOISY_LIBRARIES)


def console_logging(level: int = logging.INFO) -> logging.Handler:
    """The entry points' console handler (stderr), with the filter; replaces an earlier one of ours."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_suite_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._suite_console = True
    handler.setLevel(level)
    handler.addFilter(LibraryNoiseFilter())
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    return handler


class RunLogHandler(logging.FileHandler):
    """A run's log file. A record it cannot write (a full disk, a folder gone) stops the run with one line, as
    every other write of a run does, instead of logging's traceback on stderr and a run without its log."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            raise WriteError(f"cannot write the run's log {self.baseFilename}: {err.strerror or err}") from None
        super().handleError(record)


def file_logging(path) -> logging.Handler:
    handler = RunLogHandler(path, mode="a")
    handler.addFilter(LibraryNoiseFilter())
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler

