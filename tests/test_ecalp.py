"""ECALP (methods/ecalp.py) against a plain per-image transcription of its official code (Yushu-Li/ECALP main.py's
loop and utils/iterative_label_propagation.py): the reference's global state as python lists, its first-time and
incremental branches of ``dynamic_graph_expansion`` as written (the -1 invalidation, the ``sim_extended`` widths),
a dense (C + n) x (C + n) adjacency filled edge by edge, ``W + W^T``, the D^-1/2 normalisation and the iteration
with matrix products, the images encoded one at a time. Ties are broken as ours (a stable sort, list order)."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

import methods
from conf import ConfigError
from datasets.class_names import CIFAR10_CLASSES
from harness.build import load_cfg
from tests.synthetic import reproducible_run_on_cifar10c, run_in_batches, tiny_cfg, varied_stream

CFG_FILE = "conf/cifar10_c/ecalp.yaml"
N_IMAGES = 40        # > K_IMAGE + 3: every width branch of the incremental kNN update is taken


def _cfg(**overrides):
    return tiny_cfg(CFG_FILE, **overrides)


def stream(n=N_IMAGES, seed=0):
    return varied_stream(n, seed)


# ------------------------------------------------------------------ the plain reference
def top_k(row, k):
    """torch.topk of a list, equal values in list order (python's sorted is stable)."""
    order = sorted(range(len(row)), key=lambda j: -row[j])[:k]
    return [row[j] for j in order], order


class ReferenceECALP:
    """The reference's module globals (sim_im2im, knn_im2im, their stores, sim/knn_im2text, Y_0, Y_txt) and its
    two functions, per image; ``changed`` alters one line (the test that the comparison can fail)."""

    def __init__(self, text, k_text=3, k_image=8, gamma=10.0, alpha=1.0, iterations=3, changed=None):
        self.clf, self.k_text, self.k_image = text, k_text, k_image
        self.gamma, self.alpha, self.iterations, self.changed = gamma, alpha, iterations, changed
        self.sim_im2im = self.knn_im2im = self.sim_store = self.knn_store = None
        self.sim_im2text = self.knn_im2text = self.Y_0 = self.Y_txt = None
        self.loaded = []                  # image_features_load[:i + 1]
        self.invalidated_kept = 0         # -1 entries kept in a store (the stream exercised the invalidation)

    def edge_reweighting_full(self, X, Q):
        """edge_reweighting(X, Q, clf, return_full=True, force_1=True): rows Q (re-weighted), columns X."""
        weights = F.normalize(self.clf.var(dim=0), p=2, dim=0)
        q_weighted = [F.normalize(q * weights, dim=0) for q in Q]
        x_plain = [F.normalize(x, dim=0) for x in X]
        return [[float((q * x).sum()) for x in x_plain] for q in q_weighted]

    def image_edges(self, features, first_time):
        n, k = len(features), min(self.k_image, len(features))
        if first_time:
            full = self.edge_reweighting_full(features, features)
            tops = [top_k(row, k) for row in full]
            self.sim_im2im, self.knn_im2im = [s for s, _ in tops], [i for _, i in tops]
            self.sim_store, self.knn_store = copy.deepcopy(self.sim_im2im), copy.deepcopy(self.knn_im2im)
            return
        cr = [list(col) for col in zip(*self.edge_reweighting_full(features[-2:], features))]   # (2, n)
        new = [top_k(row, k) for row in cr]
        sim_new, knn_new = [s for s, _ in new], [i for _, i in new]
        invalid = n - 2 if self.changed != "invalidated_index" else n - 1
        for r, row in enumerate(self.knn_store):
            for j, index in enumerate(row):
                if index == invalid:
                    self.sim_store[r][j] = -1.0
        sim_ext = [self.sim_store[r] + [cr[0][r], cr[1][r]] for r in range(len(self.sim_store) - 1)]
        knn_ext = [self.knn_store[r] + [n - 2, n - 1] for r in range(len(self.knn_store) - 1)]
        rows = len(sim_ext)
        width = k + 1 if rows == k + 1 else (k + 2 if rows > k else k)
        tops = [top_k(row, width) for row in sim_ext]
        self.sim_store = [s for s, _ in tops]
        self.knn_store = [[knn_ext[r][j] for j in order] for r, (_, order) in enumerate(tops)]
        self.invalidated_kept += sum(s == -1.0 for row in self.sim_store for s in row)
        self.sim_im2im, self.knn_im2im = [s[:k] for s in self.sim_store], [i[:k] for i in self.knn_store]
        if rows > k:
            more = [top_k(row, width) for row in cr]
            self.sim_store += [s for s, _ in more]
            self.knn_store += [i for _, i in more]
        else:
            self.sim_store += copy.deepcopy(sim_new)
            self.knn_store += copy.deepcopy(knn_new)
        self.sim_im2im += sim_new
        self.knn_im2im += knn_new

    def text_edges(self, features, first_time):
        k = min(self.k_text, len(self.clf))
        if first_time:
            tops = [top_k([float((f * t).sum()) for t in self.clf], k) for f in features]
            self.sim_im2text, self.knn_im2text = [s for s, _ in tops], [i for _, i in tops]
            return
        s, i = top_k([float((features[-1] * t).sum()) for t in self.clf], k)
        self.sim_im2text = self.sim_im2text[:-1] + [s, s]
        self.knn_im2text = self.knn_im2text[:-1] + [i, i]

    def dynamic_graph_expansion(self, features):
        """Image edges, text edges, both combined, the text rows (knn -1, sim 0) prepended."""
        first_time = self.sim_im2im is None or len(features) == 2
        self.image_edges(features, first_time)
        self.text_edges(features, first_time)
        c = len(self.clf)
        width = len(self.knn_im2im[0]) + len(self.knn_im2text[0])
        knn = [[-1] * width for _ in range(c)]
        sim = [[0.0] * width for _ in range(c)]
        knn += [[j + c for j in im] + tx for im, tx in zip(self.knn_im2im, self.knn_im2text)]
        sim += [im + tx for im, tx in zip(self.sim_im2im, self.sim_im2text)]
        return knn, sim

    def step(self, feature):
        """main.py's loop body for one image, then iterative_label_propagation; the logits 10000 * pred."""
        self.loaded.append(feature)
        features = self.loaded + [feature]
        c, n = len(self.clf), len(features)
        if n == 2:
            self.Y_0 = self.Y_txt = None
        knn, sim = self.dynamic_graph_expansion(features)
        gamma = self.gamma if self.changed != "gamma" else self.gamma + 2
        W = torch.zeros(c + n, c + n)
        for r in range(c + n):
            for index, s in zip(knn[r], sim[r]):
                weight = s ** gamma
                if weight != 0:
                    W[r, 0 if index == -1 else index] += weight
        W = W.t() + W
        diag = 1 / (torch.sqrt(W.sum(dim=1)) + 1e-6)
        W_tilde = diag[:, None] * W * diag[None, :]
        if self.Y_txt is None:
            self.Y_txt = torch.eye(c)
            self.Y_0 = torch.zeros(n, c)
        else:
            self.Y_0 = torch.cat([self.Y_0[:-1], torch.zeros(2, c)])
        Y_hat = torch.cat([self.Y_txt, self.Y_0])
        for _ in range(self.iterations):
            Y_t = self.alpha * W_tilde[c:] @ Y_hat + (1 - self.alpha) * self.Y_0
            Y_hat = torch.cat([self.Y_txt, Y_t])
        pred = Y_hat[-1, :c].clone()
        self.Y_0 = torch.zeros(n, c)
        for r, row in enumerate(Y_hat[c:].tolist()):
            best = max(range(c), key=lambda j: (row[j], -j))       # the first maximum
            self.Y_0[r, best] = row[best] / 5
        return pred * 10000


def reference_text(clip):
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    return F.normalize(torch.cat([clip.encode_text(tokenizer([f"a photo of a {name}."]))
                                  for name in CIFAR10_CLASSES]), dim=-1)


@torch.no_grad()
def reference_ecalp(model, images, **kwargs):
    """TTA-VLM's feature step (the image alone, normalised) and the official loop, one image at a time."""
    reference = ReferenceECALP(reference_text(model.clip), **kwargs)
    logits = [reference.step(F.normalize(model.clip.encode_image((image[None] - model.mean) / model.std)[0],
                                         dim=-1)) for image in images]
    return torch.stack(logits), reference


def our_labels(graph, images):
    """The graph's Y0 rows as the reference's dense matrix."""
    dense = torch.zeros(images, 10)
    dense[torch.arange(images), graph.label_class[:images]] = graph.label_score[:images]
    return dense


def assert_same_state(method, reference, atol, rtol):
    """The stored graph, entry by entry: the kNN stores (the reference's last row, the second copy, is dropped
    by its next step, and not kept by ours), the text edges, Y0, the re-weighted features."""
    g, images = method.graph, len(reference.loaded)
    assert int(g.count) == images
    width = int(g.store_width)
    assert {len(row) for row in reference.knn_store} == {width}
    assert g.knn_index[:images, :width].tolist() == reference.knn_store[:-1]
    torch.testing.assert_close(g.knn_sim[:images, :width], torch.tensor(reference.sim_store[:-1]),
                               atol=atol, rtol=rtol)
    assert g.text_index[:images].tolist() == reference.knn_im2text[:-1]
    torch.testing.assert_close(g.text_sim[:images], torch.tensor(reference.sim_im2text[:-1]), atol=atol, rtol=rtol)
    torch.testing.assert_close(our_labels(g, images), reference.Y_0[:-1], atol=atol, rtol=rtol)
    weights = F.normalize(reference.clf.var(dim=0), dim=0)
    torch.testing.assert_close(g.weighted[:images], torch.stack([F.normalize(f * weights, dim=0)
                                                                 for f in reference.loaded]), atol=atol, rtol=rtol)


# ------------------------------------------------------------------ against the reference
CASES = {
    "defaults": {},
    "small_k_half_alpha": {"K_IMAGE": 2, "K_TEXT": 1, "ALPHA": 0.5, "GAMMA": 4.0, "NUM_ITERATIONS": 2},
    "one_image_neighbour": {"K_IMAGE": 1, "K_TEXT": 5, "GAMMA": 2.0, "NUM_ITERATIONS": 5},
    "more_neighbours_than_classes": {"K_TEXT": 20, "K_IMAGE": 12, "ALPHA": 0.8},
}
KWARGS = {"K_TEXT": "k_text", "K_IMAGE": "k_image", "GAMMA": "gamma", "ALPHA": "alpha",
          "NUM_ITERATIONS": "iterations"}
# Measured on this CPU (fp32 rounding: matrix products and sparse sums against per-pair dot products and a dense
# adjacency): logits (10000 * Y) within 4e-5 (defaults, logits up to 9), 1.2e-4 (up to 94), 2e-3 (up to 4242, i.e.
# 5e-7 relative); kNN similarities within 2.4e-7, Y0 within 8e-8; kNN indices and text edges identical.
LOGITS_ATOL, STATE_ATOL, RTOL = 1e-3, 1e-6, 1e-5


def _run_case(tiny_clip, case, monkeypatch, batch_size=4):
    monkeypatch.setattr("methods.ecalp.GRAPH_CHUNK", 4)      # the buffers grow several times within the stream
    overrides = CASES[case]
    method = methods.build_method(_cfg(**{f"ECALP__{k}": v for k, v in overrides.items()}), tiny_clip, 10)
    images = stream()
    ours = run_in_batches(method, images, batch_size)
    ref, reference = reference_ecalp(tiny_clip, images, **{KWARGS[k]: v for k, v in overrides.items()})
    return method, ours, ref, reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_ecalp_matches_the_official_code(case, tiny_clip, monkeypatch):
    method, ours, ref, reference = _run_case(tiny_clip, case, monkeypatch)
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=RTOL)
    assert_same_state(method, reference, STATE_ATOL, RTOL)
    assert len(set(ours.argmax(1).tolist())) >= 2         # several classes predicted
    assert method.graph.weighted.shape[0] > 4              # grown past its first chunk


