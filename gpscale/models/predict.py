"""Prediction building blocks of :class:`gpscale.ExactGP`: standardisation, the solve cache, mean, variance.

Kept apart from the estimator so each piece can be tested and reused (the GPyTorch backend and the
distributed sampler solve the same systems).  Everything here is memory-bounded: cross products go
through :class:`~gpscale.CrossKernelOperator` tiles and test points are processed in batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..likelihood.cholesky import cholesky_factor
from ..logdet.slq import build_preconditioner
from ..operators import DEFAULT_MEMORY_BUDGET, CrossKernelOperator, KernelOperator
from ..solvers.cg import CGWarning, cg
from ..solvers.error_bounds import energy_stopping, second_order_quadratic

__all__ = ["PredictCache", "Standardizer", "latent_mean", "latent_variance", "prepare_predictor"]


# ---------------------------------------------------------------------- standardisation and prediction
@dataclass
class Standardizer:
    """Per-column affine map of the inputs and affine map of the targets (float64 statistics)."""

    x_mean: torch.Tensor
    x_scale: torch.Tensor
    y_mean: float
    y_scale: float

    @classmethod
    def fit(cls, X: torch.Tensor, y: torch.Tensor) -> "Standardizer":
        xm, xs = X.mean(0), X.std(0, unbiased=False)
        # A constant column carries no information: scale 1 keeps it finite (all zeros after centring).
        xs = torch.where(xs > 1e-12 * (1 + xm.abs()), xs, torch.ones_like(xs))
        ym, ys = float(y.mean()), float(y.std(unbiased=False))
        return cls(xm, xs, ym, ys if ys > 1e-12 * (1 + abs(ym)) else 1.0)

    def transform_X(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(torch.float64)
        return (X - self.x_mean.to(X.device)) / self.x_scale.to(X.device)

    def transform_y(self, y: torch.Tensor) -> torch.Tensor:
        return (y.to(torch.float64) - self.y_mean) / self.y_scale

    def inverse_y(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(torch.float64) * self.y_scale + self.y_mean


@dataclass
class PredictCache:
    """What ``fit`` keeps for prediction: ``alpha``, and the Cholesky factor or built preconditioner."""

    alpha: torch.Tensor
    chol: torch.Tensor | None = None
    precond: object | None = None


@torch.no_grad()
def prepare_predictor(X, y, kernel, noise: float, mean: float, *, method: str, rtol: float, max_iter: int,
                      preconditioner, memory_budget=None, backend: str = "auto") -> tuple[PredictCache, dict]:
    """Solve :math:`\\alpha = \\hat K^{-1}(y - m)` once: dense Cholesky or preconditioned CG."""
    r = y - mean
    op = KernelOperator(X, kernel, noise=noise, memory_budget=memory_budget, backend=backend)
    if method == "cholesky":
        n = X.shape[0]
        L = cholesky_factor(op.to_dense(max_entries=n * n))
        return PredictCache(torch.cholesky_solve(r[:, None], L)[:, 0], chol=L), {"method": "cholesky",
                                                                                 "status": "CONVERGED"}
    P = build_preconditioner(op, preconditioner)
    res = cg(op, r, rtol=rtol, max_iter=max_iter, preconditioner=P, warn=False)
    stats = dict(res.summary(), method="iterative", preconditioner=P.stats.get("name"), preconditioner_rank=P.rank)
    return PredictCache(res.x, precond=P), stats


@torch.no_grad()
def latent_mean(Xs, X_train, kernel, alpha, mean: float, memory_budget=None, backend: str = "auto") -> torch.Tensor:
    """:math:`m + K(X_*, X)\\,\\alpha`, memory-bounded by the cross operator's tiles."""
    return CrossKernelOperator(Xs, X_train, kernel, memory_budget=memory_budget, backend=backend).matmul(alpha) + mean


