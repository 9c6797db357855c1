"""A grid file read, checked and expanded into cells (one config each) and jobs (what a launcher runs).

A grid file (YAML; grids/*.yaml are examples)::

    name: paper_main                  # the grid's folder: SAVE_DIR/grids/<name> (default: the file's stem)
    datasets: [cifar10_c, imagenet_c]
    methods: [source, tent, batclip]  # shipped configs (conf/<dataset>/<name>.yaml) or config files
    seeds: [1, 2, 3]                  # RNG_SEED; absent: each config's own
    settings: [reset_each_shift]      # SETTING; absent: each config's own
    batch_sizes: [1, 16, 64, 200]     # TEST.BATCH_SIZE; absent: each config's own
    classes_per_batch: [0, 2, 5]      # TEST.CLASSES_PER_BATCH (StatA's effective classes; 0 = any); absent: 0
    orders: [1, 2, 3]                 # TEST.ORDER_SEED (stream orders, pooled in a row as seeds are); absent: -1
    overrides: {MODEL.ARCH: ViT-B-16, DATA_DIR: /data}     # every cell
    exclude: [{dataset: imagenet_c, method: watt_p}]       # cells left out
    split: domain                     # domain (default): a job per domain where domains are independent; cell
    cells:                                                 # overrides for the cells that match
      - where: {dataset: imagenet_c, method: tent}
        overrides: {OPTIM.LR: 2.5e-4}

The file's ``methods`` (and ``method`` in ``where``/``exclude``) name configs: a shipped config's name or a config
file, whose stem names it; in the code that name is a cell's ``config_name``, and ``method`` is the registered
method its MODEL.ADAPTATION names. A cell's config is that config, then ``overrides``, the matching ``cells`` in
order, the command line's ``KEY VALUE`` pairs, and the cell's seed, setting, batch size, classes per batch and
order seed. The grid owns the keys that say which runs exist and where (the axes, RESUME, RUN_DOMAINS, RUN_NAME):
they are refused in overrides; the keys of batch_sizes, classes_per_batch and orders only where the file lists that
axis (configs set their own batch size, and grids written before these axes set it in overrides).

A cell becomes one job per domain where its setting resets at every domain and keeps each domain in its own
tasks (reset_each_shift: the domains are independent), else one job; ``split: cell`` makes every cell one job
(fewer model loads for fast methods, less parallelism; results identical). A job's identity is its config hash
and its domains, so the same grid file expands to the same jobs every time; its run folder is the one
test_time.py uses for that config, shared by the jobs of its domains. A job carries its cell's expanded config
as YAML, so where it runs it runs what was expanded and checked here."""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import methods
from conf import config_names
from conf.compose import composed_name
from conf.errors import UserError
from conf.files import atomic_write_text
from harness.build import (LoadedConfig, check_config, config_from_text, read_config, records_identity,
                           run_dir)
from harness.identity import config_hash, unread_default_nodes
from harness.settings import build_tasks

GRID_KEYS = ("name", "datasets", "methods", "seeds", "settings", "batch_sizes", "classes_per_batch", "orders",
             "overrides", "exclude", "cells", "split")
SPLITS = ("domain", "cell")
# The grid's axes: set by the grid for each cell, never by an override.
AXES = {"CORRUPTION.DATASET": "datasets", "MODEL.ADAPTATION": "methods", "RNG_SEED": "seeds", "SETTING": "settings",
        "TEST.BATCH_SIZE": "batch_sizes", "TEST.CLASSES_PER_BATCH": "classes_per_batch", "TEST.ORDER_SEED": "orders"}
# Axes whose key an override may set where the grid file does not list the axis: (smallest value, its ``where`` key).
NUMBER_AXES = {"batch_sizes": (1, "batch_size"), "classes_per_batch": (0, "classes_per_batch"),
               "orders": (0, "order")}
# Keys the grid sets itself: which tasks a job runs, that it resumes, and where its run folder is.
MANAGED = {"RESUME": "a grid always resumes from the finished tasks; delete a run folder to compute it again",
           "RUN_DOMAINS": "the grid gives each job its domains",
           "RUN_NAME": "a grid finds its runs by their config hash; two cells with one RUN_NAME would share a folder"}
# What ``where`` and ``exclude`` match, in the grid file's words ("method": a config name).
WHERE_KEYS = ("dataset", "method", "seed", "setting", "batch_size", "classes_per_batch", "order")


