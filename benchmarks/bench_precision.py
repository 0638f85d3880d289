"""Mixed-precision BBMM: float32 vs bfloat16 vs float16 kernel products (issue 4).

For each UCI data set (``../shared/data/uci/<name>.npz``, a random ``--max-n`` subsample, 90/10
train/test split, standardised) and each product precision, one child process measures

* one MLL + gradient at the initial hyperparameters of ``ExactGP`` (Matérn-5/2 ARD): value, gradient
  norm, CG iterations (total and in low precision), which precision the columns finished in, time;
* ``ExactGP(method="iterative", dtype=float32, precision=...).fit`` with L-BFGS-B (``--fit-iter``
  steps): the fitted MLL under the policy's own estimator *and* re-evaluated under float32 at the
  fitted hyperparameters (same probes), test RMSE and NLL, fit time.

Products are float32 state + the policy's safeguards (rescaling, re-orthogonalisation, stagnation
detection, refinement, float32 fallback).  On CPU low precision is *emulated* (rounded operands,
float32 GEMM: numerically what tensor cores do, not faster), so CPU times measure the overheads;
the speed claim needs a GPU (``--device cuda``).

Writes ``benchmarks/results/precision_<device>.json`` and the ``precision_<device>`` section of
``docs/benchmarks.md``.  Example (smoke)::

    python benchmarks/bench_precision.py --datasets pol --max-n 600 --fit-iter 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    REPO_ROOT,
    fmt,
    guarded_worker,
    library_versions,
    machine_info,
    replace_markdown_section,
    run_child,
    synthetic_problem,
    write_json,
)

PRECISIONS = ("float32", "bfloat16", "float16")
DATASETS = ("pol", "elevators", "protein")


# ============================================================================== worker (child) side
def _data(spec):
    import numpy as np

    if spec["dataset"] == "synthetic":  # the GPU figure's n >= 200k (random Fourier-feature GP draw, d = 8)
        X, y = synthetic_problem(spec["max_n"], 8, seed=spec["seed"])
    else:
        with np.load(Path(spec["data_dir"]) / f"{spec['dataset']}.npz", allow_pickle=False) as f:
            X, y = f["X"].astype(np.float64), f["y"].astype(np.float64).reshape(-1)
        rng = np.random.default_rng(spec["seed"])
        idx = rng.permutation(X.shape[0])[: spec["max_n"]]
        X, y = X[idx], y[idx]
    n_test = max(1, len(y) // 10)
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def _mll_grad(Xtr, ytr, spec, policy):
    import torch

    import gpscale
    from gpscale.precond import PivotedCholesky

    dev = torch.device(spec.get("device", "cpu"))
    X = torch.as_tensor((Xtr - Xtr.mean(0)) / Xtr.std(0).clip(1e-12), dtype=torch.float32, device=dev)
    y = torch.as_tensor((ytr - ytr.mean()) / ytr.std(), dtype=torch.float32, device=dev)
    d = X.shape[1]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    budget = spec.get("memory_budget")
    walls = []
    # Timed ``repeats`` times; the last one counts.  The first call on a GPU also compiles (KeOps formulas,
    # NVRTC kernels) -- tens of seconds that only the float32 arm's fused products pay, which would flatter
    # the low-precision speed-up.
    for _ in range(max(1, int(spec.get("repeats", 1)))):
        k = gpscale.kernels.Matern(nu=2.5, lengthscale=torch.full((d,), math.sqrt(d)), outputscale=1.0).to(dev)
        noise = torch.tensor(spec.get("noise", 0.1), requires_grad=True, device=dev)
        sync()
        t0 = time.perf_counter()
        r = gpscale.mll_estimate(X, y, k, noise, method="iterative", seed=0, rtol=spec["rtol"], memory_budget=budget,
                                 preconditioner=PivotedCholesky(rank=spec["rank"]), precision=policy, warn=False)
        r.value.backward()
        sync()
        walls.append(time.perf_counter() - t0)
    wall = walls[-1]
    grads = [p.grad.reshape(-1) for p in k.parameters()] + [noise.grad.reshape(-1)]
    g = torch.cat([x.to(torch.float64) for x in grads])
    return {"mll": float(r.value.detach()), "grad": g.tolist(), "grad_norm": float(g.norm()), "seconds": wall,
            "seconds_all": walls, "cg": {k2: v for k2, v in r.stats.items() if k2 != "forward_seconds"},
            "products": _product_path(X, k, policy, budget)}


def _product_path(X, kernel, policy, budget):
    """Where the CG products of ``policy`` ran: a rounded 16-bit tile takes half the bytes, so at a
    budget between the two sizes the low-precision operator keeps the whole (upper-triangle) kernel
    cached -- each product is then one pass of 16-bit GEMMs -- while float32 recomputes every pair."""
    from gpscale import KernelOperator

    op = KernelOperator(X, kernel, noise=1.0, memory_budget=budget)
    low = op.with_product_dtype(policy.product)
    need = op.kernel_bytes(policy.product)
    return {"float32_backend": op.backend, "low_backend": low.backend, "cache_bytes": op.tiling.cache_bytes,
            "low_kernel_bytes": need, "low_cached": low.backend == "torch" and need <= op.tiling.cache_bytes}


def _fit(Xtr, ytr, Xte, yte, spec, policy):
    import numpy as np
    import torch

    import gpscale
    from gpscale.precond import PivotedCholesky

    gp = gpscale.ExactGP(kernel="matern52", method="iterative", dtype=torch.float32, max_iter=spec["fit_iter"],
                         rtol=spec["rtol"], preconditioner=PivotedCholesky(rank=spec["rank"]), precision=policy,
                         seed=spec.get("fit_seed", 0), optimizer=spec.get("optimizer", "lbfgs"),
                         memory_budget=spec.get("memory_budget"),
                         lr=spec.get("lr", 0.1))
    t0 = time.perf_counter()
    gp.fit(Xtr, ytr)
    fit_s = time.perf_counter() - t0
    mean, std = gp.predict(Xte, return_std=True)
    rmse = float(np.sqrt(np.mean((mean - yte) ** 2)))
    nll = float(np.mean(0.5 * np.log(2 * np.pi * std ** 2) + 0.5 * (yte - mean) ** 2 / std ** 2))
    # The fitted hyperparameters' MLL under one common estimator (float32 products, same probes).
    ref = gpscale.mll_estimate(gp.X_train_, gp.y_train_, gp.kernel_, gp.noise_, gp.mean_, method="iterative",
                               seed=0, rtol=1e-3, preconditioner=PivotedCholesky(rank=spec["rank"]), warn=False)
    rep = gp.report_
    return {"fit_seconds": fit_s, "fit_iterations": rep.iterations, "fit_mll_per_point_own": rep.mll_per_point,
            "fit_mll_per_point_f32": float(ref.value.detach()) / gp.X_train_.shape[0] - math.log(gp.scaler_.y_scale),
            "test_rmse": rmse, "test_nll": nll, "cg_failures": rep.cg_failures, "noise": rep.noise}


def worker(spec: dict) -> int:
    def body():
        import torch

        from gpscale import PrecisionPolicy

        torch.manual_seed(spec["seed"])
        Xtr, ytr, Xte, yte = _data(spec)
        corr = {"auto": "auto", "on": True, "off": False}[spec.get("lowrank_correction", "auto")]
        policy = PrecisionPolicy(spec["precision"], lowrank_correction=corr)
        out = {"n_train": int(len(ytr)), "n_test": int(len(yte)), "d": int(Xtr.shape[1]),
               "lowrank_correction": policy.resolved_lowrank_correction}
        out["mll_grad"] = _mll_grad(Xtr, ytr, spec, policy)
        if spec["fit_iter"] > 0:
            out["fit"] = _fit(Xtr, ytr, Xte, yte, spec, policy)
        return out

    return guarded_worker(dict(spec), body, threads=spec.get("threads"))


# ============================================================================== parent side
def _finished(by_precision) -> str:
    """``{"bfloat16": 7, "float32": 1}`` -> ``bfloat16: 7, float32: 1`` (columns finishing in each)."""
    if not isinstance(by_precision, dict):
        return "—" if by_precision is None else str(by_precision)
    return ", ".join(f"{k}: {v}" for k, v in by_precision.items())


def _label(r: dict) -> str:
    """The product precision, plus the fit's probe seed when it is not the default 0."""
    return r["precision"] + (f" (fit seed {r['fit_seed']})" if r.get("fit_seed") else "")


