"""Data sets for the command line: loading ``.npz`` / ``.csv`` files, the demo problem, splits.

File formats
------------
``.npz``
    Arrays ``X`` of shape ``(n, d)`` (or ``(n,)`` for one input column) and ``y`` of shape ``(n,)``,
    e.g. written by ``numpy.savez("data.npz", X=X, y=y)``.
``.csv``
    Comma separated numbers, one row per point, the **last column is y**.  A first line that is
    not numeric is taken as a header and skipped.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

__all__ = ["DataError", "load_data", "make_demo", "train_test_split", "subsample"]


class DataError(ValueError):
    """A data file is missing, unreadable, or not in the expected format."""


def load_data(path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(X, y)`` from a ``.npz`` (arrays ``X``, ``y``) or ``.csv`` (last column ``y``) file.

    Parameters
    ----------
    path : str or path

    Returns
    -------
    X : (n, d) float array
    y : (n,) float array

    Raises
    ------
    DataError
        Missing file, unknown extension, missing arrays, non-numeric or misshaped content.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; pass a .npz or .csv file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        X, y = _load_npz(path)
    elif ext == ".csv":
        X, y = _load_csv(path)
    else:
        raise DataError(f"unsupported data format {ext or '(no extension)'!r} for {path!r}; use .npz "
                        "(arrays X and y) or .csv (numbers, last column = y)")
    return _check_shapes(X, y, path)


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("X", "y") if k not in data.files]
            if missing:
                raise DataError(f"{path!r} has no array {' or '.join(repr(k) for k in missing)} (found: "
                                f"{', '.join(data.files) or 'nothing'}); save it with numpy.savez(path, X=X, y=y)")
            return np.asarray(data["X"]), np.asarray(data["y"])
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path!r} as a .npz archive ({exc})") from exc


def _load_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = None
    for skip in (0, 1):  # a non-numeric first line is a header
        try:
            table = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=skip, dtype=np.float64)
            break
        except ValueError as exc:
            error = exc
        except OSError as exc:
            raise DataError(f"cannot read {path!r} ({exc})") from exc
    if table is None:
        raise DataError(f"{path!r} is not a comma-separated table of numbers ({error})")
    if table.shape[1] < 2:
        raise DataError(f"{path!r} has {table.shape[1]} column(s); a .csv needs at least one input column "
                        "and a last column with y")
    return table[:, :-1], table[:, -1]


def _check_shapes(X: np.ndarray, y: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
    if X.ndim == 1:
        X = X[:, None]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if X.ndim != 2 or y.ndim != 1:
        raise DataError(f"{path!r}: X must be (n, d) and y (n,), got shapes {X.shape} and {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise DataError(f"{path!r}: X has {X.shape[0]} rows but y has {y.shape[0]} entries")
    if X.shape[0] == 0:
        raise DataError(f"{path!r} holds no data points")
    if not (np.issubdtype(X.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise DataError(f"{path!r}: X and y must be numeric, got dtypes {X.dtype} and {y.dtype}")
    X = X if np.issubdtype(X.dtype, np.floating) else X.astype(np.float64)
    y = y if np.issubdtype(y.dtype, np.floating) else y.astype(np.float64)
    return X, y


def make_demo(n: int = 20000, d: int = 8, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The embedded demo regression problem: a smooth function of a few directions plus noise.

    ``X`` is uniform on :math:`[-1, 1]^d` (float32).  With :math:`u_j = w_j^T x` for three random unit
    directions :math:`w_j` that live in the first ``d - d // 4`` coordinates (the remaining columns
    are irrelevant, which ARD should discover),

    .. math:: y = \\sin(3 u_1) + 0.5 \\cos(4 u_2) + u_3^2 + \\varepsilon, \\qquad
              \\varepsilon \\sim N(0, \\mathrm{noise}^2),

    so the best attainable test RMSE is about ``noise`` (the signal's std is about 0.85).  The noise
    level sets the conditioning of :math:`K + \\sigma^2 I`, hence the CG iterations per step: at the
    default 0.3 (11% of the variance of ``y``, typical of real regression data) a 20k-point step takes
    about 20 preconditioned CG iterations.

    Parameters
    ----------
    n : int, default 20000
    d : int, default 8
    seed : int, default 0
    noise : float, default 0.3

    Returns
    -------
    X : (n, d) float32 array
    y : (n,) float32 array
    """
    if n < 1 or d < 1:
        raise ValueError(f"make_demo needs n >= 1 and d >= 1, got n={n}, d={d}")
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.0, 1.0, size=(n, d)).astype(np.float32)
    relevant = max(1, d - d // 4)
    W = rng.standard_normal((d, 3))
    W[relevant:] = 0.0
    W /= np.linalg.norm(W, axis=0, keepdims=True)
    U = X.astype(np.float64) @ W
    f = np.sin(3 * U[:, 0]) + 0.5 * np.cos(4 * U[:, 1]) + U[:, 2] ** 2
    y = f + noise * rng.standard_normal(n)
    return X, y.astype(np.float32)


def train_test_split(X, y, test_fraction: float = 0.1, seed: int = 0):
    """Seeded random split; returns ``X_train, X_test, y_train, y_test`` (test part may be empty).

    At least one test point is kept when ``test_fraction > 0`` and at least two training points.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test fraction must be in [0, 1), got {test_fraction}")
    n = X.shape[0]
    n_test = int(round(test_fraction * n))
    if test_fraction > 0:
        n_test = max(1, n_test)
    if n - n_test < 2:
        raise DataError(f"{n} points leave {n - n_test} for training after the test split; at least 2 are needed")
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return X[train], X[test], y[train], y[test]


def subsample(X, y, n: int, seed: int = 0):
    """A seeded random subset of ``n`` rows (all rows when ``n >= len(X)``)."""
    if n < 1:
        raise DataError(f"--n must be >= 1, got {n}")
    if n >= X.shape[0]:
        return X, y
    idx = np.sort(np.random.default_rng(seed).choice(X.shape[0], size=n, replace=False))
    return X[idx], y[idx]
