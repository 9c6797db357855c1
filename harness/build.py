"""From a config to a checked run plan: the one place where a run is put together and checked.

``load_cfg`` reads a config (plug-ins imported, every registered method's keys in the schema); ``build_plan``
turns it into a ``RunPlan`` (data set, tasks, the data of every domain to run, method class, model, output
folder) after checking everything that can be checked without loading weights or reading an image: names against
the registries, every declared option of the suite and of the method, the method's checks against the
architecture's config (``check_setup``), the device, the weights' location, and every domain's files and layout.
Nothing is written and no model is loaded here; harness/run.py executes the plan."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import conf
import datasets
import methods
from conf import ConfigError
from conf.files import check_writable_folder
from conf.defaults import AUTHORS_DEFAULTS
from datasets.base import CLEAN, ImageDataset
from harness import open_set
from harness.identity import config_hash, data_fingerprint, file_sha256, flatten
from harness.settings import SETTINGS, Segment, SettingError, Task, build_tasks, tasks_to_run
from harness.task_records import read_tasks

# Reading and checking a config needs neither torch nor the model code (the commands that only read files do
# that); a plan does, and imports them when it is built.
if TYPE_CHECKING:
    import torch

    from models import ModelSpec
    from models.build import AuxiliaryModel
    from models.weights import WeightsSource


# ------------------------------------------------------------------------------------------------ configs

@dataclass(frozen=True)
class LoadedConfig:
    """A config as read (not checked: ``build_plan`` checks it) and the keys its file and command line set, which
    tell a key left at its default from one set to the default's value (``config_warnings``)."""
    cfg: object
    keys_set: frozenset[str]


def read_config(cfg_file=None, opts=None) -> LoadedConfig:
    """Defaults <- YAML file <- ``KEY VALUE`` pairs, each file read once (conf.ConfigSource), with the keys of every
    built-in method and of the plug-ins named in MODEL.EXTRA_MODULES in the schema (not those of plug-ins other
    configs of this process named: a config's keys and hash are the same in any process). Not frozen."""
    return _loaded(conf.ConfigSource.read(cfg_file, opts))


def config_from_text(text: str, keys_set, source: str) -> LoadedConfig:
    """A whole config dumped as YAML (what a grid hands each job), read back as it was, with the keys its own file
    and command line had set."""
    loaded = _loaded(conf.ConfigSource.of_text(text, source))
    return LoadedConfig(loaded.cfg, frozenset(keys_set))


def _loaded(source) -> LoadedConfig:
    plugins = source.plugins()
    conf.import_plugins(plugins)
    cfg = conf.load_config(source, methods.declared_nodes(_other_configs_plugins(source, plugins)))
    _as_the_authors_wrote_it(cfg)
    return LoadedConfig(cfg, source.keys_set())


def load_cfg(cfg_file=None, opts=None, freeze: bool = True):
    """``read_config``'s config, checked by ``check_config``: a config on its own, for what needs neither its
    warnings nor a plan (tests, benchmarks). A run reads its config with ``read_config`` and ``build_plan`` checks
    it."""
    cfg = read_config(cfg_file, opts).cfg
    check_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _other_configs_plugins(source, plugins) -> set[str]:
    """The plug-in modules imported in this process for other configs, whose method nodes stay out of this one:
    all but those it names and those defining its method (and the classes its method derives from)."""
    keep = {conf.plugin_module_name(p) for p in plugins}
    name = source.method()
    declared = methods.method_declarations()
    if name and name in declared:
        keep |= {klass.__module__ for klass in declared.get(name).__mro__}
    return conf.PLUGIN_MODULES - keep


