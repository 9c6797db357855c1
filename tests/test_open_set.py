"""Open-set streams (harness/open_set.py): the metrics against hand-computed values, scikit-learn and a transcription
of CLIPTTA's lib/ood_metrics.py; the stream's composition (every ID image once, in its order; the OOD share, the
mixes, CLIPTTA's per-batch protocol); the OOD flags kept from the method; the refusals; the records and tables; and
an open-set run of every registered method on the tiny CLIP."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from datasets.ood_sets import OOD_SETS, OodSet
from harness import open_set
from harness.build import build_plan, read_config
from harness.report import CompareError, build_table, to_markdown
from harness.run import evaluate
from harness.identity import config_hash
from tests.golden import shipped_configs
from tests.synthetic import small_run_overrides, tiny_cfg, write_all_layouts, write_source_sets

skm = pytest.importorskip("sklearn.metrics")     # a test dependency (pyproject's test extra)


# ------------------------------------------------------------------------------------------------ metrics

def test_metrics_equal_the_hand_computed_values():
    ids, ood, correct = np.array([0.9, 0.8, 0.4]), np.array([0.7, 0.4, 0.1]), np.array([True, False, True])
    # pairs with s_id > s_ood: 3 + 3 + 1, one tie (0.4, 0.4) counts half
    assert open_set.auroc(ids, ood) == pytest.approx(7.5 / 9, abs=1e-15)
    # ROC: (0, 1/3) (0, 2/3) (1/3, 2/3) (2/3, 1) (1, 1): TPR 0.95 between the third and fourth point
    assert open_set.fpr_at_tpr(ids, ood) == pytest.approx(1 / 3 + (0.95 - 2 / 3), abs=1e-15)
    # precision at the thresholds where recall grows: 1, 1, 3/5
    assert open_set.average_precision(ids, ood) == pytest.approx((1 + 1 + 0.6) / 3, abs=1e-15)
    # (FPR, CCR above t): (0, 0) (0, 1/3) (1/3, 1/3) (2/3, 1/3) (1, 2/3) (1, 1): areas 1/9 + 1/9 + 1/6
    assert open_set.oscr(ids, ood, correct) == pytest.approx(7 / 18, abs=1e-15)
    assert open_set.fpr_at_tpr(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 0.0   # separable: no false positive


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_aupr_equal_scikit_learn_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    ids, ood = rng.normal(1.0, 1.0, 40 + seed), rng.normal(0.0, 1.0, 30)
    if seed % 2:        # ties within and across the two sets
        ids, ood = np.round(ids, 1), np.round(ood, 1)
    labels = np.r_[np.ones(len(ids)), np.zeros(len(ood))]
    scores = np.r_[ids, ood]
    assert open_set.auroc(ids, ood) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert open_set.average_precision(ids, ood) == pytest.approx(skm.average_precision_score(labels, scores),
                                                                 abs=1e-12)
    # AUPR-out: the OOD images positive, ranked by the negated score
    assert open_set.ood_metrics(ids, ood, np.ones(len(ids), bool))["aupr_out"] == pytest.approx(
        skm.average_precision_score(1 - labels, -scores), abs=1e-12)


def cliptta_fpr(ids, ood) -> float:
    """CLIPTTA's lib/ood_metrics.py get_fpr, transcribed: scipy's interp1d of sklearn's roc_curve at TPR 0.95."""
    from scipy import interpolate
    fpr, tpr, _ = skm.roc_curve([1] * len(ids) + [0] * len(ood), np.concatenate((ids, ood)))
    return float(interpolate.interp1d(tpr, fpr)(0.95))


