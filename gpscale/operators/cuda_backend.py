"""CUDA backend: gpscale's fused kernels from ``csrc/`` (loaded by :mod:`gpscale._ext`).

This module is the operator-side adapter only: it checks devices and dtypes and picks the kernel
variant.  Compilation, caching and launches live in :mod:`gpscale._ext`, which is imported only when
this backend is used, so CPU-only installs never touch NVRTC.

Variant policy (``GPSCALE_CUDA_VARIANT`` overrides it, e.g. for benchmarks):

* float32 -> ``"tc3"``: tensor cores, 3xTF32 split for both the distance and the ``P V`` product
  (about fp32 accuracy, the default because BBMM's CG needs relative errors <= 1e-4), unless the
  expansion ``q = |x|^2 + |z|^2 - 2 x.z`` would cost more than :data:`EXPANSION_TOL` on some kernel
  entry (:func:`expansion_error`): then ``"simt"``, whose difference-form distances are exact;
* float64 -> ``"simt"``: the CUDA-core kernel in double precision (exact reference).

Why the guard: the tensor-core kernels compute ``q`` from norms and a dot product, which leaves an
absolute error ``delta ~ 8 u (|x|^2 + |z|^2)`` (``u = 2^-24``) however exactly the dot product is
formed, so an entry moves by ``|f(q + delta) - f(q)|``.  That is ``~ delta / 2`` for RBF -- harmless
at ordinary lengthscales -- but ``~ sqrt(delta)`` near coincident points for Matérn-1/2 (and for the
``f'`` outputs of Matérn-1/2 and 3/2, which are singular or steep at ``q = 0``).  Measured on the first
lent H100 (2026-11-24, ``tests/test_cuda_kernels.py``, d = 1, points spread over 60 lengthscales):
``tc3`` Matérn-1/2 products were off by 2e-3 relative, its ``f'`` products by 100%.
"""

from __future__ import annotations

import math
import os

import torch

#: Largest change of one kernel entry (relative to ``f(0) = 1``) the expansion may cause before
#: the float32 path falls back from ``"tc3"`` to ``"simt"``.
EXPANSION_TOL = 1e-4
#: ``delta = EXPANSION_UNITS * 2^-24 * (max|x|^2 + max|z|^2)``: two rounded norms, the 3xTF32 dot
#: product (about float32 accuracy) and two additions, each worth about one unit roundoff of the
#: largest term, with a factor 2 to spare.  The GPU tests check the kernels against this envelope.
EXPANSION_UNITS = 8.0
#: Grid of q on which the profile change is maximised: 0, then log-spaced to where every profile is
#: below float32's resolution of 1.
_Q_GRID = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-14, 3.5, 2000, dtype=torch.float64)])


def expansion_delta(r2: float) -> float:
    """Absolute error bound of the expanded squared distance for inputs with ``max |x|^2 + max |z|^2 = r2``."""
    return EXPANSION_UNITS * 2.0 ** -24 * float(r2)


def _profile_outputs(kernel, q: torch.Tensor, mode: str) -> list[torch.Tensor]:
    f, fp = kernel.profile_and_derivative(q)
    return {"f": [f], "f_dq": [f, fp * q], "d": [fp]}[mode]


def expansion_error(kernel, mode: str, r2: float) -> float:
    """Largest change of a fused product's profile entries when ``q`` is off by :func:`expansion_delta`.

    Parameters
    ----------
    kernel : gpscale.kernels.StationaryKernel
        Only its profile ``f`` (and ``f'``) is used.
    mode : {"f", "f_dq", "d"}
        Which profile outputs the product forms: ``f``; ``f`` and ``f' q``; ``f'``.
    r2 : float
        ``max |x|^2 + max |z|^2`` of the centred, lengthscale-divided inputs.

    Returns
    -------
    float
        ``max_q max_out |g(q + delta) - g(q)|`` over a grid of ``q`` (``inf`` for outputs singular at
        ``q = 0``, such as Matérn-1/2's ``f'``).  Time: a few thousand profile evaluations.
    """
    delta = expansion_delta(r2)
    q = _Q_GRID
    worst = 0.0
    for lo, hi in zip(_profile_outputs(kernel, q, mode), _profile_outputs(kernel, q + delta, mode)):
        # Matérn-1/2's f' is defined as 0 at q = 0 (it only ever meets a vanishing factor), but the
        # kernel sees the expanded q > 0 there: its jump is part of the error.
        err = (hi - lo).abs().max().item()
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


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


def variant_for(dtype: torch.dtype, kernel=None, mode: str = "f", r2: float = 0.0) -> str:
    """Kernel variant for ``dtype`` (see the module docstring).

    With ``kernel`` given, float32 products whose :func:`expansion_error` exceeds
    :data:`EXPANSION_TOL` run on ``"simt"`` instead of ``"tc3"``.
    """
    forced = os.environ.get("GPSCALE_CUDA_VARIANT", "").strip()
    if forced:
        return forced
    if dtype == torch.float64:
        return "simt"
    if kernel is not None and expansion_error(kernel, mode, r2) > EXPANSION_TOL:
        return "simt"
    return "tc3"


def _max_sq_norms(op) -> float:
    """``max |x|^2 + max |z|^2`` of the operator's scaled inputs, computed once per operator."""
    r2 = getattr(op, "_cuda_r2", None)
    if r2 is None:
        r2 = sum(float(T.pow(2).sum(1).max()) if T.shape[0] else 0.0 for T in (op._Xs, op._Zs))
        op._cuda_r2 = r2  # one host sync per operator, not per CG step
    return r2


def products(op, V: torch.Tensor, mode: str):
    """Profile products of operator ``op`` through the fused CUDA kernels (see ``backends.fused_products``)."""
    from .. import _ext  # noqa: PLC0415

    variant = variant_for(op._Xs.dtype, op.kernel, mode, _max_sq_norms(op))
    op.cuda_variant = variant  # reported by the operator (and so in the solver statistics)
    return _ext.kernel_matmul(op._Xs, op._Zs, V, op.kernel.name, mode=mode, variant=variant,
                              symmetric=op._symmetric)
