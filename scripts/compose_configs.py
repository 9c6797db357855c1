"""Write the shipped configs conf/<dataset>/<method>.yaml, one per data set under PER_DATASET in each method config
(conf/methods/<method>.yaml), each one key: COMPOSE: [conf/datasets/<dataset>.yaml, conf/methods/<method>.yaml].
Files of compositions no longer listed there are deleted. tests/test_configs.py fails, naming this command, when
the files and the method configs disagree.

    python scripts/compose_configs.py"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conf.compose import write_composition_files  # noqa: E402

if __name__ == "__main__":
    write_composition_files()
