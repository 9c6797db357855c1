"""A grid of runs: data sets x methods x seeds x settings, with overrides for every cell and for some cells,
expanded into jobs; what state each job is in; the comparison tables of its results.

A grid file (YAML; grids/*.yaml are examples)::

    name: paper_main                  # the grid's folder: SAVE_DIR/grids/<name> (default: the file's stem)
    datasets: [cifar10_c, imagenet_c]
    methods: [source, tent, batclip]  # shipped method configs (conf/<dataset>/<method>.yaml) or config files
    seeds: [1, 2, 3]                  # RNG_SEED; absent: each config's own
    settings: [reset_each_shift]      # SETTING; absent: each config's own
    overrides: {MODEL.ARCH: ViT-B-16, DATA_DIR: /data}     # every cell
    exclude: [{dataset: imagenet_c, method: watt_p}]       # cells left out
    split: domain                     # domain (default): a job per domain where domains are independent; cell
    cells:                                                 # overrides for the cells that match
      - where: {dataset: imagenet_c, method: tent}
        overrides: {OPTIM.LR: 2.5e-4}

A cell's config is its method config, then ``overrides``, the matching ``cells`` in order, the command line's
``KEY VALUE`` pairs, and the cell's seed and setting. The grid owns the keys that say which runs exist and where
(the axes, RESUME, RUN_DOMAINS, RUN_NAME): they are refused in overrides.

A cell becomes one job per domain where its setting resets at every domain and keeps each domain in its own
tasks (reset_each_shift: the domains are independent), else one job; ``split: cell`` makes every cell one job
(fewer model loads for fast methods, less parallelism; results identical). A job's identity is its config hash
and its domains, so the same grid file expands to the same jobs every time; its run folder is the one test_time.py uses
for that config, shared by the jobs of its domains. The per-task records there are the truth about what is
finished: a job is done when every task it owns has its record and the run's results.json lists it.

Each job, where it runs, writes SAVE_DIR/grids/<name>/jobs/<job>.json (running / done / failed with the error's
line / interrupted) and holds jobs/<job>.lock while it runs; launching is harness/launch.py."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from conf import config_names
from conf.errors import UserError
from conf.files import atomic_write_text
from harness import report
from harness.build import check_config, load_cfg, run_dir
from harness.identity import config_hash, identity_keys
from harness.report.runs import SEED_KEY
from harness.results import utc_now
from harness.settings import build_tasks
from harness.task_records import ResumeError, read_tasks

GRID_KEYS = ("name", "datasets", "methods", "seeds", "settings", "overrides", "exclude", "cells", "split")
SPLITS = ("domain", "cell")
# The grid's axes: set by the grid for each cell, never by an override.
AXES = {"CORRUPTION.DATASET": "datasets", "MODEL.ADAPTATION": "methods", "RNG_SEED": "seeds", "SETTING": "settings"}
# Keys the grid sets itself: which tasks a job runs, that it resumes, and where its run folder is.
MANAGED = {"RESUME": "a grid always resumes from the finished tasks; delete a run folder to compute it again",
           "RUN_DOMAINS": "the grid gives each job its domains",
           "RUN_NAME": "a grid finds its runs by their config hash; two cells with one RUN_NAME would share a folder"}
WHERE_KEYS = ("dataset", "method", "seed", "setting")
JOB_STATES = ("done", "running", "failed", "pending")


class GridError(UserError):
    """A grid file, or a grid's state on disk, is not what the grid needs."""