def section_name(args) -> str:
    """The results file's stem and the docs section: ``precision_<device>``, ``_adam`` for Adam fits."""
    return f"precision_{args.device}" + ("" if args.optimizer == "lbfgs" else f"_{args.optimizer}")


def doc_args(doc: dict) -> argparse.Namespace:
    """A saved run's arguments (runs before ``--optimizer`` existed were L-BFGS-B)."""
    return argparse.Namespace(**{"optimizer": "lbfgs", "lr": 0.1, **doc["config"]})


def _markdown(results: list[dict], args) -> str:
    rows = ["| data | n | product | MLL | rel. to f32 | ‖grad‖ | CG its (low) | finished in | MLL+grad s "
            "| fit MLL/pt (f32 est.) | rel. | RMSE | rel. | NLL | fit s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["dataset"]: r for r in results
            if r["precision"] == "float32" and r.get("status") == "ok" and not r.get("fit_seed")}
    for r in results:
        if r.get("status") != "ok":
            rows.append(f"| {r['dataset']} | — | {r['precision']} | failed: {r.get('error', '')[:60]} |"
                        + " |" * 11)
            continue
        b, m, f = base.get(r["dataset"]), r["mll_grad"], r.get("fit", {})
        rel = (lambda a, key: abs(a - key) / abs(key) if key else None)
        cg = m["cg"]
        rows.append(
            f"| {r['dataset']} | {r['n_train']} | {_label(r)} | {fmt(m['mll'], '.2f')} | "
            f"{fmt(rel(m['mll'], b['mll_grad']['mll']) if b else None, '.1e')} | {fmt(m['grad_norm'])} | "
            f"{cg.get('iterations_max')} ({cg.get('low_precision_iterations_max', '—')}) | "
            f"{_finished(cg.get('finished_precision'))} | {fmt(m['seconds'], '.2f')} | "
            f"{fmt(f.get('fit_mll_per_point_f32'), '.4f')} | "
            f"{fmt(rel(f['fit_mll_per_point_f32'], b['fit']['fit_mll_per_point_f32']) if f and b and 'fit' in b else None, '.1e')} | "
            f"{fmt(f.get('test_rmse'), '.4f')} | "
            f"{fmt(rel(f['test_rmse'], b['fit']['test_rmse']) if f and b and 'fit' in b else None, '.1e')} | "
            f"{fmt(f.get('test_nll'), '.3f')} | {fmt(f.get('fit_seconds'), '.1f')} |")
    opt = args.optimizer
    flags = "" if opt == "lbfgs" else f" --optimizer {opt} --lr {args.lr:g}"
    title = "" if opt == "lbfgs" else f", {opt} fits"
    head = (f"## Mixed-precision CG ({args.device}{title})\n\n`python benchmarks/bench_precision.py --max-n "
            f"{args.max_n} --fit-iter {args.fit_iter}{flags}`: Matérn-5/2 ARD, float32 CG state, rtol {args.rtol}, "
            f"pivoted-Cholesky rank {args.rank}.  On CPU the 16-bit products are emulated (exact rounding, float32 GEMM), so "
            "the times show overheads, not the tensor-core speed-up.  Done-when: |fit MLL rel.| ≤ 1e-2 and "
            "|RMSE rel.| ≤ 1e-2 for the low-precision rows.\n\n")
    return head + "\n".join(rows) + "\n" + _multistart_markdown(results) + _spread_markdown(results)


