"""The one evaluation harness: for each task of the SETTING, reset as the setting says, stream the data
batch by batch through the method, count correct predictions per (domain, severity), write the records."""
from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import datasets
import methods
from datasets.transforms import clip_image_transform
from harness import paper
from harness.identity import config_hash
from harness.progress import clear_tasks, read_tasks, write_task
from harness.results import (command_line, format_table, git_commit, make_record, package_versions,
                             summarise, write_results)
from harness.settings import SettingError, build_tasks, tasks_to_run
from harness.stream import SegmentStream, make_loader, segment_labels, stream_order
from models import build_zero_shot_clip

logger = logging.getLogger("tta")

def resolve_device(cfg) -> torch.device:
    if cfg.DEVICE == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.DEVICE)


def seed_everything(cfg) -> None:
    torch.manual_seed(cfg.RNG_SEED)
    np.random.seed(cfg.RNG_SEED)
    random.seed(cfg.RNG_SEED)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(cfg.RNG_SEED)
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK and not cfg.DETERMINISM
        torch.backends.cudnn.deterministic = bool(cfg.DETERMINISM)


def run_dir(cfg) -> Path:
    method = methods.canonical_name(cfg.MODEL.ADAPTATION)
    name = cfg.RUN_NAME or (f"{cfg.MODEL.ARCH}_{Path(str(cfg.MODEL.WEIGHTS)).stem}_{cfg.SETTING}"
                            f"_seed{cfg.RNG_SEED}_{config_hash(cfg)}")
    return Path(cfg.SAVE_DIR) / cfg.CORRUPTION.DATASET / method / re.sub(r"[^A-Za-z0-9_.@+-]", "-", name)


def _setup_logging(save_dir: Path, log_name: str, append: bool) -> logging.Handler:
    save_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(save_dir / log_name, mode="a" if append else "w")
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def evaluate(cfg, progress: bool = True) -> dict:
    """Run cfg's method on cfg's data; returns the results payload (also written to disk).

    With RESUME (default) the tasks an earlier run of the same config finished are read back instead of run
    again; RUN_DOMAINS limits this process to some domains (see docs/comparison.md)."""
    save_dir = run_dir(cfg)
    handler = _setup_logging(save_dir, cfg.LOG_DEST, append=bool(cfg.RESUME))
    try:
        return _evaluate(cfg, save_dir, progress)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def select_tasks(cfg, tasks) -> list[int]:
    """Indices of the tasks RUN_DOMAINS asks this process for (all when it is empty)."""
    run_domains = list(cfg.RUN_DOMAINS)
    if not run_domains:
        return list(range(len(tasks)))
    unknown = [d for d in run_domains if d not in cfg.CORRUPTION.TYPE]
    if unknown:
        raise SettingError(f"RUN_DOMAINS {unknown} are not in CORRUPTION.TYPE {list(cfg.CORRUPTION.TYPE)}")
    wanted = []
    for index, task in enumerate(tasks):
        inside = [s.domain in run_domains for s in task.segments]
        if all(inside):
            wanted.append(index)
        elif any(inside):
            raise SettingError(f"SETTING {cfg.SETTING} puts several domains into one stream; RUN_DOMAINS cannot "
                               f"split it (run all domains in one process)")
    outside = sorted(set(tasks_to_run(tasks, set(wanted))) - set(wanted))
    if outside:
        raise SettingError(f"SETTING {cfg.SETTING} carries the adapted state from domain to domain: "
                           f"RUN_DOMAINS {run_domains} would need the state after "
                           f"{sorted({s.domain for i in outside for s in tasks[i].segments})}. Only settings "
                           f"that reset at every domain (reset_each_shift*) can be split over processes.")
    return wanted


