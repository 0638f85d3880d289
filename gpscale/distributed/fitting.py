"""What :meth:`gpscale.ExactGP.fit` does differently on a process group.

* Every rank evaluates the same objective (the MLL reduction gives bitwise the same value and
  gradient everywhere), so every rank's optimiser takes the same steps; the final vector is still
  broadcast from rank 0, which makes "identical hyperparameters on every rank" exact by construction.
* Only rank 0 reads the checkpoint (then broadcasts it: no shared filesystem needed), writes it, and
  shows the progress bar.
"""

from __future__ import annotations

import torch

from .comm import broadcast_tensor, from_rank0, is_writer
from .grid import process_grid


class FitCoordinator:
    """Distributed bookkeeping of one ``fit``; with ``distributed=None`` every method is a no-op.

    Parameters
    ----------
    distributed : {"columns", "rows", "hybrid"}, Partition or None
        Validated at once (and, without a process group, an error says how to launch).
    """

    def __init__(self, distributed):
        self.distributed = distributed
        if distributed is not None:
            process_grid(distributed)
        self.writer = distributed is None or is_writer()

    def from_writer(self, fn):
        """``fn()`` on rank 0 (e.g. read the checkpoint), its result on every rank."""
        return fn() if self.distributed is None else from_rank0(fn)

    def agree(self, theta: torch.Tensor) -> torch.Tensor:
        """Rank 0's final parameter vector on every rank."""
        return theta if self.distributed is None else broadcast_tensor(theta, name="final hyperparameters")