def _as_the_authors_wrote_it(cfg) -> None:
    """Spellings of the authors' suite, resolved to this suite's: a data set's alias (imagenet_k for
    imagenet_sketch), and for a data set with a single domain (the ImageNet variants) CORRUPTION.TYPE [""] or
    left at the corruption default, which mean the whole set there."""
    dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
    cfg.CORRUPTION.DATASET = datasets.DATASETS.canonical(cfg.CORRUPTION.DATASET)
    types = list(cfg.CORRUPTION.TYPE)
    if len(dataset.domains) == 1 and (all(t == "" for t in types) or types == list(conf.defaults().CORRUPTION.TYPE)):
        cfg.CORRUPTION.TYPE = list(dataset.domains)


def method_class(cfg) -> type:
    """The registered class of MODEL.ADAPTATION (the built-in methods imported)."""
    return methods.METHODS.get(cfg.MODEL.ADAPTATION)


def declared_method(cfg) -> type:
    """The class of MODEL.ADAPTATION for its declarations only (methods.method_declarations: without torch where
    no method has been imported)."""
    return methods.method_declarations().get(cfg.MODEL.ADAPTATION)


def check_config(cfg) -> None:
    """Names against the registries, and every declared option of the suite and of the chosen method."""
    cls = declared_method(cfg)
    dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
    SETTINGS.canonical(cfg.SETTING)
    for domain in cfg.CORRUPTION.TYPE:
        try:
            dataset.check_domain(domain)
        except datasets.DatasetError as err:
            raise ConfigError(str(err)) from None
    if cfg.CORRUPTION.NUM_EX >= 0 and cfg.CORRUPTION.SUBSET == "authors" and "mixed_domains" in cfg.SETTING:
        raise ConfigError(f"SETTING {cfg.SETTING} with CORRUPTION.NUM_EX {cfg.CORRUPTION.NUM_EX}: the authors' suite "
                          f"samples NUM_EX images from the whole mixed stream, this suite per domain; set "
                          f"CORRUPTION.SUBSET first_n (the first NUM_EX of each domain) or NUM_EX -1")
    if getattr(dataset, "has_severities", True):
        bad = [s for s in cfg.CORRUPTION.SEVERITY if not isinstance(s, int) or not 1 <= s <= 5]
        if bad or not cfg.CORRUPTION.SEVERITY:
            raise ConfigError(f"CORRUPTION.SEVERITY = {list(cfg.CORRUPTION.SEVERITY)}: {dataset.name} needs a list of "
                              f"severities in 1..5")
    if (cfg.TEST.STREAM_ORDER == "authors" and cfg.TEST.CORRELATION_SAMPLER == "stata" and "correlated" in cfg.SETTING
            and cfg.TEST.DELTA_DIRICHLET > 0):
        raise ConfigError("TEST.CORRELATION_SAMPLER stata: StatA's sampler is not in the authors' suite, which has no "
                          "order for it; set TEST.STREAM_ORDER suite")
    for key, values in (("CORRUPTION.TYPE", list(cfg.CORRUPTION.TYPE)), ("CORRUPTION.SEVERITY",
                                                                         list(cfg.CORRUPTION.SEVERITY))):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ConfigError(f"{key} = {values} lists {repeated[0]} twice: each (domain, severity) is one record of "
                              f"the run and counts once in its mean (SETTING {cfg.SETTING} makes the stream from them)")
    unknown = [d for d in cfg.RUN_DOMAINS if d not in cfg.CORRUPTION.TYPE]
    if unknown:
        raise ConfigError(f"RUN_DOMAINS / --domains {unknown} are not in CORRUPTION.TYPE {list(cfg.CORRUPTION.TYPE)}")
    conf.check_values(cfg, conf.declared_options(methods.own_nodes(cls)))
    open_set.check_open_set(cfg, dataset)
    check_forgetting(cfg, dataset)
    check_classes_per_batch(cfg, dataset)


# TEST.FORGETTING's clean set (harness/forgetting.py measures it).
CLEAN_DOMAIN = CLEAN


class ForgettingError(ConfigError):
    """TEST.FORGETTING True where forgetting means nothing or cannot be measured."""


