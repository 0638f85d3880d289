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
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LIBRARIES = ("gpscale", "gpytorch")
REFERENCE = "cholesky-ref"
KERNELS = ("rbf", "matern32", "matern52")


# ============================================================================== worker (child) side
def _constrained_grad(raw, transform):
    """d/d(value) from d/d(raw) for ``value = transform(raw)`` (elementwise, monotone)."""
    if raw.grad is None:
        return None
    r = raw.detach().clone().requires_grad_(True)
    transform(r).sum().backward()
    return (raw.grad / r.grad).reshape(-1)[0].item()


def _capture_warnings():
    cm = warnings.catch_warnings(record=True)
    rec = cm.__enter__()
    warnings.simplefilter("always")
    return cm, rec


def _warning_summary(rec) -> list[str]:
    seen = []
    for w in rec:
        msg = f"{w.category.__name__}: {str(w.message)[:300]}"
        if msg not in seen:
            seen.append(msg)
    return seen[:10]


def run_gpscale(X, y, spec) -> dict:
    """gpscale arm: ``mll_estimate(method="iterative")`` then ``value.backward()``."""
    import torch

    import gpscale
    from gpscale.kernels import make_kernel, to_positive

    kernel = make_kernel(spec["kernel"], lengthscale=spec["lengthscale"], outputscale=spec["outputscale"])
    kernel = kernel.to(X.dtype)
    noise = torch.tensor(spec["noise"], dtype=X.dtype, requires_grad=True)
    precond = gpscale.precond.PivotedCholesky(rank=spec["rank"])
    budget = spec.get("gpscale_memory_budget_mb")
    budget = None if budget is None else int(budget * (1 << 20))
    cm, rec = _capture_warnings()
    try:
        t0 = time.perf_counter()
        r = gpscale.mll_estimate(X, y, kernel, noise=noise, mean=0.0, method="iterative", rtol=spec["rtol"],
                                 max_iter=spec["max_iter"], num_probes=spec["num_probes"], preconditioner=precond,
                                 seed=spec["seed"], memory_budget=budget)
        t1 = time.perf_counter()
        r.value.backward()
        t2 = time.perf_counter()
    finally:
        cm.__exit__(None, None, None)
    n = X.shape[0]
    stats = {k: v for k, v in r.stats.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {
        "forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
        "mll": float(r.value.detach()), "mll_per_point": float(r.value.detach()) / n,
        "logdet": stats.get("logdet"), "quad": stats.get("quad"),
        "grad": {"lengthscale": _constrained_grad(kernel.raw_lengthscale, to_positive),
                 "outputscale": _constrained_grad(kernel.raw_outputscale, to_positive),
                 "noise": float(noise.grad)},
        "cg_iterations": stats.get("iterations_max"), "cg_iterations_mean": stats.get("iterations_mean"),
        "cg_status": stats.get("status"), "stats": stats, "warnings": _warning_summary(rec),
    }


def gpytorch_settings(spec) -> list:
    """The GPyTorch / linear_operator settings that make GPyTorch run the same BBMM algorithm.

    Notes on each (linear_operator 0.6, gpytorch 1.15):

    * ``max_cholesky_size(0)``: otherwise n <= 800 silently uses a dense Cholesky.
    * ``cg_tolerance(rtol)``: the library default is 1 (!); the stopping test is on the *mean* over
      columns of the relative residual norm, and CG never stops before 11 iterations.
    * ``num_trace_samples(t)``: probes for the log-det and trace estimates.
    * ``max_preconditioner_size(k)`` + ``min_preconditioning_size(0)``: without the latter GPyTorch
      skips the preconditioner for n < 2000.  ``preconditioner_tolerance(1e-6)`` matches gpscale's
      pivoted-Cholesky stopping tolerance (GPyTorch's default is 1e-3).
    * ``max_lanczos_quadrature_iterations`` (default 20) caps the Lanczos tridiagonal used for the
      log-det *and* makes CG run at least that many iterations when log-dets are requested; raising
      it to ``max_cg_iterations`` would force every solve to run to the cap, so it stays at 20.
    * ``fast_computations(log_prob=True, solves=True)``, ``skip_logdet_forward(False)``,
      ``deterministic_probes(False)``, ``terminate_cg_by_size(False)``: the defaults, set explicitly.
    """
    import gpytorch
    import linear_operator

    s = gpytorch.settings
    return [
        s.max_cholesky_size(0),
        s.cg_tolerance(spec["rtol"]),
        s.num_trace_samples(spec["num_probes"]),
        s.max_preconditioner_size(spec["rank"]),
        linear_operator.settings.min_preconditioning_size(0),
        linear_operator.settings.preconditioner_tolerance(1e-6),
        s.max_cg_iterations(spec["max_iter"]),
        s.max_lanczos_quadrature_iterations(spec["lanczos_iters"]),
        s.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True),
        s.skip_logdet_forward(False),
        s.deterministic_probes(False),
        s.terminate_cg_by_size(False),
    ]


