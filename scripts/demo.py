"""The suite end to end on a fresh machine, with nothing to download: zero-shot CLIP, TENT and BATCLIP on
Shapes-C, the embedded corruption benchmark (docs/demo.md).

    python scripts/demo.py      # under three minutes on 2 CPU cores (README, docs/demo.md)

1. What DATA_DIR/Shapes-C lacks of what the demo evaluates is generated: the seeded synthetic Shapes test split,
   corrupted with the 15 ImageNet-C corruptions at the evaluated severity (5) only, in the CIFAR-C layout
   (meta.json says which severities the files hold); what is there is reused (scripts/make_corrupted.py does
   the same for any data).
2. Each method runs through the suite's one harness (harness.run.evaluate) with its config
   conf/shapes_c/<method>.yaml (conf/datasets/shapes_c.yaml with conf/methods/<method>.yaml): the committed tiny
   CLIP (models/checkpoints/tiny-clip-shapes.pt), severity 5, reset at every corruption. Nothing here is
   special-cased; real runs differ only in their config.
3. A table of accuracies (%) is printed, one row per method, one column per corruption, and their mean;
   every run's records are written under SAVE_DIR as usual, the table to SAVE_DIR/demo_table.md (.csv, .tex)
   and the figure to SAVE_DIR/demo_table.png, by the suite's comparison code (harness/report/); both paths are
   printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from conf import ConfigError, config_names  # noqa: E402
from datasets.corruptions import CORRUPTIONS  # noqa: E402
from harness.cli import entry_point, parse_command_line  # noqa: E402
from harness.logs import console_logging  # noqa: E402
from harness.progress import Progress  # noqa: E402

DEFAULT_METHODS = ["source", "tent", "batclip"]
# Clean test images per severity in the generated Shapes-C, and the demo evaluates all of them: 2,000 per
# corruption (10 updates of batch 200, the paper's CIFAR batch), what fits three methods in three minutes on two
# CPU cores (CIFAR-10-C has 10,000: --images-per-severity 10000 --num-ex 10000).
DEFAULT_IMAGES_PER_SEVERITY = 2000
DEFAULT_SEVERITIES = [5]
GENERATOR_SEED = 0


def ensure_shapes_c(data_dir: Path, corruptions: list[str], images_per_severity: int, severities: list[int],
                    seed: int = GENERATOR_SEED, progress: bool = True, workers: int = 1) -> Path:
    """Generate in DATA_DIR/Shapes-C what the demo evaluates and the folder lacks (from the seeded Shapes test
    split), and reuse what is there. The files hold the requested severities only, and meta.json says so."""
    from datasets.corruptions import held_severities, write_corrupted
    from datasets.shapes import SHAPE_CLASSES, SPLIT_SEEDS, ShapesC, clean_split
    root = data_dir / ShapesC.folder
    source = f"datasets.shapes.clean_split('test', {images_per_severity}) (seed {SPLIT_SEEDS['test']})"
    meta_path = root / "meta.json"
    todo, keep = list(corruptions), sorted(set(severities))
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("source"), meta.get("seed")) != (source, seed):
            raise ConfigError(f"{root} was generated differently ({meta.get('source')}, seed {meta.get('seed')}) "
                              f"from what was asked ({source}, seed {seed}). Delete that folder to regenerate it, "
                              f"or pass --images-per-severity {meta.get('images_per_severity')}.")
        held = held_severities(root)
        if set(keep) <= set(held):
            keep = held                                   # reuse: add missing corruptions at the same severities
            todo = [c for c in corruptions if not (root / f"{c}.npy").is_file()]
        else:                                             # a severity is missing: every file is written anew
            keep = sorted(set(held) | set(keep))
            todo = sorted({p.stem for p in root.glob("*.npy") if p.stem != "labels"} | set(corruptions))
    if todo or not (root / "labels.npy").is_file():
        print(f"Generating Shapes-C in {root}: {len(todo)} corruption(s) x severities {keep} x "
              f"{images_per_severity} images", flush=True)
        images, labels = clean_split("test", images_per_severity)
        write_corrupted(images, labels, root, todo, seed=seed, class_names=SHAPE_CLASSES, source=source,
                        progress=lambda total, label: Progress(total, "generating Shapes-C", enabled=progress),
                        overwrite=True, workers=workers, severities=keep)
    return root


def run_methods(methods_wanted: list[str], opts: list[str], progress: bool = True) -> list[tuple[str, list[dict]]]:
    """(method, [payload]) for build_table: every method on the identical data and stream (the comparison's
    configs, harness.comparison.method_configs), each through harness.run.evaluate with its progress ("[2/3] tent":
    a bar on a terminal, a line a minute elsewhere); methods without a config or registration are skipped."""
    import methods
    from harness.build import build_plan
    from harness.comparison import method_configs
    from harness.run import evaluate
    runnable = []
    for name in methods_wanted:
        if f"shapes_c/{name}" not in config_names():
            print(f"[skip] {name}: no config conf/shapes_c/{name}.yaml (conf/methods/{name}.yaml lists no "
                  f"shapes_c under PER_DATASET)", flush=True)
        elif name not in methods.METHODS:
            print(f"[skip] {name}: method '{name}' is not registered in this checkout (methods/{name}.py)",
                  flush=True)
        else:
            runnable.append(name)
    if not runnable:
        return []
    configs = method_configs([f"conf/shapes_c/{name}.yaml" for name in runnable], opts=opts)
    groups = []
    for k, (name, (label, (loaded,))) in enumerate(zip(runnable, configs), 1):
        start = time.perf_counter()
        payload = evaluate(build_plan(loaded.cfg, loaded.keys_set), progress=progress,
                           label=f"[{k}/{len(runnable)}] {name}")
        print(f"{name}: mean accuracy {100 * payload['summary']['mean_accuracy']:.2f}% "
              f"({time.perf_counter() - start:.0f} s) -> {payload['provenance']['save_dir']}", flush=True)
        groups.append((label, [payload]))
    return groups


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data", help="DATA_DIR; Shapes-C is generated there if missing")
    parser.add_argument("--save-dir", default="./output/demo", help="SAVE_DIR for the results records")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="methods with a shapes_c config to run")
    parser.add_argument("--corruptions", nargs="+", default=CORRUPTIONS)
    parser.add_argument("--num-ex", type=int, default=DEFAULT_IMAGES_PER_SEVERITY,
                        help="test images per corruption (CORRUPTION.NUM_EX)")
    parser.add_argument("--batch-size", type=int, default=200, help="TEST.BATCH_SIZE (the paper's CIFAR value)")
    parser.add_argument("--severities", type=int, nargs="+", default=DEFAULT_SEVERITIES,
                        help="severities generated and evaluated (CORRUPTION.SEVERITY)")
    parser.add_argument("--images-per-severity", type=int, default=DEFAULT_IMAGES_PER_SEVERITY,
                        help="clean test images corrupted when Shapes-C is generated")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes generating Shapes-C (the files do not depend on it)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress (a bar on a terminal, else a line a minute and one per method)")
    parser.add_argument("--verbose", action="store_true", help="log every domain's result as it finishes")
    args = parse_command_line(parser, argv)   # further KEY VALUE config overrides: args.opts
    if args.num_ex > args.images_per_severity:
        parser.error(f"--num-ex {args.num_ex} exceeds --images-per-severity {args.images_per_severity}")
    # The console handler's level, not the root's: the harness lowers the root level to INFO for its log file.
    console = console_logging(logging.INFO if args.verbose else logging.WARNING)
    try:
        return run_demo(args)
    finally:
        logging.getLogger().removeHandler(console)


def run_demo(args) -> int:
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)

    data_dir = Path(args.data_dir)
    start = time.perf_counter()
    ensure_shapes_c(data_dir, args.corruptions, args.images_per_severity, args.severities,
                    progress=not args.no_progress, workers=args.workers)
    setup_seconds = time.perf_counter() - start

    opts = ["DATA_DIR", str(data_dir), "SAVE_DIR", args.save_dir, "CORRUPTION.NUM_EX", str(args.num_ex),
            "TEST.BATCH_SIZE", str(args.batch_size), "CORRUPTION.TYPE", repr(list(args.corruptions)),
            "CORRUPTION.SEVERITY", repr(sorted(set(args.severities))), *args.opts]
    start = time.perf_counter()
    groups = run_methods(args.methods, opts, progress=not args.no_progress)
    run_seconds = time.perf_counter() - start
    if not groups:
        print("No method ran.", file=sys.stderr)
        return 1

    from harness.report import build_table, to_markdown, write_table
    table = build_table(groups, with_paper=False)
    print("\n" + to_markdown(table))
    print(f"set-up {setup_seconds:.0f} s, evaluation {run_seconds:.0f} s")
    save_dir = Path(args.save_dir)
    written = write_table(table, save_dir, stem="demo_table")
    print(f"table: {written[0]}")
    figure = [p for p in written if p.suffix == ".png"]
    print(f"figure: {figure[0]}" if figure else "figure: not drawn (matplotlib is not installed)")
    (save_dir / "demo.json").write_text(json.dumps(
        {"methods": {m: {"summary": p[0]["summary"], "records": p[0]["records"],
                         "save_dir": p[0]["provenance"]["save_dir"]} for m, p in groups},
         "num_ex": args.num_ex, "batch_size": args.batch_size, "corruptions": list(args.corruptions),
         "setup_seconds": setup_seconds, "evaluation_seconds": run_seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
