"""Public marginal log-likelihood entry point: validation and Cholesky/iterative dispatch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .._validation import (
    as_tensor,
    check_finite,
    check_inputs,
    check_positive_hyper,
    check_positive_int,
    check_same,
    check_targets,
)
from ..kernels.base import StationaryKernel
from ..operators.backends import check_backend_name
from ..precision import as_policy
from ..precond.pivoted_cholesky import PivotedCholesky
from ..solvers.cg import ConjugateGradients
from .cholesky import cholesky_mll
from .iterative import iterative_mll

#: Largest n for which ``method="auto"`` uses the dense Cholesky path.  Measured on the 2-core CI
#: machine, one thread (benchmarks/crossover.py -> benchmarks/results/crossover.json and
#: crossover_noise0.007.json): one MLL+grad in float64 at rtol 1e-2, 10 probes, is faster iteratively
#: from n ~ 1350 (RBF) / 1540 (Matérn-5/2) with noise 0.1, from n ~ 1500 (Matérn-5/2) with noise 0.007,
#: and not clearly at all up to n = 4000 for RBF with noise 0.007 (iterative / Cholesky 0.85-1.01).
#: At hyperparameters fitted to real data (crossover_fitted_*.json) it varies more: Cholesky is 1.4-3.1x
#: faster up to n = 4000 on kin40k and pol (60-260 CG iterations), iterative from n ~ 1000-1130 on
#: elevators and protein (2-28).  Below the switch the answer is exact, not a stochastic estimate, at
#: < 0.25 s, and neither path is more than 1.8x slower than the other at n = 1500 in any of these runs.
CHOLESKY_CROSSOVER = 1500

#: ``method=`` values of the MLL (and of the estimators built on it).
METHODS = ("auto", "cholesky", "iterative")


@dataclass
class MLLResult:
    """A marginal log-likelihood value with how it was computed.

    Attributes
    ----------
    value : 0-d tensor
        :math:`\\log p(y)` summed over points, differentiable w.r.t. the hyperparameters.
    method : str
        ``"cholesky"`` or ``"iterative"``.
    stats : dict
        Solver statistics (CG status, iterations, log-det standard error, timings, and ``backend``:
        the kernel-product backend the operator resolved to, see :mod:`gpscale.operators.backends`).
    """

    value: torch.Tensor
    method: str
    stats: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return self.stats.get("status", "CONVERGED") == "CONVERGED"


def _prepare(X, y, kernel, noise, mean):
    check_inputs(X, "X", min_rows=2)
    y = check_targets(as_tensor("y", y, dtype=X.dtype if not isinstance(y, torch.Tensor) else None), X.shape[0])
    check_same(X, y, "X", "y")
    if not isinstance(kernel, StationaryKernel):
        raise TypeError(f"kernel must be a gpscale kernel such as gpscale.kernels.RBF(), got {type(kernel).__name__}")
    kernel.check_dims(X.shape[1])
    noise = noise if isinstance(noise, torch.Tensor) else torch.as_tensor(noise, dtype=X.dtype)
    mean = mean if isinstance(mean, torch.Tensor) else torch.as_tensor(mean, dtype=X.dtype)
    if noise.numel() != 1 or mean.numel() != 1:
        raise ValueError("noise and mean must be scalars (a constant mean and homoscedastic noise)")
    check_positive_hyper("noise", noise.detach())
    check_finite("mean", mean.detach())
    check_positive_hyper("lengthscale", kernel.lengthscale.detach())
    check_positive_hyper("outputscale", kernel.outputscale.detach())
    noise = noise.reshape(()).to(dtype=X.dtype, device=X.device)
    mean = mean.reshape(()).to(dtype=X.dtype, device=X.device)
    return y, noise, mean


def mll_estimate(X, y, kernel, noise=1.0, mean=0.0, *, method: str = "auto", rtol: float = 1e-2,
                 max_iter: int = 1000, num_probes: int = 10, preconditioner=PivotedCholesky(rank=100),
                 seed: int | None = None, generator: torch.Generator | None = None,
                 memory_budget: int | None = None, warn: bool = True, distributed=None,
                 precision=None, backend: str = "auto") -> MLLResult:
    """Like :func:`marginal_log_likelihood` but returns an :class:`MLLResult` with statistics."""
    precision = as_policy(precision)
    check_backend_name(backend)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    y, noise, mean = _prepare(X, y, kernel, noise, mean)
    n = X.shape[0]
    if method == "auto":
        method = "cholesky" if n <= CHOLESKY_CROSSOVER and distributed is None else "iterative"
    t0 = time.perf_counter()
    if method == "cholesky":
        value = cholesky_mll(X, y, kernel, noise, mean)
        return MLLResult(value, "cholesky", {"method": "cholesky", "status": "CONVERGED", "backend": "torch",
                                             "forward_seconds": time.perf_counter() - t0})
    check_positive_int("num_probes", num_probes, minimum=1)
    if generator is None and seed is not None:
        generator = torch.Generator(device=X.device).manual_seed(int(seed))
    solver = ConjugateGradients(rtol=rtol, max_iter=max_iter, precision=precision)
    op_kwargs = {"memory_budget": memory_budget, "backend": backend}
    if distributed is not None:  # the Cholesky path above runs replicated on every rank
        from ..distributed.mll import distributed_mll

        value, stats = distributed_mll(X, y, kernel, noise, mean, distributed=distributed, solver=solver,
                                       num_probes=num_probes, preconditioner=preconditioner, generator=generator,
                                       op_kwargs=op_kwargs, warn=warn)
        stats["forward_seconds"] = time.perf_counter() - t0
        return MLLResult(value, "iterative", stats)
    info = iterative_mll(X, y, kernel, noise, mean, solver=solver, num_probes=num_probes,
                         preconditioner=preconditioner, generator=generator,
                         op_kwargs=op_kwargs, warn=warn)
    stats = info.stats()
    if precision is not None:
        stats["precision"] = precision.product
    stats["forward_seconds"] = time.perf_counter() - t0
    return MLLResult(info.value, "iterative", stats)


def marginal_log_likelihood(X, y, kernel, noise=1.0, mean=0.0, *, method: str = "auto", rtol: float = 1e-2,
                            max_iter: int = 1000, num_probes: int = 10,
                            preconditioner=PivotedCholesky(rank=100), seed: int | None = None,
                            generator: torch.Generator | None = None, memory_budget: int | None = None,
                            warn: bool = True, distributed=None, precision=None,
                            backend: str = "auto") -> torch.Tensor:
    """Log marginal likelihood :math:`\\log p(y \\mid X, \\theta)` of an exact GP, summed over points.

    Differentiable with torch autograd w.r.t. every kernel hyperparameter, ``noise`` and ``mean``
    (pass tensors with ``requires_grad=True`` for the latter two).

    Parameters
    ----------
    X : (n, d) tensor
    y : (n,) tensor
    kernel : StationaryKernel
    noise : float or 0-d tensor, > 0
        Observation noise variance :math:`\\sigma^2`.
    mean : float or 0-d tensor
        Constant prior mean.
    method : {"auto", "cholesky", "iterative"}
        ``auto`` uses Cholesky for ``n <= CHOLESKY_CROSSOVER`` and the iterative path above.
    rtol, max_iter : CG settings (see :func:`gpscale.cg`).
    num_probes : int
        Probe vectors of the stochastic log-det and trace estimates.
    preconditioner : factory or None
        Default ``PivotedCholesky(rank=100)``.
    seed, generator : make the probes reproducible.
    memory_budget : int, optional
        Bytes for the kernel operator (cache + tiles).
    warn : bool
        Warn (``CGWarning``) when CG did not converge.
    distributed : {"columns", "rows", "hybrid"} or gpscale.distributed.Partition, optional
        Split the iterative evaluation over an initialised ``torch.distributed`` process group
        (every rank passes the same arguments and gets the same value and gradient); ``method="auto"``
        then always takes the iterative path.  See :mod:`gpscale.distributed`.
    precision : PrecisionPolicy or dtype name, optional
        Mixed-precision CG for the iterative path (``docs/precision.md``): e.g.
        ``PrecisionPolicy("bfloat16")`` runs the probe and ``y`` solves with bf16 kernel products,
        float32 state, re-orthogonalisation and the automatic fallback.  The log-det uses each probe's
        Lanczos tridiagonal from the precision that probe's run finished in; the backward
        derivative pass stays in the dtype of ``X``.  Ignored by the Cholesky path.
    backend : {"auto", "cuda", "keops", "torch"}, "cuda:<variant>" or CudaBackend
        How the iterative path computes kernel products (:mod:`gpscale.operators.backends`):
        ``auto`` picks the fastest available for the device and size; the statistics of
        :func:`mll_estimate` say which ran (``stats["backend"]``).  The row partition of
        ``distributed`` always runs the tiled ``torch`` path.

    Returns
    -------
    0-d tensor

    Notes
    -----
    Iterative cost: one batched CG solve of ``num_probes + 1`` columns (``O(n^2 (d + t))`` per
    iteration, memory bounded by ``memory_budget``) and one derivative pass of about two kernel
    products in backward.  Cholesky: :math:`O(n^3)`.

    References
    ----------
    Gardner et al. 2018 (BBMM); Wenger et al. 2022 (preconditioned log-det estimator).
    """
    return mll_estimate(X, y, kernel, noise, mean, method=method, rtol=rtol, max_iter=max_iter,
                        num_probes=num_probes, preconditioner=preconditioner, seed=seed, generator=generator,
                        memory_budget=memory_budget, warn=warn, distributed=distributed,
                        precision=precision, backend=backend).value