@contextlib.contextmanager
def _instrument_gpytorch():
    """Count CG iterations and capture the (inv_quad, logdet) terms; pass-through wrappers only."""
    import torch
    import linear_operator.utils as lo_utils
    from linear_operator.operators._linear_operator import LinearOperator

    calls: list[dict] = []
    terms: dict = {}
    orig_cg, orig_iql = lo_utils.linear_cg, LinearOperator.inv_quad_logdet

    def linear_cg(matmul_closure, rhs, *args, **kwargs):
        f = matmul_closure.matmul if torch.is_tensor(matmul_closure) else matmul_closure
        count = [0]

        def counted(v):
            count[0] += 1
            return f(v)

        out = orig_cg(counted, rhs, *args, **kwargs)
        calls.append({"columns": int(rhs.shape[-1]), "matmuls": count[0],
                      "iterations": max(count[0] - 1, 0), "n_tridiag": int(kwargs.get("n_tridiag", 0) or 0)})
        return out

    def inv_quad_logdet(self, *args, **kwargs):
        res = orig_iql(self, *args, **kwargs)
        if "logdet" not in terms and res[1] is not None:
            terms["quad"] = float(res[0].detach().sum()) if res[0] is not None else None
            terms["logdet"] = float(res[1].detach().sum())
        return res

    lo_utils.linear_cg, LinearOperator.inv_quad_logdet = linear_cg, inv_quad_logdet
    try:
        yield calls, terms
    finally:
        lo_utils.linear_cg, LinearOperator.inv_quad_logdet = orig_cg, orig_iql


def run_gpytorch(X, y, spec) -> dict:
    """GPyTorch arm: a standard ExactGP and ``loss = -ExactMarginalLogLikelihood(...) * n``; ``loss.backward()``."""
    import torch
    import gpytorch

    class ExactGPModel(gpytorch.models.ExactGP):
        def __init__(self, train_x, train_y, likelihood, base_kernel):
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    name = spec["kernel"]
    base = (gpytorch.kernels.RBFKernel() if name == "rbf"
            else gpytorch.kernels.MaternKernel(nu={"matern32": 1.5, "matern52": 2.5}[name]))
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood, base).to(X.dtype)
    likelihood = likelihood.to(X.dtype)
    model.covar_module.base_kernel.lengthscale = spec["lengthscale"]
    model.covar_module.outputscale = spec["outputscale"]
    likelihood.noise = spec["noise"]
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    n = X.shape[0]
    cm, rec = _capture_warnings()
    try:
        with contextlib.ExitStack() as stack:
            for ctx in gpytorch_settings(spec):
                stack.enter_context(ctx)
            calls, terms = stack.enter_context(_instrument_gpytorch())
            torch.manual_seed(spec["seed"])
            t0 = time.perf_counter()
            loss = -mll(model(X), y) * n
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
    finally:
        cm.__exit__(None, None, None)
    ck = model.covar_module
    value = -float(loss.detach())
    # loss = -log p, so d log p / d theta = -grad.
    grad = {"lengthscale": _constrained_grad(ck.base_kernel.raw_lengthscale,
                                             ck.base_kernel.raw_lengthscale_constraint.transform),
            "outputscale": _constrained_grad(ck.raw_outputscale, ck.raw_outputscale_constraint.transform),
            "noise": _constrained_grad(likelihood.noise_covar.raw_noise,
                                       likelihood.noise_covar.raw_noise_constraint.transform)}
    grad = {k: (None if v is None else -v) for k, v in grad.items()}
    main = max(calls, key=lambda c: c["columns"] * c["matmuls"]) if calls else {}
    return {
        "forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
        "mll": value, "mll_per_point": value / n, "logdet": terms.get("logdet"), "quad": terms.get("quad"),
        "grad": grad, "cg_iterations": main.get("iterations"), "cg_status": None, "cg_calls": calls,
        "stats": {"settings": {type(c).__name__: getattr(c, "_instance_value", getattr(c, "state", None))
                               for c in gpytorch_settings(spec) if not isinstance(c, gpytorch.settings.fast_computations)}},
        "warnings": _warning_summary(rec),
    }


