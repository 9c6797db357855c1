"""What makes two runs the same experiment: the config minus the keys that cannot change results.

Used for the run directory's hash, for resuming a run, and for refusing to average or merge results whose configs
differ."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import yaml

# Top-level keys that do not change results and so do not enter the run's identity. RESUME and RUN_DOMAINS only
# say which tasks this process runs, so shards and resumed runs of one experiment share one identity.
NON_RESULT_KEYS = {"DATA_DIR", "SAVE_DIR", "RUN_NAME", "LOG_DEST", "LOG_TIME", "PRINT_EVERY", "DESC",
                   "RESUME", "RUN_DOMAINS"}
# Nested keys alike.
NON_RESULT_NESTED = {"TEST.NUM_WORKERS"}
# Nested keys left out where they hold these values: keys added after runs were recorded, whose value here does what
# those runs did, so their arrival moved no config's hash or keys (TEST.ORDER_SEED -1: the order seeded by RNG_SEED;
# TEST.CLASSES_PER_BATCH 0: batches of any classes; TEST.FORGETTING False: no clean-set measurement after the stream;
# MODEL.SIGLIP_PROBABILITIES softmax: what every method computed before SigLIP models were served).
LEFT_OUT_AT = {"TEST.ORDER_SEED": -1, "TEST.CLASSES_PER_BATCH": 0, "TEST.FORGETTING": False,
               "MODEL.SIGLIP_PROBABILITIES": "softmax"}


def _left_out_nested(key: str, value) -> bool:
    return key in NON_RESULT_NESTED or (key in LEFT_OUT_AT and value == LEFT_OUT_AT[key])


def _plain(node):
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in sorted(node.items())}
    if isinstance(node, (list, tuple)):     # a YAML dump holds lists where the config may hold tuples
        return [_plain(v) for v in node]
    return node


@lru_cache(maxsize=8)
def _declared_defaults(node_names: frozenset) -> dict:
    import conf
    import methods
    return _plain(dict(conf.defaults(methods.declared_nodes())))


def unread_default_nodes(config) -> set[str]:
    """The method nodes of ``config`` that its method (MODEL.ADAPTATION) does not read and that hold their declared
    defaults. They cannot change its results, so they stay out of its identity: adding a method to the suite (a
    new node) moves no other config's hash or keys. A node set away from its defaults stays in (and the run warns
    that its method does not read it). Nothing is left out for a method this process has not registered."""
    import methods     # deferred: reporting imports this module and needs the registry only here
    name = (config.get("MODEL") or {}).get("ADAPTATION")
    declared_methods = methods.method_declarations()     # without torch where no method has run (the reports)
    if name not in declared_methods:
        return set()
    own = methods.own_nodes(declared_methods.get(name))
    declared = methods.declared_nodes()
    base = _declared_defaults(frozenset(declared))
    return {node for node in declared
            if node not in own and node in config and _plain(dict(config[node])) == base.get(node)}


def closed_set_node(config) -> set[str]:
    """{"OPEN_SET"} where the config's OPEN_SET node holds its defaults (a closed-set run): left out of the
    identity, so that the node's arrival moved no closed-set config's hash or keys."""
    import conf
    node = config.get("OPEN_SET")
    if node is None or _plain(dict(node)) == _plain(dict(conf.defaults().OPEN_SET)):
        return {"OPEN_SET"}
    return set()


def config_hash(cfg) -> str:
    """Eight hex digits identifying the config's result-relevant keys (the run folder's name)."""
    left_out = NON_RESULT_KEYS | unread_default_nodes(cfg) | closed_set_node(cfg)
    identity = {k: v for k, v in cfg.items() if k not in left_out}
    for node in {key.split(".")[0] for key in (*NON_RESULT_NESTED, *LEFT_OUT_AT)} & set(identity):
        identity[node] = {k: v for k, v in cfg[node].items() if not _left_out_nested(f"{node}.{k}", v)}
    return hashlib.sha1(repr(sorted(_plain(identity).items())).encode()).hexdigest()[:8]


def flatten(node, prefix: str = "") -> dict:
    """{"A.B.C": value} for every leaf of a nested mapping."""
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def identity_keys(config, ignore: tuple[str, ...] = ()) -> dict:
    """The flattened result-relevant keys of a config given as a CfgNode, a dict or a YAML dump (as stored in
    provenance.config); ``ignore`` names further keys to leave out (e.g. RNG_SEED when pooling seeds)."""
    if isinstance(config, str):
        config = yaml.safe_load(config) or {}
    left_out = NON_RESULT_KEYS | unread_default_nodes(config) | closed_set_node(config)
    flat = flatten(dict(config))
    return {k: v for k, v in flat.items()
            if k.split(".")[0] not in left_out and not _left_out_nested(k, v) and k not in ignore}


def differing_keys(configs: list, ignore: tuple[str, ...] = ()) -> list[str]:
    """The result-relevant keys on which the configs do not all agree (a key missing in one counts)."""
    flats = [identity_keys(c, ignore) for c in configs]
    keys = sorted(set().union(*flats)) if flats else []
    missing = object()
    return [k for k in keys if len({repr(f.get(k, missing)) for f in flats}) > 1]


def describe_differences(configs: list, labels: list[str], ignore: tuple[str, ...] = (), limit: int = 12) -> str:
    """'KEY: a=..., b=...' lines for the keys that differ, for error messages."""
    flats = [identity_keys(c, ignore) for c in configs]
    lines = []
    for key in differing_keys(configs, ignore)[:limit]:
        values = ", ".join(f"{label}={f.get(key, '<missing>')!r}" for label, f in zip(labels, flats))
        lines.append(f"  {key}: {values}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ what a run reads

def data_fingerprint(paths, data_dir) -> dict:
    """A cheap identity of the files a task reads: their paths relative to DATA_DIR, sizes and modification times
    (no content is read, so it costs a stat per file). ``content_sha1`` leaves out DATA_DIR and the times (the same
    files copied elsewhere); ``exact_sha1`` covers them too (what resuming requires)."""
    root = Path(data_dir).expanduser().resolve()
    rows = []
    for path in sorted({Path(p).resolve() for p in paths}):
        stat = path.stat()
        rows.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
    content = hashlib.sha1(repr([(name, size) for name, size, _ in rows]).encode()).hexdigest()[:16]
    exact = hashlib.sha1(repr((str(root), rows)).encode()).hexdigest()[:16]
    return {"data_dir": str(root), "files": len(rows), "bytes": sum(size for _, size, _ in rows),
            "content_sha1": content, "exact_sha1": exact}


def file_sha256(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