def check_forgetting(cfg, dataset) -> None:
    """Refuse TEST.FORGETTING True, in one line and before any model loads, where it means nothing: a data set
    without a clean domain, a setting that resets the method after its first domain (the end state has not seen
    the whole stream), MODEL.EPISODIC (nothing carries over), an open-set stream, or RUN_DOMAINS running only part
    of the stream."""
    if not cfg.TEST.FORGETTING:
        return
    prefix = f"TEST.FORGETTING True on {cfg.CORRUPTION.DATASET} with SETTING {cfg.SETTING}"
    if CLEAN_DOMAIN not in dataset.domains:
        raise ForgettingError(f"{prefix}: data set {dataset.name} has no clean domain '{CLEAN_DOMAIN}' to measure "
                              f"forgetting on; expected a corruption benchmark with one (cifar10_c, cifar100_c, "
                              f"imagenet_c)")
    tasks = build_tasks(cfg, dataset)
    resets = [task.segments[0] for task in tasks[1:] if task.reset]
    if resets:
        raise ForgettingError(f"{prefix}: the setting resets the method again at {resets[0].domain}, so its end "
                              f"state has seen only the last domain; expected a setting with one stream (continual, "
                              f"gradual, mixed_domains, correlated, ...)")
    if cfg.MODEL.EPISODIC:
        raise ForgettingError(f"{prefix}: MODEL.EPISODIC True resets the method before every batch, so nothing of "
                              f"the stream reaches the clean set; expected MODEL.EPISODIC False")
    if open_set.is_open_set(cfg):
        raise ForgettingError(f"{prefix}: an open-set stream (OPEN_SET.OOD_DATASET {cfg.OPEN_SET.OOD_DATASET}) is "
                              f"not supported; expected OPEN_SET.OOD_DATASET ''")
    outside = sorted({s.domain for task in tasks for s in task.segments} - set(cfg.RUN_DOMAINS))
    if cfg.RUN_DOMAINS and outside:
        raise ForgettingError(f"{prefix}: RUN_DOMAINS {list(cfg.RUN_DOMAINS)} leaves out {outside}; the state after "
                              f"the whole stream exists only in a process that runs it all (drop RUN_DOMAINS)")


def clean_segment(cfg, dataset) -> Segment:
    """The clean set as a segment: domain ``none`` at the run's first severity (the clean readers ignore it; it is
    recorded as a stream segment's severity is)."""
    severity = int(cfg.CORRUPTION.SEVERITY[0]) if getattr(dataset, "has_severities", True) else 0
    return Segment(CLEAN_DOMAIN, severity)


def check_classes_per_batch(cfg, dataset) -> None:
    """TEST.CLASSES_PER_BATCH > 0 (StatA's effective classes per batch) against what its batches need: the suite's
    stream order, a setting without its own class order, a closed-set stream, no more classes than the data set
    has, and at least one image of each class in a batch."""
    wanted = int(cfg.TEST.CLASSES_PER_BATCH)
    if wanted == 0:
        return
    prefix = f"TEST.CLASSES_PER_BATCH {wanted}"
    if cfg.TEST.STREAM_ORDER != "suite":
        raise ConfigError(f"{prefix}: the authors' suite has no stream order with a set number of classes per batch; "
                          f"set TEST.STREAM_ORDER suite")
    if any(task.correlation != "none" for task in build_tasks(cfg)):
        raise ConfigError(f"{prefix} with SETTING {cfg.SETTING}: a correlated setting orders the classes itself; "
                          f"use its uncorrelated setting, or TEST.CLASSES_PER_BATCH 0")
    if cfg.OPEN_SET.OOD_DATASET:
        raise ConfigError(f"{prefix} with OPEN_SET.OOD_DATASET {cfg.OPEN_SET.OOD_DATASET}: the OOD images mixed into "
                          f"the stream have no class of the data set; use a closed-set run")
    if wanted > len(dataset.class_names):
        raise ConfigError(f"{prefix}: {dataset.name} has {len(dataset.class_names)} classes; expected at most that")
    if wanted > int(cfg.TEST.BATCH_SIZE):
        raise ConfigError(f"{prefix} with TEST.BATCH_SIZE {cfg.TEST.BATCH_SIZE}: a batch holds at least one image of "
                          f"each of its classes; expected at most the batch size")