def cliptta_oscr(ids, ood, pred, labels, strictly_above: bool = True) -> float:
    """CLIPTTA's get_oscr, transcribed (its loop: CCR counts ID scores > t, FPR OOD scores >= t, trapezoids over the
    points sorted in reverse, the last segment left out)."""
    score = np.concatenate((ids, ood))
    fpr, ccr = [0.0], [0.0]
    for t in -np.sort(-score):
        fpr.append((ood >= t).sum() / len(ood))
        above = ids > t if strictly_above else ids >= t
        ccr.append((above & (pred == labels)).sum() / len(ids))
    fpr.append(1.0)
    ccr.append(1.0)
    roc = sorted(zip(fpr, ccr), reverse=True)
    return sum((roc[i][0] - roc[i + 1][0]) * (roc[i][1] + roc[i + 1][1]) / 2.0 for i in range(len(score)))


@pytest.mark.parametrize("seed", range(6))
def test_fpr95_equals_cliptta_get_fpr(seed):
    rng = np.random.default_rng(100 + seed)
    ids, ood = rng.normal(1.0, 1.0, 57), rng.normal(0.0, 1.0, 41)
    if seed % 2:
        ids, ood = np.round(ids, 1), np.round(ood, 1)
    assert open_set.fpr_at_tpr(ids, ood) == pytest.approx(cliptta_fpr(ids, ood), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_oscr_equals_cliptta_get_oscr_with_and_without_ties(seed):
    rng = np.random.default_rng(200 + seed)
    ids, ood = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 35)
    if seed % 2:
        ids, ood = np.round(ids, 1), np.round(ood, 1)
    labels = rng.integers(0, 5, len(ids))
    pred = np.where(rng.random(len(ids)) < 0.7, labels, (labels + 1) % 5)
    ours = open_set.oscr(ids, ood, pred == labels)
    assert ours == pytest.approx(cliptta_oscr(ids, ood, pred, labels), abs=1e-12)
    # the comparison sees a changed rule: counting the wrong predictions too, or the ID images at t, moves it
    assert abs(open_set.oscr(ids, ood, np.ones(len(ids), bool)) - ours) > 1e-3
    assert abs(cliptta_oscr(ids, ood, pred, labels, strictly_above=False) - ours) > 1e-3


def test_metrics_of_an_empty_side_are_nan():
    fields = open_set.ood_metrics(np.array([0.5]), np.zeros(0), np.array([True]))
    assert fields["n_ood"] == 0 and all(np.isnan(fields[k]) for k in ("auroc", "fpr95", "aupr_in", "aupr_out", "oscr"))


def test_declared_scores_are_msp_max_logit_and_energy_of_the_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.4]])
    cfg = tiny_cfg(OPEN_SET__OOD_DATASET="cifar100_c", OPEN_SET__SCORE_TEMPERATURE=2.0)
    for score, expected in (("msp", (logits / 2).softmax(1).max(1).values),
                            ("max_logit", (logits / 2).max(1).values),
                            ("energy", 2 * torch.logsumexp(logits / 2, 1))):
        cfg.defrost()
        cfg.OPEN_SET.SCORE = score
        assert torch.allclose(open_set.declared_scores(logits, cfg, None), expected.double(), atol=1e-7)


# ------------------------------------------------------------------------------------------------ the stream

def _batches(mix, ratio=1.0, batch_size=4, sizes=(10, 6), ood_sizes=(7, 50), burst=3, seed=0):
    cfg = tiny_cfg(OPEN_SET__OOD_DATASET="cifar100_c", OPEN_SET__MIX=mix, OPEN_SET__RATIO=ratio,
                   OPEN_SET__BURST_LENGTH=burst, TEST__BATCH_SIZE=batch_size)
    offsets = np.cumsum([0, *sizes])      # a sequential task: each segment's images in a run of their own
    rng = np.random.default_rng(seed)
    id_order = np.concatenate([offsets[k] + rng.permutation(n) for k, n in enumerate(sizes)])
    id_segment = np.searchsorted(offsets, id_order, side="right") - 1
    runs = [np.flatnonzero(id_segment == k) for k in range(len(sizes))]
    batches, rows = open_set.open_set_batches(cfg, id_order, id_segment, runs, list(ood_sizes), [seed, 1])
    return batches, rows, id_order, sum(sizes)