@dataclass(frozen=True)
class GridJob:
    """One unit of work: a config (method file + overrides) and the domains it runs. Pickled to where it runs."""
    id: str                          # <dataset>.<method>.<setting>.seed<seed>.<config hash>[.<domain>]
    dataset: str
    method: str                      # the grid's name for it (a shipped config's name, or a config file's stem)
    seed: int
    setting: str
    config_file: str
    opts: tuple[str, ...]            # KEY VALUE overrides after the file
    domains: tuple[str, ...]         # RUN_DOMAINS; () = every domain
    config_hash: str
    run_dir: str
    tasks: tuple[int, ...]           # the task indices this job finishes

    def config(self):
        """The job's frozen config, rebuilt from its file and overrides (so a job pickles as plain strings); a
        config whose hash moved since the expansion (an edited config file) is refused."""
        cfg = load_cfg(self.config_file, list(self.opts), freeze=False)
        cfg.RESUME = True
        cfg.RUN_DOMAINS = list(self.domains)
        check_config(cfg)
        cfg.freeze()
        if config_hash(cfg) != self.config_hash:
            raise GridError(f"job {self.id}: its config now hashes to {config_hash(cfg)}, not {self.config_hash} as "
                            f"when the grid was expanded ({self.config_file} or a file it reads was edited); run the "
                            f"grid command again to expand it anew")
        return cfg


@dataclass
class Cell:
    """One config of the grid (all its jobs): what the report needs to tabulate it, run or not."""
    dataset: str
    method: str
    seed: int
    setting: str
    cfg: object
    tasks: list
    jobs: list[GridJob] = field(default_factory=list)


@dataclass
class Grid:
    name: str
    path: Path
    folder: Path                     # SAVE_DIR/grids/<name>
    cells: list[Cell]
    cli_opts: list[str]

    @property
    def jobs(self) -> list[GridJob]:
        return [job for cell in self.cells for job in cell.jobs]


# ------------------------------------------------------------------------------------------------ the grid file

def _opt_value(value) -> str:
    # As a YAML config file's value is merged: strings are decoded as yacs does (1e-3 is a number), others as is.
    return value if isinstance(value, str) else repr(value)


