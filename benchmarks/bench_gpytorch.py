#!/usr/bin/env python
"""Stock GPyTorch vs GPyTorch + gpscale backend: the same model code, Adam training, test RMSE (CPU).

Both arms run GPyTorch's documented training loop on the same data (a UCI set, default protein,
``d = 9``; X standardised with training statistics, y standardised) and the same model
(``ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=d))``, ``GaussianLikelihood``, constant mean, Adam
lr 0.1).  The only difference is one line: ``use_gpscale(model)`` in the gpscale arm.  Stock GPyTorch
runs with its defaults (as a user would: CG tolerance 1, rank-15 pivoted Cholesky, dense kernel
matrix).  Each (arm, n) runs in a fresh child process so that its peak RSS is its own; a child that
exceeds ``--memory-limit-gb`` (RLIMIT_AS) or ``--time-limit`` is recorded as such.

Per arm: seconds per training step (median over the steps run), peak RSS, final hyperparameters,
the loss trace, and the test RMSE of the posterior mean on ``--n-test`` held-out points.

Examples
--------
Committed CPU run (benchmarks/results/gpytorch_cpu.json, table in docs/benchmarks.md)::

    python benchmarks/bench_gpytorch.py --sizes 10000,20000,40000 --steps 50 --time-limit 1500 \\
        --out benchmarks/results/gpytorch_cpu.json --markdown docs/benchmarks.md

Smoke test::

    python benchmarks/bench_gpytorch.py --sizes 1500 --steps 3 --n-test 200 --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

ARMS = ("gpytorch", "gpscale")


# ============================================================================== worker (child) side
def _load(spec):
    import numpy as np

    path = Path(spec["data_dir"]) / f"{spec['dataset']}.npz"
    with np.load(path, allow_pickle=False) as f:
        X, y = f["X"].astype(np.float64), f["y"].astype(np.float64).reshape(-1)
    n, m = spec["n"], spec["n_test"]
    if X.shape[0] < n + m:
        raise SystemExit(f"{path} has {X.shape[0]} rows < n + n_test = {n + m}")
    idx = np.random.default_rng(spec["seed"]).permutation(X.shape[0])
    tr, te = idx[:n], idx[n:n + m]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    ym, ys = y[tr].mean(), y[tr].std()
    return (X[tr] - mu) / sd, (y[tr] - ym) / ys, (X[te] - mu) / sd, (y[te] - ym) / ys, float(ys)


def _build(X, y, spec):
    import gpytorch

    class ExactGPModel(gpytorch.models.ExactGP):
        def __init__(self, train_x, train_y, likelihood):
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            nu = {"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}.get(spec["kernel"])
            d = train_x.shape[-1] if spec["ard"] else None
            base = (gpytorch.kernels.RBFKernel(ard_num_dims=d) if nu is None
                    else gpytorch.kernels.MaternKernel(nu=nu, ard_num_dims=d))
            self.covar_module = gpytorch.kernels.ScaleKernel(base)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood).to(X.dtype)
    return model, likelihood.to(X.dtype)


def _hypers(model, likelihood) -> dict:
    ck = model.covar_module
    return {"lengthscale": ck.base_kernel.lengthscale.detach().reshape(-1).tolist(),
            "outputscale": float(ck.outputscale.detach()), "noise": float(likelihood.noise.detach()),
            "mean": float(model.mean_module.constant.detach())}


def run_arm(spec) -> dict:
    import gpytorch
    import torch

    Xn, yn, Xt, yt, y_scale = _load(spec)
    dtype = getattr(torch, spec["dtype"])
    X, y = torch.as_tensor(Xn, dtype=dtype), torch.as_tensor(yn, dtype=dtype)
    model, likelihood = _build(X, y, spec)
    if spec["arm"] == "gpscale":
        from gpscale.integrations.gpytorch import backend_stats, use_gpscale

        use_gpscale(model)  # the one-line switch, default options
    model.train()
    likelihood.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    torch.manual_seed(spec["seed"])
    step_s, losses, t_start = [], [], time.perf_counter()
    for i in range(spec["steps"]):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = -mll(model(X), y)
        loss.backward()
        optimizer.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        print(f"  [{spec['arm']} n={spec['n']}] step {i + 1}/{spec['steps']} loss {losses[-1]:.4f} "
              f"({step_s[-1]:.1f}s)", file=sys.stderr, flush=True)
        if time.perf_counter() - t_start > spec["time_limit"]:
            break
    train_s = time.perf_counter() - t_start
    model.eval()
    likelihood.eval()
    t0 = time.perf_counter()
    preds = []
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        for i in range(0, Xt.shape[0], 1000):
            preds.append(likelihood(model(torch.as_tensor(Xt[i:i + 1000], dtype=dtype))).mean)
    pred = torch.cat(preds).double().numpy()
    rmse = float(((pred - yt) ** 2).mean() ** 0.5)
    out = {"steps_run": len(step_s), "step_s": step_s, "step_s_median": statistics.median(step_s),
           "train_s": train_s, "predict_s": time.perf_counter() - t0, "losses": losses,
           "hypers": _hypers(model, likelihood), "test_rmse_standardised": rmse, "test_rmse": rmse * y_scale}
    if spec["arm"] == "gpscale":
        out["backend_stats"] = {k: v for k, v in backend_stats(model).items() if k != "options"}
    return out


def worker_main(spec: dict) -> int:
    return C.guarded_worker({"arm": spec["arm"], "n": spec["n"]}, lambda: run_arm(spec),
                            memory_limit_gb=spec.get("memory_limit_gb"), threads=spec.get("threads"))


# ============================================================================== parent side
def run(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    payload = {"benchmark": "gpytorch_backend_training", "machine": C.machine_info(),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("worker", "render")}, "records": []}
    script = str(Path(__file__).resolve())
    for n in sizes:
        for arm in arms:
            spec = {"arm": arm, "n": n, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                            if k not in ("worker", "render", "sizes", "arms", "out", "markdown")}}
            rec = C.run_child([sys.executable, script, "--worker", json.dumps(spec)],
                              timeout=args.child_timeout)
            rec.setdefault("arm", arm)
            rec.setdefault("n", n)
            payload["records"].append(rec)
            print(_line(rec), flush=True)
            if args.out:
                C.write_json(args.out, payload)
    return payload


def _line(r) -> str:
    if r.get("status") != "ok":
        return f"n={r['n']:>6} {r['arm']:<9} FAILED ({r.get('error', '?')[:200]}) peak RSS {C.fmt(r.get('peak_rss_gb'))} GB"
    return (f"n={r['n']:>6} {r['arm']:<9} {r['steps_run']} steps, {r['step_s_median']:.2f} s/step, peak RSS "
            f"{r['peak_rss_gb']:.2f} GB, final loss {r['losses'][-1]:.4f}, test RMSE {r['test_rmse']:.4f}")


def render_markdown(payload) -> str:
    s, m = payload["settings"], payload["machine"]
    lines = ["## GPyTorch training: stock vs `use_gpscale(model)` (CPU)", "",
             f"Same GPyTorch model code (`ScaleKernel(MaternKernel(nu=2.5{', ard_num_dims=d' if s['ard'] else ''}))`"
             f" — kernel `{s['kernel']}`, `GaussianLikelihood`, constant mean), {s['dataset']} (train n, "
             f"{s['n_test']} held-out test points), {s['dtype']}, Adam lr {s['lr']}, up to {s['steps']} steps "
             f"(or {s['time_limit']:.0f} s per arm). Stock GPyTorch runs with its defaults; the gpscale arm adds only "
             "`use_gpscale(model)` (default options: rtol 1e-2, 10 probes, pivoted Cholesky rank 100). "
             f"Each (arm, n) is a fresh process; address space capped at {s['memory_limit_gb']} GB.", "",
             f"Machine: {m.get('cpu_model')}, {m.get('cpu_count')} CPUs ({s.get('threads') or 'default'} torch threads); "
             f"{m.get('date_utc')}; load average at start {', '.join(f'{v:.1f}' for v in m.get('loadavg_at_start', []))}.", "",
             "| n | arm | steps | s / step (median) | speed-up | peak RSS GB | final loss | test RMSE | noise | outputscale | status |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    by = {(r["n"], r["arm"]): r for r in payload["records"]}
    for r in payload["records"]:
        ok = r.get("status") == "ok"
        base = by.get((r["n"], "gpytorch"))
        speed = (base["step_s_median"] / r["step_s_median"] if ok and r["arm"] == "gpscale" and base
                 and base.get("status") == "ok" else None)
        h = r.get("hypers", {})
        lines.append("| " + " | ".join([
            str(r["n"]), r["arm"], str(r.get("steps_run", "—")), C.fmt(r.get("step_s_median")),
            C.fmt(speed, ".2f") + ("x" if speed else ""), C.fmt(r.get("peak_rss_gb")),
            C.fmt(r["losses"][-1] if ok else None, ".4f"), C.fmt(r.get("test_rmse"), ".4f"),
            C.fmt(h.get("noise"), ".4f"), C.fmt(h.get("outputscale"), ".3f"),
            "ok" if ok else f"failed: {r.get('reason', '')} ({str(r.get('error', ''))[:80]})"]) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,20000,40000")
    p.add_argument("--arms", default="gpytorch,gpscale")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--time-limit", type=float, default=1500.0, help="stop training an arm after this many seconds")
    p.add_argument("--child-timeout", type=float, default=4 * 3600.0,
                   help="seconds per (arm, n) child incl. data loading and prediction (default 4 h)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--kernel", default="matern52", choices=("rbf", "matern12", "matern32", "matern52"))
    p.add_argument("--no-ard", dest="ard", action="store_false")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--data-dir", type=Path, default=C.DEFAULT_DATA_DIR)
    p.add_argument("--dataset", default="protein")
    p.add_argument("--n-test", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--memory-limit-gb", type=float, default=20.0)
    p.add_argument("--out", default=str(C.REPO_ROOT / "benchmarks" / "results" / "gpytorch_cpu.json"))
    p.add_argument("--markdown", default=None)
    p.add_argument("--render", default=None, metavar="JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker))
    payload = C.read_json(args.render) if args.render else run(args)
    md = render_markdown(payload)
    if args.markdown:
        C.replace_markdown_section(args.markdown, "gpytorch_cpu", md)
        print(f"wrote {args.markdown}")
    else:
        print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
