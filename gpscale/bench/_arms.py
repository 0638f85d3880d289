"""Benchmark arms: preconditioner factories by name (GPyTorch's own included) and one measured run.

An *arm* is a preconditioner family at one rank.  Each (arm, seed) run builds the preconditioner,
then solves ``[z_1..z_t, y]`` at each tolerance through :func:`gpscale.logdet.probe_solve` -- the code
path of the training loss, probes :math:`z_i \\sim N(0, P)` of the preconditioned log-det estimator
-- recording iterations, wall time, the SLQ log-det and, once, the residual history.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..precond import Jacobi, NoPreconditioner, Nystrom, PivotedCholesky, RPCholesky
from ..precond.base import BuiltPreconditioner, Preconditioner
from ..logdet.slq import probe_solve
from ..solvers.cg import ConjugateGradients

#: Families that take a rank; ``none`` and ``jacobi`` run once at rank 0.
LOW_RANK = ("pivchol", "rpchol", "rpchol-block", "rpchol-diag", "nystrom", "gpytorch")
FAMILIES = ("none", "jacobi") + LOW_RANK


class GPyTorchBuilt(BuiltPreconditioner):
    """GPyTorch's pivoted-Cholesky preconditioner (``AddedDiagLinearOperator._preconditioner``)."""

    def __init__(self, added_diag, noise: float, stats: dict):
        closure, _, logdet = added_diag._preconditioner()
        if closure is None:
            raise RuntimeError("GPyTorch built no preconditioner (NaNs in its pivoted Cholesky)")
        self._closure, self._logdet = closure, logdet
        self.L = added_diag._piv_chol_self.detach()  # (n, k) GPyTorch's own factor
        self.noise = noise
        self.rank = self.L.shape[1]
        self.stats = dict(stats, rank=self.rank)

    def solve(self, R):
        out = self._closure(R[:, None] if R.dim() == 1 else R)
        return out[:, 0] if R.dim() == 1 else out

    def logdet(self):
        return self._logdet.detach().reshape(())

    def sample(self, num, generator=None):
        n, k = self.L.shape
        kw = dict(dtype=self.L.dtype, device=self.L.device, generator=generator)
        return math.sqrt(self.noise) * torch.randn(n, num, **kw) + self.L @ torch.randn(k, num, **kw)


@dataclass(frozen=True)
class GPyTorchPivotedCholesky(Preconditioner):
    """Factory for GPyTorch's preconditioner on the same kernel matrix as a gpscale operator.

    Builds ``ScaleKernel(MaternKernel | RBFKernel)(X).add_diagonal(noise)`` with the operator's
    hyperparameters and calls its ``_preconditioner()`` under ``max_preconditioner_size(rank)`` and
    ``min_preconditioning_size(0)``; GPyTorch's own ``preconditioner_tolerance`` may stop it early.
    """

    rank: int = 100

    def build(self, op) -> GPyTorchBuilt:
        import gpytorch
        from gpytorch import settings

        t0 = time.perf_counter()
        k = op.kernel
        ls = op.lengthscale.reshape(-1)
        ard = ls.numel() if ls.numel() > 1 else None
        base = (gpytorch.kernels.RBFKernel(ard_num_dims=ard) if k.name == "rbf"
                else gpytorch.kernels.MaternKernel(nu=k.nu, ard_num_dims=ard))
        kern = gpytorch.kernels.ScaleKernel(base).to(dtype=op.dtype, device=op.device)
        base.lengthscale = ls.reshape(1, -1)
        kern.outputscale = op.outputscale.reshape(())
        noise = float(op.noise)
        with torch.no_grad(), settings.max_preconditioner_size(self.rank), settings.min_preconditioning_size(0):
            A = kern(op.X).add_diagonal(torch.tensor(noise, dtype=op.dtype, device=op.device))
            P = GPyTorchBuilt(A, noise, {"name": "gpytorch"})
        P.stats["build_seconds"] = time.perf_counter() - t0
        return P


def make_factory(family: str, rank: int, seed: int, block_size: int = 64) -> Preconditioner:
    """The factory of one arm (seeded families get ``seed``)."""
    table = {
        "none": lambda: NoPreconditioner(),
        "jacobi": lambda: Jacobi(),
        "pivchol": lambda: PivotedCholesky(rank=rank, tol=0.0),
        "rpchol": lambda: RPCholesky(rank=rank, tol=0.0, seed=seed),
        "rpchol-block": lambda: RPCholesky(rank=rank, tol=0.0, block_size=block_size, seed=seed),
        # RPCholesky with the FITC-style diagonal correction (P has the diagonal of K + sigma^2 I)
        "rpchol-diag": lambda: RPCholesky(rank=rank, tol=0.0, seed=seed, residual_diagonal=True),
        "nystrom": lambda: Nystrom(rank=rank, seed=seed),
        "gpytorch": lambda: GPyTorchPivotedCholesky(rank=rank),
    }
    if family not in table:
        raise ValueError(f"unknown preconditioner {family!r}; choose from {', '.join(FAMILIES)}")
    return table[family]()


def warm_up(op, families, rank: int, block_size: int) -> None:
    """Untimed first calls: the operator's tile cache and every family's code path (imports, kernels)."""
    op.matmul(torch.ones(op.shape[0], 1, dtype=op.dtype, device=op.device))
    small = type(op)(op.X[: min(256, op.shape[0])], op.kernel, noise=op.noise)
    for fam in families:
        make_factory(fam, min(rank, small.shape[0]), 0, block_size).build(small)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_build(factory, op):
    """``(built preconditioner, seconds)`` with device synchronisation."""
    _sync(op.device)
    t0 = time.perf_counter()
    P = factory.build(op)
    _sync(op.device)
    return P, time.perf_counter() - t0


def measured_solve(op, P, y: torch.Tensor, num_probes: int, rtol: float, max_iter: int, seed: int,
                   history: bool = False) -> dict:
    """Solve ``[Z, y]`` (``Z ~ N(0, P)``) with :func:`gpscale.logdet.probe_solve`, the training code path.

    Returns iterations (``y`` column and probe columns), wall time, status and the SLQ log-det.
    With ``history``, also the relative residual curve of the ``y`` column: taken from the same solve
    when ``probe_solve`` forwards the solver's ``record_history``, otherwise from one extra (untimed)
    CG solve of ``y`` alone -- the ``y`` iterates do not depend on the probes.
    """
    g = torch.Generator(device=op.device).manual_seed(10_007 + seed)
    solver = ConjugateGradients(rtol=rtol, max_iter=max_iter, record_history=history)
    _sync(op.device)
    t0 = time.perf_counter()
    ps = probe_solve(op, y[:, None], num_probes, solver, P, g)
    _sync(op.device)
    wall = time.perf_counter() - t0
    it = ps.cg.iterations.cpu()
    out = {"wall_seconds": wall, "iters_y": int(it[-1]), "iters_probes_mean": float(it[:-1].float().mean()),
           "iters_probes_max": int(it[:-1].max()), "status": ps.cg.status.name, "num_matmuls": ps.cg.num_matmuls,
           "logdet": float(ps.logdet), "logdet_stderr": ps.logdet_stderr}
    if history:
        res = ps.cg if ps.cg.residual_history is not None else solver(op, y[:, None], preconditioner=P)
        rel = (res.residual_history[:, -1] / res.rhs_norm[-1].clamp_min(torch.finfo(y.dtype).tiny)).cpu()
        out["history_y"] = rel[: int(res.iterations[-1]) + 1].tolist()
    return out
