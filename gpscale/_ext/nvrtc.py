"""A minimal ctypes binding of NVRTC: header-free CUDA source -> cubin, no GPU needed.

Why our own: torch's helper (``torch.cuda._utils._nvrtc_compile``) is private and insists on a CUDA
toolkit include directory (it raises without ``CUDA_HOME``), yet gpscale's sources need no headers.
NVRTC compiles without a GPU, so CI can check the exact run-time compile path on a CPU machine
that has the library (``pip install nvidia-cuda-nvrtc``).

The NVRTC C API used here (``nvrtcCreateProgram``, ``nvrtcCompileProgram``, ``nvrtcGetCUBIN``, ...)
is documented in NVIDIA's "NVRTC User Guide".
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

_LIB: list = []


def _candidates() -> list[str]:
    """Places a libnvrtc may live: pip wheels (nvidia-cuda-nvrtc), the toolkit, then the loader path."""
    out = []
    env = os.environ.get("GPSCALE_NVRTC")
    if env:
        out.append(env)
    for base in map(Path, sys.path):
        for sub in ("nvidia/cuda_nvrtc/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"):
            out += sorted(glob.glob(str(base / sub / "libnvrtc.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            out += sorted(glob.glob(str(Path(home) / "lib64" / "libnvrtc.so*")), reverse=True)
    if _torch_cuda_major():
        out.append(f"libnvrtc.so.{_torch_cuda_major()}")
    out += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    out = [c for c in out if "builtins" not in c and "alt" not in Path(c).name]
    # Prefer the NVRTC of torch's own CUDA major version: its cubins then need no newer driver.
    want = f".so.{_torch_cuda_major()}" if _torch_cuda_major() else None
    return sorted(out, key=lambda c: 0 if want and want in c else 1)


def _torch_cuda_major() -> str | None:
    try:
        import torch  # noqa: PLC0415

        return torch.version.cuda.split(".")[0] if torch.version.cuda else None
    except Exception:  # noqa: BLE001 - torch is optional for this lookup
        return None


def library():
    """The loaded libnvrtc (``ctypes.CDLL``), or ``None`` when none can be loaded."""
    if not _LIB:
        lib = None
        for cand in _candidates():
            try:
                # NVRTC dlopens libnvrtc-builtins by soname at compile time; wheels are not on the
                # loader path, so load the neighbouring builtins first (globally) when there is one.
                for b in sorted(glob.glob(str(Path(cand).parent / "libnvrtc-builtins.so*"))) if "/" in cand else []:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                lib = ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
                lib.nvrtcVersion  # noqa: B018 - probe a symbol: a stray file is not NVRTC
                break
            except (OSError, AttributeError):
                lib = None
        _LIB.append(lib)
    return _LIB[0]


def version() -> tuple[int, int] | None:
    lib = library()
    if lib is None:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_cubin(text: str, arch: str, options=(), name: str = "gpscale.cu") -> bytes:
    """Compile ``text`` for ``sm_<arch>`` and return the cubin; ``RuntimeError`` with the log on failure."""
    lib = library()
    if lib is None:
        raise RuntimeError("libnvrtc not found: install a CUDA build of torch, `pip install nvidia-cuda-nvrtc`, "
                           "or set GPSCALE_NVRTC to the library's path")
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0, None, None))
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), *(o.encode() for o in options)]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if res != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed to compile {name} for sm_{arch}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, buf))
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check(lib, code: int) -> None:
    if code != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error {code}: {lib.nvrtcGetErrorString(code).decode()}")
