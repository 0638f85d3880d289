"""Randomized Nyström preconditioner (Frangella, Tropp & Udell 2023), built from kernel products only.

The randomized Nyström approximation of the kernel part ``K`` with a Gaussian sketch
:math:`\\Omega \\in \\mathbb R^{n \\times \\ell}` is :math:`\\hat K = (K\\Omega)(\\Omega^T K \\Omega)^{+}(K\\Omega)^T`.
The numerically stable construction ("Randomized Nyström preconditioning", SIAM J. Matrix Anal.
Appl. 44(2), 2023, Algorithm 2.1; Tropp, Yurtsever, Udell & Cevher 2017) shifts by a tiny
:math:`\\nu` so the small Gram matrix is safely positive definite:

#. :math:`\\Omega` Gaussian, orthonormalised (thin QR); :math:`Y = K\\Omega` (one batched product);
#. :math:`\\nu = \\sqrt n\\,\\varepsilon\\,\\|Y\\|_2`, :math:`Y_\\nu = Y + \\nu\\Omega`;
#. :math:`C = \\operatorname{chol}(\\Omega^T Y_\\nu)`, :math:`B = Y_\\nu C^{-T}`;
#. thin SVD :math:`B = U\\Sigma V^T`, :math:`\\Lambda = \\max(\\Sigma^2 - \\nu, 0)`, so
   :math:`\\hat K = U\\Lambda U^T`.

The preconditioner is :math:`P = \\hat K + \\sigma^2 I = LL^T + \\sigma^2 I` with
:math:`L = U\\Lambda^{1/2}` -- a :class:`~gpscale.precond.base.LowRankPlusDiagonal`, so the Woodbury
solve, the exact log-determinant and the sampler are shared with the Cholesky preconditioners.
(Frangella et al. scale the complement of :math:`\\operatorname{range}(U)` by
:math:`\\hat\\lambda_\\ell + \\mu` instead; the plain :math:`\\sigma^2 I` form keeps
:math:`\\log|P|` and :math:`N(0, P)` trivial for the preconditioned log-det estimator.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._validation import check_bool, check_positive_int
from .base import LowRankPlusDiagonal, Preconditioner, low_rank_preconditioner
from .rpcholesky import make_generator


def nystrom_factor(op, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Randomized Nyström factor ``L`` (``L L^T`` approximates the kernel part ``K`` of ``op``).

    Parameters
    ----------
    op : KernelOperator
        Needs ``kernel_matmul(V)`` (and ``kernel_diagonal()`` for the residual-trace statistic).
    rank : int
        Sketch size :math:`\\ell` (``min(rank, n)`` is used).
    generator : torch.Generator
        On ``op.device``; draws the sketch.

    Returns
    -------
    L : (n, rank) tensor in ``op.dtype``, and statistics (``shift``, ``eigenvalues``,
    ``residual_trace`` :math:`= \\operatorname{tr}(K) - \\operatorname{tr}(\\hat K)`, ``trace``).

    Notes
    -----
    One kernel product with :math:`\\ell` columns (:math:`O(n^2 \\ell)` for a dense operator), plus
    :math:`O(n\\ell^2)` for the QR, Cholesky and SVD, done in float64.  Memory :math:`O(n\\ell)`.
    """
    n = op.shape[0]
    ell = min(rank, n)
    omega = torch.randn(n, ell, dtype=torch.float64, device=op.device, generator=generator)
    omega = torch.linalg.qr(omega).Q
    Y = op.kernel_matmul(omega.to(op.dtype)).to(torch.float64)
    eps = torch.finfo(op.dtype).eps
    nu = (n ** 0.5) * eps * float(torch.linalg.matrix_norm(Y, ord=2))
    nu = max(nu, torch.finfo(torch.float64).tiny)
    for _ in range(8):  # the shift makes the Gram matrix PD; grow it if rounding still defeats it
        Y_nu = Y + nu * omega
        gram = omega.T @ Y_nu
        C, info = torch.linalg.cholesky_ex(0.5 * (gram + gram.T))
        if int(info) == 0:
            break
        nu *= 10.0
    else:
        raise RuntimeError("Nyström: the shifted sketch Gram matrix is not positive definite; "
                           "check the kernel hyperparameters for NaN/Inf")
    B = torch.linalg.solve_triangular(C, Y_nu.T, upper=False).T  # Y_nu C^{-T}
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sigma * sigma - nu).clamp_min(0.0)
    L = (U * lam.sqrt()).to(op.dtype)
    trace0 = float(op.kernel_diagonal().to(torch.float64).sum())
    stats = {"rank": ell, "shift": nu, "eigenvalues": lam.tolist(), "trace": trace0,
             "residual_trace": max(trace0 - float(lam.sum()), 0.0)}
    return L.contiguous(), stats


@dataclass(frozen=True)
class Nystrom(Preconditioner):
    """Randomized Nyström preconditioner :math:`P = U\\Lambda U^T + \\sigma^2 I` (kernel products only).

    Parameters
    ----------
    rank : int, default 100
        Sketch size :math:`\\ell` (the rank of :math:`\\hat K`).
    seed : int or None, default 0
        Seeds the Gaussian sketch (a :class:`torch.Generator` on the operator's device);
        ``None`` draws the seed from torch's global generator.
    residual_diagonal : bool, default False
        Add :math:`\\operatorname{diag}(K - LL^T)` to the noise on the diagonal of ``P`` (FITC-style,
        Cutajar et al. 2016): ``P`` then has the diagonal of :math:`\\hat K`.  Lowers the spread of the
        log-det estimator when the low-rank part leaves much kernel mass unexplained; may raise the
        CG iterations (see :class:`LowRankPlusDiagonal`).

    Notes
    -----
    Build: one kernel product with ``rank`` columns -- :math:`O(n^2\\ell)` kernel work, so far more
    expensive than pivoted Cholesky's ``k`` rows when the kernel is recomputed, but only GEMMs (fast
    on GPU) and no row access -- plus :math:`O(n\\ell^2)` dense algebra.  Apply: :math:`O(n\\ell)` per
    column.  Expected trace-norm error (Frangella et al. 2023, Lemma A.7; Halko et al. 2011):
    :math:`\\mathbb E\\|K - \\hat K\\|_* \\le (1 + \\tfrac{p}{\\ell - p - 1})\\|K - [\\![K]\\!]_p\\|_*`
    for any :math:`p < \\ell - 1`.  References: Frangella, Tropp & Udell, "Randomized Nyström
    preconditioning", SIAM J. Matrix Anal. Appl. 2023.
    """

    rank: int = 100
    seed: int | None = 0
    residual_diagonal: bool = False

    def __post_init__(self):
        check_positive_int("rank", self.rank, minimum=0)
        check_bool("residual_diagonal", self.residual_diagonal)
        if self.seed is not None:
            check_positive_int("seed", self.seed, minimum=0)

    def build(self, op) -> LowRankPlusDiagonal:
        t0 = time.perf_counter()
        if self.rank == 0:
            L = torch.zeros(op.shape[0], 0, dtype=op.dtype, device=op.device)
            trace0 = float(op.kernel_diagonal().sum())
            stats = {"rank": 0, "shift": 0.0, "eigenvalues": [], "trace": trace0, "residual_trace": trace0}
        else:
            L, stats = nystrom_factor(op, self.rank, make_generator(self.seed, op.device))
        stats.update(name="nystrom", seed=self.seed, build_seconds=time.perf_counter() - t0)
        return low_rank_preconditioner(op, L, stats, self.residual_diagonal)
