"""Distributed iterative marginal log-likelihood: columns, rows, or a 2-D grid of both.

Single-process BBMM (:mod:`gpscale.likelihood.iterative`) solves the ``t + 1`` columns
``[z_1..z_t, y - m]`` in one CG call and reuses them for the gradient.  The columns are independent,
so over a :class:`~gpscale.distributed.grid.ProcessGrid` of ``R x C`` ranks:

1. every rank builds the same preconditioner and draws **all** ``t`` probes from the shared seed,
   then keeps its column group's contiguous share (so the probes, hence the estimate, are the
   single-process ones);
2. column group ``c`` solves its share with CG: against its own full operator when ``R = 1``
   (**zero collectives inside CG**), or against a :class:`RowBlockOperator` whose products end with
   one all-gather in the row group when ``R > 1``;
3. every rank computes its part of the log-det terms, the quadratic form and the gradient
   (the bilinear derivative pass over its columns, restricted to its rows when ``R > 1``);
4. **one** all-gather of a small fixed-layout vector (``O(d)`` numbers per rank), reduced locally in
   rank order, gives every rank bitwise the same value, gradient and statistics.

The gradient is computed in the forward pass (when any input requires grad), so ``backward``
needs no collective and cannot deadlock whatever the callers do with the graph.

References
----------
Gardner et al. 2018 (BBMM); Wenger et al. 2022 (preconditioned SLQ); Wang et al. 2019 (exact GPs on
a million points: kernel rows over devices).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from ..logdet.slq import build_preconditioner, draw_probes
from ..operators import KernelOperator
from ..logdet.trace import derivative_width, trace_columns
from ..operators.derivatives import bilinear_derivative
from ..solvers.cg import CGStatus, CGWarning, ConjugateGradients
from .comm import DistributedError, all_gather_vector, broadcast_tensor
from .grid import ProcessGrid, process_grid
from .row_operator import RowBlockOperator, row_bilinear_derivative

# Slots of the reduced vector after the ``d_ls`` lengthscale-gradient entries.
_SUM = ("terms", "terms_sq", "quad", "alpha_sum", "g_s", "g_noise", "columns", "iterations_sum")
_MAX = ("status", "iterations_max", "relres_max", "num_matmuls")


@dataclass(frozen=True)
class _Problem:
    X: torch.Tensor
    y: torch.Tensor
    kernel: object
    solver: ConjugateGradients
    num_probes: int
    preconditioner: object
    generator: torch.Generator
    op_kwargs: dict
    grid: ProcessGrid
    need_grad: bool


@dataclass
class _Local:
    """One rank's share before the reduction."""

    vec: torch.Tensor
    logdet_p: float
    precond_name: str | None
    precond_rank: int


def grid_operator(X, kernel, noise, grid: ProcessGrid, op_kwargs: dict):
    """The operator a rank's CG multiplies by: the whole :math:`\\hat K` (``R = 1``) or its row block."""
    if grid.rows == 1:
        return KernelOperator(X, kernel, noise=noise, **op_kwargs)
    if op_kwargs.get("backend", "auto") not in ("auto", "torch"):
        raise ValueError(f"backend={op_kwargs['backend']!r} cannot run the row partition: its ranks share the "
                         "tiles of the blocked torch path; use backend='auto' (or 'torch'), or the 'columns' "
                         "partition to keep a fused backend")
    return RowBlockOperator(X, kernel, noise, grid, memory_budget=op_kwargs.get("memory_budget"))


def _prepare_share(pb: _Problem, noise, mean) -> dict:
    """Local set-up: operators, preconditioner, this column group's probes and right-hand sides."""
    X, grid, t = pb.X, pb.grid, pb.num_probes
    full = KernelOperator(X, pb.kernel, noise=noise, **(pb.op_kwargs if grid.rows == 1 else
                                                         dict(pb.op_kwargs, cache=False)))
    P = build_preconditioner(full, pb.preconditioner)
    c0, c1 = grid.column_range(t + 1)
    Z = draw_probes(P, t, X.dtype, pb.generator, columns=slice(c0, min(c1, t)))
    own_y = c1 == t + 1
    r = (pb.y - mean)[:, None]
    rhs = torch.cat([Z, r], dim=1) if own_y else Z
    op = full if grid.rows == 1 else grid_operator(X, pb.kernel, noise, grid, pb.op_kwargs)
    return {"full": full, "op": op, "P": P, "Z": Z, "r": r, "rhs": rhs, "own_y": own_y}