def _flat_overrides(mapping, where: str) -> dict:
    """{"A.B": value} from a mapping written flat (A.B: v) or nested (A: {B: v})."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise GridError(f"{where}: expected a mapping of config keys to values, got {mapping!r}")
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            for sub, subvalue in _flat_overrides(value, where).items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[str(key)] = value
    return flat


def _check_owned_keys(keys, where: str) -> None:
    for key in keys:
        if key in AXES:
            raise GridError(f"{where}: {key} is an axis of the grid; list its values under '{AXES[key]}' instead")
        if key in MANAGED:
            raise GridError(f"{where}: {key} is set by the grid ({MANAGED[key]})")


def _str_list(data: dict, key: str, path: Path, required: bool) -> list[str] | None:
    values = data.get(key)
    if values is None:
        if required:
            raise GridError(f"{path}: '{key}' is missing (a list of names)")
        return None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise GridError(f"{path}: '{key}' must be a non-empty list of names, got {values!r}")
    if len(set(values)) != len(values):
        raise GridError(f"{path}: '{key}' lists a name twice: {values}")
    return values


def _seeds(data: dict, path: Path) -> list[int] | None:
    seeds = data.get("seeds")
    if seeds is None:
        return None
    if isinstance(seeds, int):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             and s >= 0 for s in seeds)):
        raise GridError(f"{path}: 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{path}: 'seeds' lists a seed twice: {seeds}")
    return seeds


def _where(entry, where: str) -> dict:
    if not isinstance(entry, dict) or not entry:
        raise GridError(f"{where}: expected a mapping of {', '.join(WHERE_KEYS)} to a value or a list of values")
    unknown = sorted(set(entry) - set(WHERE_KEYS))
    if unknown:
        raise GridError(f"{where}: unknown key {unknown[0]!r} (a cell is matched by {', '.join(WHERE_KEYS)})")
    return {k: (v if isinstance(v, list) else [v]) for k, v in entry.items()}


def _matches(where: dict, cell: dict) -> bool:
    return all(cell[k] in values for k, values in where.items())


def read_grid_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise GridError(f"{path}: not valid YAML ({getattr(err, 'problem', None) or err}{where})") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected a mapping with {', '.join(GRID_KEYS)}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key {unknown[0]!r} (a grid file has {', '.join(GRID_KEYS)})")
    return data


def _method_config(method: str, dataset: str, path: Path) -> str:
    if Path(method).suffix in (".yaml", ".yml"):
        if not Path(method).is_file():
            raise GridError(f"{path}: method config file {method} does not exist")
        return method
    if f"{dataset}/{method}" not in config_names():
        shipped = sorted(n.split("/")[1] for n in config_names() if n.startswith(f"{dataset}/"))
        raise GridError(f"{path}: no shipped config for method '{method}' on {dataset} (shipped there: {shipped}); "
                        f"exclude that cell or give a config file")
    return f"conf/{dataset}/{method}.yaml"


def load_grid(path, cli_opts=()) -> Grid:
    """The grid file at ``path`` expanded with the command line's ``KEY VALUE`` overrides: every cell's config
    checked (check_config: names, keys, values), its tasks and jobs. Reads no data and loads no model."""
    path = Path(path)
    data = read_grid_file(path)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise GridError(f"{path}: 'name' must be a folder name, got {name!r}")
    dataset_names = _str_list(data, "datasets", path, required=True)
    method_names = _str_list(data, "methods", path, required=True)
    seeds = _seeds(data, path)
    settings = _str_list(data, "settings", path, required=False)
    split = data.get("split", "domain")
    if split not in SPLITS:
        raise GridError(f"{path}: 'split' is one of {', '.join(SPLITS)} (a job per domain, or per cell); "
                        f"got {split!r}")
    shared = _flat_overrides(data.get("overrides"), f"{path}: overrides")
    _check_owned_keys(shared, f"{path}: overrides")
    cli_opts = [str(o) for o in cli_opts]
    if len(cli_opts) % 2:
        raise GridError(f"command-line overrides come in KEY VALUE pairs; got {cli_opts}")
    _check_owned_keys(cli_opts[0::2], "the command line")
    excludes = [_where(e, f"{path}: exclude[{i}]") for i, e in enumerate(data.get("exclude") or [])]
    cell_overrides = []
    for i, entry in enumerate(data.get("cells") or []):
        where = f"{path}: cells[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"where", "overrides"}:
            raise GridError(f"{where}: expected 'where' (which cells) and 'overrides' (their keys)")
        values = _flat_overrides(entry["overrides"], where)
        _check_owned_keys(values, where)
        cell_overrides.append((_where(entry["where"], f"{where}.where"), values))
    used = [False] * len(cell_overrides)
    excluded_any = [False] * len(excludes)

    cells: list[Cell] = []
    for dataset in dataset_names:
        for method in method_names:
            for seed in (seeds or [None]):
                for setting in (settings or [None]):
                    cells += _expand_cell(path, dataset, method, seed, setting, shared, cell_overrides, cli_opts,
                                          excludes, used, excluded_any, split)
    for i, hit in enumerate(used):
        if not hit:
            raise GridError(f"{path}: cells[{i}].where matches no cell of the grid: {cell_overrides[i][0]}")
    for i, hit in enumerate(excluded_any):
        if not hit:
            raise GridError(f"{path}: exclude[{i}] matches no cell of the grid: {excludes[i]}")
    return Grid(name, path, _shared_save_dir(path, cells) / "grids" / name, cells, cli_opts)


def _shared_save_dir(path: Path, cells: list[Cell]) -> Path:
    """The one SAVE_DIR of a grid's cells, each a different config; refused otherwise (GridError)."""
    if not cells:
        raise GridError(f"{path}: every cell is excluded; the grid has nothing to run")
    seen: dict[str, Cell] = {}
    for cell in cells:
        hash_ = cell.jobs[0].config_hash
        if hash_ in seen:
            other = seen[hash_]
            raise GridError(f"{path}: cells ({other.method}, {other.dataset}, seed {other.seed}) and ({cell.method}, "
                            f"{cell.dataset}, seed {cell.seed}) are the same config (hash {hash_})")
        seen[hash_] = cell
    save_dirs = {str(cell.cfg.SAVE_DIR) for cell in cells}
    if len(save_dirs) > 1:
        raise GridError(f"{path}: the cells of one grid share SAVE_DIR; they give {sorted(save_dirs)}")
    return Path(save_dirs.pop())


