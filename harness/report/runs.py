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

from harness.class_counts import class_fields, confusion_totals
from harness.identity import describe_differences, differing_keys, identity_keys
from harness.report.model import CompareError, Column, Row, expected_columns, payload_cells, record_columns
from harness.results import summarise
from harness.task_records import TASKS_DIR, task_path

SEED_KEY = "RNG_SEED"
ORDER_KEY = "TEST.ORDER_SEED"
# A row pools the runs of one config that differ only in these: the seed and the seed of the stream order.
POOLED_KEYS = (SEED_KEY, ORDER_KEY)
# The tail statistic over a row's runs (OGA's expected tail accuracy, Fuchs et al. 2025: the mean over the worst
# 10% of runs): which end of each metric is the worse one; a metric without one (confidence) shows no tail.
WORSE_END = {"accuracy": "low", "error": "low",        # both tabled as accuracy: the worst are the lowest
             "ece": "high", "nll": "high", "fpr95": "high", "balanced_accuracy": "low", "worst_class": "low",
             "auroc": "low", "aupr_in": "low", "aupr_out": "low", "oscr": "low",
             "seconds_per_image": "high", "adapt_seconds_per_image": "high", "predict_seconds_per_image": "high",
             "peak_memory": "high"}


def load_results(paths, left_out: list[str] | None = None) -> list[dict]:
    """Payloads from results.json files or from directories searched recursively for them (sorted by path), each
    checked against its own counts and against the run's task records (``check_results``). ``left_out``, where
    given, receives a line for every run folder below a directory that has task records but no results.json."""
    payloads = []
    for given in paths:
        path = Path(given)
        files = sorted(path.rglob("results.json")) if path.is_dir() else [path]
        if path.is_dir() and left_out is not None:
            left_out += [f"{folder}: task records but no results.json (a run stopped before writing it; run its "
                         f"config again to resume and write it)" for folder in _runs_without_results(path)]
        if path.is_dir() and not files:
            raise CompareError(f"{path}: no results.json below this directory")
        for file in files:
            payloads.append(read_results(file))
    return payloads


def read_results(file: Path) -> dict:
    """One results.json, checked (``check_results``), with its path under "_path"."""
    if not file.is_file():
        raise CompareError(f"{file}: no such results file")
    try:
        payload = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CompareError(f"{file}: not a readable results.json ({err})") from err
    if not isinstance(payload, dict):
        raise CompareError(f"{file}: not a results.json (expected a JSON object)")
    for key in ("method", "dataset", "records"):
        if key not in payload:
            raise CompareError(f"{file}: results.json without '{key}'")
    check_results(payload, file)
    payload["_path"] = str(file)
    return payload


def _runs_without_results(folder: Path) -> list[Path]:
    return sorted(tasks.parent for tasks in folder.rglob(TASKS_DIR)
                  if tasks.is_dir() and any(tasks.glob("task_*.json")) and not (tasks.parent / "results.json").exists())


