"""TEST.STREAM_ORDER authors: the harness feeds the batches the authors' loaders feed, sample for sample.

Each synthetic CIFAR-10-C image is one colour that encodes its corruption and its row in the file, so the images a
method receives tell exactly which samples each batch holds. The expected batches come from an independent
transcription of the authors' ``get_test_loader`` (classification/datasets/data_loading.py of sarthaxxxxx/BATCLIP,
as in mariodoebler/test-time-adaptation): one loader per (domain, severity), or per severity with every domain's
samples for mixed_domains, each seeded with ``random.seed``/``np.random.seed``, then ``random.shuffle``,
``random.sample`` for NUM_EX, and for correlated settings ``list.sort`` by label or ``sort_by_dirichlet``; the
test_time.py loop over domains and severities (gradual: 1..5..1) around it."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import methods.base
from conf import ConfigError
from harness.run import evaluate
from tests.synthetic import tiny_cfg

DOMAINS = ["gaussian_noise", "fog", "snow"]
PER_SEVERITY = 60
NUM_CLASSES = 4            # labels 0..3: their Dirichlet sort then needs 4 chunks of 10, which 60 samples allow
BATCH = 16


def encode(domain_index: int, row: int) -> tuple[int, int, int]:
    return row % 256, row // 256, 40 * domain_index + 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    out = root / "CIFAR-10-C"
    out.mkdir()
    labels = np.random.default_rng(5).integers(0, NUM_CLASSES, PER_SEVERITY).astype(np.uint8)
    np.save(out / "labels.npy", np.tile(labels, 5))
    for d, domain in enumerate(DOMAINS):
        images = np.zeros((5 * PER_SEVERITY, 32, 32, 3), dtype=np.uint8)
        for row in range(5 * PER_SEVERITY):
            images[row] = encode(d, row)
        np.save(out / f"{domain}.npy", images)
    return root


# ------------------------------------------------------------------------------------------------ their rule

def their_sort_by_dirichlet(delta, samples):
    """sort_by_dirichlet of the authors' data_loading.py, line for line (without its 120 s time-out)."""
    N = len(samples)
    samples_sorted = []
    class_labels = np.array([val[1] for val in samples])
    num_classes = int(np.max(class_labels) + 1)
    dirichlet_numchunks = num_classes
    min_size = -1
    min_size_thresh = 10
    while min_size < min_size_thresh:
        idx_batch = [[] for _ in range(dirichlet_numchunks)]
        idx_batch_cls = [[] for _ in range(dirichlet_numchunks)]
        for k in range(num_classes):
            idx_k = np.where(class_labels == k)[0]
            np.random.shuffle(idx_k)
            proportions = np.random.dirichlet(np.repeat(delta, dirichlet_numchunks))
            proportions = np.array([p * (len(idx_j) < N / dirichlet_numchunks)
                                    for p, idx_j in zip(proportions, idx_batch)])
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, proportions))]
            min_size = min([len(idx_j) for idx_j in idx_batch])
            for idx_j, idx in zip(idx_batch_cls, np.split(idx_k, proportions)):
                idx_j.append(idx)
    for chunk in idx_batch_cls:
        cls_seq = list(range(num_classes))
        np.random.shuffle(cls_seq)
        for cls in cls_seq:
            samples_sorted.extend([samples[i] for i in chunk[cls]])
    return samples_sorted


def their_loader(samples, seed, num_examples, setting, delta):
    """The sample order of their get_test_loader (shuffle=False): ``samples`` in their data set's order."""
    random.seed(seed)
    np.random.seed(seed)
    samples = list(samples)
    random.shuffle(samples)
    if num_examples != -1:
        samples = random.sample(samples, k=min(num_examples, len(samples)))
    if "correlated" in setting:
        if delta > 0.:
            samples = their_sort_by_dirichlet(delta, samples)
        else:
            samples.sort(key=lambda x: x[1])
    return samples