class GridError(UserError):
    """A grid file, or a grid's state on disk, is not what the grid needs."""


@dataclass(frozen=True)
class GridJob:
    """One unit of work: a cell's config and the domains it runs. Pickled to where it runs, as plain strings: the
    config travels as YAML, so an edit to a config file after the expansion does not change a submitted job."""
    id: str                          # <dataset>.<config name>.<setting>.seed<seed>[.batch<b>][.k<k>][.order<o>]
    #                                  .<config hash>[.<domain>]: the bracketed axes where the grid file lists them
    dataset: str
    config_name: str                 # the grid's name for its config (a shipped config's name, a file's stem)
    seed: int
    setting: str
    config_file: str                 # where its config came from, with ``opts`` (shown by run --dry-run)
    opts: tuple[str, ...]            # KEY VALUE overrides after the file
    domains: tuple[str, ...]         # RUN_DOMAINS; () = every domain
    config_hash: str
    run_dir: str
    tasks: tuple[int, ...]           # the task indices this job finishes
    config_text: str = field(repr=False)   # the cell's expanded, checked config (RESUME True) as YAML
    keys_set: tuple[str, ...]        # the keys its file and overrides set (the run's warnings about defaults)

    def config(self) -> LoadedConfig:
        """The job's config rebuilt from the text it carries, RUN_DOMAINS its domains; not checked (build_plan
        checks it). Refused when it no longer hashes as at the expansion: this process's suite reads it otherwise
        (its defaults or a plug-in changed since)."""
        loaded = config_from_text(self.config_text, self.keys_set, f"grid job {self.id}")
        loaded.cfg.RUN_DOMAINS = list(self.domains)
        found = config_hash(loaded.cfg)
        if found != self.config_hash:
            raise GridError(f"job {self.id}: its config now hashes to {found}, not {self.config_hash} as when the "
                            f"grid was expanded (the suite's defaults or a plug-in changed since); run the grid "
                            f"command again to expand it anew")
        return loaded


@dataclass
class Cell:
    """One config of the grid (all its jobs): what the report needs to tabulate it, run or not."""
    dataset: str
    config_name: str                 # the grid's name for its config (table rows are labelled with it)
    method: str                      # the registered method it runs (MODEL.ADAPTATION, aliases resolved)
    seed: int
    setting: str
    cfg: object                      # checked and frozen, RESUME True
    tasks: list
    jobs: list[GridJob] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.cfg.TEST.BATCH_SIZE)

    @property
    def classes_per_batch(self) -> int:
        return int(self.cfg.TEST.CLASSES_PER_BATCH)


@dataclass
class Grid:
    name: str
    path: Path
    folder: Path                     # SAVE_DIR/grids/<name>
    cells: list[Cell]
    cli_opts: list[str]
    # What the cells' records must match beyond their configs (harness.build.records_identity), computed once per
    # command: the cells share their data, and a waiting `run` asks for the statuses every few seconds.
    identity_cache: dict = field(default_factory=dict, repr=False)

    @property
    def jobs(self) -> list[GridJob]:
        return [job for cell in self.cells for job in cell.jobs]

    def identity_of(self, cell: Cell):
        """``identity_of(task index)`` for the records of ``cell`` (as a run checks them before resuming)."""
        key = ("cell", cell.jobs[0].config_hash, cell.jobs[0].run_dir)
        if key not in self.identity_cache:
            self.identity_cache[key] = records_identity(cell.cfg, self.identity_cache)
        return self.identity_cache[key]


@dataclass
class _GridFile:
    """A grid file read and checked, before its cells are expanded; ``used`` and ``excluded_any`` record which
    ``cells`` and ``exclude`` entries matched a cell (one that matches none is a mistake)."""
    path: Path
    name: str
    datasets: list[str]
    configs: list[str]               # the file's 'methods': shipped config names or config files
    seeds: list[int] | None
    settings: list[str] | None
    numbers: dict[str, list[int]]    # the NUMBER_AXES the file lists: their values
    split: str
    shared: dict
    cell_overrides: list[tuple[dict, dict]]
    excludes: list[dict]
    cli_opts: list[str]
    used: list[bool] = field(default_factory=list)
    excluded_any: list[bool] = field(default_factory=list)


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


