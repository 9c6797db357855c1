"""Reported accuracies (%) shown beside measured ones: the BATCLIP paper's tables, and the numbers the papers of
the methods added after it report on data sets this suite reads (harness/report/paper_results/*.csv), in this
suite's names for data sets, methods and domains.

All renaming of the BATCLIP tables lives in the four tables below: edit them when a name on our side changes. The
other papers' table (METHOD_PAPERS_TABLE) is written in our names already, one accuracy per line, with the paper
and table it was read from."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from conf.compose import METHODS_DIR, method_config
from conf.schema import decode_value
from harness.identity import flatten

PAPER_DIR = Path(__file__).resolve().parent / "paper_results"
MAIN_TABLE = PAPER_DIR / "batclip_paper_main_table.csv"
DG_TABLE = PAPER_DIR / "batclip_paper_dg_table.csv"
# Columns: dataset, domain, severity, method (ours), paper_method (as printed), accuracy, source (paper and table).
# Domain "mean": the paper prints only the mean over the data set's standard domains (the 15 corruptions of the
# BATCLIP tables, at severity 5), no per-domain number.
METHOD_PAPERS_TABLE = PAPER_DIR / "method_papers.csv"
BATCLIP_PAPER = "BATCLIP (ICCV 2025)"

# Paper data set -> CORRUPTION.DATASET.
DATASETS = {
    "CIFAR-10C": "cifar10_c",
    "CIFAR-100C": "cifar100_c",
    "ImageNet-C": "imagenet_c",
    "OfficeHome": "office_home",
    "PACS": "pacs",
    "VLCS": "vlcs",
    "TerraIncognita": "terra_incognita",
}

# Paper method -> registered method name (MODEL.ADAPTATION) or, for a method the paper runs in two
# configurations, the name of our config for that configuration (conf/<dataset>/<name>.yaml).
METHODS = {
    "ZS": "source",
    "TENT": "tent",
    "RoTTA": "rotta",
    "RPL": "rpl",
    "SAR": "sar",
    "TPT": "tpt",
    "VTE": "vte",
    "WATT-P*": "watt_p",
    "WATT-S*": "watt_s",
    "StatA (γ=0.1)": "stata",
    "StatA (γ=-1)": "stata_gamma_m1",
    "BATCLIP": "batclip",
}

# Main-table column -> corruption (CORRUPTION.TYPE).
CORRUPTION_COLUMNS = {
    "gaussian": "gaussian_noise", "shot": "shot_noise", "impulse": "impulse_noise",
    "defocus": "defocus_blur", "glass": "glass_blur", "motion": "motion_blur", "zoom": "zoom_blur",
    "snow": "snow", "frost": "frost", "fog": "fog", "brightness": "brightness", "contrast": "contrast",
    "elastic": "elastic_transform", "pixelate": "pixelate", "jpeg": "jpeg_compression",
}

# (paper data set, paper domain) -> domain folder name in the DomainBed layout (CORRUPTION.TYPE).
DG_DOMAINS = {
    ("OfficeHome", "Art"): "Art",
    ("OfficeHome", "Clipart"): "Clipart",
    ("OfficeHome", "Product"): "Product",
    ("OfficeHome", "Real World"): "Real World",
    ("PACS", "Art"): "art_painting",
    ("PACS", "Cartoon"): "cartoon",
    ("PACS", "Photo"): "photo",
    ("PACS", "Sketch"): "sketch",
    ("VLCS", "Caltech101"): "Caltech101",
    ("VLCS", "LabelMe"): "LabelMe",
    ("VLCS", "SUN09"): "SUN09",
    ("VLCS", "VOC2007"): "VOC2007",
    ("TerraIncognita", "L38"): "location_38",
    ("TerraIncognita", "L43"): "location_43",
    ("TerraIncognita", "L46"): "location_46",
    ("TerraIncognita", "L100"): "location_100",
}

# What the paper's numbers were measured with (batclip.md: ViT-B/16, OpenAI weights, reset_each_shift, severity 5
# for the corruption benchmarks; one task per domain for domain generalisation).
PROTOCOL = {"arch": "ViT-B-16", "weights": "openai", "setting": "reset_each_shift", "severity": 5}
DG_PROTOCOL = {"arch": "ViT-B-16", "weights": "openai", "setting": "reset_each_shift", "severity": 0}


@dataclass
class PaperRow:
    dataset: str                      # our data set name
    method: str                       # our method / config name
    paper_method: str                 # as printed in the paper
    accuracy: dict[str, float]        # our domain name -> accuracy %
    reported_mean: float | None       # the paper's printed mean (None where the table prints none)
    venue: str = ""
    protocol: dict = field(default_factory=dict)
    source: str = BATCLIP_PAPER        # the paper (and table) the numbers are read from
    # For a paper that prints only a mean (no per-domain cells): the domains that mean is over.
    mean_over: tuple = ()

    def mean_of(self, domains) -> float:
        return sum(self.accuracy[d] for d in domains) / len(domains)


class PaperMappingError(KeyError):
    pass


def _lookup(table: dict, key, what: str):
    if key not in table:
        raise PaperMappingError(f"the paper's {what} {key!r} has no entry in harness/paper.py; add it there")
    return table[key]


@lru_cache(maxsize=1)
def paper_rows() -> tuple[PaperRow, ...]:
    """Every row of both CSV tables, in file order."""
    rows = []
    with MAIN_TABLE.open(newline="", encoding="utf-8") as f:
        for line in csv.DictReader(f):
            accuracy = {_lookup(CORRUPTION_COLUMNS, col, "column"): float(line[col]) for col in CORRUPTION_COLUMNS}
            extra = set(line) - set(CORRUPTION_COLUMNS) - {"dataset", "method", "venue", "mean"}
            if extra:
                raise PaperMappingError(f"{MAIN_TABLE}: columns {sorted(extra)} have no entry in CORRUPTION_COLUMNS")
            rows.append(PaperRow(_lookup(DATASETS, line["dataset"], "data set"),
                                 _lookup(METHODS, line["method"], "method"), line["method"], accuracy,
                                 float(line["mean"]), line["venue"], dict(PROTOCOL)))
    with DG_TABLE.open(newline="", encoding="utf-8") as f:
        by_key: dict[tuple[str, str], PaperRow] = {}
        for line in csv.DictReader(f):
            dataset = _lookup(DATASETS, line["dataset"], "data set")
            domain = _lookup(DG_DOMAINS, (line["dataset"], line["domain"]), "domain")
            for paper_method in line:
                if paper_method in ("dataset", "domain"):
                    continue
                method = _lookup(METHODS, paper_method, "method")
                row = by_key.get((dataset, method))
                if row is None:
                    row = by_key[(dataset, method)] = PaperRow(dataset, method, paper_method, {}, None, "",
                                                               dict(DG_PROTOCOL))
                    rows.append(row)
                row.accuracy[domain] = float(line[paper_method])
    rows += _method_paper_rows()
    return tuple(rows)


def _method_paper_rows() -> list[PaperRow]:
    """The rows of METHOD_PAPERS_TABLE: one per (data set, method, source), protocol ViT-B/16 with OpenAI weights
    (the only backbone recorded there), one task per domain at the line's severity."""
    import datasets    # the data sets' domains check the table's names (deferred: reporting never needs them)
    by_key: dict[tuple[str, str, str], PaperRow] = {}
    with METHOD_PAPERS_TABLE.open(newline="", encoding="utf-8") as f:
        for number, line in enumerate(csv.DictReader(f), start=2):
            where = f"{METHOD_PAPERS_TABLE.name} line {number}"
            dataset = datasets.get_dataset(line["dataset"])
            if line["domain"] != "mean" or not dataset.has_severities:
                dataset.check_domain(line["domain"])
            severity = int(line["severity"])
            if severity != (5 if dataset.has_severities else 0):
                raise PaperMappingError(f"{where}: severity {severity} for {dataset.name}")
            key = (dataset.name, line["method"], line["source"])
            other = [k for k in by_key if k[:2] == key[:2] and k != key]
            if other:    # one reference per method and data set: the method's own paper
                raise PaperMappingError(f"{where}: {key[:2]} is already read from {other[0][2]}")
            row = by_key.get(key)
            if row is None:
                row = by_key[key] = PaperRow(dataset.name, line["method"], line["paper_method"], {}, None, "",
                                             dict(PROTOCOL, severity=severity), line["source"])
            if line["domain"] in row.accuracy or (line["domain"] == "mean" and row.reported_mean is not None):
                raise PaperMappingError(f"{where}: a second accuracy for {key} on {line['domain']}")
            if line["domain"] == "mean":
                row.reported_mean = float(line["accuracy"])
                row.mean_over = tuple(CORRUPTION_COLUMNS.values())
            else:
                row.accuracy[line["domain"]] = float(line["accuracy"])
            if row.reported_mean is not None and row.accuracy:
                raise PaperMappingError(f"{where}: {key} has both per-domain numbers and a mean-only line")
    return list(by_key.values())


