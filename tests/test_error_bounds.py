"""Gauss-Radau error bounds of CG (``error_floor``), the preconditioners' spectrum floors, and the
certified predictive variances built on them."""

from __future__ import annotations

import pytest
import torch
from conftest import build_kernel, dense_oracle, make_generator, make_inputs

import gpscale
from gpscale import CGStatus, ConjugateGradients, KernelOperator
from gpscale.logdet.slq import build_preconditioner
from gpscale.models.predict import PredictCache, latent_variance
from gpscale.precond import Jacobi, Nystrom, PivotedCholesky, RPCholesky
from gpscale.precond.base import Identity, LowRankPlusDiagonal, rounding_margin
from gpscale.solvers.error_bounds import RadauBound, energy_stopping, second_order_quadratic


def _spd(n=200, lo=1e-3, hi=10.0, seed=0):
    """A dense SPD matrix with log-spaced eigenvalues in [lo, hi] (its smallest eigenvalue is ``lo``)."""
    g = make_generator(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), n,
                               dtype=torch.float64)) @ Q.T


def _energy_error(A, X, Xs):
    E = X - Xs
    return (E * (A @ E)).sum(0).clamp_min(0).sqrt()


def _kernel_op(n=300, d=3, noise=1e-3, ls=0.5, dtype=torch.float64, seed=0):
    X = make_inputs(n, d, dtype=dtype, seed=seed, scale=1.0)
    k = build_kernel("rbf", d=d, dtype=dtype, outputscale=1.0)
    k.lengthscale = ls
    return KernelOperator(X, k, noise=noise), X, k


# ----------------------------------------------------------------------------- the bound itself
def test_radau_bound_before_any_step_is_the_trivial_bound():
    B = torch.randn(200, 3, generator=make_generator(1), dtype=torch.float64)
    rz = (B * B).sum(0)
    for mu in (1e-3, 5e-4, 1e-5):  # ||b||^2 / mu
        assert torch.allclose(RadauBound(mu, rz).error_norm, rz.sqrt() / mu ** 0.5)


@pytest.mark.parametrize("steps", [1, 5, 20, 60, 150])
@pytest.mark.parametrize("mu_factor", [1.0, 0.5, 0.01])
def test_radau_bound_is_an_upper_bound_at_every_step(steps, mu_factor):
    A = _spd()
    B = torch.randn(200, 3, generator=make_generator(1), dtype=torch.float64)
    Xs = torch.linalg.solve(A, B)
    res = ConjugateGradients(rtol=0.0, atol=0.0, max_iter=steps, error_floor=1e-3 * mu_factor)(A, B)
    err = _energy_error(A, res.x, Xs)
    assert (res.error_bound >= err * (1 - 1e-10)).all()
    if mu_factor == 1.0 and steps >= 20:  # mu = lambda_min: the bound is close to the error
        assert (res.error_bound <= 3.0 * err).all()


def test_radau_bound_with_a_preconditioner_on_a_kernel_system():
    op, X, k = _kernel_op(noise=1e-3)
    K = dense_oracle(k, X, 1e-3)
    P = PivotedCholesky(rank=40).build(op)
    B = torch.randn(300, 4, generator=make_generator(2), dtype=torch.float64)
    Xs = torch.linalg.solve(K, B)
    mu = P.spectrum_floor()
    assert 0.99 < mu <= 1.0
    for steps in (3, 10, 30):
        res = gpscale.cg(op, B, rtol=0.0, atol=0.0, max_iter=steps, preconditioner=P, error_floor=mu, warn=False)
        err = _energy_error(K, res.x, Xs)
        assert (res.error_bound >= err).all()
        assert (res.error_bound <= 3.0 * err).all()


@pytest.mark.parametrize("atol", [1e-2, 1e-5])
def test_error_floor_stops_each_column_when_its_bound_meets_atol(atol):
    A = _spd(seed=3)
    B = torch.randn(200, 4, generator=make_generator(4), dtype=torch.float64)
    B[:, 1] *= 1e-4  # a small column converges sooner
    Xs = torch.linalg.solve(A, B)
    res = gpscale.cg(A, B, rtol=0.0, atol=atol, error_floor=1e-3, max_iter=3000)
    assert res.status == CGStatus.CONVERGED
    assert (res.error_bound <= atol).all()
    assert (_energy_error(A, res.x, Xs) <= atol).all()
    assert res.iterations[1] < res.iterations[0]
    # one step earlier the bound was above atol: no column ran longer than needed (same batch, so the
    # same rounding: CG at condition 1e4 drifts by a few per cent between batch widths)
    for j in range(4):
        it = int(res.iterations[j])
        if it > 1:
            prev = gpscale.cg(A, B, rtol=0.0, atol=atol, error_floor=1e-3, max_iter=it - 1, warn=False)
            assert float(prev.error_bound[j]) > atol
    assert torch.allclose(res.tolerance, torch.full_like(res.tolerance, atol))