@pytest.mark.parametrize("mix", ["uniform", "bursts", "per_batch"])
def test_every_id_image_comes_once_in_its_order_with_the_declared_share_of_ood_images(mix):
    batches, rows, id_order, n_id = _batches(mix)
    flat = [i for b in batches for i in b]
    assert [i for i in flat if i < n_id] == list(id_order)
    ood = [i for i in flat if i >= n_id]
    assert len(ood) == len(set(ood)) == sum(len(r) for r in rows)
    if mix == "per_batch":          # CLIPTTA: batch_size ID images, then round(RATIO * batch_size) OOD images
        assert [len(r) for r in rows] == [3 * 4, 2 * 4]            # 3 batches of segment 0 (10 images), 2 of 1
        for batch in batches:
            assert [i < n_id for i in batch] == [True] * (len(batch) - 4) + [False] * 4
    else:
        assert [len(r) for r in rows] == [10, 6]                  # RATIO 1 per segment
        assert all(len(b) == 4 for b in batches[:-1])
    assert all(0 <= r < size for rows_k, size in zip(rows, (7, 50)) for r in rows_k)
    again, _, _, _ = _batches(mix)
    assert again == batches                                       # seeded: the same stream for every method


def test_per_batch_ood_batches_follow_one_another_through_a_permutation():
    """Segment 1's 6 ID images make 2 batches of 4 ID + 4 OOD images from a companion of 8: one permutation."""
    batches, rows, _, n_id = _batches("per_batch", ood_sizes=(7, 8))
    assert sorted(rows[1].tolist()) == list(range(8))
    # segment 0: 3 batches of 4 from 7 images: the first from one permutation, then a new one for each
    check = np.random.default_rng([0, 1, 0])
    first, second, third = check.permutation(7), check.permutation(7), check.permutation(7)
    assert rows[0].tolist() == first[:4].tolist() + second[:4].tolist() + third[:4].tolist()


def test_ood_images_of_a_segment_stay_in_its_run_and_bursts_have_the_declared_length():
    batches, rows, id_order, n_id = _batches("bursts", sizes=(12, 9), burst=3)
    flat = [i for b in batches for i in b]
    first_of_second = flat.index(next(i for i in flat if 12 <= i < n_id))
    assert all(i < n_id + len(rows[0]) for i in flat[:first_of_second] if i >= n_id)
    runs, length = [], 0
    for i in flat + [0]:
        if i >= n_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    assert sorted(runs) == sorted([3, 3, 3, 3, 3, 3, 3])          # 12 + 9 OOD images in bursts of 3


def test_ood_rows_cycle_like_a_drop_last_loader():
    rng = np.random.default_rng(0)
    rows = open_set.ood_rows(5, [2, 2, 2], rng)
    check = np.random.default_rng(0)
    first, second = check.permutation(5), check.permutation(5)
    # two batches of 2 from the first permutation, its last row skipped, the third batch from a new one
    assert rows.tolist() == first[:4].tolist() + second[:2].tolist()
    rows = open_set.ood_rows(3, [7], np.random.default_rng(1))     # more than the set: whole permutations
    assert len(rows) == 7 and sorted(rows[:3].tolist()) == [0, 1, 2] and sorted(rows[3:6].tolist()) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_source_sets(write_all_layouts(tmp_path_factory.mktemp("layouts")))


def _cfg(name, data_dir, save_dir, **overrides):
    dataset, config = name.split("/")
    return tiny_cfg(shipped_configs()[name], DATA_DIR=str(data_dir), SAVE_DIR=str(save_dir),
                    **{**small_run_overrides(dataset, config, data_dir), **overrides})


