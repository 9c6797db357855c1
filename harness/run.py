"""The one evaluation harness: runs a checked plan (harness/build.py). For each task of the SETTING it resets the
method as the setting says, streams the data batch by batch through the method, counts correct predictions per
(domain, severity), and writes the records. Three steps: ``prepare`` (seed, resume, model, method, provenance),
``run_tasks``, ``finish`` (the results file and the logged table)."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import methods
from conf.errors import UserError
from conf.files import WriteError, remove_orphans
from datasets.transforms import clip_image_transform
from harness.build import RunPlan, build_plan
from harness import forgetting
from harness.identity import config_hash
from harness.report import paper
from harness.report.text import format_table
from harness.results import results_payload, run_provenance, write_results
from harness.stream import SegmentStream
from harness.task_run import images_until_reset, run_task
from harness.logs import file_logging
from harness.progress import Progress
from harness.task_records import TASKS_DIR, clear_tasks, read_tasks, results_lock, task_locks, write_task
from harness.settings import tasks_to_run
from models import build_auxiliary_clip, build_zero_shot_clip

logger = logging.getLogger("tta")


def seed_everything(cfg) -> None:
    torch.manual_seed(cfg.RNG_SEED)
    np.random.seed(cfg.RNG_SEED)
    random.seed(cfg.RNG_SEED)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(cfg.RNG_SEED)
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK and not cfg.DETERMINISM
        torch.backends.cudnn.deterministic = bool(cfg.DETERMINISM)


@dataclass
class RunState:
    """What ``prepare`` builds for ``run_tasks`` and ``finish``."""
    method: methods.TTAMethod
    transform: object
    provenance: dict
    done: dict                      # task index -> its stored or fresh records
    run_now: list[int]              # task indices to run in this process, in order
    resumed: list[int]              # finished tasks read back instead of run
    device_name: str
    model_info: dict = field(default_factory=dict)
    forgetting: dict | None = None  # TEST.FORGETTING: results.json's entry (harness/forgetting.py)


def evaluate(cfg_or_plan, progress: bool = True, label: str | None = None) -> dict:
    """Run a plan (or a config, planned first); returns the results payload (also written to disk).

    ``progress``: the images done of every task this process runs, with an ETA (harness/progress.py: a bar on a
    terminal, a line a minute elsewhere), shown as ``label`` (default: the method and the data set).

    The run folder is created only once the plan is checked. With RESUME (default) the tasks an earlier run of
    the same config finished are read back instead of run again; RUN_DOMAINS limits this process to some domains
    (see docs/comparison.md). A UserError raised during the run names the run's log in ``err.log_path``, where
    the command-line wrapper writes its line too."""
    plan = cfg_or_plan if isinstance(cfg_or_plan, RunPlan) else build_plan(cfg_or_plan)
    log_path = plan.save_dir / plan.cfg.LOG_DEST
    handler = _attach_log_file(log_path, append=bool(plan.cfg.RESUME))
    try:
        for warning in plan.warnings:
            logger.warning(warning)
        for orphan in remove_orphans(plan.save_dir) + remove_orphans(plan.save_dir / TASKS_DIR):
            logger.info("Removed %s, left by an interrupted write", orphan)
        with task_locks(plan.save_dir, tasks_to_run(plan.tasks, set(plan.wanted))):
            state = prepare(plan)
            zero_shot = forgetting.before_stream(plan, state)      # TEST.FORGETTING; the method is left as it is
            run_tasks(plan, state, progress, label)
            state.forgetting = forgetting.after_stream(plan, state, zero_shot)
            return finish(plan, state)
    except UserError as err:
        err.log_path = log_path
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _attach_log_file(path: Path, append: bool) -> logging.Handler:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            path.write_text("")
        return file_logging(path)
    except OSError as err:
        raise WriteError(f"cannot write the run's log {path}: {err.strerror or err}") from None


# ------------------------------------------------------------------------------------------------ prepare

def prepare(plan: RunPlan) -> RunState:
    """Seed, read back finished tasks, build model and method, collect the provenance."""
    cfg = plan.cfg
    seed_everything(cfg)
    if cfg.RESUME:
        done = read_tasks(plan.save_dir, plan.tasks, config_hash(cfg), cfg.dump(), plan.identity_of)
    else:
        clear_tasks(plan.save_dir, plan.wanted)
        done = {}
    run_now = tasks_to_run(plan.tasks, {i for i in plan.wanted if i not in done})
    rerun = sorted(set(run_now) & set(done))
    resumed = sorted(set(done) - set(run_now))
    if rerun:
        logger.warning("SETTING %s carries the adapted state from task to task and the model state is not "
                       "saved: re-running finished tasks %s to rebuild the state of the unfinished ones",
                       cfg.SETTING, rerun)
    if resumed:
        logger.info("Resuming: %d of %d tasks already finished in %s", len(resumed), len(plan.tasks), plan.save_dir)

    model, model_info = build_zero_shot_clip(cfg, plan.class_names, plan.templates, plan.device, plan.weights)
    auxiliary, auxiliary_info = {}, {}
    for keyword, checked in plan.auxiliary.items():
        auxiliary[keyword], auxiliary_info[keyword] = build_auxiliary_clip(cfg, checked, plan.class_names,
                                                                           plan.templates, plan.device)
    transform = clip_image_transform(model.image_size, model_info["interpolation"])
    if plan.source is not None:     # TTAMethod.source_data: the source images, transformed as the test images
        auxiliary["source_loader"] = source_loader(plan, transform)
    method = plan.method_class(cfg, model, len(plan.class_names), **auxiliary).setup().to(plan.device)
    logger.info("Method %s on %s (%s) with %s, %d/%d parameters adapted; results in %s", plan.method_name,
                cfg.CORRUPTION.DATASET, cfg.SETTING, model_info["arch"], method.num_trainable_params(),
                model_info["num_parameters"], plan.save_dir)
    device = plan.device
    device_name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    provenance = run_provenance(plan, method, model_info, device_name, auxiliary_info)
    return RunState(method, transform, provenance, done, run_now, resumed, device_name, model_info)


def source_loader(plan: RunPlan, transform):
    """Batches (images, labels, 0) of the plan's source images in their selected order: TEST.BATCH_SIZE (the
    anchor's EATA: TEST.WINDOW_LENGTH where the batch size is 1), the test stream's workers."""
    cfg = plan.cfg
    batch_size = cfg.TEST.BATCH_SIZE if cfg.TEST.BATCH_SIZE > 1 else cfg.TEST.WINDOW_LENGTH
    stream = SegmentStream([plan.source], np.arange(len(plan.source)), transform)
    workers = int(cfg.TEST.NUM_WORKERS)
    return torch.utils.data.DataLoader(stream, batch_size=int(batch_size), shuffle=False, num_workers=workers,
                                       pin_memory=plan.device.type == "cuda", drop_last=False)


# ------------------------------------------------------------------------------------------------ run

def run_tasks(plan: RunPlan, state: RunState, progress: bool, label: str | None = None) -> None:
    """Every task of ``state.run_now`` in order; each finished task's records are written at once (resuming).
    ``progress``: one count of the images of all these tasks."""
    cfg = plan.cfg
    cfg_hash, config_dump = state.provenance["config_hash"], state.provenance["config"]
    total = sum(len(plan.data[s]) for index in state.run_now for s in plan.tasks[index].segments)
    with Progress(total, label or f"{plan.method_name} on {cfg.CORRUPTION.DATASET}",
                  enabled=progress and bool(state.run_now)) as bar:
        for index in state.run_now:
            task = plan.tasks[index]
            if task.reset:
                state.method.reset()
                # Every reset task starts from the same RNG state, so a task's result does not depend on which
                # tasks ran before it in this process (exact resuming and sharding).
                seed_everything(cfg)
            if task.reset or index == state.run_now[0]:
                state.method.begin_stream(images_until_reset(plan, state.run_now, index))
            records, seconds, images = run_task(plan, state.method, state.transform, index, bar)
            write_task(plan.save_dir, index, task, records, seconds, images, cfg_hash, config_dump,
                       state.device_name, plan.identity_of(index))
            state.done[index] = {"records": records, "wall_time_s": seconds, "images": images}
            _write_payload(plan, state)
        bar.set_postfix_str("")         # the last line names the domain only where the run stopped


# ------------------------------------------------------------------------------------------------ finish

def finish(plan: RunPlan, state: RunState) -> dict:
    """The results file from every finished task (other shards' too) and the logged table."""
    cfg = plan.cfg
    payload = _write_payload(plan, state)
    row = paper.paper_row_for_run(cfg.CORRUPTION.DATASET, plan.method_name, cfg)
    reference = paper.comparable_reference(row, payload["records"])
    table = format_table(payload["records"], plan.dataset.domain_label,
                         show_severity=bool(getattr(plan.dataset, "has_severities", True)), reference=reference,
                         complete=payload["complete"])
    notes = ""
    if reference is not None:
        notes = f"\npaper: {row.paper_method} ({row.venue or 'BATCLIP paper'})"
        if row.reported_mean is not None:
            notes += f", printed mean {row.reported_mean:.2f} over all {len(row.accuracy)} domains"
        mismatch = paper.protocol_mismatch(row, cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS, cfg.SETTING)
        if mismatch:
            notes += "; this run differs from the paper's protocol: " + ", ".join(mismatch)
    if not payload["complete"]:
        notes += f"\n{len(state.done)} of {len(plan.tasks)} tasks finished so far"
    logger.info("%s on %s (%s, %s / %s):\n%s%s", plan.method_name, cfg.CORRUPTION.DATASET, cfg.SETTING,
                state.model_info["arch"], state.model_info["weights"], table, notes)
    return payload


def _write_payload(plan: RunPlan, state: RunState) -> dict:
    """results.json / results.csv from every finished task, in the setting's order; with RUN_DOMAINS, other
    shards' finished tasks too (read under the results lock, so that the last shard to write lists them all)."""
    with results_lock(plan.save_dir):
        if plan.cfg.RUN_DOMAINS:
            stored = read_tasks(plan.save_dir, plan.tasks, state.provenance["config_hash"], state.provenance["config"])
            state.done = {**stored, **state.done}
        return _payload_written(plan, state)


def _payload_written(plan: RunPlan, state: RunState) -> dict:
    scaler = state.method.scaler
    payload = results_payload(plan, state.done, state.provenance, state.resumed,
                              state.method.scaler_skipped_steps if scaler else None, state.forgetting)
    write_results(plan.save_dir, payload)
    return payload
