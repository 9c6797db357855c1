"""StatA: every block update against element-by-element loops in the reference's own form, the whole solver
against the loops composed, training-free, robust to single-class and tiny batches, reset, cost, configs and
end-to-end runs through the harness."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conf import ConfigError
from harness.run import evaluate
from methods.stata import (StatA, gaussian_log_likelihoods, initial_variance, knn_affinity, stata_solve,
                           update_assignments, update_beta, update_means, update_variances)
from tests.synthetic import tiny_cfg, write_cifar_c

N, C, D = 7, 3, 4



@pytest.fixture
def tiny():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    t = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    z = torch.softmax(torch.randn(N, C, generator=g) * 2, dim=1)
    return x, t, z


# ------------------------------------------------------------------ the reference's steps, one number at a time
def loop_initial_variance(x, t, z):
    return torch.tensor([sum(float(z[i, c]) * float(x[i, d] - t[c, d]) ** 2 for i in range(len(x))
                             for c in range(len(t))) / len(x) for d in range(x.shape[1])])


def loop_log_likelihoods(x, mu, var):
    return torch.tensor([[-0.5 * sum(float(x[i, d] - mu[c, d]) ** 2 / float(var[c, d]) for d in range(x.shape[1]))
                          for c in range(len(mu))] for i in range(len(x))])


def loop_knn(x, k):
    n = len(x)
    w = torch.zeros(n, n)
    for i in range(n):
        sims = sorted(((float(x[i] @ x[j]), j) for j in range(n) if j != i), reverse=True)
        for s, j in sims[:k]:
            w[i, j] = s
    return w


def loop_update_z(loglik, y_hat, z, w, var, lam_y, lam_lap, k, iterations):
    """update_z of the reference: multiply y_hat^lambda by exp(1/50 * (...)), normalise rows."""
    n, c_ = y_hat.shape
    z = z.clone()
    for _ in range(iterations):
        inter = torch.zeros(n, c_)
        for i in range(n):
            for c in range(c_):
                lap = sum(float(w[j, i]) * float(z[j, c]) + float(w[i, j]) * float(z[j, c]) for j in range(n))
                inter[i, c] = (float(loglik[i, c]) + lam_lap * (50 / (2 * k)) * lap
                               - 0.5 * sum(math.log(float(v)) for v in var[c]))
        new = torch.zeros(n, c_)
        for i in range(n):
            top = max(float(v) for v in inter[i])
            row = [float(y_hat[i, c]) ** lam_y * math.exp((float(inter[i, c]) - top) / 50) for c in range(c_)]
            new[i] = torch.tensor(row) / sum(row)
        z = new
    return z


def loop_beta(z, alpha):
    counts = [0] * z.shape[1]
    for i in range(len(z)):
        counts[int(torch.argmax(z[i]))] += 1
    return torch.tensor([n / (alpha + n + 1e-12) for n in counts])


def loop_means(x, z, beta, t):
    out = torch.zeros_like(t)
    for c in range(len(t)):
        mass = sum(float(z[i, c]) for i in range(len(x)))
        m = sum(float(z[i, c]) * x[i] for i in range(len(x))) / mass
        m = m / m.norm()
        m = float(beta[c]) * m + (1 - float(beta[c])) * t[c]
        out[c] = m / m.norm()
    return out


def loop_variances(x, z, beta, mu, t, var0):
    out = torch.zeros_like(t)
    for c in range(len(t)):
        mass = sum(float(z[i, c]) for i in range(len(x)))
        for d in range(x.shape[1]):
            spread = sum(float(z[i, c]) * float(x[i, d] - mu[c, d]) ** 2 for i in range(len(x))) / mass
            anchor = float(var0[d]) + float(t[c, d] - mu[c, d]) ** 2
            out[c, d] = float(beta[c]) * spread + (1 - float(beta[c])) * anchor
    return out


def loop_solver(x, t, scale, max_iterations, z_iterations, k=3, alpha=1.0):
    y_hat = torch.softmax(scale * x @ t.t(), dim=1)
    z = y_hat.clone()
    mu = t.clone()
    var0 = loop_initial_variance(x, t, z)
    var = var0[None].repeat(len(t), 1)
    w = loop_knn(x, k)
    for it in range(max_iterations + 1):
        z = loop_update_z(loop_log_likelihoods(x, mu, var), y_hat, z, w, var, 1.0, 1.0, k, z_iterations)
        if it == max_iterations:
            break
        beta = loop_beta(z, alpha)
        mu = loop_means(x, z, beta, t)
        var = loop_variances(x, z, beta, mu, t, var0)
    return z


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------ block updates
def test_initial_variance_and_likelihoods(tiny):
    x, t, z = tiny
    close(initial_variance(x, t, z), loop_initial_variance(x, t, z))
    var = 0.05 + torch.rand(C, D, generator=torch.Generator().manual_seed(1))
    close(gaussian_log_likelihoods(x, t, var), loop_log_likelihoods(x, t, var), 1e-4)


def test_knn_affinity_excludes_self_and_keeps_k_nearest(tiny):
    x, _, _ = tiny
    close(knn_affinity(x, 3), loop_knn(x, 3))
    assert (knn_affinity(x, 3) != 0).sum(dim=1).tolist() == [3] * N
    assert torch.equal(knn_affinity(x[:1], 3), torch.zeros(1, 1))     # one sample: no neighbours
    close(knn_affinity(x[:3], 3), loop_knn(x[:3], 2))                   # fewer samples than k + 1


@pytest.mark.parametrize("iterations", [1, 3])
def test_z_update(tiny, iterations):
    x, t, z = tiny
    var = 0.05 + torch.rand(C, D, generator=torch.Generator().manual_seed(1))
    y_hat = torch.softmax(10 * x @ t.t(), dim=1)
    loglik = gaussian_log_likelihoods(x, t, var)
    w = knn_affinity(x, 3)
    z_new, log_z = update_assignments(loglik, y_hat.log(), z, w, var, 1.0, 1.0, 3, iterations)
    close(z_new, loop_update_z(loglik, y_hat, z, w, var, 1.0, 1.0, 3, iterations))
    close(log_z.exp(), z_new)
    # with lambda_y_hat 2 and no Laplacian, too
    z2, _ = update_assignments(loglik, y_hat.log(), z, w, var, 2.0, 0.0, 3, 1)
    close(z2, loop_update_z(loglik, y_hat, z, w, var, 2.0, 0.0, 3, 1))


def test_beta_means_variances(tiny):
    x, t, z = tiny
    beta = update_beta(z, 1.0, soft=False)
    close(beta, loop_beta(z, 1.0))
    close(update_beta(z, 2.0, soft=True), z.sum(0) / (2.0 + z.sum(0)))
    mu = update_means(x, z, beta, t)
    close(mu, loop_means(x, z, beta, t))
    var0 = initial_variance(x, t, z)
    close(update_variances(x, z, beta, mu, t, var0), loop_variances(x, z, beta, mu, t, var0))


def test_a_class_nobody_chooses_stays_at_its_anchor(tiny):
    x, t, _ = tiny
    z = torch.zeros(N, C)
    z[:, 0] = 1.0                       # class 1 and 2 get exactly zero mass: the reference divides 0 by 0 here
    beta = update_beta(z, 1.0, soft=False)
    mu = update_means(x, z, beta, t)
    var0 = initial_variance(x, t, z)
    var = update_variances(x, z, beta, mu, t, var0)
    assert torch.isfinite(mu).all() and torch.isfinite(var).all()
    close(mu[1:], t[1:])
    close(var[1:], var0[None].expand(2, D))


@pytest.mark.parametrize("max_iterations,z_iterations", [(0, 1), (2, 5), (10, 5)])
def test_whole_solver_matches_the_loops(tiny, max_iterations, z_iterations):
    x, t, _ = tiny
    log_z = stata_solve(x, t, zs_logit_scale=10.0, max_iterations=max_iterations, z_iterations=z_iterations)
    close(log_z.exp(), loop_solver(x, t, 10.0, max_iterations, z_iterations), 1e-4)


# ------------------------------------------------------------------ robustness
def test_single_class_batch_is_finite_and_predicts_that_class():
    g = torch.Generator().manual_seed(3)
    t = F.normalize(torch.randn(10, 32, generator=g), dim=-1)
    near = F.normalize(t[4] + 0.05 * torch.randn(24, 32, generator=g), dim=-1)
    identical = t[4].repeat(24, 1)      # every image the same: assignments of other classes underflow to 0
    for x in (near, identical):
        log_z = stata_solve(x, t)
        assert torch.isfinite(log_z).all()
        assert log_z.argmax(1).tolist() == [4] * 24


def make_stata(model, cfg_file="conf/cifar10_c/stata_gamma_m1.yaml", **overrides):
    return StatA(tiny_cfg(cfg_file, **overrides), model, 10).setup()


def test_method_single_class_and_tiny_batches(tiny_clip):
    method = make_stata(tiny_clip)
    same = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).repeat(16, 1, 1, 1)
    out = method(same)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert len(set(out.argmax(1).tolist())) == 1
    for n in (1, 2, 3):
        out = method(torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)))
        assert out.shape == (n, 10) and torch.isfinite(out).all()


def test_training_free_and_reset(tiny_clip):
    before = copy.deepcopy(tiny_clip.state_dict())
    method = make_stata(tiny_clip)
    assert method.num_trainable_params() == 0 and method.optimizer is None
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state0 = copy.deepcopy(method.state_dict())
    first = method(x)
    assert not first.requires_grad
    after = tiny_clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    method(torch.rand(12, 3, 32, 32))
    method.reset()
    assert all(torch.equal(state0[k], v) for k, v in method.state_dict().items())
    assert torch.equal(method(x), first)            # no memory across batches


def test_uses_clip_features_and_zero_shot_prior(tiny_clip):
    """The method solves StatA on the model's normalised image and text features."""
    method = make_stata(tiny_clip, STATA__ZS_LOGIT_SCALE=10.0)
    x = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_clip(x, return_features=True)
    expected = loop_solver(out.image_features, out.text_features, 10.0, 10, 5)
    close(method(x).exp(), expected, 1e-4)


