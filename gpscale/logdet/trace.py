"""Preconditioned stochastic trace estimation for :math:`\\operatorname{tr}(\\hat K^{-1}\\partial_\\theta \\hat K)`.

The MLL gradient needs :math:`\\operatorname{tr}(\\hat K^{-1}\\partial_\\theta\\hat K)` for every
hyperparameter.  The probe solves of :func:`gpscale.logdet.slq.probe_solve` give the plain estimator

.. math:: \\operatorname{tr}(\\hat K^{-1}\\partial\\hat K) \\approx \\frac1t\\sum_i u_i^T\\,\\partial\\hat K\\,P^{-1}z_i,
   \\qquad u_i = \\hat K^{-1} z_i,\\; z_i \\sim N(0, P).

With a low-rank-plus-diagonal preconditioner the part that :math:`P` explains is computed exactly
and only the remainder is estimated (Wenger, Pleiss, Hennig, Cunningham & Gardner, ICML 2022,
Sec. 4 -- the control variate behind their preconditioned log-det *and* gradient estimators):

.. math::
    \\operatorname{tr}(\\hat K^{-1}\\partial\\hat K)
    = \\underbrace{\\operatorname{tr}(P^{-1}\\partial\\hat K)}_{\\text{exact}}
    + \\frac1t\\sum_i (u_i - P^{-1}z_i)^T\\,\\partial\\hat K\\,P^{-1}z_i ,

unbiased because :math:`\\mathbb E[(P^{-1}z)^T\\partial\\hat K P^{-1}z] = \\operatorname{tr}(P^{-1}\\partial\\hat K)`.
The remainder shrinks as :math:`P \\to \\hat K`, so does the variance.  With
:math:`P^{-1} = \\operatorname{diag}(d) - UV^T` (:meth:`BuiltPreconditioner.inverse_parts`) the exact
part is :math:`\\sum_i d_i\\,\\partial\\hat K_{ii} - \\sum_c u_c^T\\partial\\hat K v_c`: ``k`` more column
pairs in the same derivative pass, and :math:`\\partial\\hat K_{ii}` is known in closed form for
stationary kernels (:math:`k(x,x) = s`: 1 for the outputscale and the noise, 0 for lengthscales).

Cost: the derivative pass of the backward grows from ``t`` to ``t + k`` column pairs (``(2d + 2)``
product columns each for ARD); the forward is unchanged.  That is cheap for small ``n k`` and can
exceed the whole CG solve at scale, so ``auto`` weighs it (:func:`use_control_variate`).
"""

from __future__ import annotations

import torch

from ..operators.autotune import chunks  # the fused kernels' 16-column unit of work

__all__ = ["control_variate_affordable", "derivative_width", "trace_columns", "trace_pairs", "use_control_variate"]

#: ``auto`` uses the control variate when the preconditioner's unexplained kernel mass is at most this
#: fraction of the noise: :math:`\\operatorname{tr}(K - LL^T) \\le \\text{ratio}\\cdot n\\sigma^2`.
CONTROL_VARIATE_RATIO = 1.0
#: ... and when its cost is bounded: the ``k w`` extra derivative columns (``k`` the preconditioner's
#: rank, ``w`` derivative columns per pair: 1 for a shared lengthscale, ``2d + 2`` for ARD) are taken
#: when ``n^2 k w`` is at most this many column-pair evaluations (about a second of products) ...
CONTROL_VARIATE_FREE_WORK = 2**33
#: ... or when, in 16-column chunks (the fused kernels' unit of work), they cost at most about a CG
#: solve: this many products of the ``t + 1`` solve columns.
CONTROL_VARIATE_SOLVE_PRODUCTS = 32


def use_control_variate(P, kernel_trace: float | None, num_probes: int = 0, derivative_width: int = 1) -> bool:
    """Whether the control variate lowers the variance at a bounded cost, decided from ``P`` alone.

    The remainder estimator involves :math:`\\hat K^{-1} - P^{-1} = P^{-1/2}(M^{-1} - I)P^{-1/2}` with
    :math:`M = P^{-1/2}\\hat K P^{-1/2}`; the plain one :math:`P^{-1/2} M^{-1} P^{-1/2}`.  For
    :math:`P = LL^T + \\sigma^2 I` with :math:`LL^T \\preceq K` (pivoted / randomly pivoted Cholesky,
    Nyström) the eigenvalues of :math:`M` lie in :math:`[1, 1 + \\lambda_{\\max}(K - LL^T)/\\sigma^2]`:
    when the residual is small against the noise, :math:`M^{-1} - I` is small and the control variate
    removes most of the variance; when it is large, :math:`M^{-1} - I \\approx -I` on the unexplained
    directions and the control variate *adds* :math:`\\sigma^{-2}`-sized noise (measured: 10x the
    plain estimator's spread for a rank-20 preconditioner at noise 0.05).  The rule uses the
    average residual eigenvalue :math:`\\operatorname{tr}(K - LL^T)/n` -- a deterministic function of
    ``P`` and ``K``, so the estimator stays unbiased.

    Cost (:func:`control_variate_affordable`): the exact part adds ``k`` column pairs to the derivative
    pass, ``k (2d + 2)`` product columns for ARD.  At n = 1M with a rank-2000 preconditioner that is
    ~36 000 columns -- thousands of products, against the CG solve's ~40 -- so past a small absolute
    amount it is used only where it costs about a solve or less.  The rule reads ``n``, ``k``, ``t``
    and ``w`` only (never iteration counts), so every rank of a distributed run decides alike.
    """
    L, noise = getattr(P, "L", None), getattr(P, "noise", None)
    if L is None or noise is None or kernel_trace is None or getattr(P, "rank", 0) == 0:
        return False
    n, k = L.shape
    if not control_variate_affordable(n, k, num_probes, derivative_width):
        return False
    residual = float(kernel_trace) - float((L.to(torch.float64) ** 2).sum())
    return residual <= CONTROL_VARIATE_RATIO * n * float(noise)


