"""Running a comparison: every method's config resolved against one base config (same data, stream and backbone),
one run per seed through harness.run.evaluate, the payloads handed to harness.report for the table."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

from conf import ConfigError, config_names
from harness.build import LoadedConfig, build_plan, check_config, read_config
from harness.identity import config_hash
from harness.report import CompareError


# Keys every compared method takes from the base config, so that all of them see the same data, stream and
# backbone; everything else (optimiser, batch size, method keys) comes from each method's own config.
SHARED_KEYS = ["SETTING", "RNG_SEED", "DATA_DIR", "SAVE_DIR", "CORRUPTION", "MODEL.ARCH", "MODEL.WEIGHTS",
               "MODEL.CKPT_PATH", "MODEL.FORCE_QUICK_GELU", "TEST.DELTA_DIRICHLET", "TEST.STREAM_ORDER",
               "TEST.ORDER_SEED", "TEST.NUM_WORKERS", "DEVICE", "RESUME", "RUN_DOMAINS"]


def resolve_method_config(method: str, dataset: str) -> str:
    """A config file path as given, or the shipped composition conf/<dataset>/<method>.yaml for a method name."""
    if Path(method).suffix in (".yaml", ".yml"):
        if not Path(method).is_file() and method not in _shipped_paths():
            raise CompareError(f"config file {method} does not exist")
        return method
    candidate = f"conf/{dataset}/{method}.yaml"
    if candidate not in _shipped_paths():
        available = [n.split("/")[1] for n in config_names() if n.startswith(f"{dataset}/")]
        raise CompareError(f"no config {candidate} for method '{method}' on {dataset}; available: {available}. "
                           f"Give a config file path instead.")
    return candidate


def _shipped_paths() -> set[str]:
    return {f"conf/{name}.yaml" for name in config_names()}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = copy.deepcopy(value)


def _is_shared(key: str) -> bool:
    return any(key == shared or key.startswith(shared + ".") for shared in SHARED_KEYS)


def method_configs(methods: list[str], base_cfg_file=None, opts=None, seeds=None,
                   overrides: dict | None = None, orders=None) -> list[tuple[str, list[LoadedConfig]]]:
    """[(method label, [config per seed and order])]: each method's own config with the SHARED_KEYS of the base
    config (the --cfg file, else the first method's config) and the command-line overrides applied to all of them,
    once per RNG_SEED of ``seeds`` and, within it, per TEST.ORDER_SEED of ``orders``; every config checked
    (check_config) before any of them runs."""
    opts = list(opts or [])
    if not methods:
        raise CompareError("give at least one method (name or config file)")
    try:
        base = read_config(_base_config_file(methods, base_cfg_file, opts), opts)
    except ConfigError as err:
        raise CompareError(str(err)) from None
    for key, value in (overrides or {}).items():
        _set(base.cfg, key, value)
    result = []
    for method in methods:
        path = resolve_method_config(method, base.cfg.CORRUPTION.DATASET)
        try:
            own = read_config(path, opts)
        except ConfigError as err:
            raise CompareError(f"{path}: {err}") from None
        for key in SHARED_KEYS:
            _set(own.cfg, key, _get(base.cfg, key))
        # What the file and command line set, for config_warnings: the shared keys as the base config set them.
        keys_set = frozenset({k for k in own.keys_set if not _is_shared(k)} |
                             {k for k in base.keys_set | set(overrides or {}) if _is_shared(k)})
        per_seed = []
        for seed, order in [(s, o) for s in (seeds or [own.cfg.RNG_SEED]) for o in (orders or [None])]:
            seeded = own.cfg.clone()
            seeded.RNG_SEED = int(seed)
            if order is not None:
                seeded.TEST.ORDER_SEED = int(order)
            try:
                check_config(seeded)
            except ConfigError as err:
                raise CompareError(f"{path}: {err}") from None
            per_seed.append(LoadedConfig(seeded, keys_set))
        label = Path(method).stem if Path(method).suffix in (".yaml", ".yml") else method
        result.append((label, per_seed))
    labels = [label for label, _ in result]
    for label in labels:
        if labels.count(label) > 1:
            raise CompareError(f"method '{label}' is given twice")
    return result


def _base_config_file(methods: list[str], base_cfg_file, opts: list[str]):
    """The --cfg file, else the first method's config (a name needs CORRUPTION.DATASET among the overrides)."""
    if base_cfg_file is not None:
        return base_cfg_file
    if Path(methods[0]).suffix in (".yaml", ".yml"):
        return methods[0]
    dataset = dict(zip(opts[0::2], opts[1::2])).get("CORRUPTION.DATASET")
    if not dataset:
        raise CompareError("method names need a data set: give --cfg (a config of that data set) or "
                           "CORRUPTION.DATASET <name>")
    return resolve_method_config(methods[0], dataset)


def run_comparison(configs, progress: bool = True) -> list[tuple[str, list[dict]]]:
    """Evaluate every (label, [config per seed]) in turn; returns the groups for build_table. ``progress``: each
    run's progress (harness/progress.py) named by its method, its seed where there are several, and its place
    among the comparison's runs ("[2/3] tent")."""
    from harness.run import evaluate     # deferred: it imports torch, which the tabulating commands do not need
    runs = sum(len(loaded) for _, loaded in configs)
    groups, done = [], 0
    for label, per_seed in configs:
        payloads = []
        for loaded in per_seed:
            done += 1
            name = _run_name(label, loaded.cfg, per_seed)
            plan = build_plan(loaded.cfg, loaded.keys_set)
            payloads.append(evaluate(plan, progress=progress, label=f"[{done}/{runs}] {name}"))
        groups.append((label, payloads))
    return groups


def _run_name(label: str, cfg, runs: list[LoadedConfig]) -> str:
    """How the progress names a run: the method, with the seed and the order seed that tell its runs apart."""
    seeds = {int(r.cfg.RNG_SEED) for r in runs}
    orders = {int(r.cfg.TEST.ORDER_SEED) for r in runs}
    return (label + (f" seed {cfg.RNG_SEED}" if len(seeds) > 1 else "")
            + (f" order {cfg.TEST.ORDER_SEED}" if len(orders) > 1 else ""))


def comparison_dir(cfg, labels: list[str]) -> Path:
    """Default output folder of a comparison: SAVE_DIR/<dataset>/comparison/<setting>_<id of the methods>."""
    ident = config_hash(cfg)
    methods_id = hashlib.sha1(("|".join(labels) + ident).encode()).hexdigest()[:8]
    return Path(cfg.SAVE_DIR) / cfg.CORRUPTION.DATASET / "comparison" / f"{cfg.SETTING}_{methods_id}"
