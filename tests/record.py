"""The record of every shipped config, one file each (tests/data/records/<dataset>/<method>.json): the keys it sets
away from the suite's defaults, its config hash (the run folder's name, the identity runs are pooled by), and its
golden run on the tiny CLIP (tests/golden.py). tests/test_configs.py and tests/test_golden_runs.py compare every
shipped config with its record; a test that finds one missing, stale or changed prints the command that writes it:

    python -m tests.record cifar10_c/my_method shapes_c/my_method    record these configs (a new method's)
    python -m tests.record --prune                                   delete records of configs no longer shipped

It first writes the shipped configs' files conf/<dataset>/<method>.yaml (scripts/compose_configs.py), so that a
method added with its method config needs this one command.

Recording runs each config's golden run on four CPU code paths (tests/golden.py; seconds per config on the tiny
CLIP). A record changes only when the results are meant to change: say why in the commit."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.golden import CPU_PATH_SETTINGS, measure, mismatches, shipped_configs, spreads

RECORDS = Path(__file__).parent / "data" / "records"


def record_path(name: str) -> Path:
    return RECORDS / f"{name}.json"


def recorded_names() -> list[str]:
    return sorted(str(p.relative_to(RECORDS).with_suffix("")) for p in RECORDS.glob("*/*.json"))


def read_record(name: str) -> dict:
    return json.loads(record_path(name).read_text())


def differs_from_defaults(cfg) -> dict:
    """The keys of ``cfg`` whose values differ from the suite's defaults (with every method's node), as JSON."""
    import methods
    from conf import defaults
    from harness.identity import flatten
    base = flatten(dict(defaults(methods.declared_nodes())))
    return json.loads(json.dumps({k: v for k, v in flatten(dict(cfg)).items() if base[k] != v}))


def config_record(name: str) -> dict:
    """What a shipped config sets and its hash, as recorded."""
    from harness.build import load_cfg
    from harness.identity import config_hash
    cfg = load_cfg(f"conf/{name}.yaml")
    return {"config_hash": config_hash(cfg), "differs_from_defaults": differs_from_defaults(cfg)}


def write(names: list[str]) -> None:
    results = measure(names)
    for name in names:
        golden = {**results["native"][name], "cpu_path_spread": spreads(results, name),
                  "cpu_paths_measured": sorted(CPU_PATH_SETTINGS)}
        for label, entries in results.items():     # a path that changes a decisive prediction: say so
            problems = mismatches(entries[name], {**golden, "cpu_path_spread": [float("inf")] * len(golden["batch_sums"])})
            if problems:
                print(f"warning: {name} on the {label} CPU path: {'; '.join(problems)}")
        path = record_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**config_record(name), "golden_run": golden}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


def prune() -> None:
    for name in sorted(set(recorded_names()) - set(shipped_configs())):
        record_path(name).unlink()
        print(f"deleted {record_path(name)} ({name} is no longer shipped)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="shipped configs, as <dataset>/<method>")
    parser.add_argument("--all", action="store_true", help="record every shipped config (minutes)")
    parser.add_argument("--prune", action="store_true", help="delete the records of configs no longer shipped")
    args = parser.parse_args(argv)
    shipped = shipped_configs()
    unknown = [n for n in args.names if n not in shipped]
    if unknown:
        parser.error(f"not a shipped config: {unknown[0]} (shipped: conf/<dataset>/<method>.yaml, "
                     f"e.g. {next(iter(shipped))})")
    if not (args.names or args.all or args.prune):
        parser.error("name the configs to record (or --all, --prune)")
    from conf.compose import write_composition_files
    write_composition_files()
    if args.prune:
        prune()
    names = sorted(shipped) if args.all else args.names
    if names:
        write(names)


if __name__ == "__main__":
    sys.exit(main())
