"""The regularised kernel matrix ``K(X, X) + noise * I`` of an exact GP: symmetric tiles, cached.

Only upper-triangle tiles are evaluated (each off-diagonal tile serves both of its products) and
kept while they fit the memory budget, so small problems pay the kernel evaluation once and large
ones recompute only what does not fit.  Low-precision products round each cached tile once
(:mod:`gpscale.precision`).  The tile and backend mechanics are shared with
:class:`~gpscale.operators.cross_kernel.CrossKernelOperator`.

Complexity of one product with ``t`` columns: :math:`O(n^2 (d + t) / 2)` time when recomputed,
:math:`O(n^2 t / 2)` once cached; :math:`O(\\text{budget})` extra memory.
"""

from __future__ import annotations

import copy

import torch

from .._validation import check_inputs, check_positive_hyper
from ..kernels.base import StationaryKernel
from ..precision import (
    dtype_name,
    is_low_precision,
    lowp_mm,
    round_to,
    scale_columns,
    storage_dtype,
)
from .backends import check_backend_name, fused_products, select_backend
from .blocking import plan_symmetric_tiling
from .cross_kernel import CrossKernelOperator

__all__ = ["CrossKernelOperator", "KernelOperator"]


class KernelOperator(CrossKernelOperator):
    """The regularised kernel matrix ``K(X, X) + noise * I`` of an exact GP, shape ``(n, n)``.

    Parameters
    ----------
    X : (n, d) tensor
    kernel : StationaryKernel
    noise : float or 0-d tensor, > 0
        Gaussian observation noise variance :math:`\\sigma^2`.
    memory_budget : int, optional
        Bytes for the tile cache and workspace (default 1 GiB).
    tile : int, optional
        Edge of the square tiles (``tile_rows`` / ``tile_cols`` are accepted as aliases).
    cache : bool, default True
        Keep upper-triangle tiles in memory while they fit ``memory_budget``.
    backend : {"auto", "cuda", "keops", "torch"}, "cuda:<variant>" or CudaBackend
        See :class:`CrossKernelOperator`; fused backends recompute every pair (no tile cache).
    product_dtype : {None, "float32", "tf32", "bfloat16", "float16"} or torch.dtype
        Arithmetic of the products (:mod:`gpscale.precision`).  ``None`` (default) multiplies in the
        dtype of ``X``.  A low precision rounds each kernel tile once (and caches it rounded: a bf16
        cache holds twice the tiles) and each right-hand-side block, scaled per column by a power of
        two, and accumulates in float32 (:func:`gpscale.precision.lowp_mm`); the distances and the
        ``exp`` stay in the dtype of ``X`` (the expanded distance cancels catastrophically in 16
        bits), and the noise term ``noise * V`` is added in the dtype of ``X``.  Low-precision
        products run on the ``torch`` backend (``auto`` picks it).

    Notes
    -----
    Symmetry halves the work: only upper-triangle tiles are evaluated, each off-diagonal tile
    serves ``K_IJ V_J`` and ``K_IJ^T V_I``, and the cache holds about ``n^2/2`` entries when full
    (a 20k-point float32 problem is cached whole in ~0.9 GB).

    Examples
    --------
    >>> op = KernelOperator(X, gpscale.kernels.RBF(lengthscale=0.5), noise=0.1)
    >>> Y = op.matmul(V)        # (K + 0.1 I) V, memory-bounded
    """

    def __init__(self, X, kernel: StationaryKernel, noise=1.0, *, memory_budget=None, tile=None, tile_rows=None,
                 tile_cols=None, cache: bool = True, backend: str = "auto", product_dtype=None):
        check_inputs(X, "X", min_rows=1)
        check_backend_name(backend)
        self.product_precision = None if product_dtype is None else dtype_name(product_dtype)
        if self.product_precision == "float64" and X.dtype != torch.float64:
            raise ValueError(f"product_dtype='float64' needs float64 inputs, but X is {X.dtype}; pass X.double()")
        # The parent resolves the backend for its provisional tiling; "torch" here, re-resolved below.
        super().__init__(X, X, kernel, memory_budget=memory_budget, cache=False, backend="torch")
        self.tiling = plan_symmetric_tiling(X.shape[0], X.dtype, X.device, memory_budget,
                                            tile or tile_rows or tile_cols, cache)
        self._tiles = self.tiling.upper_tiles(X.shape[0])
        self._tile_cache: list[torch.Tensor] = []
        self._cache_used = 0
        noise_t = (noise.detach() if isinstance(noise, torch.Tensor)
                   else torch.as_tensor(noise, dtype=X.dtype))
        if noise_t.numel() != 1:
            raise ValueError(f"noise must be a scalar, got shape {tuple(noise_t.shape)}")
        check_positive_hyper("noise", noise_t)
        self.noise = noise_t.reshape(()).to(dtype=X.dtype, device=X.device)
        self._noise_value = float(noise_t)  # one host read at build time, none per product
        self._lowrank: torch.Tensor | None = None  # with_product_dtype(..., lowrank=L): F - G G^T is rounded
        self._lowp = is_low_precision(self.product_precision) or (
            self.product_precision is not None and dtype_name(X.dtype) != self.product_precision)
        if self._lowp and backend not in ("auto", "torch"):
            raise ValueError(f"product_dtype={self.product_precision!r} runs on the torch backend only, got "
                             f"backend={backend!r}; use backend='torch' or 'auto'")
        self.backend = "torch" if self._lowp else select_backend(self, backend)

    def with_product_dtype(self, product_dtype, lowrank: torch.Tensor | None = None) -> "KernelOperator":
        """The same operator (shared inputs and hyperparameters) with another product precision.

        Parameters
        ----------
        product_dtype : str, torch.dtype or None
        lowrank : (n, k) tensor, optional
            A factor with :math:`K \\approx LL^T` (kernel units, e.g. a pivoted-Cholesky
            preconditioner's).  A low-precision operator then rounds only :math:`K - LL^T` and adds
            :math:`L(L^T V)` unrounded, so the rounding error scales with the residual's entries
            (:attr:`gpscale.PrecisionPolicy.lowrank_correction`).  Ignored for exact products.

        Returns ``self`` when nothing changes; otherwise a shallow copy with its own, empty tile cache
        (so during a fallback both caches may live: up to twice ``memory_budget``).
        """
        name = None if product_dtype is None else dtype_name(product_dtype)
        if name == "float64" and self.dtype != torch.float64:
            raise ValueError(f"product_dtype='float64' needs float64 inputs, but X is {self.dtype}")
        lowp = name is not None and name != dtype_name(self.dtype)
        factor = self._profile_factor(lowrank) if lowp and lowrank is not None and lowrank.shape[-1] else None
        if factor is None and self._lowrank is None and (
                name == self.product_precision or (name == dtype_name(self.dtype) and not self._lowp)):
            return self
        other = copy.copy(self)
        other.product_precision, other._lowp, other._lowrank = name, lowp, factor
        other._tile_cache, other._cache_used, other.num_products = [], 0, 0
        if other._lowp:
            other.backend = "torch"
        return other

    def _profile_factor(self, L: torch.Tensor) -> torch.Tensor:
        """``L / sqrt(outputscale)`` in the operator's dtype: the factor in profile units (``F ~ G G^T``)."""
        if L.dim() != 2 or L.shape[0] != self.shape[0]:
            raise ValueError(f"lowrank must be an (n, k) = ({self.shape[0]}, k) factor, got shape {tuple(L.shape)}")
        if L.device != self.device:
            raise ValueError(f"lowrank is on {L.device} but the operator on {self.device}; move it with .to()")
        if not L.is_floating_point():
            raise TypeError(f"lowrank must be a floating-point factor, got dtype {L.dtype}")
        bad = int((~torch.isfinite(L)).sum())  # one host check per low-precision operator, not per product
        if bad:
            raise ValueError(f"lowrank contains {bad} NaN/Inf value(s): it must approximate the kernel (K ~ L L^T); "
                             "rebuild the preconditioner from finite inputs, or pass lowrank=None")
        return (L.to(self.dtype) * (1.0 / self._outputscale_value) ** 0.5).contiguous()

    def kernel_bytes(self, product_dtype=None) -> int:
        """Bytes of the whole (upper-triangle) tile set in ``product_dtype`` (default: the inputs' dtype).

        Compare with ``tiling.cache_bytes``: a product precision whose tiles fit is computed once and
        then costs one pass of GEMMs per product; one whose tiles do not is recomputed every product.
        """
        item = torch.empty((), dtype=storage_dtype(self.dtype if product_dtype is None else product_dtype))
        return self.tiling.upper_entries(self.shape[0]) * item.element_size()

    @property
    def cached_fraction(self) -> float:
        """Fraction of the upper-triangle tiles held in memory (after the first product)."""
        return len(self._tile_cache) / max(1, len(self._tiles))

    def _tile(self, idx: int) -> torch.Tensor:
        if idx < len(self._tile_cache):
            return self._tile_cache[idx]
        i0, i1, j0, j1 = self._tiles[idx]
        F = self.profile_tile(i0, i1, j0, j1)
        if self._lowp:  # round once; the cache keeps the rounded tile (half the bytes in 16 bits)
            if self._lowrank is not None:  # round the residual F - G G^T: smaller entries, smaller error
                G = self._lowrank
                F = torch.addmm(F, G[i0:i1], G[j0:j1].T, alpha=-1.0)
            F = round_to(F, self.product_precision)
        if idx == len(self._tile_cache) and self._cache_used + F.numel() * F.element_size() <= self.tiling.cache_bytes:
            self._tile_cache.append(F)
            self._cache_used += F.numel() * F.element_size()
        return F

    def _profile_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``F @ V`` over upper-triangle tiles, each off-diagonal tile applied twice."""
        self.num_products += 1
        if self._lowp:
            return self._lowp_profile_matmul(V)
        if self.backend != "torch":
            return fused_products(self, V, "f")
        VT = V.T.contiguous()  # transposed layout: see CrossKernelOperator._profile_matmul
        outT = torch.zeros(V.shape[1], self.shape[0], dtype=V.dtype, device=V.device)
        for idx, (i0, i1, j0, j1) in enumerate(self._tiles):
            F = self._tile(idx)
            outT[:, i0:i1].addmm_(VT[:, j0:j1], F.T)
            if i0 != j0:
                outT[:, j0:j1].addmm_(VT[:, i0:i1], F)
        return outT.T.contiguous()

    def _lowp_profile_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``F @ V`` in the product precision: rounded tiles and blocks, float32 accumulation.

        Each column of ``V`` is scaled by a power of two so that its largest entry lies in [0.5, 1)
        before rounding (float16 would otherwise overflow above 65504 or lose digits below 6e-5); the
        tile entries ``f(q)`` lie in [0, 1] already.  Exact powers of two keep the unscaling exact.
        """
        name = self.product_precision
        s = scale_columns(V)
        VT = round_to((V * s).T.contiguous(), name)
        if VT.device.type != "cuda":
            VT = VT.float()  # CPU: widen once (exact, see lowp_mm), not per tile
        outT = torch.zeros(V.shape[1], self.shape[0], dtype=torch.float32, device=V.device)
        for idx, (i0, i1, j0, j1) in enumerate(self._tiles):
            F = self._tile(idx)
            if F.device.type != "cuda":
                F = F.float()
            outT[:, i0:i1] += lowp_mm(VT[:, j0:j1], F.T, name)
            if i0 != j0:
                outT[:, j0:j1] += lowp_mm(VT[:, i0:i1], F, name)
        out = outT.T.to(V.dtype) / s
        if self._lowrank is not None:  # the low-rank part, unrounded: G (G^T V)
            G = self._lowrank
            out += (G @ (G.T @ V.to(G.dtype))).to(out.dtype)
        return out.contiguous()

    @torch.no_grad()
    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``(K + noise I) @ V``."""
        V2, vec = self._check_rhs(V)
        out = self._profile_matmul(V2).mul_(self.outputscale).add_(V2, alpha=self._noise_value)
        return out[:, 0] if vec else out

    __matmul__ = matmul

    def kernel_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``K @ V`` without the noise term."""
        return CrossKernelOperator.matmul(self, V)

    def kernel_diagonal(self) -> torch.Tensor:
        """Diagonal of ``K`` (``s f(0)`` for a stationary kernel), shape ``(n,)``."""
        f0 = self.kernel.profile(torch.zeros((), dtype=self.dtype, device=self.device))
        return (self.outputscale * f0).expand(self.shape[0]).clone()

    def diagonal(self) -> torch.Tensor:
        """Diagonal of ``K + noise I``."""
        return self.kernel_diagonal() + self.noise

    @torch.no_grad()
    def dense(self) -> torch.Tensor:
        """Assemble ``K + noise I`` from the upper-triangle tiles (one kernel evaluation per pair).

        :math:`O(n^2)` memory: for the Cholesky path and small problems only.
        """
        n = self.shape[0]
        K = torch.empty(n, n, dtype=self.dtype, device=self.device)
        for idx, (i0, i1, j0, j1) in enumerate(self._tiles):
            F = self._tile(idx)
            K[i0:i1, j0:j1] = F
            if i0 != j0:
                K[j0:j1, i0:i1] = F.T
        if self._lowrank is not None:
            K.addmm_(self._lowrank, self._lowrank.T)
        K.mul_(self.outputscale).diagonal().add_(self._noise_value)
        return K

    def kernel_rows(self, idx) -> torch.Tensor:
        """Rows of ``K`` (no noise)."""
        return CrossKernelOperator.rows(self, idx)

    @torch.no_grad()
    def rows(self, idx) -> torch.Tensor:
        """Rows of ``K + noise I``."""
        idx = torch.as_tensor(idx, device=self.device).reshape(-1)
        R = self.kernel_rows(idx)
        R[torch.arange(idx.numel(), device=self.device), idx] += self.noise
        return R
