"""Static throughput model of the csrc/ kernels from their SASS (no GPU needed).

Each variant's template is instantiated for one problem shape (``d``, ``t`` compile-time constants,
non-symmetric, as a kernel specialised on ``d`` would be), compiled with nvcc for ``sm_90`` and
disassembled with nvdisasm.  In the loop over Z tiles (the outermost loop holding ``MUFU.EX2``) every
instruction is counted once per tile, and the instructions of each nested loop times its trip count
per tile (given per variant below, in units of a marker instruction so an unrolled loop is counted
right).  Dividing by the pairs a warp handles per tile gives *warp instructions per 32 pairs* for each
execution pipe, and so SM cycles per 32 pairs:

=========  ===============================================  =====================================
resource   instructions                                      SM cycles per warp instruction
=========  ===============================================  =====================================
issue      all                                               1/4 (one per scheduler per clock)
fma        FADD FMUL FFMA HFMA2 ...                          1/4 (128 lanes per clock)
imad       IMAD*                                             1/2 (64 lanes per clock)
alu        IADD3 LOP3 SHF LEA ISETP FSETP FMNMX SEL PRMT ..  1/2 (64 lanes per clock)
mufu       MUFU.* and conversions F2F / F2FP / I2F / F2I     2   (16 lanes per clock)
tensor     HMMA                                              1 / mma_efficiency (one m16n8k8 tf32
                                                             or m16n8k16 bf16 / f16 per clock at
                                                             peak; an f16 m16n8k8 is half of one)
shared     LDS / STS / LDGSTS (cp.async)                     1 per wavefront: 1 per instruction
                                                             (exact for conflict-free 32-bit and
                                                             broadcast accesses: simt, tc, tc3);
                                                             for tcb, whose wide reads are 32
                                                             distinct words, bytes / 128 (.128: 4)
=========  ===============================================  =====================================

(Per-SM rates of compute capability 9.0, CUDA C++ Programming Guide, "Arithmetic Instructions";
the tensor rate from H100 SXM's dense peak, 494.7 TFLOP/s tf32 at 1.83 GHz on 132 SMs = 2048
flop/clock/SM.)  The slowest resource bounds the pairs per SM clock; latency, occupancy, memory
and the tile loop's tail are not modelled, so a measured kernel reaches some fraction of the bound:
``--measured`` puts the measured rate beside it (the first lent H100, 100k).  The exp bound of the
issue (16 exps per SM clock) is ``mufu`` alone.

Usage::

    python benchmarks/sass_model.py --out benchmarks/results/sass_model_sm90.json \\
        --measured benchmarks/results/kernel_matmul_h100_100k_first_run.json

nvdisasm is not part of nvcc's install: ``pip download nvidia-cuda-nvdisasm`` and unzip it, then
pass ``--nvdisasm`` (or put it on PATH).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gpscale._ext import launch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KINDS = {"rbf": "GPS_RBF", "matern12": "GPS_M12", "matern32": "GPS_M32", "matern52": "GPS_M52"}

#: Per variant: source file, the call of the template (``{K}``: kind, ``{d}``, ``{t}``, ``{ks}`` = ceil(d / 8)),
#: pairs one warp handles per Z tile (per 16 output columns), and for each nested loop of the tile
#: loop, in order, ``(marker, count per tile)``: its trip count is ``count / (markers per trip)``.
#: Threads per block are the launcher's (``gpscale._ext.launch.VARIANTS``).
VARIANTS = {
    "simt": dict(file="kmm_simt.cu", call="kmm_simt<{K}, GPS_MODE_F, float>(X, Z, V, O0, O1, n, m, {d}, {t})",
                 pairs=32 * 64,  # 32 rows x 64 Z rows per tile
                 nested=[("STS", 64 * 32 // 128), ("STS", 64 * 16 // 128), ("MUFU.EX2", 64)]),
    "tc": dict(file="kmm_tc.cu", call="kmm_tc<{K}, GPS_MODE_F, false>(X, Z, V, O0, O1, n, m, {d}, {t}, 0)",
               pairs=16 * 64, nested=[("STS", "tc_z"), ("STS", 64 * 16 // 128)]),
    "tc3": dict(file="kmm_tc.cu", call="kmm_tc<{K}, GPS_MODE_F, true>(X, Z, V, O0, O1, n, m, {d}, {t}, 0)",
                pairs=16 * 64, nested=[("STS", "tc_z"), ("STS", 64 * 16 // 128)]),
    "tcb": dict(file="kmm_tcb.cu", call="kmm_tcb<{K}, GPS_MODE_F, {ks}>(X, (const float4*)Z, Z, (const uint4*)V, O0, O1, n, m, {d}, "
                     "{t}, 0)",
                pairs=32 * 64, nested=[], distinct_wide=True),  # fixed per-thread copies, unrolled
}


def _defines(options) -> dict:
    """``("-DNAME=V", ...)`` (a build of :data:`gpscale._ext.launch.DEFINES`) -> ``{NAME: V}``."""
    return dict(o[2:].split("=", 1) for o in options)


def _tcb_build(defines: dict) -> dict:
    """A kmm_tcb.cu build as a model variant: a warp handles 32 X rows x TCB_BN Z rows per tile."""
    return dict(VARIANTS["tcb"], defines=defines, pairs=32 * int(defines.get("TCB_BN", 64)), launched="tcbh")


def _launched(variant: str) -> str:
    """The launcher's variant (gpscale._ext.launch) whose entry points and block size a model variant has."""
    return VARIANTS[variant].get("launched", variant)