def paper_row(dataset: str, method: str) -> PaperRow | None:
    """The paper's row for our data set and method (or config) name, or None if the paper has none."""
    for row in paper_rows():
        if row.dataset == dataset and row.method == method:
            return row
    return None


def paper_row_for_run(dataset: str, method: str, config) -> PaperRow | None:
    """The paper's row for a run of the registered method ``method`` (MODEL.ADAPTATION) with ``config`` (its
    config as a mapping, a CfgNode or a YAML dump). Where the paper reports that method in several configurations
    (StatA with gamma 0.1 and -1), the row whose shipped config (conf/methods/<name>.yaml) the run agrees with on
    every key that tells those configurations apart, if exactly one does; else None (a run of neither)."""
    config = yaml.safe_load(config) if isinstance(config, str) else config
    if ((config or {}).get("OPEN_SET") or {}).get("OOD_DATASET"):
        return None     # the paper's rows are closed-set runs: an open-set run's accuracy is another experiment
    candidates = [row for row in paper_rows() if row.dataset == dataset and _registered_name(row.method) == method]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    run = flatten(dict(config))
    shipped = {row.method: _shipped_keys(row.method, dataset) for row in candidates}
    telling = {key for keys in shipped.values() for key in keys
               if len({repr(other.get(key, "<unset>")) for other in shipped.values()}) > 1}
    agreeing = [row for row in candidates
                if all(run.get(key) == value for key, value in shipped[row.method].items() if key in telling)]
    return agreeing[0] if len(agreeing) == 1 else None


