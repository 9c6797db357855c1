"""Launching a grid's jobs with submitit (no scheduler of our own):

- ``slurm``: one job array (``map_array``: one submission, at most ``array_parallelism`` jobs at once), one
  grid job per array element;
- ``local``: N worker processes through submitit's LocalExecutor (default: one per visible GPU, else one), each
  taking the next job no other worker holds (the job's lock), so the jobs spread over the workers as they finish;
- ``debug``: one worker in this process (DebugExecutor).

Every job and worker is submitit-Checkpointable: a job signalled before its time limit or pre-empted is requeued
by submitit and, run again, resumes from its finished tasks (harness.run's task records)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from conf.errors import UserError
from conf.files import atomic_write_text
from harness.grid import Grid, GridJob, QueueState, SchedulerState, run_job
from harness.logs import console_logging
from harness.progress import Progress
from harness.results import utc_now

LAUNCHERS = ("slurm", "local", "debug")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60          # submitit's LocalExecutor stops a job after 2 minutes unless told
# SLURM's words for a job (sacct's State, as submitit reads it) in the grid's (harness/grid/status.py): running,
# or being started, finished, requeued, suspended; waiting in the queue. Any other word is an end (COMPLETED,
# FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...) but UNKNOWN: sacct does not know the job (yet), which says nothing.
SLURM_ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "STAGE_OUT"}
SLURM_QUEUED = {"PENDING", "REQUEUE_HOLD", "REQUEUE_FED"}

logger = logging.getLogger(__name__)


class LaunchError(UserError):
    """A launcher cannot be used as asked here."""


@dataclass
class LaunchOptions:
    launcher: str = "local"
    parallel: int | None = None           # local: worker processes (default: one per visible GPU, else one)
    gpus_per_job: int | None = None       # slurm: 1 where the partition has GPUs, else 0; local: 1 where visible
    cpus_per_job: int | None = None       # CPU threads of a job (slurm: --cpus-per-task)
    timeout_min: int | None = None        # slurm: the job's time limit (default 240); local: default a week
    partition: str | None = None
    array_parallelism: int | None = None  # slurm: jobs of the array running at once (default: all)
    mem_gb: float | None = None
    slurm_params: dict = field(default_factory=dict)   # further sbatch parameters, e.g. account, qos
    setup: list = field(default_factory=list)           # shell lines run before each job (module load, venv)


@contextlib.contextmanager
def _threads(threads: int | None):
    """The job's CPU threads (its own, or SLURM's --cpus-per-task), restored afterwards: the debug launcher runs
    jobs in the calling process, whose thread count must not change."""
    import torch     # deferred, as below: grid.py status imports this module and needs no torch
    before = torch.get_num_threads()
    threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _output_path() -> str:
    try:
        return str(submitit.JobEnvironment().paths.stdout)
    except (RuntimeError, KeyError):      # not inside a submitit job, or in the debug one (no output file)
        return ""


class JobRunner(submitit.helpers.Checkpointable):
    """One grid job (a SLURM array element). Requeued as it is when pre-empted or timed out."""

    def __init__(self, grid_folder: str, threads: int | None = None):
        self.grid_folder, self.threads = grid_folder, threads

    def __call__(self, job: GridJob) -> str:
        console_logging()
        with _threads(self.threads):
            return run_job(Path(self.grid_folder), job, output=_output_path())


class Worker(submitit.helpers.Checkpointable):
    """A local worker: goes through the jobs in order and runs each one no other worker holds and that is not
    finished. Requeued as it is when timed out; run again, it skips what is finished."""

    def __init__(self, grid_folder: str, jobs: list[GridJob], threads: int | None = None):
        self.grid_folder, self.jobs, self.threads = grid_folder, list(jobs), threads

    def __call__(self) -> dict:
        console_logging()
        output = _output_path()
        with _threads(self.threads):
            return {job.id: run_job(Path(self.grid_folder), job, output=output) for job in self.jobs}


# ------------------------------------------------------------------------------------------------ submitting

def submissions_path(grid: Grid) -> Path:
    return grid.folder / "submissions.jsonl"


def read_submissions(grid: Grid) -> dict[str, dict]:
    """{job id: its last submission record}."""
    path = submissions_path(grid)
    last: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                last[record["job"]] = record
            except (ValueError, KeyError, TypeError):
                continue      # a line cut by a full disk: the records after it still count
    return last


def _record_submissions(grid: Grid, records: list[dict]) -> None:
    path = submissions_path(grid)
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, old + "".join(json.dumps(r) + "\n" for r in records))


def slurm_state(submission: dict, word: str) -> SchedulerState | None:
    """SLURM's ``word`` for a ``submission`` (its record in submissions.jsonl) in the grid's words; None for a
    job SLURM does not know."""
    if not word or word == "UNKNOWN":
        return None
    state = (QueueState.ACTIVE if word in SLURM_ACTIVE else QueueState.QUEUED if word in SLURM_QUEUED
             else QueueState.ENDED)
    return SchedulerState(state, word, f"{submission['launcher']} job {submission['scheduler_id']}")


def scheduler_states(grid: Grid) -> dict[str, SchedulerState]:
    """{job id: what SLURM says of its last submission} for the grid's jobs last submitted to SLURM, for
    harness.grid.job_statuses: one sacct call for all of them through submitit's watcher. Local and debug
    workers have none: their liveness is their job lock. Empty when sacct does not answer (the statuses then go
    by the job locks and state files alone)."""
    slurm = {job: sub for job, sub in read_submissions(grid).items() if sub.get("launcher") == "slurm"}
    if not slurm:
        return {}
    try:
        handles = {job: submitit.SlurmJob(sub["folder"], sub["scheduler_id"]) for job, sub in slurm.items()}
        watcher = next(iter(handles.values())).watcher
        watcher.update()
        words = {job: watcher.get_state(handle.job_id, mode="cache") for job, handle in handles.items()}
    except Exception:        # sacct missing or failing: no word from the scheduler
        return {}
    states = {job: slurm_state(slurm[job], word) for job, word in words.items()}
    return {job: state for job, state in states.items() if state is not None}


def _visible_gpus() -> list[int]:
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(count))
    ids = [x.strip() for x in listed.split(",") if x.strip()]
    if not all(x.isdigit() for x in ids):
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={listed}: the local launcher assigns GPUs by index; give indices")
    return [int(x) for x in ids][:count] if count else []


def submit(grid: Grid, jobs: list[GridJob], options: LaunchOptions) -> list:
    """Submit ``jobs``; returns submitit's job handles (one per SLURM array element, one per local worker)."""
    if options.launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher {options.launcher}: expected one of {', '.join(LAUNCHERS)}")
    folder = grid.folder / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    now = utc_now()
    if options.launcher == "slurm":
        handles = _submit_slurm(grid, jobs, options, folder)
        records = [{"job": job.id, "launcher": "slurm", "scheduler_id": handle.job_id, "folder": str(folder),
                    "at": now} for job, handle in zip(jobs, handles)]
    else:
        handles = _submit_workers(grid, jobs, options, folder)
        ids = ",".join(str(h.job_id) for h in handles)
        records = [{"job": job.id, "launcher": options.launcher, "scheduler_id": ids, "folder": str(folder),
                    "at": now} for job in jobs]
    _record_submissions(grid, records)
    return handles


