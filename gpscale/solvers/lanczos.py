"""Lanczos tridiagonals recovered from CG coefficients, and Gauss quadrature on them.

Preconditioned CG on :math:`A x = b` with preconditioner :math:`P` is the Lanczos process on
:math:`P^{-1/2} A P^{-1/2}` started at :math:`P^{-1/2} r_0 / \\|P^{-1/2} r_0\\|`.  With CG step
sizes :math:`\\alpha_k` and direction updates :math:`\\beta_k`, the Lanczos tridiagonal is
(Saad, *Iterative Methods for Sparse Linear Systems*, §6.7.3; Gardner et al. 2018, mBCG)

.. math::
    T_{00} = 1/\\alpha_0, \\quad
    T_{kk} = 1/\\alpha_k + \\beta_{k-1}/\\alpha_{k-1}, \\quad
    T_{k,k+1} = \\sqrt{\\beta_k}/\\alpha_k .

Gauss quadrature then gives :math:`r_0^T P^{-1} g(\\cdot) \\ldots \\approx \\|w\\|^2 e_1^T g(T) e_1`
for a matrix function ``g`` (``log`` for SLQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch


@dataclass(frozen=True)
class Tridiagonal:
    """Per-column Lanczos coefficients from one batched CG run.

    Attributes
    ----------
    alphas, betas : (k, t) tensors
        CG step sizes and direction updates of the ``t`` tracked columns, iteration-major; entries
        after a column stopped are zero.
    lengths : (t,) long tensor
        Number of Lanczos steps each column took (the size of its tridiagonal).
    initial_norm2 : (t,) tensor
        :math:`r_0^T P^{-1} r_0` of each column: the squared norm of the Lanczos start vector.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    lengths: torch.Tensor
    initial_norm2: torch.Tensor

    @property
    def num_columns(self) -> int:
        return int(self.lengths.numel())

    def matrices(self) -> torch.Tensor:
        """Dense tridiagonals, shape ``(t, m, m)`` with ``m = max(lengths)``, in float64.

        Columns shorter than ``m`` are padded with a decoupled identity block: its eigenvectors have
        a zero first component, so they carry no quadrature weight.
        """
        a = self.alphas.to(torch.float64)
        b = self.betas.to(torch.float64)
        t = self.num_columns
        m = int(self.lengths.max().item()) if t else 0
        T = torch.zeros(t, m, m, dtype=torch.float64, device=a.device)
        if m == 0:
            return T
        a, b = a[:m].T, b[:m].T  # (t, m)
        steps = torch.arange(m, device=a.device)
        valid = steps[None, :] < self.lengths[:, None]
        inv_a = torch.where(valid, 1.0 / torch.where(valid, a, torch.ones_like(a)), torch.zeros_like(a))
        diag = inv_a.clone()
        diag[:, 1:] += b[:, :-1] * inv_a[:, :-1]
        diag = torch.where(valid, diag, torch.ones_like(diag))
        off_valid = valid[:, 1:]
        off = torch.where(off_valid, b[:, :-1].clamp_min(0).sqrt() * inv_a[:, :-1], torch.zeros_like(inv_a[:, 1:]))
        idx = torch.arange(m, device=a.device)
        T[:, idx, idx] = diag
        T[:, idx[:-1], idx[1:]] = off
        T[:, idx[1:], idx[:-1]] = off
        return T

    def quadrature(self, fn) -> torch.Tensor:
        """Gauss-quadrature estimates :math:`\\|w_i\\|^2 e_1^T fn(T_i) e_1`, one per column (float64).

        Complexity :math:`O(t m^3)` for the eigendecompositions (``m`` is at most the CG iteration
        count, so this is negligible next to the kernel products).
        """
        T = self.matrices().cpu()
        out = torch.zeros(self.num_columns, dtype=torch.float64)
        # One small symmetric tridiagonal eigenproblem per column on the host (LAPACK via SciPy):
        # a batched torch.linalg.eigh of these tiny matrices was slow under OpenMP contention.
        for i, m in enumerate(self.lengths.tolist()):
            if m == 0:
                continue
            d = T[i].diagonal()[:m].numpy()
            e = T[i].diagonal(1)[: m - 1].numpy()
            evals, evecs = scipy.linalg.eigh_tridiagonal(d, e)
            # Clamp: round-off can push a tiny Ritz value of an SPD matrix below zero.
            lam = torch.from_numpy(evals).clamp_min(torch.finfo(torch.float64).tiny)
            out[i] = (torch.from_numpy(evecs[0]).pow(2) * fn(lam)).sum()
        return (self.initial_norm2.to(torch.float64).cpu() * out).to(self.initial_norm2.device)
