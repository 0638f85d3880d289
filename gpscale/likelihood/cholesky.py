"""Dense Cholesky marginal log-likelihood (exact; used below the crossover size).

The forward pass assembles :math:`\\hat K` from kernel tiles and factorises it; the backward pass
uses the closed form

.. math:: \\partial_\\theta \\log p = \\sum_{ij} W_{ij}\\, \\partial_\\theta \\hat K_{ij}, \\qquad
          W = \\tfrac12 (\\alpha\\alpha^T - \\hat K^{-1}),

through the same tile pass as the iterative gradient, instead of autograd through the dense kernel
(which stores several ``n x n`` intermediates and was 5-10x slower at n = 2000).
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


class _CholeskyMLLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lengthscale, outputscale, noise, mean, cfg):  # noqa: D401 - autograd API
        X, y, kernel = cfg
        op = KernelOperator(X, kernel, noise=noise, cache=False)
        L = cholesky_factor(op.dense())
        r = (y - mean)[:, None]
        alpha = torch.cholesky_solve(r, L)[:, 0]
        n = X.shape[0]
        value = -0.5 * (r[:, 0] @ alpha) - L.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)
        ctx.op, ctx.L, ctx.alpha = op, L, alpha
        return value

    @staticmethod
    def backward(ctx, grad):
        op, L, alpha = ctx.op, ctx.L, ctx.alpha
        # K^-1 from the factor (LAPACK potri on CPU: ~2n^3/3 flops).  A triangular solve against the
        # identity and a product L^-T L^-1 costs ~3n^3 flops, and measured 3x slower at n = 1000-4000
        # (float32 and float64, 1 and 2 threads, MKL).
        W = torch.cholesky_inverse(L).mul_(-0.5)
        W.addr_(alpha, alpha, alpha=0.5)
        g = dense_weighted_derivative(op, W)
        return (grad * g["lengthscale"], grad * g["outputscale"], grad * g["noise"], grad * alpha.sum(), None)


def cholesky_mll(X, y, kernel, noise, mean) -> torch.Tensor:
    """Exact :math:`\\log p(y)` through a dense Cholesky factorisation, differentiable.

    Complexity :math:`O(n^3)` time, about three ``n x n`` buffers of memory: for n up to a few
    thousand (see ``gpscale.CHOLESKY_CROSSOVER``).
    """
    ls, s = kernel.hyper_values(X.dtype, X.device)
    return _CholeskyMLLFunction.apply(ls, s, noise, mean, (X, y, kernel))
