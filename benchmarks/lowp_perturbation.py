#!/usr/bin/env python
"""How far 16-bit kernel products go: the perturbation ``rho = ||A^-1 E||_2`` against ``n`` (issue 4).

A low-precision product multiplies by the rounded kernel ``K + E`` instead of ``K``.  CG (and its
refinement) then solves ``A = K + sigma^2 I`` to a true-residual tolerance only while
``rho = ||A^-1 E||_2`` is well below 1 (Carson & Higham 2018; docs/precision.md, phase 2); above
about 1/2 gpscale's mixed-precision CG hands the column to float32, so every low-precision product
spent on it is lost time.  ``E`` has entries of relative size ``u`` with nearly independent signs, so
by the random-matrix estimate ``||E||_2 ~ 2 u rms(K) sqrt(n) / sqrt(3)`` grows like ``sqrt(n)``, while
``||A^-1||_2 = 1 / sigma^2`` stays put.  This script measures ``rho`` exactly (dense float64
eigenvalues of ``A^-1/2 E A^-1/2``) for each rounding on the problem of ``bench_precision.py
--datasets synthetic`` (Matérn-5/2 ARD, lengthscale sqrt(d) on standardised d = 8 inputs, outputscale
1) and fits the exponent, so the figure at the sizes where the GPU timing is taken (n >= 200k) can be
extrapolated on a CPU.

Roundings: ``bfloat16`` (u = 2^-8), ``float16`` and ``tf32`` (u = 2^-11), and ``bfloat16x2`` -- a
two-term tile ``hi + lo`` (both bf16; u ~ 2^-16), the form a fused tensor-core kernel can use.
``--lowrank K`` adds ``bfloat16-lrK`` and ``float16-lrK``: what ``PrecisionPolicy(lowrank_correction=True)``
rounds -- only ``K - LL^T``, ``L`` gpscale's rank-K pivoted-Cholesky factor -- so ``E`` is that rounding.

Example::

    python benchmarks/lowp_perturbation.py --sizes 500 1000 2000 4000 --noises 0.1 0.01
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import REPO_ROOT, machine_info, synthetic_problem, write_json  # noqa: E402

from gpscale import KernelOperator  # noqa: E402
from gpscale.kernels import Matern  # noqa: E402
from gpscale.precond import PivotedCholesky  # noqa: E402
from gpscale.precision import round_to  # noqa: E402

ROUNDINGS = ("bfloat16", "float16", "tf32", "bfloat16x2")


def rounded(K: torch.Tensor, name: str, factors: dict | None = None) -> torch.Tensor:
    """``K`` as a low-precision product sees it (float64 result)."""
    if "-lr" in name:  # round the residual, add the factor back exactly
        base, rank = name.split("-lr")
        L = factors[int(rank)]
        LLt = L @ L.T
        return rounded(K - LLt, base) + LLt
    if name == "bfloat16x2":
        hi = round_to(K.float(), "bfloat16").double()
        return hi + round_to((K - hi).float(), "bfloat16").double()
    return round_to(K.float(), name).double()


def kernel_matrix(n: int, d: int, seed: int, ranks=()) -> tuple[torch.Tensor, dict]:
    """Dense ``K`` (float64) and gpscale's pivoted-Cholesky factors of it, ``{rank: L}``."""
    X, _ = synthetic_problem(n, d, seed=seed)
    X = torch.as_tensor((X - X.mean(0)) / X.std(0))
    k = Matern(nu=2.5, lengthscale=torch.full((d,), math.sqrt(d), dtype=torch.float64)).double()
    op = KernelOperator(X, k, noise=1.0)
    K = op.dense()  # K + 1 I, one kernel evaluation per pair; the unit noise comes off exactly
    K.diagonal().sub_(1.0)
    return K, {r: PivotedCholesky(rank=r).build(op).L for r in ranks}


