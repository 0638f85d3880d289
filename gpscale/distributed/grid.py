"""Partition strategies and the 2-D process grid they map onto.

Every strategy is a ``R x C`` grid over the ``p = R C`` ranks of the world:

* ``"columns"`` -- ``R = 1, C = p``: each rank solves a contiguous share of the CG columns
  ``[probes, y]`` (or of the posterior-sample columns) against the whole kernel matrix;
* ``"rows"`` -- ``R = p, C = 1``: each rank owns ``ceil(n / p)`` rows of the kernel matrix and every
  CG product ends with one all-gather of the row blocks;
* ``"hybrid"`` -- ``R`` rows times ``C = p / R`` column groups.

Rank ``g`` sits at row ``g mod R`` of column group ``g div R``: the ranks that exchange row blocks
every iteration are consecutive, i.e. on the same node under ``torchrun``'s rank order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from .comm import require_initialized, share_range

STRATEGIES = ("columns", "rows", "hybrid")


@dataclass(frozen=True)
class Partition:
    """How to split one MLL evaluation (or a batch of posterior samples) over the process group.

    Parameters
    ----------
    strategy : {"columns", "rows", "hybrid"}
    row_ranks : int, optional
        ``R``, the ranks that share one set of columns by splitting the kernel rows (hybrid only;
        it must divide the world size).  Default: the smallest prime factor of the world size, so
        a hybrid of 4 ranks is 2 x 2 and of 8 ranks 2 x 4 (columns need no per-iteration traffic,
        so the grid keeps as few row ranks as possible; raise it when ``n^2 / R`` must fit memory).
    """

    strategy: str = "columns"
    row_ranks: int | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed must be one of {STRATEGIES} (or a gpscale.distributed.Partition), "
                             f"got {self.strategy!r}")
        if self.row_ranks is not None and (not isinstance(self.row_ranks, int) or self.row_ranks < 1):
            raise ValueError(f"row_ranks must be a positive int, got {self.row_ranks!r}")
        if self.row_ranks is not None and self.strategy != "hybrid":
            raise ValueError(f"row_ranks is only used by strategy='hybrid', got strategy={self.strategy!r}")


@dataclass(frozen=True)
class ProcessGrid:
    """This rank's place in an ``R x C`` grid, and the process group of its row ranks.

    Attributes
    ----------
    strategy : str
    rows, cols : int
        ``R`` and ``C`` with ``R C`` = world size.
    rank, row_index, col_index : int
    row_group : ProcessGroup or None
        The ``R`` ranks of this rank's column group (``None`` = the whole world when ``C = 1``).
    """

    strategy: str
    rows: int
    cols: int
    rank: int
    row_index: int
    col_index: int
    row_group: object = field(default=None, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return self.rows * self.cols

    def column_range(self, total: int) -> tuple[int, int]:
        """This column group's contiguous share ``[c0, c1)`` of ``total`` columns (sizes differ by <= 1)."""
        return share_range(total, self.cols, self.col_index)

    def row_range(self, n: int) -> tuple[int, int]:
        """This rank's rows ``[r0, r1)``: blocks of ``ceil(n / R)`` (the last one may be shorter)."""
        b = -(-n // self.rows)
        return min(n, self.row_index * b), min(n, (self.row_index + 1) * b)

    @property
    def counts_replicated(self) -> bool:
        """Whether this rank contributes the quantities its whole row group holds identically."""
        return self.row_index == 0


def _smallest_factor(p: int) -> int:
    for f in range(2, int(p ** 0.5) + 1):
        if p % f == 0:
            return f
    return p


_GROUPS: dict = {}


def _row_groups(rows: int, cols: int):
    """Create (once per process group and shape) the ``C`` row groups; every rank must call this."""
    key = (id(dist.group.WORLD), rows, cols)
    if key not in _GROUPS:
        groups = [dist.new_group(list(range(c * rows, (c + 1) * rows))) for c in range(cols)]
        _GROUPS[key] = groups
    return _GROUPS[key]


def process_grid(distributed) -> ProcessGrid:
    """Resolve ``"columns" | "rows" | "hybrid"`` or a :class:`Partition` into this rank's :class:`ProcessGrid`.

    Needs an initialised ``torch.distributed`` process group; creating the hybrid row groups is a
    collective the first time (every rank must resolve the same partition in the same order).
    """
    part = distributed if isinstance(distributed, Partition) else Partition(str(distributed))
    require_initialized(f"distributed={part.strategy!r}")
    p, g = dist.get_world_size(), dist.get_rank()
    if part.strategy == "columns":
        rows = 1
    elif part.strategy == "rows":
        rows = p
    else:
        rows = part.row_ranks if part.row_ranks is not None else _smallest_factor(p)
        if p % rows:
            raise ValueError(f"hybrid row_ranks={rows} must divide the world size {p}")
    cols = p // rows
    group = None
    if 1 < rows < p:
        group = _row_groups(rows, cols)[g // rows]
    return ProcessGrid(part.strategy, rows, cols, g, g % rows, g // rows, group)
