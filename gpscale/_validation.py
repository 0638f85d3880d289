"""Input validation shared by every entry point.

Each check raises ``ValueError`` / ``TypeError`` with a message that says what was wrong and how to
fix it, so a user never meets a shape error from deep inside a matmul.
"""

from __future__ import annotations

import numbers

import torch

# Inputs are float32 or float64; low-precision *products* are a solver policy, not an input dtype.
_FLOATS = (torch.float32, torch.float64)


def as_tensor(name: str, value, dtype=None, device=None) -> torch.Tensor:
    """Convert array-likes to a tensor, keeping an existing tensor's dtype/device unless asked."""
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(value)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise TypeError(f"{name} must be a tensor or array-like of numbers, got {type(value).__name__}") from exc
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype() if dtype is None else dtype)
    if dtype is not None or device is not None:
        t = t.to(dtype=dtype, device=device)
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN / Inf entries with the count and the first offending index."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()
        raise ValueError(
            f"{name} contains {bad.shape[0]} NaN/Inf value(s) (first at index {tuple(bad[0].tolist())}); "
            "remove or impute those rows before fitting"
        )


def check_inputs(X: torch.Tensor, name: str = "X", min_rows: int = 1) -> torch.Tensor:
    """Check a design matrix: floating, 2-D ``(n, d)``, finite, at least ``min_rows`` rows."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if X.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32 or float64), got {X.dtype}; use {name}.float()")
    if X.dim() == 1:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(X.shape)}; for 1-D inputs use {name}[:, None]")
    if X.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(X.shape)}")
    if X.shape[0] < min_rows:
        raise ValueError(f"{name} has n={X.shape[0]} rows; at least {min_rows} are needed")
    if X.shape[1] < 1:
        raise ValueError(f"{name} has no columns (shape {tuple(X.shape)})")
    check_finite(name, X)
    return X


def check_targets(y: torch.Tensor, n: int, name: str = "y") -> torch.Tensor:
    """Check a target vector against ``n`` rows of X; accept ``(n,)`` or ``(n, 1)``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {tuple(y.shape)}; multi-output targets are not supported")
    if y.shape[0] != n:
        raise ValueError(f"X has {n} rows but {name} has {y.shape[0]} entries; they must match")
    check_finite(name, y)
    return y


def check_same(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    """Require two tensors to share dtype and device (no silent copies or promotions)."""
    if a.device != b.device:
        raise ValueError(f"{na} is on {a.device} but {nb} is on {b.device}; move both to one device with .to(device)")
    if a.dtype != b.dtype:
        raise TypeError(f"{na} has dtype {a.dtype} but {nb} has dtype {b.dtype}; convert one with .to({na}.dtype)")


def check_positive_hyper(name: str, value) -> None:
    """Hyperparameters (lengthscale, outputscale, noise) must be finite and > 0."""
    t = torch.as_tensor(value)
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"{name} must be finite and > 0, got {t.tolist()}; pass a positive value")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_splits(splits, name: str = "splits") -> None:
    """``ValueError`` unless ``splits`` is a CUDA launch's column splits: a positive int or ``"auto"``."""
    if splits != "auto" and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"{name} must be a positive int or 'auto', got {splits!r}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_device(name: str, value) -> torch.device:
    """A device name or ``torch.device`` that this process can use (CUDA ones need a visible GPU)."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}={value!r} but this torch build sees no CUDA GPU (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False); use 'cpu' or install a CUDA build of torch")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name}={value!r} but only {count} CUDA device(s) are visible (indices 0..{count - 1})")
    return dev


def check_tolerance(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or not value >= 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
