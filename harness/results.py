"""Results records: one per (domain, severity) with n, correct, accuracy and error, calibration and per-class fields;
their mean; and the provenance of the run. Written atomically as results.json and results.csv."""
from __future__ import annotations

import csv
import io
import json
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from conf.files import atomic_write_text
from harness.class_counts import CLASS_FIELDS
from harness.identity import config_hash, file_sha256
from harness.open_set import OOD_FIELDS
from harness.open_set import provenance as open_set_provenance

if TYPE_CHECKING:
    from harness.build import RunPlan

REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ["torch", "torchvision", "open_clip_torch", "timm", "numpy", "yacs", "scipy", "pillow", "robustbench"]


# Calibration fields of a record (harness/calibration.py) and their summary keys.
CALIBRATION_FIELDS = {"ece": "mean_ece", "nll": "mean_nll", "mean_confidence": "mean_confidence"}
# The numbers of a record's "cost" (harness/cost.py), in results.csv's column order; summary["cost"] has their means.
COST_FIELDS = ("seconds_per_image", "adapt_seconds_per_image", "predict_seconds_per_image", "forward_images_per_image",
               "backward_passes_per_image", "peak_memory_mib")


def make_record(domain: str, severity: int, n: int, correct: int, calibration: dict | None = None) -> dict:
    accuracy = correct / n if n else float("nan")
    return {"domain": domain, "severity": int(severity), "n": int(n), "correct": int(correct),
            "accuracy": accuracy, "error": 1.0 - accuracy, **(calibration or {})}


def summarise(records: list[dict]) -> dict:
    """Mean over the records (each domain/severity counts once, as in the paper's tables), and the mean per
    severity (the anchor suite also reports the mean error at severity 5, e.g. for SETTING gradual); the means
    of the calibration and per-class fields (harness/class_counts.py) where every record has them."""
    if not records:
        return {"mean_accuracy": float("nan"), "mean_error": float("nan"), "n_total": 0}
    mean_acc = sum(r["accuracy"] for r in records) / len(records)
    by_severity: dict[int, list[float]] = {}
    for r in records:
        by_severity.setdefault(int(r["severity"]), []).append(r["accuracy"])
    summary = {"mean_accuracy": mean_acc, "mean_error": 1.0 - mean_acc, "n_total": sum(r["n"] for r in records),
               "mean_accuracy_by_severity": {str(s): sum(v) / len(v) for s, v in sorted(by_severity.items())}}
    for field, key in {**CALIBRATION_FIELDS, **CLASS_FIELDS, **OOD_FIELDS}.items():
        if all(field in r for r in records):
            summary[key] = sum(r[field] for r in records) / len(records)
    if all("n_ood" in r for r in records):
        summary["n_ood_total"] = sum(r["n_ood"] for r in records)
    if all("cost" in r for r in records):       # harness/cost.py; results written before it have none
        summary["cost"] = {field: sum(r["cost"][field] for r in records) / len(records) for field in COST_FIELDS}
    return summary


