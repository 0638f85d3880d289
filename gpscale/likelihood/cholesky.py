"""Dense Cholesky marginal log-likelihood (exact; used below the crossover size).

The forward pass assembles :math:`\\hat K` from kernel tiles and factorises it; the backward pass
uses the closed form (for the MLL, :math:`W = \\tfrac12 (\\alpha\\alpha^T - \\hat K^{-1})`) through the
same tile pass as the iterative gradient, instead of autograd through the dense kernel (which stores
several ``n x n`` intermediates and was 5-10x slower at n = 2000).  :class:`CholeskyInvQuadLogdet` is
shared with the GPyTorch backend's exact path.
"""

from __future__ import annotations

import math

import torch

from ..operators.derivatives import dense_weighted_derivative
from ..operators.kernel_operator import KernelOperator


def cholesky_factor(K: torch.Tensor) -> torch.Tensor:
    """Cholesky factor with a clear error instead of ``torch.linalg.LinAlgError``."""
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        raise ValueError(
            f"the kernel matrix is not positive definite in {K.dtype} (Cholesky failed at column {int(info)}); "
            "increase the noise, use float64, or use method='iterative'"
        )
    return L


class CholeskyInvQuadLogdet(torch.autograd.Function):
    r"""``(rhsᵀ K̂⁻¹ rhs per column, log|K̂|)`` through a dense Cholesky factor, with a closed-form backward.

    ``apply(rhs, lengthscale, outputscale, noise, op)``: ``rhs`` is ``(n, c)`` (``c = 0`` for the log-det
    alone); the three hyperparameter tensors are the ones ``op`` (a :class:`KernelOperator` over a detached
    snapshot of them) was built from, and receive gradients of their own shapes.  The backward pass is

    .. math:: \partial_\theta = \sum_{ij} W_{ij}\, \partial_\theta \hat K_{ij}, \qquad
              W = g_{\log|K|}\, \hat K^{-1} - \sum_c g_c\, \alpha_c \alpha_c^T, \qquad
              \partial_{\mathrm{rhs}_c} = 2 g_c \alpha_c,

    through the same tile pass as the iterative gradient (``dense_weighted_derivative``); ``K̂⁻¹`` is formed
    only when the log-det's gradient is non-zero.  Autograd through the dense kernel and the factorisation
    stores several ``n x n`` intermediates and was 2x slower (GPyTorch backend, n = 1000-1500).
    Cost :math:`O(n^3)`, three ``n x n`` buffers.
    """

    @staticmethod
    def forward(ctx, rhs, lengthscale, outputscale, noise, op):  # noqa: D401 - autograd API
        L = cholesky_factor(op.dense())
        alpha = torch.cholesky_solve(rhs, L)
        ctx.op, ctx.L, ctx.alpha = op, L, alpha
        ctx.shapes = [v.shape for v in (lengthscale, outputscale, noise)]
        return (rhs * alpha).sum(0), 2.0 * L.diagonal().log().sum()

    @staticmethod
    def backward(ctx, g_quad, g_logdet):
        op, L, alpha = ctx.op, ctx.L, ctx.alpha
        if bool(g_logdet != 0):
            # K^-1 from the factor (LAPACK potri on CPU: ~2n^3/3 flops).  A triangular solve against the
            # identity and a product L^-T L^-1 costs ~3n^3 flops, and measured 3x slower at n = 1000-4000
            # (float32 and float64, 1 and 2 threads, MKL).
            W = torch.cholesky_inverse(L).mul_(g_logdet)
        else:
            W = torch.zeros_like(L)
        W.addmm_(alpha * g_quad, alpha.T, alpha=-1.0)
        g = dense_weighted_derivative(op, W)
        grads = (g[k].reshape(sh) for k, sh in zip(("lengthscale", "outputscale", "noise"), ctx.shapes))
        return (2.0 * alpha * g_quad, *grads, None)


def cholesky_mll(X, y, kernel, noise, mean) -> torch.Tensor:
    """Exact :math:`\\log p(y)` through a dense Cholesky factorisation, differentiable.

    Complexity :math:`O(n^3)` time, about three ``n x n`` buffers of memory: for n up to a few
    thousand (see ``gpscale.CHOLESKY_CROSSOVER``).
    """
    ls, s = kernel.hyper_values(X.dtype, X.device)
    noise = torch.as_tensor(noise, dtype=X.dtype, device=X.device)
    op = KernelOperator(X, kernel, noise=noise.detach(), cache=False)
    quad, logdet = CholeskyInvQuadLogdet.apply((y - mean)[:, None], ls, s, noise, op)
    return -0.5 * quad.sum() - 0.5 * logdet - 0.5 * X.shape[0] * math.log(2 * math.pi)
