"""Marginal log-likelihood: the iterative (BBMM) estimate against the exact Cholesky one.

The n = 2000 comparison is the expensive part of the suite (a few seconds per kernel).  Its
configuration is chosen so that the Monte-Carlo error of 64 probes sits well inside the
tolerances: the model noise (0.02) is below the data's noise level (0.3^2), which keeps the
gradient away from the optimum, where it would be a tiny difference of large stochastic terms.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from conftest import (
    build_kernel,
    dense_oracle,
    make_generator,
    make_inputs,
    make_targets,
    sym_inv_sqrt,
    sym_log,
)

import gpscale
from gpscale import CGWarning, KernelOperator
from gpscale.kernels import RBF, Matern
from gpscale.precond import Identity, PivotedCholesky

N_LARGE = 2000
RANK = 300


def _flat_grads(kernel, noise, mean):
    """Concatenate the gradients of the raw kernel parameters, ``noise`` and ``mean``."""
    return torch.cat([p.grad.reshape(-1) for p in kernel.parameters()] + [noise.grad.reshape(-1),
                                                                             mean.grad.reshape(-1)])


def _value_and_grad(X, y, make, method, **kw):
    """Run ``mll_estimate`` with fresh leaf tensors and return ``(result, value, grads)``."""
    k = make()
    noise = torch.tensor(0.02, dtype=X.dtype, requires_grad=True)
    mean = torch.tensor(0.1, dtype=X.dtype, requires_grad=True)
    res = gpscale.mll_estimate(X, y, k, noise, mean, method=method, **kw)
    res.value.backward()
    return res, res.value.detach(), _flat_grads(k, noise, mean), len(list(k.parameters()))


@pytest.fixture(scope="module")
def large_data():
    """n = 2000 points in 2-D with noisy targets (float64)."""
    X = make_inputs(N_LARGE, 2, seed=0, scale=4.0)
    y = make_targets(X, noise_std=0.3, seed=1)
    return X, y


LARGE_KERNELS = {
    "rbf_ard": lambda: RBF(lengthscale=torch.tensor([0.8, 1.2])).to(torch.float64),
    "matern52": lambda: Matern(nu=2.5, lengthscale=1.0).to(torch.float64),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LARGE_KERNELS))
def test_iterative_matches_cholesky_n2000(large_data, name):
    """Iterative MLL value within 1e-3 and gradient within 1e-2 (relative) of the Cholesky MLL."""
    X, y = large_data
    make = LARGE_KERNELS[name]
    chol, v_c, g_c, n_kernel = _value_and_grad(X, y, make, "cholesky")
    it, v_i, g_i, _ = _value_and_grad(X, y, make, "iterative", rtol=1e-8, num_probes=64, seed=0,
                                      preconditioner=PivotedCholesky(rank=RANK))
    assert chol.method == "cholesky" and it.method == "iterative"
    assert it.stats["status"] == "CONVERGED" and it.converged
    assert 0 < it.stats["preconditioner_rank"] <= RANK  # tol=1e-6 may stop the pivoting earlier
    assert abs(float(v_i - v_c)) <= 1e-3 * abs(float(v_c)), (float(v_i), float(v_c))
    assert float((g_i - g_c).norm() / g_c.norm()) <= 1e-2, (g_i, g_c)
    # The noise gradient dominates the norm; the kernel-parameter block alone must also be right
    # up to its (larger, Monte-Carlo) relative error - this catches sign or factor-2 errors.
    gk_i, gk_c = g_i[:n_kernel], g_c[:n_kernel]
    assert float((gk_i - gk_c).norm() / gk_c.norm()) <= 0.3, (gk_i, gk_c)
    # the mean gradient 1^T K^{-1}(y - m) comes from the CG solve only: accurate to the CG tolerance
    assert float(g_i[-1]) == pytest.approx(float(g_c[-1]), rel=1e-6)


# ----------------------------------------------------------------------------- exact estimator check
def _probes(X, kernel, noise, t, seed, rank):
    """Reproduce the probes the iterative path draws: ``(Z, P^{-1} Z, P)`` from a seeded generator,
    each normalised to ``z^T P^{-1} z = n`` (the sphere-normalised SLQ / trace estimator)."""
    op = KernelOperator(X, kernel, noise=noise)
    P = PivotedCholesky(rank=rank).build(op) if rank else Identity(X.shape[0], dtype=X.dtype)
    Z = P.sample(t, generator=make_generator(seed)).to(X.dtype)
    Z = Z * (X.shape[0] / (Z * P.solve(Z)).sum(0)).sqrt()
    Pd = P.to_dense() if rank else torch.eye(X.shape[0], dtype=X.dtype)
    return Z, P.solve(Z), Pd


@pytest.mark.parametrize("rank", [0, 10])
@pytest.mark.parametrize("ard", [False, True])
def test_iterative_estimator_is_exact_for_its_probes(rank, ard):
    """For the very probes drawn, value and gradient equal their dense formulas.

    Value: ``-1/2 r^T K^-1 r - 1/2 (log|P| + mean_i w_i^T log(P^-1/2 K P^-1/2) w_i) - n/2 log 2 pi``.
    Gradient: autograd of ``1/2 a^T K(θ) a - 1/(2t) sum_i u_i^T K(θ) P^-1 z_i`` with ``a = K^-1 r``
    and ``u_i = K^-1 z_i`` held fixed, and ``d/dm = 1^T a``.  This isolates the implementation
    (forward bookkeeping and the hand-written backward) from the Monte-Carlo error.
    """
    n, t, seed = 150, 6, 5
    X = make_inputs(n, 2, seed=61)
    y = make_targets(X, seed=62)
    kernel = build_kernel("matern", 2.5, ard=ard, d=2)
    noise = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    mean = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    pc = PivotedCholesky(rank=rank) if rank else None
    res = gpscale.mll_estimate(X, y, kernel, noise, mean, method="iterative", rtol=1e-12, max_iter=2000,
                               num_probes=t, preconditioner=pc, generator=make_generator(seed))
    assert res.converged
    res.value.backward()
    got = _flat_grads(kernel, noise, mean)

    with torch.no_grad():
        K = dense_oracle(kernel, X, 0.05)
        Z, PinvZ, Pd = _probes(X, kernel, 0.05, t, seed, rank)
        r = y - 0.2
        a = torch.linalg.solve(K, r)
        U = torch.linalg.solve(K, Z)
        Pmh = sym_inv_sqrt(Pd)
        W = Pmh @ Z
        terms = (W * (sym_log(Pmh @ K @ Pmh) @ W)).sum(0)
        logdet = torch.logdet(Pd) + terms.mean()
        want_value = -0.5 * (r @ a) - 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)
    assert float(res.value.detach()) == pytest.approx(float(want_value), rel=1e-9, abs=1e-8)

    k2 = build_kernel("matern", 2.5, ard=ard, d=2)
    k2.load_state_dict(kernel.state_dict())
    k2.zero_grad()
    noise2 = noise.detach().clone().requires_grad_(True)
    Kt = k2(X) + noise2 * torch.eye(n, dtype=torch.float64)
    surrogate = 0.5 * (a @ (Kt @ a)) - (0.5 / t) * (U * (Kt @ PinvZ)).sum()
    surrogate.backward()
    want = torch.cat([p.grad.reshape(-1) for p in k2.parameters()] + [noise2.grad.reshape(-1), a.sum().reshape(1)])
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_cholesky_mll_matches_scipy():
    """The exact path equals ``scipy.stats.multivariate_normal.logpdf`` and has the analytic mean gradient."""
    X = make_inputs(80, 3, seed=63)
    y = make_targets(X, seed=64)
    k = build_kernel("matern", 1.5, ard=True, d=3)
    mean = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    value = gpscale.marginal_log_likelihood(X, y, k, 0.07, mean, method="cholesky")
    K = dense_oracle(k, X, 0.07)
    want = scipy.stats.multivariate_normal(mean=torch.full((80,), 0.4, dtype=torch.float64).numpy(),
                                           cov=K.numpy()).logpdf(y.numpy())
    assert float(value.detach()) == pytest.approx(float(want), rel=1e-10)
    value.backward()
    assert float(mean.grad) == pytest.approx(float(torch.linalg.solve(K, y - 0.4).sum()), rel=1e-9)
    # every kernel parameter receives a gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in k.parameters())


@pytest.mark.parametrize("family,nu", [("rbf", None), ("matern", 2.5)])
def test_cholesky_mll_gradient_equals_autograd_through_the_dense_kernel(family, nu):
    """The closed-form backward (``W = (aa^T - K^-1) / 2`` against the kernel's derivatives) gives every
    gradient that autograd through the module's dense ``forward`` and a Gaussian log-density gives."""
    X = make_inputs(150, 4, seed=65)
    y = make_targets(X, seed=66)
    grads = []
    for method in ("gpscale", "autograd"):
        torch.manual_seed(0)
        k = build_kernel(family, nu, ard=True, d=4)
        noise = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        mean = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        if method == "gpscale":
            value = gpscale.marginal_log_likelihood(X, y, k, noise, mean, method="cholesky")
        else:
            K = k(X) + noise * torch.eye(150, dtype=torch.float64)
            value = torch.distributions.MultivariateNormal(mean.expand(150), covariance_matrix=K).log_prob(y)
        value.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in k.parameters()] + [noise.grad[None], mean.grad[None]]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-10)


