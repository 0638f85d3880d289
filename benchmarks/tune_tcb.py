"""Sweep the ``tcb`` kernel's compile-time options on a GPU (csrc/kmm_tcb.cu: TCB_MT, TCB_MINB, TCB_EMU).

``TCB_MT`` is the number of 16-row m-tiles a warp owns (they share every B fragment read from shared
memory: more means fewer loads per pair but more registers); ``TCB_MINB`` the blocks per SM that
``__launch_bounds__`` asks the register allocator to allow (more resident warps hide the
``mma.sync`` and ``ex2`` latencies, fewer registers per thread may spill); ``TCB_EMU`` how many of a
thread's 4 accumulator entries per fragment take their exp on the FMA pipes (``gps_ex2_poly``) rather
than the special-function unit.  Each configuration is
compiled from the k1 (d <= 8) entry points with NVRTC, timed on the issue's product (n = m = 1M,
d = 8, t = 16, uniform inputs, lengthscale 0.5 as in bench_kernel_matmul.py) and checked against a
float64 reference on a subset of rows.

Usage (GPU machine)::

    python benchmarks/tune_tcb.py --n 1000000 --out tune_tcb.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gpscale._ext import nvrtc
from gpscale._ext.compiler import OPTIONS
from gpscale._ext.sources import read_source
from gpscale._ext.tcb_pack import pack_v, pack_z

#: (TCB_MT, TCB_MINB, TCB_EMU); (2, 1, 0) is the shipped one.  The first sweep (block shapes, EMU 0:
#: (2, 3), (1, 3), (1, 4), (4, 1)) is benchmarks/results/tune_tcb_h100.json.
CONFIGS = [(2, 1, 0), (2, 1, 1), (2, 1, 2), (2, 1, 3), (2, 1, 4), (1, 4, 2)]
KERNELS = ("rbf", "matern52")


def profile64(q: torch.Tensor, kernel: str) -> torch.Tensor:
    if kernel == "rbf":
        return torch.exp(-0.5 * q)
    a = torch.sqrt(5.0 * q.clamp_min(0))
    return (1 + a + 5.0 / 3.0 * q) * torch.exp(-a)


def reference(Xs, Zs, V, kernel, rows):
    out = []
    for i in range(0, rows, 64):
        q = torch.cdist(Xs[i:i + 64].double(), Zs.double()).pow(2)
        out.append(profile64(q, kernel) @ V.double())
    return torch.cat(out)


def build(mt: int, minb: int, emu: int):
    text = read_source("kmm_tcb.cu")
    keep = [ln for ln in text.splitlines() if not ln.startswith(("GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k2",
                                                                "GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k3",
                                                                "GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k4"))]
    major, minor = torch.cuda.get_device_capability()
    opts = (*OPTIONS, f"-DTCB_MT={mt}", f"-DTCB_MINB={minb}", f"-DTCB_EMU={emu}")
    t0 = time.perf_counter()
    cubin = nvrtc.compile_cubin("\n".join(keep), f"{major}{minor}", opts, f"tcb_{mt}_{minb}_{emu}.cu")
    from torch.cuda._utils import _cuda_load_module  # noqa: PLC0415

    names = [f"gpscale_kmm_tcb_k1_{k}_f" for k in KERNELS]
    return _cuda_load_module(cubin, names), time.perf_counter() - t0


def run(fn, mt, Xs, Zf, Zn, Vf, n, m, d, t):
    O = torch.zeros(n, t, device=Xs.device)
    rows = 16 * mt * 8
    fn(((n + rows - 1) // rows, (t + 15) // 16, 1), (256, 1, 1), [Xs, Zf, Zn, Vf, O, O, n, m, d, t, 0])
    return O


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--t", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-rows", type=int, default=512)
    p.add_argument("--out", default="tune_tcb.json")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    X, Z = (torch.rand(a.n, a.d, generator=g).cuda() for _ in range(2))
    V = torch.randn(a.n, a.t, generator=g).cuda()
    c = X.mean(0)
    Xs, Zs = (X - c) / 0.5, (Z - c) / 0.5
    Zf, Zn = pack_z(Zs, 1)
    Vf = pack_v(V)
    refs = {k: reference(Xs, Zs, V, k, a.ref_rows) for k in KERNELS}
    results = []
    for mt, minb, emu in CONFIGS:
        try:
            mod, secs = build(mt, minb, emu)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is a result too
            results.append({"mt": mt, "minb": minb, "emu": emu, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(results[-1], flush=True)
            continue
        for k in KERNELS:
            fn = mod[f"gpscale_kmm_tcb_k1_{k}_f"]
            O = run(fn, mt, Xs, Zf, Zn, Vf, a.n, a.n, a.d, a.t)
            torch.cuda.synchronize()
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                run(fn, mt, Xs, Zf, Zn, Vf, a.n, a.n, a.d, a.t)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            ref = refs[k]
            err = ((O[: a.ref_rows].double() - ref).norm() / ref.norm()).item()
            results.append({"mt": mt, "minb": minb, "emu": emu, "kernel": k, "seconds": min(ts), "seconds_all": ts,
                            "rel_err": err, "compile_s": secs})
            print(json.dumps(results[-1]), flush=True)
        with open(a.out, "w") as f:
            json.dump({"n": a.n, "d": a.d, "t": a.t, "device": torch.cuda.get_device_name(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
