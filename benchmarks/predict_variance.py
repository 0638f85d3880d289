#!/usr/bin/env python
"""Predictive variances above the Cholesky crossover: certified stopping against a relative residual.

For each data set, fits ARD hyperparameters on its first ``--fit-first`` points (a Cholesky ExactGP,
as ``crossover.py --fit-first``), then computes the predictive variances of ``--m`` held-out points
given ``--n`` training points with rank-``--rank`` pivoted-Cholesky-preconditioned CG, stopped

* ``residual``: at relative residual ``rtol`` per test point (gpscale up to 0.1.0), or
* ``certified``: on CG's Gauss-Radau bound, at error ``<= rtol * noise`` per test point
  (:func:`gpscale.models.predict.latent_variance`),

and compares both with the dense Cholesky variances: the largest relative excess of the predictive
variance of ``y`` (what the certified rule guarantees to keep below ``rtol``), the same for the
standard deviation, CG iterations and seconds.  Unless ``--no-gpytorch``, the same fitted model is
also predicted by GPyTorch, stock and with ``use_gpscale`` (``_gpytorch_predict.py``), against the dense
mean and variances.

Examples
--------
Committed results (benchmarks/results/predict_variance.json, docs/benchmarks.md)::

    python benchmarks/predict_variance.py --threads 2 --out benchmarks/results/predict_variance.json \
        --markdown docs/benchmarks.md

Smoke test::

    python benchmarks/predict_variance.py --datasets kin40k --n 600 --m 40 --fit-first 300 --out /tmp/pv.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from _gpytorch_predict import GPYTORCH_ARMS, gpytorch_arm, gpytorch_markdown  # noqa: E402
from crossover import fit_hypers  # noqa: E402

WIDTH = {"kin40k": 8, "protein": 9, "elevators": 18, "pol": 26, "bike": 17, "keggdirected": 20,
         "keggundirected": 26}
ARMS = (("residual", 1e-2), ("residual", 1e-3), ("certified", 1e-2), ("certified", 1e-3), ("certified", 1e-4))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="kin40k,protein,elevators,pol")
    p.add_argument("--n", type=int, default=4000, help="training points")
    p.add_argument("--m", type=int, default=500, help="test points")
    p.add_argument("--fit-first", type=int, default=2000, help="points of the hyperparameter fit")
    p.add_argument("--kernel", default="rbf")
    p.add_argument("--rank", type=int, default=100, help="pivoted-Cholesky preconditioner rank")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-gpytorch", dest="gpytorch", action="store_false",
                   help="skip the stock-GPyTorch and gpscale-backend arms")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--render", type=Path, default=None, help="re-render --markdown from this JSON; no runs")
    return p.parse_args(argv)


def stopping(rule: str, P, noise: float, rtol: float) -> dict:
    """CG arguments of a rule: ``residual`` (gpscale up to 0.1.0) or ``certified`` (:func:`latent_variance`'s)."""
    from gpscale.solvers.error_bounds import energy_stopping

    return {"rtol": rtol} if rule == "residual" else energy_stopping(P, noise, rtol)


def variances(op, Kb, P, prior: float, **stop):
    """Latent variances from one CG solve on ``K(X, X*)`` (the quadratic form of :func:`latent_variance`),
    and the CG result for its iteration counts."""
    from gpscale import cg
    from gpscale.solvers.error_bounds import second_order_quadratic

    res = cg(op, Kb, max_iter=5000, preconditioner=P, warn=False, **stop)
    q = second_order_quadratic(Kb, res.x, op.matmul(res.x))
    return (prior - q).clamp_min(0.0), res


def run_dataset(name: str, args) -> dict:
    import torch

    from gpscale import CrossKernelOperator, KernelOperator
    from gpscale.models.predict import PredictCache, latent_variance
    from gpscale.precond import PivotedCholesky

    d = WIDTH[name]
    X, y, info = C.load_problem(args.n + args.m, d, data_dir=args.data_dir, dataset=name)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    h = fit_hypers(X[:args.fit_first], y[:args.fit_first], args.kernel, args.fit_first)
    kernel, noise = copy.deepcopy(h["kernel"]).to(torch.float64), h["noise"]
    for p in kernel.parameters():
        p.requires_grad_(False)  # prediction only
    Xt, Xs = X[:args.n], X[args.n:]
    op = KernelOperator(Xt, kernel, noise=noise)
    t0 = time.perf_counter()
    L = torch.linalg.cholesky(op.to_dense(max_entries=args.n ** 2))
    exact = latent_variance(Xs, Xt, kernel, noise, PredictCache(torch.zeros(args.n), chol=L), rtol=0.0, max_iter=1)
    out = {"dataset": name, "data": info, "noise": noise, "lengthscale": h["lengthscale"],
           "outputscale": h["outputscale"], "cholesky_s": time.perf_counter() - t0, "arms": []}
    P = PivotedCholesky(rank=args.rank).build(op)
    out["spectrum_floor"] = P.spectrum_floor()
    prior = float(kernel.outputscale) * float(kernel.profile(torch.zeros((), dtype=torch.float64)))
    Kb = CrossKernelOperator(Xt, Xs, kernel, backend="torch").rows(torch.arange(args.n))  # once for all arms
    if args.gpytorch:
        yt = y[:args.n]
        exact_mean = h["mean"] + Kb.T @ torch.cholesky_solve((yt - h["mean"])[:, None], L)[:, 0]
        W = torch.linalg.solve_triangular(L, Kb, upper=False)
        exact_cov = kernel(Xs, Xs) - W.T @ W  # the dense latent covariance (float64)
        for kind, rtol in GPYTORCH_ARMS:
            out["arms"].append(gpytorch_arm(Xt, yt, Xs, h, exact_mean, exact, kind, rtol, exact_cov))
            _report(name, out["arms"][-1])
    for rule, rtol in ARMS:
        t0 = time.perf_counter()
        v, res = variances(op, Kb, P, prior, **stopping(rule, P, noise, rtol))
        secs = time.perf_counter() - t0
        rel = (v - exact) / (exact + noise)
        std_rel = ((v + noise) / (exact + noise)).sqrt() - 1
        out["arms"].append({"rule": rule, "rtol": rtol, "seconds": secs, "status": res.status.name,
                            "iterations_max": int(res.iterations.max()),
                            "iterations_mean": float(res.iterations.float().mean()),
                            "var_y_rel_excess_max": float(rel.max()), "var_y_rel_excess_min": float(rel.min()),
                            "std_rel_error_max": float(std_rel.abs().max()),
                            "within_rtol": bool((rel <= rtol).all())})
        _report(name, out["arms"][-1])
    return out


def _report(name: str, a: dict) -> None:
    its = f" CG its max {a['iterations_max']:4d} mean {a['iterations_mean']:6.1f}," if "iterations_max" in a else ""
    rtol = "default" if a["rtol"] is None else f"{a['rtol']:.0e}"
    print(f"  {name:10s} {a['rule']:15s} rtol {rtol}: {a['seconds']:6.2f} s,{its} var_y excess max "
          f"{a['var_y_rel_excess_max']:.2e}, std err max {a['std_rel_error_max']:.2e}", flush=True)


def run(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    payload = {"benchmark": "predictive_variance_stopping", "machine": C.machine_info(),
               "torch_threads": torch.get_num_threads(),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "render"},
               "datasets": []}
    for name in [s.strip() for s in args.datasets.split(",") if s.strip()]:
        if name not in WIDTH:
            raise SystemExit(f"unknown dataset {name!r}; choose from {sorted(WIDTH)}")
        payload["datasets"].append(run_dataset(name, args))
        C.write_json(args.out, payload)  # after each data set: an interrupted run keeps what it measured
    return payload


def render_markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = ["## Predictive variances: certified stopping", "",
             f"`benchmarks/predict_variance.py`: {s['kernel']} kernel, ARD hyperparameters fitted on the first "
             f"{s['fit_first']} points, n = {s['n']} training and m = {s['m']} test points, rank-{s['rank']} "
             f"pivoted-Cholesky CG, float64, {payload['torch_threads']} thread(s), "
             f"{payload['machine'].get('date_utc', '')[:10]}.  *excess*: the largest relative excess of the "
             "predictive variance of y over the dense Cholesky one (certified: guaranteed ≤ rtol); *std err*: "
             "the largest relative error of the standard deviation.", "",
             "| data | noise | rule | rtol | CG its max / mean | seconds | excess max | std err max | ≤ rtol |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ds in payload["datasets"]:
        for a in ds["arms"]:
            if a["rule"] not in ("residual", "certified"):
                continue
            lines.append(f"| {ds['dataset']} | {ds['noise']:.3g} | {a['rule']} | {a['rtol']:.0e} | "
                         f"{a['iterations_max']} / {a['iterations_mean']:.1f} | {a['seconds']:.2f} | "
                         f"{a['var_y_rel_excess_max']:.1e} | {a['std_rel_error_max']:.1e} | "
                         f"{'yes' if a['within_rtol'] else '**no**'} |")
    lines += gpytorch_markdown(payload["datasets"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = C.read_json(args.render) if args.render else run(args)
    if not args.render:
        C.write_json(args.out, payload)
        print(f"wrote {args.out}")
    if args.markdown:
        C.replace_markdown_section(args.markdown, "predict_variance", render_markdown(payload))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
