"""One dispatch for the kernel-product backends: ``"auto" | "cuda" | "keops" | "torch"``.

Every backend computes the same *profile products* of the centred, lengthscale-scaled inputs
``Xs`` (n x d) and ``Zs`` (m x d) against a right-hand side ``V`` (m x t), without the outputscale:

============  ==========================================================================
mode          outputs
============  ==========================================================================
``"f"``       ``F @ V`` with ``F_ij = f(q_ij)``
``"f_dq"``    ``(F @ V, (F' o Q) @ V)``: the product and the isotropic-lengthscale
              derivative product in one pass (``F'_ij = f'(q_ij)``, ``o`` elementwise)
``"d"``       ``F' @ V`` (the ARD derivative expands ``Delta^2`` around it, see
              :mod:`gpscale.operators.fused_derivatives`)
============  ==========================================================================

``"torch"`` is the blocked pure-torch path of :mod:`gpscale.operators.kernel_operator` (CPU and
CUDA, tile cache, any dtype).  ``"keops"`` streams the product through a pykeops ``LazyTensor``
reduction (CPU or CUDA, never stores a tile).  ``"cuda"`` runs gpscale's own fused kernels from
``csrc/`` (FlashAttention-style tiles, tensor cores; see :mod:`gpscale._ext`).

Backends are imported lazily: a CPU-only install never imports pykeops or compiles CUDA code unless
a backend that needs it is asked for.

A ``backend=`` value is one of :data:`BACKENDS`, ``"cuda:<variant>"`` (one of :data:`CUDA_VARIANTS`), or
a :class:`CudaBackend` carrying the CUDA backend's options: every entry point (the operators,
:func:`gpscale.likelihood.mll_estimate`, :class:`gpscale.ExactGP`, the GPyTorch backend's
``product_backend``) takes the same value and hands it down unchanged, so there is no process-wide
setting to patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_splits
from . import autotune

#: Accepted values of the ``backend=`` argument of the operators.
BACKENDS = ("auto", "cuda", "keops", "torch")
#: Products each fused backend implements.
MODES = ("f", "f_dq", "d")
#: Fused backends ``auto`` considers on CUDA, in order of preference: the candidates of the measured
#: choice (:mod:`gpscale.operators.autotune`; a tie goes to the earlier one) and the static order
#: where no tuning runs (multi-process runs).  H100, 2026-11-24 (d = 8, t = 16,
#: benchmarks/results/kernel_matmul_h100_{100k,1m}.json): gpscale's ``tcb`` takes 0.0076 / 0.0108 s per
#: RBF / Matérn-5/2 product at n = m = 100k against KeOps' 0.0211 / 0.0228 s, and 0.59 / 0.85 s against
#: 1.98 / 2.11 s at 1M (the earlier ``tc3`` lost to KeOps by 1.2-1.4x, hence the order before).
AUTO_ORDER_CUDA = ("cuda", "keops")
#: Kernels the fused backends know (``StationaryKernel.name``); others always run on torch.
FUSED_KERNELS = ("rbf", "matern12", "matern32", "matern52")
#: Below this many kernel entries a fused backend's launch/compile overhead is never repaid.
MIN_FUSED_ENTRIES = 1 << 22


#: Kernel variants of the ``cuda`` backend (``gpscale._ext.launch.VARIANTS``, kept here so that checking
#: a ``backend=`` value never imports :mod:`gpscale._ext`; a test keeps the two equal).
CUDA_VARIANTS = ("simt", "tc", "tc3", "tcb", "tcbh")


@dataclass(frozen=True)
class CudaBackend:
    """The ``cuda`` backend with explicit options; pass it wherever ``backend="cuda"`` is accepted.

    Parameters
    ----------
    variant : {None, "simt", "tc", "tc3", "tcb", "tcbh"}
        The kernel variant of every product (docs/backends.md).  ``None`` (default) lets
        :func:`gpscale.operators.cuda_backend.variant_for` choose per product: ``"tcbh"`` for float32
        unless the expanded distance would be too coarse for the kernel and inputs, then ``"simt"``;
        ``"simt"`` for float64.  A fixed variant skips that guard (benchmarks, comparisons).
    splits : int >= 1 or "auto", default 1
        Column splits of the ``tcb`` / ``tcbh`` launches (:mod:`gpscale._ext.splits`): ``S`` blocks share
        a row block's columns and their partial outputs are added.  ``"auto"`` splits a grid whose last
        wave would leave most SMs idle; it stays opt-in until a GPU run has timed it.  Ignored by the
        other variants.

    Examples
    --------
    >>> op = KernelOperator(X, RBF(), noise=0.1, backend=CudaBackend(splits="auto"))
    >>> mll_estimate(X, y, RBF(), noise=0.1, backend=CudaBackend(variant="simt"))  # the exact reference
    """

    variant: str | None = None
    splits: int | str = 1

    def __post_init__(self):
        if self.variant is not None and self.variant not in CUDA_VARIANTS:
            raise ValueError(f"CudaBackend variant must be None (chosen per product) or one of {CUDA_VARIANTS}, "
                             f"got {self.variant!r}")
        check_splits(self.splits, "CudaBackend splits")

    def __str__(self) -> str:
        return "cuda" if self.variant is None else f"cuda:{self.variant}"


def parse_backend(backend) -> tuple[str, CudaBackend | None]:
    """``(name, cuda options)`` of a ``backend=`` value; the options are ``None`` unless ``name == "cuda"``.

    ``"cuda"`` gives ``CudaBackend()``, ``"cuda:tcbh"`` gives ``CudaBackend(variant="tcbh")`` and a
    :class:`CudaBackend` is returned as it is.  Anything else raises ``ValueError`` naming the choices.
    """
    if isinstance(backend, CudaBackend):
        return "cuda", backend
    if isinstance(backend, str):
        name, colon, variant = backend.partition(":")
        if not colon and name in BACKENDS:
            return name, (CudaBackend() if name == "cuda" else None)
        if name == "cuda" and variant in CUDA_VARIANTS:
            return "cuda", CudaBackend(variant=variant)
    raise ValueError(f"backend must be one of {BACKENDS}, 'cuda:<variant>' with a variant in {CUDA_VARIANTS}, or "
                     f"a gpscale.operators.CudaBackend(...), got {backend!r}; 'auto' picks the fastest available "
                     "for the device and size")


def check_backend_name(backend):
    """Validate a ``backend=`` value (:func:`parse_backend`; raises ``ValueError`` naming the choices)."""
    parse_backend(backend)
    return backend


def backend_available(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                      kernel_name: str = "rbf") -> tuple[bool, str]:
    """Whether ``backend`` can run products for this device, dtype and kernel, and if not, why.

    Returns
    -------
    (bool, str)
        ``(True, "")`` or ``(False, reason)`` where ``reason`` says what is missing and how to fix it.
    """
    backend = parse_backend(backend)[0]
    if backend in ("torch", "auto"):
        return True, ""
    if kernel_name not in FUSED_KERNELS:
        return False, (f"the {backend} backend implements only {FUSED_KERNELS}, not kernel {kernel_name!r}; "
                       "use backend='torch'")
    if backend == "keops":
        from . import keops_backend

        return keops_backend.available(device)
    from . import cuda_backend

    return cuda_backend.available(device, dtype)


def _fits_cache(op) -> bool:
    """Whether the torch path keeps the whole kernel cached (then it beats recomputation)."""
    t = op.tiling
    el = torch.empty((), dtype=op.dtype).element_size()
    n, m = op.shape
    if t.tile:  # symmetric: the upper-triangle tiles (KernelOperator.kernel_bytes counts the same)
        return t.upper_entries(n) * el <= t.cache_bytes
    return t.cached_rows >= n


def select_backend(op, requested) -> str:
    """Resolve ``requested`` (a ``backend=`` value) for a built operator ``op`` (its tiling already planned).

    Returns the backend's name; a :class:`CudaBackend`'s options are kept in ``op.cuda_options``
    (``None`` for the other values: the CUDA products then use ``CudaBackend()``).

    ``auto``: on CPU always ``torch`` -- its tile cache makes every CG product after the first a
    plain GEMM, whereas KeOps recomputes all pairs and compiles each new formula for seconds (one
    uncached product at n = m = 3000, d = 8, t = 16 on the 2-core CI machine: torch 0.15 s / 0.25 s,
    KeOps 0.18 s / 0.13 s for RBF / Matérn-5/2: no clear winner without the cache).  On CUDA:
    ``torch`` while the whole kernel fits the cache or the problem is tiny, otherwise the fastest
    available of :data:`AUTO_ORDER_CUDA`, timed on a probe product of this operator the first time
    its problem class appears in the process (:func:`gpscale.operators.autotune.choose`; the
    measurement is in ``op.backend_tuning``), else ``torch``.  Under ``torch.distributed`` with
    several processes the first available one is taken untimed, so every rank agrees.  An explicit
    backend that cannot run raises ``RuntimeError`` with the reason.
    """
    requested, op.cuda_options = parse_backend(requested)
    name, device, dtype = op.kernel.name, op.device, op.dtype
    if requested == "torch":
        return "torch"
    variant = op.cuda_options.variant if op.cuda_options else None
    if dtype == torch.float64 and variant not in (None, "simt"):  # refused here, not at the first product
        raise ValueError(f"the cuda variant {variant!r} computes in float32, but X is float64; use "
                         "backend='cuda:simt' (or 'cuda', which picks it), or pass float32 inputs")
    if requested != "auto":
        ok, why = backend_available(requested, device, dtype, name)
        if not ok:
            raise RuntimeError(f"backend={requested!r} cannot run here: {why}")
        return requested
    if device.type != "cuda" or name not in FUSED_KERNELS:
        return "torch"
    n, m = op.shape
    if n * m < MIN_FUSED_ENTRIES or _fits_cache(op):
        return "torch"
    cands = [c for c in AUTO_ORDER_CUDA if backend_available(c, device, dtype, name)[0]]
    if len(cands) > 1 and not _multi_process():
        tuning = autotune.choose(op, cands)
        op.backend_tuning = tuning
        if tuning.choice:  # the other products of this operator pick among the same candidates
            op.fused_candidates = tuple(c for c in cands if c not in tuning.errors)
        return tuning.choice or "torch"
    return cands[0] if cands else "torch"


def _multi_process() -> bool:
    """Whether this process is one of several ``torch.distributed`` ranks."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def backend_label(op) -> str:
    """``op.backend``, with the CUDA kernel variant the last product used (``"cuda:tc3"``, ``"cuda:simt"``)."""
    variant = getattr(op, "cuda_variant", None)
    return f"{op.backend}:{variant}" if op.backend == "cuda" and variant else op.backend