def check_method(cfg, spec: ModelSpec | None = None, class_names=None, cls: type | None = None) -> None:
    """The method's own checks across options, against the architecture and the class names (``check_setup``)."""
    from models import model_spec
    if class_names is None:
        class_names = datasets.get_dataset(cfg.CORRUPTION.DATASET).class_names
    cls = cls or method_class(cfg)
    if int(cfg.TEST.CLASSES_PER_BATCH) > 0 and getattr(cls, "episode", "batch") == "image" and cfg.MODEL.EPISODIC:
        raise ConfigError(f"TEST.CLASSES_PER_BATCH {cfg.TEST.CLASSES_PER_BATCH} with {cfg.MODEL.ADAPTATION} and "
                          f"MODEL.EPISODIC True: each image is its own episode, so the classes of its batch cannot "
                          f"change its results; expected TEST.CLASSES_PER_BATCH 0")
    cls.check_setup(cfg, spec or model_spec(cfg.MODEL.ARCH), list(class_names))
    open_set.check_open_set_method(cfg, cls)


def config_warnings(cfg, keys_set: frozenset[str] | None = None, cls: type | None = None) -> list[str]:
    """Keys that are set but change nothing for this run, and keys left at a default that differs from the
    authors' suite. ``keys_set``: what the config's file and command line set (LoadedConfig.keys_set; None: not
    known, for a config built in code, and those defaults are not named)."""
    warnings = conf.inert_settings(cfg)
    if keys_set is not None:
        for key, (theirs, why) in AUTHORS_DEFAULTS.items():
            if key not in keys_set:
                warnings.append(f"{key} is not set: its default is {theirs} in the authors' suite and "
                                f"{dict(flatten(dict(cfg)))[key]} here ({why})")
    cls = cls or method_class(cfg)
    if cls.protocol == methods.base.TRAINING_FREE:
        if cfg.OPTIM.STEPS != 1:
            warnings.append(f"OPTIM.STEPS = {cfg.OPTIM.STEPS} has no effect: {cls.method_name} trains nothing")
        if cfg.MODEL.EPISODIC:
            warnings.append(f"MODEL.EPISODIC = True has no effect: {cls.method_name} trains nothing")
    warnings += cls.config_warnings(cfg)
    warnings += open_set.config_warnings(cfg)
    warnings += datasets.get_dataset(cfg.CORRUPTION.DATASET).config_warnings(cfg, keys_set)
    own = methods.own_nodes(cls)
    base = conf.defaults(methods.declared_nodes())
    for node in methods.declared_nodes():
        if node not in own and node in cfg and cfg[node] != base[node]:
            changed = sorted(k for k in cfg[node] if cfg[node][k] != base[node][k])
            warnings.append(f"{', '.join(f'{node}.{k}' for k in changed)} set, but method {cls.method_name} does "
                            f"not read the {node} keys")
    return warnings


# ------------------------------------------------------------------------------------------------ the plan

def resolve_device(cfg) -> torch.device:
    import torch
    if cfg.DEVICE == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.DEVICE)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE {cfg.DEVICE}: no CUDA device is available here (torch.cuda.is_available() "
                              f"is False); use DEVICE cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"DEVICE {cfg.DEVICE}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def run_name(cfg) -> str:
    """RUN_NAME, or <arch>[_<weights>]_<setting>_seed<seed>_<config hash>: the weights' tag or file stem only where
    it differs from the architecture (a checkpoint named after its architecture, as the demo's
    tiny-clip-shapes.pt, is not named twice). The hash is the config's identity, so the same config finds its
    folder again (resuming); the rest is for reading."""
    if cfg.RUN_NAME:
        return _folder_name(cfg.RUN_NAME)
    weights = Path(str(cfg.MODEL.WEIGHTS)).stem
    model = cfg.MODEL.ARCH if weights.lower() == cfg.MODEL.ARCH.lower() else f"{cfg.MODEL.ARCH}_{weights}"
    return _folder_name(f"{model}_{cfg.SETTING}_seed{cfg.RNG_SEED}_{config_hash(cfg)}")


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]", "-", name)