_SHIPPED_TCBH = _defines(launch.DEFINES["tcbh"])
#: tcbh as shipped, and with the distance's xh.zh in an m16n8k8 (TCB_DF16 = 2, kmm_tcb.cu's sixth pass)
VARIANTS["tcbh"] = _tcb_build(_SHIPPED_TCBH)
VARIANTS["tcbh2"] = _tcb_build({**_SHIPPED_TCBH, "TCB_DF16": "2"})

PIPES = {
    "fma": ("FADD", "FMUL", "FFMA", "HFMA2", "HADD2", "HMUL2", "FSWZADD"),
    "imad": ("IMAD",),
    "alu": ("IADD3", "LOP3", "SHF", "LEA", "ISETP", "FSETP", "FMNMX", "SEL", "FSEL", "PRMT", "MOV", "VIADD",
            "IABS", "IMNMX", "P2R", "R2P", "PLOP3", "FCHK", "I2FP", "VIMNMX", "CS2R"),
    "mufu": ("MUFU", "F2F", "F2FP", "I2F", "F2I", "FRND"),
    "tensor": ("HMMA",),
}
CYCLES = {"issue": 0.25, "fma": 0.25, "imad": 0.5, "alu": 0.5, "mufu": 2.0, "shared": 1.0}


def tensor_work(op: str) -> float:
    """Tensor-pipe work of one HMMA in units of an m16n8k16 (bf16/f16): an f16 or bf16 m16n8k8 is half of
    one; a tf32 m16n8k8 is one (half the multiply-adds at half the rate)."""
    return 0.5 if op.startswith("HMMA.1688") and ".TF32" not in op else 1.0


def _marker_total(spec, d: int, variant: str):
    """Stores per thread per tile of a load whose size depends on d (``"tc_z"``: kp = 8 ceil(d / 8))."""
    if spec == "tc_z":
        return 64 * 8 * launch.ksteps(d) // launch.VARIANTS[variant][3]
    return spec


def probe_source(variant: str, kind: str, d: int, t: int) -> str:
    v = VARIANTS[variant]
    call = v["call"].format(K=KINDS[kind], d=d, t=t, ks=launch.ksteps(d))
    defines = "".join(f"#define {k} {val}\n" for k, val in v.get("defines", {}).items())
    # the entries' bounds: TCB_MINB blocks per SM applies to the mode-F d <= 8 entry that the probe is
    bounds = f"{launch.VARIANTS[_launched(variant)][3]}, {v.get('defines', {}).get('TCB_MINB', 1)}"
    return (defines + f'#include "{v["file"]}"\n'
            f'extern "C" __global__ void __launch_bounds__({bounds}) probe(const float* X, const float* Z, '
            f'const float* V, float* O0, float* O1, int n, int m) {{ {call}; }}\n')


def disassemble(src: str, nvcc: str, nvdisasm: str, arch: int) -> tuple[str, str]:
    """``(sass, ptxas log)`` of the probe source; the log covers the real entry points it includes."""
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp) / "probe.cu", Path(tmp) / "probe.cubin"
        cu.write_text(src)
        res = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-Xptxas=-v", f"-I{CSRC}", str(cu), "-o",
                              str(cubin)], check=True, capture_output=True, text=True)
        sass = subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
        return sass, res.stderr


