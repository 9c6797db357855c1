"""Compare test-time adaptation methods side by side: one table, rows = methods, columns = domains + mean.

Run several methods on the same data, stream and backbone (method names resolve to conf/<dataset>/<name>.yaml;
config files are accepted too), each seed in turn, and tabulate:

    python scripts/compare.py --cfg conf/cifar10_c/source.yaml --methods source tent batclip DATA_DIR /data

Run them over K stream orders (TEST.ORDER_SEED 1..K; each row adds its tail, the mean of its worst 10% of runs):

    python scripts/compare.py --cfg conf/cifar10_c/source.yaml --methods source tent --orders 10 DATA_DIR /data

Tabulate existing results (runs of one config with different seeds become one row, mean ± std):

    python scripts/compare.py --results output/cifar10_c

Merge the shards of one run (e.g. each shard's results.json copied from its machine) into one results.json, then
tabulate it:

    python scripts/compare.py --merge host1/results.json host2/results.json --out merged/

The table is printed as Markdown; with --out (always, for a run of methods) it is also written as Markdown, CSV,
LaTeX and a PNG figure. The paper's row and the difference per cell follow every method the paper reports.
--html [PATH] also writes the results page: one self-contained HTML file with a sortable table per metric the
results have, the figures, and each cell's provenance (default: comparison.html beside the other outputs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import comparison, report  # noqa: E402
from harness.report import html  # noqa: E402
from harness.cli import entry_point, parse_command_line  # noqa: E402
from harness.logs import console_logging  # noqa: E402
from conf.files import atomic_write_text  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s (--methods M ... | --results PATH ... | --merge PATH ...) "
                                           "[flags] [KEY VALUE ...]")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--methods", nargs="+", metavar="METHOD", help="method names or config files to run")
    mode.add_argument("--results", nargs="+", metavar="PATH", help="results.json files or folders to tabulate")
    mode.add_argument("--merge", nargs="+", metavar="PATH", help="results.json files (shards of one run) to merge")
    parser.add_argument("--cfg", dest="cfg_file", help="base config: data set, setting, stream and backbone for "
                                                       "every method (default: the first method's config)")
    parser.add_argument("--seeds", nargs="+", help="run every method with each of these RNG_SEEDs")
    parser.add_argument("--orders", metavar="K", help="run every method over K stream orders (TEST.ORDER_SEED 1..K); "
                                                       "the table adds each row's tail, the mean of its worst 10%%")
    parser.add_argument("--metric", choices=list(report.METRICS), default="accuracy",
                        help="accuracy, error; calibration: ece (15 equal-width bins), nll, confidence; per class: "
                             "balanced_accuracy, worst_class; open set: auroc, fpr95, aupr_in, aupr_out, oscr; cost: "
                             "seconds_per_image, adapt_seconds_per_image, predict_seconds_per_image (ms per image), "
                             "peak_memory (MiB)")
    parser.add_argument("--no-paper", action="store_true", help="leave out the paper's rows")
    parser.add_argument("--figure", choices=["bars", "heatmap", "none"], default="bars")
    parser.add_argument("--out", help="folder for comparison.md/.csv/.tex/.png (and the merged results.json)")
    parser.add_argument("--html", nargs="?", const="", metavar="PATH",
                        help="also write the results page, one self-contained HTML file (default: comparison.html in "
                             "the folder of the other outputs; for --results without --out, the current folder)")
    parser.add_argument("--restart", action="store_true", help="start every run over instead of resuming")
    parser.add_argument("--domains", nargs="+", metavar="DOMAIN", help="run only these domains (RUN_DOMAINS)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide each run's progress (a bar on a terminal, else a line a minute and one per run)")
    args = parse_command_line(parser, argv)   # KEY VALUE overrides for every method: args.opts
    if args.seeds:
        try:
            args.seeds = [int(s) for s in args.seeds]
        except ValueError:
            parser.error(f"--seeds takes integers, got {args.seeds}")
        if len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds {' '.join(map(str, args.seeds))} gives a seed twice: its two runs would be "
                         f"pooled as two seeds")
    if args.methods is None and not (args.results or args.merge):
        parser.error("--methods needs at least one method name or config file")
    args.orders = _order_seeds(parser, args)
    return args


def _order_seeds(parser, args) -> list[int] | None:
    """TEST.ORDER_SEED 1..K for --orders K; refused where it cannot mean that."""
    if args.orders is None:
        return None
    if not args.orders.isdigit() or int(args.orders) < 1:
        parser.error(f"--orders takes a count K >= 1 (runs TEST.ORDER_SEED 1..K), got {args.orders!r}")
    if not args.methods:
        parser.error("--orders runs methods: give it with --methods (--results tables stream orders as they were run)")
    if "TEST.ORDER_SEED" in args.opts[0::2]:
        parser.error("--orders K sets TEST.ORDER_SEED 1..K for every run: leave out the TEST.ORDER_SEED override")
    return list(range(1, int(args.orders) + 1))


def _print_and_write(tables, out, figure) -> None:
    for table in tables:
        print(report.to_markdown(table))
        for run in table.incomplete:
            print(f"warning: incomplete run, its row has no mean and its missing cells are empty: {run}",
                  file=sys.stderr)
        if out:
            stem = "comparison" if len(tables) == 1 else f"comparison_{table.dataset}"
            for path in report.write_table(table, Path(out), stem, figure):
                print(f"wrote {path}")


def _write_html(args, groups_per_dataset, out, notes=()) -> None:
    """The results page of these row groups (--html), every metric their runs have; ``notes`` go under every
    table, as they do under the Markdown ones."""
    pages = html.pages_for(groups_per_dataset, args.metric, not args.no_paper)
    for page in pages:
        page.table.notes += list(notes)
    path = Path(args.html) if args.html else Path(out or ".") / "comparison.html"
    datasets = ", ".join(dict.fromkeys(page.table.dataset for page in pages))
    print(f"wrote {html.write_page(path, f'comparison: {datasets}', pages, figure=args.figure)}")


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    console_logging()
    with_paper = not args.no_paper
    if args.results:
        left_out: list[str] = []
        payloads = report.load_results(args.results, left_out)
        tables = report.tables_from_results(payloads, args.metric, with_paper)
        for line in left_out:          # said on the terminal and under every table written
            print(f"warning: left out {line}", file=sys.stderr)
            for table in tables:
                table.notes.append(f"left out {line}")
        _print_and_write(tables, args.out, args.figure)
        if args.html is not None:
            datasets = dict.fromkeys(p["dataset"] for p in payloads)
            by_dataset = [[p for p in payloads if p["dataset"] == d] for d in datasets]
            _write_html(args, [report.group_runs(runs) for runs in by_dataset], args.out,
                        [f"left out {line}" for line in left_out])
    elif args.merge:
        merged = report.merge(report.load_results(args.merge))
        out = Path(args.out) if args.out else Path(merged["provenance"]["save_dir"])
        atomic_write_text(out / "results.json", json.dumps(merged, indent=2, default=str) + "\n")
        print(f"merged {len(args.merge)} results into {out / 'results.json'}"
              + ("" if merged["complete"] else " (some domains of CORRUPTION.TYPE are still missing)"))
        table = report.build_table([(merged["method"], [merged])], args.metric, with_paper)
        _print_and_write([table], args.out, args.figure)
        if args.html is not None:
            _write_html(args, [[(merged["method"], [merged])]], out)
    else:
        overrides = {}
        if args.restart:
            overrides["RESUME"] = False
        if args.domains:
            overrides["RUN_DOMAINS"] = list(args.domains)
        configs = comparison.method_configs(args.methods, args.cfg_file, args.opts, args.seeds, overrides,
                                            args.orders)
        groups = comparison.run_comparison(configs, progress=not args.no_progress)
        table = report.build_table(groups, args.metric, with_paper)
        out = args.out or comparison.comparison_dir(configs[0][1][0].cfg, [label for label, _ in configs])
        _print_and_write([table], out, args.figure)
        if args.html is not None:
            _write_html(args, [groups], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