def _check_owned_keys(keys, where: str, listed: dict) -> None:
    """Refuse the keys the grid sets: its axes (those of NUMBER_AXES where ``listed`` has them) and MANAGED."""
    for key in keys:
        if key in AXES and (AXES[key] not in NUMBER_AXES or AXES[key] in listed):
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


def _int_list(data: dict, key: str, path: Path, least: int = 0, noun: str = "a value") -> list[int] | None:
    """The file's list of integers >= ``least`` under ``key`` (an axis), or None where absent."""
    values = data.get(key)
    if values is None:
        return None
    if isinstance(values, int):
        values = [values]
    if (not isinstance(values, list) or not values or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               and v >= least for v in values)):
        raise GridError(f"{path}: '{key}' must be a non-empty list of integers >= {least}, got {values!r}")
    if len(set(values)) != len(values):
        raise GridError(f"{path}: '{key}' lists {noun} twice: {values}")
    return values


def _seeds(data: dict, path: Path) -> list[int] | None:
    return _int_list(data, "seeds", path, noun="a seed")


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


def _cell_overrides(data: dict, path: Path, listed: dict) -> list[tuple[dict, dict]]:
    """The file's ``cells``: (which cells, their overrides) in order."""
    found = []
    for i, entry in enumerate(data.get("cells") or []):
        where = f"{path}: cells[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"where", "overrides"}:
            raise GridError(f"{where}: expected 'where' (which cells) and 'overrides' (their keys)")
        values = _flat_overrides(entry["overrides"], where)
        _check_owned_keys(values, where, listed)
        found.append((_where(entry["where"], f"{where}.where"), values))
    return found


def _read_spec(path: Path, cli_opts) -> _GridFile:
    """The grid file at ``path`` and the command line's overrides, checked, before any config is read."""
    data = read_grid_file(path)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise GridError(f"{path}: 'name' must be a folder name, got {name!r}")
    axes = (_str_list(data, "datasets", path, required=True), _str_list(data, "methods", path, required=True),
            _seeds(data, path), _str_list(data, "settings", path, required=False))
    numbers = {axis: values for axis, (least, _) in NUMBER_AXES.items()
               for values in [_int_list(data, axis, path, least)] if values is not None}
    split = data.get("split", "domain")
    if split not in SPLITS:
        raise GridError(f"{path}: 'split' is one of {', '.join(SPLITS)} (a job per domain, or per cell); "
                        f"got {split!r}")
    shared = _flat_overrides(data.get("overrides"), f"{path}: overrides")
    _check_owned_keys(shared, f"{path}: overrides", numbers)
    cli_opts = [str(o) for o in cli_opts]
    if len(cli_opts) % 2:
        raise GridError(f"command-line overrides come in KEY VALUE pairs; got {cli_opts}")
    _check_owned_keys(cli_opts[0::2], "the command line", numbers)
    excludes = [_where(e, f"{path}: exclude[{i}]") for i, e in enumerate(data.get("exclude") or [])]
    cell_overrides = _cell_overrides(data, path, numbers)
    return _GridFile(path, name, *axes, numbers, split, shared, cell_overrides, excludes, cli_opts,
                     used=[False] * len(cell_overrides), excluded_any=[False] * len(excludes))


def load_grid(path, cli_opts=()) -> Grid:
    """The grid file at ``path`` expanded with the command line's ``KEY VALUE`` overrides: every cell's config
    checked (check_config: names, keys, values), its tasks and jobs. Reads no data and loads no model."""
    spec = _read_spec(Path(path), cli_opts)
    combinations = [dict(zip(spec.numbers, values)) for values in itertools.product(*spec.numbers.values())]
    cells = [cell for dataset in spec.datasets for name in spec.configs for seed in (spec.seeds or [None])
             for setting in (spec.settings or [None]) for numbers in combinations
             for cell in _expand_cell(spec, dataset, name, seed, setting, numbers)]
    for i, hit in enumerate(spec.used):
        if not hit:
            raise GridError(f"{spec.path}: cells[{i}].where matches no cell of the grid: {spec.cell_overrides[i][0]}")
    for i, hit in enumerate(spec.excluded_any):
        if not hit:
            raise GridError(f"{spec.path}: exclude[{i}] matches no cell of the grid: {spec.excludes[i]}")
    grid = Grid(spec.name, spec.path, _shared_save_dir(spec.path, cells) / "grids" / spec.name, cells, spec.cli_opts)
    _check_folder_owner(grid)
    return grid