def run_dir(cfg, method_name: str | None = None) -> Path:
    """SAVE_DIR/<dataset>/<method>/<run_name(cfg)>: the one place a run's folder is named (test_time.py,
    scripts/compare.py, the demo and grids all run through it). ``method_name``: the registered name of
    MODEL.ADAPTATION, where the caller has looked it up."""
    method = method_name or methods.method_declarations().canonical(cfg.MODEL.ADAPTATION)
    return Path(cfg.SAVE_DIR) / cfg.CORRUPTION.DATASET / method / run_name(cfg)


def renamed_run_dir_warning(cfg, save_dir: Path) -> str | None:
    """A line when this config's records sit in the folder its run had before run folders dropped the repeated
    weights name (<arch>_<arch>_...): they are not resumed from there."""
    if cfg.RUN_NAME or not cfg.RESUME or save_dir.exists():
        return None
    old = save_dir.parent / _folder_name(f"{cfg.MODEL.ARCH}_{Path(str(cfg.MODEL.WEIGHTS)).stem}_{cfg.SETTING}"
                                         f"_seed{cfg.RNG_SEED}_{config_hash(cfg)}")
    if old == save_dir or not old.is_dir():
        return None
    return f"records of this config under {old} (the run folder's former name) are not resumed: rename it to " \
           f"{save_dir.name} to resume them"


def select_tasks(cfg, tasks: list[Task]) -> list[int]:
    """Indices of the tasks RUN_DOMAINS asks this process for (all when it is empty)."""
    run_domains = list(cfg.RUN_DOMAINS)
    if not run_domains:
        return list(range(len(tasks)))
    wanted = []
    for index, task in enumerate(tasks):
        inside = [s.domain in run_domains for s in task.segments]
        if all(inside):
            wanted.append(index)
        elif any(inside):
            raise SettingError(f"SETTING {cfg.SETTING} puts several domains into one stream; RUN_DOMAINS cannot "
                               f"split it (run all domains in one process)")
    outside = sorted(set(tasks_to_run(tasks, set(wanted))) - set(wanted))
    if outside:
        raise SettingError(f"SETTING {cfg.SETTING} carries the adapted state from domain to domain: "
                           f"RUN_DOMAINS {run_domains} would need the state after "
                           f"{sorted({s.domain for i in outside for s in tasks[i].segments})}. Only settings "
                           f"that reset at every domain (reset_each_shift*) can be split over processes.")
    return wanted