def _solve_share(pb: _Problem, prep: dict, d_ls: int) -> _Local:
    """CG on this rank's columns, its log-det terms, quadratic form and gradient terms."""
    P, Z, r, rhs, own_y = prep["P"], prep["Z"], prep["r"], prep["rhs"], prep["own_y"]
    res = dataclasses.replace(pb.solver, num_tridiag=Z.shape[1])(prep["op"], rhs, preconditioner=P)
    terms = res.tridiag.quadrature(torch.log) if Z.shape[1] else torch.zeros(0, dtype=torch.float64)
    alpha = res.x[:, -1] if own_y else None
    g = _local_gradient(pb, prep["full"], prep["op"], res.x, P, P.solve(Z), alpha, d_ls)
    vals = dict.fromkeys(_SUM + _MAX, 0.0)
    if pb.grid.counts_replicated:  # quantities the whole row group holds identically: count them once
        s = res.summary()
        vals.update(terms=float(terms.sum()), terms_sq=float((terms ** 2).sum()),
                    quad=float((r[:, 0] * alpha).sum()) if own_y else 0.0,
                    alpha_sum=float(alpha.sum()) if own_y else 0.0, columns=float(rhs.shape[1]),
                    iterations_sum=float(res.iterations.sum()), status=float(int(res.status)),
                    iterations_max=float(s["iterations_max"]), relres_max=s["relative_residual_max"],
                    num_matmuls=float(res.num_matmuls))
    vals.update(g_s=float(g["outputscale"]), g_noise=float(g["noise"]))
    vec = torch.cat([g["lengthscale"].reshape(-1).to(torch.float64).cpu(),
                     torch.tensor([vals[k] for k in _SUM + _MAX], dtype=torch.float64)])
    return _Local(vec, float(P.logdet()), P.stats.get("name"), int(P.rank))


def _local_gradient(pb: _Problem, full, op, x, P, PZ, alpha, d_ls: int) -> dict:
    """This rank's terms of :math:`\\tfrac12\\alpha^T\\partial\\hat K\\alpha - \\tfrac12\\operatorname{tr}(\\hat K^{-1}\\partial\\hat K)`.

    The trace uses the same estimator as one process (:func:`gpscale.logdet.trace.trace_columns`):
    each column group adds its probes' remainder terms; the exact :math:`\\operatorname{tr}(P^{-1}\\partial\\hat K)`
    part (when the control variate is on) comes from column group 0 only -- each of its row blocks
    adds its rows -- and its closed-form constants from grid rank (0, 0) only.
    """
    zero = {"lengthscale": torch.zeros(d_ls, dtype=torch.float64), "outputscale": 0.0, "noise": 0.0}
    if not pb.need_grad or x.shape[1] == 0:
        return zero
    t_loc = PZ.shape[1]
    n = pb.X.shape[0]
    kernel_trace = n * float(pb.kernel.outputscale.detach())
    first_cols = pb.grid.col_index == 0
    width = derivative_width(pb.kernel.lengthscale.detach(), pb.X.shape[1])  # the same on every rank
    A, B, const = trace_columns(x[:, :t_loc], PZ, pb.num_probes, P, -0.5, kernel_trace=kernel_trace,
                                include_exact=first_cols, derivative_width=width)
    if alpha is not None:
        A = torch.cat([A, alpha[:, None]], dim=1)
        B = torch.cat([B, 0.5 * alpha[:, None]], dim=1)
    g = bilinear_derivative(full, A, B) if pb.grid.rows == 1 else row_bilinear_derivative(op, A, B)
    if first_cols and pb.grid.row_index == 0:
        g = {k: v + torch.as_tensor(const[k], dtype=v.dtype) for k, v in g.items()}
    return g


def _fingerprint(pb: _Problem, noise, mean) -> torch.Tensor:
    """Numbers every rank must agree on (data, hyperparameters, probe count): checked after the gather."""
    ls, s = pb.kernel.hyper_values(torch.float64)
    return torch.tensor([pb.X.shape[0], float(pb.X.double().sum()), float(pb.y.double().sum()),
                         float(ls.detach().sum()), float(s.detach()), float(noise), float(mean), pb.num_probes],
                        dtype=torch.float64)


def _reduce(pb: _Problem, noise, mean, d_ls: int):
    """Local share, then the one all-gather; returns the reduced slots and the local pieces."""
    fp = _fingerprint(pb, noise, mean)
    width = d_ls + len(_SUM) + len(_MAX)
    prep, err = None, None
    try:
        prep = _prepare_share(pb, noise, mean)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks were told
        err = exc
    if pb.grid.rows > 1:  # CG will gather row blocks: nobody may enter it if a rank failed its set-up
        all_gather_vector(torch.zeros(0, dtype=torch.float64), failed=err is not None, name="CG start")
        if err is not None:
            raise err
    local = None
    if err is None:
        try:
            local = _solve_share(pb, prep, d_ls)
        except Exception as exc:  # noqa: BLE001 - joins the gather flagged, then re-raised
            err = exc
    vec = torch.cat([local.vec if local is not None else torch.zeros(width, dtype=torch.float64), fp])
    rows = all_gather_vector(vec, failed=err is not None, name="MLL reduction")
    if err is not None:
        raise err
    if not bool((rows[:, width:] == rows[0, width:]).all()):
        raise DistributedError("the ranks passed different data, hyperparameters or num_probes to the distributed "
                               "MLL; every rank must call it with the same arguments")
    red = rows[:, :width]
    ns = d_ls + len(_SUM)
    total = torch.cat([red[:, :ns].sum(0), red[:, ns:].max(0).values])
    slots = dict(zip(_SUM + _MAX, total[d_ls:].tolist()))
    return slots, total[:d_ls], local


