"""Command-line helpers shared by test_time.py and scripts/compare.py."""
from __future__ import annotations

import re

# A yacs key as written on the command line: DATA_DIR, MODEL.ARCH, TEST.BATCH_SIZE ...
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*$")


def split_list_options(args, names) -> None:
    """argparse lets a list option ("--methods a b") swallow the KEY VALUE overrides that follow it; cut each list
    at its first config key and move that key and the rest in front of args.opts."""
    tail = []
    for name in names:
        values = getattr(args, name, None)
        if values:
            cut = next((i for i, v in enumerate(values) if CONFIG_KEY.match(v)), len(values))
            tail += values[cut:]
            setattr(args, name, values[:cut] or None)
    args.opts = tail + list(args.opts or [])