def test_the_method_gets_the_images_only_and_the_records_count_id_images(data_dir, tmp_path, monkeypatch):
    seen = []
    original = methods.METHODS.get("source").forward

    def spy(self, *args, **kwargs):
        seen.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(methods.METHODS.get("source"), "forward", spy)
    cfg = _cfg("cifar10_c/source", data_dir, tmp_path, OPEN_SET__OOD_DATASET="cifar100_c", OPEN_SET__RATIO=0.5)
    payload = evaluate(cfg, progress=False)
    assert all(len(args) == 1 and not kwargs and type(args[0]) is torch.Tensor for args, kwargs in seen)
    assert sum(len(args[0]) for args, _ in seen) == 2 * (8 + 4)     # 8 ID + 4 OOD images per domain
    for record in payload["records"]:
        assert (record["n"], record["n_ood"]) == (8, 4) and record["ood_domain"] == record["domain"]
        assert 0 <= record["auroc"] <= 1 and 0 <= record["oscr"] <= record["accuracy"] + 1e-12
    assert payload["summary"]["n_ood_total"] == 8
    recorded = payload["provenance"]["open_set"]
    assert (recorded["ood_dataset"], recorded["ratio"], recorded["mix"], recorded["score"]) == \
        ("cifar100_c", 0.5, "uniform", "msp")
    assert [(c["domain"], c["ood_domain"], c["ood_severity"]) for c in recorded["companions"]] == \
        [("gaussian_noise", "gaussian_noise", 5), ("fog", "fog", 5)]
    closed = evaluate(_cfg("cifar10_c/source", data_dir, tmp_path / "closed"), progress=False)
    # the ID images are classified as in the closed-set run (the zero-shot model adapts nothing)
    assert [r["correct"] for r in closed["records"]] == [r["correct"] for r in payload["records"]]
    header = (Path(payload["provenance"]["save_dir"]) / "results.csv").read_text().splitlines()[0].split(",")
    assert {"ood_domain", "n_ood", "auroc", "fpr95", "aupr_in", "aupr_out", "oscr"} <= set(header)
    closed_header = (Path(closed["provenance"]["save_dir"]) / "results.csv").read_text().splitlines()[0]
    assert "auroc" not in closed_header
    with pytest.raises(CompareError, match=r"--metric auroc: these results are closed-set runs, without OOD"):
        build_table([("source", [closed])], metric="auroc")
    table = to_markdown(build_table([("source", [payload])], metric="auroc"))      # compare.py --metric auroc
    assert "AUROC" in table and f"{100 * payload['records'][0]['auroc']:.2f}" in table


def test_a_method_whose_hooks_ask_for_the_flags_is_refused(tmp_path, data_dir):
    plugin = tmp_path / "peeking.py"
    plugin.write_text(
        "import torch\nfrom methods.base import TTAMethod, TRAINING_FREE\n"
        "from methods.registry import register_method\n"
        "@register_method('peek_ood')\nclass PeekOOD(TTAMethod):\n    protocol = TRAINING_FREE\n"
        "    def forward_and_adapt(self, x, is_ood=None):\n        return self.model(x)\n")
    cfg = _cfg("cifar10_c/source", data_dir, tmp_path / "out", OPEN_SET__OOD_DATASET="cifar100_c",
               MODEL__EXTRA_MODULES=[str(plugin)], MODEL__ADAPTATION="peek_ood")
    with pytest.raises(ConfigError, match=r"peek_ood: forward_and_adapt\(\) asks for is_ood; a test-time method sees"):
        build_plan(cfg)


