"""Preconditioners for CG and the preconditioned log-det estimator.

Every factory (``PivotedCholesky(rank=...)``) builds a :class:`BuiltPreconditioner` from a kernel
operator; see :mod:`gpscale.precond.base` for the interface.

=====================  ===============================================================  ================
factory                :math:`P`                                                        operator access
=====================  ===============================================================  ================
``NoPreconditioner``   :math:`I`                                                        none
``Jacobi``             :math:`\\operatorname{diag}(\\hat K)`                              diagonal
``PivotedCholesky``    greedy partial Cholesky :math:`LL^T + \\sigma^2 I`                rows, diagonal
``RPCholesky``         randomly pivoted (simple or accelerated block) partial Cholesky  rows, diagonal
``Nystrom``            randomized Nyström :math:`U\\Lambda U^T + \\sigma^2 I`             kernel products
``AdaptiveRank``       any of the three above, rank chosen by residual trace / memory   (the base's)
=====================  ===============================================================  ================
"""

from .adaptive import AdaptiveRank
from .base import BuiltPreconditioner, Identity, LowRankPlusDiagonal, Preconditioner
from .jacobi import Diagonal, Jacobi, NoPreconditioner
from .nystrom import Nystrom
from .pivoted_cholesky import PivotedCholesky, partial_cholesky
from .rpcholesky import RPCholesky

__all__ = ["Preconditioner", "BuiltPreconditioner", "LowRankPlusDiagonal", "Identity", "PivotedCholesky",
           "partial_cholesky", "RPCholesky", "Nystrom", "Jacobi", "Diagonal", "NoPreconditioner", "AdaptiveRank"]
