"""Row partition of :math:`\\hat K = K(X, X) + \\sigma^2 I`: one block of rows per rank.

Rank ``r`` of a row group of ``R`` ranks owns rows ``[r0, r1)`` (blocks of ``ceil(n / R)``) and holds
them as a :class:`~gpscale.CrossKernelOperator` ``K(X[r0:r1], X)`` (``X`` is replicated: ``O(nd)``),
so its tile cache and tile work are ``1/R`` of the whole matrix.

**CG vectors are replicated.**  Every rank keeps the full ``(n, t)`` CG state and runs the same
recurrences; a product computes the local block ``\\hat K[r0:r1] V`` and one all-gather assembles
``\\hat K V`` on every rank.  That is exactly one collective per iteration (a sharded state would
need an extra all-reduce for the inner products of every step), and since the gathered product is
bitwise the same everywhere, every rank takes the same convergence decisions.  The price is
``O(n t)`` vector work and memory per rank, small next to the ``O(n^2 t / R)`` kernel work.

Message per product: ``(ceil(n / R) + 1) t`` numbers from each rank (``n t`` in total).
"""

from __future__ import annotations

import torch

from ..operators import CrossKernelOperator
from .comm import gather_rows


class _RowBlock(CrossKernelOperator):
    """``K(X[r0:r1], X)`` whose entries on the global diagonal are computed from an exact ``q = 0``.

    The base class zeroes the distance on the diagonal only for ``K(X, X)``; a row block is a cross
    operator, so this subclass applies the same rule at the row offset (without it the Matérn-1/2
    derivative, which diverges like ``1/sqrt(q)``, would see the ``O(eps)`` round-off of ``q_ii``).
    """

    def __init__(self, X, r0: int, r1: int, kernel, memory_budget=None):
        # backend="torch": the tiled pure-torch path, whose tiles go through _zero_diagonal below.
        super().__init__(X[r0:r1], X, kernel, memory_budget=memory_budget, backend="torch")
        self.offset = r0

    def _zero_diagonal(self, t, i0, i1, j0, j1):
        lo, hi = max(i0 + self.offset, j0), min(i1 + self.offset, j1)
        if lo < hi:
            r = torch.arange(lo, hi, device=t.device)
            t[r - self.offset - i0, r - j0] = 0.0
        return t


class RowBlockOperator:
    """:math:`\\hat K` distributed by rows over a row group; ``matmul`` returns the full product on every rank.

    Parameters
    ----------
    X : (n, d) tensor, identical on every rank
    kernel : StationaryKernel
    noise : float or 0-d tensor
    grid : ProcessGrid
        Gives the rank's row range and the row group.
    memory_budget : int, optional
        Bytes for this rank's block (cache + tiles).

    Notes
    -----
    A product with ``t`` columns costs :math:`O(n^2 (d + t) / R)` here and one all-gather of
    ``n t`` numbers.  ``shape``, ``dtype`` and ``device`` make it a drop-in operator for
    :class:`gpscale.ConjugateGradients`.
    """

    def __init__(self, X: torch.Tensor, kernel, noise, grid, memory_budget=None):
        n = X.shape[0]
        if n < grid.rows:
            raise ValueError(f"the row partition needs at least one row per rank: n={n} < {grid.rows} row ranks")
        self.grid, self.n = grid, n
        self.r0, self.r1 = grid.row_range(n)
        self.block = _RowBlock(X, self.r0, self.r1, kernel, memory_budget=memory_budget)
        self.noise = float(noise.detach() if isinstance(noise, torch.Tensor) else noise)
        self.X, self.kernel = X, kernel
        self.num_products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    @property
    def device(self) -> torch.device:
        return self.X.device

    def local_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """This rank's rows of :math:`\\hat K V`, shape ``(r1 - r0, t)``."""
        return self.block.matmul(V).add_(V[self.r0:self.r1], alpha=self.noise)

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """:math:`\\hat K V` (full, on every rank): local block product, then one all-gather."""
        V2 = V[:, None] if V.dim() == 1 else V
        self.num_products += 1
        try:
            local = self.local_matmul(V2)
        except Exception:
            gather_rows(None, V2, self.n, self.grid.row_group, self.grid.rows)
            raise
        out = gather_rows(local, V2, self.n, self.grid.row_group, self.grid.rows)
        return out[:, 0] if V.dim() == 1 else out

    __matmul__ = matmul


@torch.no_grad()
def row_bilinear_derivative(op: RowBlockOperator, A: torch.Tensor, B: torch.Tensor) -> dict:
    """This rank's rows of :math:`\\sum_c a_c^T (\\partial\\hat K/\\partial\\theta) b_c`: sum over ranks for the total.

    Parameters
    ----------
    op : RowBlockOperator
    A, B : (n, t) tensors (full rows; only ``A[r0:r1]`` meets the block)

    Returns
    -------
    dict with ``lengthscale`` (0-d or ``(d,)``), ``outputscale``, ``noise``: the partial sums over
    ``i in [r0, r1)`` and all ``j`` of :math:`(A B^T)_{ij}\\,\\partial\\hat K_{ij}/\\partial\\theta`.

    Notes
    -----
    Same expansion as :func:`gpscale.operators.bilinear_derivative` (one pass over the tiles, ARD
    lengthscales from three small products per tile) on the rank's rectangle of tiles:
    :math:`O(n^2 (t + d) / R)`.
    """
    blk, r0, r1 = op.block, op.r0, op.r1
    ls, s = blk.lengthscale, blk.outputscale
    ard = ls.dim() == 1
    center = op.X[r0:r1].mean(0)
    Xc = (op.X - center) / ls
    Xr, X2 = Xc[r0:r1], Xc.pow(2)
    X2r = X2[r0:r1]
    acc_s = torch.zeros((), dtype=A.dtype, device=A.device)
    acc_l = torch.zeros(Xc.shape[1] if ard else (), dtype=A.dtype, device=A.device)
    for i0, i1 in blk.tiling.row_tiles(r1 - r0):
        for j0, j1 in blk.tiling.col_tiles(op.n):
            q = blk.scaled_sqdist(i0, i1, j0, j1)
            f, fp = op.kernel.profile_and_derivative(q)
            M = A[r0 + i0:r0 + i1] @ B[j0:j1].T
            acc_s += (M * f).sum()
            G = M.mul_(fp)
            if not ard:
                acc_l += (G * q).sum()
                continue
            acc_l += (X2r[i0:i1].T @ G.sum(1) - 2 * (Xr[i0:i1] * (G @ Xc[j0:j1])).sum(0)
                      + X2[j0:j1].T @ G.sum(0))
    noise = (A[r0:r1] * B[r0:r1]).sum()
    return {"lengthscale": acc_l * (-2.0 * s / ls), "outputscale": acc_s, "noise": noise}