class _DistributedMLLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lengthscale, outputscale, noise, mean, pb, holder):
        d_ls = lengthscale.numel()
        slots, g_ls, local = _reduce(pb, noise.detach(), mean.detach(), d_ls)
        t, n = pb.num_probes, pb.X.shape[0]
        logdet = local.logdet_p + slots["terms"] / t
        value = -0.5 * slots["quad"] - 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)
        var = max(slots["terms_sq"] - slots["terms"] ** 2 / t, 0.0) / max(t - 1, 1)
        holder.append(_stats(pb, slots, local, logdet, math.sqrt(var / t) if t > 1 else float("nan")))
        ctx.grads = (g_ls.reshape(lengthscale.shape).to(lengthscale), slots["g_s"], slots["g_noise"],
                     slots["alpha_sum"])
        return torch.tensor(value, dtype=pb.X.dtype, device=pb.X.device)

    @staticmethod
    def backward(ctx, grad):
        g_ls, g_s, g_noise, g_mean = ctx.grads
        return grad * g_ls, grad * g_s, grad * g_noise, grad * g_mean, None, None


def _stats(pb: _Problem, slots: dict, local: _Local, logdet: float, stderr: float) -> dict:
    cols = max(slots["columns"], 1.0)
    return {"status": CGStatus(int(slots["status"])).name, "num_matmuls": int(slots["num_matmuls"]),
            "iterations_max": int(slots["iterations_max"]), "iterations_mean": slots["iterations_sum"] / cols,
            "relative_residual_max": slots["relres_max"], "method": "iterative", "quad": slots["quad"],
            "logdet": logdet, "logdet_stderr": stderr, "preconditioner": local.precond_name,
            "preconditioner_rank": local.precond_rank, "distributed": pb.grid.strategy,
            "world_size": pb.grid.world_size, "grid": f"{pb.grid.rows}x{pb.grid.cols}"}


def shared_generator(generator: torch.Generator | None, device) -> torch.Generator:
    """``generator``, or one seeded from rank 0 (one broadcast) so every rank draws the same probes."""
    if generator is not None:
        return generator
    seed = broadcast_tensor(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64), name="probe seed")
    return torch.Generator(device=device).manual_seed(int(seed))


def distributed_mll(X, y, kernel, noise, mean, *, distributed, solver: ConjugateGradients, num_probes: int,
                    preconditioner, generator, op_kwargs: dict, warn: bool = True) -> tuple[torch.Tensor, dict]:
    """Differentiable iterative MLL over the process group; returns ``(value, stats)``, identical on all ranks.

    Parameters
    ----------
    X, y : tensors, the same on every rank (replicated data)
    kernel, noise, mean : as in :func:`gpscale.marginal_log_likelihood`
    distributed : {"columns", "rows", "hybrid"} or Partition
    solver : ConjugateGradients
    num_probes : int
    preconditioner : factory or None
    generator : torch.Generator or None
        Must be seeded identically on every rank (``seed=`` does that); ``None`` takes a seed from
        rank 0.
    op_kwargs : dict
        ``memory_budget`` of the kernel operators.

    Notes
    -----
    Per rank and CG iteration: :math:`O(n^2 (d + t/C) / R)` kernel work, and for ``R > 1`` one
    all-gather of :math:`n t / C` numbers in the row group.  One all-gather of ``O(d)`` numbers per
    evaluation.  Preconditioner build and probe draws are replicated (:math:`O(n k^2 + n k t)`).
    """
    grid = process_grid(distributed)
    pb = _Problem(X, y, kernel, solver, num_probes, preconditioner, shared_generator(generator, X.device),
                  op_kwargs, grid, torch.is_grad_enabled() and any(
                      v.requires_grad for v in (*kernel.hyper_values(), noise, mean)))
    holder: list[dict] = []
    ls, s = kernel.hyper_values(X.dtype, X.device)
    value = _DistributedMLLFunction.apply(ls, s, noise, mean, pb, holder)
    stats = holder[0]
    if warn and stats["status"] != "CONVERGED":
        warnings.warn(f"marginal_log_likelihood (distributed={grid.strategy!r}): CG ended with status "
                      f"{stats['status']} ({stats['relative_residual_max']:.2e} max relative residual); "
                      f"{CGStatus[stats['status']].message}", CGWarning, stacklevel=3)
    return value, stats
