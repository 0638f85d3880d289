"""GPyTorch backend predictions: certified predictive variances (energy-norm stopping + second-order form).

The backend's prediction solves stop when CG's Gauss-Radau bound certifies each column's squared
energy-norm error ``<= solve_rtol * σ²``; the variances come from the second-order form, so the predictive
variance of y lies in ``[var⋆, var⋆ (1 + solve_rtol)]`` against a dense Cholesky, however ill conditioned
``K + σ²I`` is.  The whole covariance is tested in ``test_gpytorch_predict_covariance.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

gpytorch = pytest.importorskip("gpytorch")

import gpscale
import gpscale.integrations.gpytorch_operator as gop
import gpscale.integrations.gpytorch_predict as gpp
from gpscale import KernelOperator
from gpscale.integrations.gpytorch import backend_stats, use_gpscale
from gpscale.kernels import make_kernel
from gpscale.solvers.cg import ConjugateGradients

EXACT = gpytorch.settings.max_cholesky_size(10**9)


class _GP(gpytorch.models.ExactGP):
    def __init__(self, X, y, lik):
        super().__init__(X, y, lik)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=X.shape[1]))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _problem(n=400, d=3, m=60, noise=1e-3, seed=0):
    """Smooth kernel, small noise: cond(K + σ²I) ~ 1e5, many CG iterations behind a rank-20 preconditioner."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=torch.float64) * 3
    y = torch.sin(2 * X).sum(-1) + noise ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    Xs = torch.rand(m, d, generator=g, dtype=torch.float64) * 3
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    model = _GP(X, y, lik).double()
    model.covar_module.base_kernel.lengthscale = torch.tensor([0.7, 1.0, 1.3], dtype=torch.float64)
    model.covar_module.outputscale = 1.5
    lik.noise = noise
    model.eval()
    lik.eval()
    return model, lik, Xs


def _predict(model, lik, Xs, **backend):
    if backend:
        use_gpscale(model, **backend)
    with torch.no_grad(), EXACT, warnings.catch_warnings():
        warnings.simplefilter("ignore", gpscale.CGWarning)
        pred = lik(model(Xs))
        return pred.mean, pred.variance


def _excess(model, lik, Xs, rtol, **extra):
    """Relative excess of the backend's predictive variance of y over stock GPyTorch's dense one."""
    _, exact = _predict(*_problem()[:2], Xs)
    model.prediction_strategy = None
    _, var = _predict(model, lik, Xs, method="iterative", solve_rtol=rtol,
                      preconditioner=gpscale.precond.PivotedCholesky(rank=20), max_iter=3000, **extra)
    return (var - exact) / exact


@pytest.mark.parametrize("rtol", [1e-2, 1e-3])
def test_backend_variances_are_certified(rtol):
    model, lik, Xs = _problem()
    rel = _excess(model, lik, Xs, rtol)
    assert backend_stats(model)["last"]["predictive_covariance"]["status"] == "CONVERGED"
    assert float(rel.min()) >= -1e-10, "a predictive variance came out too small"
    assert float(rel.max()) <= rtol


def stock_first_order_covariance(monkeypatch):
    """GPyTorch's own covariance, ``K** - K*ᵀ solve(K*)``: the first-order form, in place of gpscale's."""
    stock = gpytorch.models.exact_prediction_strategies.DefaultPredictionStrategy.exact_predictive_covar
    monkeypatch.setattr(gpp.GpscalePredictionStrategy, "exact_predictive_covar", stock)


def first_order_residual_rule(monkeypatch):
    """The backend before certification: residual rule at solve_rtol, GPyTorch's first-order ``kᵀx``."""
    residual = lambda op, P, opts: ConjugateGradients(rtol=opts.solve_rtol, max_iter=opts.max_iter)  # noqa: E731
    monkeypatch.setattr(gop, "_prediction_solver", residual)
    monkeypatch.setattr(gpp, "_prediction_solver", residual)
    stock_first_order_covariance(monkeypatch)


def test_residual_rule_breaks_the_bound_on_this_problem(monkeypatch):
    # the case above is hard enough to matter: the pre-certification rule gives variances outside
    # [var⋆, var⋆(1 + rtol)]
    first_order_residual_rule(monkeypatch)
    model, lik, Xs = _problem()
    rel = _excess(model, lik, Xs, 1e-3)
    assert float(rel.min()) < -1e-10 or float(rel.max()) > 1e-3


def test_certified_stopping_alone_with_first_order_form_is_not_enough(monkeypatch):
    # certified stopping, but GPyTorch's first-order kᵀx: rounding breaks CG's Galerkin identity, so some
    # variances leave [var⋆, var⋆(1 + rtol)] -- the second-order form is what makes the certificate hold
    stock_first_order_covariance(monkeypatch)
    model, lik, Xs = _problem()
    rel = _excess(model, lik, Xs, 1e-2)
    assert float(rel.min()) < -1e-10 or float(rel.max()) > 1e-2


def test_backend_mean_within_its_cauchy_schwarz_bound():
    # |μ - μ⋆| = |k⋆ᵀ e| <= ||k⋆||_{K̂⁻¹} ||e||_K̂ <= sqrt(s) sqrt(rtol σ²) for the mean-cache column
    model, lik, Xs = _problem()
    exact, _ = _predict(*_problem()[:2], Xs)
    rtol = 1e-3
    mu, _ = _predict(model, lik, Xs, method="iterative", solve_rtol=rtol,
                     preconditioner=gpscale.precond.PivotedCholesky(rank=20), max_iter=3000)
    s, noise = float(model.covar_module.outputscale.detach()), float(lik.noise.detach())
    assert float((mu - exact).abs().max()) <= (s * rtol * noise) ** 0.5


def _spd_system(n=120, noise=1e-2, seed=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=g, dtype=torch.float64)
    op = KernelOperator(X, make_kernel("rbf", lengthscale=0.4), noise=noise)
    B = torch.rand(n, 5, generator=g, dtype=torch.float64)
    return op, B, op.to_dense(max_entries=n * n)


def test_prediction_solver_stops_on_the_certified_error():
    op, _, _ = _spd_system(noise=1e-2)
    opts = gpscale.integrations.gpytorch.BackendOptions(solve_rtol=1e-5)
    P = gpscale.precond.PivotedCholesky(rank=10).build(op)
    solver = gop._prediction_solver(op, P, opts)
    assert solver.rtol == 0 and solver.error_floor == P.spectrum_floor() > 0
    assert solver.atol == pytest.approx((1e-5 * 1e-2) ** 0.5)
