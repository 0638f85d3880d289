#!/usr/bin/env python
"""Exact GPyTorch training loss at the initial hyperparameters, by a float64 dense Cholesky.

The reference for ``bench_gpytorch.py``'s first-step losses (both arms evaluate the same model at
the same initial hyperparameters in step 1): same data split, same model code, float64,
``-log p(y) / n``.  Memory ``~ 8 n^2`` bytes (3.2 GB at n = 20000); a minute or two on 2 cores.

    python benchmarks/gpytorch_exact_loss.py --n 20000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import bench_gpytorch as B


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=4000)
    p.add_argument("--dataset", default="protein")
    p.add_argument("--data-dir", type=Path, default=C.DEFAULT_DATA_DIR)
    p.add_argument("--kernel", default="matern52")
    p.add_argument("--no-ard", dest="ard", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    spec = dict(data_dir=str(args.data_dir), dataset=args.dataset, n=args.n, n_test=args.n_test, seed=args.seed,
                kernel=args.kernel, ard=args.ard, dtype="float64")
    Xn, yn, *_ = B._load(spec)
    X, y = torch.as_tensor(Xn, dtype=torch.float64), torch.as_tensor(yn, dtype=torch.float64)
    model, lik = B._build(X, y, spec)
    t0 = time.perf_counter()
    with torch.no_grad():
        K = model.covar_module(X).to_dense()
        K.diagonal().add_(float(lik.noise))
        L = torch.linalg.cholesky(K)
        del K
        a = torch.linalg.solve_triangular(L, (y - float(model.mean_module.constant))[:, None], upper=False)
        mll = -0.5 * float((a ** 2).sum()) - float(L.diagonal().log().sum()) - 0.5 * len(y) * math.log(2 * math.pi)
    print(f"n={args.n}: exact initial loss -log p(y)/n = {-mll / len(y):.6f}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
