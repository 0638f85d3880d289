"""Diagonal (Jacobi) preconditioner and the explicit "no preconditioner" factory.

For a stationary kernel the diagonal of :math:`\\hat K = K + \\sigma^2 I` is the constant
:math:`s f(0) + \\sigma^2`, so Jacobi is a multiple of the identity: CG runs the iterates of the
unpreconditioned solve (CG is invariant to a scalar preconditioner; only rounding differs), and
only the log-det split :math:`\\log|P| + \\operatorname{tr}\\log(P^{-1}\\hat K)` and the probe scale
change.  It is kept as the classical baseline and for operators with a non-constant diagonal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import BuiltPreconditioner, Identity, Preconditioner, operator_scales, spectrum_floor_from


class Diagonal(BuiltPreconditioner):
    """:math:`P = \\operatorname{diag}(d)` with :math:`d > 0`.

    Parameters
    ----------
    d : (n,) tensor, all entries > 0
    stats : dict, optional
    noise, kernel_scale : float, optional
        :math:`\\sigma^2` and the largest kernel diagonal of the operator, for :meth:`spectrum_floor`.

    Notes
    -----
    Solve, log-det and sampling are :math:`O(n)` per column.
    """

    def __init__(self, d: torch.Tensor, stats: dict | None = None, noise: float | None = None,
                 kernel_scale: float | None = None):
        if d.dim() != 1:
            raise ValueError(f"the diagonal must be 1-D, got shape {tuple(d.shape)}")
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            raise ValueError("a diagonal preconditioner needs finite entries > 0")
        self.d = d
        self.noise, self.kernel_scale = noise, kernel_scale
        self.rank = 0
        self._logdet = d.to(torch.float64).log().sum()
        self.stats = dict(stats or {}, rank=0)

    def solve(self, R):
        return R / (self.d if R.dim() == 1 else self.d[:, None])

    def logdet(self):
        return self._logdet.to(self.d.dtype)

    def sample(self, num, generator=None):
        z = torch.randn(self.d.shape[0], num, dtype=self.d.dtype, device=self.d.device, generator=generator)
        return z * self.d.sqrt()[:, None]

    def spectrum_floor(self) -> float:
        # lambda_min(D^-1/2 K^ D^-1/2) >= lambda_min(K^) / max(d) >= noise / max(d).
        if self.noise is None:
            return 0.0
        exact = self.noise / float(self.d.max())
        return spectrum_floor_from(self.d.dtype, self.d.shape[0], 0, self.kernel_scale, self.noise, exact)

    def inverse_parts(self):
        empty = torch.zeros(self.d.shape[0], 0, dtype=self.d.dtype, device=self.d.device)
        return 1.0 / self.d, empty, empty

    def to_dense(self) -> torch.Tensor:
        """Dense :math:`P` (tests only)."""
        return torch.diag(self.d)


@dataclass(frozen=True)
class Jacobi(Preconditioner):
    """Jacobi preconditioner :math:`P = \\operatorname{diag}(\\hat K)` (kernel diagonal plus noise).

    Notes
    -----
    Build: the diagonal only, :math:`O(n)`; reads ``op.diagonal()`` when the operator has it,
    otherwise ``op.kernel_diagonal() + op.noise``.  See the module notes: for stationary kernels it
    does not change CG's iteration count.
    """

    def build(self, op) -> Diagonal:
        t0 = time.perf_counter()
        d = op.diagonal() if hasattr(op, "diagonal") else op.kernel_diagonal() + op.noise
        noise, scale = operator_scales(op)
        return Diagonal(d.clone(), {"name": "jacobi", "build_seconds": time.perf_counter() - t0}, noise=noise,
                        kernel_scale=scale)


@dataclass(frozen=True)
class NoPreconditioner(Preconditioner):
    """The explicit "none" factory: builds :class:`~gpscale.precond.base.Identity` (:math:`P = I`).

    Equivalent to passing ``preconditioner=None``; useful where a factory object is required
    (benchmark arms, configuration files).
    """

    def build(self, op) -> Identity:
        return Identity.for_operator(op)