def _profile_and_derivative(name: str, q):
    """Independent (not gpscale's) ``f(q)`` and ``f'(q)`` with ``q = ||x - z||^2 / ell^2``."""
    import torch

    if name == "rbf":
        f = torch.exp(-0.5 * q)
        return f, -0.5 * f
    r = q.sqrt()
    if name == "matern32":
        a = math.sqrt(3.0) * r
        e = torch.exp(-a)
        return (1 + a) * e, -1.5 * e
    if name == "matern52":
        a = math.sqrt(5.0) * r
        e = torch.exp(-a)
        return (1 + a + (5.0 / 3.0) * q) * e, -(5.0 / 6.0) * (1 + a) * e
    raise ValueError(name)


def run_reference(X, y, spec) -> dict:
    """Exact float64 MLL, log-det and gradient through one dense Cholesky (independent of gpscale).

    ``K = s f(D^2 / ell^2) + sigma^2 I``; with ``alpha = K^{-1} y`` and ``W = alpha alpha^T - K^{-1}``,
    ``d log p / d theta = 1/2 sum(W * dK/dtheta)``: ``dK/ds = f``, ``dK/dsigma^2 = I``,
    ``dK/d ell = s f'(q) (-2 q / ell)``.  About five n-by-n float64 buffers.
    """
    import torch

    X = X.to(torch.float64)
    y = y.to(torch.float64)
    n = X.shape[0]
    ell, s, sig2 = float(spec["lengthscale"]), float(spec["outputscale"]), float(spec["noise"])
    t0 = time.perf_counter()
    Xc = (X - X.mean(0)) / ell
    sq = Xc.pow(2).sum(1)
    Q = torch.addmm(sq[None, :], Xc, Xc.T, alpha=-2.0).add_(sq[:, None]).clamp_min_(0.0)
    Q.fill_diagonal_(0.0)
    F, dF = _profile_and_derivative(spec["kernel"], Q)
    K = F.mul(s)
    K.diagonal().add_(sig2)
    L, info = torch.linalg.cholesky_ex(K)
    del K
    if int(info) != 0:
        raise RuntimeError(f"reference Cholesky failed at column {int(info)}")
    logdet = 2.0 * float(L.diagonal().log().sum())
    alpha = torch.cholesky_solve(y[:, None], L)[:, 0]
    quad = float(y @ alpha)
    value = -0.5 * quad - 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)
    t1 = time.perf_counter()
    # K^{-1} = L^{-T} L^{-1}; torch.cholesky_inverse is ~6x slower than this on CPU (torch 2.13).
    Linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    del L
    W = torch.mm(Linv.T, Linv).neg_()                     # -K^{-1}
    del Linv
    W.addr_(alpha, alpha)                                 # alpha alpha^T - K^{-1}
    g_noise = 0.5 * float(W.diagonal().sum())
    g_s = 0.5 * float((W * F).sum())
    del F
    dF.mul_(Q).mul_(-2.0 * s / ell)                       # dK/d ell
    g_ell = 0.5 * float((W * dF).sum())
    t2 = time.perf_counter()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
            "mll": value, "mll_per_point": value / n, "logdet": logdet, "quad": quad,
            "grad": {"lengthscale": g_ell, "outputscale": g_s, "noise": g_noise},
            "cg_iterations": None, "cg_status": None, "stats": {"dtype": "float64", "method": "dense Cholesky"},
            "warnings": []}