def entry_resources(log: str) -> dict:
    """``{entry: (registers, shared bytes)}`` from a ptxas ``-v`` log."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if m and name:
            out[name] = (int(m.group(1)), int(m.group(2)))
            name = None
    return out


def warps_per_sm(registers: int, smem: int, threads: int) -> int:
    """Resident warps per SM of compute capability 9.0 (64 K registers allocated 256 per warp,
    228 KB shared memory with 1 KB reserved per block, 64 warps, 32 blocks)."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(65536 // (per_warp * warps), 228 * 1024 // (smem + 1024), 64 // warps, 32)
    return blocks * warps


def parse(sass: str, function: str = "probe"):
    """``(instructions, labels)``: instructions as ``(opcode, text)``, labels as name -> index."""
    lines = sass.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == f".text.{function}:")
    ins, labels = [], {}
    for ln in lines[start + 1:]:
        if ln.startswith(".text."):
            break
        m = re.match(r"^\s*(\.L_\w+):", ln)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", ln)
        if m:
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(1).strip())
            ins.append((body.split()[0], body))
    return ins, labels


def loops(ins, labels) -> list[tuple[int, int]]:
    """``(first, last)`` index ranges of the loops: a branch back to a label at or before it."""
    out = []
    for i, (op, body) in enumerate(ins):
        m = re.search(r"`\((\.L_\w+)\)", body) if op.startswith("BRA") else None
        if m and labels.get(m.group(1), len(ins)) <= i:
            out.append((labels[m.group(1)], i))
    return out


def pipe_of(op: str) -> str | None:
    base = op.split(".")[0]
    for pipe, names in PIPES.items():
        if base in names:
            return pipe
    return None


def shared_wavefronts(op: str, distinct_wide: bool = False) -> int:
    """Shared-memory wavefronts of one warp instruction: 1, or with ``distinct_wide`` (every lane its
    own word) its 32 lanes' bytes / 128."""
    if not op.startswith(("LDS", "STS", "LDGSTS")):
        return 0
    if not distinct_wide:
        return 1
    return 4 if ".128" in op else 2 if ".64" in op else 1


def count_loop(ins, labels, variant: str, d: int) -> dict:
    """Dynamic instruction counts per Z tile (per warp) of the tile loop, by opcode."""
    spec = VARIANTS[variant]
    allloops = loops(ins, labels)
    ex2 = [i for i, (op, _) in enumerate(ins) if op.startswith("MUFU.EX2")]
    main = max((lp for lp in allloops if any(lp[0] <= i <= lp[1] for i in ex2)), key=lambda lp: lp[1] - lp[0])
    inner = sorted(lp for lp in allloops if main[0] <= lp[0] and lp[1] < main[1] and lp != main)
    inner = [lp for lp in inner if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in inner)]
    if len(inner) != len(spec["nested"]):
        raise RuntimeError(f"{variant}: expected {len(spec['nested'])} nested loops in the tile loop, found "
                           f"{len(inner)}; update VARIANTS")
    weight = [1.0] * len(ins)
    for (first, last), (marker, total) in zip(inner, spec["nested"]):
        per_trip = sum(1 for op, _ in ins[first:last + 1] if op.startswith(marker))
        total = _marker_total(total, d, variant)
        if per_trip == 0 or total % per_trip:
            raise RuntimeError(f"{variant}: nested loop {first}-{last} has {per_trip} {marker} per trip, "
                               f"which does not divide {total}")
        for i in range(first, last + 1):
            weight[i] = total / per_trip
    counts = collections.Counter()
    for i in range(main[0], main[1] + 1):
        counts[ins[i][0]] += weight[i]
    return dict(counts)


def model(counts: dict, pairs: int, mma_efficiency: float, distinct_wide: bool = False) -> dict:
    """SM cycles per 32 pairs for each resource, the bound, and pairs per SM clock."""
    per32 = 32.0 / pairs  # warp instructions of one tile -> per 32 pairs
    use = collections.Counter()
    for op, c in counts.items():
        use["issue"] += c
        pipe = pipe_of(op)
        if pipe:
            use[pipe] += c
        if pipe == "tensor":
            use["tensor_work"] += c * tensor_work(op)
        use["shared"] += c * shared_wavefronts(op, distinct_wide)
    cycles = {r: use[r] * per32 * CYCLES[r] for r in CYCLES}
    cycles["tensor"] = use["tensor_work"] * per32 / mma_efficiency
    bound = max(cycles, key=cycles.get)
    return {"warp_instructions_per_32_pairs": {r: round(use[r] * per32, 3) for r in ("issue", *PIPES, "shared")},
            "tensor_work_per_32_pairs": round(use["tensor_work"] * per32, 3),  # in m16n8k16s (tensor_work)
            "sm_cycles_per_32_pairs": {r: round(c, 3) for r, c in cycles.items()},
            "bound_by": bound, "pairs_per_sm_clock": round(32.0 / cycles[bound], 3)}


