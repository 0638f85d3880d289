"""Dense Cholesky marginal log-likelihood (exact; used below the crossover size)."""

from __future__ import annotations

import math

import torch


def cholesky_factor(K: torch.Tensor) -> torch.Tensor:
    """Cholesky factor with a clear error instead of ``torch.linalg.LinAlgError``."""
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        raise ValueError(
            f"the kernel matrix is not positive definite in {K.dtype} (Cholesky failed at column {int(info)}); "
            "increase the noise, use float64, or use method='iterative'"
        )
    return L


def cholesky_mll(X, y, kernel, noise, mean) -> torch.Tensor:
    """Exact :math:`\\log p(y)` through a dense Cholesky factorisation; autograd gives the gradient.

    Complexity :math:`O(n^3)` time, :math:`O(n^2)` memory: only for n up to a few thousand.
    """
    n = X.shape[0]
    K = kernel(X)
    K = K + noise * torch.eye(n, dtype=X.dtype, device=X.device)
    L = cholesky_factor(K)
    r = (y - mean)[:, None]
    a = torch.linalg.solve_triangular(L, r, upper=False)
    return -0.5 * (a * a).sum() - L.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)