def best_of_seeds(results: list[dict]) -> dict:
    """Multi-start selection: per (data set, precision) the fit with the highest MLL under its own estimator.

    Each policy chooses among its own restarts (fit probe seeds) by its own objective, as a user
    would, so the comparison is of the optima the policies reach, not of one chaotic trajectory
    each.  Returns ``{(dataset, precision): (chosen record, seeds tried)}``.
    """
    return {key: (max(rs, key=lambda r: r["fit"]["fit_mll_per_point_own"]), [r.get("fit_seed", 0) for r in rs])
            for key, rs in _fits_by_policy(results).items()}


def _fits_by_policy(results: list[dict]) -> dict:
    """The successful fits grouped by (data set, precision), in the order of ``results``."""
    groups: dict = {}
    for r in results:
        if r.get("status") == "ok" and r.get("fit"):
            groups.setdefault((r["dataset"], r["precision"]), []).append(r)
    return groups


def _multistart_markdown(results: list[dict]) -> str:
    best = best_of_seeds(results)
    if not any(len(seeds) > 1 for _, seeds in best.values()):
        return ""
    rows = [("| data | product | fit seeds | chosen | fit MLL/pt (own) | fit MLL/pt (f32 est.) | rel. | RMSE | rel. "
             "| NLL | noise |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, prec), (r, seeds) in best.items():
        f, b = r["fit"], best.get((ds, "float32"), (None,))[0]

        def rel(key, f=f, bf=b["fit"] if b else None):
            return abs(f[key] - bf[key]) / abs(bf[key]) if bf else None

        rows.append(f"| {ds} | {prec} | {','.join(map(str, sorted(seeds)))} | {r.get('fit_seed', 0)} | "
                    f"{fmt(f['fit_mll_per_point_own'], '.4f')} | {fmt(f['fit_mll_per_point_f32'], '.4f')} | "
                    f"{fmt(rel('fit_mll_per_point_f32'), '.1e')} | {fmt(f['test_rmse'], '.4f')} | "
                    f"{fmt(rel('test_rmse'), '.1e')} | {fmt(f['test_nll'], '.3f')} | {fmt(f.get('noise'), '.4f')} |")
    return ("\n**Multi-start** (`--merge` of runs with several `--fit-seed`s): per precision the fit with the "
            "highest MLL under its own estimator; relative columns against float32's chosen fit.\n\n"
            + "\n".join(rows) + "\n")


def seed_summary(results: list[dict]) -> dict:
    """Per (data set, precision): mean and relative range over the fit seeds of RMSE and fitted MLL.

    The range of float32's own fits is the protocol's noise floor: a precision difference smaller
    than it cannot be told from the fitting noise.  Returns ``{(dataset, precision): summary}``.
    """
    out = {}
    for key, rs in _fits_by_policy(results).items():
        summ = {"seeds": sorted(r.get("fit_seed", 0) for r in rs)}
        for name, field in (("rmse", "test_rmse"), ("mll", "fit_mll_per_point_f32")):
            vals = [r["fit"][field] for r in rs]
            mean = sum(vals) / len(vals)
            summ[name] = mean
            summ[name + "_range"] = (max(vals) - min(vals)) / abs(mean) if mean else math.nan
        out[key] = summ
    return out


def _spread_markdown(results: list[dict]) -> str:
    summ = seed_summary(results)
    if not any(len(s["seeds"]) > 1 for s in summ.values()):
        return ""
    rows = ["| data | product | fit seeds | mean fit MLL/pt (f32 est.) | range | rel. to f32 | mean RMSE | range "
            "| rel. to f32 |", "|---|---|---|---|---|---|---|---|---|"]
    for (ds, prec), sm in summ.items():
        b = summ.get((ds, "float32"))

        def rel(key, sm=sm, b=b):
            return abs(sm[key] - b[key]) / abs(b[key]) if b and b[key] else None

        rows.append(f"| {ds} | {prec} | {','.join(map(str, sm['seeds']))} | {fmt(sm['mll'], '.4f')} | "
                    f"{fmt(sm['mll_range'], '.1e')} | {fmt(rel('mll'), '.1e')} | {fmt(sm['rmse'], '.4f')} | "
                    f"{fmt(sm['rmse_range'], '.1e')} | {fmt(rel('rmse'), '.1e')} |")
    return ("\n**Over fit seeds**: mean over the seeds and the relative range (max - min) / mean; float32's own "
            "range is the protocol's noise floor.\n\n" + "\n".join(rows) + "\n")


def merge(paths: list[str]) -> dict:
    """One result document from several runs' JSON (later files win for a repeated (data, precision, seed))."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    opts = {doc_args(d).optimizer for d in docs}
    if len(opts) > 1:
        raise ValueError(f"--merge: the runs used different optimizers {sorted(opts)}; merge the runs of one "
                         "optimizer at a time (each has its own results file and docs section)")
    keyed = {}
    for doc in docs:
        for r in doc["results"]:
            keyed[(r["dataset"], r["precision"], r.get("fit_seed", 0))] = r
    runs = [x for doc in docs for x in doc.get("runs", [])]
    return {**docs[0], "results": sorted(keyed.values(), key=lambda r: (r["dataset"], r.get("fit_seed", 0))),
            "runs": runs, "merged_from": [str(p) for p in paths]}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS),
                    help="UCI names, or 'synthetic' (generated, d = 8, n = --max-n: the GPU figure at n >= 200k)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument("--max-n", type=int, default=5000, help="subsample size (train + test)")
    ap.add_argument("--fit-iter", type=int, default=30, help="optimiser steps of ExactGP.fit (0: skip the fit)")
    ap.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs",
                    help="ExactGP's optimizer; adam (fresh probes every step) is the protocol whose endpoints do "
                         "not depend on the probe seed (docs/benchmarks.md)")
    ap.add_argument("--lr", type=float, default=0.1, help="Adam's learning rate")
    ap.add_argument("--rtol", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1,
                    help="time the MLL + gradient this many times and report the last (GPU: 2, so compilation "
                         "in the first call is not counted)")
    ap.add_argument("--noise", type=float, default=0.1,
                    help="noise variance (standardised y) of the MLL + gradient measurement; 16-bit products "
                         "hold only while ||A^-1 E|| << 1, which grows like n^0.6-0.9 / noise "
                         "(benchmarks/lowp_perturbation.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-seed", type=int, default=0,
                    help="probe seed of ExactGP.fit (other values give the run-to-run spread of one precision)")
    ap.add_argument("--lowrank-correction", choices=("auto", "on", "off"), default="auto",
                    help="PrecisionPolicy.lowrank_correction: round K - LL^T instead of K (auto: fp16/tf32 only)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="bytes per kernel operator (default gpscale's 1 GiB); on a GPU, a budget that holds the "
                         "16-bit upper-triangle kernel (n^2 bytes) but not float32's lets low precision cache it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--timeout", type=float, default=7200.0, help="per child, seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="re-render the Markdown section from a saved JSON and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="merge saved runs (e.g. several --fit-seed) into --out, render, and exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.merge:
        doc = merge(args.merge)
        out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / f"{section_name(doc_args(doc))}.json"
        write_json(out, doc)
        args.render = str(out)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        run_args = doc_args(saved)
        replace_markdown_section(args.markdown, section_name(run_args), _markdown(saved["results"], run_args))
        return 0
    results = []
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / f"{section_name(args)}.json"
    machine, versions = machine_info(), library_versions()
    for ds in args.datasets:
        for prec in args.precisions:
            spec = {"dataset": ds, "precision": prec, "max_n": args.max_n, "fit_iter": args.fit_iter,
                    "fit_seed": args.fit_seed, "optimizer": args.optimizer, "lr": args.lr,
                    "rtol": args.rtol, "rank": args.rank, "seed": args.seed, "noise": args.noise, "repeats": args.repeats,
                    "lowrank_correction": args.lowrank_correction, "threads": args.threads,
                    "data_dir": args.data_dir, "device": args.device,
                    "memory_budget": None if args.memory_budget is None else int(args.memory_budget)}
            t0 = time.perf_counter()
            rec = run_child([sys.executable, __file__, "--worker", json.dumps(spec)], timeout=args.timeout)
            rec.update(dataset=ds, precision=prec, fit_seed=args.fit_seed)
            results.append(rec)
            # after every child: a run cut short by a time limit keeps the figures it has
            write_json(out, {"config": vars(args), "machine": machine, "versions": versions, "results": results})
            print(f"{ds:10s} {prec:9s} {rec.get('status')} {time.perf_counter() - t0:7.1f}s "
                  f"mll={rec.get('mll_grad', {}).get('mll')} rmse={rec.get('fit', {}).get('test_rmse')}", flush=True)
    if not args.no_markdown:
        replace_markdown_section(args.markdown, section_name(args), _markdown(results, args))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