def check_results(payload: dict, file: Path) -> None:
    """A results file is tabled only as its counts say: every record's accuracy and error are its correct / n, the
    summary's mean is the records' mean, and where the run folder keeps its task records (the truth: resuming
    reads them), every task it lists as done is there, of its config, with the same counts."""
    records = payload["records"]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CompareError(f"{file}: 'records' is not a list of records")
    for k, r in enumerate(records):
        n, correct = r.get("n"), r.get("correct")
        where = f"{file}: record {k} ({r.get('domain')}@{r.get('severity')})"
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, correct)) or not 0 <= correct <= n:
            raise CompareError(f"{where}: n {n!r} and correct {correct!r} are not counts with 0 <= correct <= n")
        accuracy = correct / n if n else None
        if n and not (_close(r.get("accuracy"), accuracy) and _close(r.get("error"), 1 - accuracy)):
            raise CompareError(f"{where}: accuracy {r.get('accuracy')!r} / error {r.get('error')!r} are not its "
                               f"correct / n = {correct}/{n} = {accuracy:.6f}; the file was edited or is damaged")
    expected = payload.get("expected")
    if isinstance(expected, list):        # what the run's setting streams: a record outside it was added by hand
        left = [tuple(e) for e in expected if isinstance(e, list)]
        for k, r in enumerate(records):
            column = (r.get("domain"), r.get("severity"))
            if column not in left:
                raise CompareError(f"{file}: record {k} ({column[0]}@{column[1]}) is not one of the run's expected "
                                   f"records (its 'expected' list), or is there twice; the file was edited or is "
                                   f"damaged")
            left.remove(column)
    mean = (payload.get("summary") or {}).get("mean_accuracy")
    if records and mean is not None and not _close(mean, summarise(records)["mean_accuracy"]):
        raise CompareError(f"{file}: summary.mean_accuracy {mean!r} is not the mean of its records "
                           f"({summarise(records)['mean_accuracy']:.6f}); the file was edited or is damaged")
    _check_against_tasks(payload, file)


def _close(value, expected: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value - expected) <= 1e-9


def _check_against_tasks(payload: dict, file: Path) -> None:
    provenance = payload.get("provenance") or {}
    done = provenance.get("tasks_done")
    if not (file.parent / TASKS_DIR).is_dir() or not isinstance(done, list):
        return        # a results file copied without its run folder: nothing to check it against
    counts = {(r["domain"], int(r["severity"])): (r["n"], r["correct"]) for r in payload["records"]}
    from_tasks = {}
    for index in done:
        path = task_path(file.parent, int(index))
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CompareError(f"{file} lists task {index} as done, but its record {path} cannot be read "
                               f"({getattr(err, 'strerror', None) or err}); run the config again to resume") from None
        if stored.get("config_hash") != provenance.get("config_hash"):
            raise CompareError(f"{file} (config {provenance.get('config_hash')}) sits beside {path} of config "
                               f"{stored.get('config_hash')}: not this run's record")
        for r in stored.get("records") or []:
            from_tasks[(r.get("domain"), int(r.get("severity", 0)))] = (r.get("n"), r.get("correct"))
    differ = sorted(k for k in from_tasks if counts.get(k) != from_tasks[k])
    extra = [] if provenance.get("merged_from") else sorted(set(counts) - set(from_tasks))
    if differ or extra:
        key = (differ or extra)[0]
        raise CompareError(f"{file} disagrees with the run's task records at {key[0]}@{key[1]}: "
                           f"{counts.get(key)} (n, correct) here, {from_tasks.get(key)} in {file.parent / TASKS_DIR}/ "
                           f"({len(differ) + len(extra)} records differ); the task records are the run's results: "
                           f"run its config again to rewrite results.json from them")


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


