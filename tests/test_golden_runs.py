"""Every shipped config, run on the tiny CLIP and a synthetic copy of every data-set layout, gives the per-domain
correct counts, predictions and logits of the golden run in its record (tests/data/records/; tests/golden.py).

The records were written by this suite before the one-way redesign (issue 11); a refactor that changes any of
these numbers is a regression. They hold on any x86-64 CPU: counts and predictions exactly, except a prediction
that was a near-tie when recorded (tests.golden.TIE_GAP), and the logit sums to tests.golden.LOGIT_SUM_RTOL,
a tolerance chosen from the differences measured between CPU code paths (`python -m tests.golden --cpu-paths`).
A deliberate change of results is recorded with `python -m tests.record NAME ...` (and says why in its commit)."""
import pytest

from tests.golden import mismatches, run_golden, shipped_configs
from tests.record import read_record, recorded_names
from tests.synthetic import write_all_layouts

CONFIGS = shipped_configs()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_all_layouts(tmp_path_factory.mktemp("layouts"))


def test_every_shipped_config_has_a_record():
    missing = sorted(set(CONFIGS) - set(recorded_names()))
    stale = sorted(set(recorded_names()) - set(CONFIGS))
    assert not missing, f"no record of {missing}: write them with `python -m tests.record {' '.join(missing)}`"
    assert not stale, f"records of configs no longer shipped: {stale}: delete them with `python -m tests.record --prune`"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_reproduces_its_golden_run(name, data_dir, tmp_path):
    entry, payload = run_golden(name, data_dir, tmp_path)
    assert payload["provenance"]["method_precision"]["weights"] == ["float32"]   # recorded with the results
    expected = read_record(name)["golden_run"]
    assert not mismatches(entry, expected), (f"{'; '.join(mismatches(entry, expected))}. If the change of results is "
                                             f"meant: `python -m tests.record {name}`, and say why in the commit")


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