@dataclass(frozen=True)
class SlurmGpus:
    """The GPUs a SLURM job asks for, and why (for the log)."""
    per_job: int
    reason: str


def _gres_gpus(gres: str) -> int:
    """GPUs per node in one sinfo %G field ("gpu:4", "gpu:a100:4(S:0-1),mps:200", "(null)"); 0 without GPUs."""
    count = 0
    for item in re.split(r",(?![^(]*\))", gres.strip()):
        name, _, rest = item.partition(":")
        if name == "gpu":
            number = re.match(r"(?:[^:(]*:)?(\d+)", rest)
            count = max(count, int(number.group(1)) if number else 1)
    return count


def slurm_gpu_request(sinfo_text: str, partition: str | None, gpus_per_job: int | None) -> SlurmGpus:
    """What a job array asks for, from ``sinfo -h -o '%P|%G'`` (one line per partition and kind of node; the
    default partition ends in ``*``): without --gpus-per-job, 1 GPU where the partition has GPUs and none where
    it has none. Refused (LaunchError): a partition the cluster lacks, GPUs asked of a partition without any."""
    gres: dict[str, list[str]] = {}
    default = None
    for line in sinfo_text.splitlines():
        name, sep, value = line.strip().partition("|")
        if not sep or not name:
            continue
        if name.endswith("*"):
            name = default = name[:-1]
        gres.setdefault(name, []).append(value.strip())
    asked = 1 if gpus_per_job is None else gpus_per_job
    if partition is not None and partition not in gres:
        raise LaunchError(f"--partition {partition}: this cluster has no such partition; its partitions (sinfo): "
                          f"{', '.join(gres) or 'none'}")
    name = partition or default
    if name is None:             # no partition named and none is the default: sbatch says what it makes of it
        return SlurmGpus(asked, "no default partition in sinfo")
    gpus = max(_gres_gpus(g) for g in gres[name])
    if gpus:
        return SlurmGpus(asked, f"partition {name} has {gpus} GPU(s) per node")
    if gpus_per_job:
        raise LaunchError(f"--gpus-per-job {gpus_per_job}: partition {name} has no GPUs (sinfo's GRES: "
                          f"{', '.join(sorted(set(gres[name])))}); leave the flag out or name a partition with GPUs")
    return SlurmGpus(0, f"partition {name} has no GPUs: the jobs ask for none")


