"""Gauss-Radau upper bounds on the energy-norm error of (preconditioned) CG, computed on the fly.

Why
---
CG's usual stopping test looks at the residual, but many quantities a GP needs are *energy norms*:
the predictive variance :math:`k_*^T \\hat K^{-1} k_*` is :math:`b^T A^{-1} b` for :math:`b = k_*`,
and with :math:`x_k` from CG, :math:`b^T A^{-1} b - (2 b^T x_k - x_k^T A x_k) = \\|x_\\star - x_k\\|_A^2`.
A small relative residual says little about that error when :math:`A` is ill conditioned (measured
on kin40k at noise 0.0066: ``rtol = 1e-3`` left predictive standard deviations 3.8 % too large),
while a guaranteed bound on :math:`\\|x_\\star - x_k\\|_A^2` lets each column stop exactly when the
quantity is accurate enough.

How
---
CG is the Lanczos process (:mod:`gpscale.solvers.lanczos`), and :math:`\\|x_\\star - x_k\\|_A^2` is the
remainder of a Gauss quadrature rule for :math:`\\int \\lambda^{-1} d\\omega(\\lambda)`.  Replacing the
Gauss rule by the Gauss-Radau rule with one node fixed at :math:`\\mu \\le \\lambda_{\\min}` (of
:math:`P^{-1} A` when preconditioned) turns the remainder into an *upper* bound (Golub & Meurant,
*Matrices, Moments and Quadrature*, 2010, ch. 12).  In CG form it costs two scalars per column and
step (Meurant & Tichy, "On computing quadrature-based bounds for the A-norm of the error in conjugate
gradients", Numer. Algorithms 2013):

.. math::
    \\|x_\\star - x_k\\|_A^2 \\le \\tilde\\gamma_k\\, r_k^T z_k, \\qquad
    \\tilde\\gamma_0 = 1/\\mu, \\qquad
    \\tilde\\gamma_{k+1} = \\frac{\\tilde\\gamma_k - \\alpha_k}{\\mu(\\tilde\\gamma_k - \\alpha_k) + \\beta_k},

with CG's step size :math:`\\alpha_k`, direction update :math:`\\beta_k` and :math:`z = P^{-1} r`.  The
closer :math:`\\mu` is to :math:`\\lambda_{\\min}`, the tighter the bound; with a Nystrom-type
preconditioner (:math:`LL^T \\preceq K`, so :math:`P \\preceq \\hat K` and :math:`\\lambda_{\\min}(P^{-1}\\hat K)
\\ge 1`) the bound was within 1.5x of the true error on UCI data (``benchmarks/predict_variance.py``).
The running sum :math:`\\sum_j \\alpha_j r_j^T z_j` is the matching lower estimate of
:math:`\\|x_\\star - x_0\\|_A^2` (Hestenes & Stiefel 1952).

Departure from the papers: a column whose :math:`\\tilde\\gamma_k - \\alpha_k` is not positive (rounding
after convergence) restarts the recurrence at :math:`1/\\mu`, the trivial bound
:math:`r^T A^{-1} r \\le r^T P^{-1} r / \\mu`, instead of dividing by a non-positive number.
"""

from __future__ import annotations

import torch

from .._validation import check_same, check_tolerance

__all__ = ["RadauBound", "energy_stopping", "second_order_quadratic"]


class RadauBound:
    """Per-column Gauss-Radau upper bound on :math:`\\|x_\\star - x_k\\|_A^2` during batched CG.

    Parameters
    ----------
    mu : float, > 0
        Lower bound on the smallest eigenvalue of :math:`P^{-1} A`.  If it is not one, the bound can
        fail; see :meth:`gpscale.precond.base.BuiltPreconditioner.spectrum_floor`.
    rz : (t,) tensor
        :math:`r_0^T z_0` of every column.
    rtol, atol : float
        A column is done when the bound on :math:`\\|x_\\star - x_k\\|_A` is at most
        ``max(rtol * sqrt(energy), atol)`` (:meth:`met`).
    """

    def __init__(self, mu: float, rz: torch.Tensor, rtol: float = 0.0, atol: float = 0.0):
        if not mu > 0:
            raise ValueError(f"the Gauss-Radau node mu must be > 0 (a lower bound on the spectrum), got {mu!r}")
        self.mu, self.rtol, self.atol = float(mu), float(rtol), float(atol)
        self.gamma = torch.full_like(rz, 1.0 / self.mu)
        self.bound = self.gamma * rz
        self.energy = torch.zeros_like(rz)

    def update(self, alpha: torch.Tensor, beta: torch.Tensor, rz_old: torch.Tensor, rz_new: torch.Tensor,
               active: torch.Tensor) -> torch.Tensor:
        """Advance the columns in ``active`` by one CG step; returns the new bounds (``(t,)``)."""
        gap = self.gamma - alpha
        ok = active & (gap > 0)
        den = torch.where(ok, self.mu * gap + beta, torch.ones_like(gap))
        restart = torch.full_like(gap, 1.0 / self.mu)
        self.gamma = torch.where(ok, gap / den, torch.where(active, restart, self.gamma))
        self.energy = torch.where(active, self.energy + alpha * rz_old, self.energy)
        self.bound = torch.where(active, self.gamma * rz_new, self.bound)
        return self.bound

    @property
    def error_norm(self) -> torch.Tensor:
        """The bound on :math:`\\|x_\\star - x_k\\|_A` (square root of :attr:`bound`), ``(t,)``."""
        return self.bound.clamp_min(0).sqrt()

    def tolerance(self) -> torch.Tensor:
        """``max(rtol * sqrt(energy), atol)`` per column: the threshold on :attr:`error_norm`."""
        return torch.clamp(self.rtol * self.energy.clamp_min(0).sqrt(), min=self.atol)

    def met(self) -> torch.Tensor:
        """Columns whose :attr:`error_norm` is within :meth:`tolerance` (``(t,)`` bool; NaN is not met)."""
        return self.error_norm <= self.tolerance()


