"""Time the README's main job as a new user meets it: scripts/demo.py in a fresh process, on a fresh DATA_DIR and
SAVE_DIR (so Shapes-C is generated), wall clock from the command to its exit, imports included.

    python scripts/bench_demo.py                  # the demo's defaults, once
    python scripts/bench_demo.py --repeats 3 -- --images-per-severity 4000 --num-ex 4000
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.cli import entry_point  # noqa: E402


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("demo_args", nargs="*", help="arguments for scripts/demo.py (after --)")
    args = parser.parse_args(argv)
    totals = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--data-dir", f"{tmp}/data",
                       "--save-dir", f"{tmp}/out", "--no-progress", *args.demo_args]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
            total = time.perf_counter() - start
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
                return done.returncode
            record = json.loads((Path(tmp) / "out" / "demo.json").read_text())
            totals.append(total)
            print(f"run {repeat + 1}: total {total:.0f} s (data generation {record['setup_seconds']:.0f} s, "
                  f"evaluation {record['evaluation_seconds']:.0f} s, the rest imports and tables); means: "
                  + ", ".join(f"{m} {100 * r['summary']['mean_accuracy']:.2f}" for m, r in record["methods"].items()),
                  flush=True)
    if len(totals) > 1:
        print(f"median {statistics.median(totals):.0f} s, max {max(totals):.0f} s over {len(totals)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
