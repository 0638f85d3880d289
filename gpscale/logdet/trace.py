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

Cost: the derivative pass of the backward grows from ``t`` to ``t + k`` column pairs; the forward
(the CG solve, ~100x more expensive at scale) is unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["trace_pairs"]


def trace_pairs(ps, weight, control_variate: bool = True):
    """Column pairs for ``weight * tr(K̂⁻¹ ∂K̂)`` through :func:`gpscale.operators.bilinear_derivative`.

    Parameters
    ----------
    ps : ProbeSolve
        The probe solves (``ps.cg.x[:, :t]`` are :math:`\\hat K^{-1}z_i`).
    weight : float or 0-d tensor
        Multiplies the trace (e.g. ``-1/2`` for the MLL gradient).
    control_variate : bool, default True
        Use the exact :math:`\\operatorname{tr}(P^{-1}\\partial\\hat K)` when the preconditioner is low
        rank and exposes :meth:`inverse_parts`; otherwise the plain estimator.

    Returns
    -------
    A, B : (n, m) tensors
        ``weight * tr(K̂⁻¹ ∂_θ K̂) ≈ Σ_c A_cᵀ ∂_θK̂ B_c + const[θ]``.
    const : dict
        Closed-form additions per hyperparameter (``lengthscale``, ``outputscale``, ``noise``).
    """
    t = ps.num_probes
    U, PZ = ps.cg.x[:, :t], ps.precond_probes
    P = ps.preconditioner
    parts = P.inverse_parts() if control_variate and getattr(P, "rank", 0) > 0 else None
    if parts is None:
        return U, PZ * (weight / t), {"lengthscale": 0.0, "outputscale": 0.0, "noise": 0.0}
    d, Ul, Vl = parts
    A = torch.cat([U - PZ, Ul.to(U.dtype)], dim=1)
    B = torch.cat([PZ * (weight / t), Vl.to(U.dtype) * (-weight)], dim=1)
    diag = d.to(torch.float64).sum() * weight
    return A, B, {"lengthscale": 0.0, "outputscale": diag, "noise": diag}
