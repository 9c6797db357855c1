"""A grid's jobs where they run: each job's state file and lock, what its run folder has finished, the check of
what the jobs read before they are submitted, and running one job (the unit a launcher executes).

Each job, where it runs, writes SAVE_DIR/grids/<name>/jobs/<job>.json (running / done / failed with the error's
line / interrupted) and holds jobs/<job>.lock while it runs; launching is harness/launch.py. The per-task records
in its run folder are the truth about what is finished: a job is done when every task it owns has its record and
the run's results.json lists it."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import traceback
from pathlib import Path

from conf.errors import UserError
from conf.files import atomic_write_text
from harness.build import build_plan
from harness.grid.spec import Grid, GridError, GridJob
from harness.identity import config_hash
from harness.results import utc_now
from harness.settings import build_tasks
from harness.task_records import ResumeError, read_tasks


# ------------------------------------------------------------------------------------------------ job state files

def state_path(folder: Path, job: GridJob) -> Path:
    return Path(folder) / "jobs" / f"{job.id}.json"


def lock_path(folder: Path, job: GridJob) -> Path:
    return Path(folder) / "jobs" / f"{job.id}.lock"


def read_state(folder: Path, job: GridJob) -> dict | None:
    path = state_path(folder, job)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise GridError(f"{path}: unreadable job state ({err}); delete it") from None


def write_state(folder: Path, job: GridJob, **fields) -> None:
    state = {"job": job.id, "host": socket.gethostname(), "pid": os.getpid(), "updated_at": utc_now(), **fields}
    atomic_write_text(state_path(folder, job), json.dumps(state, indent=1) + "\n")


@contextlib.contextmanager
def claim(folder: Path, job: GridJob):
    """Hold the job's lock while the block runs; yields False (and holds nothing) when another process has it."""
    path = lock_path(folder, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield True
    finally:
        handle.close()


def lock_held(folder: Path, job: GridJob) -> bool:
    """Whether a process (on a host sharing this lock) runs the job now."""
    path = lock_path(folder, job)
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


# ------------------------------------------------------------------------------------------------ what is finished

def finished_tasks(run_dir, tasks, cfg, identity_of=None) -> tuple[set[int], set[int] | None, str | None]:
    """(tasks with a record, tasks results.json lists (None: it cannot be read), the error reading the records)
    of a run folder. ``identity_of``: what the records must match beyond the config (harness.build.records_identity:
    their data, input files and weights), as a run checks them before it resumes; a mismatch is the error."""
    folder = Path(run_dir)
    try:
        records = set(read_tasks(folder, tasks, config_hash(cfg), cfg.dump(), identity_of))
    except ResumeError as err:
        return set(), set(), err.one_line()
    results = folder / "results.json"
    if not results.is_file():
        return records, set(), None
    try:
        return records, set((json.loads(results.read_text()).get("provenance") or {}).get("tasks_done") or []), None
    except (OSError, ValueError, AttributeError):
        return records, None, None


# ------------------------------------------------------------------------------------------------ running one job

def check_inputs(grid: Grid, jobs: list[GridJob]) -> None:
    """What the jobs read besides their configs, checked where they are submitted (test_time.py's checks, in its
    order): each cell's weights (a file exists, a tag is cached or may be downloaded) and its DATA_DIR folder. A
    grid whose weights or data are missing is refused in one line instead of failing every job; each data set's
    files are checked by the jobs reading them."""
    from models import resolve_model_weights
    wanted = {job.id for job in jobs}
    checked = set()
    for cell in grid.cells:
        cfg = cell.cfg
        key = (cfg.MODEL.ARCH, str(cfg.MODEL.WEIGHTS), cfg.CKPT_DIR, cfg.MODEL.ALLOW_DOWNLOAD, cfg.DATA_DIR)
        if key in checked or not any(job.id in wanted for job in cell.jobs):
            continue
        checked.add(key)
        where = f"{grid.path}: cell ({cell.dataset}, {cell.config_name}, seed {cell.seed})"
        try:
            resolve_model_weights(cfg)
        except UserError as err:
            raise GridError(f"{where}: {err.one_line()}") from None
        if not Path(cfg.DATA_DIR).is_dir():
            raise GridError(f"{where}: DATA_DIR {cfg.DATA_DIR}: no such folder")


def run_job(grid_folder: Path, job: GridJob, output: str = "", progress: bool = True) -> str:
    """Run one job where it is (the unit a launcher executes): claim its lock, plan the config it carries
    (build_plan: the one check of its run) and run its domains through harness.run.evaluate (resuming its finished
    tasks; ``progress`` in the job's output: a line a minute, a bar on a terminal), record the outcome. Returns
    done / failed / skipped (another process holds it). A user error or a crash is recorded with its line and
    returned as failed; an interruption (SystemExit, KeyboardInterrupt: pre-emption, a time limit) is recorded as
    interrupted and re-raised."""
    from harness.run import evaluate     # deferred: it imports torch, which status and report do not need
    with claim(grid_folder, job) as mine:
        if not mine:
            return "skipped"
        started = time.perf_counter()
        try:
            loaded = job.config()
            if _already_finished(loaded.cfg, job):   # another worker finished it since this one was handed it
                return "done"
            plan = build_plan(loaded.cfg, loaded.keys_set)
            write_state(grid_folder, job, state="running", started_at=utc_now(), output=output)
            payload = evaluate(plan, progress=progress, label=job.id)
        except UserError as err:
            write_state(grid_folder, job, state="failed", error=err.one_line(), ended_at=utc_now(), output=output)
            return "failed"
        except Exception as err:     # a bug: its last line here, its traceback in the job's output
            traceback.print_exc()
            write_state(grid_folder, job, state="failed", error=f"{type(err).__name__}: {err}".splitlines()[0],
                        ended_at=utc_now(), output=output)
            return "failed"
        except BaseException:
            write_state(grid_folder, job, state="interrupted", ended_at=utc_now(), output=output)
            raise
        images = sum(r["n"] for r in payload["records"] if not job.domains or r["domain"] in job.domains)
        write_state(grid_folder, job, state="done", ended_at=utc_now(), seconds=round(time.perf_counter() - started, 3),
                    images=images, output=output)
        return "done"


def _already_finished(cfg, job: GridJob) -> bool:
    """Whether the job's tasks are finished, asked before its plan is built: a local worker asks it of every job
    another worker finished, and a plan lists each domain's files and hashes the weights."""
    records, listed, error = finished_tasks(job.run_dir, build_tasks(cfg), cfg)
    # an error (or a results.json that cannot be read): evaluate says why, or rewrites it
    return error is None and set(job.tasks) <= records & (listed or set())