def test_cost_attributes_and_config_errors(tiny_clip):
    method = make_stata(copy.deepcopy(tiny_clip))
    assert method.cost_info() == {"views_per_image": 1, "forward_passes_per_batch": 1,
                                  "backward_passes_per_batch": 0}
    with pytest.raises(ConfigError, match="Z_ITERATIONS"):
        make_stata(tiny_clip, STATA__Z_ITERATIONS=0)


def test_configs_map_gamma_to_the_stream():
    for ds in ("cifar10_c", "cifar100_c", "imagenet_c"):
        low = tiny_cfg(f"conf/{ds}/stata.yaml")
        separate = tiny_cfg(f"conf/{ds}/stata_gamma_m1.yaml")
        assert low.SETTING == separate.SETTING == "reset_each_shift_correlated"
        assert (low.TEST.DELTA_DIRICHLET, separate.TEST.DELTA_DIRICHLET) == (0.1, 0.0)
        assert low.STATA == separate.STATA and low.TEST.BATCH_SIZE == 128


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("config", ["stata.yaml", "stata_gamma_m1.yaml"])
def test_end_to_end_on_synthetic_cifar10c(tmp_path, config):
    # The Dirichlet order needs >= 10 images in each of the 10 chunks: 200 images.
    write_cifar_c(tmp_path, ["fog"], per_severity=200)
    cfg = tiny_cfg(f"conf/cifar10_c/{config}", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                   CORRUPTION__TYPE=["fog"], TEST__BATCH_SIZE=50)
    payload = evaluate(cfg, progress=False)
    assert payload["method"] == "stata"
    assert [r["n"] for r in payload["records"]] == [200]
    saved = json.loads(next((tmp_path / "out").rglob("results.json")).read_text())
    assert saved["records"] == payload["records"]
    assert saved["provenance"]["method_cost"]["forward_passes_per_batch"] == 1
