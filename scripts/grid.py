"""Run a whole grid of experiments (data sets x methods x seeds x settings) on SLURM, on this machine's GPUs or
CPU, or in this process, and tabulate it as the paper's tables. Jobs are spread with submitit; re-running a
command skips what is finished and resumes the rest from its finished tasks.

    python scripts/grid.py run grids/paper_main.yaml --launcher slurm --partition gpu --timeout-min 240 DATA_DIR /data
    python scripts/grid.py run grids/tiny.yaml --launcher local --parallel 2     # after scripts/demo.py
    python scripts/grid.py status grids/paper_main.yaml DATA_DIR /data
    python scripts/grid.py run grids/paper_main.yaml --launcher slurm --partition gpu --retry-failed DATA_DIR /data
    python scripts/grid.py report grids/paper_main.yaml DATA_DIR /data

``KEY VALUE`` overrides apply to every cell (give status and report the same ones as run: they find the jobs
by their configs). A grid file's format: harness/grid/spec.py; the cluster recipes: docs/cluster.md."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Jobs run in fresh processes (here or on other nodes) that import the suite: they find it through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

from harness import grid as grids  # noqa: E402
from harness import launch, report  # noqa: E402
from harness.report import html  # noqa: E402
from harness.cli import entry_point, parse_command_line  # noqa: E402
from harness.logs import console_logging  # noqa: E402

COMMANDS = ("run", "status", "report")
RUN_FLAGS = {"--parallel": "parallel", "--gpus-per-job": "gpus_per_job", "--cpus-per-job": "cpus_per_job",
             "--timeout-min": "timeout_min", "--partition": "partition", "--array-parallelism": "array_parallelism",
             "--mem-gb": "mem_gb", "--slurm-param": "slurm_param", "--setup": "setup", "--retry-failed": "retry_failed",
             "--no-wait": "no_wait", "--dry-run": "dry_run"}
USAGE = "%(prog)s {run,status,report} GRID [flags] [KEY VALUE ...]"


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, usage=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launcher", choices=launch.LAUNCHERS, default="local",
                        help="run: slurm (a job array), local (worker processes here), debug (this process)")
    parser.add_argument("--parallel", type=int, help="local: worker processes (default: one per visible GPU, or 1)")
    parser.add_argument("--gpus-per-job", type=int,
                        help="GPUs per job (slurm: 1 where the partition has GPUs, else 0; local: 1 if any is visible)")
    parser.add_argument("--cpus-per-job", type=int, help="CPU threads per job (slurm: --cpus-per-task)")
    parser.add_argument("--timeout-min", type=int, help="a job's time limit in minutes (slurm default 240); a job "
                                                        "reaching it is requeued and resumes")
    parser.add_argument("--partition", help="slurm: the partition")
    parser.add_argument("--array-parallelism", type=int, help="slurm: jobs of the array running at once")
    parser.add_argument("--mem-gb", type=float, help="slurm: memory per job")
    parser.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                        help="slurm: a further sbatch parameter, e.g. account=abc or qos=high (repeatable)")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="slurm: a shell line run before each job, e.g. 'source .venv/bin/activate' (repeatable)")
    parser.add_argument("--retry-failed", action="store_true", help="run: submit only the failed jobs")
    parser.add_argument("--no-wait", action="store_true", help="run: submit and return (see status, report)")
    parser.add_argument("--dry-run", action="store_true", help="run: list the jobs that would be submitted")
    parser.add_argument("--metric", choices=list(report.METRICS), default="accuracy",
                        help="accuracy, error; calibration: ece (15 equal-width bins), nll, confidence; per class: "
                             "balanced_accuracy, worst_class; open set: auroc, fpr95, aupr_in, aupr_out, oscr; cost: "
                             "seconds_per_image, adapt_seconds_per_image, predict_seconds_per_image (ms per image), "
                             "peak_memory (MiB)")
    parser.add_argument("--no-paper", action="store_true", help="report: leave out the paper's rows")
    parser.add_argument("--figure", choices=["bars", "heatmap", "none"], default="bars")
    parser.add_argument("--html", nargs="?", const="", metavar="PATH",
                        help="report: also write the results page, one self-contained HTML file with every metric's "
                             "table, the figures and each cell's provenance (default: <grid name>.html beside the "
                             "tables)")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        sys.exit(0)
    if len(argv) < 2 or argv[0] not in COMMANDS or argv[1].startswith("-"):
        parser.error(f"expected a command ({', '.join(COMMANDS)}) and a grid file first, got {' '.join(argv[:2])!r}")
    args = parse_command_line(parser, argv[2:])
    args.command, args.grid = argv[0], argv[1]
    if args.command != "run":
        given = [flag for flag, value in RUN_FLAGS.items() if getattr(args, value) not in (None, False, [])]
        given += ["--launcher"] if any(t.split("=")[0] == "--launcher" for t in argv[2:]) else []
        if given:
            parser.error(f"{given[0]} is a flag of 'run', not of '{args.command}'")
    if args.command == "status" and args.html is not None:
        parser.error("--html is a flag of 'report' (and 'run', which reports at its end), not of 'status'")
    params = {}
    for item in args.slurm_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--slurm-param takes KEY=VALUE, got {item!r}")
        params[key] = value
    args.options = launch.LaunchOptions(args.launcher, args.parallel, args.gpus_per_job, args.cpus_per_job,
                                        args.timeout_min, args.partition, args.array_parallelism, args.mem_gb,
                                        params, list(args.setup))
    return args


def current_statuses(grid) -> list:
    """Every job's status, with what the scheduler of its last submission says."""
    return grids.job_statuses(grid, launch.scheduler_states(grid))