def run_reference_gpscale(X, y, spec) -> dict:
    """Alternative reference: gpscale's own ``method="cholesky"`` path in float64 with autograd."""
    import torch

    import gpscale
    from gpscale.kernels import make_kernel, to_positive

    X, y = X.to(torch.float64), y.to(torch.float64)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the kernel stores its raw parameters in the default dtype
    try:
        kernel = make_kernel(spec["kernel"], lengthscale=spec["lengthscale"], outputscale=spec["outputscale"])
    finally:
        torch.set_default_dtype(prev)
    noise = torch.tensor(spec["noise"], dtype=torch.float64, requires_grad=True)
    t0 = time.perf_counter()
    v = gpscale.marginal_log_likelihood(X, y, kernel, noise=noise, mean=0.0, method="cholesky")
    t1 = time.perf_counter()
    v.backward()
    t2 = time.perf_counter()
    with torch.no_grad():
        K = kernel(X)
        K.diagonal().add_(spec["noise"])
        L = torch.linalg.cholesky(K)
        logdet = 2.0 * float(L.diagonal().log().sum())
    n = X.shape[0]
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
            "mll": float(v.detach()), "mll_per_point": float(v.detach()) / n, "logdet": logdet,
            "quad": -2.0 * float(v.detach()) - logdet - n * math.log(2 * math.pi),
            "grad": {"lengthscale": _constrained_grad(kernel.raw_lengthscale, to_positive),
                     "outputscale": _constrained_grad(kernel.raw_outputscale, to_positive),
                     "noise": float(noise.grad)},
            "cg_iterations": None, "cg_status": None,
            "stats": {"dtype": "float64", "method": "gpscale cholesky + autograd"}, "warnings": []}