@pytest.mark.parametrize("changed", ["gamma", "invalidated_index"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(tiny_clip, changed):
    """Another edge exponent, or the wrong kNN entries set to -1, and the transcription no longer matches."""
    images = stream()
    ours = run_in_batches(methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10), images, 4)
    ref, reference = reference_ecalp(tiny_clip, images, changed=changed)
    assert (ours - ref).abs().max() > 100 * LOGITS_ATOL


def test_the_edges_set_to_minus_one_are_always_dropped(tiny_clip, monkeypatch):
    """The reference sets the edges to the previous step's second copy to -1 (as an edge: (-1) ** 10 = 1), but
    every row has more candidates than it keeps and a cosine is at least -1: they are never kept, in both."""
    method, _, _, reference = _run_case(tiny_clip, "defaults", monkeypatch)
    width = int(method.graph.store_width)
    assert reference.invalidated_kept == 0 and not (method.graph.knn_sim[:, :width] == -1.0).any()


def test_a_batch_of_four_gives_what_four_batches_of_one_give(tiny_clip):
    images = stream(16)
    one = run_in_batches(methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10), images, 1)
    four = run_in_batches(methods.build_method(_cfg(), tiny_clip, 10), images, 4)
    torch.testing.assert_close(four, one, atol=1e-5, rtol=1e-6)
    alone = run_in_batches(methods.build_method(_cfg(), copy.deepcopy(tiny_clip), 10), images[8:], 4)
    assert not torch.allclose(four[8:], alone)          # the graph of images 0-7 matters