def test_error_floor_relative_tolerance_uses_the_energy_found():
    A = _spd(seed=5)
    B = torch.randn(200, 2, generator=make_generator(6), dtype=torch.float64)
    Xs = torch.linalg.solve(A, B)
    res = gpscale.cg(A, B, rtol=1e-3, error_floor=1e-3, max_iter=3000)
    exact = (B * Xs).sum(0).sqrt()  # ||x*||_A
    assert (_energy_error(A, res.x, Xs) <= 1e-3 * exact).all()
    assert (res.tolerance <= 1e-3 * exact * (1 + 1e-12)).all()


def test_zero_and_tiny_columns_stop_before_any_product():
    A = _spd(seed=7)
    B = torch.randn(200, 3, generator=make_generator(8), dtype=torch.float64)
    B[:, 0] = 0.0
    B[:, 2] *= 1e-12
    res = gpscale.cg(A, B, rtol=0.0, atol=1e-6, error_floor=1e-3, max_iter=2000)
    assert res.iterations[0] == 0 and res.iterations[2] == 0 and res.iterations[1] > 0


def test_radau_restarts_where_rounding_breaks_the_recurrence():
    rb = RadauBound(0.5, torch.tensor([1.0, 1.0], dtype=torch.float64))
    # column 0: gamma - alpha <= 0 (impossible in exact arithmetic) -> the trivial bound rz / mu
    alpha = torch.tensor([3.0, 0.5], dtype=torch.float64)
    beta = torch.tensor([0.1, 0.1], dtype=torch.float64)
    rz_new = torch.tensor([0.2, 0.2], dtype=torch.float64)
    bound = rb.update(alpha, beta, torch.ones(2, dtype=torch.float64), rz_new, torch.tensor([True, True]))
    assert torch.isfinite(bound).all()
    assert bound[0] == pytest.approx(0.2 / 0.5)
    assert bound[1] == pytest.approx((2.0 - 0.5) / (0.5 * 1.5 + 0.1) * 0.2)
    frozen = rb.update(alpha, beta, torch.ones(2, dtype=torch.float64), rz_new * 0, torch.tensor([False, False]))
    assert torch.equal(frozen, bound)  # stopped columns keep their bound


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_error_floor_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="error_floor"):
        ConjugateGradients(error_floor=bad)


def test_error_floor_refuses_a_precision_policy():
    with pytest.raises(ValueError, match="one precision"):
        ConjugateGradients(error_floor=1.0, precision="float16")


def test_residual_mode_has_no_error_bound():
    A = _spd(seed=9)
    res = gpscale.cg(A, torch.ones(200, 1, dtype=torch.float64), rtol=1e-6, max_iter=3000)
    assert res.error_bound is None


# ----------------------------------------------------------------------------- spectrum floors
def _lambda_min(P, K, dtype):
    Pinv = P.solve(torch.eye(K.shape[0], dtype=dtype)).to(torch.float64)
    C = torch.linalg.cholesky((Pinv + Pinv.T) / 2)
    return float(torch.linalg.eigvalsh(C.T @ K @ C)[0])