@pytest.mark.parametrize("overrides, message", [
    ({"OPEN_SET__RATIO": 0.5}, r"OPEN_SET.RATIO set, but OPEN_SET.OOD_DATASET is empty"),
    ({"OPEN_SET__OOD_DATASET": "cifar10_c"}, r"is the in-distribution set itself"),
    ({"OPEN_SET__OOD_DATASET": "svhnn"}, r"Unknown OPEN_SET.OOD_DATASET 'svhnn'"),
    ({"OPEN_SET__OOD_DATASET": "cifar100_c", "OPEN_SET__OOD_DOMAIN": "rain"}, r"OOD_DOMAIN 'rain' is not a domain"),
    ({"OPEN_SET__OOD_DATASET": "cifar100_c", "OPEN_SET__SCORE": "method"}, r"source has no OOD score of its own"),
    ({"OPEN_SET__OOD_DATASET": "cifar100_c", "OPEN_SET__MIX": "per_batch", "SETTING": "mixed_domains"},
     r"MIX per_batch with SETTING mixed_domains"),
    ({"OPEN_SET__OOD_DATASET": "cifar100_c", "OPEN_SET__MIX": "sideways"}, r"OPEN_SET.MIX"),
    ({"OPEN_SET__OOD_DATASET": "cifar100_c", "OPEN_SET__MIX": "per_batch", "OPEN_SET__RATIO": 0.1},
     r"puts round\(0.1 x 4\) = 0 OOD images in a batch"),
])
def test_bad_open_set_keys_are_refused_in_one_line_before_any_model_loads(overrides, message, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=message) as err:
        build_plan(_cfg("cifar10_c/source", data_dir, tmp_path, **overrides))
    assert "\n" not in str(err.value)


def test_an_ood_set_sharing_classes_with_the_in_distribution_set_is_refused_by_name(monkeypatch):
    class Pets(OodSet):
        name = "pets_for_test"
        class_names = ("Cat", "hamster", "dog")
    monkeypatch.setitem(OOD_SETS._objects, Pets.name, Pets())
    with pytest.raises(ConfigError, match=r"shares classes with cifar10_c: \['cat', 'dog'\] \(2\)"):
        tiny_cfg("conf/cifar10_c/source.yaml", OPEN_SET__OOD_DATASET="pets_for_test")
    assert set(CIFAR10_CLASSES) >= {"cat", "dog"}


def test_the_closed_set_node_at_its_defaults_moves_no_config_hash():
    cfg = tiny_cfg("conf/cifar10_c/tent.yaml")
    without = cfg.clone()
    without.defrost()
    del without["OPEN_SET"]
    assert config_hash(cfg) == config_hash(without)
    assert config_hash(tiny_cfg("conf/cifar10_c/tent.yaml", OPEN_SET__OOD_DATASET="cifar100_c")) != config_hash(cfg)


def _one_config_per_method() -> dict[str, str]:
    """A shipped config of every registered method: its CIFAR-10-C one where it has one."""
    chosen = {}
    for name in sorted(shipped_configs()):
        method = methods.METHODS.canonical(read_config(shipped_configs()[name]).cfg.MODEL.ADAPTATION)
        if name.startswith("cifar10_c/") or method not in chosen:
            chosen[method] = name
    return chosen


@pytest.mark.parametrize("method, name", sorted(_one_config_per_method().items()))
def test_every_method_runs_on_an_open_set_stream_and_gives_the_ood_metrics(method, name, data_dir, tmp_path):
    ood = "cifar10_c" if name.startswith("shapes_c/") else "shapes_c"     # no class of either is another's
    score = "method" if methods.METHODS.get(method).own_ood_score else "msp"
    payload = evaluate(_cfg(name, data_dir, tmp_path, OPEN_SET__OOD_DATASET=ood, OPEN_SET__OOD_DOMAIN="fog",
                            OPEN_SET__OOD_SEVERITY=5, OPEN_SET__SCORE=score), progress=False)
    for record in payload["records"]:
        assert record["n_ood"] == record["n"] > 0
        assert all(np.isfinite(record[k]) and 0 <= record[k] <= 1 for k in ("auroc", "fpr95", "aupr_in", "oscr"))


OPEN_SET_CONFIGS = sorted(str(p.relative_to(Path(__file__).resolve().parent.parent))
                          for p in (Path(__file__).resolve().parent.parent / "conf" / "open_set").glob("*/*.yaml"))


