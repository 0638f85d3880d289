"""Row partition of :math:`\\hat K = K(X, X) + \\sigma^2 I`: the upper-triangle tiles shared over the row group.

The kernel is symmetric, so one process evaluates only the upper triangle of tiles (``n^2 / 2``
entries) and applies each off-diagonal tile twice.  A row group of ``R`` ranks keeps that saving:
every rank builds the same symmetric tiling and owns a balanced share of its upper-triangle tiles
(greedy by area, the same on every rank), so its tile work and tile cache are ``n^2 / (2R)``.  (Plain
row blocks ``K(X[r0:r1], X)`` are ``n^2 / R`` each: at ``R = 2`` every rank did the whole 1-rank
work -- measured: strong scaling 54% on 2 ranks.)  ``X`` is replicated (``O(nd)``).

**CG vectors are replicated.**  Every rank keeps the full ``(n, t)`` CG state and runs the same
recurrences; a product computes this rank's partial ``sum over owned tiles`` and one all-gather
brings every partial to every rank, which adds them in rank order -- bitwise the same sum
everywhere, so every rank takes the same convergence decisions.  That is exactly one collective per
iteration; the price is ``O(n t)`` vector work and memory per rank, small next to the kernel work.

Message per product: ``n t + 1`` numbers from each rank (a partial product and a failure flag).
"""

from __future__ import annotations

import math

import torch

from ..operators import KernelOperator, bilinear_derivative
from ..operators.blocking import plan_symmetric_tiling
from .comm import all_gather_vector


def share_tiles(tiles: list, parts: int, index: int) -> list:
    """Rank ``index``'s share of ``tiles`` (``(i0, i1, j0, j1)``): greedy by area, largest first.

    Deterministic (ties go to the lowest rank), so every rank computes the same assignment; tile
    order within a share follows the original order.  Shares differ by at most one tile's area.
    """
    if not (isinstance(parts, int) and parts >= 1 and isinstance(index, int) and 0 <= index < parts):
        raise ValueError(f"share_tiles needs parts >= 1 and 0 <= index < parts (ints), got parts={parts!r}, "
                         f"index={index!r}")
    load = [0] * parts
    owner = [0] * len(tiles)
    for k in sorted(range(len(tiles)), key=lambda k: -(tiles[k][1] - tiles[k][0]) * (tiles[k][3] - tiles[k][2])):
        r = min(range(parts), key=lambda p: (load[p], p))
        owner[k] = r
        load[r] += (tiles[k][1] - tiles[k][0]) * (tiles[k][3] - tiles[k][2])
    return [t for t, r in zip(tiles, owner) if r == index]


class RowBlockOperator:
    """:math:`\\hat K` shared over a row group; ``matmul`` returns the full product on every rank.

    Parameters
    ----------
    X : (n, d) tensor, identical on every rank
    kernel : StationaryKernel
    noise : float or 0-d tensor
    grid : ProcessGrid
        Gives the rank's index in its row group and the group.
    memory_budget : int, optional
        Bytes for this rank's tiles (cache + workspace).

    Notes
    -----
    A product with ``t`` columns costs :math:`O(n^2 (d + t) / (2R))` here and one all-gather of
    ``n t + 1`` numbers per rank.  ``shape``, ``dtype`` and ``device`` make it a drop-in operator for
    :class:`gpscale.ConjugateGradients`.
    """

    def __init__(self, X: torch.Tensor, kernel, noise, grid, memory_budget=None):
        n = X.shape[0]
        if n < grid.rows:
            raise ValueError(f"the row partition needs at least one row per rank: n={n} < {grid.rows} row ranks")
        self.grid, self.n = grid, n
        # backend="torch": the tiled path, whose tile list is what the ranks share.  At least ~8 tiles
        # per rank (k(k+1)/2 upper tiles for k = ceil(sqrt(16 R)) tile rows), so that the greedy share
        # is balanced to about one tile in eight, whatever tile size the memory budget alone would give.
        tile = plan_symmetric_tiling(n, X.dtype, X.device, memory_budget).tile
        tile = max(1, min(tile, -(-n // math.ceil(math.sqrt(16 * grid.rows)))))
        self.block = KernelOperator(X, kernel, noise=noise, memory_budget=memory_budget, tile=tile, backend="torch")
        self.block._tiles = share_tiles(self.block._tiles, grid.rows, grid.row_index)
        self.noise = self.block._noise_value  # read and checked once, by the block
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
        """This rank's partial :math:`K V` over its tiles (no noise), shape ``(n, t)``."""
        return self.block._profile_matmul(V).mul_(self.block.outputscale)

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """:math:`\\hat K V` (full, on every rank): partial products, one all-gather, sum in rank order."""
        V2 = V[:, None] if V.dim() == 1 else V
        self.num_products += 1
        group, name = self.grid.row_group, "row-share all_gather"
        try:
            local = self.local_matmul(V2)
        except Exception:
            all_gather_vector(torch.zeros(V2.numel(), dtype=V2.dtype, device=V2.device), failed=True,
                              group=group, name=name)
            raise
        parts = all_gather_vector(local.reshape(-1), group=group, name=name)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        out = out.reshape(V2.shape).add_(V2, alpha=self.noise)
        return out[:, 0] if V.dim() == 1 else out

    __matmul__ = matmul


@torch.no_grad()
def row_bilinear_derivative(op: RowBlockOperator, A: torch.Tensor, B: torch.Tensor) -> dict:
    """This rank's share of :math:`\\sum_c a_c^T (\\partial\\hat K/\\partial\\theta) b_c`: sum over ranks for the total.

    Parameters
    ----------
    op : RowBlockOperator
    A, B : (n, t) tensors (full, identical on every rank)

    Returns
    -------
    dict with ``lengthscale`` (0-d or ``(d,)``), ``outputscale``, ``noise``: the partial sums over this
    rank's tiles (each off-diagonal tile standing for its transpose too, as in
    :func:`gpscale.operators.bilinear_derivative`); the noise term only on row rank 0.

    Notes
    -----
    :math:`O(n^2 (t + d) / (2R))`.
    """
    res = bilinear_derivative(op.block, A, B)
    if not op.grid.counts_replicated:
        res["noise"] = torch.zeros_like(res["noise"])
    return res
