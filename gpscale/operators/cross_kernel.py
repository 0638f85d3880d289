"""The lazy cross-covariance ``K(X, Z)``: tiles computed on demand, leading rows cached in a budget.

The kernel matrix is touched only through tiles: a product ``K @ V`` computes each tile of
``K`` from the (centred, lengthscale-scaled) inputs, applies it, and drops it.  Leading rows are
cached densely while they fit the operator's memory budget, so small problems pay the kernel
evaluation once and large ones recompute only what does not fit.  The symmetric
``K(X, X) + noise * I`` builds on it: :mod:`gpscale.operators.kernel_operator`.

Complexity of one product with ``t`` columns: :math:`O(n m (d + t))` time,
:math:`O(\\text{budget})` extra memory (never :math:`O(nm)` unless it fits the budget).
"""

from __future__ import annotations

import torch

from .._validation import check_inputs, check_positive_hyper, check_same
from ..kernels.base import StationaryKernel, floor_sqdist_
from ..kernels.fused import evaluate as fused_evaluate
from ..kernels.fused import fused_profile
from .backends import check_backend_name, fused_products, select_backend
from .blocking import plan_tiling
from .expansion import coincidence_threshold


class CrossKernelOperator:
    """Lazy cross-covariance ``K(X, Z)`` (no noise), shape ``(n, m)``.

    Parameters
    ----------
    X : (n, d) tensor
    Z : (m, d) tensor, same dtype and device as ``X``
    kernel : StationaryKernel
        Hyperparameters are read (and detached) at construction: the operator is a snapshot.
    memory_budget : int, optional
        Bytes for the kernel-row cache and tile workspace; default
        :data:`gpscale.operators.blocking.DEFAULT_MEMORY_BUDGET`.
    tile_rows, tile_cols : int, optional
        Tile shape override.
    cache : bool, default True
        Keep leading kernel rows in memory while they fit the budget.
    backend : {"auto", "cuda", "keops", "torch"}, "cuda:<variant>" or CudaBackend
        Product implementation, see :mod:`gpscale.operators.backends`.  ``"torch"`` is the blocked
        pure-torch path (CPU and CUDA); ``"auto"`` picks the fastest available for the device and
        size.  The choice is in ``op.backend`` (and in the MLL statistics).  ``"cuda:tc3"`` fixes
        the CUDA kernel variant; a :class:`~gpscale.operators.CudaBackend` also sets its column splits.
    """

    def __init__(self, X, Z, kernel: StationaryKernel, *, memory_budget=None, tile_rows=None,
                 tile_cols=None, cache: bool = True, backend: str = "auto"):
        check_inputs(X, "X")
        check_inputs(Z, "Z")
        check_same(X, Z, "X", "Z")
        if X.shape[1] != Z.shape[1]:
            raise ValueError(f"X has d={X.shape[1]} columns but Z has d={Z.shape[1]}; they must match")
        if not isinstance(kernel, StationaryKernel):
            raise TypeError(f"kernel must be a gpscale kernel (e.g. gpscale.kernels.RBF()), got {type(kernel).__name__}")
        check_backend_name(backend)
        kernel.check_dims(X.shape[1])
        self.kernel = kernel
        with torch.no_grad():
            ls, s = kernel.hyper_values(X.dtype, X.device)
            check_positive_hyper("lengthscale", ls)
            check_positive_hyper("outputscale", s)
            self.lengthscale, self.outputscale = ls.detach(), s.detach()
            self._outputscale_value = float(s)
            # Centre before scaling: the expanded distance ||x||^2 - 2 x.z + ||z||^2 loses
            # |x|^2 * eps to cancellation, so moving the data to the origin keeps q accurate.
            center = X.mean(0)
            self._Xs = (X - center) / self.lengthscale
            self._Zs = self._Xs if Z is X else (Z - center) / self.lengthscale
            self._xn = self._Xs.pow(2).sum(1)
            self._zn = self._xn if Z is X else self._Zs.pow(2).sum(1)
            # Kernels with a kink at q = 0 (Matérn-1/2): q below the expansion's error bound is set
            # to 0, so repeated inputs get q = 0 exactly (see .expansion).
            self._qsnap = coincidence_threshold(kernel, self._xn, self._zn)
            # Large operators evaluate their tiles in one compiled pass (gpscale.kernels.fused).
            self._fused = fused_profile(kernel, X.shape[0] * Z.shape[0])
            self._qsnap_t = torch.tensor(self._qsnap, dtype=X.dtype, device=X.device) if self._fused else None
            # Augmented features: one GEMM of width d+2 yields c*q = c(|x|^2 - 2 x.z + |z|^2)
            # directly (c = kernel.sqdist_scale, -1/2 for RBF), so a tile costs a GEMM write and
            # one in-place elementwise pass instead of four memory passes.
            c = float(kernel.sqdist_scale)
            one_x = torch.ones_like(self._xn[:, None])
            one_z = torch.ones_like(self._zn[:, None])
            self._Xa = torch.cat([self._Xs, self._xn[:, None], one_x], dim=1)
            # Stored transposed: MKL's GEMM is ~3x faster with a contiguous (d+2, m) right operand.
            self._ZaT = torch.cat([-2.0 * c * self._Zs, c * one_z, c * self._zn[:, None]], dim=1).T.contiguous()
        self.X, self.Z = X, Z
        self._symmetric = Z is X
        self.tiling = plan_tiling(X.shape[0], Z.shape[0], X.dtype, X.device, memory_budget,
                                  tile_rows, tile_cols, cache)
        self._cache: torch.Tensor | None = None
        self.num_products = 0
        self.backend = select_backend(self, backend)

    # ------------------------------------------------------------------ metadata
    @property
    def shape(self) -> tuple[int, int]:
        return (self.X.shape[0], self.Z.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    @property
    def device(self) -> torch.device:
        return self.X.device

    # ------------------------------------------------------------------ tiles
    def scaled_sqdist(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Tile of squared scaled distances ``q`` (a fresh tensor the caller may overwrite)."""
        q = torch.addmm(self._zn[j0:j1], self._Xs[i0:i1], self._Zs[j0:j1].T, alpha=-2.0)
        q = floor_sqdist_(q.add_(self._xn[i0:i1, None]), self._qsnap)
        return self._zero_diagonal(q, i0, i1, j0, j1)

    def _zero_diagonal(self, t: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Set the entries of a distance tile that lie on the diagonal of ``K(X, X)`` to exactly 0.

        The expansion leaves O(eps |x|^2) instead of an exact 0 there; through the Matérn-1/2
        square root that would become an O(sqrt(eps)) error in ``K_ii``.
        """
        lo, hi = max(i0, j0), min(i1, j1)
        if self._symmetric and lo < hi:
            r = torch.arange(lo, hi, device=t.device)
            t[r - i0, r - j0] = 0.0
        return t

    def profile_tile(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Tile of ``f(q)``: the kernel divided by the outputscale (the hot path of every product)."""
        u = self._Xa[i0:i1] @ self._ZaT[:, j0:j1]
        u = self._zero_diagonal(u, i0, i1, j0, j1)
        return fused_evaluate(self._fused, self.kernel, u, self._qsnap, self._qsnap_t)

    def _ensure_cache(self) -> None:
        c = self.tiling.cached_rows
        if c > 0 and self._cache is None:
            m = self.shape[1]
            self._cache = torch.empty(c, m, dtype=self.dtype, device=self.device)
            for i0, i1 in self.tiling.row_tiles(c):
                for j0, j1 in self.tiling.col_tiles(m):
                    self._cache[i0:i1, j0:j1] = self.profile_tile(i0, i1, j0, j1)

    # ------------------------------------------------------------------ products
    def _check_rhs(self, V: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"the right-hand side must be a torch.Tensor, got {type(V).__name__}")
        check_same(self.X, V, "the operator's X", "the right-hand side")
        vec = V.dim() == 1
        V2 = V[:, None] if vec else V
        if V2.dim() != 2 or V2.shape[0] != self.shape[1]:
            raise ValueError(f"cannot multiply an operator of shape {self.shape} by a tensor of shape {tuple(V.shape)}; "
                             f"the right-hand side needs {self.shape[1]} rows")
        return V2, vec

    @torch.no_grad()
    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``K(X, Z) @ V`` for ``V`` of shape ``(m,)`` or ``(m, t)``."""
        V2, vec = self._check_rhs(V)
        out = self._profile_matmul(V2).mul_(self._outputscale_value)
        return out[:, 0] if vec else out

    def _profile_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``F @ V`` with ``F = f(Q)`` (no outputscale), cached rows first, then the tiles."""
        self.num_products += 1
        if self.backend != "torch":
            return fused_products(self, V, "f")
        n, m = self.shape
        # Work in the transposed layout (t x n): MKL runs the skinny products V^T F^T 2-6x faster
        # than F V on the same tile.
        VT = V.T.contiguous()
        outT = torch.empty(V.shape[1], n, dtype=V.dtype, device=V.device)
        self._ensure_cache()
        c = self.tiling.cached_rows
        if c > 0:
            outT[:, :c] = VT @ self._cache.T
        for i0, i1 in self.tiling.row_tiles(n, start=c):
            blk = outT[:, i0:i1]
            blk.zero_()
            for j0, j1 in self.tiling.col_tiles(m):
                blk.addmm_(VT[:, j0:j1], self.profile_tile(i0, i1, j0, j1).T)
        return outT.T.contiguous()

    __matmul__ = matmul

    @torch.no_grad()
    def rows(self, idx) -> torch.Tensor:
        """Kernel rows ``K(X[idx], Z)``, shape ``(len(idx), m)`` (row access for preconditioners)."""
        idx = torch.as_tensor(idx, device=self.device).reshape(-1)
        Xs, xn = self._Xs[idx], self._xn[idx]
        q = floor_sqdist_(torch.addmm(self._zn, Xs, self._Zs.T, alpha=-2.0).add_(xn[:, None]), self._qsnap)
        if self._symmetric:
            q[torch.arange(idx.numel(), device=self.device), idx] = 0.0
        return self.kernel.profile_(q).mul_(self.outputscale)

    @torch.no_grad()
    def to_dense(self, max_entries: int = 1 << 26) -> torch.Tensor:
        """Materialise ``K(X, Z)``; refuses above ``max_entries`` (default 64M) to protect memory."""
        n, m = self.shape
        if n * m > max_entries:
            raise MemoryError(f"to_dense() of a {n}x{m} operator needs {n * m} entries (> max_entries={max_entries}); "
                              "use matmul() instead or raise max_entries explicitly")
        return self.matmul(torch.eye(m, dtype=self.dtype, device=self.device))
