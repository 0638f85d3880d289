"""Greedy pivoted Cholesky preconditioner (Harbrecht, Peters & Schneider 2012; Gardner et al. 2018)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._validation import check_bool, check_positive_int, check_tolerance
from .base import LowRankPlusDiagonal, Preconditioner, low_rank_preconditioner


def partial_cholesky(op, rank: int, tol: float, choose_pivot) -> tuple[torch.Tensor, dict]:
    """Partial Cholesky of the kernel part ``K`` of ``op`` with a pluggable pivot rule.

    Parameters
    ----------
    op : KernelOperator
        Needs ``kernel_diagonal()`` and ``kernel_rows(idx)``.
    rank : int
        Maximum number of pivots ``k``.
    tol : float
        Stop once the residual trace :math:`\\operatorname{tr}(K - LL^T) \\le \\mathrm{tol}\\cdot\\operatorname{tr}(K)`.
    choose_pivot : callable
        ``choose_pivot(residual_diagonal) -> int``; greedy takes the argmax, RPCholesky samples.

    Returns
    -------
    L : (n, k') tensor with ``k' <= rank``, and statistics.

    Notes
    -----
    Touches ``k'`` kernel rows and the diagonal: :math:`O(n k' d)` kernel evaluations and
    :math:`O(n k'^2)` arithmetic, :math:`O(n k')` memory.
    """
    n = op.shape[0]
    rank = min(rank, n)
    diag = op.kernel_diagonal().clone()
    trace0 = float(diag.sum())
    L = torch.zeros(n, rank, dtype=op.dtype, device=op.device)
    pivots: list[int] = []
    for k in range(rank):
        if float(diag.sum()) <= tol * trace0:
            break
        p = int(choose_pivot(diag))
        dp = float(diag[p])
        if dp <= 0:
            break
        row = op.kernel_rows([p])[0]
        col = row - L[:, :k] @ L[p, :k]
        col /= dp ** 0.5
        L[:, k] = col
        diag.sub_(col * col).clamp_min_(0)
        diag[p] = 0
        pivots.append(p)
    k = len(pivots)
    stats = {"rank": k, "pivots": pivots, "residual_trace": float(diag.sum()), "trace": trace0}
    return L[:, :k].contiguous(), stats


@dataclass(frozen=True)
class PivotedCholesky(Preconditioner):
    """Greedy pivoted-Cholesky preconditioner :math:`P = L_k L_k^T + \\sigma^2 I`.

    Parameters
    ----------
    rank : int, default 15
        Maximum rank ``k`` (GPyTorch's default is 15; 50-200 is usually better at large n).
    tol : float, default 1e-6
        Stop early when the residual trace falls below ``tol * trace(K)``.
    residual_diagonal : bool, default False
        Add :math:`\\operatorname{diag}(K - LL^T)` to the noise on the diagonal of ``P`` (FITC-style,
        Cutajar et al. 2016): ``P`` then has the diagonal of :math:`\\hat K`.  Lowers the spread of the
        log-det estimator when the low-rank part leaves much kernel mass unexplained; may raise the
        CG iterations (see :class:`LowRankPlusDiagonal`).

    Notes
    -----
    Build: ``k`` kernel rows, :math:`O(n k^2)`; apply: :math:`O(n k)` per column (Woodbury).
    Greedy pivoting picks the largest residual diagonal entry, which for stationary kernels is
    close to farthest-point sampling.
    """

    rank: int = 15
    tol: float = 1e-6
    residual_diagonal: bool = False

    def __post_init__(self):
        check_positive_int("rank", self.rank, minimum=0)
        check_tolerance("tol", self.tol)
        check_bool("residual_diagonal", self.residual_diagonal)

    def build(self, op) -> LowRankPlusDiagonal:
        t0 = time.perf_counter()
        L, stats = partial_cholesky(op, self.rank, self.tol, lambda d: torch.argmax(d))
        stats.update(name="pivchol", build_seconds=time.perf_counter() - t0)
        return low_rank_preconditioner(op, L, stats, self.residual_diagonal)
