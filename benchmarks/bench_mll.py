#!/usr/bin/env python
"""One exact-GP marginal log-likelihood forward + backward: gpscale vs GPyTorch on CPU.

Both libraries run in the same invocation, on the same data and with the same algorithm and
settings (BBMM: batched preconditioned CG with Lanczos log-det, RBF kernel, d = 8, rtol 0.01,
10 probes, pivoted-Cholesky preconditioner of rank 15).  For every ``(library, n)`` the script starts
a fresh child process (``--worker``) so that the child's peak RSS is the memory of that one
measurement; a child that runs out of memory (``--memory-limit-gb`` is applied as RLIMIT_AS), dies
or times out is recorded as failed and the benchmark goes on.

Where a dense Cholesky fits (``n <= --cholesky-max``) an exact float64 reference (log-det, MLL and
the gradient w.r.t. lengthscale, outputscale and noise) is computed, in its own child, and each
library's estimate is compared with it.

Examples
--------
Full CPU run (results committed in benchmarks/results/mll_cpu.json and docs/benchmarks.md)::

    python benchmarks/bench_mll.py --sizes 5000,10000,20000,40000,100000 \
        --out benchmarks/results/mll_cpu.json --markdown docs/benchmarks.md

Quick smoke test::

    python benchmarks/bench_mll.py --sizes 2000,4000 --out /tmp/mll.json --markdown /tmp/bench.md

Re-render the Markdown table from an existing JSON file::

    python benchmarks/bench_mll.py --render benchmarks/results/mll_cpu.json --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LIBRARIES = ("gpscale", "gpytorch")
KERNELS = ("rbf", "matern32", "matern52")


from _mll_arms import ARMS, gpytorch_settings, run_reference, run_reference_gpscale  # noqa: E402
from _mll_report import REFERENCE, ratio_line, render_markdown  # noqa: E402


def worker_main(spec: dict) -> int:
    """Child process: one (library, n) measurement; prints a tagged JSON record, never raises."""
    C.set_memory_limit(spec.get("memory_limit_gb"))
    record = {"library": spec["library"], "n": spec["n"], "status": "failed"}
    try:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        record["torch_threads"] = torch.get_num_threads()
        Xn, yn, info = C.load_problem(spec["n"], spec["d"], data_dir=spec["data_dir"], dataset=spec["dataset"],
                                      synthetic=spec["synthetic"], seed=spec["seed"],
                                      lengthscale=spec["lengthscale"], outputscale=spec["outputscale"],
                                      noise=spec["noise"])
        record["data"] = info
        record["data_digest"] = C.array_digest(Xn, yn)
        if spec["library"] == REFERENCE:
            fn = run_reference_gpscale if spec.get("reference") == "gpscale" else run_reference
            dtype = torch.float64
        else:
            fn = ARMS[spec["library"]]
            dtype = getattr(torch, spec["dtype"])
        record["dtype"] = str(dtype).replace("torch.", "")
        X = torch.as_tensor(Xn, dtype=dtype)
        y = torch.as_tensor(yn, dtype=dtype)
        del Xn, yn
        wn = min(int(spec.get("warmup", 0) or 0), X.shape[0])
        if wn > 0 and spec["library"] != REFERENCE:
            fn(X[:wn].clone(), y[:wn].clone(), spec)  # first-call overheads (thread pools, lazy init, JIT)
        gc.collect()
        record["rss_before_gb"] = C.current_rss_gb()
        record["peak_rss_before_gb"] = C.peak_rss_gb()
        _time_runs(fn, X, y, spec, record)
        record["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - the parent must always get a record
        _record_failure(exc, spec, record)
    C.emit_result(record)
    return 0


def _time_runs(fn, X, y, spec: dict, record: dict) -> None:
    """``spec["repeats"]`` timed runs of ``fn``: the last run's figures, and each time's median (or min) and list."""
    runs = []
    for _ in range(max(1, int(spec.get("repeats", 1)))):
        gc.collect()
        runs.append(fn(X, y, spec))
    record["peak_rss_gb"] = C.peak_rss_gb()
    record["ru_maxrss_gb"] = C.ru_maxrss_gb()
    C.aggregate_times(record, runs, spec.get("stat"))


def _record_failure(exc: BaseException, spec: dict, record: dict) -> None:
    """What went wrong, in the record the parent reads: out of memory (with the request) or the error."""
    import re
    import traceback

    oom = C.is_oom_error(exc)
    m = re.search(r"tried to allocate (\d+) bytes", str(exc))
    what = f", tried to allocate {int(m.group(1)) / C.GIB:.2f} GB" if m else ""
    record.update(status="failed", reason="oom" if oom else "error",
                  error=(f"out of memory (address-space limit {spec.get('memory_limit_gb')} GB{what}); " if oom
                         else "") + f"{type(exc).__name__}: {str(exc)[:500]}",
                  traceback=traceback.format_exc()[-3000:])
    try:
        record["peak_rss_gb"] = C.peak_rss_gb()
    except Exception:  # noqa: BLE001
        pass


# ============================================================================== parent side
def _rel(a, b):
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-300)


def _grad_rel(g, g_ref):
    if not g or not g_ref or any(g.get(k) is None for k in g_ref):
        return None
    num = math.sqrt(sum((g[k] - g_ref[k]) ** 2 for k in g_ref))
    den = math.sqrt(sum(g_ref[k] ** 2 for k in g_ref))
    return num / max(den, 1e-300)


def add_errors(records: list[dict]) -> None:
    """Attach errors against the exact reference of the same n (and the same data digest)."""
    refs = {r["n"]: r for r in records if r["library"] == REFERENCE and r["status"] == "ok"}
    for r in records:
        ref = refs.get(r["n"])
        if r["library"] == REFERENCE or r["status"] != "ok" or ref is None:
            continue
        if ref.get("data_digest") != r.get("data_digest"):
            r["error_vs_reference"] = "data mismatch"
            continue
        r["mll_rel_err"] = _rel(r.get("mll"), ref["mll"])
        r["logdet_rel_err"] = _rel(r.get("logdet"), ref["logdet"])
        r["quad_rel_err"] = _rel(r.get("quad"), ref["quad"])
        r["grad_rel_err"] = _grad_rel(r.get("grad"), ref["grad"])
        r["grad_component_rel_err"] = {k: _rel(r["grad"].get(k), v) for k, v in ref["grad"].items()}


def _spec(args, library: str, n: int) -> dict:
    return {"library": library, "n": n, "d": args.d, "data_dir": str(args.data_dir), "dataset": args.dataset,
            "synthetic": args.synthetic, "seed": args.seed, "dtype": args.dtype, "kernel": args.kernel,
            "lengthscale": args.lengthscale, "outputscale": args.outputscale, "noise": args.noise,
            "rtol": args.rtol, "num_probes": args.num_probes, "rank": args.rank, "max_iter": args.max_iter,
            "lanczos_iters": args.lanczos_iters, "repeats": args.repeats, "stat": args.stat, "warmup": args.warmup,
            "memory_limit_gb": args.memory_limit_gb, "threads": args.threads, "reference": args.reference,
            "gpscale_memory_budget_mb": args.gpscale_memory_budget_mb}


def _progress(r: dict) -> str:
    head = f"  n={r['n']:>7} {r['library']:<13}"
    if r["status"] != "ok":
        return f"{head} FAILED ({r.get('error', '?')[:160]})  peak RSS {C.fmt(r.get('peak_rss_gb'), '.2f')} GB"
    s = (f"{head} fwd {r['forward_s']:8.2f}s  bwd {r['backward_s']:7.2f}s  total {r['total_s']:8.2f}s  "
         f"peak RSS {r['peak_rss_gb']:6.2f} GB  MLL/n {r['mll_per_point']:+.5f}")
    if r.get("cg_iterations") is not None:
        s += f"  CG iters {r['cg_iterations']}"
    if r.get("warnings"):
        s += f"  [{len(r['warnings'])} warning(s): {r['warnings'][0][:80]}]"
    return s


def _errors_line(r: dict) -> str:
    return (f"  n={r['n']:>7} {r['library']:<13} vs exact: MLL rel err {C.fmt(r.get('mll_rel_err'), '.2e')}, "
            f"log-det rel err {C.fmt(r.get('logdet_rel_err'), '.2e')}, grad rel err "
            f"{C.fmt(r.get('grad_rel_err'), '.2e')}")


def run(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    for lib in libraries:
        if lib not in LIBRARIES:
            raise SystemExit(f"unknown library {lib!r}; choose from {LIBRARIES}")
    payload = {"benchmark": "mll_forward_backward", "machine": C.machine_info(),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("worker", "render")},
               "gpytorch_settings_note": gpytorch_settings.__doc__, "records": []}
    script = str(Path(__file__).resolve())
    print(f"bench_mll: sizes {sizes}, libraries {libraries}, {args.dtype}, kernel {args.kernel} "
          f"(lengthscale {args.lengthscale}, outputscale {args.outputscale}, noise {args.noise}), rtol {args.rtol}, "
          f"{args.num_probes} probes, pivoted Cholesky rank {args.rank}; exact reference for n <= {args.cholesky_max}; "
          f"memory limit {args.memory_limit_gb} GB per child", flush=True)
    for n in sizes:
        libs = ([REFERENCE] if n <= args.cholesky_max else []) + libraries
        for lib in libs:
            t0 = time.perf_counter()
            rec = C.run_child([sys.executable, script, "--worker", json.dumps(_spec(args, lib, n))],
                              timeout=args.timeout)
            rec.setdefault("library", lib)
            rec.setdefault("n", n)
            payload["records"].append(rec)
            print(_progress(rec) + f"  ({time.perf_counter() - t0:.0f}s wall incl. start-up)", flush=True)
            add_errors(payload["records"])
            if args.out:
                C.write_json(args.out, payload)
        for r in payload["records"]:
            if r["n"] == n and r["library"] != REFERENCE and "mll_rel_err" in r:
                print(_errors_line(r), flush=True)
        line = ratio_line(payload["records"], n)
        if line:
            print("  " + line, flush=True)
    payload["machine"]["loadavg_at_end"] = list(__import__("os").getloadavg())
    if args.out:
        C.write_json(args.out, payload)
        print(f"wrote {args.out}")
    return payload


# ============================================================================== rendering
# ============================================================================== CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="5000,10000,20000,40000,100000", help="comma-separated n")
    p.add_argument("--libraries", default="gpscale,gpytorch", help="comma-separated subset of gpscale,gpytorch")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (median reported)")
    p.add_argument("--stat", default="median", choices=("median", "min"), help="time statistic over --repeats")
    p.add_argument("--warmup", type=int, default=500, help="untimed warm-up run at this n in each child (0: none)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--kernel", default="rbf", choices=KERNELS)
    p.add_argument("--lengthscale", type=float, default=1.0)
    p.add_argument("--outputscale", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.1, help="noise variance sigma^2")
    p.add_argument("--rtol", type=float, default=0.01)
    p.add_argument("--num-probes", type=int, default=10)
    p.add_argument("--rank", type=int, default=15, help="pivoted-Cholesky preconditioner rank")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--lanczos-iters", type=int, default=20,
                   help="GPyTorch max_lanczos_quadrature_iterations (its default; see gpytorch_settings())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--data-dir", type=Path, default=C.DEFAULT_DATA_DIR)
    p.add_argument("--dataset", default="kin40k")
    p.add_argument("--synthetic", action="store_true", help="use the generated problem at every n")
    p.add_argument("--cholesky-max", type=int, default=10000, help="exact reference for n up to this (0: never)")
    p.add_argument("--reference", default="independent", choices=("independent", "gpscale"),
                   help="exact reference: independent analytic-gradient Cholesky (default, ~5 n^2 float64) or "
                        "gpscale's method='cholesky' + autograd (far more memory)")
    p.add_argument("--memory-limit-gb", type=float, default=20.0, help="RLIMIT_AS of each child (0: none)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    p.add_argument("--gpscale-memory-budget-mb", type=float, default=None,
                   help="gpscale operator memory_budget (default: the library default)")
    p.add_argument("--out", default=str(C.REPO_ROOT / "benchmarks" / "results" / "mll_cpu.json"))
    p.add_argument("--markdown", default=None, help="write/refresh the results section of this Markdown file")
    p.add_argument("--render", default=None, metavar="JSON", help="only render --markdown from this results file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker))
    if args.render:
        payload = C.read_json(args.render)
        add_errors(payload["records"])
    else:
        payload = run(args)
    md = render_markdown(payload)
    if args.markdown:
        C.replace_markdown_section(args.markdown, "mll_cpu", md)
        print(f"wrote {args.markdown}")
    else:
        print()
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
