"""Exact-GP inference split over a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

Launch with ``torchrun``; every rank holds the same ``X`` and ``y`` and calls the same functions
with the same arguments:

>>> gpscale.distributed.init_process_group(timeout_s=300)       # env:// from torchrun
>>> mll = gpscale.marginal_log_likelihood(X, y, k, noise=0.1, method="iterative", seed=0,
...                                       distributed="columns")  # same value on every rank
>>> gp = gpscale.ExactGP().fit(X, y, distributed="hybrid")        # same hyperparameters everywhere

Strategies (:class:`Partition`): ``"columns"`` splits the CG columns ``[probes, y]`` (and posterior
sample columns) with no communication inside CG; ``"rows"`` splits the kernel rows with one
all-gather per CG iteration; ``"hybrid"`` is a 2-D grid of both.  See ``docs/distributed.md``.
"""

from .comm import DistributedError, init_process_group, is_writer, rank
from .grid import STRATEGIES, Partition, ProcessGrid, process_grid
from .mll import distributed_mll
from .row_operator import RowBlockOperator, row_bilinear_derivative, share_tiles

__all__ = ["STRATEGIES", "DistributedError", "Partition", "ProcessGrid", "RowBlockOperator", "distributed_mll",
           "init_process_group", "is_writer", "process_grid", "rank", "row_bilinear_derivative",
           "share_tiles"]