def fused_products(op, V: torch.Tensor, mode: str = "f"):
    """Profile products of ``op`` (no outputscale) on its fused backend.

    Parameters
    ----------
    op : CrossKernelOperator
        With ``op.backend`` in ``("cuda", "keops")``.
    V : (m, t) tensor
    mode : {"f", "f_dq", "d"}

    Returns
    -------
    tensor or tuple of two tensors, each ``(n, t)``.

    Notes
    -----
    Time :math:`O(n m (d + t))`, memory :math:`O((n + m)(d + t))`: no kernel tile is ever stored.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    V = V.contiguous()
    backend = _product_backend(op, mode, V.shape[1])
    if backend == "keops":
        from . import keops_backend

        return keops_backend.products(op._Xs, op._Zs, op.kernel.name, V, mode)
    if backend == "cuda":
        from . import cuda_backend

        return cuda_backend.products(op, V, mode)
    raise ValueError(f"fused_products needs a fused backend, but the operator uses {backend!r}")


def _product_backend(op, mode: str, rhs: int) -> str:
    """The backend of one product: ``op.backend``, or for an ``auto`` operator whose backend was
    timed, the candidate timed fastest for this mode and chunk count (:func:`autotune.choose`)."""
    cands = getattr(op, "fused_candidates", ())
    if len(cands) < 2 or (mode == "f" and autotune.chunks(rhs) == 1):
        return op.backend
    return autotune.choose(op, cands, mode=mode, rhs=rhs).choice or op.backend