def _expand_cell(path, dataset, method, seed, setting, shared, cell_overrides, cli_opts, excludes, used,
                 excluded_any, split) -> list[Cell]:
    config_file = _method_config(method, dataset, path)
    label = Path(method).stem if Path(method).suffix in (".yaml", ".yml") else method
    probe = {"dataset": dataset, "method": label, "seed": seed, "setting": setting}
    opts = [x for key, value in shared.items() for x in (key, _opt_value(value))]
    for i, (where, values) in enumerate(cell_overrides):
        if _matches(where, probe):
            used[i] = True
            opts += [x for key, value in values.items() for x in (key, _opt_value(value))]
    opts += cli_opts
    if seed is not None:
        opts += ["RNG_SEED", str(seed)]
    if setting is not None:
        opts += ["SETTING", setting]
    try:
        cfg = load_cfg(config_file, opts, freeze=False)
    except UserError as err:
        raise GridError(f"{path}: cell ({label}, {dataset}, seed {seed}): {err.one_line()}") from None
    if cfg.CORRUPTION.DATASET != dataset:
        raise GridError(f"{path}: {config_file} is a config for {cfg.CORRUPTION.DATASET}, listed here under {dataset}")
    probe.update(seed=int(cfg.RNG_SEED), setting=str(cfg.SETTING))
    hit = [i for i, where in enumerate(excludes) if _matches(where, probe)]
    for i in hit:
        excluded_any[i] = True
    if hit:
        return []
    cfg.RESUME = True
    check_config(cfg)
    cfg.freeze()
    tasks = build_tasks(cfg)
    cell = Cell(dataset, label, int(cfg.RNG_SEED), str(cfg.SETTING), cfg, tasks)
    hash_ = config_hash(cfg)
    base_id = f"{dataset}.{label}.{cfg.SETTING}.seed{cfg.RNG_SEED}.{hash_}"
    common = dict(dataset=dataset, method=label, seed=int(cfg.RNG_SEED), setting=str(cfg.SETTING),
                  config_file=config_file, opts=tuple(opts), config_hash=hash_, run_dir=str(run_dir(cfg)))
    for domains, indices in (split_by_domain(tasks) if split == "domain" else _whole(tasks)):
        suffix = f".{domains[0]}" if domains else ""
        cell.jobs.append(GridJob(id=_safe(base_id + suffix), domains=domains, tasks=indices, **common))
    return [cell]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._@+-" else "-" for c in text)


def _whole(tasks) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """One job (domains ()) with every task."""
    return [((), tuple(range(len(tasks))))]


def split_by_domain(tasks) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """[(domains, task indices)] per job: one per domain where each domain is independent of the others (every
    task holds one domain, a domain's tasks are consecutive and the first of them resets: reset_each_shift, also
    with several severities per domain), else one job (domains ()) with every task."""
    by_domain: dict[str, list[int]] = {}
    previous = None
    for index, task in enumerate(tasks):
        domains = {s.domain for s in task.segments}
        if len(domains) != 1:
            return _whole(tasks)
        domain = domains.pop()
        if domain != previous and (domain in by_domain or not task.reset):
            return _whole(tasks)
        by_domain.setdefault(domain, []).append(index)
        previous = domain
    if len(by_domain) < 2:
        return _whole(tasks)
    return [((domain,), tuple(indices)) for domain, indices in by_domain.items()]


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

def finished_tasks(run_dir, tasks, cfg) -> tuple[set[int], set[int], str | None]:
    """(tasks with a record, tasks results.json lists, the error reading the records) of a run folder."""
    folder = Path(run_dir)
    try:
        records = set(read_tasks(folder, tasks, config_hash(cfg), cfg.dump()))
    except ResumeError as err:
        return set(), set(), err.one_line()
    listed: set[int] = set()
    results = folder / "results.json"
    if results.is_file():
        try:
            listed = set((json.loads(results.read_text()).get("provenance") or {}).get("tasks_done") or [])
        except (OSError, ValueError):
            listed = set()
    return records, listed, None


@dataclass
class JobStatus:
    job: GridJob
    state: str                 # done / running / failed / pending
    detail: str = ""           # the failure's line, the queue's state, ...
    log: str = ""              # where to look: the run's log and the launcher's output
    seconds: float | None = None
    images: int | None = None


