"""CUDA backend: gpscale's fused kernels from ``csrc/`` (loaded by :mod:`gpscale._ext`).

This module is the operator-side adapter only: it checks devices and dtypes and picks the kernel
variant.  Compilation, caching and launches live in :mod:`gpscale._ext`, which is imported only when
this backend is used, so CPU-only installs never touch NVRTC.

Variant policy (``GPSCALE_CUDA_VARIANT`` overrides it, e.g. for benchmarks):

* float32 -> ``"tc3"``: tensor cores, 3xTF32 split for both the distance and the ``P V`` product
  (about fp32 accuracy, the default because BBMM's CG needs relative errors <= 1e-4);
* float64 -> ``"simt"``: the CUDA-core kernel in double precision (exact reference).
"""

from __future__ import annotations

import os

import torch


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


def variant_for(dtype: torch.dtype) -> str:
    """Kernel variant for ``dtype`` (see the module docstring)."""
    forced = os.environ.get("GPSCALE_CUDA_VARIANT", "").strip()
    if forced:
        return forced
    return "simt" if dtype == torch.float64 else "tc3"


def products(Xs: torch.Tensor, Zs: torch.Tensor, name: str, V: torch.Tensor, mode: str, symmetric: bool = False):
    """Profile products through the fused CUDA kernels (see ``backends.fused_products``)."""
    from .. import _ext  # noqa: PLC0415

    return _ext.kernel_matmul(Xs, Zs, V, name, mode=mode, variant=variant_for(Xs.dtype), symmetric=symmetric)