OWNER_FILE = "grid.json"


def _grid_identity(grid: Grid) -> dict:
    return {"grid_file": str(Path(grid.path).resolve()),
            "sha256": hashlib.sha256(Path(grid.path).read_bytes()).hexdigest(),
            "cells": sorted(cell.jobs[0].config_hash for cell in grid.cells)}


def _check_folder_owner(grid: Grid) -> None:
    """SAVE_DIR/grids/<name> belongs to the grid that first ran or reported there (grid.json): the same file,
    edited or not, a copy of it, or a grid of the same cells (split otherwise). Another grid of the same name would
    mix its job states and overwrite its tables: refused."""
    record = grid.folder / OWNER_FILE
    if not record.is_file():
        return
    try:
        owner = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise GridError(f"{record}: unreadable ({err}); delete it if {grid.folder} is this grid's") from None
    mine = _grid_identity(grid)
    if all(owner.get(key) != mine[key] for key in mine):
        raise GridError(f"{grid.path}: grid name '{grid.name}' is taken in {grid.folder.parent} by the grid file "
                        f"{owner.get('grid_file')}; give this grid another 'name:' (or delete {grid.folder})")


def claim_folder(grid: Grid) -> None:
    """Record this grid file as the owner of its folder (before its jobs are submitted or its tables written)."""
    atomic_write_text(grid.folder / OWNER_FILE, json.dumps(_grid_identity(grid), indent=1) + "\n")


def _shared_save_dir(path: Path, cells: list[Cell]) -> Path:
    """The one SAVE_DIR of a grid's cells, each a different config; refused otherwise (GridError)."""
    if not cells:
        raise GridError(f"{path}: every cell is excluded; the grid has nothing to run")
    seen: dict[str, Cell] = {}
    for cell in cells:
        hash_ = cell.jobs[0].config_hash
        if hash_ in seen:
            other = seen[hash_]
            raise GridError(f"{path}: cells ({other.config_name}, {other.dataset}, seed {other.seed}) and "
                            f"({cell.config_name}, {cell.dataset}, seed {cell.seed}) are the same config "
                            f"(hash {hash_})")
        seen[hash_] = cell
    save_dirs = {str(cell.cfg.SAVE_DIR) for cell in cells}
    if len(save_dirs) > 1:
        raise GridError(f"{path}: the cells of one grid share SAVE_DIR; they give {sorted(save_dirs)}")
    return Path(save_dirs.pop())


# ------------------------------------------------------------------------------------------------ cells and jobs

def _is_file(config: str) -> bool:
    return Path(config).suffix in (".yaml", ".yml")


def _config_file(config: str, dataset: str, path: Path) -> str:
    """The file of a grid's config: itself (a file, or a shipped composition named as test_time.py reads it, from
    any folder), or the shipped config of that name, or of the method that name is an alias of, for ``dataset``."""
    if _is_file(config):
        if not Path(config).is_file() and composed_name(Path(config)) is None:
            raise GridError(f"{path}: method config file {config} does not exist")
        return config
    declared = methods.method_declarations()
    if f"{dataset}/{config}" not in config_names() and config in declared:
        config = declared.canonical(config)         # an alias of a method: its shipped config ("zs": source)
    if f"{dataset}/{config}" not in config_names():
        shipped = sorted(n.split("/")[1] for n in config_names() if n.startswith(f"{dataset}/"))
        raise GridError(f"{path}: no shipped config for method '{config}' on {dataset} (shipped there: {shipped}); "
                        f"exclude that cell or give a config file")
    return f"conf/{dataset}/{config}.yaml"


def _axis_key(axis: str) -> str:
    return next(key for key, name in AXES.items() if name == axis)


def _cell_opts(spec: _GridFile, probe: dict, seed, setting, numbers: dict) -> list[str]:
    """A cell's ``KEY VALUE`` overrides after its config file, in the order they apply."""
    opts = [x for key, value in spec.shared.items() for x in (key, _opt_value(value))]
    for i, (where, values) in enumerate(spec.cell_overrides):
        if _matches(where, probe):
            spec.used[i] = True
            opts += [x for key, value in values.items() for x in (key, _opt_value(value))]
    opts += spec.cli_opts
    if seed is not None:
        opts += ["RNG_SEED", str(seed)]
    if setting is not None:
        opts += ["SETTING", setting]
    for axis, value in numbers.items():
        opts += [_axis_key(axis), str(value)]
    return opts


