"""Shared helpers of the benchmark scripts: data, child-process measurements, JSON and Markdown output.

This module imports only the standard library at module level, so the orchestrating parent process
of ``bench_mll.py`` stays small (torch / gpytorch are imported inside the measurement children).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = (REPO_ROOT / ".." / "shared" / "data" / "uci").resolve()
RESULT_TAG = "@@BENCH_RESULT@@"
GIB = float(1 << 30)


# ---------------------------------------------------------------------------------------------- data
def load_problem(n: int, d: int = 8, *, data_dir=None, dataset: str = "kin40k", synthetic: bool = False,
                 seed: int = 0, lengthscale: float = 1.0, outputscale: float = 1.0, noise: float = 0.1):
    """Return ``(X, y, info)`` as float64 numpy arrays, columns of ``X`` and ``y`` standardised.

    ``dataset`` (``<data_dir>/<dataset>.npz`` with ``X`` ``(N, d)`` and ``y``) is used when it exists,
    has ``d`` columns and at least ``n`` rows and ``synthetic`` is off: a random subsample of ``n`` rows
    (``seed``).  Otherwise a synthetic problem of the same width is generated (see :func:`synthetic_problem`).
    ``info`` says which, so results can be labelled.
    """
    import numpy as np

    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    path = data_dir / f"{dataset}.npz"
    reason = None
    if synthetic:
        reason = "--synthetic"
    elif not path.exists():
        reason = f"{path} not found"
    else:
        with np.load(path, allow_pickle=False) as f:
            X_all, y_all = f["X"], f["y"]
        if X_all.shape[1] != d:
            reason = f"{dataset} has d={X_all.shape[1]}, need d={d}"
        elif X_all.shape[0] < n:
            reason = f"{dataset} has {X_all.shape[0]} rows < n={n}"
    if reason is None:
        rng = np.random.default_rng(seed)
        idx = rng.permutation(X_all.shape[0])[:n]
        X = X_all[idx].astype(np.float64)
        y = y_all[idx].astype(np.float64).reshape(-1)
        info = {"source": dataset, "path": str(path), "subsample_seed": seed, "rows_available": int(X_all.shape[0])}
    else:
        X, y = synthetic_problem(n, d, seed=seed, lengthscale=lengthscale, outputscale=outputscale, noise=noise)
        info = {"source": f"synthetic-d{d}", "why_synthetic": reason, "seed": seed,
                "generator": "X ~ N(0, I_d); y = f(X) + eps, f a 1024-feature random-Fourier draw from the "
                             "RBF GP prior at the benchmark hyperparameters, eps ~ N(0, noise)"}
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    y = (y - y.mean()) / (y.std() if y.std() > 0 else 1.0)
    info.update(n=int(n), d=int(d), standardized=True)
    return X, y, info


def synthetic_problem(n: int, d: int, *, seed: int = 0, lengthscale: float = 1.0, outputscale: float = 1.0,
                      noise: float = 0.1, num_features: int = 1024, chunk: int = 8192):
    """``X ~ N(0, I_d)`` and ``y = f(X) + eps``, ``f`` an approximate draw from ``GP(0, s * RBF(ell))``.

    Random Fourier features (Rahimi & Recht 2007), computed in row chunks so memory stays
    ``O(chunk * num_features)`` at any ``n``.
    """
    import numpy as np

    rng = np.random.default_rng(10_000 + seed)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((d, num_features)) / lengthscale
    b = rng.uniform(0.0, 2.0 * np.pi, num_features)
    w = rng.standard_normal(num_features) * np.sqrt(2.0 * outputscale / num_features)
    f = np.empty(n)
    for i in range(0, n, chunk):
        f[i:i + chunk] = np.cos(X[i:i + chunk] @ W + b) @ w
    y = f + np.sqrt(noise) * rng.standard_normal(n)
    return X, y


def array_digest(*arrays) -> str:
    """Short sha256 of the arrays' bytes: proves two measurements saw the same data."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_gb() -> float | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024 / GIB


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GiB.

    ``VmHWM`` from ``/proc/self/status`` (high-water mark of this process image, reset at exec, so
    a child started from a big parent does not inherit the parent's peak); falls back to
    ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS) off Linux.
    """
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024 / GIB
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / GIB if sys.platform == "darwin" else r * 1024 / GIB


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``).

    Lets one process measure the peak of several consecutive steps; returns False where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / GIB if sys.platform == "darwin" else r * 1024 / GIB


def set_memory_limit(gb: float | None) -> None:
    """Cap this process's address space (RLIMIT_AS) so a too-large allocation raises instead of OOM-killing."""
    if gb is None or gb <= 0:
        return
    limit = int(gb * GIB)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def is_oom_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in ("can't allocate memory", "cannot allocate memory", "out of memory",
                                  "defaultcpuallocator", "std::bad_alloc", "bad_alloc"))


