"""The preconditioner suite: RPCholesky (simple and accelerated), Nyström, Jacobi, none, adaptive rank.

Every built preconditioner is checked against a dense float64 reference of its own ``P``, and the
low-rank factors against the dense kernel; randomness comes from explicit seeds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import gpscale
from conftest import build_kernel, dense_kernel, make_generator, make_inputs
from gpscale import KernelOperator
from gpscale.logdet import slq_logdet
from gpscale.precond import (AdaptiveRank, Diagonal, Identity, Jacobi, LowRankPlusDiagonal, NoPreconditioner,
                             Nystrom, PivotedCholesky, RPCholesky)
from gpscale.precond.rpcholesky import sample_proportional

NOISE = 0.1


def _op(n=60, family="matern", nu=1.5, d=2, dtype=torch.float64, seed=51, noise=NOISE):
    X = make_inputs(n, d, dtype=dtype, seed=seed, scale=4.0)
    k = build_kernel(family, nu, d=d, dtype=dtype, outputscale=1.0)
    return KernelOperator(X, k, noise=noise), dense_kernel(k, X)


def _dense_P(P, n):
    if isinstance(P, Identity):
        return torch.eye(n, dtype=torch.float64)
    return P.to_dense().to(torch.float64)


FACTORIES = [RPCholesky(rank=12, tol=0.0), RPCholesky(rank=12, tol=0.0, block_size=5), Nystrom(rank=12),
             Jacobi(), NoPreconditioner(), AdaptiveRank(PivotedCholesky(), tol=1e-2),
             AdaptiveRank(Nystrom(), tol=1e-2, initial_rank=4)]
IDS = ["rpchol", "rpchol-block", "nystrom", "jacobi", "none", "adaptive-pivchol", "adaptive-nystrom"]


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_solve_logdet_match_dense_P(factory):
    """``solve`` is the dense ``P^{-1} R`` (matrix and vector), ``logdet`` the dense ``log|P|``."""
    op, _ = _op()
    P = factory.build(op)
    n = op.shape[0]
    Pd = _dense_P(P, n)
    torch.testing.assert_close(Pd, Pd.T, rtol=0, atol=1e-12)
    R = torch.randn(n, 3, generator=make_generator(52), dtype=torch.float64)
    torch.testing.assert_close(P.solve(R), torch.linalg.solve(Pd, R), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(P.solve(R[:, 0]), torch.linalg.solve(Pd, R[:, 0]), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(P.logdet(), torch.logdet(Pd), rtol=1e-11, atol=1e-9)
    assert "rank" in P.stats and P.rank == P.stats["rank"]


@pytest.mark.parametrize("factory", FACTORIES[:4], ids=IDS[:4])
def test_samples_have_covariance_P(factory):
    """Sample covariance of many ``P.sample`` columns approaches ``P``; same seed, same samples."""
    op, _ = _op(n=15, seed=53)
    P = factory.build(op)
    S = P.sample(40000, generator=make_generator(54))
    assert S.shape == (15, 40000) and S.dtype == torch.float64
    Pd = _dense_P(P, 15)
    C = S @ S.T / S.shape[1]
    assert float((C - Pd).abs().max()) < 0.04 * float(Pd.abs().max())
    assert torch.equal(P.sample(3, generator=make_generator(1)), P.sample(3, generator=make_generator(1)))


@pytest.mark.parametrize("block_size", [1, 7])
def test_rpcholesky_reproducible_under_seed(block_size):
    """The same seed gives the same pivots and factor; another seed gives other pivots."""
    op, _ = _op(n=80, seed=55)
    a = RPCholesky(rank=15, tol=0.0, block_size=block_size, seed=3).build(op)
    b = RPCholesky(rank=15, tol=0.0, block_size=block_size, seed=3).build(op)
    c = RPCholesky(rank=15, tol=0.0, block_size=block_size, seed=4).build(op)
    assert a.stats["pivots"] == b.stats["pivots"] and torch.equal(a.L, b.L)
    assert a.stats["pivots"] != c.stats["pivots"]
    assert a.rank == 15 and len(set(a.stats["pivots"])) == 15


@pytest.mark.parametrize("block_size", [1, 6])
def test_rpcholesky_exact_at_full_rank(block_size):
    """With ``rank = n`` the factor is an exact (permuted) Cholesky factor: ``L L^T = K``."""
    n = 40
    op, K = _op(n=n, nu=0.5, seed=56)
    P = RPCholesky(rank=n, tol=0.0, block_size=block_size, seed=1).build(op)
    assert P.rank == n and sorted(P.stats["pivots"]) == list(range(n))
    torch.testing.assert_close(P.L @ P.L.T, K, rtol=0, atol=1e-10)
    Lp = P.L[P.stats["pivots"]]  # lower triangular in pivot order
    torch.testing.assert_close(Lp, torch.tril(Lp), rtol=0, atol=1e-12)
    assert P.stats["residual_trace"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("block_size", [1, 8])
def test_rpcholesky_residual_trace_and_tol(block_size):
    """``residual_trace`` matches the dense residual; ``tol`` stops at the first column that meets it."""
    op, K = _op(n=100, family="rbf", nu=None, seed=57)
    tol = 1e-3
    P = RPCholesky(rank=100, tol=tol, block_size=block_size, seed=2).build(op)
    tr0 = float(torch.trace(K))
    res = float(torch.trace(K - P.L @ P.L.T))
    assert P.stats["residual_trace"] == pytest.approx(res, rel=1e-6, abs=1e-9)
    assert 0 < P.rank < 100 and res <= tol * tr0
    without_last = float(torch.trace(K - P.L[:, :-1] @ P.L[:, :-1].T))
    assert without_last > tol * tr0


def test_block_rpcholesky_samples_the_rpcholesky_distribution():
    """Accelerated RPCholesky's pivot pairs follow simple RPCholesky's exact law (rejection sampling)."""
    n = 5
    op, K = _op(n=n, family="rbf", nu=None, seed=58, d=1)
    d = K.diagonal()
    exact = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):  # P(i then j) = d_i / tr(K) * r_j / tr(r), r = diag of K - K[:, i] K[i, :] / K_ii
        r = (d - K[:, i] ** 2 / K[i, i]).clamp_min(0)
        exact[i] = d[i] / d.sum() * r / r.sum()
    counts = {1: torch.zeros(n, n), 4: torch.zeros(n, n)}
    trials = 1500
    for b in counts:
        for s in range(trials):
            piv = RPCholesky(rank=2, tol=0.0, block_size=b, seed=s).build(op).stats["pivots"]
            counts[b][piv[0], piv[1]] += 1
    for b, c in counts.items():
        assert float((c / trials - exact).abs().max()) < 0.035, (b, c / trials, exact)


def test_sample_proportional_never_draws_zero_weights():
    w = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    idx = sample_proportional(w, 20000, make_generator(59))
    assert set(idx.tolist()) <= {1, 3}
    assert float((idx == 3).double().mean()) == pytest.approx(0.75, abs=0.02)


class _ProductsOnly:
    """An operator exposing kernel products and the diagonal but no rows (Nyström needs no more)."""

    def __init__(self, op):
        self._op, self.shape, self.dtype, self.device, self.noise = op, op.shape, op.dtype, op.device, op.noise
        self.products = 0

    def kernel_matmul(self, V):
        self.products += 1
        return self._op.kernel_matmul(V)

    def kernel_diagonal(self):
        return self._op.kernel_diagonal()


def test_nystrom_uses_products_only_and_is_near_optimal():
    """One kernel product; ``K - L L^T`` is PSD; its trace error is within a factor of the best rank-k one."""
    n, k = 200, 30
    op, K = _op(n=n, seed=60)
    wrapped = _ProductsOnly(op)
    P = Nystrom(rank=k, seed=1).build(wrapped)
    assert isinstance(P, LowRankPlusDiagonal) and P.rank == k and wrapped.products == 1
    E = K - P.L @ P.L.T
    assert float(torch.linalg.eigvalsh(E).min()) > -1e-8
    err = float(torch.trace(E))
    assert P.stats["residual_trace"] == pytest.approx(err, rel=1e-6)
    ev = torch.linalg.eigvalsh(K).flip(0)
    best_k, best_half = float(ev[k:].sum()), float(ev[k // 2:].sum())
    assert err <= 2.0 * best_half  # E err <= (1 + p / (k - p - 1)) tail_p, p = k / 2
    assert err <= 5.0 * best_k
    # reproducible under a seed, exact at full rank
    assert torch.equal(P.L, Nystrom(rank=k, seed=1).build(op).L)
    full = Nystrom(rank=n, seed=2).build(op)
    torch.testing.assert_close(full.L @ full.L.T, K, rtol=0, atol=1e-8)


@pytest.mark.parametrize("factory", [Nystrom(rank=40), RPCholesky(rank=40, block_size=8)], ids=["nystrom", "block"])
def test_float32_build_stable(factory):
    """Float32 builds (float64 small algebra, Nyström's stable shift) give an accurate solve."""
    op, _ = _op(n=120, family="rbf", nu=None, dtype=torch.float32, seed=61)
    P = factory.build(op)
    assert P.L.dtype == torch.float32 and torch.isfinite(P.L).all()
    Pd = P.to_dense().double()
    R = torch.randn(120, 2, generator=make_generator(62), dtype=torch.float64)
    got = P.solve(R.float()).double()
    want = torch.linalg.solve(Pd, R)
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_jacobi_and_none():
    """Jacobi is ``diag(K + noise I)``; for a stationary kernel CG converges like no preconditioner."""
    op, K = _op(n=50, seed=63)
    P = Jacobi().build(op)
    assert isinstance(P, Diagonal) and P.rank == 0 and P.stats["name"] == "jacobi"
    torch.testing.assert_close(P.d, K.diagonal() + NOISE)
    I = NoPreconditioner().build(op)
    assert isinstance(I, Identity) and float(I.logdet()) == 0.0
    y = torch.randn(50, generator=make_generator(64), dtype=torch.float64)
    a = gpscale.cg(op, y, rtol=1e-6, preconditioner=Jacobi())
    b = gpscale.cg(op, y, rtol=1e-6, preconditioner=NoPreconditioner())
    assert abs(int(a.iterations) - int(b.iterations)) <= 1
    with pytest.raises(ValueError, match="> 0"):
        Diagonal(torch.tensor([1.0, 0.0]))


def test_adaptive_rank_stops_at_tol():
    """The chosen rank is the first whose relative residual trace meets ``tol``."""
    op, K = _op(n=120, family="rbf", nu=None, seed=65)
    tol = 1e-3
    for base in (PivotedCholesky(), RPCholesky(block_size=8, seed=1)):
        P = AdaptiveRank(base, tol=tol).build(op)
        info = P.stats["adaptive"]
        assert info["stopped_by"] == "tol" and info["chosen_rank"] == P.rank
        assert info["relative_residual_trace"] <= tol
        shorter = dataclasses.replace(base, rank=P.rank - 1, tol=0.0).build(op)
        assert shorter.stats["residual_trace"] > tol * float(torch.trace(K))
    P = AdaptiveRank(Nystrom(seed=1), tol=tol, initial_rank=4).build(op)
    info = P.stats["adaptive"]
    assert info["stopped_by"] == "tol" and info["ranks_tried"][:3] == [4, 8, 16]
    assert P.stats["residual_trace"] <= tol * P.stats["trace"]


def test_adaptive_rank_respects_memory_and_max_rank():
    n = 100
    op, _ = _op(n=n, nu=0.5, seed=66)
    P = AdaptiveRank(RPCholesky(seed=0), tol=1e-12, max_memory=7 * n * 8).build(op)
    assert P.rank == 7 and P.stats["adaptive"]["stopped_by"] == "memory"
    assert P.stats["adaptive"]["factor_bytes"] <= 7 * n * 8
    P = AdaptiveRank(Nystrom(), tol=1e-12, max_rank=10, initial_rank=4).build(op)
    assert P.rank == 10 and P.stats["adaptive"]["stopped_by"] == "max_rank"
    assert P.stats["adaptive"]["ranks_tried"] == [4, 8, 10]
    with pytest.raises(TypeError, match="rank"):
        AdaptiveRank(Jacobi())


def test_invalid_arguments():
    for bad in (dict(rank=-1), dict(block_size=0), dict(tol=-1.0), dict(seed=-2)):
        with pytest.raises(ValueError):
            RPCholesky(**bad)
    with pytest.raises(ValueError):
        Nystrom(rank=-3)


@pytest.mark.parametrize("family", ["pivchol", "rpchol", "nystrom"])
def test_slq_variance_falls_with_rank(family):
    """The spread of the preconditioned SLQ log-det over probe seeds shrinks as the rank grows."""
    op, K = _op(n=250, family="rbf", nu=None, seed=67, noise=0.05)
    exact = float(torch.logdet(K + 0.05 * torch.eye(250, dtype=torch.float64)))
    make = {"pivchol": lambda r: PivotedCholesky(rank=r, tol=0.0), "rpchol": lambda r: RPCholesky(rank=r, seed=r),
            "nystrom": lambda r: Nystrom(rank=r, seed=r)}[family]
    spread = []
    for rank in (0, 15, 60):
        P = None if rank == 0 else make(rank).build(op)
        est = torch.tensor([float(slq_logdet(op, num_probes=4, preconditioner=P, rtol=1e-8,
                                             generator=make_generator(s)).logdet) for s in range(12)])
        spread.append(float(est.std()))
        assert abs(float(est.mean()) - exact) < 4 * spread[-1] / math.sqrt(12) + 1e-6 * abs(exact)
    assert spread[1] < 0.75 * spread[0] and spread[2] < 0.25 * spread[1], spread


def test_cg_residual_history():
    """``record_history`` stores the per-column residual norms, one row per iteration."""
    op, _ = _op(n=60, seed=68)
    B = torch.randn(60, 3, generator=make_generator(69), dtype=torch.float64)
    res = gpscale.cg(op, B, rtol=1e-6, record_history=True, preconditioner=PivotedCholesky(rank=5))
    H = res.residual_history
    assert H.shape == (int(res.iterations.max()) + 1, 3)
    torch.testing.assert_close(H[0], B.norm(dim=0))
    torch.testing.assert_close(H[-1], res.residual_norm)
    for j in range(3):  # a column's value freezes once it has converged
        it = int(res.iterations[j])
        assert float(H[it, j]) <= float(res.tolerance[j]) < float(H[it - 1, j])
    assert gpscale.cg(op, B, rtol=1e-6).residual_history is None
    vec = gpscale.cg(op, B[:, 0], rtol=1e-6, record_history=True)
    assert vec.x.shape == (60,) and vec.residual_history.shape[1] == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("factory", [RPCholesky(rank=20, seed=1), RPCholesky(rank=20, block_size=8, seed=1),
                                     Nystrom(rank=20, seed=1), Jacobi()])
def test_builds_on_cuda(factory):
    """Every factory builds on the GPU (generator on the operator's device) and solves correctly."""
    X = make_inputs(300, 3, seed=70).cuda()
    op = KernelOperator(X, build_kernel("matern", 2.5, d=3).cuda(), noise=NOISE)
    P = factory.build(op)
    a = factory.build(op)
    R = torch.randn(300, 2, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(P.solve(R), a.solve(R))
    torch.testing.assert_close(P.solve(R), torch.linalg.solve(P.to_dense(), R), rtol=1e-8, atol=1e-10)
