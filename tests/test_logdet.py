"""Stochastic Lanczos quadrature log-determinants against dense Cholesky."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    build_kernel,
    dense_oracle,
    make_generator,
    make_inputs,
    sym_inv_sqrt,
    sym_log,
)

from gpscale import KernelOperator
from gpscale.logdet import slq_logdet
from gpscale.precond import PivotedCholesky

N_SEEDS = 30
NUM_PROBES = 8


@pytest.fixture(scope="module")
def problem():
    """Matérn-3/2 operator (n = 200, 2-D) with its dense oracle and exact log-determinant."""
    X = make_inputs(200, 2, seed=51, scale=4.0)
    k = build_kernel("matern", 1.5, d=2, outputscale=1.0)
    op = KernelOperator(X, k, noise=0.05)
    K = dense_oracle(k, X, 0.05)
    L = torch.linalg.cholesky(K)
    return op, K, float(2 * L.diagonal().log().sum())


def _estimates(op, preconditioner):
    """SLQ estimates for the fixed seeds ``0 .. N_SEEDS-1`` (float64 tensor)."""
    vals = [slq_logdet(op, num_probes=NUM_PROBES, preconditioner=preconditioner, rtol=1e-10,
                       generator=make_generator(s)).logdet for s in range(N_SEEDS)]
    return torch.stack(vals).to(torch.float64)


@pytest.fixture(scope="module")
def seed_estimates(problem):
    """Estimates over the seeds, unpreconditioned and with a rank-20 pivoted Cholesky."""
    op, _, _ = problem
    return {"none": _estimates(op, None), "pivchol20": _estimates(op, PivotedCholesky(rank=20))}


@pytest.mark.parametrize("which", ["none", "pivchol20"])
def test_mean_over_seeds_matches_cholesky(problem, seed_estimates, which):
    """The mean over 30 seeds is within 4 standard errors of the Cholesky log-determinant."""
    _, _, exact = problem
    est = seed_estimates[which]
    se = float(est.std()) / math.sqrt(N_SEEDS)
    assert se > 0
    assert abs(float(est.mean()) - exact) <= 4 * se, (float(est.mean()), exact, se)


def test_preconditioning_reduces_variance(problem, seed_estimates):
    """A rank-20 preconditioner lowers the variance of the estimate over seeds (by a clear margin)."""
    assert float(seed_estimates["pivchol20"].var()) < 0.6 * float(seed_estimates["none"].var())


def test_fixed_seed_is_reproducible(problem):
    """The same generator seed gives the identical estimate; another seed a different one."""
    op, _, _ = problem
    pc = PivotedCholesky(rank=10)
    a = slq_logdet(op, num_probes=5, preconditioner=pc, generator=make_generator(7))
    b = slq_logdet(op, num_probes=5, preconditioner=pc, generator=make_generator(7))
    c = slq_logdet(op, num_probes=5, preconditioner=pc, generator=make_generator(8))
    assert torch.equal(a.probes, b.probes) and torch.equal(a.logdet, b.logdet)
    assert not torch.equal(a.logdet, c.logdet)


@pytest.mark.parametrize("rank", [0, 15])
def test_per_probe_terms_are_exact_quadratures(problem, rank):
    """Each probe's term is ``w^T log(P^-1/2 K P^-1/2) w`` with ``w = P^-1/2 z`` (CG run to 1e-12).

    This is deterministic: it checks the Lanczos/SLQ arithmetic for the very probes used, separate
    from the Monte-Carlo error.
    """
    op, K, exact = problem
    pc = PivotedCholesky(rank=rank) if rank else None
    res = slq_logdet(op, num_probes=6, preconditioner=pc, rtol=1e-12, max_iter=2000, generator=make_generator(3))
    assert res.cg.converged
    Z = res.probes.to(torch.float64)
    P = res.preconditioner
    Pd = P.to_dense() if rank else torch.eye(K.shape[0], dtype=torch.float64)
    Pmh = sym_inv_sqrt(Pd)
    W = Pmh @ Z
    want = (W * (sym_log(Pmh @ K @ Pmh) @ W)).sum(0)
    torch.testing.assert_close(res.logdet_terms, want, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(res.precond_logdet.to(torch.float64), torch.logdet(Pd), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(res.precond_probes, torch.linalg.solve(Pd, Z), rtol=1e-9, atol=1e-10)
    assert float(res.logdet) == pytest.approx(float(res.precond_logdet) + float(want.mean()), rel=1e-10)
    assert res.logdet_stderr == pytest.approx(float(res.logdet_terms.std()) / math.sqrt(6), rel=1e-10)


def test_full_rank_preconditioner_is_exact():
    """With ``P = K + noise I`` exactly (rank n), every probe term is 0 and the estimate is exact."""
    n = 50
    X = make_inputs(n, 2, seed=52, scale=4.0)
    k = build_kernel("matern", 0.5, d=2, outputscale=1.0)
    op = KernelOperator(X, k, noise=0.1)
    exact = float(torch.logdet(dense_oracle(k, X, 0.1)))
    res = slq_logdet(op, num_probes=4, preconditioner=PivotedCholesky(rank=n, tol=0.0), rtol=1e-10,
                     generator=make_generator(0))
    assert float(res.logdet) == pytest.approx(exact, rel=1e-8)
    assert float(res.logdet_terms.abs().max()) < 1e-6


def test_float32_operator(problem):
    """A float32 operator gives a float64 estimate within a few standard errors of the exact value."""
    op64, _, exact = problem
    op32 = KernelOperator(op64.X.to(torch.float32), op64.kernel, noise=0.05)
    res = slq_logdet(op32, num_probes=32, preconditioner=PivotedCholesky(rank=20), rtol=1e-5,
                     generator=make_generator(4))
    assert res.cg.converged
    assert res.logdet.dtype == torch.float64 and res.probes.dtype == torch.float32
    assert abs(float(res.logdet) - exact) <= 4 * res.logdet_stderr


# ------------------------------------------------------------------ trace estimator (MLL gradient)
def _trace_estimates(op, control_variate, rank, seeds=range(N_SEEDS)):
    from gpscale.logdet.slq import probe_solve
    from gpscale.logdet.trace import trace_pairs
    from gpscale.operators.derivatives import bilinear_derivative
    from gpscale.solvers import ConjugateGradients

    out = []
    for s in seeds:
        ps = probe_solve(op, None, NUM_PROBES, ConjugateGradients(rtol=1e-10), PivotedCholesky(rank=rank),
                         make_generator(s))
        A, B, const = trace_pairs(ps, 1.0, control_variate=control_variate,
                                  kernel_trace=op.shape[0] * float(op.kernel.outputscale.detach()))
        g = bilinear_derivative(op, A, B)
        out.append(torch.stack([g[k].reshape(()) + const[k] for k in ("lengthscale", "outputscale", "noise")]))
    return torch.stack(out).to(torch.float64)


def _exact_traces(X, k, noise):
    """tr(K̂⁻¹ ∂K̂/∂θ) for θ = lengthscale, outputscale, noise from the dense reference."""
    ls = k.lengthscale.detach().clone().requires_grad_(True)
    s = k.outputscale.detach().clone().requires_grad_(True)
    dist = torch.cdist(X / ls, X / ls, compute_mode="donot_use_mm_for_euclid_dist")
    Kd = s * k.profile(dist * dist)
    Kinv = torch.linalg.inv(Kd.detach() + noise * torch.eye(X.shape[0], dtype=X.dtype))
    g_ls, g_s = torch.autograd.grad((Kinv * Kd).sum(), (ls, s))  # Σ_ij (K̂⁻¹)_ij ∂K_ij = tr(K̂⁻¹ ∂K)
    return torch.stack([g_ls.reshape(()), g_s.reshape(()), Kinv.trace()]).to(torch.float64)


@pytest.mark.parametrize("case", ["weak-preconditioner", "strong-preconditioner"])
def test_trace_estimator_unbiased_and_auto_control_variate(case):
    """Both estimators are unbiased; ``auto`` picks the control variate only where it lowers the spread."""
    from gpscale.logdet.trace import use_control_variate

    noise, rank = (0.05, 20) if case == "weak-preconditioner" else (0.5, 60)
    X = make_inputs(200, 2, seed=51, scale=4.0)
    k = build_kernel("matern", 1.5, d=2, outputscale=1.0)
    op = KernelOperator(X, k, noise=noise)
    exact = _exact_traces(X, k, noise)
    plain, cv = _trace_estimates(op, False, rank), _trace_estimates(op, True, rank)
    for est in (plain, cv):
        sem = est.std(0) / math.sqrt(est.shape[0])
        assert bool(((est.mean(0) - exact).abs() <= 4 * sem + 1e-8 * exact.abs()).all())
    cv_better = bool((cv.std(0) < plain.std(0)).all())
    P = PivotedCholesky(rank=rank).build(op)
    assert use_control_variate(P, 200 * float(k.outputscale.detach())) == cv_better == (case == "strong-preconditioner")
    auto = _trace_estimates(op, "auto", rank, seeds=range(3))
    assert torch.equal(auto, (cv if cv_better else plain)[:3])


def test_auto_control_variate_weighs_its_cost_in_derivative_columns(monkeypatch):
    """The exact part adds rank x width derivative columns: free for small n, refused where it would
    cost more than a CG solve (n = 1M, rank 2000, ARD d = 8: ~36 000 columns against ~11 x 32)."""
    from gpscale.logdet import trace
    from gpscale.logdet.trace import control_variate_affordable, derivative_width, use_control_variate

    assert derivative_width(torch.ones(8), 8) == 18 and derivative_width(torch.tensor(1.0), 8) == 1
    assert control_variate_affordable(300, 200, 10, 8)  # the GPyTorch-test regime: n^2 k w ~ 1e8
    assert not control_variate_affordable(1_000_000, 2000, 10, 18)
    assert not control_variate_affordable(1_000_000, 2000, 10, 1)  # 125 chunks > 32 solve products
    assert control_variate_affordable(1_000_000, 500, 10, 1)  # 32 chunks: about a solve
    assert control_variate_affordable(1_000_000, 500, 20, 1) and not control_variate_affordable(1_000_000, 520, 10, 1)
    # the strong-preconditioner case above (the residual rule says yes) turns off once n^2 k w is large
    X = make_inputs(200, 2, seed=51, scale=4.0)
    k = build_kernel("matern", 1.5, d=2, outputscale=1.0)
    P = PivotedCholesky(rank=60).build(KernelOperator(X, k, noise=0.5))
    assert use_control_variate(P, 200 * float(k.outputscale.detach()), 10, 1)
    monkeypatch.setattr(trace, "CONTROL_VARIATE_FREE_WORK", 200 * 200 * 60 - 1)
    assert use_control_variate(P, 200 * float(k.outputscale.detach()), 10, 1)  # 4 chunks <= 32: still on
    assert not use_control_variate(P, 200 * float(k.outputscale.detach()), 10, 18)  # 68 chunks: off