# ---------------------------------------------------------------------------------------------- children
def run_child(argv: list[str], *, timeout: float | None, env: dict | None = None) -> dict:
    """Run ``argv`` (a worker invocation) and return the JSON record it printed after ``RESULT_TAG``.

    Never raises for a failed child: a non-zero exit, a signal (e.g. SIGKILL from the kernel's OOM
    killer), a timeout or a missing result all become ``{"status": "failed", "error": ...}``.
    """
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "error": f"timeout after {timeout:.0f} s", "reason": "timeout",
                "stderr_tail": _tail(e.stderr), "child_wall_s": time.perf_counter() - t0}
    out = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
    if out is None:
        if proc.returncode < 0:
            import signal
            try:
                name = signal.Signals(-proc.returncode).name
            except ValueError:
                name = str(-proc.returncode)
            why = f"killed by {name}" + (" (likely the kernel OOM killer)" if name == "SIGKILL" else "")
        else:
            why = f"exit status {proc.returncode} without a result"
        out = {"status": "failed", "error": why, "reason": "oom" if "OOM" in why else "crash"}
    out["stderr_tail"] = _tail(proc.stderr) if out.get("status") != "ok" else ""
    out["child_wall_s"] = time.perf_counter() - t0
    out["child_returncode"] = proc.returncode
    return out


def guarded_worker(record: dict, body, *, memory_limit_gb=None, threads=None) -> int:
    """Worker side: apply the limits, run ``body()`` (returns a dict merged into ``record``), always emit.

    Any exception -- including MemoryError under the address-space limit -- becomes
    ``status="failed"`` with ``reason`` ``oom`` or ``error`` and a traceback tail, so the parent
    always gets a record.
    """
    set_memory_limit(memory_limit_gb)
    record.setdefault("status", "failed")
    try:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        record["torch_threads"] = torch.get_num_threads()
        record.update(body())
        record["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - the parent must always get a record
        import traceback

        record.update(status="failed", reason="oom" if is_oom_error(exc) else "error",
                      error=f"{type(exc).__name__}: {str(exc)[:500]}", traceback=traceback.format_exc()[-3000:])
    record["peak_rss_gb"] = peak_rss_gb()
    emit_result(record)
    return 0


def _tail(text, limit: int = 2000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-limit:]


def emit_result(record: dict) -> None:
    """Worker side: print the record on one tagged line for :func:`run_child`."""
    sys.stdout.write(RESULT_TAG + json.dumps(record, default=_json_default) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- output
def machine_info() -> dict:
    info = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_gb"] = round(int(line.split()[1]) * 1024 / GIB, 2)
                    break
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    info.update(library_versions())
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                cwd=REPO_ROOT, capture_output=True, text=True,
                                                timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def library_versions() -> dict:
    """Versions from package metadata (does not import torch into the caller)."""
    from importlib import metadata

    out = {}
    for name in ("torch", "gpytorch", "linear_operator", "gpscale", "numpy"):
        try:
            out[f"{name}_version"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"{name}_version"] = None
    return out


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path, payload) -> None:
    """Write atomically (tmp + rename) so an interrupted long run never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def replace_markdown_section(path, key: str, body: str, title: str = "# Benchmarks") -> None:
    """Put ``body`` between ``<!-- BEGIN key -->`` / ``<!-- END key -->`` markers in ``path``.

    Each script owns one section, so ``bench_mll.py`` and ``crossover.py`` can both render into
    ``docs/benchmarks.md`` without overwriting each other.  The file is created when missing.
    """
    path = Path(path)
    begin, end = f"<!-- BEGIN {key} (generated; edits inside are overwritten) -->", f"<!-- END {key} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else (
        f"{title}\n\nGenerated by the scripts in `benchmarks/` (see `benchmarks/README.md`); raw numbers "
        f"are in `benchmarks/results/`.\n")
    start = text.find(f"<!-- BEGIN {key} ")
    stop = text.find(end)
    if start >= 0 and stop > start:
        text = text[:start] + block + text[stop + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def aggregate_times(record: dict, runs: list, stat: str | None, keys=("forward_s", "backward_s", "total_s")) -> None:
    """Fill ``record`` from repeated runs: the last run's other figures, each time in ``keys`` as the
    min (``stat == "min"``) or median over the runs, and every run's value under ``<key>_all``."""
    record.update({k: v for k, v in runs[-1].items() if k not in keys})
    agg = min if stat == "min" else statistics.median
    for key in keys:
        record[key] = agg(r[key] for r in runs)
        record[key + "_all"] = [r[key] for r in runs]


def fmt(x, spec: str = ".3g", none: str = "—") -> str:
    if x is None:
        return none
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)
