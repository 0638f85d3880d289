"""CUDA backend: gpscale's fused kernels from ``csrc/`` (loaded by :mod:`gpscale._ext`).

This module is the operator-side adapter only: it checks devices and dtypes and picks the kernel
variant.  Compilation, caching and launches live in :mod:`gpscale._ext`, which is imported only when
this backend is used, so CPU-only installs never touch NVRTC.

Variant policy (a fixed ``CudaBackend(variant=...)`` or ``backend="cuda:<variant>"`` overrides it, e.g. for
benchmarks):

* float32 -> :data:`FLOAT32_VARIANT` (``"tcbh"``): tensor cores, f16 hi/lo split for the distance and
  bf16x3 for the ``P V`` product (relative error ~1.5e-5 measured at 1M; BBMM's CG needs <= 1e-4), unless the
  expansion ``q = |x|^2 + |z|^2 - 2 x.z`` would cost more than :data:`EXPANSION_TOL` on some kernel
  entry (:func:`expansion_error`): then ``"simt"``, whose difference-form distances are exact;
* float64 -> ``"simt"``: the CUDA-core kernel in double precision (exact reference).

Why the guard: the tensor-core kernels compute ``q`` from norms and a dot product, which leaves an
absolute error ``delta ~ 8 u (|x|^2 + |z|^2)`` (``u = 2^-24``) however exactly the dot product is
formed, so an entry moves by ``|f(q + delta) - f(q)|`` (:mod:`gpscale.operators.expansion`).  That is ``~ delta / 2`` for RBF -- harmless
at ordinary lengthscales -- but ``~ sqrt(delta)`` near coincident points for Matérn-1/2 (and for the
``f'`` outputs of Matérn-1/2 and 3/2, which are singular or steep at ``q = 0``).  Measured on the first
lent H100 (2026-11-24, ``tests/test_cuda_kernels.py``, d = 1, points spread over 60 lengthscales):
``tc3`` Matérn-1/2 products were off by 2e-3 relative, its ``f'`` products by 100%.
"""

from __future__ import annotations

import torch

from .backends import CudaBackend
from .expansion import expansion_error, norm_bound

#: Largest change of one kernel entry (relative to ``f(0) = 1``) the expansion may cause before
#: the float32 path falls back from :data:`FLOAT32_VARIANT` to ``"simt"``.
EXPANSION_TOL = 1e-4
#: The float32 tensor-core variant.  It was ``"tcb"`` from its first H100 run (2026-11-24, all 220 GPU tests
#: against the float64 reference passed): RBF at n = m = 1M, d = 8, t = 16 in 0.57-0.59 s against
#: ``"tc3"``'s 2.25 s and KeOps' 1.98 s, relative error 1.5e-5 (benchmarks/results/kernel_matmul_h100_1m.json).
#: It obeys the same expansion guard; ``"tc3"`` (P V in 3xTF32, error ~1e-6) stays selectable as
#: ``backend="cuda:tc3"``.
#: ``"tcbh"`` (``tcb`` with f16 distance splits: two MMAs per k-step instead of three) since the third
#: lent H100: all its GPU tests passed, RBF 1M product 0.49 s against ``tcb``'s 0.57 s at the same error.
#: Its f16 range (|x| <= launch.F16_MAX) is far beyond what the expansion guard lets through.
FLOAT32_VARIANT = "tcbh"
#: The options of an operator built with ``backend="auto"`` that picked ``cuda``.  Column splits stay 1 (no
#: split) until a lent GPU has tested and timed ``"auto"``, which splits grids whose last wave would leave
#: most SMs idle (written without a GPU; checked on the CPU emulation); ``CudaBackend(splits="auto")`` asks.
DEFAULT_OPTIONS = CudaBackend()


def available(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """``(True, "")`` when gpscale's CUDA kernels can run on ``device``, else ``(False, why)``."""
    if device.type != "cuda":
        return False, (f"the cuda backend needs CUDA tensors, but the data is on {device}; move X to the GPU "
                       "(X.cuda()) or use backend='torch' / 'keops'")
    from .. import _ext  # noqa: PLC0415 - lazy: never imported on CPU-only paths

    ok, why = _ext.available()
    if not ok:
        return ok, why
    if dtype not in (torch.float32, torch.float64):
        return False, f"the cuda kernels take float32 or float64 data, got {dtype}"
    with torch.cuda.device(device):
        return _ext.available(compile=True)  # compiles once per device (cached on disk)


def variant_for(dtype: torch.dtype, kernel=None, mode: str = "f", r2: float = 0.0,
                options: CudaBackend = DEFAULT_OPTIONS) -> str:
    """Kernel variant for ``dtype`` (see the module docstring): ``options.variant`` when it names one.

    With ``kernel`` given, float32 products whose :func:`expansion_error` exceeds
    :data:`EXPANSION_TOL` run on ``"simt"`` instead of :data:`FLOAT32_VARIANT`.
    """
    if options.variant is not None:
        return options.variant
    if dtype == torch.float64:
        return "simt"
    if kernel is not None and expansion_error(kernel, mode, r2, torch.float32) > EXPANSION_TOL:
        return "simt"
    return FLOAT32_VARIANT


def _max_sq_norms(op) -> float:
    """``max |x|^2 + max |z|^2`` of the operator's scaled inputs, computed once per operator."""
    r2 = getattr(op, "_cuda_r2", None)
    if r2 is None:
        r2 = norm_bound(op._xn, op._zn)  # the operator's own squared norms, not recomputed
        op._cuda_r2 = r2  # one host sync per operator, not per CG step
    return r2


def _inputs_max_abs(op) -> float:
    """``max |x|`` over the operator's scaled inputs (``tcbh``'s f16 range check), computed once per operator."""
    big = getattr(op, "_cuda_max_abs", None)
    if big is None:
        from .. import _ext  # noqa: PLC0415

        big = op._cuda_max_abs = _ext.launch.max_abs(op._Xs, op._Zs)  # one host sync per operator
    return big


def products(op, V: torch.Tensor, mode: str):
    """Profile products of operator ``op`` through the fused CUDA kernels (see ``backends.fused_products``)."""
    from .. import _ext  # noqa: PLC0415

    # Kernel, inputs and r2 are fixed for an operator: decide once per mode, not in every CG product
    # (the guard evaluates the profile on a few thousand points).
    options = getattr(op, "cuda_options", None) or DEFAULT_OPTIONS  # None: an "auto" operator that chose cuda
    chosen = op.__dict__.setdefault("_cuda_variants", {})
    if mode not in chosen:
        chosen[mode] = variant_for(op._Xs.dtype, op.kernel, mode, _max_sq_norms(op), options)
    variant = op.cuda_variant = chosen[mode]  # reported by the operator (and in the solver statistics)
    big = _inputs_max_abs(op) if variant == "tcbh" else None  # inputs fixed for the operator: not per product
    splits = options.splits if variant in _ext.launch.TCB_FAMILY else 1
    return _ext.kernel_matmul(op._Xs, op._Zs, V, op.kernel.name, mode=mode, variant=variant,
                              symmetric=op._symmetric, inputs_max_abs=big, splits=splits)