def their_batches(setting, severities, seed=1, num_examples=-1, delta=0.0, labels=None):
    """Every batch their test_time.py feeds, as lists of (domain index, row in the file)."""
    def listing(domain_indices, severity):        # create_cifarc_dataset: domains in sequence, rows in file order
        return [((d, row), int(labels[row % PER_SEVERITY])) for d in domain_indices
                for row in range((severity - 1) * PER_SEVERITY, severity * PER_SEVERITY)]
    loop = [None] if "mixed_domains" in setting else list(range(len(DOMAINS)))
    if "gradual" in setting and len(severities) == 1:
        severities = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    batches = []
    for domain in loop:
        for severity in severities:
            domains = list(range(len(DOMAINS))) if domain is None else [domain]
            order = [key for key, _ in their_loader(listing(domains, severity), seed, num_examples, setting, delta)]
            batches += [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    return batches


# ------------------------------------------------------------------------------------------------ ours

def our_batches(data_dir, tmp_path, monkeypatch, **overrides):
    seen = []
    call = torch.nn.Module.__call__

    def record(self, x, *args, **kwargs):
        pixels = torch.round(x[:, :, x.shape[2] // 2, x.shape[3] // 2] * 255).long()
        seen.append([(int((b - 20) // 40), int(r + 256 * g)) for r, g, b in pixels.tolist()])
        return call(self, x, *args, **kwargs)
    monkeypatch.setattr(methods.base.TTAMethod, "__call__", record)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", DATA_DIR=str(data_dir), SAVE_DIR=str(tmp_path), RESUME=False,
                   CORRUPTION__TYPE=DOMAINS, TEST__BATCH_SIZE=BATCH, **overrides)
    payload = evaluate(cfg, progress=False)
    assert payload["provenance"]["data"]["stream_order"] == cfg.TEST.STREAM_ORDER
    return seen


SETTINGS = [
    ("reset_each_shift", [5], -1, 0.0),
    ("reset_each_shift", [5, 2], -1, 0.0),             # one loader per severity, each seeded afresh
    ("continual", [5], -1, 0.0),
    ("gradual", [5], -1, 0.0),                        # severities 1..5..1 for every domain
    ("mixed_domains", [5], -1, 0.0),                  # one loader over every domain's samples
    ("mixed_domains", [5, 3], -1, 0.0),
    ("correlated", [5], -1, 0.0),                     # sorted by label, stable on their shuffled list
    ("correlated", [5], -1, 0.5),                     # their Dirichlet sort on NumPy's global generator
    ("reset_each_shift_correlated", [5], -1, 1.0),
    ("gradual_correlated", [5], -1, 0.0),
    ("mixed_domains_correlated", [5], -1, 0.0),
    ("mixed_domains_correlated", [5], -1, 0.3),
    ("reset_each_shift", [5], 25, 0.0),               # NUM_EX: their random.sample after the shuffle
    ("correlated", [5], 45, 0.0),
    ("continual", [5], 40, 2.0),
]


@pytest.mark.parametrize("setting,severities,num_ex,delta", SETTINGS)
def test_authors_order_feeds_their_batches_sample_for_sample(data_dir, tmp_path, monkeypatch, setting, severities,
                                                             num_ex, delta):
    labels = np.load(data_dir / "CIFAR-10-C" / "labels.npy")
    state = random.getstate(), np.random.get_state()
    try:
        expected = their_batches(setting, severities, seed=3, num_examples=num_ex, delta=delta, labels=labels)
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    ours = our_batches(data_dir, tmp_path, monkeypatch, SETTING=setting, CORRUPTION__SEVERITY=severities,
                       CORRUPTION__NUM_EX=num_ex, TEST__DELTA_DIRICHLET=delta, RNG_SEED=3)
    assert ours == expected


def test_suite_order_is_another_stream_of_the_same_samples(data_dir, tmp_path, monkeypatch):
    authors = our_batches(data_dir, tmp_path / "a", monkeypatch, SETTING="reset_each_shift")
    suite = our_batches(data_dir, tmp_path / "s", monkeypatch, SETTING="reset_each_shift",
                        TEST__STREAM_ORDER="suite")
    assert authors != suite
    assert sorted(s for b in authors for s in b) == sorted(s for b in suite for s in b)
    assert our_batches(data_dir, tmp_path / "a2", monkeypatch, SETTING="reset_each_shift") == authors


def test_first_n_subset_is_shuffled_by_their_rule_as_their_sample_list(data_dir, tmp_path, monkeypatch):
    """CORRUPTION.SUBSET first_n is not their subset; with the authors' order, the first NUM_EX rows are the list
    their loader shuffles (and sorts), as if it had been given only those."""
    labels = np.load(data_dir / "CIFAR-10-C" / "labels.npy")
    state = random.getstate(), np.random.get_state()
    try:
        expected = []
        for d in range(len(DOMAINS)):
            rows = range(4 * PER_SEVERITY, 4 * PER_SEVERITY + 30)          # severity 5's first 30
            first = [((d, row), int(labels[row % PER_SEVERITY])) for row in rows]
            order = [key for key, _ in their_loader(first, 3, -1, "correlated", 0.0)]
            expected += [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    assert our_batches(data_dir, tmp_path, monkeypatch, SETTING="correlated", CORRUPTION__NUM_EX=30,
                       CORRUPTION__SUBSET="first_n", RNG_SEED=3) == expected


def test_authors_order_refuses_stata_sampler_which_their_suite_does_not_have():
    with pytest.raises(ConfigError, match="TEST.CORRELATION_SAMPLER stata: StatA's sampler is not in the authors"):
        tiny_cfg("conf/imagenet_c/stata.yaml", TEST__STREAM_ORDER="authors")
    assert tiny_cfg("conf/imagenet_c/stata.yaml").TEST.STREAM_ORDER == "suite"


# ------------------------------------------------------------------------------------------------ other layouts
# The stream rule works on positions in a domain's sample list, so for the other readers what has to hold is that
# the list is theirs (ImageNet-C: the list file's order; folders: torchvision ImageFolder's name order; clean
# CIFAR: file order, never shuffled); then the rule above applies. Each image's first pixel holds its index.

def _index_image(index: int, size: int):
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[0, 0] = (index % 256, index // 256, 7)
    return image


def _stream(cfg, dataset: str, domain: str, severity: int) -> list[int]:
    """The indices our harness streams for one (domain, severity) task, read from the images' pixels."""
    from datasets import get_dataset
    from harness.settings import build_tasks
    from harness.stream import task_stream_order
    part = get_dataset(dataset).build_domain(cfg, domain, severity)
    task = next(t for t in build_tasks(cfg) if t.segments[0].domain == domain)
    order = task_stream_order(cfg, task, 0, [part])
    return [int(np.asarray(part[int(i)][0])[0, 0, 0]) + 256 * int(np.asarray(part[int(i)][0])[0, 0, 1])
            for i in order]


def _theirs(samples, seed, setting="reset_each_shift", delta=0.0):
    state = random.getstate(), np.random.get_state()
    try:
        return their_loader(samples, seed, -1, setting, delta)
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


@pytest.mark.parametrize("setting,delta", [("reset_each_shift", 0.0), ("reset_each_shift_correlated", 0.0),
                                           ("correlated", 0.7)])
def test_imagenet_c_whole_domain_in_their_list_order_then_their_stream(tmp_path, setting, delta):
    from PIL import Image
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    entries = [f"{w}/ILSVRC2012_val_{len(wnids) * j + k:08d}.JPEG" for k, w in enumerate(wnids) for j in range(12)]
    for index, entry in enumerate(entries):
        path = tmp_path / "ImageNet-C" / "fog" / "5" / entry
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_index_image(index, 16)).save(path, format="PNG")   # lossless, whatever the suffix
    listing = tmp_path / "list.txt"
    order = entries[7:] + entries[:7]                                   # a list order of its own
    listing.write_text("\n".join(order) + "\n")
    cfg = tiny_cfg(None, DATA_DIR=str(tmp_path), CORRUPTION__DATASET="imagenet_c", CORRUPTION__TYPE=["fog"],
                   CORRUPTION__IMAGENET_C_LIST=str(listing), SETTING=setting, TEST__DELTA_DIRICHLET=delta,
                   RNG_SEED=2)
    samples = [(entries.index(e), wnids.index(e.split("/")[0])) for e in order]
    assert _stream(cfg, "imagenet_c", "fog", 5) == [i for i, _ in _theirs(samples, 2, setting, delta)]


def test_folder_set_whole_in_imagefolder_order_then_their_stream(tmp_path):
    from PIL import Image
    root = tmp_path / "imagenet-v2" / "imagenetv2-matched-frequency-format-val"
    listing = []
    for k in range(1000):
        (root / str(k)).mkdir(parents=True)
        for j in range(2 if k < 12 else 1):
            Image.fromarray(_index_image(len(listing), 8)).save(root / str(k) / f"img{j}.png")
            listing.append((str(k), f"img{j}.png", len(listing), k))
    cfg = tiny_cfg(None, DATA_DIR=str(tmp_path), CORRUPTION__DATASET="imagenet_v2", CORRUPTION__TYPE=[""],
                   RNG_SEED=6)
    imagefolder = [(index, label) for _, _, index, label in sorted(listing)]   # "0", "1", "10", "100", ...
    assert _stream(cfg, "imagenet_v2", "ImageNet-V2", 0) == [i for i, _ in _theirs(imagefolder, 6)]
    suite = tiny_cfg(None, DATA_DIR=str(tmp_path), CORRUPTION__DATASET="imagenet_v2", CORRUPTION__TYPE=[""],
                     RNG_SEED=6, TEST__STREAM_ORDER="suite")
    assert sorted(_stream(suite, "imagenet_v2", "ImageNet-V2", 0)) == list(range(len(listing)))


@pytest.mark.parametrize("setting", ["reset_each_shift", "correlated"])
def test_clean_cifar_in_file_order_as_their_torchvision_loader(tmp_path, setting):
    import pickle
    images = np.stack([_index_image(i, 32) for i in range(30)])
    labels = [(7 * i) % 10 for i in range(30)]
    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(30, -1), b"labels": labels}, f)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", DATA_DIR=str(tmp_path), CORRUPTION__TYPE=["none"], SETTING=setting)
    assert _stream(cfg, "cifar10_c", "none", 5) == list(range(30))    # no sample list there: nothing reorders it