def measured_rates(path: str | None, d: int, t: int) -> dict:
    """``(kernel, variant) -> pairs per SM clock`` from a bench_kernel_matmul JSON (same d, t)."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    clock = data["meta"].get("clock_ghz", 1.98) * 1e9
    sms = data["meta"].get("sms", 132)
    out = {}
    for r in data["results"]:
        if r.get("d") == d and r.get("t") == t and r.get("seconds"):
            variant = r["backend"].split(":")[-1]
            out[(r["kernel"], variant)] = r["n"] * r["n"] * -(-t // 16) / r["seconds"] / (sms * clock)
    return out


def tools(args):
    nvcc = args.nvcc or shutil.which("nvcc")
    nvdisasm = args.nvdisasm or shutil.which("nvdisasm")
    if not nvcc or not nvdisasm:
        sys.exit("sass_model needs nvcc and nvdisasm (pip download nvidia-cuda-nvdisasm; unzip; --nvdisasm PATH)")
    return nvcc, nvdisasm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--kernels", nargs="+", default=["rbf", "matern52"], choices=list(KINDS))
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--t", type=int, default=16)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--sms", type=int, default=132, help="SMs of the modelled GPU (H100 SXM: 132)")
    p.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock of the modelled GPU (H100 SXM boost)")
    p.add_argument("--mma-efficiency", type=float, default=0.6,
                   help="share of the dense tensor peak mma.sync reaches (Hopper: wgmma reaches the peak)")
    p.add_argument("--measured", help="bench_kernel_matmul JSON to compare with")
    p.add_argument("--nvcc")
    p.add_argument("--nvdisasm")
    p.add_argument("--out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    nvcc, nvdisasm = tools(args)
    meas = measured_rates(args.measured, args.d, args.t)
    rows = []
    for kernel in args.kernels:
        for variant in args.variants:
            sass, log = disassemble(probe_source(variant, kernel, args.d, args.t), nvcc, nvdisasm, args.arch)
            ins, labels = parse(sass)
            rec = {"kernel": kernel, "variant": variant, "d": args.d, "t": args.t,
                   **model(count_loop(ins, labels, variant, args.d), VARIANTS[variant]["pairs"], args.mma_efficiency,
                           VARIANTS[variant].get("distinct_wide", False))}
            # Occupancy of the entry point a product really launches (runtime d), for reading the
            # measured / model ratio: latency hiding is what the model leaves out.
            entry = launch.entry_name(_launched(variant), kernel, "f", torch.float32, args.d)
            regs, smem = entry_resources(log)[entry]
            threads = launch.VARIANTS[_launched(variant)][3]
            rec.update(entry=entry, registers=regs, warps_per_sm=warps_per_sm(regs, smem, threads))
            rate = rec["pairs_per_sm_clock"] * args.sms * args.clock_ghz * 1e9
            rec["model_seconds"] = {str(n): round(n * n * -(-args.t // 16) / rate, 4) for n in (100_000, 1_000_000)}
            if (kernel, variant) in meas:
                rec["measured_pairs_per_sm_clock"] = round(meas[(kernel, variant)], 3)
                rec["measured_over_model"] = round(meas[(kernel, variant)] / rec["pairs_per_sm_clock"], 3)
            rows.append(rec)
            print(render_row(rec), flush=True)
    if args.out:
        meta = {k: getattr(args, k) for k in ("arch", "sms", "clock_ghz", "mma_efficiency", "measured")}
        meta["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")


def render_row(rec: dict) -> str:
    w = rec["warp_instructions_per_32_pairs"]
    meas = rec.get("measured_pairs_per_sm_clock")
    return (f"{rec['kernel']:9s} {rec['variant']:5s} instr/32 pairs: issue {w['issue']:6.2f} alu {w['alu']:5.2f} "
            f"fma {w['fma']:5.2f} mufu {w['mufu']:4.2f} hmma {w['tensor']:4.2f} "
            f"({rec['tensor_work_per_32_pairs']:4.3f}) shared {w['shared']:4.2f} | bound "
            f"{rec['bound_by']:6s} {rec['pairs_per_sm_clock']:5.2f} pairs/SM clk, 1M: {rec['model_seconds']['1000000']:.3f} s"
            f" | {rec['registers']} regs, {rec['warps_per_sm']} warps/SM"
            + (f" | measured {meas:.2f} ({rec['measured_over_model']:.0%})" if meas else ""))


if __name__ == "__main__":
    main()
