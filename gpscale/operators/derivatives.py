"""Derivative products of the kernel matrix, computed tile by tile.

For :math:`\\hat K = s F + \\sigma^2 I` with :math:`F_{ij} = f(q_{ij})` and
:math:`q_{ij} = \\sum_d \\tilde\\Delta_{ijd}^2`, :math:`\\tilde\\Delta_{ijd} = (x_{id} - x_{jd})/\\ell_d`:

.. math::
    \\partial \\hat K / \\partial s = F, \\qquad
    \\partial \\hat K / \\partial \\sigma^2 = I, \\qquad
    \\partial \\hat K_{ij} / \\partial \\ell_d = -\\frac{2 s}{\\ell_d} f'(q_{ij}) \\tilde\\Delta_{ijd}^2 .

For ARD the squared difference is expanded, :math:`\\tilde\\Delta^2 = \\tilde x_i^2 - 2 \\tilde x_i \\tilde x_j
+ \\tilde x_j^2`, so all ``d`` lengthscale products come out of *one* tile matmul with the stacked
right-hand side ``[V, x_d V, x_d^2 V]`` instead of ``d`` separate passes.

Two entry points:

* :func:`derivative_matmul` -- ``(dK/dθ) @ V`` for every hyperparameter θ;
* :func:`bilinear_derivative` -- the scalars :math:`\\sum_c a_c^T (\\partial\\hat K/\\partial\\theta) b_c`,
  all a gradient needs (the MLL backward pass calls this once: cost of about two kernel products).

All derivatives are with respect to the *constrained* values (lengthscale, outputscale, noise);
autograd chains them to the raw parameters.

Backends: on an operator whose ``backend`` is ``"cuda"`` or ``"keops"`` both entry points run as fused
products (:mod:`gpscale.operators.fused_derivatives`); ``dense_weighted_derivative`` (Cholesky path)
always runs on the torch tiles.
"""

from __future__ import annotations

import torch

from ..kernels.fused import fused_weighted, weighted_tile
from .fused_derivatives import fused_bilinear, fused_derivative_matmul
from .kernel_operator import KernelOperator


def _tile_profile(op: KernelOperator, i0, i1, j0, j1):
    q = op.scaled_sqdist(i0, i1, j0, j1)
    f, fp = op.kernel.profile_and_derivative(q)
    return q, f, fp