def _excluded(spec: _GridFile, probe: dict) -> bool:
    hit = [i for i, where in enumerate(spec.excludes) if _matches(where, probe)]
    for i in hit:
        spec.excluded_any[i] = True
    return bool(hit)


def _axis_tags(numbers: dict) -> str:
    """The values of a cell's number axes, for its name in messages and its jobs' ids: ".batch16.k4.order2"."""
    short = {"batch_sizes": "batch", "classes_per_batch": "k", "orders": "order"}
    return "".join(f".{short[axis]}{value}" for axis, value in numbers.items())


def _expand_cell(spec: _GridFile, dataset: str, config: str, seed, setting, numbers: dict) -> list[Cell]:
    """The cell of (dataset, config, seed, setting, number axes' values) with its jobs, its config checked once;
    none if excluded."""
    config_file = _config_file(config, dataset, spec.path)
    config_name = Path(config).stem if _is_file(config) else config
    probe = {"dataset": dataset, "method": config_name, "seed": seed, "setting": setting}
    probe.update({where_key: numbers.get(axis) for axis, (_, where_key) in NUMBER_AXES.items()})
    opts = _cell_opts(spec, probe, seed, setting, numbers)
    where = f"{spec.path}: cell ({config_name}, {dataset}, seed {seed}{_axis_tags(numbers).replace('.', ', ')})"
    try:
        loaded = read_config(config_file, opts)
    except UserError as err:
        raise GridError(f"{where}: {err.one_line()}") from None
    cfg = loaded.cfg
    if cfg.CORRUPTION.DATASET != dataset:
        raise GridError(f"{spec.path}: {config_file} is a config for {cfg.CORRUPTION.DATASET}, listed here under "
                        f"{dataset}")
    probe.update(seed=int(cfg.RNG_SEED), setting=str(cfg.SETTING), batch_size=int(cfg.TEST.BATCH_SIZE),
                 classes_per_batch=int(cfg.TEST.CLASSES_PER_BATCH), order=int(cfg.TEST.ORDER_SEED))
    if _excluded(spec, probe):
        return []
    cfg.RESUME = True
    try:
        check_config(cfg)
    except UserError as err:
        raise GridError(f"{where}: {err.one_line()}") from None
    cfg.freeze()
    cell = Cell(dataset, config_name, methods.method_declarations().canonical(cfg.MODEL.ADAPTATION),
                int(cfg.RNG_SEED), str(cfg.SETTING), cfg, build_tasks(cfg))
    cell.jobs = _cell_jobs(cell, loaded, config_file, opts, spec.split, _axis_tags(numbers))
    return [cell]


def _cell_jobs(cell: Cell, loaded: LoadedConfig, config_file: str, opts: list[str], split: str,
               tags: str = "") -> list[GridJob]:
    cfg = cell.cfg
    hash_ = config_hash(cfg)
    base_id = f"{cell.dataset}.{cell.config_name}.{cell.setting}.seed{cell.seed}{tags}.{hash_}"
    common = dict(dataset=cell.dataset, config_name=cell.config_name, seed=cell.seed, setting=cell.setting,
                  config_file=config_file, opts=tuple(opts), config_hash=hash_, run_dir=str(run_dir(cfg, cell.method)),
                  config_text=_config_text(cfg), keys_set=tuple(sorted(loaded.keys_set)))
    return [GridJob(id=_safe(base_id + (f".{domains[0]}" if domains else "")), domains=domains, tasks=indices,
                    **common)
            for domains, indices in (split_by_domain(cell.tasks) if split == "domain" else _whole(cell.tasks))]


def _config_text(cfg) -> str:
    """A cell's config as its jobs carry it: YAML, without the method nodes its method does not read that hold
    their defaults (out of its hash too), so a process that registered other methods than this one reads it the
    same."""
    left_out = unread_default_nodes(cfg)
    return yaml.safe_dump({key: _as_dict(value) for key, value in cfg.items() if key not in left_out})


def _as_dict(node):
    return {key: _as_dict(value) for key, value in node.items()} if isinstance(node, dict) else node


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
