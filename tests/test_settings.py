"""Every SETTING produces the stream it claims: order of domains, severities, resets and labels."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import datasets
from conf import ConfigError
from harness.report.text import format_table
from harness.run import evaluate
from harness.settings import GRADUAL_SEVERITIES, SettingError, build_tasks, tasks_to_run
from harness.stream import dirichlet_order, segment_labels, stream_order
from tests.synthetic import tiny_cfg, write_cifar_c

C3 = ["gaussian_noise", "shot_noise", "fog"]


def cfg_for(setting, severities=(5,), **kw):
    return tiny_cfg("conf/cifar10_c/source.yaml", SETTING=setting, CORRUPTION__TYPE=C3,
                    CORRUPTION__SEVERITY=list(severities), **kw)


def plan(tasks):
    return [([(s.domain, s.severity) for s in t.segments], t.reset, t.order, t.correlation) for t in tasks]


def test_reset_each_shift_and_continual_order_and_resets():
    tasks = build_tasks(cfg_for("reset_each_shift", (5, 3)))
    assert [(t.segments[0].domain, t.segments[0].severity, t.reset) for t in tasks] == [
        ("gaussian_noise", 5, True), ("gaussian_noise", 3, False), ("shot_noise", 5, True),
        ("shot_noise", 3, False), ("fog", 5, True), ("fog", 3, False)]
    tasks = build_tasks(cfg_for("continual", (5, 3)))
    assert [t.reset for t in tasks] == [True] + [False] * 5
    assert all(t.order == "sequential" and t.correlation == "none" for t in tasks)


def test_gradual_runs_severities_up_and_down_per_domain_without_reset():
    tasks = build_tasks(cfg_for("gradual"))
    expected = [(d, s) for d in C3 for s in [1, 2, 3, 4, 5, 4, 3, 2, 1]]
    assert GRADUAL_SEVERITIES == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert [(t.segments[0].domain, t.segments[0].severity) for t in tasks] == expected
    assert [t.reset for t in tasks] == [True] + [False] * (len(expected) - 1)
    # several severities given: those, in order
    tasks = build_tasks(cfg_for("gradual", (2, 4)))
    assert [(t.segments[0].domain, t.segments[0].severity) for t in tasks] == [(d, s) for d in C3 for s in (2, 4)]


def test_mixed_domains_is_one_shuffled_stream_per_severity():
    tasks = build_tasks(cfg_for("mixed_domains", (5, 3)))
    assert plan(tasks) == [([(d, 5) for d in C3], True, "shuffled", "none"),
                           ([(d, 3) for d in C3], False, "shuffled", "none")]
    order = stream_order([30, 20, 25], "shuffled", seed=1)
    assert sorted(order) == list(range(75))
    segment_of = np.searchsorted([0, 30, 50, 75], order, side="right") - 1
    # really mixed: the first 25 samples come from more than one domain
    assert len(set(segment_of[:25])) == 3


def test_correlated_settings_and_label_sorted_stream():
    assert plan(build_tasks(cfg_for("correlated")))[1] == ([("shot_noise", 5)], False, "sequential", "label")
    assert [t.reset for t in build_tasks(cfg_for("reset_each_shift_correlated"))] == [True, True, True]
    mixed = build_tasks(cfg_for("mixed_domains_correlated", TEST__DELTA_DIRICHLET=0.1))
    assert (mixed[0].order, mixed[0].correlation, mixed[0].dirichlet_delta) == ("shuffled", "dirichlet", 0.1)
    labels = np.random.default_rng(0).integers(0, 4, 70)
    sizes = [40, 30]
    plain = stream_order(sizes, "sequential", seed=3)
    sorted_order = stream_order(sizes, "sequential", seed=3, labels=labels, correlation="label")
    for lo, hi in ((0, 40), (40, 70)):       # per segment: a permutation of its samples, sorted by label ...
        part = sorted_order[lo:hi]
        assert sorted(part) == list(range(lo, hi))
        assert list(labels[part]) == sorted(labels[part])
        for k in range(4):                   # ... keeping the shuffled order within a class
            assert [i for i in part if labels[i] == k] == [i for i in plain[lo:hi] if labels[i] == k]
    with pytest.raises(ConfigError, match="DELTA_DIRICHLET"):
        build_tasks(cfg_for("correlated", TEST__DELTA_DIRICHLET=-1.0))


def _runs(sequence):
    return 1 + int(np.sum(sequence[1:] != sequence[:-1]))


def test_dirichlet_order_is_a_seeded_class_correlated_permutation():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(5), 60)[rng.permutation(300)]
    a = dirichlet_order(labels, 0.05, np.random.default_rng(1))
    assert sorted(a) == list(range(300))
    assert np.array_equal(a, dirichlet_order(labels, 0.05, np.random.default_rng(1)))
    assert not np.array_equal(a, dirichlet_order(labels, 0.05, np.random.default_rng(2)))
    # C chunks, each class-contiguous: at most C*C label runs, far fewer than an i.i.d. stream (~240)
    assert _runs(labels[a]) <= 25 < _runs(labels)
    # large delta: every class spread over all chunks, so each fifth of the stream holds every class
    b = dirichlet_order(labels, 1000.0, np.random.default_rng(1))
    assert all(len(set(labels[b][k * 60:(k + 1) * 60])) >= 4 for k in range(5))
    with pytest.raises(ValueError, match="at least 10"):
        dirichlet_order(np.arange(4).repeat(5), 0.1, np.random.default_rng(0))


def test_tasks_to_run_backfills_to_the_last_reset():
    tasks = build_tasks(cfg_for("continual"))
    assert tasks_to_run(tasks, {2}) == [0, 1, 2]
    tasks = build_tasks(cfg_for("reset_each_shift", (5, 3)))
    assert tasks_to_run(tasks, {3, 4}) == [2, 3, 4]


class _Folders(datasets.BenchmarkDataset):
    """A domain-generalisation-like data set without severities: 10 CIFAR class names, 3 domains."""
    name = "test_no_severity"
    has_severities = False
    domain_label = "domain"
    domains = ("art", "photo", "sketch")

    def __init__(self):
        from datasets.class_names import CIFAR10_CLASSES
        self.class_names = CIFAR10_CLASSES

    def build_domain(self, cfg, domain, severity):
        assert severity == 0, "severity is not meaningful here"
        return _Tensors(seed=self.domains.index(domain), n=12 + self.domains.index(domain))


class _Tensors(Dataset):
    def __init__(self, seed, n):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g).tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):   # a data set yields PIL images; the harness applies the model's transform
        return Image.fromarray((self.images[i] * 255).round().byte().permute(1, 2, 0).numpy()), self.labels[i]


def _register_no_severity():
    if _Folders.name not in datasets.DATASETS:
        datasets.register_dataset(_Folders)


def test_data_set_without_severities_runs_one_segment_per_domain(tmp_path):
    _register_no_severity()
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", CORRUPTION__DATASET=_Folders.name,
                   CORRUPTION__TYPE=["photo", "sketch"], CORRUPTION__SEVERITY=[3, 5], SAVE_DIR=str(tmp_path),
                   TEST__BATCH_SIZE=5)
    assert plan(build_tasks(cfg)) == [([("photo", 0)], True, "sequential", "none"),
                                      ([("sketch", 0)], True, "sequential", "none")]
    payload = evaluate(cfg, progress=False)
    assert [(r["domain"], r["severity"], r["n"]) for r in payload["records"]] == [("photo", 0, 13), ("sketch", 0, 14)]
    table = format_table(payload["records"], "domain")
    assert table.splitlines()[0].split()[:3] == ["domain", "n", "acc"]      # no severity column
    assert "sev" in format_table(payload["records"], "domain", show_severity=True)
    with pytest.raises(SettingError, match="no severities"):
        build_tasks(tiny_cfg("conf/cifar10_c/source.yaml", CORRUPTION__DATASET=_Folders.name,
                             CORRUPTION__TYPE=["photo"], SETTING="gradual"))


def test_segment_labels_reads_labels_without_images():
    part = _Tensors(seed=0, n=7)
    assert list(segment_labels(part)) == part.labels


def test_mixed_and_correlated_streams_end_to_end_are_the_same_for_every_method(tmp_path, monkeypatch):
    """Source on mixed_domains counts each domain exactly as reset_each_shift does (no adaptation), and the
    correlated stream the harness feeds is identical for two different methods."""
    write_cifar_c(tmp_path, C3, per_severity=20)
    base = dict(DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=C3, TEST__BATCH_SIZE=7)
    separate = evaluate(tiny_cfg("conf/cifar10_c/source.yaml", **base), progress=False)
    mixed = evaluate(tiny_cfg("conf/cifar10_c/source.yaml", SETTING="mixed_domains", **base), progress=False)
    assert [(r["domain"], r["n"], r["correct"]) for r in mixed["records"]] == \
        [(r["domain"], r["n"], r["correct"]) for r in separate["records"]]

    import harness.task_run as run     # where a task's stream is ordered and counted
    seen = []
    original = run.task_stream_order

    def recording(*args, **kwargs):
        order = original(*args, **kwargs)
        seen.append(order.copy())
        return order
    monkeypatch.setattr(run, "task_stream_order", recording)
    first = evaluate(tiny_cfg("conf/cifar10_c/source.yaml", SETTING="correlated", RESUME=False, **base),
                     progress=False)
    labels = np.load(tmp_path / "CIFAR-10-C" / "labels.npy")[80:100]
    assert len(seen) == 3 and all(list(labels[o]) == sorted(labels[o]) for o in seen)   # sorted by label
    streams_source = [o.copy() for o in seen]
    seen.clear()
    evaluate(tiny_cfg("conf/cifar10_c/source.yaml", SETTING="correlated", OPTIM__LR=0.5, RESUME=False,
                      CLIP__PROMPT_TEMPLATE=["a blurry photo of a {}."], **base), progress=False)
    assert len(seen) == 3 and all(np.array_equal(a, b) for a, b in zip(seen, streams_source))
    assert [r["n"] for r in first["records"]] == [20, 20, 20]


def test_stata_online_sampler_spreads_classes_over_consecutive_slots():
    from harness.stream import stata_online_order, stream_order
    labels = np.repeat(np.arange(10), 30)                       # 300 samples, 10 classes
    order = stata_online_order(labels, 0.1, batch_size=50, rng=np.random.default_rng(0))
    assert sorted(order) == list(range(300))                    # a permutation
    assert np.array_equal(order, stata_online_order(labels, 0.1, 50, np.random.default_rng(0)))
    # min(300 // 50, 10) = 6 slots; with small gamma most of each class lands in one slot, so batches hold fewer
    # classes than an i.i.d. stream's (a batch of 50 from 10 balanced classes holds ~all 10); large gamma ~ i.i.d.
    def classes_per_batch(gamma):
        o = stata_online_order(labels, gamma, 50, np.random.default_rng(0))
        return np.mean([len(set(labels[o[i:i + 50]])) for i in range(0, 300, 50)])
    assert classes_per_batch(0.01) < classes_per_batch(0.1) < 9 < classes_per_batch(1000.0)
    # one slot when batches are as large as the set: plain shuffle
    single = stata_online_order(labels, 0.1, batch_size=300, rng=np.random.default_rng(0))
    assert sorted(single) == list(range(300))
    with pytest.raises(ValueError, match="gamma"):
        stata_online_order(labels, 0.0, 50, np.random.default_rng(0))
    # selected through the stream for a "stata" task, independent of anything but seed and batch size
    a = stream_order([300], "sequential", seed=4, labels=labels, correlation="stata", dirichlet_delta=0.1,
                     batch_size=50)
    assert np.array_equal(a, stream_order([300], "sequential", seed=4, labels=labels, correlation="stata",
                                          dirichlet_delta=0.1, batch_size=50))
    assert np.mean([len(set(labels[a[i:i + 50]])) for i in range(0, 300, 50)]) < 9


def test_correlation_sampler_key_selects_the_task_correlation():
    from harness.settings import build_tasks
    cfg = tiny_cfg("conf/cifar10_c/stata.yaml")
    assert {t.correlation for t in build_tasks(cfg)} == {"stata"}
    cfg = tiny_cfg("conf/cifar10_c/stata.yaml", TEST__CORRELATION_SAMPLER="anchor")
    assert {t.correlation for t in build_tasks(cfg)} == {"dirichlet"}
    assert {t.correlation for t in build_tasks(tiny_cfg("conf/cifar10_c/stata_gamma_m1.yaml"))} == {"label"}
