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
