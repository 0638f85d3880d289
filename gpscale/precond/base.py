"""The preconditioner interface and the low-rank-plus-diagonal (Woodbury) preconditioner.

A *preconditioner factory* is a frozen dataclass of configuration (``PivotedCholesky(rank=50)``);
``factory.build(op)`` reads the operator through row and diagonal access (or products) and returns
a *built* preconditioner, which offers everything the solvers and estimators need:

* ``solve(R)`` -- :math:`P^{-1} R`,
* ``logdet()`` -- :math:`\\log|P|` exactly,
* ``sample(num, generator)`` -- columns :math:`z \\sim N(0, P)` (the probes of the preconditioned
  log-det estimator, Wenger et al. 2022),
* ``rank`` and ``stats`` (construction statistics).

Siblings (RPCholesky, Nyström, Jacobi) implement :class:`Preconditioner` and usually return a
:class:`LowRankPlusDiagonal`.
"""

from __future__ import annotations

import abc
import math

import torch


class BuiltPreconditioner(abc.ABC):
    """A preconditioner :math:`P \\approx \\hat K`, ready to apply."""

    rank: int = 0
    stats: dict

    @abc.abstractmethod
    def solve(self, R: torch.Tensor) -> torch.Tensor:
        """:math:`P^{-1} R` as a new tensor."""

    @abc.abstractmethod
    def logdet(self) -> torch.Tensor:
        """:math:`\\log |P|` (0-d tensor)."""

    @abc.abstractmethod
    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, num)`` samples from :math:`N(0, P)`."""

    def inverse_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(d, U, V)`` with :math:`P^{-1} = \\operatorname{diag}(d) - U V^T`, or ``None`` if unknown.

        Lets :func:`gpscale.logdet.trace.trace_pairs` compute :math:`\\operatorname{tr}(P^{-1}\\partial\\hat K)`
        exactly (the control variate of the preconditioned trace estimator).  ``U``, ``V`` are
        ``(n, k)``; ``d`` is ``(n,)``.
        """
        return None


class Preconditioner(abc.ABC):
    """Factory interface: configuration in, :class:`BuiltPreconditioner` out."""

    @abc.abstractmethod
    def build(self, op) -> BuiltPreconditioner:
        """Construct from a :class:`~gpscale.KernelOperator` (``K + noise I``)."""


class Identity(BuiltPreconditioner):
    """:math:`P = I`: no preconditioning (probes are standard normal, :math:`\\log|P| = 0`)."""

    def __init__(self, n: int, dtype=torch.float64, device=None):
        self.n, self.dtype, self.device = n, dtype, device
        self.stats = {"name": "none", "rank": 0, "build_seconds": 0.0}

    def solve(self, R):
        return R.clone()

    def logdet(self):
        return torch.zeros((), dtype=self.dtype, device=self.device)

    def sample(self, num, generator=None):
        return torch.randn(self.n, num, dtype=self.dtype, device=self.device, generator=generator)

    def inverse_parts(self):
        empty = torch.zeros(self.n, 0, dtype=self.dtype, device=self.device)
        return torch.ones(self.n, dtype=self.dtype, device=self.device), empty, empty


class LowRankPlusDiagonal(BuiltPreconditioner):
    """:math:`P = L L^T + \\sigma^2 I` applied through the Woodbury identity.

    .. math::
        P^{-1} R = \\sigma^{-2}\\big(R - L (\\sigma^2 I_k + L^T L)^{-1} L^T R\\big), \\qquad
        \\log|P| = (n-k)\\log\\sigma^2 + \\log|\\sigma^2 I_k + L^T L| .

    The ``k x k`` capacitance matrix is factorised once in float64 (it is tiny, and float32 loses
    it when :math:`\\sigma^2` is small against :math:`\\|L\\|^2`).  Each solve costs :math:`O(nk)`
    per column; build :math:`O(nk^2)`.

    Parameters
    ----------
    L : (n, k) tensor
    noise : float or 0-d tensor, > 0
    stats : dict, optional
    """

    def __init__(self, L: torch.Tensor, noise, stats: dict | None = None):
        self.L = L
        self.noise = float(noise)
        if not self.noise > 0:
            raise ValueError(f"the preconditioner's noise must be > 0, got {self.noise}")
        n, k = L.shape
        self.rank = k
        self._L64 = L if L.dtype == torch.float64 else L.to(torch.float64)  # O(nk): see solve()
        cap = self._L64.T @ self._L64
        cap.diagonal().add_(self.noise)
        self._chol = torch.linalg.cholesky(cap)
        self._logdet = (n - k) * math.log(self.noise) + 2 * self._chol.diagonal().log().sum()
        self.stats = dict(stats or {}, rank=k)

    def solve(self, R):
        if self.rank == 0:
            return R / self.noise
        R2 = (R[:, None] if R.dim() == 1 else R).to(torch.float64)
        # The whole correction runs in float64: R - L C^{-1} L^T R cancels almost completely along
        # the large eigendirections, and in float32 the leftover rounding (amplified by 1/noise) made
        # preconditioned CG diverge at small noise (20k points, noise 0.1: residual 752 vs 26 its).
        corr = torch.cholesky_solve(self._L64.T @ R2, self._chol)
        out = ((R2 - self._L64 @ corr) / self.noise).to(R.dtype)
        return out[:, 0] if R.dim() == 1 else out

    def logdet(self):
        return self._logdet.to(self.L.dtype)

    def sample(self, num, generator=None):
        n, k = self.L.shape
        kw = dict(dtype=self.L.dtype, device=self.L.device, generator=generator)
        z = math.sqrt(self.noise) * torch.randn(n, num, **kw)
        if k:
            z += self.L @ torch.randn(k, num, **kw)
        return z

    def inverse_parts(self):
        # P^{-1} = σ⁻² I - σ⁻² L C⁻¹ Lᵀ with C = σ² I_k + LᵀL (C⁻¹ applied in float64, as in solve()).
        n = self.L.shape[0]
        d = torch.full((n,), 1.0 / self.noise, dtype=self.L.dtype, device=self.L.device)
        U = (torch.cholesky_solve(self._L64.T, self._chol).T / self.noise).to(self.L.dtype)
        return d, U, self.L

    def to_dense(self) -> torch.Tensor:
        """Dense :math:`P` (tests only)."""
        P = self.L @ self.L.T
        P.diagonal().add_(self.noise)
        return P
