"""What the grid tests share: a small Shapes-C in its real layout, a TENT that can be told to stop and wait
(so that a test can kill or pre-empt a job in the middle of a task), the tiny grid with those, running
scripts/grid.py, and the records a grid's run folders hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conf.compose import composed_layers
from tests.synthetic import without_cost, write_cifar_c

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ["gaussian_noise", "fog"]
IMAGES, BATCH = 16, 8          # two batches per job

# TENT that, while the file PAUSE exists, makes the first job to reach a batch write its pid to PAUSED and wait
# there (once: the O_EXCL creation of PAUSED decides which job) until it is killed or signalled.
PAUSABLE_TENT = '''
import os
import time

from methods.registry import register_method
from methods.tent import Tent

# Beside this file: the same code in every test's folder (one process may import it from several folders).
PAUSE, PAUSED = (os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("PAUSE", "PAUSED"))


@register_method("pausable_tent")
class PausableTent(Tent):
    def forward_and_adapt(self, x):
        if os.path.exists(PAUSE):
            try:
                handle = os.open(PAUSED, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                handle = None
            if handle is not None:
                os.write(handle, str(os.getpid()).encode())
                os.close(handle)
                while os.path.exists(PAUSE):
                    time.sleep(0.1)
        return super().forward_and_adapt(x)
'''


def write_shapes(data_dir: Path) -> Path:
    write_cifar_c(Path(data_dir), DOMAINS, per_severity=IMAGES, num_classes=10, folder="Shapes-C", seed=0)
    return Path(data_dir)


def write_grid(folder: Path, name: str = "tiny_test", pausable: bool = False, extra: str = "") -> Path:
    """The tiny grid (shapes_c, source and TENT, two corruptions); with ``pausable`` its TENT is PausableTent, from
    a config file of its own (the grid's methods may be config files). Files in ``folder``; returns the grid file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    methods = "[source, tent]"
    if pausable:
        plugin = folder / "pausable_tent.py"
        plugin.write_text(PAUSABLE_TENT)
        # TENT's composed keys only (a dump of a loaded config would also hold the nodes of methods other tests
        # registered in this process, unknown to the grid's own processes)
        keys: dict = {}
        for _, layer in composed_layers("shapes_c", "tent"):
            _merge_into(keys, layer)
        _merge_into(keys, {"MODEL": {"ADAPTATION": "pausable_tent", "EXTRA_MODULES": [str(plugin)]}})
        (folder / "pausable_tent.yaml").write_text(yaml.safe_dump(keys))
        methods = f"[source, {folder / 'pausable_tent.yaml'}]"
    path = folder / f"{name}.yaml"
    path.write_text(f"""name: {name}
datasets: [shapes_c]
methods: {methods}
seeds: [1]
settings: [reset_each_shift]
overrides:
  CORRUPTION.TYPE: {DOMAINS}
  CORRUPTION.NUM_EX: {IMAGES}
  TEST.BATCH_SIZE: {BATCH}
  TEST.NUM_WORKERS: 0
  DEVICE: cpu
{extra}""")
    return path


def _merge_into(target: dict, layer: dict) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def grid_command(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """scripts/grid.py in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "grid.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def task_records(save_dir: Path) -> dict:
    """{(method, task file): its records} of every run below SAVE_DIR (one config per method in these grids; the
    config hashes of two grids differ by the plug-in's path; wall times and the records' cost are left out)."""
    found = {}
    for path in sorted(Path(save_dir).rglob("tasks/task_*.json")):
        stored = json.loads(path.read_text())
        run = path.parent.parent
        found[(run.parent.name, path.name)] = without_cost(stored["records"])
    return found


def same_records(found: dict, expected: dict) -> bool:
    """Two task_records() results agree: the same tasks, counts and bins exactly, the calibration floats to a
    relative 1e-5 (jobs run with other CPU thread counts than the reference, which moves float32 logits' last
    bits)."""
    def close(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        if isinstance(a, float) and isinstance(b, float):
            return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-12)
        return a == b
    return close(found, expected)


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    """Poll condition until it returns a true value (returned) or fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
