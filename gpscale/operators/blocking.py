"""Memory budget and tiling for the blocked kernel products.

The blocked path never holds more than one ``rows x cols`` tile of the kernel matrix (plus a few
temporaries of the same size) at once.  Tiles are kept small enough to stay in the CPU's cache: on
a 2-core machine a 20k x 20k RBF product was ~2x faster with 1024 x 4096 tiles than with whole row
panels, because every elementwise pass (distance, exp, scaling) then reads cache instead of DRAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Default total memory budget (bytes) of one kernel operator: kernel-row cache + workspace.
DEFAULT_MEMORY_BUDGET = 1 << 30  # 1 GiB
#: Upper bound of the per-tile workspace (bytes), taken out of the budget before the cache.
MAX_WORKSPACE = 64 << 20  # 64 MiB
#: On CUDA a large budget may spend up to 1/32 of itself, at most this, on the workspace.
MAX_WORKSPACE_CUDA = 1 << 30  # 1 GiB


def workspace_bytes(budget: int, device: torch.device) -> int:
    """Bytes of ``budget`` reserved for tile temporaries (the rest may cache kernel entries).

    ``min(budget / 4, 64 MiB)``, except that on CUDA a budget above 2 GiB may spend up to 1/32 of
    itself (at most 1 GiB): a fully cached product costs one launch pair per tile, and with 64 MiB
    tiles (edge ~2400) a 200k-point kernel has ~3600 of them -- tens of milliseconds of launch and
    Python overhead per product, more than the 16-bit GEMMs themselves.  Budgets up to 2 GiB (the
    default among them) keep the 64 MiB workspace.
    """
    cap = max(MAX_WORKSPACE, min(budget // 32, MAX_WORKSPACE_CUDA)) if device.type == "cuda" else MAX_WORKSPACE
    return min(budget // 4, cap)


@dataclass(frozen=True)
class Tiling:
    """How a ``n x m`` kernel product is cut.

    Attributes
    ----------
    cached_rows : int
        Leading rows of the kernel matrix kept densely in memory (0 = nothing cached, ``n`` = all).
    tile_rows, tile_cols : int
        Tile shape for the rows that are recomputed on every product.
    """

    cached_rows: int
    tile_rows: int
    tile_cols: int
    #: Symmetric operators: square tile edge and the byte budget of the tile cache.
    tile: int = 0
    cache_bytes: int = 0

    def row_tiles(self, n: int, start: int = 0):
        """Yield ``(i0, i1)`` row ranges from ``start`` to ``n``."""
        for i0 in range(start, n, self.tile_rows):
            yield i0, min(i0 + self.tile_rows, n)

    def col_tiles(self, m: int):
        for j0 in range(0, m, self.tile_cols):
            yield j0, min(j0 + self.tile_cols, m)

    def upper_tiles(self, n: int) -> list[tuple[int, int, int, int]]:
        """Square tiles ``(i0, i1, j0, j1)`` with ``i0 <= j0`` covering the upper triangle of ``n x n``.

        A symmetric product uses each off-diagonal tile twice (``K_IJ V_J`` and ``K_IJ^T V_I``), so
        only about half of the kernel entries are ever evaluated or cached.
        """
        edges = list(range(0, n, self.tile)) + [n]
        return [(edges[a], edges[a + 1], edges[b], edges[b + 1])
                for a in range(len(edges) - 1) for b in range(a, len(edges) - 1)]

    def upper_entries(self, n: int) -> int:
        """Kernel entries in :meth:`upper_tiles` (``(n^2 + sum of squared tile edges) / 2``), in O(n / tile).

        Times the element size, this is what caching the whole symmetric kernel takes: the tile cache
        admits tiles in order while they fit ``cache_bytes``, so it holds all of them exactly when
        ``upper_entries(n) * itemsize <= cache_bytes``.
        """
        full, rest = divmod(n, self.tile)
        return (n * n + full * self.tile ** 2 + rest * rest) // 2


def plan_tiling(
    n: int,
    m: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_budget: int | None = None,
    tile_rows: int | None = None,
    tile_cols: int | None = None,
    cache: bool = True,
) -> Tiling:
    """Choose the cache size and tile shape under ``memory_budget`` bytes.

    The workspace (:func:`workspace_bytes`, ``min(budget / 4, 64 MiB)`` up to 2 GiB) is reserved first; the rest may cache leading kernel
    rows (``cache=True``).  When the whole matrix fits, it is cached whole and no tile is recomputed.

    Parameters
    ----------
    n, m : int
        Rows and columns of the kernel matrix.
    memory_budget : int, optional
        Bytes; default :data:`DEFAULT_MEMORY_BUDGET`.
    tile_rows, tile_cols : int, optional
        Override the tile shape (tests use odd sizes that do not divide ``n``).
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    el = torch.empty((), dtype=dtype).element_size()
    workspace = workspace_bytes(budget, device)
    cached = 0
    if cache:
        cached = min(n, max(0, (budget - workspace) // max(1, m * el)))
    if device.type == "cuda":
        # GPUs want large tiles: the work per launch must hide the launch latency.
        default_cols = m
        default_rows = max(1, workspace // (4 * max(1, m) * el))
    else:
        default_cols = min(m, 4096)
        default_rows = 1024
    tc = max(1, min(m, tile_cols or default_cols))
    # Four tile-sized temporaries live at once (distances, profile, its derivative, a product).
    tr_cap = max(1, workspace // (4 * tc * el))
    tr = max(1, min(n, tile_rows or default_rows, tr_cap if tile_rows is None else n))
    return Tiling(cached_rows=int(cached), tile_rows=int(tr), tile_cols=int(tc))


def plan_symmetric_tiling(n: int, dtype: torch.dtype, device: torch.device, memory_budget: int | None = None,
                          tile: int | None = None, cache: bool = True) -> Tiling:
    """Square tiling of a symmetric ``n x n`` kernel matrix under ``memory_budget`` bytes.

    Only upper-triangle tiles are evaluated; up to ``budget - workspace`` bytes of them are cached,
    so a fully cached operator needs about ``n^2 / 2`` entries, half of a dense matrix.
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    el = torch.empty((), dtype=dtype).element_size()
    workspace = workspace_bytes(budget, device)
    if tile is None:
        # A 2048^2 float32 tile is 16 MiB: it stays in a server L3 cache across the elementwise
        # pass and the two products that use it; GPUs prefer bigger tiles.
        tile = 8192 if device.type == "cuda" else 2048
        tile = max(64, min(tile, int((workspace // (3 * el)) ** 0.5)))
    tile = max(1, min(n, int(tile)))
    cache_bytes = max(0, budget - workspace) if cache else 0
    return Tiling(cached_rows=0, tile_rows=tile, tile_cols=tile, tile=tile, cache_bytes=int(cache_bytes))
