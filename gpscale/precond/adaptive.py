"""Adaptive rank: grow a low-rank preconditioner until its residual trace or a memory budget says stop.

Design: one wrapper, :class:`AdaptiveRank`, around any rank-parameterised factory instead of a
``rank="auto"`` mode in each of them.  The stopping rule is the same for every base: the relative
residual trace :math:`\\operatorname{tr}(E) / \\operatorname{tr}(K) \\le \\mathrm{tol}` with
:math:`E = K - LL^T`.  ``E`` is positive semi-definite for every base, so
:math:`\\|P^{-1}\\hat K - I\\|_F = \\|P^{-1}E\\|_F \\le \\operatorname{tr}(E)/\\sigma^2`: the trace
bounds the distance that governs CG's convergence and the variance of the preconditioned log-det
estimator (Wenger et al., ICML 2022).  The memory budget bounds the ``n x k`` factor ``L`` the
built preconditioner keeps: :math:`k \\le \\mathrm{max\\_memory} / (n \\cdot \\mathrm{itemsize})`.

* Partial-Cholesky bases (:class:`~gpscale.precond.PivotedCholesky`,
  :class:`~gpscale.precond.RPCholesky`) already add one pivot (or one accepted block) at a time and
  check the residual trace after each, so the wrapper runs them once with ``rank`` = the cap and
  ``tol`` = the wrapper's tolerance: the chosen rank is the first that meets it.
* Other bases with a ``rank`` field (:class:`~gpscale.precond.Nystrom`) are rebuilt with a doubling
  rank (``initial_rank``, 2x, 4x, ... up to the cap) until the residual trace meets ``tol``; the
  total work is at most about twice that of the final build.

``stats["adaptive"]`` records the tolerance, the memory budget, the rank cap, the chosen rank, the
reached relative residual trace and why it stopped (``"tol"``, ``"memory"``, ``"max_rank"`` or
``"n"``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from .._validation import check_positive_int, check_tolerance
from .base import BuiltPreconditioner, Preconditioner
from .pivoted_cholesky import PivotedCholesky


@dataclass(frozen=True)
class AdaptiveRank(Preconditioner):
    """Choose the rank of a low-rank preconditioner from a residual-trace tolerance and a memory budget.

    Parameters
    ----------
    base : Preconditioner, default ``PivotedCholesky()``
        A frozen-dataclass factory with a ``rank`` field (its own ``rank`` and ``tol`` are replaced).
    tol : float, default 1e-2
        Stop once :math:`\\operatorname{tr}(K - LL^T) \\le \\mathrm{tol}\\cdot\\operatorname{tr}(K)`.
    max_memory : int or None, default 256 MiB
        Bytes allowed for the ``n x k`` factor; ``None`` for no memory cap.
    max_rank : int or None
        Absolute rank cap (``None``: ``n``).
    initial_rank : int, default 32
        First rank of the doubling search (bases without a ``tol`` field only).
    noise_ratio : float or None, default None
        Instead of ``tol``, stop once
        :math:`\\operatorname{tr}(K - LL^T) \\le \\text{noise\\_ratio}\\cdot n\\sigma^2`:
        the unexplained kernel mass measured against the noise.  That ratio, not the relative trace,
        decides how much the preconditioner lowers the spread of the log-det estimator and turns the
        trace estimator's control variate on (``gpscale.logdet.trace``); see docs/benchmarks.md
        (preconditioners, dense study).  The effective relative tolerance is reported in ``stats``.

    Notes
    -----
    Cost: that of the base at the chosen rank (partial Cholesky), or at most about twice it
    (doubling).  Nyström's transient sketch workspace is a few times the factor's size on top.

    Examples
    --------
    >>> P = AdaptiveRank(RPCholesky(block_size=64), tol=1e-3, max_memory=2**30).build(op)
    >>> P.rank, P.stats["adaptive"]["stopped_by"]
    """

    base: Preconditioner = PivotedCholesky()
    tol: float = 1e-2
    max_memory: int | None = 256 * 2 ** 20
    max_rank: int | None = None
    initial_rank: int = 32
    noise_ratio: float | None = None

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.base) or "rank" not in {f.name for f in dataclasses.fields(self.base)}:
            raise TypeError(f"AdaptiveRank needs a factory with a rank field (PivotedCholesky, RPCholesky, "
                            f"Nystrom), got {type(self.base).__name__}")
        check_tolerance("tol", self.tol)
        if self.max_memory is not None:
            check_positive_int("max_memory", self.max_memory)
        if self.max_rank is not None:
            check_positive_int("max_rank", self.max_rank, minimum=0)
        check_positive_int("initial_rank", self.initial_rank)
        if self.noise_ratio is not None and (isinstance(self.noise_ratio, bool) or not (
                isinstance(self.noise_ratio, (int, float)) and self.noise_ratio > 0)):
            raise ValueError(f"noise_ratio must be a positive number or None, got {self.noise_ratio!r}")

    def rank_cap(self, n: int, itemsize: int) -> tuple[int, str]:
        """The largest allowed rank and which limit sets it (``"memory"``, ``"max_rank"`` or ``"n"``)."""
        caps = [(n, "n")]
        if self.max_rank is not None:
            caps.append((self.max_rank, "max_rank"))
        if self.max_memory is not None:
            caps.append((self.max_memory // (n * itemsize), "memory"))
        return min(caps, key=lambda c: c[0])

    def build(self, op) -> BuiltPreconditioner:
        t0 = time.perf_counter()
        n = op.shape[0]
        kdiag = op.kernel_diagonal()
        itemsize = kdiag.element_size()
        cap, limit = self.rank_cap(n, itemsize)
        tol = self._tolerance(kdiag, float(op.noise))
        if "tol" in {f.name for f in dataclasses.fields(self.base)}:
            P, tried = dataclasses.replace(self.base, rank=cap, tol=tol).build(op), [cap]
        else:
            P, tried = self._doubling(op, cap, tol)
        trace = P.stats.get("trace") or 1.0
        rel = P.stats["residual_trace"] / trace
        stopped = "tol" if rel <= tol else limit
        P.stats["adaptive"] = {"tol": tol, "noise_ratio": self.noise_ratio, "max_memory": self.max_memory,
                               "rank_cap": cap, "chosen_rank": P.rank, "relative_residual_trace": rel,
                               "stopped_by": stopped, "ranks_tried": tried, "factor_bytes": n * P.rank * itemsize}
        P.stats["build_seconds"] = time.perf_counter() - t0
        return P

    def _tolerance(self, kdiag: torch.Tensor, noise: float) -> float:
        """The relative residual-trace target: ``tol``, or ``noise_ratio * n * noise / tr(K)``."""
        if self.noise_ratio is None:
            return self.tol
        trace = float(kdiag.to(torch.float64).sum())
        return min(1.0, self.noise_ratio * kdiag.shape[0] * noise / trace) if trace > 0 else self.tol

    def _doubling(self, op, cap: int, tol: float):
        rank, tried = min(self.initial_rank, cap), []
        while True:
            P = dataclasses.replace(self.base, rank=rank).build(op)
            tried.append(rank)
            if P.stats["residual_trace"] <= tol * P.stats["trace"] or rank >= cap:
                return P, tried
            rank = min(2 * rank, cap)
