#!/usr/bin/env python
"""Where does gpscale's iterative MLL become faster than its dense Cholesky MLL?

For each kernel and n, times one marginal log-likelihood forward + backward with
``method="cholesky"`` and with ``method="iterative"`` (rtol 1e-2, 10 probes, the default
preconditioner) in float64, and reports the crossover n above which the iterative path is faster.
``gpscale.likelihood.api.CHOLESKY_CROSSOVER`` (the ``method="auto"`` switch) is set from this.

Runs in one process (timings only; each measurement's peak RSS is taken by resetting the
process's high-water mark before it, where Linux allows).

Examples
--------
Full run (results committed in benchmarks/results/crossover.json)::

    python benchmarks/crossover.py --out benchmarks/results/crossover.json --markdown docs/benchmarks.md

At hyperparameters fitted to the data (an ARD Cholesky fit on its first 2000 points; real fits are
often far worse conditioned than the fixed defaults)::

    python benchmarks/crossover.py --fit-first 2000 --kernels rbf --sizes 1500,2500,4000 --repeats 2 \
        --out benchmarks/results/crossover_fitted_kin40k.json

Smoke test::

    python benchmarks/crossover.py --sizes 500,1000,2000 --repeats 1 --out /tmp/crossover.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("cholesky", "iterative")


def fit_hypers(X, y, kernel_name, m) -> dict:
    """Hyperparameters of an ARD ``ExactGP`` Cholesky fit (30 L-BFGS-B steps) on the first ``m`` points."""
    import gpscale

    gp = gpscale.ExactGP(kernel=kernel_name, method="cholesky", max_iter=30).fit(X[:m], y[:m])
    ls, s = (v.detach() for v in gp.kernel_.hyper_values(X.dtype, X.device))
    return {"kernel": gp.kernel_, "noise": float(gp.noise_), "mean": float(gp.mean_),
            "lengthscale": [float(v) for v in ls.reshape(-1)], "outputscale": float(s)}


def time_one(X, y, kernel_name, method, args, hypers=None) -> dict:
    import torch

    import gpscale
    from gpscale.kernels import make_kernel

    if hypers is not None:
        kernel = copy.deepcopy(hypers["kernel"]).to(X.dtype)
        noise = torch.tensor(hypers["noise"], dtype=X.dtype, requires_grad=True)
    else:
        kernel = make_kernel(kernel_name, lengthscale=args.lengthscale, outputscale=args.outputscale).to(X.dtype)
        noise = torch.tensor(args.noise, dtype=X.dtype, requires_grad=True)
    kw = {}
    if method == "iterative":
        kw = dict(rtol=args.rtol, num_probes=args.num_probes, seed=args.seed)
        if args.rank is not None:
            kw["preconditioner"] = gpscale.precond.PivotedCholesky(rank=args.rank)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        r = gpscale.mll_estimate(X, y, kernel, noise=noise, mean=hypers["mean"] if hypers else 0.0, method=method,
                                 **kw)
        t1 = time.perf_counter()
        r.value.backward()
        t2 = time.perf_counter()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0, "mll": float(r.value.detach()),
            "cg_iterations": r.stats.get("iterations_max"), "cg_status": r.stats.get("status") if method == "iterative" else None,
            "preconditioner_rank": r.stats.get("preconditioner_rank"),
            "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in rec})}


def measure(X, y, kernel_name, method, args, hypers=None) -> dict:
    rec = {"kernel": kernel_name, "method": method, "n": int(X.shape[0]), "status": "failed"}
    try:
        runs, peaks = [], []
        for _ in range(args.repeats):
            gc.collect()
            can_reset = C.reset_peak_rss()
            base = C.current_rss_gb()
            runs.append(time_one(X, y, kernel_name, method, args, hypers))
            if can_reset:
                peaks.append(C.peak_rss_gb() - base)
        C.aggregate_times(rec, runs, args.stat)
        rec["time_statistic"] = args.stat
        # approximate: memory freed earlier but kept by the allocator is already in the baseline
        rec["extra_peak_rss_gb"] = max(0.0, max(peaks)) if peaks else None
        rec["status"] = "ok"
    except (MemoryError, RuntimeError, ValueError) as exc:
        rec.update(reason="oom" if C.is_oom_error(exc) else "error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return rec


def find_crossover(records, kernel_name) -> dict:
    """Smallest n from which the iterative path is faster at every larger measured n, interpolated.

    Interpolates log(t_iter / t_chol) linearly in log n between the last grid point where Cholesky
    wins and the first where iterative wins (and keeps winning).
    """
    by = {}
    for r in records:
        if r["kernel"] == kernel_name and r["status"] == "ok":
            by.setdefault(r["n"], {})[r["method"]] = r["total_s"]
    pts = sorted((n, math.log(v["iterative"] / v["cholesky"])) for n, v in by.items() if len(v) == 2)
    if not pts:
        return {"kernel": kernel_name, "crossover_n": None, "note": "no complete pairs"}
    ratios = {n: math.exp(lr) for n, lr in pts}
    # first index from which every later point has iterative faster (log ratio < 0)
    k = len(pts)
    while k > 0 and pts[k - 1][1] < 0:
        k -= 1
    if k == len(pts):
        return {"kernel": kernel_name, "crossover_n": None, "first_grid_n": None, "ratios": ratios,
                "note": f"iterative not faster at the largest n measured ({pts[-1][0]}: iterative / Cholesky "
                        f"{ratios[pts[-1][0]]:.2f})"}
    if k == 0:
        return {"kernel": kernel_name, "crossover_n": pts[0][0], "first_grid_n": pts[0][0], "ratios": ratios,
                "note": f"iterative already faster at the smallest n measured ({pts[0][0]})"}
    (n0, l0), (n1, l1) = pts[k - 1], pts[k]
    x = math.log(n0) + (0 - l0) * (math.log(n1) - math.log(n0)) / (l1 - l0)
    return {"kernel": kernel_name, "crossover_n": int(round(math.exp(x))), "first_grid_n": n1,
            "last_cholesky_faster_n": n0, "ratios": ratios}


def render_markdown(payload) -> str:
    st, m = payload["settings"], payload["machine"]
    lines = [
        "## Cholesky vs iterative crossover (gpscale, CPU)",
        "",
        f"One MLL forward + backward in float64, d = {st['d']}, lengthscale {st['lengthscale']}, outputscale "
        f"{st['outputscale']}, noise {st['noise']}: `method=\"cholesky\"` vs `method=\"iterative\"` (rtol {st['rtol']}, "
        f"{st['num_probes']} probes, preconditioner "
        f"{'PivotedCholesky(rank=%d)' % st['rank'] if st['rank'] is not None else 'default (PivotedCholesky(rank=100))'}). "
        f"{st.get('stat', 'median').capitalize()} of {st['repeats']} run(s). Extra peak RSS = the step's high-water mark above the RSS before it.",
        "",
        f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpu_count')} logical CPUs, torch "
        f"{m.get('torch_version')}, {payload.get('torch_threads')} threads; {m.get('date_utc')}; load average at start "
        f"{', '.join(f'{v:.1f}' for v in m.get('loadavg_at_start') or [])}. Command: `{m.get('command')}`",
        "",
        "| kernel | n | data | Cholesky s | iterative s | iterative / Cholesky | CG iters | Cholesky extra RSS GB "
        "| iterative extra RSS GB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {}
    for r in payload["records"]:
        by.setdefault((r["kernel"], r["n"]), {})[r["method"]] = r
    for (kern, n), v in sorted(by.items()):
        c, i = v.get("cholesky", {}), v.get("iterative", {})
        ct = c.get("total_s") if c.get("status") == "ok" else None
        it = i.get("total_s") if i.get("status") == "ok" else None
        ratio = it / ct if ct and it else None
        src = payload.get("data", {}).get(str(n), {}).get("source", "—")
        lines.append(f"| {kern} | {n} | {src} | {C.fmt(ct, '.3f', c.get('reason', '—'))} | "
                     f"{C.fmt(it, '.3f', i.get('reason', '—'))} | {C.fmt(ratio, '.2f')} | "
                     f"{C.fmt(i.get('cg_iterations'), 'd')} | {C.fmt(c.get('extra_peak_rss_gb'), '.2f')} | "
                     f"{C.fmt(i.get('extra_peak_rss_gb'), '.2f')} |")
    lines.append("")
    for x in payload["crossover"]:
        if x.get("crossover_n") is not None and x.get("last_cholesky_faster_n") is not None:
            lines.append(f"- {x['kernel']}: iterative faster from n ≈ {x['crossover_n']} (Cholesky faster at "
                         f"{x['last_cholesky_faster_n']}, iterative at {x['first_grid_n']} and above).")
        else:
            lines.append(f"- {x['kernel']}: {x.get('note')}.")
    if payload.get("suggested_cholesky_crossover") is not None:
        bound = (" — an upper bound: iterative was already faster at the smallest n measured for some kernel"
                 if payload.get("suggestion_is_upper_bound") else "")
        lines.append(f"- Suggested `CHOLESKY_CROSSOVER`: {payload['suggested_cholesky_crossover']} "
                     f"(smallest per-kernel crossover, rounded down to a multiple of 100){bound}.")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,200,300,500,750,1000,1500,2000,2500,3000,4000,5000")
    p.add_argument("--kernels", default="rbf,matern52")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stat", default="min", choices=("min", "median"),
                   help="time statistic over the repeats (min is robust to other load on the machine)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--lengthscale", type=float, default=1.0)
    p.add_argument("--outputscale", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--rtol", type=float, default=1e-2)
    p.add_argument("--num-probes", type=int, default=10)
    p.add_argument("--rank", type=int, default=None, help="pivoted-Cholesky rank (default: mll_estimate's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-first", type=int, default=None, metavar="M",
                   help="time at the hyperparameters of an ARD Cholesky fit on the first M points of the data "
                        "(instead of --lengthscale/--outputscale/--noise)")
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--data-dir", type=Path, default=C.DEFAULT_DATA_DIR)
    p.add_argument("--dataset", default="kin40k")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--memory-limit-gb", type=float, default=20.0, help="RLIMIT_AS of this process (0: none)")
    p.add_argument("--out", default=str(C.REPO_ROOT / "benchmarks" / "results" / "crossover.json"))
    p.add_argument("--markdown", default=None)
    p.add_argument("--render", default=None, metavar="JSON", help="only render --markdown from this results file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        payload = C.read_json(args.render)
    else:
        payload = run(args)
    if args.markdown:
        C.replace_markdown_section(args.markdown, "crossover", render_markdown(payload))
        print(f"wrote {args.markdown}")
    return 0


def run(args) -> dict:
    C.set_memory_limit(args.memory_limit_gb)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    payload = {"benchmark": "cholesky_vs_iterative_crossover", "machine": C.machine_info(),
               "torch_threads": torch.get_num_threads(),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "render"},
               "records": [], "data": {}, "crossover": []}
    print(f"crossover: sizes {sizes}, kernels {kernels}, {args.dtype}, {args.repeats} repeat(s), "
          f"{torch.get_num_threads()} threads", flush=True)
    problems = {}
    for n in sizes:
        X, y, info = C.load_problem(n, args.d, data_dir=args.data_dir, dataset=args.dataset, synthetic=args.synthetic,
                                    seed=args.seed, lengthscale=args.lengthscale, outputscale=args.outputscale,
                                    noise=args.noise)
        problems[n] = (torch.as_tensor(X, dtype=dtype), torch.as_tensor(y, dtype=dtype))
        payload["data"][str(n)] = info
    # warm-up: thread pools, lazy initialisation
    Xw, yw = problems[sizes[0]]
    for kern in kernels:
        for method in METHODS:
            time_one(Xw[:300], yw[:300], kern, method, args)
    for kern in kernels:
        hypers = None
        if args.fit_first:
            hypers = fit_hypers(*problems[max(sizes)], kern, args.fit_first)
            payload.setdefault("fitted", {})[kern] = {k: v for k, v in hypers.items() if k != "kernel"}
            print(f"  {kern}: fitted on {args.fit_first} points: noise {hypers['noise']:.3g}, outputscale "
                  f"{hypers['outputscale']:.3g}", flush=True)
        for n in sizes:
            X, y = problems[n]
            row = {}
            for method in METHODS:
                rec = measure(X, y, kern, method, args, hypers)
                payload["records"].append(rec)
                row[method] = rec
            c, i = row["cholesky"], row["iterative"]
            ct = c.get("total_s") if c["status"] == "ok" else None
            it = i.get("total_s") if i["status"] == "ok" else None
            print(f"  {kern:<9} n={n:>6}  cholesky {C.fmt(ct, '8.3f', c.get('error', 'failed')[:60]):>8}s  "
                  f"iterative {C.fmt(it, '8.3f', i.get('error', 'failed')[:60]):>8}s  "
                  f"ratio {C.fmt(it / ct if ct and it else None, '.2f')}  CG iters {i.get('cg_iterations')}  "
                  f"extra RSS chol {C.fmt(c.get('extra_peak_rss_gb'), '.2f')} GB / iter "
                  f"{C.fmt(i.get('extra_peak_rss_gb'), '.2f')} GB", flush=True)
            if args.out:
                C.write_json(args.out, payload)
        x = find_crossover(payload["records"], kern)
        payload["crossover"].append(x)
        print(f"  -> {kern}: crossover n ≈ {x.get('crossover_n')} {('(' + x['note'] + ')') if x.get('note') else ''}",
              flush=True)
    found = [x["crossover_n"] for x in payload["crossover"] if x.get("crossover_n") is not None]
    payload["suggested_cholesky_crossover"] = (int(min(found) // 100 * 100) if found else None)
    payload["suggestion_is_upper_bound"] = any(x.get("crossover_n") is not None and x.get("last_cholesky_faster_n")
                                               is None for x in payload["crossover"])
    print(f"suggested CHOLESKY_CROSSOVER = {payload['suggested_cholesky_crossover']}"
          f"{' (upper bound)' if payload['suggestion_is_upper_bound'] else ''}", flush=True)
    payload["machine"]["loadavg_at_end"] = list(__import__("os").getloadavg())
    if args.out:
        C.write_json(args.out, payload)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    sys.exit(main())
