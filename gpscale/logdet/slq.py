"""Preconditioned stochastic Lanczos quadrature (SLQ) for :math:`\\log|\\hat K|`.

With a preconditioner :math:`P \\approx \\hat K` whose log-determinant is exact,

.. math::
    \\log|\\hat K| = \\log|P| + \\operatorname{tr}\\log(P^{-1/2}\\hat K P^{-1/2})
    \\approx \\log|P| + \\frac1t \\sum_{i=1}^t \\|w_i\\|^2\\, e_1^T \\log(T_i)\\, e_1 ,

where :math:`z_i = P^{1/2} w_i \\sim N(0, P)` are the probes, :math:`T_i` the Lanczos tridiagonal
that preconditioned CG builds while solving :math:`\\hat K u_i = z_i`, and
:math:`\\|w_i\\|^2 = z_i^T P^{-1} z_i` (Wenger, Pleiss, Hennig, Cunningham & Gardner, "Preconditioning
for Scalable Gaussian Process Hyperparameter Optimization", ICML 2022).  The better :math:`P`, the
closer :math:`P^{-1/2}\\hat K P^{-1/2}` is to ``I`` and the smaller the variance: the estimator is
unbiased for every :math:`P` (up to the quadrature error of finite Lanczos runs).

The same CG call also returns :math:`u_i = \\hat K^{-1} z_i`, which the gradient reuses:
:math:`\\mathbb E[u_i^T (\\partial\\hat K) P^{-1} z_i] = \\operatorname{tr}(\\hat K^{-1}\\partial\\hat K)`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .._validation import check_positive_int
from ..precond.base import Identity
from ..solvers.cg import CGResult, ConjugateGradients


@dataclass(frozen=True)
class ProbeSolve:
    """Result of one batched solve of ``[probes, extra right-hand sides]``.

    Attributes
    ----------
    cg : CGResult
        The solve; ``cg.x[:, :num_probes]`` are :math:`\\hat K^{-1} z_i`, the rest solve the extras.
    probes : (n, t) tensor
        :math:`z_i \\sim N(0, P)`.
    precond_probes : (n, t) tensor
        :math:`P^{-1} z_i`.
    logdet_terms : (t,) float64 tensor
        Per-probe estimates of :math:`\\log|\\hat K| - \\log|P|`.
    precond_logdet : 0-d tensor
        :math:`\\log|P|`.
    preconditioner : BuiltPreconditioner
    """

    cg: CGResult
    probes: torch.Tensor
    precond_probes: torch.Tensor
    logdet_terms: torch.Tensor
    precond_logdet: torch.Tensor
    preconditioner: object

    @property
    def num_probes(self) -> int:
        return self.probes.shape[1]

    @property
    def logdet(self) -> torch.Tensor:
        """The SLQ estimate :math:`\\log|P| + \\mathrm{mean}_i(\\text{term}_i)` (float64)."""
        return self.precond_logdet.to(torch.float64) + self.logdet_terms.mean()

    @property
    def logdet_stderr(self) -> float:
        """Standard error of the estimate from the spread of the per-probe terms."""
        t = self.logdet_terms.numel()
        return float(self.logdet_terms.std() / math.sqrt(t)) if t > 1 else float("nan")


def build_preconditioner(op, preconditioner):
    """Build a factory against ``op``; ``None`` means the identity."""
    if preconditioner is None:
        return Identity.for_operator(op)
    return preconditioner.build(op) if hasattr(preconditioner, "build") else preconditioner


def draw_probes(P, num_probes: int, dtype: torch.dtype, generator: torch.Generator | None = None,
                columns=None) -> torch.Tensor:
    """Probes :math:`z_i \\sim N(0, P)` scaled to :math:`z_i^T P^{-1} z_i = n`, shape ``(n, t)``.

    ``columns`` (a slice or index) keeps only those probes *after* all ``num_probes`` were drawn, so
    a process that owns a share of the probes sees exactly the numbers a single process would
    (:mod:`gpscale.distributed`).  Cost :math:`O(n k t)` for a rank-``k`` preconditioner.
    """
    Z = P.sample(num_probes, generator=generator).to(dtype)
    if columns is not None:
        Z = Z[:, columns]
    # Normalise so that ||w_i||^2 = z_i^T P^{-1} z_i = n: w_i / ||w_i|| is uniform on the sphere and
    # n u^T A u is still unbiased for tr(A), without the variance that the random ||w_i||^2 adds
    # (it dominates when tr(A)^2 / n is large, as for log(P^{-1/2} K P^{-1/2})).  GPyTorch's SLQ uses
    # the same normalisation.
    n = Z.shape[0]
    return Z * (n / (Z * P.solve(Z)).sum(0).clamp_min(torch.finfo(Z.dtype).tiny)).sqrt()


def probe_solve(op, extra_rhs: torch.Tensor | None, num_probes: int, solver: ConjugateGradients,
                preconditioner=None, generator: torch.Generator | None = None) -> ProbeSolve:
    """Solve ``[z_1..z_t, extra]`` in one preconditioned CG call and return the SLQ pieces.

    Parameters
    ----------
    op : KernelOperator
    extra_rhs : (n, s) tensor or None
        Additional right-hand sides solved alongside (e.g. ``y - mean``).
    num_probes : int
        ``t``; probes come first so their Lanczos coefficients are tracked.
    solver : ConjugateGradients
        Its ``num_tridiag`` is overridden to ``num_probes``.
    preconditioner : factory, built preconditioner, or None
    generator : torch.Generator, optional
        Makes the probes reproducible.
    """
    check_positive_int("num_probes", num_probes, minimum=1)
    P = build_preconditioner(op, preconditioner)
    Z = draw_probes(P, num_probes, op.dtype, generator)
    rhs = Z if extra_rhs is None else torch.cat([Z, extra_rhs.reshape(op.shape[0], -1)], dim=1)
    cfg = dataclasses.replace(solver, num_tridiag=num_probes)
    res = cfg(op, rhs, preconditioner=P)
    terms = res.tridiag.quadrature(torch.log) if num_probes else torch.zeros(0, dtype=torch.float64)
    return ProbeSolve(res, Z, P.solve(Z), terms, P.logdet(), P)


def slq_logdet(op, num_probes: int = 10, preconditioner=None, rtol: float = 1e-2, max_iter: int = 1000,
               generator: torch.Generator | None = None, precision=None) -> ProbeSolve:
    """Estimate :math:`\\log|\\hat K|` of a kernel operator by preconditioned SLQ.

    Parameters
    ----------
    op : KernelOperator
    num_probes : int, default 10
    preconditioner : factory or None
        E.g. ``gpscale.precond.PivotedCholesky(rank=50)``; ``None`` gives plain SLQ.
    rtol, max_iter : CG settings for the probe solves.
    generator : torch.Generator, optional
    precision : PrecisionPolicy or dtype name, optional
        Mixed-precision probe solves (:mod:`gpscale.solvers.mixed`).  With re-orthogonalisation the
        CG coefficients still define the Lanczos tridiagonal of the Krylov space (rounding only
        destroyed the orthogonality that re-orthogonalisation restores), so the quadrature is valid
        for the low-precision operator; a probe that breaks down restarts its Lanczos run in the
        fallback precision and its tridiagonal is that run's.

    Returns
    -------
    ProbeSolve
        ``.logdet`` is the estimate, ``.logdet_stderr`` its standard error, ``.cg.status`` tells
        whether the probe solves converged.

    Notes
    -----
    Cost: one batched CG run with ``num_probes`` columns, i.e. (iterations) kernel products of
    :math:`O(n^2 t)`, plus the preconditioner build.
    """
    solver = ConjugateGradients(rtol=rtol, max_iter=max_iter, precision=precision)
    return probe_solve(op, None, num_probes, solver, preconditioner, generator)