def slurm_gpus(options: LaunchOptions) -> SlurmGpus:
    """The GPUs per job for ``options`` on the cluster ``sinfo`` describes; without ``sinfo`` (or its answer),
    --gpus-per-job or 1, unchecked."""
    sinfo = shutil.which("sinfo")
    unchecked = SlurmGpus(1 if options.gpus_per_job is None else options.gpus_per_job, "sinfo not asked")
    if sinfo is None:
        return unchecked
    try:
        answer = subprocess.run([sinfo, "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return unchecked
    if answer.returncode != 0 or not answer.stdout.strip():
        return SlurmGpus(unchecked.per_job, "sinfo did not answer")
    return slurm_gpu_request(answer.stdout, options.partition, options.gpus_per_job)


def _submit_slurm(grid, jobs, options, folder) -> list:
    executor = submitit.SlurmExecutor(folder=folder)
    params = dict(time=options.timeout_min or 240, job_name=f"grid-{grid.name}", stderr_to_stdout=True,
                  array_parallelism=options.array_parallelism or len(jobs), setup=list(options.setup))
    request = slurm_gpus(options)
    gpus = request.per_job
    logger.info("SLURM: %d GPU(s) per job (%s)", gpus, request.reason)
    if gpus:
        params["gpus_per_node"] = gpus
    if options.cpus_per_job:
        params["cpus_per_task"] = options.cpus_per_job
    if options.partition:
        params["partition"] = options.partition
    if options.mem_gb:
        params["mem"] = f"{int(options.mem_gb * 1024)}MB"
    if options.slurm_params:
        params["additional_parameters"] = dict(options.slurm_params)
    try:
        executor.update_parameters(**params)
    except ValueError as err:
        raise LaunchError(f"SLURM parameters: {str(err).splitlines()[0]}") from None
    try:
        return executor.map_array(JobRunner(str(grid.folder), options.cpus_per_job), jobs)
    except submitit.core.utils.FailedJobError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise LaunchError(f"sbatch refused the job array: {lines[-1] if lines else err}") from None


def _submit_workers(grid, jobs, options, folder) -> list:
    gpus = _visible_gpus()
    per_job = (1 if gpus else 0) if options.gpus_per_job is None else options.gpus_per_job
    if per_job > len(gpus):
        raise LaunchError(f"--gpus-per-job {per_job}: {len(gpus)} GPU(s) visible here")
    if options.launcher == "debug":
        executor, workers = submitit.DebugExecutor(folder=folder), 1
    else:
        executor = submitit.LocalExecutor(folder=folder)
        workers = options.parallel or (max(1, len(gpus) // per_job) if per_job else 1)
    workers = max(1, min(workers, len(jobs)))
    threads = options.cpus_per_job or (None if per_job else max(1, (os.cpu_count() or 1) // workers))
    handles = []
    for k in range(workers):
        if options.launcher == "local":
            lane = [gpus[(k * per_job + i) % len(gpus)] for i in range(per_job)] if per_job else []
            executor.update_parameters(timeout_min=options.timeout_min or LOCAL_TIMEOUT_MIN, gpus_per_node=per_job,
                                       visible_gpus=lane, stderr_to_stdout=True)
        with _output_to_devnull(options.launcher == "local"):
            handles.append(executor.submit(Worker(str(grid.folder), jobs, threads)))
    return handles


@contextlib.contextmanager
def _output_to_devnull(active: bool):
    """Start a worker process with /dev/null as its stdout and stderr (it writes to its log file): inheriting ours,
    it would keep the pipe of whoever reads this command's output open until it ends (``--no-wait | tee``)."""
    if not active:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def wait(handles: list, count=None, total: int = 0, label: str = "jobs", poll_s: float = 2.0,
         progress: bool = True) -> None:
    """Until every handle is done. ``count()``, at every poll: (how many of the ``total`` submitted jobs have ended,
    a note such as "2 running, 1 failed"), shown as ``label``'s progress (harness/progress.py: a bar on a terminal,
    a line a minute elsewhere). A debug handle runs here, now."""
    with Progress(total, label, unit="jobs", enabled=progress and count is not None) as bar:
        for handle in handles:
            if isinstance(handle, submitit.local.debug.DebugJob):
                handle.result()
        while True:
            finished = all(handle.done() for handle in handles)
            if count is not None:
                ended, note = count()
                bar.set_postfix_str(note)
                bar.update_to(ended)
            if finished:
                return
            time.sleep(poll_s)


def check_launcher(options: LaunchOptions) -> None:
    """Refuse a launcher this machine cannot use, before anything is submitted."""
    if options.launcher == "slurm":
        missing = [c for c in ("sbatch", "sacct", "squeue") if shutil.which(c) is None]
        if missing:
            raise LaunchError(f"--launcher slurm: {', '.join(missing)} not found on PATH (SLURM's client commands); "
                              f"on a machine without SLURM use --launcher local")
    for name in ("parallel", "gpus_per_job", "cpus_per_job", "timeout_min", "array_parallelism"):
        value = getattr(options, name)
        if value is not None and (value < 0 or (value == 0 and name != "gpus_per_job")):
            raise LaunchError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if options.launcher == "slurm":
        slurm_gpus(options)      # a partition the cluster lacks, GPUs of a partition without any: refused now
    elif options.gpus_per_job and options.gpus_per_job > len(_visible_gpus()):
        raise LaunchError(f"--gpus-per-job {options.gpus_per_job}: {len(_visible_gpus())} GPU(s) visible here")
    if options.launcher != "slurm":
        for name, flag in (("partition", "partition"), ("array_parallelism", "array-parallelism"),
                           ("mem_gb", "mem-gb"), ("slurm_params", "slurm-param"), ("setup", "setup")):
            if getattr(options, name):
                raise LaunchError(f"--{flag} is for --launcher slurm, not {options.launcher}")
    if options.launcher != "local" and options.parallel:
        raise LaunchError(f"--parallel is for --launcher local (slurm: --array-parallelism), not {options.launcher}")


__all__ = ["JobRunner", "LAUNCHERS", "LaunchError", "LaunchOptions", "SLURM_ACTIVE", "SLURM_QUEUED", "SlurmGpus",
           "Worker", "check_launcher", "read_submissions", "scheduler_states", "slurm_gpu_request", "slurm_gpus",
           "slurm_state", "submit", "wait"]