def _registered_name(name: str) -> str:
    """MODEL.ADAPTATION of a paper row's method: the name itself, or that of the shipped config it names."""
    if not (METHODS_DIR / f"{name}.yaml").is_file():
        return name
    keys, _ = method_config(METHODS_DIR / f"{name}.yaml")
    return (keys.get("MODEL") or {}).get("ADAPTATION", name)


def _shipped_keys(name: str, dataset: str) -> dict:
    keys, per_dataset = method_config(METHODS_DIR / f"{name}.yaml")
    flat = flatten(keys)
    flat.update(flatten(per_dataset.get(dataset) or {}))
    flat.pop("MODEL.ADAPTATION", None)
    return {k: decode_value(v) for k, v in flat.items()}


def paper_methods(dataset: str, source: str = BATCLIP_PAPER) -> list[str]:
    """The methods (or configs) a paper reports on ``dataset``; default: BATCLIP's paper."""
    return [row.method for row in paper_rows() if row.dataset == dataset and row.source == source]


def protocol_mismatch(row: PaperRow, arch: str, weights: str, setting: str) -> list[str]:
    """Human-readable differences between a run and the paper's protocol (empty if none)."""
    notes = []
    if arch != row.protocol["arch"]:
        notes.append(f"arch {arch} (paper: {row.protocol['arch']})")
    if str(weights) != row.protocol["weights"]:
        notes.append(f"weights {weights} (paper: {row.protocol['weights']})")
    if setting != row.protocol["setting"]:
        notes.append(f"setting {setting} (paper: {row.protocol['setting']})")
    return notes


def comparable_mean(row: PaperRow | None, records: list[dict]) -> float | None:
    """A mean-only paper row's mean, where the records are exactly one per domain it is over, at the paper's
    severity; else None."""
    if row is None or row.accuracy or not row.mean_over:
        return None
    domains = [r["domain"] for r in records if int(r["severity"]) == row.protocol["severity"]]
    if sorted(domains) != sorted(row.mean_over) or len(domains) != len(records):
        return None
    return row.reported_mean


def comparable_reference(row: PaperRow | None, records: list[dict]) -> dict | None:
    """{domain: paper accuracy %} for the records it can be compared with: one record per domain, at the paper's
    severity. None when nothing is comparable."""
    if row is None:
        return None
    counts: dict[str, int] = {}
    for r in records:
        counts[r["domain"]] = counts.get(r["domain"], 0) + 1
    reference = {r["domain"]: row.accuracy[r["domain"]] for r in records
                 if r["domain"] in row.accuracy and int(r["severity"]) == row.protocol["severity"]
                 and counts[r["domain"]] == 1}
    return reference or None
