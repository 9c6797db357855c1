"""Per-task records on disk, so that an interrupted run resumes and shards of one run share a directory.

Every finished task writes SAVE_DIR/<dataset>/<method>/<run>/tasks/task_NNNN.json atomically: the task's index
and segments, its records, its wall time, the config (hash and YAML dump) that produced it, and what it read
beyond the config (its data's fingerprint, the weights' checksum). A later run of the same config on the same
data and weights reads them back and skips those tasks; on anything else it refuses to resume.

While a process runs tasks it holds a lock on each (tasks/task_NNNN.lock), so that a second process on the same
run folder refuses those tasks at once, naming the first one, instead of computing them again."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

from conf.errors import UserError
from harness.identity import describe_differences
from conf.files import atomic_write_text

TASKS_DIR = "tasks"


class ResumeError(UserError):
    """A run folder holds records that this run cannot resume from."""


def task_path(save_dir: Path, index: int) -> Path:
    return Path(save_dir) / TASKS_DIR / f"task_{index:04d}.json"


def segments_of(task) -> list[list]:
    return [[s.domain, int(s.severity)] for s in task.segments]


def write_task(save_dir: Path, index: int, task, records: list[dict], seconds: float, images: int,
               cfg_hash: str, config_dump: str, device: str, identity: dict) -> None:
    payload = {"task_index": index, "segments": segments_of(task), "reset": bool(task.reset),
               "records": records, "wall_time_s": seconds, "images": images, "device": device,
               "config_hash": cfg_hash, "config": config_dump, **identity}
    atomic_write_text(task_path(save_dir, index), json.dumps(payload, indent=1) + "\n")


def read_tasks(save_dir: Path, tasks: list, cfg_hash: str, config_dump: str, identity_of=None) -> dict[int, dict]:
    """{task index: stored task} for the finished tasks of this config in save_dir. Raises ResumeError when the
    directory holds tasks of another config (e.g. a reused RUN_NAME) or of another task list, or, for the tasks
    ``identity_of(index)`` describes, tasks computed on other data or with other weights."""
    folder = Path(save_dir) / TASKS_DIR
    done: dict[int, dict] = {}
    if not folder.is_dir():
        return done
    for path in sorted(folder.glob("task_*.json")):
        try:
            stored = json.loads(path.read_text())
            index = int(stored["task_index"])
            records = stored["records"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("'records' is not a list of records")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ResumeError(f"{path}: unreadable task record ({err}); delete it or run with RESUME False") from None
        if stored.get("config_hash") != cfg_hash:
            diff = describe_differences([stored.get("config", ""), config_dump], ["stored", "now"])
            raise ResumeError(f"{path} was written by a different config (hash {stored.get('config_hash')} vs "
                              f"{cfg_hash}); differing keys:\n{diff or '  (none visible)'}\nUse another RUN_NAME, "
                              f"or RESUME False (test_time.py --restart) to overwrite.")
        if index >= len(tasks) or stored.get("segments") != segments_of(tasks[index]):
            raise ResumeError(f"{path}: its segments {stored.get('segments')} are not task {index} of this setting; "
                              f"run with RESUME False to overwrite")
        if identity_of is not None:
            _check_identity(path, stored, identity_of(index))
        done[index] = stored
    return done


def _check_identity(path: Path, stored: dict, now: dict | None) -> None:
    """``now``: what the run reads now (RunPlan.identity_of, or build.records_identity where no plan is built);
    a key it leaves out is not checked (a tag's weights file, data that cannot be read here but by its path)."""
    if now is None:
        return
    remedy = ("compute it again (test_time.py --restart; for a grid, delete the run folder), or give another "
              "SAVE_DIR or RUN_NAME")
    _check_data(path, stored.get("data"), now, remedy)
    for name, sha256 in (now.get("inputs") or {}).items():
        then = (stored.get("inputs") or {}).get(name)
        if then != sha256:
            was = f"sha256 {then[:12]} then" if then else "no record of its content then"
            raise ResumeError(f"{path} was computed with another {name} ({was}, {sha256[:12]} now: the file was "
                              f"edited or replaced); {remedy}")
    if "weights_sha256" in now and stored.get("weights_sha256") != now["weights_sha256"]:
        raise ResumeError(f"{path} was computed with other weights (sha256 {str(stored.get('weights_sha256'))[:12]} "
                          f"then, {str(now.get('weights_sha256'))[:12]} now); {remedy}")


def _check_data(path: Path, stored_data: dict | None, now: dict, remedy: str) -> None:
    data = now.get("data")
    if data is None and "data_dir" in now:      # the data cannot be read here: their folder, at least
        if stored_data and stored_data.get("data_dir") != now["data_dir"]:
            raise ResumeError(f"{path} was computed on other data (DATA_DIR {stored_data.get('data_dir')} then, "
                              f"{now['data_dir']} now); {remedy}")
        return
    if data is not None and (stored_data or {}).get("exact_sha1") != data["exact_sha1"]:
        if not stored_data:
            raise ResumeError(f"{path} records no fingerprint of the data it read, so it cannot be told from other "
                              f"data; {remedy}")
        what = (f"DATA_DIR {stored_data.get('data_dir')} then, {data['data_dir']} now"
                if stored_data.get("data_dir") != data["data_dir"] else
                f"{stored_data.get('files')} files / {stored_data.get('bytes')} bytes then, {data['files']} / "
                f"{data['bytes']} now, or their modification times differ")
        raise ResumeError(f"{path} was computed on other data ({what}); {remedy}")


@contextlib.contextmanager
def task_locks(save_dir: Path, indices):
    """Hold a lock on each task of ``indices`` while the block runs; a task another process holds is a
    ResumeError naming that process (before anything is computed)."""
    folder = Path(save_dir) / TASKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    try:
        for index in indices:
            path = folder / f"task_{index:04d}.lock"
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise ResumeError(f"{save_dir}: task {index} is being run by {owner}; wait for it to finish (then this "
                                  f"command resumes from its records), or run other domains (--domains)") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            held.append(handle)
        yield
    finally:
        for handle in held:
            handle.close()   # closing releases the lock


@contextlib.contextmanager
def results_lock(save_dir: Path):
    """Held while a process reads the task records and writes results.json from them, so that of several shards
    of one run the last writer lists every task finished before it (a shard's write cannot undo another's)."""
    path = Path(save_dir) / TASKS_DIR / "results.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def clear_tasks(save_dir: Path, indices) -> None:
    for index in indices:
        task_path(save_dir, index).unlink(missing_ok=True)