def utc_now() -> str:
    """The time records and states are stamped with: UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def write_results(save_dir: Path, payload: dict) -> None:
    atomic_write_text(save_dir / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    buf = io.StringIO()
    open_set = any("n_ood" in r for r in payload["records"])    # closed-set files keep their columns
    ood_columns = ["ood_domain", "ood_severity", "n_ood", *OOD_FIELDS] if open_set else []
    fields = ["method", "dataset", "domain", "severity", "n", "correct", "accuracy", "error", *CALIBRATION_FIELDS,
              *CLASS_FIELDS, *ood_columns, "seed", "config_hash", *COST_FIELDS, "peak_memory_kind"]
    provenance = payload.get("provenance", {})
    run = {"method": payload["method"], "dataset": payload["dataset"], "seed": provenance.get("seed", ""),
           "config_hash": provenance.get("config_hash", "")}
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in payload["records"]:
        writer.writerow({**run, **r, **r.get("cost", {})})
    summary = payload["summary"]
    # The mean row only for a complete run: a mean over the finished domains is not the run's mean.
    complete = payload.get("complete", True)
    writer.writerow({**run, "domain": "mean" if complete else "mean (incomplete run: not computed)",
                     "severity": "", "n": summary["n_total"], "correct": "",
                     "accuracy": summary["mean_accuracy"] if complete else "",
                     "error": summary["mean_error"] if complete else "",
                     **{field: summary.get(key, "") if complete else ""
                        for field, key in {**CALIBRATION_FIELDS, **CLASS_FIELDS,
                                           **(OOD_FIELDS if open_set else {})}.items()},
                     **({"n_ood": summary.get("n_ood_total", "")} if open_set else {}),
                     **(summary.get("cost", {}) if complete else {})})
    # TEST.FORGETTING (harness/forgetting.py): the clean set's two frozen records after the mean row, as domains
    # "none (zero-shot)" and "none (after)"; their accuracy difference is results.json's forgetting.forgetting.
    forgetting = payload.get("forgetting") or {}
    for label, key in (("zero-shot", "zero_shot_record"), ("after", "after_record")):
        if key in forgetting:
            record = forgetting[key]
            writer.writerow({**run, **record, **record.get("cost", {}), "domain": f"{record['domain']} ({label})"})
    atomic_write_text(save_dir / "results.csv", buf.getvalue())


def command_line() -> str:
    return " ".join(sys.argv)


def run_provenance(plan: RunPlan, method, model_info: dict, device_name: str,
                   auxiliary_info: dict | None = None) -> dict:
    """What produced a run, recorded in its results: config and its hash, seed, command, commit, package versions,
    model (as built and as planned) and the method's further models, the method's adapted parameters, precision and
    cost, device, data (folder, description, fingerprints), weights' hashes, warnings, host and start time."""
    import torch
    cfg = plan.cfg
    provenance = {
        "config": cfg.dump(),
        "config_hash": config_hash(cfg),
        "seed": cfg.RNG_SEED,
        "command": command_line(),
        "git": git_commit(),
        "versions": package_versions(),
        "model": model_info,
        "model_spec": {"family": plan.model_spec.family, "image_tower": plan.model_spec.image_tower,
                       "text_tower": plan.model_spec.text_tower, "vision_layers": plan.model_spec.vision_layers,
                       "context_length": plan.model_spec.context_length},
        "adapted_parameters": method.num_trainable_params(),
        "method_precision": method.precision_info(),
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "data": {"data_dir": str(Path(cfg.DATA_DIR).resolve()), **plan.dataset.describe(cfg),
                 "stream_order": cfg.TEST.STREAM_ORDER,
                 "fingerprints": {str(i): f for i, f in sorted(plan.data_fingerprints.items())},
                 "image_shapes": [list(s) for s in sorted({tuple(p.image_shape) for p in plan.data.values()
                                                          if hasattr(p, "image_shape")})]},
        "weights_sha256": plan.weights_sha256,
        "inputs": dict(plan.inputs),
        "save_dir": str(plan.save_dir),
        "config_warnings": list(plan.warnings),
        "host": socket.gethostname(),
        "started_at": utc_now(),
    }
    if plan.auxiliary:
        provenance["auxiliary_models"] = {
            keyword: {**(auxiliary_info or {}).get(keyword, {}), "arch_key": checked.arch_key,
                      "weights_key": checked.weights_key,
                      "weights_sha256": file_sha256(checked.weights.path) if checked.weights.path else None}
            for keyword, checked in plan.auxiliary.items()}
    cost = method.cost_info()
    if cost is not None:
        provenance["method_cost"] = dict(cost)
    if plan.ood:
        provenance["open_set"] = open_set_provenance(cfg, plan.ood)
    return provenance


def results_payload(plan: RunPlan, done: dict, provenance: dict, resumed: list[int],
                    scaler_skipped_steps: int | None, forgetting: dict | None = None) -> dict:
    """results.json's content from every finished task (``done``: task index -> records, seconds, images), in
    the setting's order, with the run's provenance and its counts so far; ``forgetting``: TEST.FORGETTING's entry
    (harness/forgetting.py), a top-level key only where given."""
    cfg = plan.cfg
    finished = sorted(done)
    records = [r for i in finished for r in done[i]["records"]]
    seconds = sum(done[i]["wall_time_s"] for i in finished)
    images = sum(done[i]["images"] for i in finished)
    payload = {
        "method": plan.method_name,
        "dataset": cfg.CORRUPTION.DATASET,
        "setting": cfg.SETTING,
        "domain_label": plan.dataset.domain_label,
        "has_severities": bool(getattr(plan.dataset, "has_severities", True)),
        "complete": len(finished) == len(plan.tasks),
        # Every (domain, severity) record of the complete run, in order: what a table of this run must show.
        "expected": [[s.domain, s.severity] for task in plan.tasks for s in task.segments],
        "records": records,
        "summary": summarise(records),
        "provenance": {
            **provenance,
            "wall_time_s": seconds,
            "images": images,
            "images_per_second": images / seconds if seconds > 0 else None,
            "tasks_total": len(plan.tasks),
            "tasks_done": finished,
            "resumed_tasks": resumed,
            "run_domains": list(cfg.RUN_DOMAINS),
            "grad_scaler_skipped_steps": scaler_skipped_steps,
            "finished_at": utc_now(),
        },
    }
    if forgetting is not None:
        payload["forgetting"] = forgetting
    return payload
