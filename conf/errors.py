"""The suite's one family of user-facing errors.

A ``UserError`` says that something the user asked for cannot be done as asked: a config key or value, a data
path or layout, CLIP weights, a setting, results to compare. Every entry point reports it as one line,
``error: <message>``, and exits with status 2 (harness/cli.py); anything else is a bug and keeps its traceback.
Each layer defines its own subclass (DatasetError, WeightsError, SettingError, ...) so callers can tell them
apart, but nobody has to list them to catch them all."""
from __future__ import annotations


class UserError(Exception):
    """Bad input, with a message that names the key, path or value and what was expected."""

    def one_line(self) -> str:
        """The message on one line (a multi-line message's lines joined by '; ')."""
        return "; ".join(line.strip() for line in str(self).splitlines() if line.strip())


class ConfigError(UserError):
    """A config file, key or value is wrong."""
