"""Run one test-time adaptation method on one benchmark.

    python test_time.py --cfg conf/cifar10_c/source.yaml DATA_DIR /data MODEL.WEIGHTS openai

Overrides follow yacs: KEY VALUE pairs after the config file."""
from __future__ import annotations

import argparse
import logging
import sys

from conf import ConfigError, load_cfg
from harness.run import evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", dest="cfg_file", required=True, help="YAML config, e.g. conf/cifar10_c/batclip.yaml")
    parser.add_argument("--no-progress", action="store_true", help="hide the per-domain progress bars")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_cfg(args.cfg_file, args.opts)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    payload = evaluate(cfg, progress=not args.no_progress)   # logs the per-domain table
    print(f"results: {payload['provenance']['save_dir']}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
