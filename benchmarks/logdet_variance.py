#!/usr/bin/env python
"""Why the preconditioned log-det estimator's spread falls on some data sets and not others (dense study).

For a Cholesky-sized subsample (``--m`` points) at the preconditioner benchmark's fitted hyperparameters,
this computes the eigenvalues of :math:`M = P^{-1/2}\\hat K P^{-1/2}` densely and reports the standard
deviation of the Gaussian-probe trace estimator of :math:`\\log|M|` with ``--probes`` probes,
:math:`\\sqrt{2\\|\\log M\\|_F^2 / \\text{probes}}` (Hutchinson; SLQ's quadrature error comes on top), and
:math:`\\kappa(M)`, which sets the CG iterations.  Preconditioners compared at each rank:

* ``none``: :math:`P = I`;
* ``sigma2``: gpscale's :math:`P = LL^T + \\sigma^2 I` with ``L`` from RPCholesky;
* ``fitc``: :math:`P = LL^T + \\operatorname{diag}(\\sigma^2 + \\operatorname{diag}(K - LL^T))` (the FITC-style
  diagonal correction, Cutajar et al., ICML 2016), which gives ``P`` the diagonal of :math:`\\hat K`.

The spread falls by :math:`\\|\\log\\hat K\\|_F / \\|\\log M\\|_F`; that is large only when the residual
:math:`K - LL^T` is small against the noise, ``tr(K - LLᵀ) / (m σ²)`` (reported) well below 1.

Example (reproduces the table in docs/benchmarks.md; a few minutes on one core)::

    python benchmarks/logdet_variance.py --data-dir ../shared/data/uci \\
        --hyper-cache benchmarks/results/precond/hypers.json --out benchmarks/results/precond/logdet_variance.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from gpscale import KernelOperator
from gpscale.bench._problems import load_problem
from gpscale.precond import RPCholesky


def _spread(Kh: torch.Tensor, P: torch.Tensor | None, probes: int) -> tuple[float, float]:
    """(std of the Hutchinson estimate of log|P^{-1/2} K̂ P^{-1/2}|, its condition number)."""
    if P is None:
        ev = torch.linalg.eigvalsh(Kh)
    else:
        C = torch.linalg.cholesky(P)
        M = torch.linalg.solve_triangular(C, torch.linalg.solve_triangular(C, Kh, upper=False).T, upper=False)
        ev = torch.linalg.eigvalsh((M + M.T) / 2)
    return math.sqrt(2.0 * float((ev.log() ** 2).sum()) / probes), float(ev.max() / ev.min())


def study(name: str, args) -> list[dict]:
    prob = load_problem(name, data_dir=args.data_dir, max_n=args.max_n, kernel_name=args.kernel, hyper_n=args.hyper_n,
                        seed=0, cache_path=args.hyper_cache, hyper_iter=60)
    k, s2 = prob.kernel(args.kernel), prob.hypers["noise"]
    X = torch.tensor(prob.X[: args.m])
    m = X.shape[0]
    with torch.no_grad():
        K = k(X, X)
    Kh = K + s2 * torch.eye(m, dtype=K.dtype)
    std0, kappa0 = _spread(Kh, None, args.probes)
    rows = []
    op = KernelOperator(X, k, noise=s2)
    for rank in args.ranks:
        row = {"dataset": name, "noise": s2, "m": m, "rank": rank, "none_std": std0, "none_kappa": kappa0}
        for tag, fitc in (("sigma2", False), ("fitc", True)):  # gpscale's own P, densified
            P = RPCholesky(rank=rank, seed=0, residual_diagonal=fitc).build(op)
            row[f"{tag}_std"], row[f"{tag}_kappa"] = _spread(Kh, P.to_dense().to(K.dtype), args.probes)
        row["residual_over_noise"] = P.stats["residual_trace"] / (m * s2)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"| {r['dataset']} | {r['noise']:.3g} | {r['rank']} | {r['residual_over_noise']:.3g} | "
            f"{r['none_std']:.3g} (κ {r['none_kappa']:.2g}) | {r['sigma2_std']:.3g} ({r['none_std'] / r['sigma2_std']:.2g}x; "
            f"κ {r['sigma2_kappa']:.2g}) | {r['fitc_std']:.3g} ({r['none_std'] / r['fitc_std']:.2g}x; κ {r['fitc_kappa']:.2g}) |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/uci")
    ap.add_argument("--datasets", default="pol,elevators,bike,protein,keggdirected")
    ap.add_argument("--ranks", default="200,500")
    ap.add_argument("--m", type=int, default=1000, help="subsample size (dense eigenvalues, O(m^3))")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--kernel", default="matern52")
    ap.add_argument("--max-n", type=int, default=3000, help="the benchmark's subsample (its first m rows are used)")
    ap.add_argument("--hyper-n", type=int, default=1500)
    ap.add_argument("--hyper-cache", default="benchmarks/results/precond/hypers.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    torch.set_num_threads(args.threads)
    print(f"Gaussian-probe std of the log-det estimate ({args.probes} probes, exact quadrature), m = {args.m}\n")
    print("| data set | noise | rank | tr(K−LLᵀ)/(mσ²) | none | LLᵀ + σ²I (gpscale) | LLᵀ + diag(σ² + diag(K−LLᵀ)) |")
    print("|---|---|---|---|---|---|---|")
    rows = [r for name in args.datasets.split(",") for r in study(name, args)]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"settings": vars(args), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