def _evaluate(cfg, save_dir: Path, progress: bool) -> dict:
    seed_everything(cfg)
    device = resolve_device(cfg)
    dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
    tasks = build_tasks(cfg, dataset)
    wanted = select_tasks(cfg, tasks)
    cfg_hash, config_dump = config_hash(cfg), cfg.dump()
    if cfg.RESUME:
        done = read_tasks(save_dir, tasks, cfg_hash, config_dump)
    else:
        clear_tasks(save_dir, wanted)
        done = {}
    run_now = tasks_to_run(tasks, {i for i in wanted if i not in done})
    rerun = sorted(set(run_now) & set(done))
    resumed = sorted(set(done) - set(run_now))
    if rerun:
        logger.warning("SETTING %s carries the adapted state from task to task and the model state is not "
                       "saved: re-running finished tasks %s to rebuild the state of the unfinished ones",
                       cfg.SETTING, rerun)
    if resumed:
        logger.info("Resuming: %d of %d tasks already finished in %s", len(resumed), len(tasks), save_dir)

    templates = (list(dataset.ensemble_templates) if cfg.CLIP.PROMPT_MODE == "ensemble"
                 else list(cfg.CLIP.PROMPT_TEMPLATE))
    model, model_info = build_zero_shot_clip(cfg, dataset.class_names, templates, device)
    method = methods.build_method(cfg, model, len(dataset.class_names)).to(device)
    method_name = methods.canonical_name(cfg.MODEL.ADAPTATION)
    logger.info("Method %s on %s (%s) with %s, %d/%d parameters adapted; results in %s", method_name,
                cfg.CORRUPTION.DATASET, cfg.SETTING, model_info["arch"], method.num_trainable_params(),
                model_info["num_parameters"], save_dir)
    transform = clip_image_transform(model.image_size, model_info["interpolation"])
    device_name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")

    provenance = {
        "config": config_dump,
        "config_hash": cfg_hash,
        "command": command_line(),
        "git": git_commit(),
        "versions": package_versions(),
        "model": model_info,
        "adapted_parameters": method.num_trainable_params(),
        "method_precision": method.precision_info(),
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "data": {"data_dir": str(Path(cfg.DATA_DIR).resolve()), **dataset.describe(cfg)},
        "save_dir": str(save_dir),
    }
    cost_info = getattr(method, "cost_info", None)
    if callable(cost_info):
        provenance["method_cost"] = dict(cost_info())

    for index in run_now:
        task = tasks[index]
        if task.reset:
            method.reset()
            # Every reset task starts from the same RNG state, so a task's result does not depend on which
            # tasks ran before it in this process (exact resuming and sharding).
            seed_everything(cfg)
        records, seconds, images = _run_task(cfg, dataset, method, task, index, transform, device, progress)
        write_task(save_dir, index, task, records, seconds, images, cfg_hash, config_dump, device_name)
        done[index] = {"records": records, "wall_time_s": seconds, "images": images}
        _write_payload(cfg, save_dir, dataset, method_name, tasks, done, resumed, provenance)

    if cfg.RUN_DOMAINS:
        # Other shards may have finished tasks meanwhile: the results file shows every finished task.
        done = {**read_tasks(save_dir, tasks, cfg_hash, config_dump), **done}
    payload = _write_payload(cfg, save_dir, dataset, method_name, tasks, done, resumed, provenance)
    row = paper.paper_row(cfg.CORRUPTION.DATASET, method_name)
    reference = paper.comparable_reference(row, payload["records"])
    table = format_table(payload["records"], dataset.domain_label,
                         show_severity=bool(getattr(dataset, "has_severities", True)), reference=reference)
    notes = ""
    if reference is not None:
        notes = f"\npaper: {row.paper_method} ({row.venue or 'BATCLIP paper'})"
        if row.reported_mean is not None:
            notes += f", printed mean {row.reported_mean:.2f} over all {len(row.accuracy)} domains"
        mismatch = paper.protocol_mismatch(row, cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS, cfg.SETTING)
        if mismatch:
            notes += "; this run differs from the paper's protocol: " + ", ".join(mismatch)
    if not payload["complete"]:
        notes += f"\n{len(done)} of {len(tasks)} tasks finished so far"
    logger.info("%s on %s (%s, %s / %s):\n%s%s", method_name, cfg.CORRUPTION.DATASET, cfg.SETTING,
                model_info["arch"], model_info["weights"], table, notes)
    return payload


def _run_task(cfg, dataset, method, task, index, transform, device, progress) -> tuple[list[dict], float, int]:
    parts = [dataset.build_domain(cfg, s.domain, s.severity, transform) for s in task.segments]
    if any(len(p) == 0 for p in parts):
        empty = [s for s, p in zip(task.segments, parts) if len(p) == 0]
        raise datasets.DatasetError(f"{cfg.CORRUPTION.DATASET}: no images for {empty}")
    labels = (np.concatenate([segment_labels(p) for p in parts]) if task.correlation != "none" else None)
    order = stream_order([len(p) for p in parts], task.order, cfg.RNG_SEED, index, labels=labels,
                         correlation=task.correlation, dirichlet_delta=task.dirichlet_delta,
                         batch_size=int(cfg.TEST.BATCH_SIZE))
    loader = make_loader(SegmentStream(parts, order), cfg, device)
    correct = torch.zeros(len(parts), dtype=torch.long)
    counts = torch.zeros(len(parts), dtype=torch.long)
    label = ", ".join(f"{s.domain}@{s.severity}" for s in task.segments[:3]) + (
        " ..." if len(task.segments) > 3 else "")
    start = time.perf_counter()
    for images, labels_batch, segment in tqdm(loader, desc=label, disable=not progress, leave=False):
        logits = method(images.to(device, non_blocking=True))
        hits = (logits.argmax(1).cpu() == labels_batch).long()
        correct.index_add_(0, segment, hits)
        counts.index_add_(0, segment, torch.ones_like(hits))
    seconds = time.perf_counter() - start
    records = []
    for k, seg in enumerate(task.segments):
        record = make_record(seg.domain, seg.severity, int(counts[k]), int(correct[k]))
        records.append(record)
        logger.info("%s severity %d: accuracy %.2f%% (error %.2f%%, n=%d)", seg.domain, seg.severity,
                    100 * record["accuracy"], 100 * record["error"], record["n"])
    return records, seconds, int(counts.sum())


def _write_payload(cfg, save_dir, dataset, method_name, tasks, done, resumed, provenance) -> dict:
    """results.json / results.csv from every finished task, in the setting's order."""
    finished = sorted(done)
    records = [r for i in finished for r in done[i]["records"]]
    seconds = sum(done[i]["wall_time_s"] for i in finished)
    images = sum(done[i]["images"] for i in finished)
    payload = {
        "method": method_name,
        "dataset": cfg.CORRUPTION.DATASET,
        "setting": cfg.SETTING,
        "domain_label": dataset.domain_label,
        "has_severities": bool(getattr(dataset, "has_severities", True)),
        "complete": len(finished) == len(tasks),
        "records": records,
        "summary": summarise(records),
        "provenance": {
            **provenance,
            "wall_time_s": seconds,
            "images": images,
            "images_per_second": images / seconds if seconds > 0 else None,
            "tasks_total": len(tasks),
            "tasks_done": finished,
            "resumed_tasks": resumed,
            "run_domains": list(cfg.RUN_DOMAINS),
        },
    }
    write_results(save_dir, payload)
    return payload
