"""Preconditioners for CG and the preconditioned log-det estimator.

Every factory (``PivotedCholesky(rank=...)``) builds a :class:`BuiltPreconditioner` from a kernel
operator; see :mod:`gpscale.precond.base` for the interface.
"""

from .base import BuiltPreconditioner, Identity, LowRankPlusDiagonal, Preconditioner
from .pivoted_cholesky import PivotedCholesky, partial_cholesky

__all__ = ["Preconditioner", "BuiltPreconditioner", "LowRankPlusDiagonal", "Identity", "PivotedCholesky",
           "partial_cholesky"]
