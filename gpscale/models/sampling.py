"""Posterior function samples of an exact GP by pathwise conditioning (Matheron's rule).

A posterior sample is a prior sample corrected by one solve (Wilson et al. 2020):

.. math::
    f_\\ast(\\cdot) = f(\\cdot) + K(\\cdot, X)\\,\\hat K^{-1}\\big(y - m - f(X) - \\varepsilon\\big),
    \\qquad f \\sim GP(0, k),\\ \\varepsilon \\sim N(0, \\sigma^2 I),

so ``S`` samples cost one prior draw at the ``n + m`` points and **one** batched solve with ``S``
columns -- the same kind of columns as the probes of the MLL, which is why they split across ranks
with no communication inside CG (``distributed="columns"``), or use the row / hybrid partitions of
:mod:`gpscale.distributed` (Lin et al. 2023 study the solver side of this at scale).

The prior draw is exact (dense Cholesky of ``K`` at the ``n + m`` points) for small sets and uses
random Fourier features otherwise (Rahimi & Recht 2007): :math:`f(x) \\approx \\sqrt{2s/D}\\,
\\cos(\\Omega x/\\ell + b)^T w` with the kernel's spectral density (Gaussian for RBF, Student-t with
``2ν`` degrees of freedom for Matérn-ν).  Every random number is drawn for *all* ``S`` samples from the
one seed and then sliced, so a rank's columns are exactly the single-process ones.

References
----------
J. T. Wilson et al., "Efficiently sampling functions from Gaussian process posteriors", ICML 2020.
J. A. Lin et al., "Sampling from Gaussian process posteriors using stochastic gradient descent",
NeurIPS 2023.  A. Rahimi & B. Recht, "Random features for large-scale kernel machines", NIPS 2007.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_positive_int
from ..kernels import Matern
from ..operators import CrossKernelOperator, KernelOperator
from ..solvers.cg import cg

_PRIORS = ("auto", "exact", "rff")


@dataclass(frozen=True)
class PathwiseSampler:
    """Configuration of :meth:`ExactGP.sample_y`.

    Parameters
    ----------
    prior : {"auto", "exact", "rff"}
        ``auto``: exact when ``n + m <= exact_limit``, random Fourier features above.
    num_features : int, default 2048
        Random Fourier features ``D`` (the prior's covariance error is :math:`O(s/\\sqrt D)`).
    exact_limit : int, default 2000
        Largest ``n + m`` for the exact prior draw (:math:`O((n+m)^3)` replicated on every rank).
    """

    prior: str = "auto"
    num_features: int = 2048
    exact_limit: int = 2000

    def __post_init__(self):
        if self.prior not in _PRIORS:
            raise ValueError(f"prior must be one of {_PRIORS}, got {self.prior!r}")
        check_positive_int("num_features", self.num_features)
        check_positive_int("exact_limit", self.exact_limit, minimum=0)


def _exact_prior(kernel, Xall, S, gen, cols) -> torch.Tensor:
    """:math:`L Z` with :math:`LL^T = K + \\text{jitter}` at the given points, columns ``cols`` of ``S``."""
    with torch.no_grad():
        K = kernel(Xall.to(torch.float64))
    jitter = 1e-10 * float(K.diagonal().mean())
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(K + jitter * torch.eye(K.shape[0], dtype=K.dtype))
        if int(info) == 0:
            break
        jitter *= 100.0
    else:
        raise ValueError("the exact prior draw could not factorise K (duplicate points?); use prior='rff'")
    Z = torch.randn(K.shape[0], S, generator=gen, dtype=torch.float64)[:, cols]
    return (L @ Z).to(Xall.dtype)


def _rff_prior(kernel, Xall, S, D, gen, cols) -> torch.Tensor:
    """Random-Fourier-feature prior draw ``(N, |cols|)`` (features shared, weights per sample)."""
    d = Xall.shape[1]
    kw = {"generator": gen, "dtype": torch.float64}
    omega = torch.randn(D, d, **kw)
    if isinstance(kernel, Matern):  # Student-t with 2nu (odd integer) degrees of freedom
        dof = round(2 * kernel.nu)
        u = torch.randn(D, dof, **kw).pow(2).sum(1)
        omega = omega * (dof / u).sqrt()[:, None]
    b = 2 * math.pi * torch.rand(D, **kw)
    W = torch.randn(D, S, **kw)[:, cols]
    with torch.no_grad():
        ls, s = kernel.hyper_values(torch.float64)
        phi = torch.cos((Xall.to(torch.float64) / ls) @ omega.T + b) * math.sqrt(2 * float(s) / D)
    return (phi @ W).to(Xall.dtype)


@torch.no_grad()
def pathwise_samples(X_test, X_train, y_train, kernel, noise: float, mean: float, n_samples: int, seed: int, *,
                     sampler: PathwiseSampler = PathwiseSampler(), chol=None, precond=None, rtol: float = 1e-3,
                     max_iter: int = 1000, distributed=None, memory_budget=None,
                     backend: str = "auto") -> torch.Tensor:
    """Posterior samples of the latent :math:`m + f` at ``X_test``, shape ``(m, n_samples)`` (standardised units).

    Parameters
    ----------
    X_test, X_train, y_train : tensors on the model's scale
    kernel, noise, mean : fitted hyperparameters
    n_samples, seed : int
    sampler : PathwiseSampler
    chol : (n, n) tensor, optional
        Cholesky factor of :math:`\\hat K`: exact solves instead of CG.
    precond : built preconditioner, optional
        For the CG solve (``rtol``, ``max_iter``).
    distributed : {"columns", "rows", "hybrid"} or Partition, optional
        Split the ``S`` sample columns over the process group; every rank returns all ``S`` samples.
    memory_budget, backend : of the kernel operators (:class:`gpscale.KernelOperator`).

    Notes
    -----
    Cost: prior draw :math:`O((n+m)^3)` (exact) or :math:`O((n+m) D (d + S))` (RFF), one solve with
    ``S`` columns (CG: :math:`O(n^2 S)` per iteration, split over the column groups), and one
    cross product :math:`O(n m S)`.
    """
    check_positive_int("n_samples", n_samples)
    grid = None
    if distributed is not None:
        from ..distributed import process_grid

        grid = process_grid(distributed)
    c0, c1 = grid.column_range(n_samples) if grid is not None else (0, n_samples)
    try:
        local = _local_samples(X_test, X_train, y_train, kernel, noise, mean, n_samples, seed, slice(c0, c1),
                               sampler, chol, precond, rtol, max_iter, grid, {"memory_budget": memory_budget,
                                                                             "backend": backend})
    except Exception:
        if grid is not None:  # tell the other ranks, then raise here
            from ..distributed.comm import gather_columns

            gather_columns(None, X_test[:, :1], n_samples, grid)
        raise
    if grid is None:
        return local
    from ..distributed.comm import gather_columns

    return gather_columns(local, local, n_samples, grid, name="posterior samples")


def _local_samples(X_test, X_train, y_train, kernel, noise, mean, S, seed, cols, sampler, chol, precond, rtol,
                   max_iter, grid, op_kwargs: dict) -> torch.Tensor:
    n, m = X_train.shape[0], X_test.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    Xall = torch.cat([X_train, X_test])
    exact = sampler.prior == "exact" or (sampler.prior == "auto" and n + m <= sampler.exact_limit)
    f = _exact_prior(kernel, Xall.cpu(), S, gen, cols) if exact else _rff_prior(
        kernel, Xall.cpu(), S, sampler.num_features, gen, cols)
    eps = math.sqrt(noise) * torch.randn(n, S, generator=gen, dtype=torch.float64)[:, cols]
    f, eps = f.to(X_train), eps.to(X_train)
    rhs = (y_train - mean)[:, None] - f[:n] - eps
    if rhs.shape[1] == 0:
        return torch.zeros(m, 0, dtype=X_train.dtype, device=X_train.device)
    if chol is not None:
        V = torch.cholesky_solve(rhs, chol)
    else:
        if grid is not None:
            from ..distributed.mll import grid_operator

            op = grid_operator(X_train, kernel, noise, grid, op_kwargs)
        else:
            op = KernelOperator(X_train, kernel, noise=noise, **op_kwargs)
        V = cg(op, rhs, rtol=rtol, max_iter=max_iter, preconditioner=precond, warn=True).x
    return f[n:] + CrossKernelOperator(X_test, X_train, kernel, **op_kwargs).matmul(V) + mean
