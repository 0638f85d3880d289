"""KeOps backend: profile products as pykeops ``LazyTensor`` reductions.

KeOps (Charlier et al., "Kernel Operations on the GPU, with Autodiff, without Memory Overflows",
JMLR 2021) compiles a symbolic formula into a map-reduce kernel that streams over ``j`` and never
stores the ``n x m`` matrix.  It is what GPyTorch uses for large exact GPs; gpscale uses it as the
portable fallback between its own CUDA kernels and the blocked torch path.

The squared distance is formed in difference form, ``sum_d (x_id - z_jd)^2``, so coincident points
give ``q = 0`` exactly (no expanded-distance cancellation, exact Matérn-1/2 diagonal).

pykeops is imported on first use only; every formula is compiled once per (formula, dims, dtype,
device) and cached by KeOps on disk (the first call with a new shape costs seconds to minutes).
"""

from __future__ import annotations

import math

import torch

_STATE: dict = {}


def _import():
    """Import pykeops' torch bindings once; remember the failure reason instead of retrying."""
    if "mod" not in _STATE:
        try:
            from pykeops.torch import LazyTensor  # noqa: PLC0415 - lazy by design

            _STATE["mod"], _STATE["err"] = LazyTensor, ""
        except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
            _STATE["mod"], _STATE["err"] = None, f"{type(exc).__name__}: {exc}"
    return _STATE["mod"], _STATE["err"]


def available(device: torch.device) -> tuple[bool, str]:
    """``(True, "")`` when pykeops imports (and sees a GPU for CUDA tensors), else ``(False, why)``."""
    lazy, err = _import()
    if lazy is None:
        return False, f"pykeops is not importable ({err}); install it with `pip install pykeops`"
    if device.type == "cuda":
        import pykeops  # noqa: PLC0415

        if not getattr(pykeops.config, "gpu_available", False):
            return False, "pykeops was built without CUDA support (its CUDA libraries were not found)"
    return True, ""


def _profile(q, r, name: str):
    """``(f, f')`` as symbolic LazyTensors from ``q`` and ``r = sqrt(q)`` (``r`` unused for RBF)."""
    if name == "rbf":
        f = (-0.5 * q).exp()
        return f, -0.5 * f
    if name == "matern12":
        f = (-r).exp()
        # f' = -f / (2 r); KeOps defines rsqrt(0) = 0, which is the limit gpscale uses at r = 0
        # (every use multiplies f' by a squared difference <= q, see gpscale.kernels.Matern).
        return f, -0.5 * f * q.rsqrt()
    c = math.sqrt(3.0) if name == "matern32" else math.sqrt(5.0)
    a = c * r
    e = (-a).exp()
    if name == "matern32":
        return (1 + a) * e, -1.5 * e
    return (1 + a + (5.0 / 3.0) * q) * e, -(5.0 / 6.0) * (1 + a) * e


def products(Xs: torch.Tensor, Zs: torch.Tensor, name: str, V: torch.Tensor, mode: str):
    """Profile products (see :func:`gpscale.operators.backends.fused_products`) through KeOps.

    Parameters
    ----------
    Xs : (n, d) tensor, Zs : (m, d) tensor
        Centred inputs divided by the lengthscales.
    name : {"rbf", "matern12", "matern32", "matern52"}
    V : (m, t) tensor, contiguous
    mode : {"f", "f_dq", "d"}

    Notes
    -----
    ``f_dq`` concatenates both products into one reduction (one pass over the pairs, one ``exp`` per
    pair).  Time :math:`O(n m (d + t))`.
    """
    lazy, err = _import()
    if lazy is None:
        raise RuntimeError(f"the keops backend needs pykeops ({err})")
    x_i = lazy(Xs.contiguous()[:, None, :])
    z_j = lazy(Zs.contiguous()[None, :, :])
    v_j = lazy(V[None, :, :])
    q = x_i.sqdist(z_j)
    r = q.sqrt() if name != "rbf" else None
    f, fp = _profile(q, r, name)
    if mode == "f":
        return (f * v_j).sum(dim=1)
    if mode == "d":
        return (fp * v_j).sum(dim=1)
    t = V.shape[1]
    both = (f * v_j).concat(fp * q * v_j).sum(dim=1)
    return both[:, :t].contiguous(), both[:, t:].contiguous()
