"""Iterative solvers: batched preconditioned CG (mBCG) and its Lanczos tridiagonals."""

from .cg import CGResult, CGStatus, CGWarning, ConjugateGradients, cg
from .lanczos import Tridiagonal

__all__ = ["cg", "ConjugateGradients", "CGResult", "CGStatus", "CGWarning", "Tridiagonal"]
