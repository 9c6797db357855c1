"""Results on disk and how runs combine: reading results.json files, the config each run records, checking that
runs are one experiment, pooling the seeds of one config into one row, merging the shards of one run, and grouping
runs into rows."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import yaml

from harness.identity import describe_differences, differing_keys, identity_keys
from harness.report.model import CompareError, Column, Row, expected_columns, payload_cells, record_columns
from harness.results import summarise

SEED_KEY = "RNG_SEED"


def load_results(paths) -> list[dict]:
    """Payloads from results.json files or from directories searched recursively for them (sorted by path)."""
    payloads = []
    for given in paths:
        path = Path(given)
        files = sorted(path.rglob("results.json")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise CompareError(f"{path}: no results.json below this directory")
        for file in files:
            if not file.is_file():
                raise CompareError(f"{file}: no such results file")
            try:
                payload = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                raise CompareError(f"{file}: not a readable results.json ({err})") from err
            for key in ("method", "dataset", "records"):
                if key not in payload:
                    raise CompareError(f"{file}: results.json without '{key}'")
            payload["_path"] = str(file)
            payloads.append(payload)
    return payloads


def run_config(payload) -> dict:
    """The config a run recorded (provenance.config) as a nested dict."""
    text = (payload.get("provenance") or {}).get("config")
    if not text:
        raise CompareError(f"{payload.get('_path', payload['method'])}: no provenance.config to compare configs by")
    return yaml.safe_load(text) or {}


def run_label(payload) -> str:
    """How messages name a run: its results file, else method#config hash."""
    return payload.get("_path") or f"{payload['method']}#{(payload.get('provenance') or {}).get('config_hash')}"


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _std(values) -> float | None:
    # Sample standard deviation over runs (ddof=1), as usual when reporting seeds; None for a single run.
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def check_same_experiment(payloads: list[dict], ignore=(SEED_KEY,)) -> None:
    """Refuse payloads whose configs differ in a result-relevant key other than ``ignore`` (names the keys)."""
    if len(payloads) < 2:
        return
    configs = [run_config(p) for p in payloads]
    diff = differing_keys(configs, tuple(ignore))
    if diff:
        labels = [run_label(p) for p in payloads]
        raise CompareError(f"these results come from configs that differ in {diff} (not only in the seed); "
                           f"refusing to combine them:\n{describe_differences(configs, labels, tuple(ignore))}")


def aggregate(payloads: list[dict], label: str | None = None, metric: str = "accuracy") -> Row:
    """One row from several runs of the same config that differ only in RNG_SEED: per cell the mean and the
    sample standard deviation over runs; the mean column is each run's mean of its cells, averaged.

    A run that has not finished every task of its setting leaves its missing cells empty: a cell is shown only
    when every run has it, and the row has no mean (``row.incomplete`` names those runs)."""
    if not payloads:
        raise CompareError("nothing to aggregate")
    check_same_experiment(payloads)
    columns = expected_columns(payloads[0])
    for p in payloads[1:]:
        other = expected_columns(p)
        if other != columns:
            missing = sorted({c.domain for c in set(columns) ^ set(other)})
            raise CompareError(f"{run_label(p)} has other domains/severities than {run_label(payloads[0])} "
                               f"(differing: {missing}); merge shards first or finish the run")
    per_run = [payload_cells(p, metric) for p in payloads]
    incomplete = [f"{run_label(p)} ({sum(c in run for c in columns)} of {len(columns)} cells)"
                  for p, run in zip(payloads, per_run) if not all(c in run for c in columns)]
    shown = [c for c in columns if all(c in run for run in per_run)]
    cells = {c: _mean([run[c] for run in per_run]) for c in shown}
    std = {c: _std([run[c] for run in per_run]) for c in shown} if len(payloads) > 1 else {}
    run_means = [_mean([run[c] for c in columns]) for run in per_run] if not incomplete else []
    seeds = [run_config(p).get(SEED_KEY) if (p.get("provenance") or {}).get("config") else None for p in payloads]
    row = Row(label or payloads[0]["method"], "measured", cells, std, _mean(run_means) if run_means else None,
              _std(run_means), len(payloads), seeds, payloads[0]["method"], incomplete=incomplete,
              expected=columns)
    return row


def merge(payloads: list[dict]) -> dict:
    """One payload from shards of one run (identical configs, seed included): the union of their records, each
    (domain, severity) once, ordered as CORRUPTION.TYPE; records present in several shards must agree."""
    if not payloads:
        raise CompareError("nothing to merge")
    check_same_experiment(payloads, ignore=())
    first = payloads[0]
    for p in payloads[1:]:
        if (p["method"], p["dataset"], p.get("setting")) != (first["method"], first["dataset"], first.get("setting")):
            raise CompareError(f"{run_label(p)} is {p['method']} on {p['dataset']}, not {first['method']} on "
                               f"{first['dataset']}")
    merged: dict[Column, dict] = {}
    for p in payloads:
        for column, record in zip(record_columns(p["records"]), p["records"]):
            known = merged.get(column)
            if known is not None and (known["n"], known["correct"]) != (record["n"], record["correct"]):
                raise CompareError(f"{column.domain}@{column.severity}: shards disagree ({known['correct']}/"
                                   f"{known['n']} vs {record['correct']}/{record['n']} in {run_label(p)})")
            merged.setdefault(column, record)
    order = list((run_config(first).get("CORRUPTION") or {}).get("TYPE") or [])
    rank = {d: i for i, d in enumerate(order)}
    columns = sorted(merged, key=lambda c: rank.get(c.domain, len(rank)))   # stable: keeps severity order
    records = [merged[c] for c in columns]
    result = copy.deepcopy({k: v for k, v in first.items() if k != "_path"})
    result["records"] = records
    result["summary"] = summarise(records)
    result["complete"] = bool(order) and set(order) <= {r["domain"] for r in records}
    prov = result.setdefault("provenance", {})
    prov["merged_from"] = [run_label(p) for p in payloads]
    prov["wall_time_s"] = sum((p.get("provenance") or {}).get("wall_time_s") or 0.0 for p in payloads)
    return result


def group_runs(payloads: list[dict]) -> list[tuple[str, list[dict]]]:
    """Runs of the same config but for the seed form one group (one row); rows labelled by method, with a short
    config id where one method has several configs."""
    groups: dict[str, list[dict]] = {}
    for p in payloads:
        key = json.dumps([p["dataset"], sorted(identity_keys(run_config(p), (SEED_KEY,)).items())], default=str)
        groups.setdefault(key, []).append(p)
    methods = [runs[0]["method"] for runs in groups.values()]
    labelled = []
    for key, runs in groups.items():
        label = runs[0]["method"]
        if methods.count(label) > 1:
            label += f" [{_identity_id(runs[0])}]"
        labelled.append((label, runs))
    return labelled


def _identity_id(payload) -> str:
    flat = sorted(identity_keys(run_config(payload), (SEED_KEY,)).items())
    return hashlib.sha1(repr(flat).encode()).hexdigest()[:6]