def _batch_size(n: int, m: int, element_size: int, per_column: int, memory_budget) -> int:
    """Test points per batch so that ``per_column`` n-vectors per point fit a quarter of the budget."""
    budget = (DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)) // 4
    return int(max(1, min(m, budget // max(1, per_column * n * element_size), 4096)))


@torch.no_grad()
def latent_variance(Xs, X_train, kernel, noise: float, cache: PredictCache, *, rtol: float, max_iter: int,
                    memory_budget=None, backend: str = "auto") -> torch.Tensor:
    """:math:`\\operatorname{var} f(x_*) = k(x_*, x_*) - k_*^T \\hat K^{-1} k_*` for each test point.

    Test points go in batches whose ``(n, b)`` right-hand sides fit a quarter of the memory budget.
    With a Cholesky factor it is one triangular solve per batch.  Otherwise a batched CG solve
    :math:`\\hat K V = K(X, X_b)` per batch, and the quadratic form is evaluated as
    :math:`2 k^T v - v^T \\hat K v` (:func:`~gpscale.solvers.error_bounds.second_order_quadratic`), whose
    error :math:`(v - v^\\star)^T \\hat K (v - v^\\star) \\ge 0` is
    *second* order in the CG error (the plain :math:`k^T v` is first order), so the variance stays
    accurate, and never too small, when it is a small difference of large numbers.

    That error is exactly the squared energy-norm error of the column, so each column stops as soon
    as a guaranteed bound on it is at most ``rtol * noise``: the returned variance then satisfies
    :math:`v^\\star \\le v \\le v^\\star + \\mathrm{rtol}\\,\\sigma^2`, i.e. the predictive variance of ``y``
    (:math:`v + \\sigma^2`) is at most ``rtol`` too large relatively, however ill conditioned
    :math:`\\hat K` is.  The bound is CG's Gauss-Radau bound (:mod:`gpscale.solvers.error_bounds`) at
    the preconditioner's :meth:`~gpscale.precond.base.BuiltPreconditioner.spectrum_floor`, or, when
    the preconditioner knows none, :math:`\\|r\\|^2 / \\sigma^2`.  A relative-residual test instead
    left standard deviations 3.8 % too large on kin40k at ``rtol = 1e-3`` (``docs/benchmarks.md``).

    Complexity: per batch of ``b`` points, one kernel product of width ``b`` per CG iteration.
    """
    n, m = X_train.shape[0], Xs.shape[0]
    prior = float(kernel.outputscale) * float(kernel.profile(torch.zeros((), dtype=torch.float64)))
    per_col = 3 if cache.chol is not None else 10  # CG keeps ~8 (n, b) work arrays
    b = _batch_size(n, m, X_train.element_size(), per_col, memory_budget)
    op = None if cache.chol is not None else KernelOperator(X_train, kernel, noise=noise, memory_budget=memory_budget,
                                                            backend=backend)
    stop = None if op is None else energy_stopping(cache.precond, noise, rtol)  # the CG path's stopping rule
    idx = torch.arange(n, device=X_train.device)
    out = torch.empty(m, dtype=torch.float64, device=X_train.device)
    failed = 0
    for j0 in range(0, m, b):
        j1 = min(m, j0 + b)
        Kb = CrossKernelOperator(X_train, Xs[j0:j1], kernel, backend="torch").rows(idx)  # rows only
        if cache.chol is not None:
            V = torch.linalg.solve_triangular(cache.chol, Kb, upper=False)
            q = (V * V).sum(0)
        else:
            res = cg(op, Kb, max_iter=max_iter, preconditioner=cache.precond, warn=False, **stop)
            failed += int(not res.converged)
            q = second_order_quadratic(Kb, res.x, op.matmul(res.x))
        out[j0:j1] = (prior - q.to(torch.float64)).clamp_min(0.0)
    if failed:
        warnings.warn(f"predictive variance: CG did not converge in {failed} test batch(es); the variances "
                      "of those points may be too large", CGWarning, stacklevel=3)
    return out
