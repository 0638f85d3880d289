"""Iterative (BBMM) marginal log-likelihood with a hand-written backward pass.

Forward: one preconditioned CG call on ``[z_1..z_t, y - m]`` gives
:math:`\\alpha = \\hat K^{-1}(y-m)`, :math:`u_i = \\hat K^{-1} z_i` and the Lanczos tridiagonals.

.. math::
    \\log p(y) = -\\tfrac12 (y-m)^T\\alpha - \\tfrac12 \\log|\\hat K| - \\tfrac n2 \\log 2\\pi .

Backward reuses those solves (no second CG, no autograd graph through the kernel matrix):

.. math::
    \\frac{\\partial \\log p}{\\partial\\theta} = \\tfrac12 \\alpha^T \\partial_\\theta\\hat K\\,\\alpha
    - \\tfrac12 \\operatorname{tr}(\\hat K^{-1}\\partial_\\theta \\hat K),\\quad
    \\operatorname{tr}(\\hat K^{-1}\\partial_\\theta\\hat K) \\approx \\frac1t\\sum_i u_i^T
    \\partial_\\theta \\hat K\\, P^{-1} z_i
    \\quad(\\text{or its control-variate form, } :mod:`gpscale.logdet.trace`),

all hyperparameters at once through :func:`gpscale.operators.bilinear_derivative` with
``A = [α, u]`` and ``B = [α/2, -P^{-1}z/(2t)]`` (one pass, about two kernel products), and
:math:`\\partial/\\partial m = \\mathbf 1^T\\alpha`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..logdet.slq import ProbeSolve, probe_solve
from ..logdet.trace import derivative_width, trace_pairs
from ..operators.backends import backend_label
from ..operators.derivatives import bilinear_derivative
from ..operators.kernel_operator import KernelOperator
from ..solvers.cg import CGWarning, ConjugateGradients


@dataclass
class IterativeMLL:
    """Everything the iterative estimate computed (kept for reports and the backward pass)."""

    value: torch.Tensor
    quad: float
    logdet: float
    logdet_stderr: float
    solve: ProbeSolve
    #: product backend the operator resolved to ("torch", "keops" or "cuda"; "cuda:<variant>" once
    #: the CUDA kernels ran, e.g. "cuda:simt" where the tensor-core expansion was not accurate enough)
    backend: str = "torch"
    #: what ``backend="auto"`` measured to choose it (:meth:`gpscale.operators.autotune.Tuning.summary`),
    #: ``None`` where nothing was timed
    backend_tuning: str | None = None

    @property
    def cg(self):
        return self.solve.cg

    def stats(self) -> dict:
        s = self.cg.summary()
        s.update(method="iterative", quad=self.quad, logdet=self.logdet, logdet_stderr=self.logdet_stderr,
                 preconditioner=self.solve.preconditioner.stats.get("name"),
                 preconditioner_rank=self.solve.preconditioner.rank, backend=self.backend)
        if self.backend_tuning:
            s["backend_tuning"] = self.backend_tuning
        return s


class _IterativeMLLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lengthscale, outputscale, noise, mean, cfg):  # noqa: D401 - autograd API
        X, y, kernel, solver, num_probes, precond, generator, op_kwargs, holder = cfg
        op = KernelOperator(X, kernel, noise=noise, **op_kwargs)
        r = (y - mean)[:, None]
        ps = probe_solve(op, r, num_probes, solver, precond, generator)
        alpha = ps.cg.x[:, num_probes]
        quad = float((r[:, 0] * alpha).sum())
        logdet = ps.logdet
        n = X.shape[0]
        value = -0.5 * quad - 0.5 * float(logdet) - 0.5 * n * math.log(2 * math.pi)
        tuning = getattr(op, "backend_tuning", None)
        holder.append(IterativeMLL(torch.tensor(value), quad, float(logdet), ps.logdet_stderr, ps, backend_label(op),
                                   tuning.summary() if tuning else None))
        ctx.op, ctx.alpha, ctx.ps, ctx.t = op, alpha, ps, num_probes
        ctx.kernel_trace = n * float(outputscale.detach())  # stationary: k(x, x) = s
        return torch.tensor(value, dtype=X.dtype, device=X.device)

    @staticmethod
    def backward(ctx, grad):
        op, alpha, ps = ctx.op, ctx.alpha, ctx.ps
        # -½ tr(K̂⁻¹∂K̂) from the probe solves, with the preconditioner as control variate where it
        # lowers the variance (gpscale.logdet.trace).
        At, Bt, const = trace_pairs(ps, -0.5, kernel_trace=ctx.kernel_trace,
                                    derivative_width=derivative_width(op.lengthscale, op.X.shape[1]))
        A = torch.cat([alpha[:, None], At], dim=1)
        B = torch.cat([0.5 * alpha[:, None], Bt], dim=1)
        g = bilinear_derivative(op, A, B)
        g = {k: v + torch.as_tensor(const[k], dtype=v.dtype, device=v.device) for k, v in g.items()}
        g_mean = alpha.sum()
        return (grad * g["lengthscale"], grad * g["outputscale"], grad * g["noise"], grad * g_mean, None)


def iterative_mll(X, y, kernel, noise, mean, *, solver: ConjugateGradients, num_probes: int, preconditioner,
                  generator, op_kwargs: dict, warn: bool = True) -> IterativeMLL:
    """Differentiable iterative MLL; ``noise`` and ``mean`` are tensors (maybe requiring grad)."""
    holder: list[IterativeMLL] = []
    ls, s = kernel.hyper_values(X.dtype, X.device)
    cfg = (X, y, kernel, solver, num_probes, preconditioner, generator, op_kwargs, holder)
    value = _IterativeMLLFunction.apply(ls, s, noise, mean, cfg)
    info = holder[0]
    info.value = value
    if warn and not info.cg.converged:
        warnings.warn(f"marginal_log_likelihood: CG ended with status {info.cg.status.name} "
                      f"({info.cg.summary()['relative_residual_max']:.2e} max relative residual); "
                      f"{info.cg.message}", CGWarning, stacklevel=3)
    return info
