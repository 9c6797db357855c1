"""Golden runs: every shipped config on the tiny CLIP and a synthetic copy of every data-set layout, summarised as
per-domain correct counts, each image's prediction, and each batch's sum and absolute sum of the logits. Each
shipped config's record holds its golden run (tests/record.py writes them); tests/test_golden_runs.py compares.

    python -m tests.golden --cpu-paths [NAME ...]    print how far runs move between CPU code paths

Results depend on the CPU's instruction set: MKL, oneDNN and ATen's own kernels pick AVX-512, AVX2 or SSE code by
the CPU, and these sum in different orders. Recording therefore runs every config once per setting of
CPU_PATH_SETTINGS (each in a fresh process: the libraries read the variables when they load), keeps the native
path's values, and records how far each batch's sums moved on the other paths (``cpu_path_spread``). A run then
matches its record when its counts and predictions are the recorded ones (a prediction that was a near-tie,
TIE_GAP, may differ) and each batch's sums are within max(SUM_RTOL_FLOOR, SPREAD_MARGIN x spread) of the
record: the tolerance comes from differences measured between instruction sets, never from one machine's bits.
Tests run on one thread (tests/conftest.py), so thread counts do not enter."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Code paths of the CPU libraries other than the native one, as other machines take them natively (an AVX2-only
# Intel or AMD, an older CPU). "native" is whatever this machine picks (AVX-512 where it has it).
CPU_PATH_SETTINGS = {
    "native": {},
    "mkl_avx2": {"MKL_CBWR": "AVX2"},
    "avx2": {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "sse": {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
}
# A batch's logit sums may move by SPREAD_MARGIN times the largest relative difference measured between the
# paths above when it was recorded (room for CPUs and library builds not measured), and never by less than
# SUM_RTOL_FLOOR (a batch that no measured path moved: a few float32 roundings of its largest sums).
SPREAD_MARGIN = 10.0
SUM_RTOL_FLOOR = 1e-6
# A prediction may differ from the recorded one only where the recorded top two logits were this close, relative
# to the image's largest absolute logit (a near-tie that another summation order can flip). Measured: no
# prediction of any golden run changed between the paths above.
TIE_GAP = 1e-4


def other_cpu_path() -> dict[str, str]:
    """AVX2 on a CPU whose native path is AVX-512, else the SSE path: a second run of the tests there shows
    whether a recorded number holds beyond one instruction set."""
    import torch
    native = torch.backends.cpu.get_cpu_capability()
    return CPU_PATH_SETTINGS["avx2" if native.startswith("AVX512") else "sse"]


def shipped_configs() -> dict[str, str]:
    from conf import config_names
    return {name: f"conf/{name}.yaml" for name in config_names()}


@contextlib.contextmanager
def recording_logits():
    """Every logits tensor a method returns to the harness, in stream order (as float64)."""
    import torch
    import methods.base
    seen = []
    call = torch.nn.Module.__call__

    def record(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        seen.append(out.detach().double())
        return out
    original = methods.base.TTAMethod.__call__
    methods.base.TTAMethod.__call__ = record
    try:
        yield seen
    finally:
        methods.base.TTAMethod.__call__ = original


def golden_entry(payload, batches: list) -> dict:
    """Per-domain counts, each image's prediction with the gap between its two largest logits relative to its
    largest absolute logit (how close it was to a tie), and each batch's logit sum and absolute sum."""
    import torch
    logits = torch.cat(batches)
    top2 = logits.topk(2, dim=1).values
    gaps = (top2[:, 0] - top2[:, 1]) / logits.abs().amax(1).clamp_min(1e-12)
    return {"records": [[r["domain"], r["severity"], r["n"], r["correct"]] for r in payload["records"]],
            "predictions": logits.argmax(1).tolist(), "relative_gaps": [float(f"{g:.3g}") for g in gaps.tolist()],
            "batch_sums": [[float(b.sum()), float(b.abs().sum())] for b in batches]}


def batch_differences(entry: dict, expected: dict) -> list[float]:
    """Each batch's largest difference of its two sums, relative to its recorded absolute sum."""
    return [max(abs(a - b) for a, b in zip(mine, theirs)) / max(theirs[1], 1e-12)
            for mine, theirs in zip(entry["batch_sums"], expected["batch_sums"])]


def tolerances(expected: dict) -> list[float]:
    return [max(SUM_RTOL_FLOOR, SPREAD_MARGIN * spread) for spread in expected["cpu_path_spread"]]