FACTORIES = {
    "pivchol": PivotedCholesky(rank=40),
    "rpchol": RPCholesky(rank=40, seed=0),
    "nystrom": Nystrom(rank=40, seed=0),
    "pivchol_residual_diag": PivotedCholesky(rank=40, residual_diagonal=True),
    "jacobi": Jacobi(),
    "none": None,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("noise", [1e-1, 1e-3])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_spectrum_floor_is_below_the_smallest_eigenvalue(name, noise, dtype):
    op, X, k = _kernel_op(n=250, noise=noise, dtype=dtype)
    K = op.to_dense().to(torch.float64)  # the operator as computed in its own precision
    P = build_preconditioner(op, FACTORIES[name])
    floor = P.spectrum_floor()
    assert 0.0 <= floor <= _lambda_min(P, K, dtype)
    if dtype == torch.float64:
        assert floor > 0  # every built-in preconditioner knows a floor in float64
        if name in ("pivchol", "rpchol", "nystrom"):
            assert floor > 0.999  # P <= K^: the floor is 1 up to the rounding margin


def test_spectrum_floor_is_unknown_without_scales_or_when_rounding_dominates():
    assert Identity(10).spectrum_floor() == 0.0
    L = torch.randn(50, 5, dtype=torch.float64)
    assert LowRankPlusDiagonal(L, 0.1).spectrum_floor() == 0.0  # no kernel scale given
    tiny = LowRankPlusDiagonal(L.float(), 1e-9, kernel_scale=1.0, nystrom=True)
    assert rounding_margin(torch.float32, 5 + 50 ** 0.5, 1.0, 1e-9) > 0.5
    assert tiny.spectrum_floor() == 0.0


# ----------------------------------------------------------------------------- certified variances
@pytest.mark.parametrize("precond", ["pivchol", "none"])
@pytest.mark.parametrize("rtol", [1e-2, 1e-4])
def test_predictive_variance_error_is_certified(precond, rtol):
    """var* <= v <= var* + rtol * noise for every test point, on an ill-conditioned system (noise 1e-4),
    where a relative-residual test at the same rtol leaves errors far above rtol * noise."""
    noise = 1e-4
    op, X, k = _kernel_op(n=400, d=2, noise=noise, ls=0.3, seed=11)
    Xs = make_inputs(60, 2, dtype=torch.float64, seed=12, scale=1.2)
    L = torch.linalg.cholesky(dense_oracle(k, X, noise))
    exact = latent_variance(Xs, X, k, noise, PredictCache(torch.zeros(400), chol=L), rtol=rtol, max_iter=1)
    P = build_preconditioner(op, FACTORIES[precond])
    v = latent_variance(Xs, X, k, noise, PredictCache(torch.zeros(400), precond=P), rtol=rtol, max_iter=5000)
    excess = v - exact
    assert (excess >= -1e-9).all()
    assert (excess <= rtol * noise * (1 + 1e-6) + 1e-12).all()


def test_energy_stopping_uses_the_floor_or_the_residual_equivalent():
    op, _, _ = _kernel_op(n=120, noise=1e-2)
    P = build_preconditioner(op, PivotedCholesky(rank=10))
    stop = energy_stopping(P, 1e-2, 1e-4)
    assert stop == {"rtol": 0.0, "atol": pytest.approx(1e-3), "error_floor": P.spectrum_floor()}
    # no floor known: ||r|| <= σ² sqrt(rtol) implies rᵀK̂⁻¹r <= ||r||²/σ² <= rtol σ²
    for floorless in (Identity(120), None):
        assert energy_stopping(floorless, 1e-2, 1e-4) == {"rtol": 0.0, "atol": pytest.approx(1e-4)}


@pytest.mark.parametrize("noise", [0.0, -1.0, float("nan")])
def test_energy_stopping_needs_a_positive_noise(noise):
    with pytest.raises(ValueError, match="sigma\\^2 > 0"):
        energy_stopping(None, noise, 1e-3)


@pytest.mark.parametrize("rtol", [-1e-3, float("nan"), float("inf"), "1e-3"])
def test_energy_stopping_rejects_a_bad_rtol(rtol):
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        energy_stopping(None, 1e-2, rtol)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e-1])
def test_second_order_quadratic_errs_by_exactly_the_squared_energy_error(scale):
    A = _spd(n=80, seed=4)
    g = make_generator(5)
    B = torch.randn(80, 6, generator=g, dtype=torch.float64)
    Xs = torch.linalg.solve(A, B)
    V = Xs + scale * torch.randn(80, 6, generator=g, dtype=torch.float64)
    exact = (B * Xs).sum(0)
    q = second_order_quadratic(B, V, A @ V)
    atol = 1e-9 * float(exact.abs().max())
    torch.testing.assert_close(exact - q, _energy_error(A, V, Xs) ** 2, rtol=1e-6, atol=atol)
    assert bool((q <= exact + atol).all())  # never above bᵀA⁻¹b


def test_second_order_quadratic_refuses_mismatched_shapes_and_dtypes():
    B = torch.ones(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="one shape"):
        second_order_quadratic(B, B[:, :1], B)  # would broadcast
    with pytest.raises(TypeError, match="dtype"):
        second_order_quadratic(B, B.float(), B)
