"""Benchmark problems: data loading, subsampling, synthetic data and cached hyperparameter fits.

Every arm of a benchmark must solve the *same* linear system, so the hyperparameters of each data
set are fitted once -- exact GP marginal likelihood by dense Cholesky
(:func:`gpscale.marginal_log_likelihood` with ``method="cholesky"``) on a random subsample of
``hyper_n`` points, optimised with SciPy's L-BFGS-B -- and cached in a JSON file keyed by data set,
kernel and subsample settings.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import marginal_log_likelihood
from ..kernels import make_kernel

#: Lower bound on the fitted noise variance (GPyTorch's default ``GreaterThan(1e-4)`` constraint).
NOISE_FLOOR = 1e-4


@dataclass
class Problem:
    """A standardised regression data set and the hyperparameters every arm uses."""

    name: str
    X: np.ndarray  # (n, d) float64, columns standardised with the full data's statistics
    y: np.ndarray  # (n,) float64, standardised
    rows_total: int
    hypers: dict

    def kernel(self, kernel_name: str, dtype=torch.float64):
        """The gpscale kernel at the fitted hyperparameters."""
        return make_kernel(kernel_name, lengthscale=torch.tensor(self.hypers["lengthscale"], dtype=torch.float64),
                           outputscale=self.hypers["outputscale"]).to(dtype)


def standardize(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score the columns of ``X`` and ``y`` (constant columns are only centred)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    sx = X.std(0)
    X = (X - X.mean(0)) / np.where(sx > 0, sx, 1.0)
    sy = y.std()
    return X, (y - y.mean()) / (sy if sy > 0 else 1.0)


def synthetic_data(n: int, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth function of ``d`` uniform inputs plus noise (the CI stand-in for a UCI set)."""
    rng = np.random.default_rng(1000 + seed)
    X = rng.uniform(-2.0, 2.0, size=(n, d))
    f = np.sin(2.0 * X[:, 0]) + 0.5 * np.cos(1.5 * X[:, -1]) * X[:, 0] + 0.3 * X[:, 1 % d] ** 2
    return X, f + 0.1 * rng.standard_normal(n)


def load_dataset(name: str, data_dir: str | None, synthetic_n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``X, y`` of ``<data_dir>/<name>.npz`` (arrays ``X``, ``y``) or of the synthetic problem."""
    if name == "synthetic":
        return synthetic_data(synthetic_n or 2000)
    path = os.path.join(data_dir or ".", f"{name}.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data set {name!r}: {path} does not exist (check --data-dir, or use --synthetic)")
    with np.load(path, allow_pickle=False) as f:
        return np.asarray(f["X"]), np.asarray(f["y"])


def subsample_rows(n_total: int, n: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``min(n, n_total)`` row indices, in random order."""
    return np.random.default_rng(seed).permutation(n_total)[: min(n, n_total)]


def fit_hypers(X: np.ndarray, y: np.ndarray, kernel_name: str, max_iter: int = 60) -> dict:
    """Fit ARD lengthscales, outputscale, noise and a constant mean by exact (Cholesky) MLL.

    Parameters
    ----------
    X : (m, d) array, y : (m,) array
        A subsample small enough for dense Cholesky (``m`` of 1500-2000 takes seconds).
    kernel_name : {"rbf", "matern12", "matern32", "matern52"}
    max_iter : int
        L-BFGS-B iterations.

    Returns
    -------
    dict with ``lengthscale`` (list), ``outputscale``, ``noise``, ``mean``, ``mll_per_point``,
    ``n_fit``, ``iterations`` and ``seconds``.

    Notes
    -----
    Each objective evaluation is one :math:`O(m^3)` Cholesky plus :math:`O(m^2 d)` gradient work.
    """
    from scipy.optimize import minimize

    t0 = time.perf_counter()
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    d = X.shape[1]
    kernel = make_kernel(kernel_name, lengthscale=torch.full((d,), math.sqrt(d)), outputscale=1.0).double()
    raw_noise = torch.tensor(math.log(math.expm1(0.1)), dtype=torch.float64, requires_grad=True)
    mean = torch.zeros((), dtype=torch.float64, requires_grad=True)
    params = [kernel.raw_lengthscale, kernel.raw_outputscale, raw_noise, mean]
    sizes = [p.numel() for p in params]

    def objective(theta):
        with torch.no_grad():
            for p, chunk in zip(params, np.split(theta, np.cumsum(sizes)[:-1])):
                p.copy_(torch.as_tensor(chunk, dtype=torch.float64).reshape(p.shape))
        for p in params:
            p.grad = None
        noise = torch.nn.functional.softplus(raw_noise) + NOISE_FLOOR
        loss = -marginal_log_likelihood(Xt, yt, kernel, noise, mean, method="cholesky") / len(y)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
        return float(loss.detach()), np.nan_to_num(grad)

    theta0 = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    objective(res.x)
    with torch.no_grad():
        noise = float(torch.nn.functional.softplus(raw_noise) + NOISE_FLOOR)
        return {"lengthscale": kernel.lengthscale.reshape(-1).tolist(), "outputscale": float(kernel.outputscale),
                "noise": noise, "mean": float(mean), "mll_per_point": -float(res.fun), "n_fit": int(len(y)),
                "iterations": int(res.nit), "seconds": time.perf_counter() - t0}


def load_problem(name: str, *, data_dir, max_n: int, kernel_name: str, hyper_n: int, seed: int,
                 cache_path: str | None, hyper_iter: int = 60, log=print) -> Problem:
    """Load, standardise and subsample a data set, with hyperparameters from the cache or a fresh fit."""
    X_all, y_all = load_dataset(name, data_dir, synthetic_n=max_n)
    X_all, y_all = standardize(X_all, y_all)
    N = X_all.shape[0]
    key = f"{name}|{kernel_name}|ard|N={N}|hyper_n={min(hyper_n, N)}|seed={seed}"
    cache = _read_cache(cache_path)
    if key in cache:
        hypers = cache[key]
    else:
        fit_idx = subsample_rows(N, hyper_n, seed + 7919)
        log(f"  fitting hyperparameters of {name} on {len(fit_idx)} points (Cholesky MLL, L-BFGS-B) ...")
        hypers = fit_hypers(X_all[fit_idx], y_all[fit_idx], kernel_name, hyper_iter)
        cache[key] = hypers
        _write_cache(cache_path, cache)
    idx = subsample_rows(N, max_n, seed)
    return Problem(name, X_all[idx], y_all[idx] - hypers["mean"], N, hypers)


def _read_cache(path) -> dict:
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_cache(path, cache: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(cache, fh, indent=1, sort_keys=True)
