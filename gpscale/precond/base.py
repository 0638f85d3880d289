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
    """:math:`P = L L^T + D` with :math:`D = \\sigma^2 I` or :math:`\\sigma^2 I + \\operatorname{diag}(r)`.

    Through the Woodbury identity, with the ``k x k`` capacitance :math:`C = I_k + L^T D^{-1} L`,

    .. math::
        P^{-1} = D^{-1} - D^{-1} L C^{-1} L^T D^{-1}, \\qquad \\log|P| = \\sum_i \\log D_{ii} + \\log|C| ;

    :math:`D = \\sigma^2 I` is the constant case of the same formulas (one code path for both).

    ``r = diag(K - LLᵀ)`` (``residual_diagonal=True`` on the factories) gives ``P`` the diagonal of
    :math:`\\hat K` -- the FITC-style correction of Cutajar, Osborne, Cunningham & Filippone (ICML 2016).
    It centres the unexplained part of the spectrum of :math:`P^{-1}\\hat K` on 1 instead of above it,
    which lowers the spread of the preconditioned log-det estimator when the low-rank part leaves much
    kernel mass unexplained; it can raise :math:`\\kappa(P^{-1}\\hat K)`.  See docs/benchmarks.md
    (``benchmarks/logdet_variance.py``).

    The ``k x k`` capacitance matrix is factorised once in float64 (it is tiny, and float32 loses
    it when :math:`\\sigma^2` is small against :math:`\\|L\\|^2`).  Each solve costs :math:`O(nk)`
    per column; build :math:`O(nk^2)`.

    Parameters
    ----------
    L : (n, k) tensor
    noise : float or 0-d tensor, > 0
    stats : dict, optional
    diagonal : (n,) tensor, optional
        Non-negative entries ``r`` added to the noise on the diagonal of ``D``.
    """

    def __init__(self, L: torch.Tensor, noise, stats: dict | None = None, diagonal: torch.Tensor | None = None):
        self.L = L
        self.noise = float(noise)
        if not self.noise > 0:
            raise ValueError(f"the preconditioner's noise must be > 0, got {self.noise}")
        n, k = L.shape
        self.rank = k
        # Everything below runs in float64 (O(nk) extra memory): R - L C^{-1} L^T R cancels almost
        # completely along the large eigendirections, and in float32 the leftover rounding (amplified
        # by 1/noise) made preconditioned CG diverge at small noise (20k points, noise 0.1: residual
        # 752 vs 26 its).
        self._L64 = L if L.dtype == torch.float64 else L.to(torch.float64)
        self._D = torch.full((n,), self.noise, dtype=torch.float64, device=L.device)
        if diagonal is not None:
            if diagonal.shape != (n,) or not bool(torch.isfinite(diagonal).all()) or bool((diagonal < 0).any()):
                raise ValueError(f"diagonal must be a finite, non-negative ({n},) tensor")
            self._D += diagonal.to(torch.float64)
        self._dinv = 1.0 / self._D
        # One form for both diagonals (sigma^2 I is the constant case): C = I_k + L^T D^{-1} L.
        cap = (self._L64 * self._dinv[:, None]).T @ self._L64
        cap.diagonal().add_(1.0)
        self._chol = torch.linalg.cholesky(cap)
        self._logdet = self._D.log().sum() + 2 * self._chol.diagonal().log().sum()
        self.stats = dict(stats or {}, rank=k, diagonal="residual" if diagonal is not None else "noise")

    def solve(self, R):
        R2 = (R[:, None] if R.dim() == 1 else R).to(torch.float64)
        DR = R2 * self._dinv[:, None]
        if self.rank:
            DR -= self._dinv[:, None] * (self._L64 @ torch.cholesky_solve(self._L64.T @ DR, self._chol))
        out = DR.to(R.dtype)
        return out[:, 0] if R.dim() == 1 else out

    def logdet(self):
        return self._logdet.to(self.L.dtype)

    def sample(self, num, generator=None):
        n, k = self.L.shape
        kw = dict(dtype=self.L.dtype, device=self.L.device, generator=generator)
        z = self._D.sqrt().to(self.L.dtype)[:, None] * torch.randn(n, num, **kw)
        if k:
            z += self.L @ torch.randn(k, num, **kw)
        return z

    def inverse_parts(self):
        # P^{-1} = D⁻¹ - (D⁻¹ L C⁻¹)(D⁻¹ L)ᵀ with C = I_k + Lᵀ D⁻¹ L (C⁻¹ in float64, as in solve()).
        DL = self._L64 * self._dinv[:, None]
        U = torch.cholesky_solve(DL.T, self._chol).T
        return self._dinv.to(self.L.dtype), U.to(self.L.dtype), DL.to(self.L.dtype)

    def to_dense(self) -> torch.Tensor:
        """Dense :math:`P` (tests only)."""
        P = self.L @ self.L.T
        P.diagonal().add_(self._D.to(P.dtype))
        return P


def low_rank_preconditioner(op, L: torch.Tensor, stats: dict, residual_diagonal: bool) -> LowRankPlusDiagonal:
    """The factories' result: :math:`LL^T + \\sigma^2 I`, or with ``residual_diagonal`` the FITC-style
    :math:`LL^T + \\operatorname{diag}(\\sigma^2 + \\operatorname{diag}(K - LL^T))` (residual clamped at 0)."""
    diag = (op.kernel_diagonal().to(L.dtype) - (L * L).sum(1)).clamp_min(0) if residual_diagonal else None
    return LowRankPlusDiagonal(L, op.noise, stats, diagonal=diag)