def energy_stopping(precond, noise: float, rtol: float) -> dict:
    """CG arguments that stop a column once its squared energy-norm error is certainly ``<= rtol * noise``.

    For :math:`\\hat K = K + \\sigma^2 I` and a column :math:`b = k(X, x_*)`, the squared error
    :math:`\\|x - x^\\star\\|_{\\hat K}^2` is the error of the predictive variance's quadratic form
    (module docstring), so the variance is certified to within ``rtol * noise``; for any other vector
    :math:`c`, :math:`c^T x` errs by at most :math:`\\|c\\|_{\\hat K^{-1}} \\sqrt{\\mathrm{rtol}}\\,\\sigma`
    (Cauchy-Schwarz).

    Parameters
    ----------
    precond : built preconditioner
        A positive :meth:`~gpscale.precond.base.BuiltPreconditioner.spectrum_floor` :math:`\\mu` makes CG
        stop on the Gauss-Radau bound at :math:`\\sqrt{\\mathrm{rtol}\\,\\sigma^2}`.  Without one, CG stops on
        the residual at :math:`\\sigma^2 \\sqrt{\\mathrm{rtol}}`, which implies the same bound since
        :math:`r^T \\hat K^{-1} r \\le \\|r\\|^2 / \\sigma^2` -- safe, but stricter.
    noise : float
        :math:`\\sigma^2 > 0`.
    rtol : float
        Target error relative to the noise variance.

    Returns
    -------
    dict
        ``rtol``, ``atol`` and (with a floor) ``error_floor`` for :func:`gpscale.cg` or
        :class:`gpscale.solvers.cg.ConjugateGradients`.
    """
    rtol = check_tolerance("rtol", rtol)
    if not noise > 0:
        raise ValueError(f"energy_stopping needs the noise variance sigma^2 > 0 (the error scale), got {noise!r}; "
                         "stop on the residual (cg's rtol) for a noise-free system")
    floor = precond.spectrum_floor() if hasattr(precond, "spectrum_floor") else 0.0
    if floor > 0:
        return {"rtol": 0.0, "atol": (rtol * noise) ** 0.5, "error_floor": floor}
    return {"rtol": 0.0, "atol": noise * rtol ** 0.5}


def second_order_quadratic(B: torch.Tensor, V: torch.Tensor, AV: torch.Tensor) -> torch.Tensor:
    """:math:`b_j^T A^{-1} b_j` per column from approximate solutions :math:`v_j \\approx A^{-1} b_j`.

    Evaluates :math:`2 b^T v - v^T A v = b^T v + v^T r` (:math:`r = b - A v`), whose error is
    :math:`b^T A^{-1} b - (2 b^T v - v^T A v) = \\|v - v^\\star\\|_A^2 \\ge 0`: *second* order in the solver's
    error, never an overestimate, and exactly the quantity :func:`energy_stopping` certifies.  The plain
    :math:`b^T v` is first order and can fall on either side -- in floating point CG's Galerkin identity
    :math:`b^T v_k = v_k^T A v_k`, which would make the two agree, is lost (kin40k, n = 2000: by up to 20x
    the certified error).  The matrix form :math:`B^T V + V^T R` (all pairs; its error :math:`E^T A E` is
    positive semi-definite) is what the GPyTorch backend's predictive covariance uses
    (:mod:`gpscale.integrations.gpytorch_predict`).

    Parameters
    ----------
    B, V, AV : (n, t) tensors
        Right-hand sides, approximate solutions and the product :math:`A V` (one extra product of width t).

    Returns
    -------
    (t,) tensor
    """
    if B.dim() != 2 or V.shape != B.shape or AV.shape != B.shape:
        # elementwise products would broadcast a mismatch silently into a wrong answer
        raise ValueError(f"second_order_quadratic needs B, V and AV of one shape (n, t); got {tuple(B.shape)}, "
                         f"{tuple(V.shape)} and {tuple(AV.shape)} (reshape a vector to (n, 1))")
    check_same(B, V, "B", "V")
    check_same(B, AV, "B", "AV")
    return (B * V).sum(0) + (V * (B - AV)).sum(0)
