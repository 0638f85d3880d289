"""Matérn kernels, nu in {1/2, 3/2, 5/2}."""

from __future__ import annotations

import torch

from .base import SQRT3, SQRT5, StationaryKernel


def _safe_sqrt(q: torch.Tensor) -> torch.Tensor:
    """``sqrt(q)`` whose autograd derivative is 0 (not NaN) at ``q = 0``.

    The dense reference is differentiated by autograd (Cholesky path); the true derivative of every
    Matérn kernel w.r.t. the hyperparameters vanishes on the diagonal, where ``q = 0``.
    """
    pos = q > 0
    return torch.where(pos, torch.where(pos, q, torch.ones_like(q)).sqrt(), torch.zeros_like(q))


class Matern(StationaryKernel):
    """Matérn kernel with smoothness ``nu`` in ``{0.5, 1.5, 2.5}``.

    With :math:`r = \\|(x-z)/\\ell\\|` and :math:`q = r^2`:

    * ``nu=0.5``: :math:`f = e^{-r}`,
    * ``nu=1.5``: :math:`f = (1+\\sqrt3 r) e^{-\\sqrt3 r}`,
    * ``nu=2.5``: :math:`f = (1+\\sqrt5 r + \\tfrac53 r^2) e^{-\\sqrt5 r}`.

    The derivative :math:`f'(q) = f'(r) / (2r)` is finite at ``r = 0`` for ``nu >= 1.5``.  For
    ``nu = 0.5`` it diverges like :math:`1/r`, but every use multiplies it by a squared coordinate
    difference :math:`\\Delta_d^2 \\le q`, whose product tends to 0; we therefore define it as 0 at
    ``r = 0`` (the limit of the product), not as ``inf``.

    Parameters
    ----------
    nu : {0.5, 1.5, 2.5}, default 2.5
    lengthscale, outputscale, ard_num_dims
        See :class:`~gpscale.kernels.StationaryKernel`.
    """

    def __init__(self, nu: float = 2.5, lengthscale=1.0, outputscale=1.0, ard_num_dims=None):
        if nu not in (0.5, 1.5, 2.5):
            raise ValueError(f"Matern supports nu in (0.5, 1.5, 2.5), got nu={nu!r}")
        super().__init__(lengthscale=lengthscale, outputscale=outputscale, ard_num_dims=ard_num_dims)
        self.nu = float(nu)

    @property
    def name(self) -> str:  # type: ignore[override]
        return {0.5: "matern12", 1.5: "matern32", 2.5: "matern52"}[self.nu]

    def profile(self, q: torch.Tensor) -> torch.Tensor:
        r = _safe_sqrt(q)
        if self.nu == 0.5:
            return torch.exp(-r)
        if self.nu == 1.5:
            a = SQRT3 * r
            return (1 + a) * torch.exp(-a)
        a = SQRT5 * r
        return (1 + a + (5.0 / 3.0) * q) * torch.exp(-a)

    def profile_derivative(self, q: torch.Tensor) -> torch.Tensor:
        return self.profile_and_derivative(q)[1]

    @property
    def snap_near_coincident(self) -> bool:  # f = exp(-sqrt(q)) has a kink at 0 (see StationaryKernel)
        return self.nu == 0.5

    def profile_(self, q: torch.Tensor) -> torch.Tensor:
        """In-place-friendly ``f(q)`` for the no-grad tile passes (plain ``sqrt``: no autograd here)."""
        r = q.clamp_min_(0.0).sqrt()
        if self.nu == 0.5:
            return r.neg_().exp_()
        a = r.mul_(SQRT3 if self.nu == 1.5 else SQRT5)
        e = torch.exp(-a)
        if self.nu == 1.5:
            return a.add_(1.0).mul_(e)
        return a.add_(1.0).add_(q, alpha=5.0 / 3.0).mul_(e)

    def profile_and_derivative(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(q), f'(q))`` for the no-grad derivative passes (``q >= 0`` from the tile GEMM)."""
        r = q.clamp_min(0.0).sqrt()
        if self.nu == 0.5:
            e = torch.exp(-r)
            safe = torch.where(r > 0, r, torch.ones_like(r))
            return e, torch.where(r > 0, -0.5 * e / safe, torch.zeros_like(r))
        if self.nu == 1.5:
            a = SQRT3 * r
            e = torch.exp(-a)
            return (1 + a) * e, -1.5 * e
        a = SQRT5 * r
        e = torch.exp(-a)
        return (1 + a + (5.0 / 3.0) * q) * e, -(5.0 / 6.0) * (1 + a) * e

    def extra_repr(self) -> str:
        return f"nu={self.nu}, " + super().extra_repr()