def derivative_width(lengthscale: torch.Tensor, d: int) -> int:
    """Product columns per column pair of the derivative pass: ``2d + 2`` for ARD lengthscales
    (:mod:`gpscale.operators.fused_derivatives`), 1 for a shared one."""
    return 2 * d + 2 if lengthscale.dim() > 0 else 1


def control_variate_affordable(n: int, rank: int, num_probes: int, derivative_width: int = 1) -> bool:
    """Whether ``rank`` extra column pairs in the derivative pass are cheap enough (see above)."""
    extra = rank * max(1, derivative_width)
    if n * n * extra <= CONTROL_VARIATE_FREE_WORK:
        return True
    return chunks(extra) <= CONTROL_VARIATE_SOLVE_PRODUCTS * chunks(num_probes + 1)


def trace_pairs(ps, weight, control_variate="auto", kernel_trace: float | None = None, derivative_width: int = 1):
    """Column pairs for ``weight * tr(K̂⁻¹ ∂K̂)`` through :func:`gpscale.operators.bilinear_derivative`.

    Parameters
    ----------
    ps : ProbeSolve
        The probe solves (``ps.cg.x[:, :t]`` are :math:`\\hat K^{-1}z_i`).
    weight : float or 0-d tensor
        Multiplies the trace (e.g. ``-1/2`` for the MLL gradient).
    control_variate : {"auto", True, False}
        Use the exact :math:`\\operatorname{tr}(P^{-1}\\partial\\hat K)` (needs a low-rank preconditioner
        exposing :meth:`inverse_parts`); ``auto`` decides with :func:`use_control_variate`.
    kernel_trace : float, optional
        :math:`\\operatorname{tr}(K)` without the noise (``n * outputscale`` for stationary kernels);
        needed by ``auto``.
    derivative_width : int
        Product columns per column pair in the derivative pass (1 for a shared lengthscale,
        ``2d + 2`` for ARD): ``auto`` weighs the control variate's cost with it.

    Returns
    -------
    A, B : (n, m) tensors
        ``weight * tr(K̂⁻¹ ∂_θ K̂) ≈ Σ_c A_cᵀ ∂_θK̂ B_c + const[θ]``.
    const : dict
        Closed-form additions per hyperparameter (``lengthscale``, ``outputscale``, ``noise``).
    """
    return trace_columns(ps.cg.x[:, :ps.num_probes], ps.precond_probes, ps.num_probes, ps.preconditioner, weight,
                         control_variate, kernel_trace, derivative_width=derivative_width)


def trace_columns(U, PZ, num_probes: int, P, weight, control_variate="auto", kernel_trace=None,
                  include_exact: bool = True, derivative_width: int = 1):
    """:func:`trace_pairs` from raw pieces: a share of the probe columns (distributed column split).

    ``U``, ``PZ`` may hold only some of the ``num_probes`` columns (the remainder terms add up over
    shares); ``include_exact=False`` leaves out the exact :math:`\\operatorname{tr}(P^{-1}\\partial\\hat K)`
    part (columns and constants), which exactly one share must include.
    """
    t = num_probes
    if control_variate == "auto":
        control_variate = use_control_variate(P, kernel_trace, num_probes, derivative_width)
    parts = P.inverse_parts() if control_variate and getattr(P, "rank", 0) > 0 else None
    zero = {"lengthscale": 0.0, "outputscale": 0.0, "noise": 0.0}
    if parts is None:
        return U, PZ * (weight / t), zero
    if not include_exact:
        return U - PZ, PZ * (weight / t), zero
    d, Ul, Vl = parts
    A = torch.cat([U - PZ, Ul.to(U.dtype)], dim=1)
    B = torch.cat([PZ * (weight / t), Vl.to(U.dtype) * (-weight)], dim=1)
    diag = d.to(torch.float64).sum() * weight
    return A, B, {"lengthscale": 0.0, "outputscale": diag, "noise": diag}
