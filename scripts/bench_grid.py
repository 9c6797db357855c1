"""Measure the grid launcher: how long expanding and checking the paper's grids takes (before anything is
submitted), and what the launchers add to the runs themselves on the tiny grid (grids/tiny.yaml on a freshly
generated Shapes-C), per launcher. Every command runs as a user runs it, in a fresh process, imports included.

    python scripts/bench_grid.py                       # paper grids' expansion; tiny grid: debug, local x1, local x2
    python scripts/bench_grid.py --launchers debug slurm   # slurm: a SLURM must answer `scontrol ping`
                                                           # (as root: bash scripts/slurm_local.sh start)

For each launcher: the wall time of `scripts/grid.py run` until every job is done, the sum of the jobs' own
times (model loading and evaluation, as each job records it), and the rest: the launcher's overhead (process
start, imports, submission, polling), spread over the workers that ran at once."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.cli import entry_point  # noqa: E402

GRID = REPO_ROOT / "grids" / "tiny.yaml"
LAUNCH_FLAGS = {"debug": ["--launcher", "debug"],
                "local1": ["--launcher", "local", "--parallel", "1"],
                "local2": ["--launcher", "local", "--parallel", "2"],
                "slurm": ["--launcher", "slurm", "--gpus-per-job", "0", "--cpus-per-job", "1", "--timeout-min", "10"]}


def grid_command(*args) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "grid.py"), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"scripts/grid.py {' '.join(map(str, args))} exited {done.returncode}:\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done


def bench_expansion(save_dir: Path) -> None:
    from harness import grid as grids
    from harness import launch
    for name in ("paper_main", "paper_dg"):
        path = REPO_ROOT / "grids" / f"{name}.yaml"
        opts = ["SAVE_DIR", save_dir, "DATA_DIR", save_dir / "no-data"]
        start = time.perf_counter()
        grid = grids.load_grid(path, opts)
        loaded = time.perf_counter() - start
        grids.job_statuses(grid, launch.scheduler_states(grid))
        checked = time.perf_counter() - start - loaded
        wall, _ = grid_command("status", path, *opts)
        cells = len({job.config_hash for job in grid.jobs})
        print(f"{name}: {len(grid.jobs)} jobs from {cells} configs; expanded and checked in {loaded:.2f} s, "
              f"statuses in {checked:.2f} s (in this process); `grid.py status` {wall:.1f} s, imports included",
              flush=True)


def generate_shapes(data_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.ensure_shapes_c(data_dir, ["gaussian_noise", "fog"], 400, [5], progress=False)


def bench_launcher(label: str, data_dir: Path, save_dir: Path) -> None:
    from harness import grid as grids
    opts = ["DATA_DIR", data_dir, "SAVE_DIR", save_dir]
    wall, _ = grid_command("run", GRID, *LAUNCH_FLAGS[label], *opts)
    grid = grids.load_grid(GRID, opts)
    states = [grids.read_state(grid.folder, job) or {} for job in grid.jobs]
    if any(state.get("state") != "done" for state in states):
        raise SystemExit(f"{label}: not every job is done: {[s.get('state') for s in states]}")
    own = sum(state["seconds"] for state in states)
    lanes = 2 if label == "local2" else 1
    print(f"{label:7} {len(states)} jobs: wall {wall:5.1f} s; the jobs' own time {own:5.1f} s "
          f"({own / len(states):.1f} s per job); overhead {wall - own / lanes:5.1f} s with {lanes} at once", flush=True)


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launchers", nargs="+", choices=list(LAUNCH_FLAGS), default=["debug", "local1", "local2"])
    parser.add_argument("--no-expansion", action="store_true", help="skip the paper grids' expansion")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.no_expansion:
            bench_expansion(tmp / "expansion")
        generate_shapes(tmp / "data")
        for label in args.launchers:
            bench_launcher(label, tmp / "data", tmp / f"out_{label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
