#!/usr/bin/env python
"""Seconds per fused kernel product ``K(X, Z) @ V`` for every backend and CUDA variant.

For each kernel and size ``n = m`` (default 100k and 1M, d = 8, t = 16) this times one product per
backend -- gpscale's CUDA variants (``cuda:simt``, ``cuda:tc``, ``cuda:tc3``, ``cuda:tcb`` (the float32
default), the experimental ``cuda:tcbh``), KeOps and the blocked
torch path -- and reports

* ``seconds`` (median of ``--repeats`` after one warm-up call that also compiles),
* ``exp_per_s``: special-function evaluations per second actually issued (one ``exp`` per pair, plus a
  ``sqrt`` for Matérn; the CUDA kernels redo them per 16 output columns),
* ``bound_seconds`` / ``x_bound``: the MUFU bound ``n m (exp + sqrt per pair) / (16 x SMs x clock)``
  (H100 SXM: 16 / clk / SM x 132 SMs x 1.98 GHz = 4.2e12 /s) and how many times slower we are,
* ``rel_err``: ``max|got - ref| / max|ref|`` over ``--ref-rows`` rows against a float64 torch reference.

``--mll`` adds one end-to-end MLL + gradient at the largest size (backend "auto").

Examples
--------
GPU (the issue's figure)::

    python benchmarks/bench_kernel_matmul.py --device cuda --out benchmarks/results/kernel_matmul_h100.json --mll

CPU smoke test (tiny sizes, torch and KeOps only)::

    python benchmarks/bench_kernel_matmul.py --device cpu --sizes 2000 --backends torch keops --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_json  # noqa: E402
from gpscale._ext import launch  # noqa: E402 - pure Python: NVRTC is loaded only when a kernel compiles
from gpscale._ext import splits as splits_mod  # noqa: E402
from gpscale._ext.splits import splits_arg  # noqa: E402
from gpscale.kernels import RBF, Matern  # noqa: E402
from gpscale.operators import CrossKernelOperator  # noqa: E402
from gpscale.operators.backends import parse_backend  # noqa: E402
from gpscale.cli import backend_arg  # noqa: E402

ALL_BACKENDS = ("cuda:simt", "cuda:tc", "cuda:tc3", "cuda:tcb", "cuda:tcbh", "keops", "torch")
MUFU_PER_CLK_SM = 16


def _kernel(name: str, ls: float):
    return RBF(lengthscale=ls) if name == "rbf" else Matern(nu={"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}[name],
                                                             lengthscale=ls)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def mufu_rate(dev, clock_ghz: float) -> float | None:
    """Special-function results per second of the device (None on CPU)."""
    if dev.type != "cuda":
        return None
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    return MUFU_PER_CLK_SM * sms * clock_ghz * 1e9


def reference_rows(X, Z, V, kernel, rows: int, chunk: int = 1 << 16):
    """float64 ``K(X[:rows], Z) V`` in column chunks (memory ``rows x chunk``), on X's device."""
    X64, Z64, V64 = X[:rows].double(), Z.double(), V.double()
    out = torch.zeros(X64.shape[0], V.shape[1], dtype=torch.float64, device=X.device)
    k64 = kernel.to(torch.float64)
    for j0 in range(0, Z64.shape[0], chunk):
        out += k64(X64, Z64[j0:j0 + chunk]) @ V64[j0:j0 + chunk]
    return out


def time_product(op, V, dev, repeats: int):
    t0 = time.perf_counter()
    out = op.matmul(V)  # warm-up: compiles (KeOps / NVRTC) on the first call
    _sync(dev)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        out = op.matmul(V)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return out, first, times


def operator_backend(backend: str, splits=1):
    """The ``backend=`` value of one timed arm: ``"cuda:tcbh"`` with ``splits`` -> ``CudaBackend("tcbh", splits)``."""
    name, cuda = parse_backend(backend)
    return dataclasses.replace(cuda, splits=splits) if cuda else name


