"""Fit checkpoints: atomic save, load, and a fingerprint that ties a checkpoint to its problem.

A checkpoint is a plain dict written with :func:`torch.save` (tensors, numbers, strings, lists and
dicts only, so it loads with ``torch.load(weights_only=True)``).  Keys:

``version``
    Format version (:data:`FORMAT_VERSION`).
``fingerprint``
    What the fit was for (data hash, sizes, kernel, optimiser, ...); see :func:`fingerprint`.
``optimizer``
    ``"lbfgs"`` or ``"adam"``.
``theta``
    Current unconstrained parameter vector (float64), in the order of ``GPParams.parameters()``.
``iteration``, ``best_value``, ``losses``
    Optimiser iterations done, the best objective value seen, and the loss of each iteration.
``hyperparameters``
    Constrained values on the standardised scale (for humans reading the file).
``history`` (L-BFGS-B)
    Every objective evaluation so far (``x``, ``f``, ``g``).  SciPy's L-BFGS-B keeps its curvature
    memory private, so a resumed fit re-runs it from the start and *replays* these evaluations
    instead of recomputing them: it reaches the interrupted iterate with the same memory and
    continues exactly as an uninterrupted fit would.
``adam_state`` (Adam)
    ``torch.optim.Adam.state_dict()``.
``finished``, ``message``
    Whether the optimiser stopped by itself, and why.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import torch

#: Bumped whenever the layout of the checkpoint dict changes incompatibly.
FORMAT_VERSION = 1


def data_hash(X: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of the training data, so a checkpoint is never resumed on different data."""
    h = hashlib.sha256()
    for t in (X, y):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(X: torch.Tensor, y: torch.Tensor, config: dict) -> dict:
    """Identify a fitting problem: data hash, sizes and the settings that change the objective.

    Parameters
    ----------
    X, y : tensors
        Raw (unstandardised) training data as given to ``fit``.
    config : dict
        Estimator settings that define the objective and the optimiser path.  ``max_iter`` is left
        out on purpose: resuming with a larger ``max_iter`` is the point of a checkpoint.
    """
    fp = {"n": int(X.shape[0]), "d": int(X.shape[1]), "data_sha256": data_hash(X, y)}
    fp.update({k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
               for k, v in config.items()})
    return fp


def check_compatible(state: dict, expected: dict, path) -> None:
    """Raise a clear ``ValueError`` when a checkpoint was written for another problem."""
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {state.get('version')!r}, expected "
                         f"{FORMAT_VERSION}; delete it or pass another checkpoint path")
    saved = state.get("fingerprint", {})
    for key, value in expected.items():
        if saved.get(key) != value:
            what = "the training data differ" if key == "data_sha256" else \
                f"{key} was {saved.get(key)!r}, now {value!r}"
            raise ValueError(f"checkpoint {path} was written for a different fit ({what}); delete it, pass "
                             "another checkpoint path, or restore the original settings")


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    A crash while writing leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gpscale-ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave temporary files behind, whatever interrupted the write.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path) -> dict | None:
    """Load a checkpoint written by :func:`save_checkpoint`; ``None`` when ``path`` does not exist."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and a remedy
        raise ValueError(f"cannot read checkpoint {path} ({exc}); delete it or pass another path") from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a gpscale fit state; delete it or pass another path")
    return state
