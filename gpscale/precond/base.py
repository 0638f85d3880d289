"""The preconditioner interface and the low-rank-plus-diagonal (Woodbury) preconditioner.

A *preconditioner factory* is a frozen dataclass of configuration (``PivotedCholesky(rank=50)``);
``factory.build(op)`` reads the operator through row and diagonal access (or products) and returns
a *built* preconditioner, which offers everything the solvers and estimators need:

* ``solve(R)`` -- :math:`P^{-1} R`,
* ``logdet()`` -- :math:`\\log|P|` exactly,
* ``sample(num, generator)`` -- columns :math:`z \\sim N(0, P)` (the probes of the preconditioned
  log-det estimator, Wenger et al. 2022),
* ``rank`` and ``stats`` (construction statistics),
* ``spectrum_floor()`` -- a lower bound on the eigenvalues of :math:`P^{-1}\\hat K` where one is known
  (the node of CG's Gauss-Radau error bounds, :mod:`gpscale.solvers.error_bounds`).

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

    def spectrum_floor(self) -> float:
        """A lower bound :math:`\\mu` on the eigenvalues of :math:`P^{-1}\\hat K`, or ``0.0`` when none is known.

        :math:`\\hat K = K + \\sigma^2 I` is the operator the preconditioner was built from.  The bound
        holds in exact arithmetic and is shrunk by :func:`rounding_margin` for the rounding of the
        kernel entries and the factor; it is ``0.0`` (unknown) when that margin is not small.  It is the
        ``error_floor`` of :class:`gpscale.ConjugateGradients`: a value above the true smallest
        eigenvalue could make the Gauss-Radau bound fail, so implementations must err low.
        """
        return 0.0


def rounding_margin(dtype: torch.dtype, count: float, kernel_scale: float, noise: float) -> float:
    """Relative safety margin :math:`\\delta = 64\\,u\\,c\\,s/\\sigma^2` of a spectrum floor (see below).

    Rounding the kernel entries (size :math:`\\le s`, the largest kernel diagonal) and a rank-``k``
    factor moves :math:`\\lambda_{\\min}(P^{-1}\\hat K)` by a relative amount that grows like
    :math:`u\\, s/\\sigma^2` (unit roundoff ``u``).  Measured on kin40k and protein at n = 3000 with
    rank-100 pivoted Cholesky, RPCholesky and Nystrom factors, in float32 and float64: at most
    :math:`15\\,u\\,k\\,s/\\sigma^2`.  Callers pass ``count = k + sqrt(n)`` and this returns 64 times that,
    so the floor errs low.
    """
    return 64.0 * torch.finfo(dtype).eps * float(count) * float(kernel_scale) / float(noise)


def operator_scales(op) -> tuple[float | None, float | None]:
    """``(noise, largest kernel diagonal)`` of a kernel operator, ``None`` where it does not offer them."""
    noise, kdiag = getattr(op, "noise", None), getattr(op, "kernel_diagonal", None)
    if noise is None or kdiag is None:
        return None, None
    return float(noise), float(kdiag().max())


def spectrum_floor_from(dtype, n: int, rank: int, kernel_scale, noise, exact: float) -> float:
    """``exact * (1 - margin)``, or 0.0 when the scales are unknown or the margin exceeds one half."""
    if kernel_scale is None or noise is None or not noise > 0:
        return 0.0
    delta = rounding_margin(dtype, rank + n ** 0.5, kernel_scale, noise)
    return exact * (1.0 - delta) if delta <= 0.5 else 0.0


class Preconditioner(abc.ABC):
    """Factory interface: configuration in, :class:`BuiltPreconditioner` out."""

    @abc.abstractmethod
    def build(self, op) -> BuiltPreconditioner:
        """Construct from a :class:`~gpscale.KernelOperator` (``K + noise I``)."""


class Identity(BuiltPreconditioner):
    """:math:`P = I`: no preconditioning (probes are standard normal, :math:`\\log|P| = 0`)."""

    def __init__(self, n: int, dtype=torch.float64, device=None, noise: float | None = None,
                 kernel_scale: float | None = None):
        self.n, self.dtype, self.device = n, dtype, device
        self.noise, self.kernel_scale = noise, kernel_scale
        self.stats = {"name": "none", "rank": 0, "build_seconds": 0.0}

    @classmethod
    def for_operator(cls, op) -> "Identity":
        """The identity for ``op``, knowing its noise and kernel scale (for :meth:`spectrum_floor`)."""
        noise, scale = operator_scales(op)
        return cls(op.shape[0], dtype=op.dtype, device=op.device, noise=noise, kernel_scale=scale)

    def spectrum_floor(self) -> float:
        # K is positive semi-definite, so lambda_min(K + noise I) >= noise (0.0 when the noise is unknown).
        return spectrum_floor_from(self.dtype, self.n, 0, self.kernel_scale, self.noise, self.noise)

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
    kernel_scale : float, optional
        The largest kernel diagonal :math:`s`, for :meth:`spectrum_floor`.
    nystrom : bool, default False
        ``LL^T`` is a Nystrom approximation of the kernel (:math:`LL^T \\preceq K`), as every factory here
        builds: then :math:`P \\preceq \\hat K` when ``D`` is :math:`\\sigma^2 I`, and the spectrum floor is 1.
    """

    def __init__(self, L: torch.Tensor, noise, stats: dict | None = None, diagonal: torch.Tensor | None = None,
                 kernel_scale: float | None = None, nystrom: bool = False):
        self.L = L
        self.kernel_scale, self.nystrom = kernel_scale, bool(nystrom)
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

    def spectrum_floor(self) -> float:
        n, k = self.L.shape
        if self.nystrom and self.stats.get("diagonal") == "noise":
            # K - LL^T is PSD (a Schur complement / Nystrom residual), so P = LL^T + noise I <= K + noise I.
            return spectrum_floor_from(self.L.dtype, n, k, self.kernel_scale, self.noise, 1.0)
        # In general lambda_min(P^-1 K^) >= lambda_min(K^) / lambda_max(P) >= noise / (||L||^2 + max D).
        lmax = float(torch.linalg.matrix_norm(self._L64, ord=2)) ** 2 if k else 0.0
        exact = self.noise / (lmax + float(self._D.max()))
        return spectrum_floor_from(self.L.dtype, n, k, self.kernel_scale, self.noise, exact)

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
    kdiag = op.kernel_diagonal().to(L.dtype)
    diag = (kdiag - (L * L).sum(1)).clamp_min(0) if residual_diagonal else None
    return LowRankPlusDiagonal(L, op.noise, stats, diagonal=diag, kernel_scale=float(kdiag.max()), nystrom=True)