@dataclass
class RunPlan:
    """Everything a run needs, checked; built by ``build_plan``, executed by harness.run.evaluate."""
    cfg: object                          # the frozen config
    method_name: str                     # registered name (aliases resolved)
    method_class: type                   # what harness.run constructs
    dataset: datasets.BenchmarkDataset
    tasks: list[Task]                    # the SETTING's tasks, in order
    wanted: list[int]                    # the task indices this process is asked for (RUN_DOMAINS)
    data: dict[Segment, ImageDataset]    # every segment this process may run -> its checked images
    templates: list[str]                 # prompt templates of the zero-shot head
    model_spec: ModelSpec                # the architecture the method was checked against (in the provenance)
    weights: WeightsSource
    device: torch.device
    save_dir: Path
    warnings: list[str] = field(default_factory=list)
    # What the run reads, beyond its config: per task index, the fingerprint of its data files (None for a plug-in
    # data set that does not list them); the weights file's sha256 (None for random weights or a tag to download).
    data_fingerprints: dict[int, dict | None] = field(default_factory=dict)
    weights_sha256: str | None = None
    # The list, split and prompt files the data set and the method read, by the key or file name that names them:
    # {"path": ..., "sha256": ...} (by content: an edited file is another run).
    inputs: dict[str, dict] = field(default_factory=dict)
    # The further CLIPs the method needs (TTAMethod.auxiliary_models), by constructor keyword, checked.
    auxiliary: dict[str, AuxiliaryModel] = field(default_factory=dict)
    # The selected source training images the method reads (TTAMethod.source_data), checked; None: none.
    source: ImageDataset | None = None
    # Open-set runs (OPEN_SET.OOD_DATASET): every segment this process may run -> its OOD companion, checked.
    ood: dict = field(default_factory=dict)
    # TEST.FORGETTING: the clean segment (harness/forgetting.py) -> its images, checked; empty where it is off.
    clean: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    def identity_of(self, index: int) -> dict:
        """What a task's record must match to be resumed, beyond the config: its data, the weights and the
        contents of the list, split and prompt files."""
        return {"data": self.data_fingerprints.get(index), "weights_sha256": self.weights_sha256,
                "inputs": {name: entry["sha256"] for name, entry in self.inputs.items()}}


def build_plan(cfg, keys_set: frozenset[str] | None = None) -> RunPlan:
    """Check cfg completely (the one ``check_config`` of a run) and put the run together, without loading weights,
    reading images or writing; cfg is frozen. ``keys_set``: what its file and command line set
    (LoadedConfig.keys_set), for ``config_warnings``."""
    from models import model_spec, resolve_model_weights
    from models.build import check_precision, resolve_auxiliary_weights
    check_config(cfg)
    cfg.freeze()
    cls = method_class(cfg)
    dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
    templates = dataset.prompt_templates(cfg)
    tasks = build_tasks(cfg, dataset)
    wanted = select_tasks(cfg, tasks)
    device = resolve_device(cfg)
    check_precision(cfg.CLIP.PRECISION, device)
    spec = model_spec(cfg.MODEL.ARCH)
    check_method(cfg, spec, dataset.class_names, cls)
    source = source_data(cfg, cls)
    weights = resolve_model_weights(cfg)
    auxiliary = {keyword: resolve_auxiliary_weights(cfg, *keys) for keyword, keys in cls.auxiliary_models.items()}
    save_dir = run_dir(cfg, cls.method_name)
    check_writable_folder(save_dir, "SAVE_DIR")
    warnings = config_warnings(cfg, keys_set, cls)
    renamed = renamed_run_dir_warning(cfg, save_dir)
    if renamed:
        warnings.append(renamed)
    data, fingerprints = task_data(cfg, dataset, tasks, tasks_to_run(tasks, set(wanted)))
    ood = open_set.companions(cfg, list(data)) if open_set.is_open_set(cfg) else {}
    clean = clean_data(cfg, dataset) if cfg.TEST.FORGETTING else {}
    if ood:
        fingerprints = {index: ood_fingerprint(cfg, fingerprints[index], [ood[s] for s in tasks[index].segments])
                        for index in fingerprints}
    if any(f is None for f in fingerprints.values()):
        warnings.append(f"data set {dataset.name} does not list the files it reads (source_files): its data are not "
                        f"part of the run's identity, so a resumed run cannot tell other data from these")
    weights_sha256 = file_sha256(weights.path) if weights.path else None
    plan = RunPlan(cfg, cls.method_name, cls, dataset, tasks, wanted, data, templates, spec, weights, device,
                   save_dir, warnings, fingerprints, weights_sha256, input_files(cfg, dataset, cls, source), auxiliary,
                   source, ood, clean=clean)
    if cfg.RESUME:   # records of another config, other data or other weights are refused now, before any load
        read_tasks(save_dir, tasks, config_hash(cfg), cfg.dump(), plan.identity_of)
    return plan