def perturbations(K: torch.Tensor, noises, roundings, factors: dict | None = None) -> list[dict]:
    """``rho = ||A^-1 E||_2`` (= spectral radius, ``A`` SPD) and ``||E||_2`` for every pair."""
    n = K.shape[0]
    lam, U = torch.linalg.eigh(K)
    rms = float(K.pow(2).mean().sqrt())
    out = []
    for name in roundings:
        E = rounded(K, name, factors) - K
        e_norm = float(torch.linalg.matrix_norm(E, ord=2))
        Et = U.T @ E @ U  # E in K's eigenbasis: A^-1/2 E A^-1/2 = D^-1/2 Et D^-1/2 there
        for s2 in noises:
            w = (lam.clamp_min(0) + s2).rsqrt()
            rho = float(torch.linalg.eigvalsh(w[:, None] * Et * w[None, :]).abs().max())
            out.append({"n": n, "rounding": name, "noise": s2, "rho": rho, "E_norm": e_norm, "rms_K": rms,
                        "K_norm": float(lam[-1])})
    return out


def fit_exponents(rows: list[dict], last: int = 3) -> dict:
    """Least-squares slope of log(rho) against log(n) over the ``last`` largest sizes, per (rounding, noise).

    Only the largest sizes: at small n a fixed-rank factor covers a large share of the points and
    the corrected roundings' rho grows faster there than it will at large n.
    """
    fits = {}
    for key in sorted({(r["rounding"], r["noise"]) for r in rows}):
        pts = sorted((r["n"], r["rho"]) for r in rows if (r["rounding"], r["noise"]) == key)[-last:]
        if len(pts) < 2:
            continue
        ln, lr = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
        slope, icpt = np.polyfit(ln, lr, 1)
        fits[f"{key[0]}@{key[1]}"] = {"exponent": float(slope), "rho_at_200k": float(math.exp(icpt) * 2e5 ** slope)}
    return fits


def markdown(rows: list[dict], fits: dict) -> str:
    sizes = sorted({r["n"] for r in rows})
    keys = sorted({(r["rounding"], r["noise"]) for r in rows})
    head = "| rounding | noise | " + " | ".join(f"n = {n}" for n in sizes) + " | exponent | extrapolated n = 200k |"
    lines = [head, "|" + "---|" * (len(sizes) + 4)]
    for name, s2 in keys:
        by_n = {r["n"]: r["rho"] for r in rows if (r["rounding"], r["noise"]) == (name, s2)}
        f = fits.get(f"{name}@{s2}", {})
        cells = " | ".join(f"{by_n[n]:.3g}" if n in by_n else "—" for n in sizes)
        lines.append(f"| {name} | {s2:g} | {cells} | {f.get('exponent', float('nan')):.2f} | "
                     f"{f.get('rho_at_200k', float('nan')):.3g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--noises", type=float, nargs="+", default=[0.1, 0.01])
    ap.add_argument("--roundings", nargs="+", default=list(ROUNDINGS), choices=ROUNDINGS)
    ap.add_argument("--lowrank", type=int, nargs="*", default=[100],
                    help="pivoted-Cholesky ranks of the corrected roundings (bfloat16-lrK, float16-lrK)")
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "lowp_perturbation.json"))
    args = ap.parse_args(argv)
    rows = []
    roundings = list(args.roundings) + [f"{b}-lr{r}" for r in args.lowrank for b in ("bfloat16", "float16")]
    for n in args.sizes:
        t0 = time.perf_counter()
        K, factors = kernel_matrix(n, args.d, args.seed, args.lowrank)
        rows += perturbations(K, args.noises, roundings, factors)
        print(f"n = {n}: {time.perf_counter() - t0:.1f} s", flush=True)
    fits = fit_exponents(rows)
    write_json(Path(args.out), {"config": vars(args), "machine": machine_info(), "rows": rows, "fits": fits})
    print(markdown(rows, fits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