def test_first_image_is_propagated_from_its_own_text_edges(tiny_clip):
    """One image: its two copies and their edges to each other and to their K_TEXT nearest classes; the score of
    every other class is 0."""
    image = stream(1)
    logits = methods.build_method(_cfg(), tiny_clip, 10)(image)
    with torch.no_grad():
        out = tiny_clip(image, return_features=True)
    nearest = (out.image_features @ out.text_features.t())[0].topk(3).indices
    assert set(torch.nonzero(logits[0]).flatten().tolist()) == set(nearest.tolist())


def test_reset_restores_the_empty_graph_exactly(tiny_clip, monkeypatch):
    monkeypatch.setattr("methods.ecalp.GRAPH_CHUNK", 4)
    method = methods.build_method(_cfg(), tiny_clip, 10)
    fresh_state = {k: v.clone() for k, v in method.state_dict().items()}
    images = stream(12)
    first = run_in_batches(method, images, 4)
    assert int(method.graph.count) == 12 and method.graph.weighted.shape[0] >= 12
    method.reset()
    state = method.state_dict()
    assert state.keys() == fresh_state.keys() and all(torch.equal(state[k], fresh_state[k]) for k in state)
    assert torch.equal(run_in_batches(method, images, 4), first)


def test_bad_ecalp_config_is_refused_before_the_model_loads():
    for key, value in (("K_TEXT", 0), ("K_IMAGE", 0), ("GAMMA", 0.0), ("ALPHA", 1.5), ("ALPHA", -0.1),
                       ("NUM_ITERATIONS", 0)):
        with pytest.raises(ConfigError, match=f"ECALP.{key}"):
            _cfg(**{f"ECALP__{key}": value})


def test_shipped_configs_carry_the_reference_values():
    """main.py's argparse defaults on every data set (the reference has no per-data-set values)."""
    for dataset in ("imagenet_c", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch", "caltech101", "dtd",
                    "eurosat", "fgvc_aircraft", "food101", "flowers102", "oxford_pets", "stanford_cars", "sun397",
                    "ucf101", "shapes_c", "cifar10_c"):
        cfg = load_cfg(f"conf/{dataset}/ecalp.yaml")
        e = cfg.ECALP
        assert (e.K_TEXT, e.K_IMAGE, e.GAMMA, e.ALPHA, e.NUM_ITERATIONS) == (3, 8, 10.0, 1.0, 3), dataset
        assert (cfg.CLIP.PROMPT_MODE, list(cfg.CLIP.PROMPT_TEMPLATE)) == ("custom", ["a photo of a {}."]), dataset


def test_ecalp_end_to_end_on_synthetic_cifar10c(tmp_path):
    payload = reproducible_run_on_cifar10c(tmp_path, _cfg, ["gaussian_noise", "fog"], 6, TEST__BATCH_SIZE=4)
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": 1, "backward_passes_per_image": 0}