def task_data(cfg, dataset, tasks: list[Task], indices, check_files: bool = True):
    """(every segment of the tasks ``indices`` -> its images, checked; task index -> the fingerprint of its
    files). ``check_files``: also the cheap checks of every file (ImageDataset.check_files)."""
    data, fingerprints = {}, {}
    for index in indices:
        for segment in tasks[index].segments:
            if segment not in data:
                data[segment] = dataset.build_domain(cfg, segment.domain, segment.severity)
                if len(data[segment]) == 0:
                    raise datasets.DatasetError(f"{cfg.CORRUPTION.DATASET}: no images for {segment.domain} at "
                                                f"severity {segment.severity}")
                if check_files and hasattr(data[segment], "check_files"):    # a plug-in's own reader may lack it
                    data[segment].check_files()
        fingerprints[index] = _task_fingerprint(cfg, [data[s] for s in tasks[index].segments])
    return data, fingerprints


def clean_data(cfg, dataset) -> dict:
    """TEST.FORGETTING's clean set (harness/forgetting.py): {its segment: its images}, read and checked as a task of
    that one segment is; a reader's refusal names the key that asked for it."""
    try:
        return task_data(cfg, dataset, [Task([clean_segment(cfg, dataset)], reset=True)], [0])[0]
    except datasets.DatasetError as err:
        raise type(err)(f"TEST.FORGETTING True reads the clean set '{CLEAN_DOMAIN}': {err}") from None


