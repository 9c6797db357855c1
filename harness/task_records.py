"""Per-task records on disk, so that an interrupted run resumes and shards of one run share a directory.

Every finished task writes SAVE_DIR/<dataset>/<method>/<run>/tasks/task_NNNN.json atomically: the task's index
and segments, its records, its wall time, and the config (hash and YAML dump) that produced it. A later run of
the same config reads them back and skips those tasks."""
from __future__ import annotations

import json
from pathlib import Path

from conf.errors import UserError
from harness.identity import describe_differences
from harness.results import atomic_write

TASKS_DIR = "tasks"


class ResumeError(UserError):
    """A run folder holds records that this run cannot resume from."""


def task_path(save_dir: Path, index: int) -> Path:
    return Path(save_dir) / TASKS_DIR / f"task_{index:04d}.json"


def segments_of(task) -> list[list]:
    return [[s.domain, int(s.severity)] for s in task.segments]


def write_task(save_dir: Path, index: int, task, records: list[dict], seconds: float, images: int,
               cfg_hash: str, config_dump: str, device: str) -> None:
    payload = {"task_index": index, "segments": segments_of(task), "reset": bool(task.reset),
               "records": records, "wall_time_s": seconds, "images": images, "device": device,
               "config_hash": cfg_hash, "config": config_dump}
    atomic_write(task_path(save_dir, index), json.dumps(payload, indent=1) + "\n")


def read_tasks(save_dir: Path, tasks: list, cfg_hash: str, config_dump: str) -> dict[int, dict]:
    """{task index: stored task} for the finished tasks of this config in save_dir. Raises ResumeError when the
    directory holds tasks of another config (e.g. a reused RUN_NAME) or of another task list."""
    folder = Path(save_dir) / TASKS_DIR
    done: dict[int, dict] = {}
    if not folder.is_dir():
        return done
    for path in sorted(folder.glob("task_*.json")):
        try:
            stored = json.loads(path.read_text())
            index = int(stored["task_index"])
        except (OSError, ValueError, KeyError) as err:
            raise ResumeError(f"{path}: unreadable task record ({err}); delete it or run with RESUME False") from err
        if stored.get("config_hash") != cfg_hash:
            diff = describe_differences([stored.get("config", ""), config_dump], ["stored", "now"])
            raise ResumeError(f"{path} was written by a different config (hash {stored.get('config_hash')} vs "
                              f"{cfg_hash}); differing keys:\n{diff or '  (none visible)'}\nUse another RUN_NAME, "
                              f"or RESUME False (test_time.py --restart) to overwrite.")
        if index >= len(tasks) or stored["segments"] != segments_of(tasks[index]):
            raise ResumeError(f"{path}: its segments {stored['segments']} are not task {index} of this setting; "
                              f"run with RESUME False to overwrite")
        done[index] = stored
    return done


def clear_tasks(save_dir: Path, indices) -> None:
    for index in indices:
        task_path(save_dir, index).unlink(missing_ok=True)
