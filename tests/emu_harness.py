"""The CPU emulation of gpscale's CUDA kernels (``tests/emu/``), shared by the emulated test files.

``build_emulation`` compiles a harness (``tcb_harness.cpp``, ``tc_harness.cpp``) with the kernels' own
source and ``cuda_emu.h``; ``run_tcb`` runs one ``tcb`` / ``tcbh`` entry point on CPU tensors the way
``launch.kernel_matmul`` would; ``emulate_launches`` replaces ``launch.kernel_matmul``'s launch itself, so the
launcher's own code (packing, column splits, the triangle's shared memory) runs around the emulation.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpscale._ext import launch
from gpscale._ext.launch import entry_name, ksteps
from gpscale._ext.tcb_pack import pack_v, pack_z

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "emu"


def build_emulation(tmp_path_factory, harness: str, *defines: str):
    """``tests/emu/<harness>.cpp`` compiled with the host C++ compiler and ``-D`` ``defines``, loaded with ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    lib = tmp_path_factory.mktemp("emu") / f"{harness}.so"
    # -fno-gnu-unique: each build keeps its own template statics (the kernels' __shared__ tiles, whose
    # size differs between builds); unique symbols would make every loaded build share the first one's.
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-fno-gnu-unique", "-w", "-include",
                    str(EMU / "cuda_emu.h"),
                    "-DGPS_HOST_EMULATION", *defines, f"-I{ROOT / 'csrc'}", f"-I{EMU}",
                    str(EMU / f"{harness}.cpp"), "-o",
                    str(lib)], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


#: the emulation's two modes (cuda_emu.h): copies land at their wait, warps in step / copies land at
#: issue, warp 0 as far ahead as the barriers allow
SCHEDULES = {"late": (0, 0), "early-greedy": (1, 1)}


def run_tcb(so, X, Z, V, kernel, mode, symmetric=False, schedule="late", variant="tcb", layout=None, splits=1,
            zeros=False):
    """``launch.kernel_matmul(..., variant="tcb" | "tcbh")`` with the launch replaced by the emulation.

    ``layout``: the build's TCB_DF16 (how Z is packed); by default 1 for ``tcbh``, 0 for ``tcb``.
    ``splits``: column splits (grid z); their partial outputs are summed as the launcher does.
    ``zeros``: outputs start at zero, as a ``TCB_TRI`` build's symmetric launch needs (it adds into them).
    """
    X, Z, V = (A.float().contiguous() for A in (X, Z, V))
    n, d = X.shape
    m, t = V.shape
    Zf, Zn = pack_z(Z, ksteps(d), f16=int(variant == "tcbh") if layout is None else layout)
    Vf = pack_v(V)
    # NaN-filled: an output a block fails to write shows (the launcher's partials are torch.empty)
    O0, O1 = (torch.full((splits, n, t), 0.0 if zeros else float("nan")) for _ in range(2))
    err = ctypes.create_string_buffer(512)
    ptr = [ctypes.c_void_p(a.data_ptr()) for a in (X, Zf, Zn, Vf, O0, O1)]
    rc = so.gps_emu_tcb(entry_name(variant, kernel, mode, torch.float32, d).encode(), *ptr, n, m, d, t,
                        int(symmetric), splits, *SCHEDULES[schedule], err, len(err))
    assert rc == 0, f"emulation failed ({rc}): {err.value.decode()}"
    O0, O1 = O0.sum(0), O1.sum(0)
    return (O0, O1) if mode == "f_dq" else O0


class Launches(list):
    """The grids of the emulated launches, and their dynamic shared memory in ``smem``."""

    def __init__(self):
        super().__init__()
        self.smem = []


def emulate_launches(so, monkeypatch):
    """Replace ``launch.kernel_matmul``'s launch by the emulation ``so`` (a tcb harness build) for this test.

    The device checks, the module loader, the device guard and the SM count (4) are replaced; everything
    else in the launcher runs as on a GPU.  Returns the :class:`Launches` record, filled as launches happen.
    """
    launches = Launches()

    def launcher(name):
        def call(grid, block, args, shared_mem=0):
            launches.append(grid)
            launches.smem.append(shared_mem)
            X, Zf, Zn, Vf, P0, P1, n, m, d, t, sym = args
            ptr = [ctypes.c_void_p(a.data_ptr()) for a in (X, Zf, Zn, Vf, P0, P1)]
            err = ctypes.create_string_buffer(512)
            assert so.gps_emu_tcb(name.encode(), *ptr, n, m, d, t, sym, grid[2], 1, 1, err, len(err)) == 0, err.value
        call.sets_shared_memory = True  # as compiler.py's cupy launcher: no opt-in call needed
        return call

    class Module(dict):
        def __missing__(self, name):
            return launcher(name)

    monkeypatch.setattr(launch, "_check", lambda *a: None)
    monkeypatch.setattr(launch, "_module", lambda variant, device: Module())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=4))
    return launches