def print_status(grid, statuses) -> dict:
    counts = {state: 0 for state in grids.JOB_STATES}
    width = max(len(s.job.id) for s in statuses)
    for s in statuses:
        counts[s.state] += 1
        line = f"{s.state:8} {s.job.id:{width}}"
        if s.detail:
            line += f"  {s.detail}"
        if s.state == "failed":
            line += f"  [log: {s.log}]"
        print(line.rstrip())
    print(f"{grid.name}: " + ", ".join(f"{counts[k]} {k}" for k in grids.JOB_STATES) + f" of {len(statuses)} jobs")
    print(grids.compute_summary(statuses))
    return counts


def write_tables(grid, args) -> None:
    """The tables of ``args.metric`` (Markdown, CSV, LaTeX, figure), the figures against the grid's batch-size and
    classes-per-batch axes, and with --html the results page."""
    grids.claim_folder(grid)
    out = grid.folder / "tables"
    for table in grids.grid_tables(grid, args.metric, not args.no_paper):
        print(report.to_markdown(table))
        for path in report.write_table(table, out, table.dataset, args.figure):
            print(f"wrote {path}")
    axis_figures = write_axis_figures(grid, args.metric, out)
    if args.html is not None:
        page = Path(args.html) if args.html else out / f"{grid.name}.html"
        print(f"wrote {write_page(grid, args, page, axis_figures)}")


def write_axis_figures(grid, metric: str, out: Path) -> dict[str, list[tuple[str, Path]]]:
    """Per data set, the metric against each axis (batch_sizes, classes_per_batch) whose cells take several values:
    <out>/<data set>_<axis>.png, a line per method; returns {data set: [(title, path)]}."""
    from harness.grid.tables import grid_axis_points, plotted_axes
    from harness.report.axis_figure import draw_axis_figure
    written: dict[str, list[tuple[str, Path]]] = {}
    for axis in plotted_axes(grid):
        for dataset, lines in grid_axis_points(grid, axis, metric).items():
            title = f"{dataset}: {metric} against {axis}"
            path = draw_axis_figure(lines, axis, out / f"{dataset}_{axis}.png", title, metric)
            if path is None:
                print(f"no figure of {metric} against {axis}: matplotlib is not installed")
                return written
            print(f"wrote {path}")
            written.setdefault(dataset, []).append((title, path))
    return written