ARMS = {"gpscale": run_gpscale, "gpytorch": run_gpytorch}


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
        runs = []
        for _ in range(max(1, int(spec.get("repeats", 1)))):
            gc.collect()
            runs.append(fn(X, y, spec))
        record["peak_rss_gb"] = C.peak_rss_gb()
        record["ru_maxrss_gb"] = C.ru_maxrss_gb()
        last = runs[-1]
        record.update({k: v for k, v in last.items() if k not in ("forward_s", "backward_s", "total_s")})
        agg = min if spec.get("stat") == "min" else statistics.median
        for key in ("forward_s", "backward_s", "total_s"):
            record[key] = agg(r[key] for r in runs)
            record[key + "_all"] = [r[key] for r in runs]
        record["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - the parent must always get a record
        import traceback

        import re

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
    C.emit_result(record)
    return 0


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
def ratio_line(records, n) -> str | None:
    by = {r["library"]: r for r in records if r["n"] == n}
    a, b = by.get("gpscale"), by.get("gpytorch")
    if not a or not b:
        return None
    if a["status"] == "ok" and b["status"] == "ok":
        return (f"n = {n}: gpscale / GPyTorch time {a['total_s'] / b['total_s']:.2f}x "
                f"(GPyTorch / gpscale {b['total_s'] / a['total_s']:.2f}x), peak RSS "
                f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x ({a['peak_rss_gb']:.2f} vs {b['peak_rss_gb']:.2f} GB)")
    ok = [x for x in (a, b) if x["status"] == "ok"]
    failed = [x for x in (a, b) if x["status"] != "ok"]
    txt = ", ".join(f"{x['library']} failed ({x.get('reason', x.get('error', '?'))})" for x in failed)
    if ok:
        txt += f"; {ok[0]['library']} ran ({ok[0]['total_s']:.1f} s, {ok[0]['peak_rss_gb']:.2f} GB)"
    return f"n = {n}: {txt}"


def render_markdown(payload: dict) -> str:
    st, m = payload["settings"], payload["machine"]
    recs = sorted(payload["records"], key=lambda r: (r["n"], {REFERENCE: 0, "gpscale": 1, "gpytorch": 2}.get(r["library"], 3)))
    lines = [
        "## Marginal log-likelihood forward + backward: gpscale vs GPyTorch (CPU)",
        "",
        f"One MLL forward + backward at fixed hyperparameters, kernel {st['kernel'].upper()} (shared lengthscale "
        f"{st['lengthscale']}, outputscale {st['outputscale']}), noise {st['noise']}, d = {st['d']}, {st['dtype']}; "
        f"both libraries run BBMM with CG rtol {st['rtol']}, {st['num_probes']} probes, pivoted-Cholesky "
        f"preconditioner of rank {st['rank']}, max {st['max_iter']} CG iterations. Each (library, n) runs in a "
        f"fresh process (peak RSS = that process's high-water mark, including the Python/torch baseline of "
        f"about {_baseline(recs)} GB), address space capped at {st['memory_limit_gb']} GB. Times are the {st.get('stat', 'median')} of "
        f"{st['repeats']} run(s) after a warm-up at n = {st['warmup']}. Errors are relative to an exact float64 "
        f"dense-Cholesky reference (`{REFERENCE}`, computed for n <= {st['cholesky_max']}); the gradient error is "
        f"the vector norm over (lengthscale, outputscale, noise).",
        "",
        f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpu_count')} logical CPUs ({_threads(recs)} torch threads), "
        f"{m.get('mem_total_gb')} GB RAM; torch {m.get('torch_version')}, gpytorch {m.get('gpytorch_version')}, "
        f"linear_operator {m.get('linear_operator_version')}, gpscale {m.get('gpscale_version')} "
        f"(commit {str(m.get('git_commit'))[:10]}{' + local changes' if m.get('git_dirty') else ''}); "
        f"{m.get('date_utc')}; load average at start {_load(m.get('loadavg_at_start'))}.",
        "",
        f"Command: `{m.get('command')}`",
        "",
        "| n | data | library | fwd s | bwd s | total s | peak RSS GB | CG iters | MLL / n | MLL rel err "
        "| log-det rel err | grad rel err | status |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in recs:
        data = (r.get("data") or {}).get("source", "—")
        if r["status"] == "ok":
            warn = " (warnings)" if r.get("warnings") else ""
            status = (r.get("cg_status") or "ok") + warn
            lines.append(
                f"| {r['n']} | {data} | {r['library']} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | "
                f"{r['total_s']:.2f} | {r['peak_rss_gb']:.2f} | {C.fmt(r.get('cg_iterations'), 'd')} | "
                f"{r['mll_per_point']:+.4f} | {C.fmt(r.get('mll_rel_err'), '.1e')} | "
                f"{C.fmt(r.get('logdet_rel_err'), '.1e')} | {C.fmt(r.get('grad_rel_err'), '.1e')} | {status} |")
        else:
            reason = r.get("reason") or "failed"
            err = str(r.get("error", ""))
            err = (err.split("; ")[0] if reason == "oom" else err).replace("|", "/")[:90]
            lines.append(f"| {r['n']} | {data} | {r['library']} | — | — | — | "
                         f"{C.fmt(r.get('peak_rss_gb'), '.2f')} | — | — | — | — | — | failed: {reason} ({err}) |")
    lines.append("")
    ratios = [ratio_line(recs, n) for n in sorted({r["n"] for r in recs})]
    ratios = [x for x in ratios if x]
    if ratios:
        lines += ["Ratios (total time; peak RSS):", ""] + [f"- {x}" for x in ratios] + [""]
    srcs = {}
    for r in recs:
        d = r.get("data") or {}
        if d:
            srcs.setdefault(d.get("source"), set()).add(r["n"])
    if srcs:
        notes = []
        for s, ns in srcs.items():
            if s and s.startswith("synthetic"):
                notes.append(f"`{s}` (n = {', '.join(map(str, sorted(ns)))}): X ~ N(0, I), y a random-Fourier-feature "
                             f"draw from the GP prior at these hyperparameters plus noise")
            else:
                notes.append(f"`{s}` (n = {', '.join(map(str, sorted(ns)))}): random subsample (seed {st['seed']})")
        lines += ["Data: " + "; ".join(notes) + ". X columns and y standardised per problem.", ""]
    lines += [
        "CG iters: gpscale reports the largest iteration count over its 11 right-hand sides (it stops when "
        "every column reaches rtol); GPyTorch stops when the *mean* relative residual over the columns reaches "
        "rtol, never before 11 iterations, and (when computing a log-det) never before "
        "`max_lanczos_quadrature_iterations` (20) iterations; its Lanczos log-det uses at most those 20 steps.",
        "",
    ]
    return "\n".join(lines)


def _baseline(recs) -> str:
    vals = [r["rss_before_gb"] for r in recs if r.get("rss_before_gb") and r["library"] != REFERENCE]
    return f"{min(vals):.2f}" if vals else "?"


def _threads(recs) -> str:
    vals = sorted({r.get("torch_threads") for r in recs if r.get("torch_threads")})
    return "/".join(map(str, vals)) if vals else "?"


def _load(x) -> str:
    return ", ".join(f"{v:.1f}" for v in x) if x else "?"


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
