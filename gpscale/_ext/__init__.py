"""gpscale's CUDA kernels (``csrc/``), compiled at run time with NVRTC and cached.

Nothing here is imported by ``import gpscale``: the operators import this package only when the
``"cuda"`` backend is asked for (or ``"auto"`` considers it on a CUDA device), so CPU-only installs
never touch NVRTC.  See ``docs/backends.md``.

Public functions
----------------
available(compile=False)
    ``(ok, reason)``: can the kernels run here (and, with ``compile=True``, do they compile)?
kernel_matmul(X, Z, V, kernel, mode="f", variant="tc3", symmetric=False)
    The fused profile products; see :func:`gpscale._ext.launch.kernel_matmul`.
csrc_dir(), cu_files()
    Where the sources are.
"""

from __future__ import annotations

from .launch import (
    DMAX,
    EXPERIMENTAL,
    KINDS,
    MODES,
    VARIANTS,
    entry_names,
    kernel_matmul,
)
from .sources import csrc_dir, cu_files

__all__ = ["available", "kernel_matmul", "csrc_dir", "cu_files", "entry_names", "VARIANTS", "EXPERIMENTAL", "KINDS",
           "MODES", "DMAX"]

_COMPILED: dict = {}


def available(compile: bool = False) -> tuple[bool, str]:
    """Whether gpscale's CUDA kernels can run in this process, and if not, why.

    Parameters
    ----------
    compile : bool
        Also compile (or load from the cache) every variant on the current device except the
        ``EXPERIMENTAL`` ones (compiled on first use); the result is remembered, so only the first
        call pays for it.

    Returns
    -------
    (bool, str)
        ``(True, "")`` or ``(False, reason)`` with what is missing and how to fix it.
    """
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
        return False, f"CUDA is not available ({build}); install a CUDA build of torch on a machine with a GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the kernels need compute capability >= 8.0 (tensor-core TF32), this GPU has {major}.{minor}"
    try:
        csrc_dir()
    except FileNotFoundError as exc:
        return False, str(exc)
    from .compiler import route  # noqa: PLC0415

    how, why = route()
    if how is None:
        return False, why
    if compile:
        dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index not in _COMPILED:
            try:
                from .launch import _module  # noqa: PLC0415

                for v in VARIANTS:
                    if v not in EXPERIMENTAL:
                        _module(v, dev)
                _COMPILED[dev.index] = (True, "")
            except Exception as exc:  # noqa: BLE001 - reported, not raised: "auto" falls back
                _COMPILED[dev.index] = (False, f"compiling csrc/ failed: {type(exc).__name__}: {exc}")
        return _COMPILED[dev.index]
    return True, ""