def tail_count(runs: int) -> int:
    """How many runs the tail holds: ceil(runs / 10), at least one (OGA's 10 of its 100 runs; the worst run alone
    below 10 runs)."""
    return max(1, -(-int(runs) // 10))


def tail_mean(values, worse: str = "low") -> float:
    """The mean of the worst ``tail_count`` of ``values`` (the lowest where ``worse`` is "low", else the highest)."""
    ordered = sorted(values, reverse=worse == "high")
    return _mean(ordered[:tail_count(len(ordered))])


def run_order(payload):
    """The seed of a run's stream order: its TEST.ORDER_SEED, or its RNG_SEED where that is -1 or was not recorded
    (runs from before the key)."""
    cfg = run_config(payload)
    chosen = (cfg.get("TEST") or {}).get("ORDER_SEED", -1)
    return cfg.get(SEED_KEY) if chosen == -1 else chosen


def orders_chosen(payloads: list[dict]) -> bool:
    """Whether some run set TEST.ORDER_SEED (a run over stream orders: its row gets the tail statistic)."""
    return any((run_config(p).get("TEST") or {}).get("ORDER_SEED", -1) != -1
               for p in payloads if (p.get("provenance") or {}).get("config"))


def check_same_experiment(payloads: list[dict], ignore=POOLED_KEYS) -> None:
    """Refuse payloads whose configs differ in a result-relevant key other than ``ignore`` (names the keys), or
    that read other data or weights (``same_inputs``)."""
    if len(payloads) < 2:
        return
    configs = [run_config(p) for p in payloads]
    diff = differing_keys(configs, tuple(ignore))
    if diff:
        labels = [run_label(p) for p in payloads]
        raise CompareError(f"these results come from configs that differ in {diff} (not only in the seed or the "
                           f"stream order's seed); refusing to combine them:\n"
                           f"{describe_differences(configs, labels, tuple(ignore))}")
    for p in payloads[1:]:
        why = inputs_differ(payloads[0], p)
        if why:
            raise CompareError(f"{run_label(payloads[0])} and {run_label(p)} {why}; refusing to combine them")


def inputs_differ(a: dict, b: dict) -> str | None:
    """Why two runs did not read the same inputs beyond their configs (None: they did, as far as both recorded):
    other weights (sha256), or another content of a task both ran (the files' paths below DATA_DIR and sizes,
    provenance.data.fingerprints). A run from before these were recorded is compared on what it has."""
    pa, pb = a.get("provenance") or {}, b.get("provenance") or {}
    if "weights_sha256" in pa and "weights_sha256" in pb and pa["weights_sha256"] != pb["weights_sha256"]:
        return (f"ran with other weights (sha256 {str(pa['weights_sha256'])[:12]} and "
                f"{str(pb['weights_sha256'])[:12]})")
    ia, ib = pa.get("inputs") or {}, pb.get("inputs") or {}
    for name in sorted(set(ia) & set(ib)):
        if (ia[name] or {}).get("sha256") != (ib[name] or {}).get("sha256"):
            return (f"read another {name} ({(ia[name] or {}).get('path')} and {(ib[name] or {}).get('path')} differ "
                    f"in content)")
    fa = (pa.get("data") or {}).get("fingerprints") or {}
    fb = (pb.get("data") or {}).get("fingerprints") or {}
    for task in sorted(set(fa) & set(fb), key=str):
        ca, cb = (fa[task] or {}).get("content_sha1"), (fb[task] or {}).get("content_sha1")
        if ca != cb:
            return (f"read other data for task {task} ({(fa[task] or {}).get('files')} files / "
                    f"{(fa[task] or {}).get('bytes')} bytes under {(fa[task] or {}).get('data_dir')}, "
                    f"{(fb[task] or {}).get('files')} / {(fb[task] or {}).get('bytes')} under "
                    f"{(fb[task] or {}).get('data_dir')})")
    return None


def aggregate(payloads: list[dict], label: str | None = None, metric: str = "accuracy") -> Row:
    """One row from several runs of the same config that differ only in RNG_SEED and TEST.ORDER_SEED: per cell the
    mean and the sample standard deviation over runs; the mean column is each run's mean of its cells, averaged.
    Where some run set TEST.ORDER_SEED, also the tail (``tail_mean``) per cell and of the runs' means.

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
    worse = WORSE_END.get(metric)
    if worse and orders_chosen(payloads):
        row.orders = [run_order(p) for p in payloads]
        row.tail = {c: tail_mean([run[c] for run in per_run], worse) for c in shown}
        row.mean_tail = tail_mean(run_means, worse) if run_means else None
    return row


def merge(payloads: list[dict]) -> dict:
    """One payload from shards of one run (identical configs, seed included): the union of their records, each
    (domain, severity) once, ordered as CORRUPTION.TYPE; records present in several shards must agree. The
    per-class fields of every record are recomputed from its confusion counts (``recounted``)."""
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
            if known is not None and None not in (known.get("confusion"), record.get("confusion")) \
                    and known["confusion"] != record["confusion"]:
                raise CompareError(f"{column.domain}@{column.severity}: shards disagree in their confusion counts "
                                   f"(same {record['correct']}/{record['n']}, other cells in {run_label(p)})")
            merged.setdefault(column, recounted(record, f"{run_label(p)}: {column.domain}@{column.severity}"))
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


def recounted(record: dict, where: str) -> dict:
    """The record with its per-class fields computed from its confusion counts, which must count its n images and
    its correct ones; a record written before these were recorded is returned as it is. The class name is kept
    where the worst class is the recorded one (merging knows no class names)."""
    confusion = record.get("confusion")
    if confusion is None:
        return record
    if confusion_totals(confusion) != (record["n"], record["correct"]):
        images, correct = confusion_totals(confusion)
        raise CompareError(f"{where}: its confusion counts {correct} correct of {images} images, not its "
                           f"{record['correct']}/{record['n']}; the file was edited or is damaged")
    fields = class_fields(confusion)
    if fields["worst_class"] == record.get("worst_class"):
        fields["worst_class_name"] = record.get("worst_class_name")
    return {**record, **fields}


def group_runs(payloads: list[dict]) -> list[tuple[str, list[dict]]]:
    """Runs of the same config but for the seed, on the same data and weights, form one group (one row); rows
    labelled by method, with a short config id where one method has several configs and a data id where one config
    ran on several data (``inputs_differ``). Two runs of one seed in one group are refused: pooled, they would
    count as two seeds (a run of TEST.ORDER_SEED -1 streams the order of TEST.ORDER_SEED = its RNG_SEED)."""
    groups: dict[str, list[list[dict]]] = {}
    for p in payloads:
        key = json.dumps([p["dataset"], sorted(identity_keys(run_config(p), POOLED_KEYS).items())], default=str)
        subgroups = groups.setdefault(key, [])
        same = next((runs for runs in subgroups if not any(inputs_differ(r, p) for r in runs)), None)
        if same is None:
            subgroups.append([p])
            continue
        twin = next((r for r in same if _pooled_values(r) == _pooled_values(p)), None)
        if twin is not None:
            raise CompareError(f"{run_label(twin)} and {run_label(p)} are runs of one config, seed and data; pooled "
                               f"they would count as two seeds: give one of them (both RNG_SEED "
                               f"{_pooled_values(p)[0]}, stream order seed {_pooled_values(p)[1]})")
        same.append(p)
    methods = [subgroups[0][0]["method"] for subgroups in groups.values()]
    labelled = []
    for subgroups in groups.values():
        for k, runs in enumerate(subgroups):
            label = runs[0]["method"]
            if methods.count(label) > 1:
                label += f" [{_identity_id(runs[0])}]"
            if len(subgroups) > 1:
                label += f" [data {k + 1}: {_data_id(runs[0])}]"
            labelled.append((label, runs))
    return labelled


def _pooled_values(payload) -> tuple:
    return run_config(payload).get(SEED_KEY), run_order(payload)


def _data_id(payload) -> str:
    """A short id of what a run read beyond its config (weights and data contents), for row labels."""
    provenance = payload.get("provenance") or {}
    fingerprints = (provenance.get("data") or {}).get("fingerprints") or {}
    content = sorted((str(k), (v or {}).get("content_sha1")) for k, v in fingerprints.items())
    inputs = sorted((k, (v or {}).get("sha256")) for k, v in (provenance.get("inputs") or {}).items())
    return hashlib.sha1(repr((provenance.get("weights_sha256"), content, inputs)).encode()).hexdigest()[:6]


def _identity_id(payload) -> str:
    flat = sorted(identity_keys(run_config(payload), POOLED_KEYS).items())
    return hashlib.sha1(repr(flat).encode()).hexdigest()[:6]
