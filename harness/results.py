"""Results records: one per (domain, severity) with n, correct, accuracy and error; their mean; and the
provenance of the run. Written atomically as results.json and results.csv."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ["torch", "torchvision", "open_clip_torch", "timm", "numpy", "yacs", "scipy", "pillow", "robustbench"]


def make_record(domain: str, severity: int, n: int, correct: int) -> dict:
    accuracy = correct / n if n else float("nan")
    return {"domain": domain, "severity": int(severity), "n": int(n), "correct": int(correct),
            "accuracy": accuracy, "error": 1.0 - accuracy}


def summarise(records: list[dict]) -> dict:
    """Mean over the records (each domain/severity counts once, as in the paper's tables), and the mean per
    severity (the anchor suite also reports the mean error at severity 5, e.g. for SETTING gradual)."""
    if not records:
        return {"mean_accuracy": float("nan"), "mean_error": float("nan"), "n_total": 0}
    mean_acc = sum(r["accuracy"] for r in records) / len(records)
    by_severity: dict[int, list[float]] = {}
    for r in records:
        by_severity.setdefault(int(r["severity"]), []).append(r["accuracy"])
    return {"mean_accuracy": mean_acc, "mean_error": 1.0 - mean_acc, "n_total": sum(r["n"] for r in records),
            "mean_accuracy_by_severity": {str(s): sum(v) / len(v) for s, v in sorted(by_severity.items())}}


def git_commit() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("rev-parse", "HEAD") or "unknown", "dirty": bool(run("status", "--porcelain"))}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_atomic_write = atomic_write


def write_results(save_dir: Path, payload: dict) -> None:
    atomic_write(save_dir / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    buf = io.StringIO()
    fields = ["method", "dataset", "domain", "severity", "n", "correct", "accuracy", "error"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in payload["records"]:
        writer.writerow({"method": payload["method"], "dataset": payload["dataset"], **r})
    summary = payload["summary"]
    writer.writerow({"method": payload["method"], "dataset": payload["dataset"], "domain": "mean",
                     "severity": "", "n": summary["n_total"], "correct": "",
                     "accuracy": summary["mean_accuracy"], "error": summary["mean_error"]})
    atomic_write(save_dir / "results.csv", buf.getvalue())


def format_table(records: list[dict], domain_label: str = "corruption", show_severity: bool | None = None,
                 reference: dict | None = None, reference_label: str = "paper") -> str:
    """Per-domain accuracy and error (%), with the mean, as a fixed-width text table.

    show_severity: None = only when some record has a severity (data sets without severities record 0).
    reference: {domain: accuracy in %} (e.g. the paper's row): adds that column and the difference
    (measured - reference, in accuracy points) for the domains it has; its mean is over those domains."""
    if show_severity is None:
        show_severity = any(int(r["severity"]) != 0 for r in records)
    width = max([len(domain_label), 4] + [len(r["domain"]) for r in records]) + 2
    sev = (lambda v: f"{v:>4}") if show_severity else (lambda v: "")
    ref_width = len(reference_label) + 9
    head = f"{domain_label:<{width}}{sev('sev')}{'n':>8}{'acc %':>9}{'err %':>9}"
    if reference is not None:
        head += f"{reference_label + ' acc %':>{ref_width}}{'diff':>8}"
    lines = [head]
    matched = []
    for r in records:
        line = (f"{r['domain']:<{width}}{sev(r['severity'])}{r['n']:>8}{100 * r['accuracy']:>9.2f}"
                f"{100 * r['error']:>9.2f}")
        if reference is not None:
            value = reference.get(r["domain"])
            if value is None:
                line += f"{'-':>{ref_width}}{'-':>8}"
            else:
                matched.append((100 * r["accuracy"], value))
                line += f"{value:>{ref_width}.2f}{100 * r['accuracy'] - value:>+8.2f}"
        lines.append(line)
    s = summarise(records)
    line = (f"{'mean':<{width}}{sev('')}{s['n_total']:>8}{100 * s['mean_accuracy']:>9.2f}"
            f"{100 * s['mean_error']:>9.2f}")
    if reference is not None and matched:
        ours = sum(m for m, _ in matched) / len(matched)
        theirs = sum(p for _, p in matched) / len(matched)
        line += f"{theirs:>{ref_width}.2f}{ours - theirs:>+8.2f}"
        if len(matched) < len(records):
            line += f"  (over the {len(matched)} domains with a {reference_label} value)"
    lines.append(line)
    return "\n".join(lines)


def command_line() -> str:
    return " ".join(sys.argv)