def records_identity(cfg, cache: dict | None = None):
    """``identity_of(task index)`` for the records of ``cfg``'s run without a plan and without torch, as grid.py
    status and report check finished runs (read_tasks): the data of every task (where DATA_DIR cannot be read
    here, its path), the contents of the files the config names, and the weights' sha256 where MODEL.WEIGHTS is a
    file or none (a tag's file is open_clip's to find: that check is left to the run's plan). ``cache``: shared
    by the cells of a grid, which read the same data."""
    cache = {} if cache is None else cache
    dataset = datasets.get_dataset(cfg.CORRUPTION.DATASET)
    tasks = build_tasks(cfg, dataset)
    key = repr((cfg.DATA_DIR, cfg.CORRUPTION.dump(), cfg.OPEN_SET.dump(), cfg.RNG_SEED, [t.segments for t in tasks]))
    if key not in cache:
        try:
            data, fingerprints = task_data(cfg, dataset, tasks, range(len(tasks)), check_files=False)
            if open_set.is_open_set(cfg):
                ood = open_set.companions(cfg, list(data), check_files=False)
                fingerprints = {i: ood_fingerprint(cfg, fingerprints[i], [ood[s] for s in tasks[i].segments])
                                for i in fingerprints}
            cache[key] = {"data": fingerprints}
        except datasets.DatasetError:
            cache[key] = {"data_dir": str(Path(cfg.DATA_DIR).expanduser().resolve())}
    try:
        inputs = input_files(cfg, dataset, declared_method(cfg))
        identity = {"inputs": {name: entry["sha256"] for name, entry in inputs.items()}}
    except (datasets.DatasetError, ConfigError):
        identity = {}       # a file that cannot be read here: the run's plan checks it
    weights = Path(str(cfg.MODEL.WEIGHTS)).expanduser()
    if weights.is_file():
        stat = weights.stat()
        weights_key = ("weights", str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
        if weights_key not in cache:
            cache[weights_key] = file_sha256(weights)
        identity["weights_sha256"] = cache[weights_key]
    elif str(cfg.MODEL.WEIGHTS).lower() == "none":
        identity["weights_sha256"] = None
    known = cache[key]
    if "data" in known:
        return lambda index: {"data": known["data"].get(index), **identity}
    return lambda index: {"data_dir": known["data_dir"], **identity}


def needs_source_data(cfg, cls) -> bool:
    """Whether the method reads source training data with this config: every key of its ``source_data`` is > 0."""
    keys = tuple(getattr(cls, "source_data", ()) or ())
    values = flatten(dict(cfg))
    return bool(keys) and all(values[key] > 0 for key in keys)


def source_data(cfg, cls) -> ImageDataset | None:
    """The selected source training images the method reads (datasets/source_sets.py), checked before any model
    loads; None when it reads none. Missing or unreadable: refused in one line naming the path, the data set and
    the keys that ask for them."""
    if not needs_source_data(cfg, cls):
        return None
    from datasets.source_sets import build_source_set
    values = flatten(dict(cfg))
    keys = tuple(cls.source_data)
    try:
        return build_source_set(cfg)
    except datasets.DatasetError as err:
        raise ConfigError(f"{cls.method_name} on {cfg.CORRUPTION.DATASET} reads its source training set "
                          f"({', '.join(f'{k} {values[k]}' for k in keys)} > 0): {err}; {keys[0]} 0 runs it "
                          f"without source data") from None


def source_input(cfg, images) -> dict:
    """The run-identity entry of the source images: their files (as a task's data: paths, sizes, times) and the
    positions selected; {"path", "sha256", "images", "of"}."""
    from datasets.source_sets import source_selection
    selection = source_selection(images)
    files = images.source_files()
    fingerprint = data_fingerprint(files, cfg.DATA_DIR)["exact_sha1"] if files else None
    digest = hashlib.sha256(repr((fingerprint, selection)).encode()).hexdigest()
    root = Path(files[0]).parent if files else Path("(generated)")
    return {"path": str(root), "sha256": digest, "images": len(selection["rows"]), "of": selection["of"]}


def input_files(cfg, dataset, cls, source: ImageDataset | None = None) -> dict[str, dict]:
    """{name: {"path", "sha256"}} of the files the data set reads besides images (``input_files``), the plug-in
    files MODEL.EXTRA_MODULES names and those the suite's and the method's keys name (``Option(reads_file=True)``),
    read for their content; and the method's source training images (``source``, or read here), by their files
    and selection."""
    named = dict(dataset.input_files(cfg))
    for module in cfg.MODEL.EXTRA_MODULES:       # a plug-in's code is outside the suite's commit
        if str(module).endswith(".py"):
            named[f"MODEL.EXTRA_MODULES {Path(str(module)).name}"] = str(module)
    values = flatten(dict(cfg))
    for key, option in conf.declared_options(methods.own_nodes(cls)).items():
        if option.reads_file and values[key]:
            named[key] = values[key]
    for _, weights_key in getattr(cls, "auxiliary_models", {}).values():
        # An auxiliary CLIP's checkpoint file, by content (a tag's file is open_clip's to find: as MODEL.WEIGHTS'
        # tag, its hash is recorded in the provenance, not the identity).
        if values[weights_key] and Path(str(values[weights_key])).expanduser().is_file():
            named[weights_key] = values[weights_key]
    found = {}
    for name, path in named.items():
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"{name} {path}: {'a folder' if file.is_dir() else 'no such file'}; expected the file "
                              f"this run reads")
        found[name] = {"path": str(file.resolve()), "sha256": file_sha256(file)}
    if needs_source_data(cfg, cls):
        images = source if source is not None else source_data(cfg, cls)
        found[f"source data ({images.set_name})"] = source_input(cfg, images)
    return found


def _task_fingerprint(cfg, parts) -> dict | None:
    files = []
    for part in parts:
        listed = getattr(part, "source_files", None)
        if listed is None:
            return None
        files += listed()
    return data_fingerprint(files, cfg.DATA_DIR)


def ood_fingerprint(cfg, fingerprint: dict | None, companions: list) -> dict | None:
    """A task's fingerprint with its OOD companions' files: other OOD images are other data."""
    ood = _task_fingerprint(cfg, [c.images for c in companions])
    if fingerprint is None or ood is None:
        return None
    return {**fingerprint, "ood": ood}
