"""Every shipped config, run on the tiny CLIP and a synthetic copy of every data-set layout, gives the per-domain
correct counts, predictions and logits recorded in tests/data/golden_runs.json (tests/golden.py).

The records were written by this suite before the one-way redesign (issue 11); a refactor that changes any of
these numbers is a regression. They hold on any x86-64 CPU: counts and predictions exactly, except a prediction
that was a near-tie when recorded (tests.golden.TIE_GAP), and the logit sums to tests.golden.LOGIT_SUM_RTOL,
a tolerance chosen from the differences measured between CPU code paths (`python -m tests.golden --cpu-paths`).
A deliberate change of results is recorded with `python -m tests.golden --write NAME ...` (and says why in its
commit)."""
import json

import pytest

from tests.golden import GOLDEN, mismatches, run_golden, shipped_configs
from tests.synthetic import write_all_layouts

CONFIGS = shipped_configs()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_all_layouts(tmp_path_factory.mktemp("layouts"))


def test_golden_file_covers_every_shipped_config():
    missing = sorted(set(CONFIGS) - set(json.loads(GOLDEN.read_text())))
    extra = sorted(set(json.loads(GOLDEN.read_text())) - set(CONFIGS))
    assert not missing, f"no golden run for {missing}: record them with `python -m tests.golden --write {' '.join(missing)}`"
    assert not extra, f"golden runs of configs no longer shipped: {extra}: `python -m tests.golden --write` drops them"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_reproduces_its_golden_run(name, data_dir, tmp_path):
    entry, payload = run_golden(name, data_dir, tmp_path)
    assert payload["provenance"]["method_precision"]["weights"] == ["float32"]   # recorded with the results
    expected = json.loads(GOLDEN.read_text())[name]
    assert not mismatches(entry, expected), "; ".join(mismatches(entry, expected))


def test_a_changed_result_is_caught():
    """The comparison fails on a changed decisive prediction, a moved count, an image more or less, and a batch
    sum beyond its tolerance; it lets a near-tie flip, and a difference within the measured spread, through."""
    expected = {"records": [["fog", 5, 4, 2]], "predictions": [1, 2, 3, 4], "relative_gaps": [0.3, 5e-6, 0.2, 0.4],
                "batch_sums": [[100.0, 200.0], [-50.0, 300.0]], "cpu_path_spread": [0.0, 1e-3]}
    assert mismatches(expected, expected) == []
    near_tie = {**expected, "predictions": [1, 7, 3, 4], "records": [["fog", 5, 4, 1]],
                "batch_sums": [[100.0 + 1e-4, 200.0], [-50.0 + 2.9, 300.0]]}   # within 1e-6 x 200 and 10 x 1e-3 x 300
    assert mismatches(near_tie, expected) == []
    assert mismatches({**expected, "predictions": [9, 2, 3, 4]}, expected)
    assert mismatches({**expected, "records": [["fog", 5, 4, 3]]}, expected)
    assert mismatches({**expected, "records": [["fog", 5, 5, 2]]}, expected)
    assert mismatches({**expected, "batch_sums": [[100.0 + 1e-3, 200.0], [-50.0, 300.0]]}, expected)   # floor 1e-6
    assert mismatches({**expected, "batch_sums": [[100.0, 200.0], [-50.0, 303.1]]}, expected)           # 10 x spread
