"""Sweep the ``tcb`` kernel's compile-time options on a GPU (csrc/kmm_tcb.cu: TCB_MT, TCB_MINB, TCB_EMU, TCB_ACC1,
TCB_DF16, TCB_DPATCH, TCB_ACCS).

``TCB_MT`` is the number of 16-row m-tiles a warp owns (they share every B fragment read from shared
memory: more means fewer loads per pair but more registers); ``TCB_MINB`` the blocks per SM that
``__launch_bounds__`` asks the register allocator to allow (more resident warps hide the
``mma.sync`` and ``ex2`` latencies, fewer registers per thread may spill); ``TCB_EMU`` how many of a
thread's 4 accumulator entries per fragment take their exp on the FMA pipes (``gps_ex2_poly``) rather
than the special-function unit; ``TCB_ACC1`` accumulates ``P V`` straight into the totals (16 fewer
live floats per output set); ``TCB_DF16`` (the ``tcbh`` variant) forms the distances from two f16
``m16n8k16`` MMAs per k-step instead of three tf32 ones (the SASS model's binding resource is the tensor
pipe: 1.5 -> 1.25 MMAs per 32 pairs, 13 fewer registers), ``TCB_DF16 = 2`` from an m16n8k16 and an
m16n8k8 with compact Z words (1.125 m16n8k16s' worth per 32 pairs; Z packed with ``pack_z(f16=2)``);
``TCB_DPATCH`` sets the symmetric diagonal ``q_ii = 0`` in a warp-uniform branch per n-tile instead
of testing every pair (only ``--sym`` products differ); ``TCB_ACCS = F`` keeps ``P V`` in registers
for F tiles and then adds it into per-thread totals in shared memory (one level's registers, two levels'
accuracy); ``TCB_BN`` the Z rows per shared-memory tile (64 or 128: half the barriers and loop overhead
per pair).  Each configuration is compiled from the k1 (d <= 8) entry points with NVRTC, through
gpscale's cubin cache (``compile_s`` is only a load where benchmarks/prebuild_cubins.py built it),
timed on the issue's product (n = m = 1M, d = 8, t = 16, uniform inputs, lengthscale 0.5 as in
bench_kernel_matmul.py) and checked against a float64 reference on a subset of rows.  ``--sym`` times
the symmetric product ``K(X, X) V`` that CG runs (the kernel then patches ``q_ii = 0``) instead of
``K(X, Z) V``.

Usage (GPU machine)::

    python benchmarks/tune_tcb.py --n 1000000 --out tune_tcb.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gpscale._ext.compiler import OPTIONS, cached_cubin
from gpscale._ext.sources import read_source
from gpscale._ext.splits import auto_splits, resident_blocks, splits_arg
from gpscale._ext.tcb_pack import pack_v, pack_z

#: (TCB_MT, TCB_MINB, TCB_EMU, TCB_ACC1[, TCB_DF16[, TCB_DPATCH[, TCB_ACCS[, TCB_BN]]]]), missing trailing
#: options 0 (TCB_BN: 0 = 64);
#: (2, 1, 0, 0) is the shipped one.  Measured on the second lent
#: H100: block shapes (results/tune_tcb_h100.json) and EMU 1-4 (tune_tcb_emu_h100.json), neither
#: faster.  Next: one-level accumulation, which lets ptxas fit the f kernels in 80 registers without
#: spills (3 blocks = 24 warps per SM; ncu found the shipped kernel latency-bound at 16).
#: (2, 4, 0, 1) fits 64 registers with small spills (32 warps per SM).
#: DF16 = 1 (2026-11-24, CPU only): the model's RBF bound 0.299 -> 0.256 s; with ACC1 and MINB 3 it also
#: fits 80 registers without spills.  Third lent H100 (results/tune_tcb_df16_h100.json): DF16 0.572 ->
#: 0.525 s, DF16 + ACC1 + MINB 3 0.493 s but 3.6e-3 relative error (mma.sync's fp32 accumulator
#: truncates; one level over 1M columns), so ACC1 is out; ACCS keeps ACC1's 80 registers at 1.5e-5.
#: BN = 128 with MINB 3 (80 registers, no spills): 0.492 s (results/tune_tcb_bn128_h100.json), shipped
#: as tcbh (launch.DEFINES).  DF16 = 2 (kmm_tcb.cu's sixth pass, CPU only): model 0.249 -> 0.239 s, with
#: ACCS at BN 128 now fitting 48 KB (MINB 4: 64 registers).  Default sweep: the shipped tcb and tcbh builds
#: and their neighbours.
CONFIGS = [(2, 1, 0, 0, 0, 0, 0, 0), (2, 3, 0, 0, 1, 0, 0, 128), (2, 3, 0, 0, 2, 0, 0, 128), (2, 4, 0, 0, 2, 0, 4, 128),
           (2, 3, 0, 0, 2, 0, 4, 128)]
NOPTS = 8
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


def prefix(df16: int) -> str:
    return "gpscale_kmm_tcbh_k1" if df16 else "gpscale_kmm_tcb_k1"


def tune_source(mt: int, minb: int, emu: int = 0, acc1: int = 0, df16: int = 0, dpatch: int = 0, accs: int = 0,
                bn: int = 0) -> tuple[str, str, tuple[str, ...]]:
    """``(name, text, options)`` of one configuration: kmm_tcb.cu with only its k1 (d <= 8) entry points."""
    text = read_source("kmm_tcb.cu")
    keep = [ln for ln in text.splitlines()  # only the k1 (d <= 8) entry points: a quarter of the compile
            if not (ln.startswith("GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb") and "_k1," not in ln)]
    opts = (*OPTIONS, f"-DTCB_MT={mt}", f"-DTCB_MINB={minb}", f"-DTCB_EMU={emu}", f"-DTCB_ACC1={acc1}",
            f"-DTCB_DF16={df16}", f"-DTCB_DPATCH={dpatch}", f"-DTCB_ACCS={accs}",
            f"-DTCB_BN={bn or 64}")
    return f"tune_tcb_{mt}_{minb}_{emu}_{acc1}_{df16}_{dpatch}_{accs}_{bn}.cu", "\n".join(keep), opts


def build(mt: int, minb: int, emu: int = 0, acc1: int = 0, df16: int = 0, dpatch: int = 0, accs: int = 0,
          bn: int = 0):
    """Load one configuration's entry points: ``(module, seconds)``, compiled through gpscale's cubin cache (a
    cubin ``benchmarks/prebuild_cubins.py`` made is only loaded, in milliseconds)."""
    name, text, opts = tune_source(mt, minb, emu, acc1, df16, dpatch, accs, bn)
    major, minor = torch.cuda.get_device_capability()
    t0 = time.perf_counter()
    path = cached_cubin(name, text, f"{major}{minor}", opts, torch.version.cuda)
    from torch.cuda._utils import _cuda_load_module

    names = [f"{prefix(df16)}_{k}_f" for k in KERNELS]
    return _cuda_load_module(path.read_bytes(), names), time.perf_counter() - t0


def run(fn, mt, Xs, Zf, Zn, Vf, n, m, d, t, sym=0, splits=1):
    """One product; with ``splits`` > 1 column splits (grid z), whose partial outputs are then added."""
    O = torch.zeros(n, t, device=Xs.device) if splits == 1 else torch.empty(splits, n, t, device=Xs.device)
    rows = 16 * mt * 8
    fn(((n + rows - 1) // rows, (t + 15) // 16, splits), (256, 1, 1), [Xs, Zf, Zn, Vf, O, O, n, m, d, t, sym])
    return O if splits == 1 else O.sum(0)


def resolve_splits(fn, splits, mt, bn, n, m, t) -> tuple[int, int | None]:
    """``(S, blocks per SM)``: ``"auto"`` chosen as the launcher does (gpscale/_ext/splits.py), else ``splits``."""
    if splits != "auto":
        return splits, resident_blocks(fn, 256)
    blocks = -(-n // (16 * mt * 8)) * -(-t // 16)
    return auto_splits(fn, 256, 0, blocks, -(-m // (bn or 64)), 4 * n * t), resident_blocks(fn, 256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--t", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-rows", type=int, default=512)
    p.add_argument("--configs", nargs="+", default=None, metavar="MT,MINB,EMU,ACC1[,DF16[,DPATCH[,ACCS[,BN]]]]",
                   help="configurations to run instead of CONFIGS, e.g. 2,1,0,0 2,3,0,1,1 2,3,0,1,1,1")
    p.add_argument("--sym", action="store_true", help="time K(X, X) V (what CG runs) instead of K(X, Z) V")
    p.add_argument("--splits", nargs="+", type=splits_arg, default=[1], metavar="S",
                   help="column splits to time each configuration with: positive ints or 'auto' (e.g. 1 auto)")
    p.add_argument("--out", default="tune_tcb.json")
    a = p.parse_args(argv)
    a.configs = [tuple(int(v) for v in c.split(",")) for c in a.configs] if a.configs else CONFIGS
    if any(not 4 <= len(c) <= NOPTS for c in a.configs):
        p.error("each --configs entry is MT,MINB,EMU,ACC1[,DF16[,DPATCH[,ACCS[,BN]]]] (four to eight integers)")
    a.configs = [(*c, *(0,) * (NOPTS - len(c))) for c in a.configs]
    return a


def time_config(cfg, data, refs, a) -> list[dict]:
    """Compile one configuration and time (and check) every kernel of KERNELS on it."""
    mt, minb, emu, acc1, df16, dpatch, accs, bn = cfg
    tag = {"mt": mt, "minb": minb, "emu": emu, "acc1": acc1, "df16": df16, "dpatch": dpatch, "accs": accs,
           "bn": bn or 64,
           "sym": bool(a.sym)}
    try:
        mod, secs = build(*cfg)
    except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is a result too
        return [{**tag, "error": f"{type(exc).__name__}: {exc}"[:500]}]
    out = []
    for k in KERNELS:
        fn = mod[f"{prefix(df16)}_{k}_f"]
        for splits in a.splits:
            S, per_sm = resolve_splits(fn, splits, mt, bn, a.n, a.n, a.t)
            O, ts = time_runs(fn, (mt, *data[df16], a.n, a.n, a.d, a.t, int(a.sym), S), a.repeats)
            err = ((O[: a.ref_rows].double() - refs[k]).norm() / refs[k].norm()).item()
            # best and median: runs alternate by a few percent, and what ships is judged on the median
            out.append({**tag, "kernel": k, "splits": splits, "splits_taken": S, "blocks_per_sm": per_sm,
                        "seconds": min(ts) if ts else None, "seconds_median": statistics.median(ts) if ts else None,
                        "seconds_all": ts, "rel_err": err, "compile_s": secs})
    return out


def time_runs(fn, args, repeats: int):
    """The product of one warm-up run and the seconds of ``repeats`` more."""
    O = run(fn, *args)
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(fn, *args)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return O, ts


def main(argv=None):
    a = parse_args(argv)
    g = torch.Generator().manual_seed(0)
    X, Z = (torch.rand(a.n, a.d, generator=g).cuda() for _ in range(2))
    V = torch.randn(a.n, a.t, generator=g).cuda()
    c = X.mean(0)
    Xs, Zs = (X - c) / 0.5, (Z - c) / 0.5
    if a.sym:
        Zs = Xs
    Vf = pack_v(V)
    data = {df16: (Xs, *pack_z(Zs, 1, f16=df16), Vf) for df16 in {c[4] for c in a.configs}}  # Z as each build reads it
    refs = {k: reference(Xs, Zs, V, k, a.ref_rows) for k in KERNELS}
    results = []
    for cfg in a.configs:
        for r in time_config(cfg, data, refs, a):
            results.append(r)
            print(json.dumps(r), flush=True)
        with open(a.out, "w") as f:  # after every configuration: a cut-off sweep keeps what it measured
            json.dump({"n": a.n, "d": a.d, "t": a.t, "sym": bool(a.sym), "device": torch.cuda.get_device_name(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
