"""The commands that only read files (--help, a grid's status and report, a table of existing results) import
neither torch nor the model libraries: each runs here in a fresh process under ``python -X importtime``, whose
list of imports must hold none of them. (scripts/bench_startup.py times them; tests never time.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.results import make_record, summarise
from tests.grid_support import write_grid
from tests.synthetic import tiny_cfg

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "torchvision", "open_clip", "timm"}


def imported(argv: list[str]) -> set[str]:
    """The top-level packages a command imports (its exit status 0 or 1: status exits 1 for failed jobs)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-3000:]
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny grid (its jobs pending), and a results.json of a TENT run with two method nodes set (the report
    reads every method's declarations to find the run's identity)."""
    tmp = tmp_path_factory.mktemp("startup")
    grid = write_grid(tmp, extra=f"  DATA_DIR: {tmp / 'data'}\n  SAVE_DIR: {tmp / 'out'}\n")
    cfg = tiny_cfg("conf/cifar10_c/tent.yaml", RNG_SEED=1, CORRUPTION__TYPE=["fog"])
    records = [make_record("fog", 5, 16, 9)]
    payload = {"method": "tent", "dataset": "cifar10_c", "setting": cfg.SETTING, "domain_label": "corruption",
               "complete": True, "records": records, "summary": summarise(records),
               "provenance": {"config": cfg.dump(), "config_hash": "x", "save_dir": str(tmp / "results")}}
    (tmp / "results").mkdir()
    (tmp / "results" / "results.json").write_text(json.dumps(payload))
    return {"grid": grid, "results": tmp / "results"}


@pytest.mark.parametrize("command", ["test_time.py --help", "scripts/compare.py --help", "scripts/grid.py --help",
                                     "scripts/grid.py status GRID", "scripts/grid.py report GRID --figure none",
                                     "scripts/compare.py --results RESULTS --figure none --no-paper"])
def test_commands_that_only_read_files_import_no_torch(command, files):
    argv = [str(files["grid"]) if a == "GRID" else str(files["results"]) if a == "RESULTS" else a
            for a in command.split()]
    found = imported(argv)
    assert "yaml" in found                   # the import list was read
    assert not found & HEAVY, f"{command} imports {sorted(found & HEAVY)}"


def _described(tree: dict) -> dict:
    """A declaration tree with each Option as its fields (a ``valid`` function by whether there is one)."""
    from conf.options import Option
    return {k: _described(v) if isinstance(v, dict) else
            ("Option", v.default, v.choices, v.within, v.valid is None, v.expected) if isinstance(v, Option) else v
            for k, v in tree.items()}


def test_declarations_read_from_the_sources_are_the_registered_ones():
    import methods
    from methods.declarations import _static_declarations
    static, real = _static_declarations(), methods.METHODS
    assert static is not None, "a built-in method's declarations could not be read from its source"
    builtin = [n for n, cls in real.items() if cls.__module__.startswith("methods.")]
    assert sorted(static.names()) == sorted(builtin)
    assert static.aliases() == {a: n for a, n in real.aliases().items() if n in builtin}
    for name in builtin:
        assert _described(methods.own_nodes(static.get(name))) == _described(methods.own_nodes(real.get(name))), name
        assert [c.__module__ for c in static.get(name).__mro__ if c is not object] == \
            [c.__module__ for c in real.get(name).__mro__ if c.__module__.startswith("methods.")], name
    assert _described(methods.registry.nodes_declared_by([c for _, c in static.items()])) == \
        _described(methods.registry.nodes_declared_by([c for n, c in real.items() if n in builtin]))


def test_a_grid_s_jobs_are_the_same_without_torch(files):
    import methods
    from harness import grid as grids
    methods.load_builtin_methods()          # here the configs are read with the registered classes
    expected = [job.id for job in grids.load_grid(files["grid"]).jobs]
    done = subprocess.run([sys.executable, "scripts/grid.py", "status", str(files["grid"])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    listed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("pending")]
    assert listed == expected and len(expected) == 4
