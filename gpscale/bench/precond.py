"""``gpscale bench precond``: compare preconditioners on the same GP systems.

For every data set the hyperparameters are fitted once (cached JSON) and every arm -- ``none``,
``jacobi``, and ``pivchol`` / ``rpchol`` / ``rpchol-block`` / ``rpchol-diag`` / ``nystrom`` / ``gpytorch`` at each
rank -- solves the same system :math:`(K + \\sigma^2 I)[Z, y]` by preconditioned CG, with probes
:math:`Z \\sim N(0, P)` as in the preconditioned log-det estimator (Wenger et al. 2022).  Reported per
arm (means over seeds): construction time, CG iterations (``y`` column and probe columns) and wall
time to each tolerance, the SLQ log-det error and its standard deviation over seeds against a dense
Cholesky (on a subsample small enough for it), and the residual-vs-iteration curve.  Output:
``results.json``, ``results.md`` and PNG plots in ``--out-dir``.

Examples
--------
.. code-block:: console

    $ gpscale bench precond --data-dir ../shared/data/uci --datasets pol,elevators \\
          --preconditioners none,jacobi,pivchol,rpchol,nystrom,gpytorch --ranks 50,100,200,500 \\
          --kernel matern52 --max-n 8000 --seeds 0,1,2
    $ python -m gpscale.bench.precond --synthetic --max-n 500 --ranks 10,40   # seconds, for CI
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from .. import __version__
from ..operators import KernelOperator
from ._arms import FAMILIES, LOW_RANK, make_factory, measured_solve, timed_build, warm_up
from ._problems import load_problem
from ._report import aggregate, markdown, plots

#: Families whose build does not depend on the seed: built once per arm, reused across seeds.
DETERMINISTIC = ("none", "jacobi", "pivchol", "gpytorch")


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in str(text).split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from exc
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``precond`` on a subparsers object (``gpscale bench`` or the standalone module)."""
    p = subparsers.add_parser("precond", help="compare CG preconditioners (iterations, time, log-det error)",
                              description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    configure_parser(p)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``p`` and set ``func=run``."""
    p.add_argument("--data-dir", default="../shared/data/uci", help="folder of <name>.npz files (X, y)")
    p.add_argument("--datasets", type=_csv(str), default=["pol", "elevators", "bike", "protein", "keggdirected"])
    p.add_argument("--synthetic", action="store_true", help="one generated data set instead of --datasets (CI)")
    p.add_argument("--preconditioners", type=_csv(str), default=["none", "jacobi", "pivchol", "rpchol", "nystrom",
                                                                 "gpytorch"], help=f"any of {','.join(FAMILIES)}")
    p.add_argument("--ranks", type=_csv(int), default=[50, 100, 200, 500])
    p.add_argument("--kernel", default="matern52", choices=["rbf", "matern12", "matern32", "matern52"])
    p.add_argument("--max-n", type=int, default=8000, help="random subsample size per data set (default %(default)s)")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="probe / sketch seeds (default 0,1,2)")
    p.add_argument("--logdet-seeds", type=_csv(int), default=None,
                   help="seeds for the log-det error/std (default: --seeds); seeds beyond --seeds only run the "
                        "log-det solve at the loosest --rtols on the Cholesky-sized subsample")
    p.add_argument("--rtols", type=_csv(float), default=[1e-2, 1e-4], help="CG tolerances (default 1e-2,1e-4)")
    p.add_argument("--num-probes", type=int, default=8, help="probe columns next to y (default %(default)s)")
    p.add_argument("--max-iter", type=int, default=2000, help="CG iteration cap (default %(default)s)")
    p.add_argument("--block-size", type=int, default=64, help="proposals per round of rpchol-block (default 64)")
    p.add_argument("--logdet-max-n", type=int, default=4000,
                   help="largest n for the dense Cholesky log-det reference (default %(default)s)")
    p.add_argument("--hyper-n", type=int, default=1500, help="hyperparameter-fit subsample (default %(default)s)")
    p.add_argument("--hyper-iter", type=int, default=60, help="L-BFGS-B iterations of the fit (default %(default)s)")
    p.add_argument("--hyper-cache", help="JSON cache of fitted hyperparameters (default OUT_DIR/hypers.json)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the run (default: torch's own)")
    p.add_argument("--data-seed", type=int, default=0, help="subsample seed (default %(default)s)")
    p.add_argument("--out-dir", default="bench-precond", help="where results.json/.md and PNGs go")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="keep the data sets already in OUT_DIR/results.json (same settings) and run only the rest")
    p.set_defaults(func=run)


# Settings that change the numbers: a resumed run must agree on all of them with the saved one.
_RESUME_KEYS = ("synthetic", "preconditioners", "ranks", "kernel", "max_n", "seeds", "logdet_seeds", "rtols",
                "num_probes", "max_iter", "block_size", "logdet_max_n", "hyper_n", "hyper_iter", "dtype",
                "data_seed")


def _resumed(args) -> dict:
    """The saved results of an earlier run into ``args.out_dir`` (``--resume``), else ``{}``."""
    path = os.path.join(args.out_dir, "results.json")
    if not getattr(args, "resume", False) or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    old = saved.get("settings", {})
    diff = [k for k in _RESUME_KEYS if _clean(old.get(k)) != _clean(getattr(args, k, None))]
    if diff:
        raise ValueError(f"--resume: {path} was run with different settings ({', '.join(diff)}: "
                         f"{[old.get(k) for k in diff]}); use the same options, another --out-dir, or drop --resume")
    return saved


def _check(args) -> list[str]:
    bad = [f for f in args.preconditioners if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown preconditioner(s) {bad}; choose from {', '.join(FAMILIES)}")
    if not args.seeds or not args.rtols or (any(f in LOW_RANK for f in args.preconditioners) and not args.ranks):
        raise ValueError("--seeds, --rtols and (for low-rank preconditioners) --ranks must not be empty")
    if min(args.ranks or [1]) < 1 or args.max_n < 2 or args.num_probes < 1 or min(args.rtols) <= 0:
        raise ValueError("--ranks, --max-n, --num-probes and --rtols must be positive")
    return ["synthetic"] if args.synthetic else list(args.datasets)


def _arms(args) -> list[tuple[str, int]]:
    return [(f, r) for f in args.preconditioners for r in (args.ranks if f in LOW_RANK else [0])]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def exact_logdet(op) -> float:
    """:math:`\\log|K + \\sigma^2 I|` by dense float64 Cholesky (:math:`O(m^3)`; keep ``m`` small)."""
    with torch.no_grad():
        K = copy.deepcopy(op.kernel).to(device=op.device, dtype=torch.float64)(op.X.to(torch.float64))
        K.diagonal().add_(float(op.noise))
        return float(2 * torch.linalg.cholesky(K).diagonal().log().sum())


def run_dataset(prob, args, device, dtype, bar) -> dict:
    """All arms and seeds on one problem; returns the data set's JSON record."""
    X = torch.as_tensor(prob.X, dtype=dtype, device=device)
    y = torch.as_tensor(prob.y, dtype=dtype, device=device)
    kernel = prob.kernel(args.kernel, dtype).to(device)
    op = KernelOperator(X, kernel, noise=prob.hypers["noise"])
    m = min(X.shape[0], args.logdet_max_n)
    op_ld = op if m == X.shape[0] else KernelOperator(X[:m], kernel, noise=prob.hypers["noise"])
    warm_up(op, args.preconditioners, min(args.ranks or [1]), args.block_size)
    t0 = time.perf_counter()
    exact = exact_logdet(op_ld)
    ds = {"n": int(X.shape[0]), "d": int(X.shape[1]), "rows_total": prob.rows_total, "hypers": prob.hypers,
          "logdet_n": m, "exact_logdet": exact, "cholesky_seconds": time.perf_counter() - t0, "arms": []}
    for family, rank in _arms(args):
        arm = {"family": family, "rank": rank}
        arm["runs"] = _run_arm(arm, op, op_ld, y, args, bar, prob.name)
        arm["summary"] = aggregate(arm["runs"], exact, args.rtols)
        ds["arms"].append(arm)
    return ds


def _run_arm(arm: dict, op, op_ld, y, args, bar, name: str) -> list[dict]:
    """Every seed of one arm: build (timed), then one probe solve per tolerance.

    Deterministic families are built once and reused across seeds (only the probes change).  The
    first seed's tightest solve also stores the ``y`` residual curve in ``arm["history_y"]``.
    """
    family, rank, runs, built = arm["family"], arm["rank"], [], None
    m = op_ld.shape[0]
    for seed in args.seeds:
        bar.set_postfix_str(f"{name} {family} k={rank} seed={seed}")
        if built is None or family not in DETERMINISTIC:
            factory = make_factory(family, rank, seed, args.block_size)
            P, build_s = timed_build(factory, op)
            built = (P, build_s, P if op_ld is op else factory.build(op_ld))
        P, build_s, P_ld = built
        st = P.stats
        rec = {"seed": seed, "rank": P.rank, "build_seconds": build_s, "solves": {},
               "residual_trace_rel": (st["residual_trace"] / st["trace"]) if st.get("trace") else None}
        for rtol in args.rtols:
            hist = seed == args.seeds[0] and rtol == min(args.rtols)
            meas = measured_solve(op, P, y, args.num_probes, rtol, args.max_iter, seed, history=hist)
            if op_ld is not op:  # the log-det is checked on the Cholesky-sized subsample
                meas["logdet"] = measured_solve(op_ld, P_ld, y[:m], args.num_probes, rtol, args.max_iter,
                                                seed)["logdet"]
            if hist:
                arm["history_y"] = meas.pop("history_y")
            rec["solves"][f"{rtol:g}"] = meas
        runs.append(rec)
        bar.update()
    extra = [s for s in (args.logdet_seeds or []) if s not in args.seeds]
    for seed in extra:  # log-det spread only: one loose solve on the Cholesky-sized system per seed
        if family not in DETERMINISTIC:
            P_ld = make_factory(family, rank, seed, args.block_size).build(op_ld)
        rtol = max(args.rtols)
        ld = measured_solve(op_ld, P_ld, y[:m], args.num_probes, rtol, args.max_iter, seed)["logdet"]
        runs.append({"seed": seed, "logdet_only": True, "solves": {f"{rtol:g}": {"logdet": ld}}})
    return runs


def _environment(device) -> dict:
    return {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "torch": torch.__version__, "gpscale": __version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count()}


def run(args) -> int:
    """Run the benchmark described by the parsed ``args``; returns the exit code (0)."""
    names = _check(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, names)
    finally:
        torch.set_num_threads(threads)


def _run(args, names) -> int:
    from tqdm.auto import tqdm

    device, dtype = _device(args.device), getattr(torch, args.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    cache = args.hyper_cache or os.path.join(args.out_dir, "hypers.json")
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    saved = _resumed(args)
    done = dict(saved.get("datasets", {}))
    # --datasets order first, then anything else the saved run had
    order = names + [name for name in done if name not in names]
    results = {"settings": settings, "environment": _environment(device),
               "datasets": {k: done[k] for k in order if k in done}}
    todo = [name for name in names if name not in done]
    total = len(todo) * len(_arms(args)) * len(args.seeds)
    t0 = time.perf_counter() - (saved.get("total_seconds") or 0.0)  # wall time of all the runs together
    with tqdm(total=total, disable=args.quiet, desc="bench precond", unit="run", file=sys.stderr) as bar:
        if done:
            bar.write(f"resuming: {', '.join(done)} already in {args.out_dir}; running {', '.join(todo) or 'nothing'}")
        for name in todo:
            prob = load_problem(name, data_dir=args.data_dir, max_n=args.max_n, kernel_name=args.kernel,
                                hyper_n=args.hyper_n, seed=args.data_seed, cache_path=cache,
                                hyper_iter=args.hyper_iter, log=bar.write)
            done[name] = run_dataset(prob, args, device, dtype, bar)
            results["datasets"] = {k: done[k] for k in order if k in done}
            results["total_seconds"] = time.perf_counter() - t0
            _write(results, args.out_dir)  # partial results survive an interruption
    files = plots(results, args.out_dir)
    text = _write(results, args.out_dir)
    print(text)
    print(f"wrote {os.path.join(args.out_dir, 'results.json')}, results.md and "
          f"{', '.join(map(os.path.basename, files))}")
    return 0


def _write(results: dict, out_dir: str) -> str:
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(_clean(results), fh, indent=1)
    text = markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    return text


def _clean(o):
    """JSON-safe copy: NaN/Inf -> None, numpy scalars -> Python, anything else unknown -> str."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


def main(argv=None) -> int:
    """Standalone entry point: ``python -m gpscale.bench.precond [options]``."""
    parser = argparse.ArgumentParser(prog="python -m gpscale.bench.precond", description=__doc__.split("\n\n")[1])
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gpscale bench precond: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