def job_statuses(grid: Grid, submissions: dict | None = None, scheduler: dict | None = None) -> list[JobStatus]:
    """Every job's state. done: every task it owns has its record, and results.json lists them (the records are
    the truth). Otherwise running: its lock is held, or its scheduler says so; failed: it ran and stopped (its
    recorded error, or the scheduler's state, or 'stopped without a word': killed); pending: never started, or
    waiting in the scheduler's queue. ``submissions``: {job id: the last submission record}; ``scheduler``:
    {job id: the scheduler's state word for that submission} (harness.launch.scheduler_states)."""
    submissions, scheduler = submissions or {}, scheduler or {}
    statuses = []
    for cell in grid.cells:
        records, listed, error = finished_tasks(cell.jobs[0].run_dir, cell.tasks, cell.cfg)
        for job in cell.jobs:
            statuses.append(_job_status(grid, job, records, listed, error, submissions.get(job.id),
                                        scheduler.get(job.id)))
    return statuses


ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "STAGE_OUT"}
QUEUED = {"PENDING", "REQUEUE_HOLD", "REQUEUE_FED"}


def _job_status(grid, job, records, listed, error, submission, scheduled) -> JobStatus:
    run_log = str(Path(job.run_dir) / "log.txt")
    state = read_state(grid.folder, job) or {}
    logs = [run_log] + ([state["output"]] if state.get("output") else [])
    status = JobStatus(job, "pending", log=" ; ".join(logs))
    if error:
        status.state, status.detail = "failed", error
        return status
    if set(job.tasks) <= records and set(job.tasks) <= listed:
        status.state = "done"
        status.seconds, status.images = state.get("seconds"), state.get("images")
        return status
    if lock_held(grid.folder, job):
        status.state, status.detail = "running", f"{state.get('host', '?')} pid {state.get('pid', '?')}"
        return status
    scheduled = scheduled if submission else None
    if scheduled in ACTIVE:
        status.state, status.detail = "running", f"{submission['launcher']} job {submission['scheduler_id']}"
        return status
    if scheduled in QUEUED:
        status.state, status.detail = "pending", f"queued as {submission['launcher']} job {submission['scheduler_id']}"
        return status
    recorded = state.get("state")
    if recorded == "failed":
        status.state, status.detail = "failed", state.get("error", "")
    elif recorded in ("running", "interrupted"):
        status.state = "failed"
        status.detail = (f"{submission['launcher']} job {submission['scheduler_id']} ended ({scheduled})"
                         if scheduled else "stopped without recording an end (killed, out of memory, or its "
                                           "machine went away)")
        if recorded == "interrupted":
            status.detail = "interrupted (pre-empted or timed out) and not running again; " + status.detail
    elif recorded == "done":      # its records were removed since, or results.json lacks them: run it again
        status.detail = "its records are incomplete now; it runs again"
    elif scheduled and scheduled not in ("UNKNOWN",):
        status.state, status.detail = "failed", f"{submission['launcher']} job {submission['scheduler_id']} ended " \
                                                f"({scheduled}) before it started"
    return status


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
        where = f"{grid.path}: cell ({cell.dataset}, {cell.method}, seed {cell.seed})"
        try:
            resolve_model_weights(cfg)
        except UserError as err:
            raise GridError(f"{where}: {err.one_line()}") from None
        if not Path(cfg.DATA_DIR).is_dir():
            raise GridError(f"{where}: DATA_DIR {cfg.DATA_DIR}: no such folder")