def run_one(backend, name, n, args, dev, data, ref, splits=1):
    X, Z, V = data
    kernel = _kernel(name, args.lengthscale)
    b = parse_backend(backend)[0]
    rec = {"kernel": name, "n": n, "m": n, "d": args.d, "t": args.t, "backend": backend, "dtype": "float32",
           "symmetric": Z is X}
    try:
        op = CrossKernelOperator(X, Z, kernel, backend=operator_backend(backend, splits), cache=False)
        out, first, times = time_product(op, V, dev, args.repeats)
    except Exception as exc:  # noqa: BLE001 - one failing backend must not lose the others' figures
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return rec
    sec = statistics.median(times)
    sfu_per_pair = 1 if name == "rbf" else 2
    chunks = -(-args.t // 16) if b == "cuda" else 1
    issued = n * n * sfu_per_pair * chunks
    rec.update(seconds=sec, seconds_all=times, first_call_seconds=first, pairs_per_s=n * n / sec,
               exp_per_s=issued / sec)
    rate = mufu_rate(dev, args.clock_ghz)
    if rate:
        rec["bound_seconds"] = n * n * sfu_per_pair / rate
        rec["x_bound"] = sec / rec["bound_seconds"]
        rec["mufu_ratio"] = rec["exp_per_s"] / rate
    got = out[: ref.shape[0]].double()
    rec["rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
    rec["rel_err_fro"] = ((got - ref).norm() / ref.norm()).item()
    return rec


def run_mll(n, args, dev):
    """One MLL + gradient at size n (backend ``--mll-backend``); returns timings and the solver statistics.

    The preconditioner rank matters more than anything else here: with RBF(0.5) on uniform points in
    [0, 1]^8 and noise 0.05, pivoted Cholesky of rank 100 needs 23 / 30 / 41 / 58 CG iterations at
    n = 1k / 2k / 4k / 8k (about sqrt(n): the preconditioned condition number grows like n), which
    extrapolates to ~650 at 1M -- 20+ minutes of products.  The kernel's eigenvalues per point
    (measured at n = 6000) fall 125x -- the growth from 8k to 1M -- between index 100 and ~1500,
    so rank 2000 should keep 1M near 40 iterations; ``--mll-max-iter`` caps the run either way
    (a capped solve is reported as such in ``stats``).
    """
    from gpscale.likelihood import mll_estimate  # noqa: PLC0415
    from gpscale.precond import PivotedCholesky  # noqa: PLC0415

    g = torch.Generator(device="cpu").manual_seed(1)
    X = torch.rand(n, args.d, generator=g).to(dev)
    y = torch.sin(3 * X[:, 0]) + 0.1 * torch.randn(n, generator=g).to(dev)
    k = RBF(lengthscale=args.lengthscale, ard_num_dims=args.d)
    # Warm-up on the full problem, two CG iterations: compiles the KeOps formulas / NVRTC kernels of
    # the forward and backward products, and lets backend="auto" time its candidates for each product
    # of this size (gpscale.operators.autotune: the CG product, the ARD gradient's wide "d" product)
    # outside the timed run.
    tw = time.perf_counter()
    warm = mll_estimate(X, y, k, noise=0.05, method="iterative", seed=0, memory_budget=args.mll_budget, warn=False,
                        max_iter=2, preconditioner=PivotedCholesky(rank=10), backend=args.mll_backend)
    warm.value.backward()
    _sync(dev)
    warmup = time.perf_counter() - tw
    k = RBF(lengthscale=args.lengthscale, ard_num_dims=args.d)
    t0 = time.perf_counter()
    res = mll_estimate(X, y, k, noise=0.05, method="iterative", seed=0, memory_budget=args.mll_budget, warn=False,
                       rtol=args.mll_rtol, max_iter=args.mll_max_iter,
                       preconditioner=PivotedCholesky(rank=args.mll_rank), backend=args.mll_backend)
    _sync(dev)
    t1 = time.perf_counter()
    res.value.backward()
    _sync(dev)
    t2 = time.perf_counter()
    stats = {k_: v for k_, v in res.stats.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"n": n, "d": args.d, "rank": args.mll_rank, "rtol": args.mll_rtol, "max_iter": args.mll_max_iter,
            "forward_seconds": t1 - t0, "backward_seconds": t2 - t1, "value": float(res.value.detach()),
            "warmup_seconds": warmup, "warmup_backend": warm.stats.get("backend"),
            "stats": stats}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--t", type=int, default=16)
    p.add_argument("--kernels", nargs="+", default=["rbf", "matern52"])
    p.add_argument("--backends", nargs="+", default=list(ALL_BACKENDS), choices=ALL_BACKENDS)
    p.add_argument("--lengthscale", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-rows", type=int, default=256, help="rows checked against the float64 reference")
    p.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the MUFU bound (H100 SXM boost)")
    p.add_argument("--skip-torch-above", type=int, default=2_000_000,
                   help="skip the blocked torch path above this n (it is O(n m) GEMM+exp passes)")
    p.add_argument("--mll", action="store_true", help="also time one MLL + gradient at the largest size")
    p.add_argument("--mll-only", action="store_true", help="only the MLL + gradient run (no product timings)")
    p.add_argument("--mll-budget", type=int, default=1 << 30)
    p.add_argument("--mll-rank", type=int, default=2000, help="pivoted-Cholesky rank of the --mll run")
    p.add_argument("--mll-rtol", type=float, default=1e-2)
    p.add_argument("--mll-max-iter", type=int, default=100, help="CG iteration cap of the --mll run")
    p.add_argument("--mll-backend", default="auto", type=backend_arg,
                   help="product backend of the --mll run: auto, cuda, keops, torch or cuda:VARIANT")
    p.add_argument("--tcbh-build", default=None, metavar="OPTIONS",
                   help="time this candidate build of 'tcbh' (kmm_tcb.cu -D options, e.g. "
                        "--tcbh-build='-DTCB_DF16=2 -DTCB_BN=128', with '=') instead of the shipped "
                        "gpscale._ext.launch.DEFINES['tcbh']")
    p.add_argument("--splits", nargs="+", type=splits_arg, default=[1], metavar="S",
                   help="column splits of the cuda:tcb / cuda:tcbh launches, each timed in turn: positive ints or "
                        "'auto' (gpscale/_ext/splits.py), e.g. --splits 1 auto")
    p.add_argument("--symmetric", action="store_true",
                   help="time K(X, X) V (Z is X: the product CG runs, which a TCB_TRI build computes from one "
                        "triangle of K, each pair's exp once) instead of K(X, Z) V")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernel_matmul_<device>.json)")
    return p.parse_args(argv)


def _splittable(backend: str) -> bool:
    """``cuda:tcb`` / ``cuda:tcbh``: the backends whose launches take column splits."""
    cuda = parse_backend(backend)[1]
    return cuda is not None and cuda.variant in launch.TCB_FAMILY


def _with_splits(backend: str, splits, run):
    """``run(splits)``, recording which column splits the launcher took (``"auto"`` decides per launch).

    The launcher's choice is observed by wrapping :mod:`gpscale._ext.splits`' two policy functions for
    the duration of the run: measurement only, the splits themselves travel in the operator's
    ``CudaBackend``.
    """
    chosen, occupancy = [], []
    saved = splits_mod.choose_splits, splits_mod.resident_blocks
    splits_mod.choose_splits = lambda *a, **k: chosen.append(saved[0](*a, **k)) or chosen[-1]
    splits_mod.resident_blocks = lambda *a, **k: occupancy.append(saved[1](*a, **k)) or occupancy[-1]
    try:
        rec = run(splits)
    finally:
        splits_mod.choose_splits, splits_mod.resident_blocks = saved
    if _splittable(backend):
        rec.update(splits=splits, splits_taken=sorted(set(chosen)) if splits == "auto" else [splits],
                   blocks_per_sm=sorted(set(occupancy), key=str))
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if args.tcbh_build:  # a candidate build, timed before it ships (recorded in meta below)
        try:
            launch.DEFINES["tcbh"] = launch.parse_build(args.tcbh_build)
        except ValueError as exc:
            sys.exit(f"--tcbh-build: {exc}")
    out_path = Path(args.out or Path(__file__).parent / "results" / f"kernel_matmul_{dev.type}.json")
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "argv": sys.argv[1:],
            "mufu_rate_per_s": mufu_rate(dev, args.clock_ghz), "clock_ghz": args.clock_ghz,
            "tcbh_build": list(launch.DEFINES["tcbh"])}
    results = []
    doc = {"meta": meta, "results": results}

    def save():  # after every figure, atomically: a run cut short by a time limit keeps what it measured
        write_json(out_path, doc)

    for n in [] if args.mll_only else args.sizes:
        g = torch.Generator(device="cpu").manual_seed(n)
        X, Z = (torch.rand(n, args.d, generator=g).to(dev) for _ in range(2))
        Z = X if args.symmetric else Z  # Z is X: the operators' symmetric products (q_ii = 0 exactly)
        V = torch.randn(n, args.t, generator=g).to(dev)
        for name in args.kernels:
            ref = reference_rows(X, Z, V, _kernel(name, args.lengthscale), args.ref_rows)
            for backend in args.backends:
                if backend == "torch" and n > args.skip_torch_above:
                    continue
                if backend.startswith("cuda") and dev.type != "cuda":
                    continue
                for splits in args.splits if _splittable(backend) else [1]:
                    arm = functools.partial(run_one, backend, name, n, args, dev, (X, Z, V), ref)
                    rec = _with_splits(backend, splits, arm)
                    results.append(rec)
                    save()
                    print(json.dumps({k: v for k, v in rec.items() if k != "seconds_all"}), flush=True)
    if args.mll or args.mll_only:
        doc["mll"] = run_mll(max(args.sizes), args, dev)
        print(json.dumps(doc["mll"]), flush=True)
    save()
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
