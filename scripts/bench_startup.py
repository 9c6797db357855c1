"""How long the commands that only read files take to start and answer: --help of the entry points, a grid's
status and report, and a table of existing results. Each runs as a user runs it, in a fresh process; printed: the
median wall time of --repeat runs, and whether torch, torchvision, open_clip or timm were imported (they are not
needed to read files; importing them costs seconds, a minute on a busy machine).

    python scripts/bench_startup.py               # 5 runs of each
    python scripts/bench_startup.py --repeat 9

The grid is grids/tiny.yaml on a freshly generated Shapes-C (64 images per corruption), run once with
--launcher debug first so that status, report and compare --results have results to read."""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.cli import entry_point  # noqa: E402

GRID = REPO_ROOT / "grids" / "tiny.yaml"
HEAVY = ("torch", "torchvision", "open_clip", "timm")


def commands(data_dir: Path, save_dir: Path) -> dict[str, list[str]]:
    opts = ["DATA_DIR", str(data_dir), "SAVE_DIR", str(save_dir), "CORRUPTION.NUM_EX", "64"]
    return {
        "test_time.py --help": ["test_time.py", "--help"],
        "compare.py --help": ["scripts/compare.py", "--help"],
        "grid.py --help": ["scripts/grid.py", "--help"],
        "grid.py status": ["scripts/grid.py", "status", str(GRID), *opts],
        "grid.py report": ["scripts/grid.py", "report", str(GRID), "--figure", "none", *opts],
        "compare.py --results": ["scripts/compare.py", "--results", str(save_dir / "shapes_c"), "--figure", "none"],
    }


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy packages the command imports (python -X importtime's list)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
             if line.startswith("import time:")}
    return sorted(names & set(HEAVY))


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):      # status exits 1 when a job failed
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def prepare(data_dir: Path, save_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.ensure_shapes_c(data_dir, ["gaussian_noise", "fog"], 64, [5], progress=False)
    run = subprocess.run([sys.executable, "scripts/grid.py", "run", str(GRID), "--launcher", "debug", "DATA_DIR",
                          str(data_dir), "SAVE_DIR", str(save_dir), "CORRUPTION.NUM_EX", "64"], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"the tiny grid did not run:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (the median is printed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, save_dir = Path(tmp) / "data", Path(tmp) / "out"
        prepare(data_dir, save_dir)
        print(f"python {sys.version.split()[0]}; median of {args.repeat} runs, each in a fresh process")
        for label, argv_ in commands(data_dir, save_dir).items():
            heavy = heavy_imports(argv_)
            times = [wall_time(argv_) for _ in range(args.repeat)]
            print(f"{label:22} {statistics.median(times):6.2f} s  (min {min(times):.2f}, max {max(times):.2f}); "
                  f"imports {', '.join(heavy) if heavy else 'none of ' + ', '.join(HEAVY)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
