"""Run-time compilation of ``csrc/`` with NVRTC, cached on disk, no nvcc needed.

Three routes, tried in order:

1. **gpscale's own NVRTC binding** (:mod:`gpscale._ext.nvrtc`, ctypes on libnvrtc from torch's CUDA
   wheels, ``nvidia-cuda-nvrtc`` or a toolkit): compiles to a cubin, loaded with torch's module loader
   (``torch.cuda._utils._cuda_load_module``).  Needs no CUDA headers: the sources have none.
2. **torch's NVRTC helper** (``torch.cuda._utils._nvrtc_compile``, behind ``torch.cuda._compile_kernel``);
   private and it wants ``CUDA_HOME`` for include paths, hence second.
3. **cupy** (``cupy.RawModule``), when installed.

The compiled cubin of each (source hash, architecture, options, route, CUDA and NVRTC versions) is
stored under ``$GPSCALE_CACHE_DIR`` (default ``~/.cache/gpscale/cuda``), so each kernel family is
compiled once per machine; later processes only load it (milliseconds).  A cached cubin the driver
refuses (a truncated file, another driver) is compiled again, not raised.  :func:`compile_to_cache`
fills such a directory without a GPU (``benchmarks/prebuild_cubins.py``: a lent GPU's short lease
then loads its kernels instead of compiling them).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .sources import read_source, source_hash

#: NVRTC options common to every family (no fast-math: the kernels pick their approximations).
OPTIONS = ("-std=c++17",)


def cache_dir() -> Path:
    """Directory of the compiled cubins (created on demand)."""
    d = Path(os.environ.get("GPSCALE_CACHE_DIR", Path.home() / ".cache" / "gpscale" / "cuda"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def route() -> tuple[str | None, str]:
    """``("nvrtc" | "torch" | "cupy", "")`` for the first usable compile route, else ``(None, why)``."""
    reasons = []
    try:
        from torch.cuda import _utils as cu  # noqa: PLC0415

        loader = hasattr(cu, "_cuda_load_module")
    except Exception:  # noqa: BLE001
        cu, loader = None, False
    from . import nvrtc  # noqa: PLC0415

    if loader and nvrtc.library() is not None:
        return "nvrtc", ""
    reasons.append("libnvrtc not found" if loader else "torch has no CUDA module loader (torch >= 2.8 has one)")
    if loader and hasattr(cu, "_nvrtc_compile"):
        try:
            (getattr(cu, "_get_gpu_rtc_library", None) or cu._get_nvrtc_library)()
            return "torch", ""
        except Exception as exc:  # noqa: BLE001 - any failure means this route is unusable
            reasons.append(f"torch NVRTC: {type(exc).__name__}: {exc}")
    try:
        import cupy  # noqa: F401, PLC0415

        return "cupy", ""
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"cupy: {type(exc).__name__}: {exc}")
    return None, "; ".join(reasons) + " -- install a CUDA build of torch (>= 2.8), nvidia-cuda-nvrtc, or cupy"


def _compile(how: str, text: str, first: str, arch: str, opts: tuple = OPTIONS) -> bytes:
    if how == "nvrtc":
        from .nvrtc import compile_cubin  # noqa: PLC0415

        return compile_cubin(text, arch, opts, first + ".cu")
    from torch.cuda._utils import _nvrtc_compile  # noqa: PLC0415

    cubin, _ = _nvrtc_compile(text, first, arch, None, list(opts))
    return cubin


def cubin_path(filename: str, text: str, arch: str, how: str, opts: tuple, cuda: str | None,
               directory: Path | None = None) -> Path:
    """Where the cubin of ``text`` (csrc/``filename``) built with ``opts`` for ``sm_<arch>`` is cached.

    The key holds everything that changes the binary or whether the driver takes it: the source (local
    includes inlined), architecture, options, compile route, torch's CUDA version and, on the NVRTC
    route, NVRTC's own (a toolkit's libnvrtc may differ from torch's CUDA).
    """
    extra = (arch, how, *opts, str(cuda))
    if how == "nvrtc":
        from .nvrtc import version  # noqa: PLC0415

        extra += ("nvrtc", str(version()))
    return (directory or cache_dir()) / f"{Path(filename).stem}-sm{arch}-{source_hash(text, *extra)}.cubin"


def _store(path: Path, cubin: bytes) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(cubin)
    tmp.replace(path)  # atomic: concurrent processes never read half a file


def cached_cubin(name: str, text: str, arch: str, opts: tuple, cuda: str, directory: Path | None = None) -> Path:
    """The cubin of source ``text`` (named ``name``) compiled by NVRTC with ``opts`` for ``sm_<arch>``: its
    path in the cache, compiled there first if missing (no GPU needed).

    ``opts`` are the full options (:data:`OPTIONS` included); ``cuda`` is the ``torch.version.cuda`` of the
    machine that will load it (part of the key).  For texts that are not a csrc/ file as it stands
    (``benchmarks/tune_tcb.py``'s trimmed builds) and for :func:`compile_to_cache`.
    """
    path = cubin_path(name, text, arch, "nvrtc", opts, cuda, directory)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _store(path, _compile("nvrtc", text, Path(name).stem, arch, opts))
    return path


def compile_to_cache(filename: str, options: tuple, arch: str, cuda: str, directory: Path | None = None) -> Path:
    """Compile csrc/``filename`` with extra ``options`` into the cache, as :func:`load_module` will look it
    up on an ``sm_<arch>`` GPU under torch CUDA ``cuda``; returns the cubin's path (an existing one is
    kept).  No GPU needed: ``benchmarks/prebuild_cubins.py``."""
    return cached_cubin(filename, read_source(filename), arch, (*OPTIONS, *options), cuda, directory)


def load_module(filename: str, entries: list[str], device: torch.device, options: tuple = ()) -> dict:
    """Compile (or load from the disk cache) ``csrc/<filename>``; return ``{entry: launcher}``.

    A launcher is called as ``fn(grid, block, args)`` with ``args`` a list of CUDA tensors and ints.
    ``options`` are extra compiler options (``-D`` definitions of a build, see ``launch.DEFINES``).
    """
    how, why = route()
    if how is None:
        raise RuntimeError(f"cannot compile gpscale's CUDA kernels: {why}")
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    text = read_source(filename)
    opts = (*OPTIONS, *options)
    with torch.cuda.device(device):
        if how == "cupy":
            return _load_cupy(text, entries, opts)
        from torch.cuda._utils import _cuda_load_module  # noqa: PLC0415

        path = cubin_path(filename, text, arch, how, opts, torch.version.cuda)
        if path.is_file():
            try:
                return _cuda_load_module(path.read_bytes(), entries)
            except Exception as exc:  # noqa: BLE001 - any refusal: the compile below replaces the file
                warnings.warn(f"gpscale: the cached cubin {path} did not load ({type(exc).__name__}: {exc}); "
                              "compiling it again", RuntimeWarning, stacklevel=2)
        cubin = _compile(how, text, entries[0], arch, opts)
        _store(path, cubin)
        return _cuda_load_module(cubin, entries)


#: Shared memory (static + dynamic, bytes) a block may take before its kernel opts in to more.
SMEM_WITHOUT_OPT_IN = 48 * 1024


def allow_shared_memory(fn, nbytes: int) -> None:
    """Let launches of ``fn`` (a :func:`load_module` launcher) take ``nbytes`` of dynamic shared memory.

    A block's static and dynamic shared memory together may exceed 48 KB only after the kernel opts in
    (``cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)``, once per function; the attribute defaults to
    48 KB less the static part).  The static part is the build's, so any dynamic request opts in to
    ``max(nbytes, 48 KB)``: a ``TCB_TRI`` build's rows of ``V`` and partials beside its 17 KB of static
    tiles pass 48 KB in all, however small the dynamic part.  torch's loaded kernels opt in through
    ``set_shared_memory_config`` (which only records values under 48 KB, hence the floor), the cupy
    launcher per call.
    """
    want = max(nbytes, SMEM_WITHOUT_OPT_IN)
    if nbytes <= 0 or getattr(fn, "_max_shared_mem_bytes", 0) >= want:
        return
    if hasattr(fn, "set_shared_memory_config"):
        fn.set_shared_memory_config(want)
    elif not getattr(fn, "sets_shared_memory", False) and nbytes >= SMEM_WITHOUT_OPT_IN:
        raise RuntimeError(f"this torch ({torch.__version__}) cannot give a loaded kernel more than 48 KB of shared "
                           f"memory ({nbytes} bytes asked); use a build without TCB_TRI or a newer torch")


def _load_cupy(text: str, entries: list[str], opts: tuple = OPTIONS) -> dict:
    """cupy route: RawModule caches its own binaries (~/.cupy/kernel_cache)."""
    import cupy  # noqa: PLC0415

    mod = cupy.RawModule(code=text, options=opts)

    def launcher(fn):
        def call(grid, block, args, shared_mem=0):
            conv = [cupy.asarray(a) if isinstance(a, torch.Tensor) else cupy.int32(a) for a in args]
            if shared_mem > 0:  # static + dynamic may pass 48 KB (allow_shared_memory)
                fn.max_dynamic_shared_size_bytes = max(shared_mem, SMEM_WITHOUT_OPT_IN)
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            with stream:
                fn(grid, block, tuple(conv), shared_mem=shared_mem)
        call.sets_shared_memory = True
        return call

    return {e: launcher(mod.get_function(e)) for e in entries}
