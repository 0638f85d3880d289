"""Derivative products on the fused backends (``"cuda"``, ``"keops"``).

Same mathematics as :mod:`gpscale.operators.derivatives`, but the tiles are never formed on the host:
every quantity is a fused *profile product* (:func:`gpscale.operators.backends.fused_products`).

* Shared lengthscale: :math:`\\partial\\hat K/\\partial\\ell = -\\tfrac{2s}{\\ell} (F'\\circ Q)`, so one
  ``"f_dq"`` pass gives both ``F V`` (outputscale) and ``(F' o Q) V`` (lengthscale) -- one
  ``exp`` per pair for both.
* ARD: :math:`\\sum_j F'_{ij}\\tilde\\Delta_{ijd}^2 v_j = \\tilde x_{id}^2 (F'V)_i - 2\\tilde x_{id}
  (F'(x_d V))_i + (F'(x_d^2 V))_i`, i.e. one ``"d"`` pass over the stacked right-hand side
  ``[V, x_d V, x_d^2 V]`` of width ``t(2d+1)`` plus one ``"f"`` pass.
* Bilinear forms: :math:`\\sum_c a_c^T (\\partial\\hat K/\\partial\\theta) b_c` =
  ``sum(A * (dK/dθ) B)``, i.e. the products above applied to ``B`` and contracted with ``A``.

The dense-weight form used by the Cholesky path (``dense_weighted_derivative``, n <= 1500) always
runs on the torch tiles.
"""

from __future__ import annotations

import torch

from .backends import fused_products


def fused_derivative_matmul(op, V2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dK/dℓ @ V, dK/ds @ V)`` for ``V2`` of shape ``(n, t)`` on the operator's fused backend.

    Returns the lengthscale product (``(n, t)`` shared, ``(d, n, t)`` ARD) and the outputscale
    product ``F V``.  Time: one pass over the pairs with ``t`` columns (shared) or ``t (2d + 2)``
    columns in two passes (ARD).
    """
    Xs, s, ls = op._Xs, op.outputscale, op.lengthscale
    if ls.dim() == 0:
        F, FQ = fused_products(op, V2, "f_dq")
        return FQ.mul_(-2.0 * s / ls), F
    n, t = V2.shape
    d = Xs.shape[1]
    XV = (Xs[:, :, None] * V2[:, None, :]).reshape(n, d * t)
    X2V = (Xs.pow(2)[:, :, None] * V2[:, None, :]).reshape(n, d * t)
    W = fused_products(op, torch.cat([V2, XV, X2V], dim=1), "d")
    WV, WXV, WX2V = W[:, :t], W[:, t:t + d * t].reshape(n, d, t), W[:, t + d * t:].reshape(n, d, t)
    blk = Xs.pow(2)[:, :, None] * WV[:, None, :] - 2 * Xs[:, :, None] * WXV + WX2V
    out_l = blk.permute(1, 0, 2) * (-2.0 * s / ls)[:, None, None]
    return out_l, fused_products(op, V2, "f")


def fused_bilinear(op, A2: torch.Tensor, B2: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_c a_c^T (dK/dθ) b_c`` for the kernel hyperparameters, from fused products of ``B2``."""
    dl, ds = fused_derivative_matmul(op, B2)
    if dl.dim() == 3:
        acc_l = (dl * A2[None]).sum(dim=(1, 2))
    else:
        acc_l = (dl * A2).sum()
    return {"lengthscale": acc_l, "outputscale": (ds * A2).sum()}
