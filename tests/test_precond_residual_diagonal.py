"""The FITC-style diagonal correction ``P = LLᵀ + diag(σ² + diag(K − LLᵀ))`` (``residual_diagonal=True``).

Checked against a dense float64 reference of its own ``P`` (solve, log-det, samples, the inverse parts the
trace estimator's control variate uses), for its defining property (``P`` has the diagonal of ``K̂``),
and for what it is for: a smaller spread of the preconditioned log-det estimator when the low-rank part
leaves much kernel mass unexplained relative to the noise.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_kernel, dense_kernel, make_generator, make_inputs
from gpscale import KernelOperator
from gpscale.logdet import slq_logdet
from gpscale.precond import AdaptiveRank, LowRankPlusDiagonal, Nystrom, PivotedCholesky, RPCholesky

FACTORIES = [PivotedCholesky(rank=12, tol=0.0, residual_diagonal=True),
             RPCholesky(rank=12, tol=0.0, residual_diagonal=True),
             RPCholesky(rank=12, tol=0.0, block_size=5, residual_diagonal=True),
             Nystrom(rank=12, residual_diagonal=True)]
IDS = ["pivchol", "rpchol", "rpchol-block", "nystrom"]


def _op(n=60, nu=1.5, d=2, seed=51, noise=0.1):
    X = make_inputs(n, d, dtype=torch.float64, seed=seed, scale=4.0)
    k = build_kernel("matern", nu, d=d, dtype=torch.float64, outputscale=1.0)
    return KernelOperator(X, k, noise=noise), dense_kernel(k, X)


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_matches_dense_P_and_has_the_diagonal_of_K_hat(factory):
    op, K = _op()
    n = op.shape[0]
    P = factory.build(op)
    Pd = P.to_dense()
    torch.testing.assert_close(Pd.diagonal(), K.diagonal() + 0.1, rtol=1e-10, atol=1e-10)
    R = torch.randn(n, 3, generator=make_generator(52), dtype=torch.float64)
    torch.testing.assert_close(P.solve(R), torch.linalg.solve(Pd, R), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(P.solve(R[:, 0]), torch.linalg.solve(Pd, R[:, 0]), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(P.logdet(), torch.logdet(Pd), rtol=1e-11, atol=1e-9)
    d, U, V = P.inverse_parts()
    torch.testing.assert_close(torch.diag(d) - U @ V.T, torch.linalg.inv(Pd), rtol=1e-8, atol=1e-10)
    assert P.stats["diagonal"] == "residual"
    assert type(factory)(rank=12).build(op).stats["diagonal"] == "noise"  # off by default


def test_samples_have_covariance_P():
    op, _ = _op(n=15, seed=53)
    P = RPCholesky(rank=5, residual_diagonal=True).build(op)
    S = P.sample(40000, generator=make_generator(54))
    Pd = P.to_dense()
    assert float((S @ S.T / S.shape[1] - Pd).abs().max()) < 0.04 * float(Pd.abs().max())


def test_rejects_a_bad_diagonal():
    L = torch.randn(10, 2, dtype=torch.float64)
    for bad in (torch.full((10,), -1.0, dtype=torch.float64), torch.zeros(9, dtype=torch.float64),
                torch.full((10,), float("nan"), dtype=torch.float64)):
        with pytest.raises(ValueError, match="diagonal"):
            LowRankPlusDiagonal(L, 0.1, diagonal=bad)


def test_lowers_the_logdet_spread_when_the_residual_dominates_the_noise():
    """Matérn-1/2, noise 1e-3, rank 20: tr(K − LLᵀ) ≫ nσ², where the plain σ² shift leaves the unexplained
    spectrum of P⁻¹K̂ far above 1 and the log-det estimator's spread large."""
    n, noise = 300, 1e-3
    op, K = _op(n=n, nu=0.5, d=3, seed=61, noise=noise)
    exact = float(torch.logdet(K + noise * torch.eye(n, dtype=torch.float64)))
    spread = {}
    for fitc in (False, True):
        P = RPCholesky(rank=20, seed=0, residual_diagonal=fitc).build(op)
        est = torch.tensor([float(slq_logdet(op, num_probes=4, preconditioner=P, rtol=1e-8,
                                             generator=make_generator(s)).logdet) for s in range(12)])
        spread[fitc] = float(est.std())
        assert abs(float(est.mean()) - exact) < 4 * spread[fitc] / 12 ** 0.5 + 1e-6 * abs(exact)
    assert spread[True] < 0.5 * spread[False], spread


@pytest.mark.parametrize("base", [PivotedCholesky(), RPCholesky(seed=0), Nystrom(seed=0)],
                         ids=["pivchol", "rpchol", "nystrom"])
def test_adaptive_rank_noise_ratio_measures_the_residual_against_the_noise(base):
    """``noise_ratio``: the first rank with tr(K − LLᵀ) ≤ ratio · n σ²; smaller noise needs a larger rank."""
    ranks = []
    for noise in (1e-1, 1e-3):
        op, K = _op(n=150, nu=1.5, d=2, seed=63, noise=noise)
        P = AdaptiveRank(base, noise_ratio=0.1, initial_rank=4).build(op)
        info = P.stats["adaptive"]
        assert info["stopped_by"] == "tol" and info["noise_ratio"] == 0.1
        assert P.stats["residual_trace"] <= 0.1 * 150 * noise * (1 + 1e-9)
        torch.testing.assert_close(torch.tensor(info["tol"], dtype=torch.float64), 0.1 * 150 * noise / torch.trace(K),
                                   rtol=1e-9, atol=0)
        ranks.append(P.rank)
    assert ranks[1] > ranks[0]
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="noise_ratio"):
            AdaptiveRank(noise_ratio=bad)


@pytest.mark.parametrize("factory", [PivotedCholesky, RPCholesky, Nystrom])
def test_residual_diagonal_must_be_a_bool(factory):
    with pytest.raises(TypeError, match="residual_diagonal must be True or False"):
        factory(rank=5, residual_diagonal="yes")
