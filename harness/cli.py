"""What every command-line entry point shares: one way to read a command line (flags anywhere, yacs ``KEY VALUE``
overrides in order) and one way to report bad input (``error: <one line>``, exit status 2, the same line appended
to the run's log when a run folder exists)."""
from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from pathlib import Path

from conf.errors import UserError

# A yacs key as written on the command line: DATA_DIR, MODEL.ARCH, TEST.BATCH_SIZE ...
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*$")
EXIT_USER_ERROR = 2


def split_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the parser's flags with their values, wherever they stand; every other token, in order: the KEY VALUE
    overrides). A flag taking a list ("--domains a b") ends at the next flag or config key."""
    actions = parser._option_string_actions
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        action = actions.get(token.split("=", 1)[0]) if token.startswith("-") else None
        i += 1
        if action is None:
            (flags if token.startswith("--") else overrides).append(token)   # argparse refuses unknown flags
            continue
        flags.append(token)
        if "=" in token or action.nargs == 0:
            continue
        if action.nargs is None or isinstance(action.nargs, int):
            count = 1 if action.nargs is None else action.nargs
            flags += argv[i:i + count]
            i += count
            continue
        while i < len(argv) and not argv[i].startswith("--") and not CONFIG_KEY.match(argv[i]):
            flags.append(argv[i])
            i += 1
    return flags, overrides


def parse_command_line(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser``'s flags (anywhere on the line) plus ``args.opts``, the KEY VALUE overrides in order."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, overrides = split_command_line(parser, argv)
    args = parser.parse_args(flags)
    args.opts = overrides
    return args


def report_user_error(err: UserError) -> int:
    """Print ``error: <one line>`` (and append it to the run's log when there is one); the exit status."""
    line = f"error: {err.one_line()}"
    print(line, file=sys.stderr)
    log_path = getattr(err, "log_path", None)
    if log_path is not None and Path(log_path).parent.is_dir():
        with open(log_path, "a") as log:
            log.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")
    return EXIT_USER_ERROR


def entry_point(main):
    """Decorator for an entry point's ``main(argv) -> int``: a UserError ends it with one line and status 2;
    anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except UserError as err:
            return report_user_error(err)
    return run