def run_job(grid_folder: Path, job: GridJob, output: str = "", progress: bool = True) -> str:
    """Run one job where it is (the unit a launcher executes): claim its lock, run its config's domains through
    harness.run.evaluate (resuming its finished tasks; ``progress`` in the job's output: a line a minute, a bar on a
    terminal), record the outcome. Returns done / failed / skipped (another process holds it). A user error or a
    crash is recorded with its line and returned as failed; an interruption (SystemExit, KeyboardInterrupt:
    pre-emption, a time limit) is recorded as interrupted and re-raised."""
    from harness.run import evaluate     # deferred: it imports torch, which status and report do not need
    with claim(grid_folder, job) as mine:
        if not mine:
            return "skipped"
        started = time.perf_counter()
        try:
            cfg = job.config()
            if _already_finished(cfg, job):   # another worker finished it since this one was handed the job
                return "done"
            write_state(grid_folder, job, state="running", started_at=utc_now(), output=output)
            payload = evaluate(cfg, progress=progress, label=job.id)
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
    records, listed, error = finished_tasks(job.run_dir, build_tasks(cfg), cfg)
    return error is None and set(job.tasks) <= records & listed    # an error: evaluate says why, in its words


# ------------------------------------------------------------------------------------------------ tables

def _placeholder(cell: Cell) -> dict:
    """The payload of a cell with no results yet: its expected cells, none measured (shown as missing)."""
    import datasets
    dataset = datasets.get_dataset(cell.dataset)
    return {"method": cell.jobs[0].method, "dataset": cell.dataset, "setting": cell.setting,
            "domain_label": dataset.domain_label, "complete": False, "records": [],
            "expected": [[s.domain, s.severity] for task in cell.tasks for s in task.segments],
            "provenance": {"config": cell.cfg.dump(), "config_hash": config_hash(cell.cfg)},
            "_path": f"{cell.jobs[0].run_dir} (not run yet)"}


def cell_payload(cell: Cell) -> dict:
    path = Path(cell.jobs[0].run_dir) / "results.json"
    if not path.is_file():
        return _placeholder(cell)
    return report.load_results([path])[0]


def grid_tables(grid: Grid, metric: str = "accuracy", with_paper: bool = True) -> list:
    """One comparison table per data set: a row per method (and setting, and other overrides) with its seeds
    pooled, the paper's rows beside; cells a job has not finished are empty and their row has no mean."""
    tables = []
    for dataset in dict.fromkeys(cell.dataset for cell in grid.cells):
        groups: dict[str, list] = {}
        labels: dict[str, str] = {}
        several_settings = len({c.setting for c in grid.cells if c.dataset == dataset}) > 1
        for cell in (c for c in grid.cells if c.dataset == dataset):
            identity = sorted(identity_keys(cell.cfg, (SEED_KEY,)).items())
            key = json.dumps(identity, default=str)
            groups.setdefault(key, []).append(cell_payload(cell))
            labels[key] = cell.method + (f" [{cell.setting}]" if several_settings else "")
        named = list(labels.values())
        rows = []
        for key, payloads in groups.items():
            label = labels[key]
            if named.count(label) > 1:     # one method with several override sets: tell them apart
                label += f" [{hashlib.sha1(key.encode()).hexdigest()[:6]}]"
            # runs with results first: the paper's row is matched on the first run's records
            rows.append((label, sorted(payloads, key=lambda p: not p["records"])))
        tables.append(report.build_table(rows, metric, with_paper))
    return tables


def compute_summary(statuses: list[JobStatus]) -> str:
    """Compute used by the finished jobs (their wall time where they ran, model loading included), and the rest
    estimated from the mean time of finished jobs of the same method and data set."""
    finished = [s for s in statuses if s.state == "done" and s.seconds]
    per_kind: dict[tuple, list[float]] = {}
    for s in finished:
        per_kind.setdefault((s.job.dataset, s.job.method), []).append(s.seconds)
    rest = [s for s in statuses if s.state != "done"]
    estimate, unknown = 0.0, 0
    for s in rest:
        times = per_kind.get((s.job.dataset, s.job.method))
        if times:
            estimate += sum(times) / len(times)
        else:
            unknown += 1
    if not finished:
        return "compute: no job finished yet, nothing to estimate the others from"
    line = f"compute: {_duration(sum(s.seconds for s in finished))} in {len(finished)} finished jobs"
    if rest:
        line += (f"; the other {len(rest)}: about {_duration(estimate)} (the mean of finished jobs of the same "
                 f"method and data set)")
        if unknown:
            line += f", {unknown} of them without a finished job to go by"
    return line


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} job-hours" if seconds >= 3600 else f"{seconds:.0f} job-seconds"