def mismatches(entry: dict, expected: dict) -> list[str]:
    """How ``entry`` departs from ``expected`` beyond what CPU code paths explain: domains or image counts,
    predictions that differ where the recorded one was no near-tie, correct counts that moved by more than the
    near-tie predictions that changed, a batch's logit sums beyond its tolerance."""
    if [r[:3] for r in entry["records"]] != [r[:3] for r in expected["records"]]:
        return [f"domains or image counts {[r[:3] for r in entry['records']]} != {[r[:3] for r in expected['records']]}"]
    if len(entry["batch_sums"]) != len(expected["batch_sums"]):
        return [f"{len(entry['batch_sums'])} batches, recorded {len(expected['batch_sums'])}"]
    problems = []
    changed = [i for i, (a, b) in enumerate(zip(entry["predictions"], expected["predictions"])) if a != b]
    decisive = [i for i in changed if expected["relative_gaps"][i] > TIE_GAP]
    if decisive:
        i = decisive[0]
        problems.append(f"{len(decisive)} prediction(s) changed that were no near-tie, e.g. image {i}: "
                        f"{entry['predictions'][i]} != {expected['predictions'][i]} (recorded relative gap "
                        f"{expected['relative_gaps'][i]} > {TIE_GAP})")
    moved = sum(abs(a[3] - b[3]) for a, b in zip(entry["records"], expected["records"]))
    if moved > len(changed):
        problems.append(f"correct counts moved by {moved} with {len(changed)} prediction(s) changed: "
                        f"{entry['records']} != {expected['records']}")
    for k, (difference, tolerance) in enumerate(zip(batch_differences(entry, expected), tolerances(expected))):
        if difference > tolerance:
            problems.append(f"batch {k}: logit sums {entry['batch_sums'][k]} differ from {expected['batch_sums'][k]} "
                            f"by {difference:.2e} of the absolute sum (tolerance {tolerance:.2e})")
            break
    return problems


def run_golden(name: str, data_dir: Path, save_dir: Path) -> tuple[dict, dict]:
    """The golden entry of one shipped config, and the run's payload."""
    from harness.run import evaluate
    from tests.synthetic import small_run_overrides, tiny_cfg, write_source_sets
    dataset, config = name.split("/")
    write_source_sets(data_dir)      # the source training sets (EATA's Fisher), beside write_all_layouts' test sets
    # The records were written with the suite's own stream order (small_run_overrides sets it); TEST.STREAM_ORDER
    # authors, the default since issue 18, is checked against their rule by tests/test_stream_order.py.
    cfg = tiny_cfg(shipped_configs()[name], DATA_DIR=str(data_dir), SAVE_DIR=str(save_dir),
                   **small_run_overrides(dataset, config, data_dir))
    with recording_logits() as seen:
        payload = evaluate(cfg, progress=False)
    return golden_entry(payload, seen), payload


def compute_all(names: list[str]) -> dict[str, dict]:
    """The golden entries of ``names``, on one thread (as the tests run)."""
    import torch
    from tests.synthetic import write_all_layouts
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_all_layouts(Path(tmp) / "layouts")
        return {name: run_golden(name, data_dir, Path(tmp) / "out" / name.replace("/", "_"))[0] for name in names}


def measure(names: list[str]) -> dict[str, dict[str, dict]]:
    """The golden entries of ``names`` under every CPU_PATH_SETTINGS entry: setting -> name -> entry."""
    results = {}
    for label, setting in CPU_PATH_SETTINGS.items():
        env = {**os.environ, **setting}
        out = subprocess.run([sys.executable, "-m", "tests.golden", "--print-json", *names], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def round_up(x: float) -> float:
    """``x`` rounded up to two significant digits."""
    if x <= 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(f"{math.ceil(x / unit) * unit:.2g}")


def spreads(results: dict[str, dict[str, dict]], name: str) -> list[float]:
    """Each batch's largest relative difference from the native path over the other paths."""
    native = results["native"][name]
    return [round_up(max(column)) for column in zip(*(batch_differences(e[name], native) for e in results.values()))]


def cpu_paths(names: list[str]) -> None:
    """Print, per CPU path, how far the golden runs move from the native path: the largest relative difference
    of a batch's logit sums, how many runs move by more than 1e-4 (runs whose fp32 trajectory the summation order
    changes visibly), and the predictions and counts that changed."""
    names = names or sorted(shipped_configs())
    results = measure(names)
    native = results["native"]
    print(f"{'setting':9s} {'runs':>5s} {'moved':>6s} {'moved > 1e-4':>12s} {'largest':>9s} {'predictions changed':>19s} "
          f"{'counts changed':>14s}  largest in")
    for label, entries in results.items():
        moved = {n: max(batch_differences(e, native[n])) for n, e in entries.items()}
        changed = sum(a != b for n, e in entries.items() for a, b in zip(e["predictions"], native[n]["predictions"]))
        worst = max(moved, key=moved.get)
        print(f"{label:9s} {len(entries):5d} {sum(v > 0 for v in moved.values()):6d} "
              f"{sum(v > 1e-4 for v in moved.values()):12d} {moved[worst]:9.2e} {changed:19d} "
              f"{sum(e['records'] != native[n]['records'] for n, e in entries.items()):14d}  {worst}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu-paths", action="store_true", help="measure the differences between CPU code paths")
    mode.add_argument("--other-cpu-path", action="store_true",
                      help="print the variables of a CPU path other than this machine's native one (for CI)")
    mode.add_argument("--print-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("names", nargs="*", help="shipped config names, e.g. cifar10_c/tent")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(shipped_configs()))
    if unknown:
        parser.error(f"not a shipped config: {unknown[0]} (the shipped configs are conf/<data set>/<method>.yaml)")
    if args.cpu_paths:
        cpu_paths(args.names)
    elif args.other_cpu_path:
        print(" ".join(f"{k}={v}" for k, v in other_cpu_path().items()))
    else:
        print(json.dumps(compute_all(args.names or sorted(shipped_configs()))))


if __name__ == "__main__":
    main()
