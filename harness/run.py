"""The one evaluation harness: for each task of the SETTING, reset as the setting says, stream the data
batch by batch through the method, count correct predictions per (domain, severity), write the records."""
from __future__ import annotations

import hashlib
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
from harness.results import (command_line, format_table, git_commit, make_record, package_versions,
                             summarise, write_results)
from harness.settings import build_tasks
from harness.stream import SegmentStream, make_loader, stream_order
from models import build_zero_shot_clip

logger = logging.getLogger("tta")

# Keys that do not change results and so do not enter the run's identity.
_NON_RESULT_KEYS = {"DATA_DIR", "SAVE_DIR", "RUN_NAME", "LOG_DEST", "LOG_TIME", "PRINT_EVERY", "DESC"}


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


def config_hash(cfg) -> str:
    identity = {k: v for k, v in cfg.items() if k not in _NON_RESULT_KEYS}
    identity["TEST"] = {k: v for k, v in cfg.TEST.items() if k != "NUM_WORKERS"}
    return hashlib.sha1(repr(sorted(_plain(identity).items())).encode()).hexdigest()[:8]


def _plain(node):
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in sorted(node.items())}
    return node


def run_dir(cfg) -> Path:
    method = methods.canonical_name(cfg.MODEL.ADAPTATION)
    name = cfg.RUN_NAME or (f"{cfg.MODEL.ARCH}_{Path(str(cfg.MODEL.WEIGHTS)).stem}_{cfg.SETTING}"
                            f"_seed{cfg.RNG_SEED}_{config_hash(cfg)}")
    return Path(cfg.SAVE_DIR) / cfg.CORRUPTION.DATASET / method / re.sub(r"[^A-Za-z0-9_.@+-]", "-", name)


def _setup_logging(save_dir: Path, log_name: str) -> logging.Handler:
    save_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(save_dir / log_name, mode="w")
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def evaluate(cfg, progress: bool = True) -> dict:
    """Run cfg's method on cfg's data; returns the results payload (also written to disk)."""
    save_dir = run_dir(cfg)
    handler = _setup_logging(save_dir, cfg.LOG_DEST)
    try:
        return _evaluate(cfg, save_dir, progress)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _evaluate(cfg, save_dir: Path, progress: bool) -> dict:
    seed_everything(cfg)
    device = resolve_device(cfg)
    dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
    templates = (list(dataset.ensemble_templates) if cfg.CLIP.PROMPT_MODE == "ensemble"
                 else list(cfg.CLIP.PROMPT_TEMPLATE))
    model, model_info = build_zero_shot_clip(cfg, dataset.class_names, templates, device)
    method = methods.build_method(cfg, model, len(dataset.class_names)).to(device)
    method_name = methods.canonical_name(cfg.MODEL.ADAPTATION)
    logger.info("Method %s on %s (%s) with %s, %d/%d parameters adapted; results in %s", method_name,
                cfg.CORRUPTION.DATASET, cfg.SETTING, model_info["arch"], method.num_trainable_params(),
                model_info["num_parameters"], save_dir)
    transform = clip_image_transform(model.image_size, model_info["interpolation"])

    records: list[dict] = []
    n_seen, seconds = 0, 0.0
    for task_index, task in enumerate(build_tasks(cfg)):
        if task.reset:
            method.reset()
        parts = [dataset.build_domain(cfg, s.domain, s.severity, transform) for s in task.segments]
        if any(len(p) == 0 for p in parts):
            empty = [s for s, p in zip(task.segments, parts) if len(p) == 0]
            raise datasets.DatasetError(f"{cfg.CORRUPTION.DATASET}: no images for {empty}")
        order = stream_order([len(p) for p in parts], task.order, cfg.RNG_SEED, task_index)
        loader = make_loader(SegmentStream(parts, order), cfg, device)
        correct = torch.zeros(len(parts), dtype=torch.long)
        counts = torch.zeros(len(parts), dtype=torch.long)
        label = ", ".join(f"{s.domain}@{s.severity}" for s in task.segments[:3]) + (
            " ..." if len(task.segments) > 3 else "")
        start = time.perf_counter()
        for images, labels, segment in tqdm(loader, desc=label, disable=not progress, leave=False):
            logits = method(images.to(device, non_blocking=True))
            hits = (logits.argmax(1).cpu() == labels).long()
            correct.index_add_(0, segment, hits)
            counts.index_add_(0, segment, torch.ones_like(hits))
        seconds += time.perf_counter() - start
        n_seen += int(counts.sum())
        for k, seg in enumerate(task.segments):
            record = make_record(seg.domain, seg.severity, int(counts[k]), int(correct[k]))
            records.append(record)
            logger.info("%s severity %d: accuracy %.2f%% (error %.2f%%, n=%d)", seg.domain, seg.severity,
                        100 * record["accuracy"], 100 * record["error"], record["n"])

    payload = {
        "method": method_name,
        "dataset": cfg.CORRUPTION.DATASET,
        "setting": cfg.SETTING,
        "domain_label": dataset.domain_label,
        "records": records,
        "summary": summarise(records),
        "provenance": {
            "config": cfg.dump(),
            "config_hash": config_hash(cfg),
            "command": command_line(),
            "git": git_commit(),
            "versions": package_versions(),
            "model": model_info,
            "adapted_parameters": method.num_trainable_params(),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch_threads": torch.get_num_threads(),
            "data": {"data_dir": str(Path(cfg.DATA_DIR).resolve()), **dataset.describe(cfg)},
            "wall_time_s": seconds,
            "images": n_seen,
            "images_per_second": n_seen / seconds if seconds > 0 else None,
            "save_dir": str(save_dir),
        },
    }
    write_results(save_dir, payload)
    table = format_table(records, dataset.domain_label)
    logger.info("%s on %s (%s, %s / %s):\n%s", method_name, cfg.CORRUPTION.DATASET, cfg.SETTING,
                model_info["arch"], model_info["weights"], table)
    return payload
