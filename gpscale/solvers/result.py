"""What every solver returns: :class:`CGResult` (solution, per-column status and statistics).

Modelled on lineax's ``Solution``: one result object, a status enum whose message says what to do,
iterations and residual per column -- never a tuple whose length varies with the options.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ..precision import is_low_precision
from .lanczos import Tridiagonal


class CGStatus(enum.IntEnum):
    """Outcome of a CG column (the result's overall status is the worst column's)."""

    CONVERGED = 0
    MAX_ITERATIONS = 1
    BREAKDOWN = 2
    NON_FINITE = 3
    #: the residual made no progress for ``stall_window`` iterations (stagnation detection of a
    #: :class:`gpscale.PrecisionPolicy`) and no fallback could take over
    STAGNATED = 4

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    CGStatus.CONVERGED: "all columns reached ||r|| <= max(rtol*||b||, atol) (or, with error_floor, their error bound)",
    CGStatus.MAX_ITERATIONS: (
        "some columns did not converge within max_iter; raise max_iter, loosen rtol, or use a stronger "
        "preconditioner (e.g. gpscale.precond.PivotedCholesky(rank=100)); a larger noise also helps"
    ),
    CGStatus.BREAKDOWN: (
        "CG met non-positive curvature p^T A p <= 0: the operator (or preconditioner) is not positive "
        "definite in this precision; increase the noise / jitter or use float64"
    ),
    CGStatus.NON_FINITE: (
        "CG produced NaN/Inf; check the operator and right-hand side for NaN/Inf and the "
        "hyperparameters for overflow (e.g. tiny lengthscales), or use float64"
    ),
    CGStatus.STAGNATED: (
        "some columns stagnated in low precision and no fallback ran; use PrecisionPolicy(fallback=True) "
        "with an operator that has with_product_dtype (KernelOperator) or a tensor, re-orthogonalise "
        "(reorth='full'), or use a higher product precision"
    ),
}


class CGWarning(UserWarning):
    """Emitted when a CG solve ends without converging every column."""


@dataclass(frozen=True)
class CGResult:
    """Solution of a batched CG solve.

    Attributes
    ----------
    x : tensor, shape of ``B``
        Approximate solution.  Check :attr:`status` before trusting it.
    status : CGStatus
        Worst column status; ``status.message`` says what to do.
    column_status : (t,) long tensor
        :class:`CGStatus` code per column.
    iterations : (t,) long tensor
        Iterations each column ran.
    residual_norm, rhs_norm, tolerance : (t,) tensors
        Final (recurrence) residual norm, ``||b||`` and the stopping threshold per column.
    tridiag : Tridiagonal or None
        Lanczos coefficients of the first ``num_tridiag`` columns.
    num_matmuls : int
        Operator products spent (the cost measure of BBMM).
    residual_history : (iterations + 1, t) tensor or None
        Recurrence residual norms :math:`\\|r_j\\|` of every column before the first and after each
        iteration up to ``iterations.max()`` (a converged column keeps its last value), when run with
        ``record_history=True``; divide by :attr:`rhs_norm` for relative residuals.  Under a precision
        policy with a fallback it covers the low-precision phase.
    finished_precision : tuple of str or None
        Under a :class:`gpscale.PrecisionPolicy`: the product precision each column finished in (the
        policy's ``product``, or its ``fallback_product`` for the columns that fell back).
    low_precision_iterations : (t,) long tensor or None
        Iterations each column ran in the low-precision phase (``iterations`` counts both phases).
    stagnated : (t,) bool tensor or None
        Columns whose stagnation detector fired in the low-precision phase.
    error_bound : (t,) tensor or None
        With ``error_floor``: a Gauss-Radau upper bound on :math:`\\|x_j - x^\\star_j\\|_A` per column
        (:mod:`gpscale.solvers.error_bounds`), which is what the columns stopped on; :attr:`tolerance` is
        then the threshold on it.

    Notes
    -----
    Under a precision policy, :attr:`residual_norm` of a column that finished in low precision is
    its *true* residual :math:`\\|b - A x\\|` measured with one product in the fallback precision,
    not the recurrence residual (the two drift apart when the products are rounded).
    """

    x: torch.Tensor
    status: CGStatus
    column_status: torch.Tensor
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    rhs_norm: torch.Tensor
    tolerance: torch.Tensor
    tridiag: Tridiagonal | None
    num_matmuls: int
    residual_history: torch.Tensor | None = None
    finished_precision: tuple | None = None
    low_precision_iterations: torch.Tensor | None = None
    stagnated: torch.Tensor | None = None
    error_bound: torch.Tensor | None = None

    @property
    def converged(self) -> bool:
        return self.status == CGStatus.CONVERGED

    @property
    def message(self) -> str:
        return self.status.message

    def summary(self) -> dict:
        """Plain-python statistics for reports and logs."""
        it = self.iterations.float()
        rel = self.residual_norm / self.rhs_norm.clamp_min(torch.finfo(self.rhs_norm.dtype).tiny)
        out = {"status": self.status.name, "num_matmuls": self.num_matmuls,
               "iterations_max": int(self.iterations.max()) if it.numel() else 0,
               "iterations_mean": float(it.mean()) if it.numel() else 0.0,
               "relative_residual_max": float(rel.max()) if rel.numel() else 0.0}
        if self.finished_precision is not None:
            names = self.finished_precision
            out["finished_precision"] = {p: names.count(p) for p in sorted(set(names))}
            out["low_precision_columns"] = sum(is_low_precision(p) for p in names)
            out["columns"] = len(names)
            out["low_precision_iterations_max"] = int(self.low_precision_iterations.max()) if it.numel() else 0
            out["stagnated_columns"] = int(self.stagnated.sum()) if self.stagnated is not None else 0
        return out