def write_page(grid, args, path: Path, axis_figures: dict[str, list[tuple[str, Path]]]) -> Path:
    """The grid's results page: the tables of every metric its results have (one per data set, rows as the tables'
    rows), each cell with the provenance of the runs pooled in it, and the figures against the grid's axes."""
    groups = [rows for _, rows in grids.grid_row_groups(grid)]
    pages = html.pages_for(groups, args.metric, not args.no_paper)
    payloads = [p for rows in groups for _, runs in rows for p in runs]
    done = sum(bool(p["records"]) for p in payloads)
    embedded = {dataset: [(title, png.read_bytes()) for title, png in figures]
                for dataset, figures in axis_figures.items()}
    return html.write_page(path, f"{grid.name}: results", pages,
                           [f"grid {grid.path}: {len(grid.cells)} cells, {done} with results"], args.figure, embedded)


def run(grid, args) -> int:
    options = args.options
    launch.check_launcher(options)
    statuses = current_statuses(grid)
    blocked = [s for s in statuses if s.records_error]
    if blocked:       # each would fail on it where it runs: say it once, here, before anything is submitted
        raise grids.GridError(f"{grid.path}: {len(blocked)} job(s) cannot resume the records in their run folders, "
                              f"e.g. {blocked[0].job.id}: {blocked[0].records_error}")
    wanted = {"failed"} if args.retry_failed else {"failed", "pending"}
    to_run = [s.job for s in statuses if s.state in wanted]
    skipped = {state: sum(s.state == state for s in statuses) for state in ("done", "running")}
    print(f"{grid.name}: {len(to_run)} of {len(statuses)} jobs to submit ({skipped['done']} done, "
          f"{skipped['running']} running" + (", pending ones left alone" if args.retry_failed else "") + ")")
    if args.dry_run:
        for job in to_run:
            print(f"  {job.id}  {job.config_file} {' '.join(job.opts)}")
        return 0
    if to_run:
        grids.check_inputs(grid, to_run)
        grids.claim_folder(grid)
        handles = launch.submit(grid, to_run, options)
        print(f"submitted {len(to_run)} jobs with --launcher {options.launcher}; the launcher's output in "
              f"{grid.folder / 'submitit'}")
        if args.no_wait:
            print(f"follow with: python scripts/grid.py status {args.grid} {' '.join(args.opts)}".rstrip())
            return 0
        submitted = {job.id for job in to_run}

        def count():
            current = [s for s in current_statuses(grid) if s.job.id in submitted]
            states = {k: sum(s.state == k for s in current) for k in grids.JOB_STATES}
            note = ", ".join(f"{states[k]} {k}" for k in ("running", "failed") if states[k])
            return states["done"] + states["failed"], note
        launch.wait(handles, count, len(to_run), label=grid.name)
    counts = print_status(grid, current_statuses(grid))
    write_tables(grid, args)
    again = f"python scripts/grid.py run {args.grid} {' '.join(args.opts)}".rstrip()
    if counts["failed"]:
        print(f"{counts['failed']} job(s) failed; see their lines above, then: {again} --retry-failed", file=sys.stderr)
    if counts["pending"]:     # none runs them now: left alone by --retry-failed, or their worker was killed
        print(f"{counts['pending']} job(s) still pending, and no worker runs them (--retry-failed leaves pending jobs "
              f"alone; a killed worker leaves its jobs pending): run them with {again}", file=sys.stderr)
    return 1 if counts["failed"] or counts["pending"] else 0


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    console_logging()
    if args.command == "run":
        launch.check_launcher(args.options)     # flags this machine or cluster cannot take: before the expansion
    grid = grids.load_grid(args.grid, args.opts)
    if args.command == "run":
        return run(grid, args)
    if args.command == "status":
        counts = print_status(grid, current_statuses(grid))
        return 1 if counts["failed"] else 0
    write_tables(grid, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