def test_auto_method_uses_crossover(monkeypatch):
    """``method="auto"`` picks Cholesky up to ``CHOLESKY_CROSSOVER`` points and iterative above."""
    X = make_inputs(100, 2, seed=65)
    y = make_targets(X, seed=66)
    k = build_kernel("rbf", d=2)
    assert gpscale.CHOLESKY_CROSSOVER >= 100
    res = gpscale.mll_estimate(X, y, k, 0.1)
    assert res.method == "cholesky" and res.stats["status"] == "CONVERGED"
    exact = gpscale.mll_estimate(X, y, k, 0.1, method="cholesky").value
    assert float(res.value.detach()) == float(exact.detach())
    import gpscale.likelihood.api as api

    monkeypatch.setattr(api, "CHOLESKY_CROSSOVER", 100)
    assert gpscale.mll_estimate(X, y, k, 0.1).method == "cholesky"  # n == crossover: still Cholesky
    monkeypatch.setattr(api, "CHOLESKY_CROSSOVER", 99)
    res = gpscale.mll_estimate(X, y, k, 0.1, seed=0, rtol=1e-6, num_probes=30)
    assert res.method == "iterative"
    assert float(res.value.detach()) == pytest.approx(float(exact.detach()), rel=1e-2)


def test_non_convergence_warns_and_reports():
    """``max_iter=2`` cannot converge: a CGWarning is raised and the stats say so."""
    X = make_inputs(300, 2, seed=67)
    y = make_targets(X, seed=68)
    k = build_kernel("rbf", d=2)
    with pytest.warns(CGWarning):
        res = gpscale.mll_estimate(X, y, k, 0.01, method="iterative", max_iter=2, rtol=1e-8, seed=0,
                                   preconditioner=None)
    assert res.stats["status"] != "CONVERGED"
    assert res.stats["status"] == "MAX_ITERATIONS"
    assert not res.converged
    assert res.stats["iterations_max"] == 2
    assert torch.isfinite(res.value)
    # warn=False silences it but still reports
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = gpscale.mll_estimate(X, y, k, 0.01, method="iterative", max_iter=2, rtol=1e-8, seed=0,
                                     preconditioner=None, warn=False)
    assert quiet.stats["status"] == "MAX_ITERATIONS"


