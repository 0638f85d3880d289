"""Re-orthogonalisation of CG residuals and stagnation detection (for low-precision products).

Why re-orthogonalise
--------------------
Preconditioned CG's residuals are orthogonal in the :math:`P^{-1}` inner product,
:math:`r_i^T P^{-1} r_j = 0` for :math:`i \\ne j`, and the CG (= Lanczos) recurrences rely on it.  In
floating point the orthogonality is lost as soon as a Ritz value converges (Paige 1976); with
products rounded to bfloat16/float16 that happens after a handful of steps, the residual stops
decreasing or grows, and CG stalls far above the tolerance (Maddox, Potapczynski & Wilson, UAI 2022).
Classical Gram-Schmidt of each new residual against the stored ones,

.. math:: r \\leftarrow r - \\sum_j \\frac{z_j^T r}{r_j^T z_j}\\, r_j, \\qquad z_j = P^{-1} r_j,

restores it.  In exact arithmetic every coefficient is zero, so the step changes nothing: the CG
coefficients :math:`\\alpha_k, \\beta_k` still define the Lanczos tridiagonal of the Krylov space
(:mod:`gpscale.solvers.lanczos`); re-orthogonalisation only removes the components that rounding put
into directions already explored -- this is selective/full re-orthogonalised Lanczos in CG form
(Parlett & Scott 1979; Saad, *Iterative Methods*, §6.3.2).

Cost per iteration with ``w`` stored residuals: :math:`O(w n t)` flops and :math:`2 w n t` numbers of
memory, next to the :math:`O(n^2 t)` kernel product.  Departure from Maddox et al.: they orthogonalise
unpreconditioned residuals in the Euclidean inner product; with a preconditioner the right inner
product is :math:`P^{-1}`, so the stored pairs are :math:`(r_j, z_j) / \\sqrt{r_j^T z_j}`.
"""

from __future__ import annotations

import torch


class ResidualBasis:
    """Ring buffer of the last ``steps`` normalised residual pairs of every column.

    Layout ``(t, steps, n)`` so both Gram-Schmidt products are one batched GEMM each (no copies).
    Columns that were not updated in a step store zeros, which contribute nothing.
    """

    def __init__(self, steps: int, n: int, t: int, dtype: torch.dtype, device: torch.device):
        self.steps = int(steps)
        self.R = torch.zeros(t, self.steps, n, dtype=dtype, device=device)
        self.Z = torch.zeros_like(self.R)
        self.count = 0

    def store(self, r: torch.Tensor, z: torch.Tensor, rz: torch.Tensor, mask: torch.Tensor) -> None:
        """Append ``(r, z) / sqrt(r^T z)`` for the columns in ``mask`` (zeros elsewhere)."""
        ok = mask & (rz > 0)
        g = torch.where(ok, torch.rsqrt(torch.where(ok, rz, torch.ones_like(rz))), torch.zeros_like(rz))
        slot = self.count % self.steps
        self.R[:, slot, :] = (r * g).T
        self.Z[:, slot, :] = (z * g).T
        self.count += 1

    def orthogonalize_(self, r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Remove from ``r`` (in place) its :math:`P^{-1}`-components along the stored residuals."""
        m = min(self.count, self.steps)
        if m == 0:
            return r
        rT = r.T[:, :, None]                                          # (t, n, 1) view
        c = torch.bmm(self.Z[:, :m], rT) * mask[:, None, None].to(r.dtype)   # (t, m, 1)
        r.sub_(torch.bmm(self.R[:, :m].transpose(1, 2), c)[:, :, 0].T)
        return r


class StallDetector:
    """Flags columns whose residual norm made no progress for ``window`` iterations.

    A column *stagnates* when its residual has not reached a new minimum below ``(1 - decrease)``
    times its best so far for ``window`` consecutive iterations.  CG residual norms are not monotone
    (the error is, in the energy norm), so a window rather than a single increase is the criterion.
    All state lives on the device: no host synchronisation.
    """

    def __init__(self, window: int, decrease: float, rnorm: torch.Tensor):
        self.window, self.factor = int(window), 1.0 - float(decrease)
        self.best = rnorm.clone()
        self.since = torch.zeros_like(rnorm, dtype=torch.long)

    def update(self, rnorm: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Record this iteration's norms; return the active columns that stagnated now."""
        improved = rnorm < self.best * self.factor
        self.best = torch.where(improved, rnorm, self.best)
        self.since = torch.where(improved, torch.zeros_like(self.since), self.since + active.long())
        return active & (self.since >= self.window)
