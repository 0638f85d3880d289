"""The ``gpscale`` command line.

Subcommands
-----------
``gpscale fit``
    Split a data set (``--data FILE`` or the embedded ``--demo``), fit an :class:`~gpscale.ExactGP`,
    and print test RMSE, test NLL, timings, solver statistics and the fitted hyperparameters.

Every subcommand is registered by an ``_add_<name>(subparsers)`` function in :func:`build_parser`;
user errors (missing file, bad format, invalid option) print one line to stderr and exit with 2.

Examples
--------
.. code-block:: console

    $ gpscale fit --demo                        # 20k-point demo problem, a few minutes on 2 cores
    $ gpscale fit --data train.npz --kernel matern52 --test-fraction 0.1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from . import __version__
from .bench import add_parser as _add_bench
from .data import DataError, load_data, make_demo, subsample, train_test_split
from .models import ExactGP
from .operators.backends import BACKENDS, CUDA_VARIANTS, parse_backend
from .precision import PRODUCT_DTYPES
from .precond import PivotedCholesky

#: Settings of ``gpscale fit --demo`` (each overridable by its option).  Measured on a shared 2-core CPU:
#: 3 min 51 s wall in all -- a 1000-point subset fit (dense Cholesky, ~40 s), then two L-BFGS-B
#: iterations on the 18000 training points (3 evaluations of ~46 s: 13 preconditioned CG iterations,
#: the derivative pass and the rank-300 preconditioner; the 2 GiB operator budget caches the whole
#: kernel matrix, which halves the cost of a CG iteration), the predictor (16 s) and the test
#: predictions (47 s, most of it the CG solves for the std of 100 test points).
DEMO = {"n": 20000, "d": 8, "max_iter": 2, "dtype": "float64", "precond_rank": 300, "init_subset": 1000,
        "std_points": 100, "memory_budget": 2048}
#: Defaults without ``--demo`` (``None``: ExactGP's own default).
GENERAL = {"max_iter": None, "dtype": "float64", "precond_rank": 100, "init_subset": None, "std_points": None,
           "memory_budget": None}
#: Predictive std (for the NLL) on at most this many test points when training used CG: each test
#: point costs one CG solve against the full training set.
STD_POINTS_ITERATIVE = 200

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="gpscale", description="Exact Gaussian processes at scale.")
    parser.add_argument("--version", action="version", version=f"gpscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_fit(sub)
    _add_bench(sub)
    return parser


def _demo_defaults() -> str:
    return ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in DEMO.items())


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit an exact GP and report test accuracy",
                       description="Split the data (seeded), fit gpscale.ExactGP on the training part and print "
                                   "test RMSE, test NLL, fit time, solver statistics and hyperparameters.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE", help=".npz with arrays X (n, d) and y (n,), or .csv with y last")
    src.add_argument("--demo", action="store_true",
                     help="the embedded demo problem: a smooth function of 3 directions in d=8 plus noise; "
                          f"defaults {_demo_defaults()}")
    p.add_argument("--n", type=int, help=f"demo size (default {DEMO['n']}); with --data: a random subset of N rows")
    p.add_argument("--d", type=int, default=DEMO["d"], help="demo input dimension (default %(default)s)")
    p.add_argument("--kernel", default="matern52", choices=["rbf", "matern12", "matern32", "matern52"])
    p.add_argument("--no-ard", dest="ard", action="store_false", help="one shared lengthscale")
    p.add_argument("--test-fraction", type=float, default=0.1, help="default %(default)s")
    p.add_argument("--max-iter", type=int, help="optimiser iterations (default: ExactGP's, 100 for lbfgs)")
    p.add_argument("--init-subset", type=int, metavar="M", help="first fit on a random subset of M points")
    p.add_argument("--optimizer", default="lbfgs", choices=["lbfgs", "adam"])
    p.add_argument("--lr", type=float, default=0.1, help="Adam step size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split, demo data and probe seed (default %(default)s)")
    p.add_argument("--method", default="auto", choices=["auto", "cholesky", "iterative"])
    p.add_argument("--dtype", choices=["float32", "float64"], help="default float64")
    p.add_argument("--rtol", type=float, default=1e-2, help="CG tolerance in training (default %(default)s)")
    p.add_argument("--num-probes", type=int, default=10, help="default %(default)s")
    p.add_argument("--precond-rank", type=int, help="pivoted Cholesky rank (default 100; 0: none)")
    p.add_argument("--precision", choices=list(PRODUCT_DTYPES),
                   help="arithmetic of the kernel products in the training CG solves (mixed precision with "
                        "re-orthogonalisation and float32 fallback, docs/precision.md); default: the dtype "
                        "of the data, no policy")
    p.add_argument("--std-points", type=_count_or_all, metavar="K|all",
                   help=f"test points for the predictive std / NLL (default: all with Cholesky, a random "
                        f"{STD_POINTS_ITERATIVE} with CG, where each costs a solve)")
    p.add_argument("--memory-budget", type=float, metavar="MIB",
                   help="memory budget of each kernel operator in MiB (default: gpscale's, 1024)")
    p.add_argument("--device", default="cpu", help="where the fit runs: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", type=backend_arg, metavar="|".join(BACKENDS) + "|cuda:VARIANT",
                   help="kernel-product backend (default auto: the fastest available for the device and size); "
                        f"cuda:VARIANT fixes the CUDA kernel ({', '.join(CUDA_VARIANTS)})")
    p.add_argument("--checkpoint", metavar="PATH", help="save every step; resume when PATH exists")
    p.add_argument("--json", metavar="OUT", help="also write all results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit)


def backend_arg(text: str) -> str:
    """``argparse`` type of a ``--backend`` option: a string :func:`gpscale.operators.backends.parse_backend` takes."""
    try:
        parse_backend(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _count_or_all(text: str) -> int:
    if text == "all":
        return -1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def _resolve_defaults(args) -> None:
    """Fill unset options from the demo profile or the general defaults."""
    profile = DEMO if args.demo else GENERAL
    for key, value in profile.items():
        if key in ("n", "d"):
            continue
        if getattr(args, key) is None:
            setattr(args, key, value)


def _load(args) -> tuple[np.ndarray, np.ndarray, str]:
    if args.demo:
        n = DEMO["n"] if args.n is None else args.n
        if n < 3 or args.d < 1:
            raise DataError(f"--demo needs --n >= 3 and --d >= 1, got --n {n} --d {args.d}")
        X, y = make_demo(n=n, d=args.d, seed=args.seed)
        return X, y, f"demo data (n={n}, d={args.d}, seed={args.seed})"
    X, y = load_data(args.data)
    if args.n is not None:
        X, y = subsample(X, y, args.n, seed=args.seed)
    return X, y, f"{args.data} (n={X.shape[0]}, d={X.shape[1]})"


def _estimator(args) -> ExactGP:
    budget = None if args.memory_budget is None else int(args.memory_budget * 2 ** 20)
    precond = PivotedCholesky(rank=args.precond_rank) if args.precond_rank > 0 else None
    return ExactGP(kernel=args.kernel, ard=args.ard, optimizer=args.optimizer, max_iter=args.max_iter, lr=args.lr,
                   method=args.method, rtol=args.rtol, num_probes=args.num_probes, preconditioner=precond,
                   seed=args.seed, dtype=getattr(torch, args.dtype), memory_budget=budget,
                   init_subset=args.init_subset, verbose=not args.quiet, checkpoint=args.checkpoint,
                   device=args.device, backend=args.backend, precision=args.precision)


def _test_metrics(gp: ExactGP, X_test, y_test, std_points, seed: int) -> dict:
    """Test RMSE (all points) and mean Gaussian predictive NLL / 2-std coverage (``std_points`` of them)."""
    m = X_test.shape[0]
    if m == 0:
        return {}
    t0 = time.perf_counter()
    y = np.asarray(y_test, dtype=np.float64)
    mean = gp.predict(X_test)
    k = m if std_points == -1 else min(m, std_points if std_points else
                                       (m if gp.method_ == "cholesky" else STD_POINTS_ITERATIVE))
    sel = np.sort(np.random.default_rng(seed).choice(m, size=k, replace=False)) if k < m else np.arange(m)
    _, std = gp.predict(X_test[sel], return_std=True)
    var, err = std ** 2, y[sel] - mean[sel]
    nll = 0.5 * np.log(2 * math.pi * var) + 0.5 * err ** 2 / var
    return {"rmse": float(np.sqrt(np.mean((y - mean) ** 2))), "nll": float(np.mean(nll)),
            "rmse_constant": float(np.std(y)), "coverage_2std": float(np.mean(np.abs(err) <= 2 * std)),
            "predict_seconds": time.perf_counter() - t0, "n_test": int(m), "n_std": int(k)}


def _print_results(source: str, n_train: int, metrics: dict, gp: ExactGP) -> None:
    print(f"gpscale fit: {source}; {n_train} training / {metrics.get('n_test', 0)} test points")
    print(gp.report_)
    if metrics:
        print(f"  test RMSE    {metrics['rmse']:.5g}   (constant predictor: {metrics['rmse_constant']:.5g})")
        on = "" if metrics["n_std"] == metrics["n_test"] else f", on {metrics['n_std']} of the test points"
        cover = 100 * metrics["coverage_2std"]
        print(f"  test NLL     {metrics['nll']:.5g} per point   (within 2 std: {cover:.1f}%{on})")
        print(f"  predict      {metrics['predict_seconds']:.2f} s (mean of {metrics['n_test']} points, "
              f"std of {metrics['n_std']})")
    print(f"  fit time     {gp.report_.fit_seconds:.2f} s")


def cmd_fit(args) -> int:
    """``gpscale fit``: returns the exit code."""
    _resolve_defaults(args)
    X, y, source = _load(args)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, args.test_fraction, seed=args.seed)
    gp = _estimator(args).fit(X_tr, y_tr)
    metrics = _test_metrics(gp, X_te, y_te, args.std_points, args.seed)
    _print_results(source, X_tr.shape[0], metrics, gp)
    if args.json:
        out = {"source": source, "n_train": int(X_tr.shape[0]), "test": metrics, "report": gp.report_.to_dict(),
               "settings": {k: v for k, v in vars(args).items() if k != "func"}}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2, default=str)
    return EXIT_OK


def main(argv=None) -> int:
    """Entry point of the ``gpscale`` console script; returns the exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except (DataError, ValueError, TypeError, OSError) as exc:
        print(f"gpscale {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # the fit itself failed (e.g. a non-finite objective): not a usage error
        print(f"gpscale {args.command}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        hint = f"; rerun the same command to resume from {args.checkpoint}" if getattr(args, "checkpoint", None) else ""
        print(f"gpscale {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
