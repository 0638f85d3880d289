"""Squared-exponential (RBF) kernel."""

from __future__ import annotations

import torch

from .base import StationaryKernel


class RBF(StationaryKernel):
    """RBF kernel :math:`k(x,z) = s\\,\\exp(-\\tfrac12 \\|(x-z)/\\ell\\|^2)`.

    Parameters
    ----------
    lengthscale : float or tensor, default 1.0
        Scalar (shared) or shape ``(d,)`` (ARD).
    outputscale : float, default 1.0
    ard_num_dims : int, optional

    Examples
    --------
    >>> k = RBF(lengthscale=0.5, outputscale=2.0)
    >>> k_ard = RBF(lengthscale=torch.ones(8))
    """

    name = "rbf"
    # Tiles hold -q/2, so the profile is a bare in-place exp.
    sqdist_scale = -0.5

    def profile(self, q: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * q)

    def profile_derivative(self, q: torch.Tensor) -> torch.Tensor:
        return -0.5 * torch.exp(-0.5 * q)

    def profile_and_derivative(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.exp(-0.5 * q)
        return f, -0.5 * f

    def profile_scaled_(self, u: torch.Tensor, snap: float = 0.0) -> torch.Tensor:
        # u = -q/2 <= 0 up to round-off; exp of a +1e-7 excess is 1 + 1e-7, harmless, so no clamp.
        return u.exp_()

    def profile_(self, q: torch.Tensor) -> torch.Tensor:
        """In-place ``f(q)`` (saves one n-by-m temporary in the blocked products)."""
        return q.mul_(-0.5).exp_()