@torch.no_grad()
def derivative_matmul(op: KernelOperator, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(d\\hat K/d\\theta) @ V`` for every hyperparameter.

    Parameters
    ----------
    op : KernelOperator
    V : (n, t) tensor

    Returns
    -------
    dict
        ``"lengthscale"``: ``(n, t)`` for a shared lengthscale, ``(d, n, t)`` for ARD;
        ``"outputscale"``: ``(n, t)``; ``"noise"``: ``(n, t)`` (equal to ``V``).

    Notes
    -----
    Time :math:`O(n^2 (d + t))` for a shared lengthscale and :math:`O(n^2 d t)` for ARD; memory is
    the operator's tile workspace plus the outputs.
    """
    V2, vec = op._check_rhs(V)
    if op.backend != "torch":
        out_l, out_s = fused_derivative_matmul(op, V2)
        return _pack(out_l, out_s, V2, vec)
    n, t = V2.shape
    Xs, s, ls = op._Xs, op.outputscale, op.lengthscale
    d = Xs.shape[1]
    ard = ls.dim() == 1
    # Stacked right-hand side for the ARD expansion: [V, x_d * V (all d), x_d^2 * V (all d)].
    if ard:
        XV = (Xs[:, :, None] * V2[:, None, :]).reshape(n, d * t)
        X2V = (Xs.pow(2)[:, :, None] * V2[:, None, :]).reshape(n, d * t)
        rhs = torch.cat([V2, XV, X2V], dim=1)
    out_s = torch.zeros(n, t, dtype=V2.dtype, device=V2.device)
    out_l = torch.zeros((d, n, t) if ard else (n, t), dtype=V2.dtype, device=V2.device)
    for i0, i1 in op.tiling.row_tiles(n):
        for j0, j1 in op.tiling.col_tiles(n):
            q, f, fp = _tile_profile(op, i0, i1, j0, j1)
            out_s[i0:i1].addmm_(f, V2[j0:j1])
            if not ard:
                out_l[i0:i1].addmm_(fp.mul_(q), V2[j0:j1])
                continue
            W = fp @ rhs[j0:j1]  # (b, t(2d+1))
            WV = W[:, :t]
            WXV = W[:, t:t + d * t].reshape(-1, d, t)
            WX2V = W[:, t + d * t:].reshape(-1, d, t)
            xi = Xs[i0:i1]
            blk = xi.pow(2)[:, :, None] * WV[:, None, :] - 2 * xi[:, :, None] * WXV + WX2V
            out_l[:, i0:i1] += blk.permute(1, 0, 2)
    scale = (-2.0 * s / ls)
    out_l = out_l * (scale[:, None, None] if ard else scale)
    return _pack(out_l, out_s, V2, vec)


def _pack(out_l, out_s, V2, vec) -> dict[str, torch.Tensor]:
    res = {"lengthscale": out_l, "outputscale": out_s, "noise": V2.clone()}
    if vec:
        res = {k: v[..., 0] for k, v in res.items()}
    return res


@torch.no_grad()
def bilinear_derivative(op: KernelOperator, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """:math:`\\sum_c a_c^T (\\partial \\hat K / \\partial \\theta) b_c` for every hyperparameter θ.

    Parameters
    ----------
    op : KernelOperator
    A, B : (n, t) tensors
        Column pairs; scale the columns of ``B`` to weight them (e.g. ``-1/(2 t)`` for probes).

    Returns
    -------
    dict of 0-d (or ``(d,)`` for ARD lengthscales) tensors with keys ``lengthscale``,
    ``outputscale``, ``noise``.

    Notes
    -----
    Each tile forms :math:`M = A_i B_j^T` and :math:`G = M \\circ f'(Q)`; the ARD sums use
    :math:`\\sum_{ij} G_{ij} \\tilde\\Delta_{ijd}^2 = \\sum_i \\tilde x_{id}^2 (G1)_i
    - 2 \\sum_i \\tilde x_{id} (G \\tilde x_{\\cdot d})_i + \\sum_j \\tilde x_{jd}^2 (1^T G)_j`.
    Time :math:`O(n^2 (t + d))`, memory: the tile workspace.  This replaces autograd through the
    kernel matrix, which would store every tile.
    """
    A2, _ = op._check_rhs(A)
    B2, _ = op._check_rhs(B)
    if A2.shape != B2.shape:
        raise ValueError(f"A and B must have the same shape, got {tuple(A2.shape)} and {tuple(B2.shape)}")
    if op.backend != "torch":
        res = fused_bilinear(op, A2, B2)
        res["noise"] = (A2 * B2).sum()
        return res

    def weights(i0, i1, j0, j1):
        # Symmetry: an off-diagonal tile IJ also stands for JI, whose weights are (A_J B_I^T)^T.
        M = A2[i0:i1] @ B2[j0:j1].T
        if i0 != j0:
            M.addmm_(B2[i0:i1], A2[j0:j1].T)
        return M

    res = _weighted_sums(op, weights)
    res["noise"] = (A2 * B2).sum()
    return res


@torch.no_grad()
def dense_weighted_derivative(op: KernelOperator, W: torch.Tensor) -> dict[str, torch.Tensor]:
    r""":math:`\sum_{ij} W_{ij}\, \partial \hat K_{ij} / \partial\theta` for a dense symmetric ``W``.

    The Cholesky MLL's gradient is this with :math:`W = \tfrac12(\alpha\alpha^T - \hat K^{-1})`.
    Same tile pass as :func:`bilinear_derivative`; ``W`` is read tile by tile.
    """
    n = op.shape[0]
    if W.shape != (n, n):
        raise ValueError(f"W must have shape {(n, n)}, got {tuple(W.shape)}")

    def weights(i0, i1, j0, j1):
        M = W[i0:i1, j0:j1].clone()
        return M.mul_(2.0) if i0 != j0 else M  # W symmetric: the JI tile has the same weights

    res = _weighted_sums(op, weights)
    res["noise"] = W.diagonal().sum()
    return res


def _weighted_sums(op: KernelOperator, weights) -> dict[str, torch.Tensor]:
    r"""Kernel-hyperparameter sums :math:`\sum_{ij} M_{ij} \partial K_{ij}/\partial\theta` over the
    upper-triangle tiles, with ``weights(i0, i1, j0, j1)`` giving each tile's (symmetrised) ``M``."""
    Xs, s, ls = op._Xs, op.outputscale, op.lengthscale
    ard = ls.dim() == 1
    acc_s = torch.zeros((), dtype=Xs.dtype, device=Xs.device)
    acc_l = torch.zeros(Xs.shape[1] if ard else (), dtype=Xs.dtype, device=Xs.device)
    X2 = Xs.pow(2)
    fn = fused_weighted(op.kernel, op.shape[0] * op.shape[1])  # one compiled pass per tile, or None
    for i0, i1, j0, j1 in op._tiles:  # the upper triangle (or a distributed rank's share of it)
        q = op.scaled_sqdist(i0, i1, j0, j1)
        G = weights(i0, i1, j0, j1)
        acc_s += weighted_tile(fn, op.kernel, q, G)  # G is now M o f'(q)
        if not ard:
            acc_l += (G * q).sum()
            continue
        acc_l += X2[i0:i1].T @ G.sum(1) - 2 * (Xs[i0:i1] * (G @ Xs[j0:j1])).sum(0) + X2[j0:j1].T @ G.sum(0)
    return {"lengthscale": acc_l * (-2.0 * s / ls), "outputscale": acc_s}