@pytest.mark.parametrize("path", OPEN_SET_CONFIGS)
def test_every_shipped_open_set_config_is_checked_and_scores_as_declared(path):
    cfg = tiny_cfg(path)
    assert cfg.OPEN_SET.OOD_DATASET and cfg.OPEN_SET.MIX == "per_batch"
    own = methods.METHODS.get(cfg.MODEL.ADAPTATION).own_ood_score
    assert (cfg.OPEN_SET.SCORE == "method") == (own is not None)


def test_cliptta_pair_runs_on_svhn_c_beside_cifar10_c(data_dir, tmp_path):
    from tests.ood_layouts import write_svhn, write_svhn_c
    write_svhn(data_dir, n=12)
    write_svhn_c(data_dir, ["gaussian_noise", "fog"], n=12)
    cfg = tiny_cfg("conf/open_set/cifar10_c+svhn_c/cliptta_otsu.yaml", DATA_DIR=str(data_dir),
                   SAVE_DIR=str(tmp_path), **{**small_run_overrides("cifar10_c", "cliptta_otsu", data_dir),
                                              "TEST__BATCH_SIZE": 4, "OPTIM__STEPS": 2})
    payload = evaluate(cfg, progress=False)
    for record in payload["records"]:
        assert (record["n"], record["n_ood"]) == (8, 8) and record["ood_domain"] == record["domain"]
        assert record["ood_severity"] == 5 and np.isfinite(record["auroc"])


def test_an_open_set_run_is_not_set_beside_the_papers_closed_set_rows():
    from harness.report import paper
    closed = tiny_cfg("conf/cifar10_c/tent.yaml")
    assert paper.paper_row_for_run("cifar10_c", "tent", closed) is not None
    opened = tiny_cfg("conf/cifar10_c/tent.yaml", OPEN_SET__OOD_DATASET="cifar100_c")
    assert paper.paper_row_for_run("cifar10_c", "tent", opened) is None
    assert paper.paper_row_for_run("cifar10_c", "tent", opened.dump()) is None       # as results.json holds it


def test_a_mixed_domain_stream_mixes_each_domains_ood_images_over_the_whole_task(data_dir, tmp_path):
    cfg = _cfg("cifar10_c/source", data_dir, tmp_path, SETTING="mixed_domains", OPEN_SET__OOD_DATASET="cifar100_c")
    payload = evaluate(cfg, progress=False)
    assert [(r["domain"], r["n"], r["n_ood"], r["ood_domain"]) for r in payload["records"]] == \
        [("gaussian_noise", 8, 8, "gaussian_noise"), ("fog", 8, 8, "fog")]


def test_the_clean_pairs_take_the_values_of_cliptta_clean_runs():
    """CLIPTTA's scripts run the clean and the corrupted pair with different values in two places."""
    c10 = tiny_cfg("conf/open_set/cifar10+svhn/cliptta_otsu.yaml")
    c10c = tiny_cfg("conf/open_set/cifar10_c+svhn_c/cliptta_otsu.yaml")
    assert (c10.CLIPTTA.BETA_OOD, c10c.CLIPTTA.BETA_OOD) == (1.0, 0.1)
    inet = tiny_cfg("conf/open_set/imagenet+places/cliptta_otsu.yaml")
    inet_c = tiny_cfg("conf/open_set/imagenet_c+places_c/cliptta_otsu.yaml")
    assert (inet.OPTIM.LR, inet.CLIPTTA.BETA_REG) == (1e-5, 1.0)
    assert (inet_c.OPTIM.LR, inet_c.CLIPTTA.BETA_REG) == (1e-4, 0.5)
    assert (inet_c.TEST.BATCH_SIZE, inet_c.OPEN_SET.RATIO) == (256, 0.5)
    assert list(tiny_cfg("conf/open_set/cifar100+svhn/source.yaml").CORRUPTION.TYPE) == ["none"]