def test_seed_makes_iterative_reproducible():
    """The same ``seed`` gives the identical value; ``marginal_log_likelihood`` equals ``mll_estimate``."""
    X = make_inputs(200, 2, seed=69)
    y = make_targets(X, seed=70)
    k = build_kernel("matern", 1.5, d=2)
    kw = dict(method="iterative", seed=3, num_probes=8, rtol=1e-6, preconditioner=PivotedCholesky(rank=20))
    a = gpscale.mll_estimate(X, y, k, 0.1, **kw).value
    b = gpscale.marginal_log_likelihood(X, y, k, 0.1, **kw)
    assert torch.equal(a, b)
    c = gpscale.marginal_log_likelihood(X, y, k, 0.1, **{**kw, "seed": 4})
    assert not torch.equal(a, c)


def test_float32_iterative_close_to_float64_cholesky():
    """A float32 iterative MLL is finite and close to the float64 exact value."""
    X = make_inputs(300, 2, seed=71)
    y = make_targets(X, seed=72)
    k = build_kernel("matern", 2.5, d=2)
    exact = gpscale.marginal_log_likelihood(X, y, k, 0.05, method="cholesky")
    X32, y32 = X.to(torch.float32), y.to(torch.float32)
    res = gpscale.mll_estimate(X32, y32, k, 0.05, method="iterative", seed=0, rtol=1e-4, num_probes=32,
                               preconditioner=PivotedCholesky(rank=50))
    assert res.value.dtype == torch.float32 and res.converged
    assert float(res.value.detach()) == pytest.approx(float(exact.detach()), rel=1e-2)
