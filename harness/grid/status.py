"""What state each job of a grid is in: done, running, failed or pending, from its run folder's records, its
lock and state file, and what the scheduler of its last submission says, in the grid's own words (the launcher,
harness/launch.py, translates its scheduler's words into them)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from harness.grid.jobs import finished_tasks, lock_held, read_state
from harness.grid.spec import Grid, GridJob

JOB_STATES = ("done", "running", "failed", "pending")


class QueueState(str, Enum):
    """Where a scheduler has a job's last submission."""
    ACTIVE = "active"      # running (or being started, finished, requeued, suspended)
    QUEUED = "queued"      # waiting for its turn
    ENDED = "ended"        # over, for whatever reason the scheduler's word gives


@dataclass(frozen=True)
class SchedulerState:
    """What a launcher's scheduler says of a job's last submission."""
    state: QueueState
    word: str              # the scheduler's own word (SLURM's TIMEOUT, CANCELLED, ...), shown in the detail
    submission: str        # the submission as a status line names it: "slurm job 12_0"


@dataclass
class JobStatus:
    job: GridJob
    state: str                 # done / running / failed / pending
    detail: str = ""           # the failure's line, the queue's state, ...
    log: str = ""              # where to look: the run's log and the launcher's output
    seconds: float | None = None
    images: int | None = None
    records_error: str = ""    # its run folder's records cannot be resumed (other data, config, ...): run refuses


def job_statuses(grid: Grid, scheduler: Mapping[str, SchedulerState] | None = None) -> list[JobStatus]:
    """Every job's state. done: every task it owns has its record, and results.json lists them (the records are
    the truth). Otherwise running: its lock is held, or its scheduler runs it; failed: it ran and stopped (its
    recorded error, or the scheduler's word for its end, or 'stopped without a word': killed); pending: never
    started, or waiting in the scheduler's queue. ``scheduler``: {job id: what the scheduler says of its last
    submission} (harness.launch.scheduler_states); a job without an entry goes by its lock and state file."""
    scheduler = scheduler or {}
    statuses = []
    for cell in grid.cells:
        records, listed, error = finished_tasks(cell.jobs[0].run_dir, cell.tasks, cell.cfg, grid.identity_of(cell))
        for job in cell.jobs:
            statuses.append(_job_status(grid, job, records, listed, error, scheduler.get(job.id)))
    return statuses


def _job_status(grid: Grid, job: GridJob, records, listed, error, scheduled: SchedulerState | None) -> JobStatus:
    state = read_state(grid.folder, job) or {}
    logs = [str(Path(job.run_dir) / "log.txt")] + ([state["output"]] if state.get("output") else [])
    status = JobStatus(job, "pending", log=" ; ".join(logs))
    if error:
        status.state, status.detail, status.records_error = "failed", error, error
    elif listed is None and set(job.tasks) <= records:      # the records are the truth: it is done but for this
        status.detail = (f"{Path(job.run_dir) / 'results.json'} cannot be read (cut short?); running the job again "
                         f"rewrites it from its task records")
    elif set(job.tasks) <= records and set(job.tasks) <= (listed or set()):
        status.state = "done"
        status.seconds, status.images = state.get("seconds"), state.get("images")
    elif lock_held(grid.folder, job):
        status.state, status.detail = "running", f"{state.get('host', '?')} pid {state.get('pid', '?')}"
    elif scheduled and scheduled.state is QueueState.ACTIVE:
        status.state, status.detail = "running", scheduled.submission
    elif scheduled and scheduled.state is QueueState.QUEUED:
        status.detail = f"queued as {scheduled.submission}"
    else:
        _ended(status, state, scheduled)
    return status


def _ended(status: JobStatus, state: dict, scheduled: SchedulerState | None) -> None:
    """A job neither finished nor running nor queued (``state``: its state file): failed if it ran or its
    scheduler ended it, else still pending."""
    recorded = state.get("state")
    ended = f"{scheduled.submission} ended ({scheduled.word})" if scheduled else ""
    if recorded == "failed":
        status.state, status.detail = "failed", state.get("error", "")
    elif recorded in ("running", "interrupted"):
        status.state = "failed"
        status.detail = ended or ("stopped without recording an end (killed, out of memory, or its machine went "
                                  "away)")
        if recorded == "interrupted":
            status.detail = "interrupted (pre-empted or timed out) and not running again; " + status.detail
    elif recorded == "done":      # its records were removed since, or results.json lacks them: run it again
        status.detail = "its records are incomplete now; it runs again"
    elif scheduled:
        status.state, status.detail = "failed", f"{ended} before it started"
