"""Measured choice between the fused backends for ``backend="auto"`` on a GPU.

Which fused backend is fastest depends on the GPU, the kernel, ``d`` and the size: on the first lent
H100 KeOps led gpscale's ``tc3`` by 1.2-1.4x at n = 100k (docs/backends.md), and an A100, another
KeOps build or a new csrc variant can reverse that.  A fixed order measured on one machine is right
only there, so ``auto`` times the candidates on the operator's own data the first time it meets a
problem class, and remembers the winner for the rest of the process.

The probe
---------
Every row of ``X`` against the first :data:`PROBE_COLUMNS` rows of ``Z``, :data:`PROBE_RHS` columns
(one CG product of a few probes).  Keeping all rows keeps each backend's launch grid (and so its
occupancy) as in the real products, while the short ``Z`` bounds the cost: about 6% of one product
at n = m = 1M per timing.  Each candidate runs once untimed (KeOps compiles a formula, the CUDA
backend loads its cubin), then :data:`REPEATS` timed runs; the minimum counts.  The fused backends
compute every pair the same way whether ``Z`` is ``X`` or not, so the per-pair cost transfers to the
symmetric operator.  ``torch`` is not a candidate: its cost depends on the tile cache, which
:func:`gpscale.operators.backends.select_backend` has already weighed.

What is remembered, and what is not
-----------------------------------
The key is the problem class (:func:`problem_class`): device name, kernel, dtype, ``ceil(d / 8)``
(the tensor-core k-steps), and the row count and probe width, each to the nearest power of two;
then the product (:func:`choose`): the mode and its 16-column chunk count.  The operator's backend
is the CG product's choice (``"f"``, one chunk); a wider or derivative product of the same operator
is timed on its own the first time it occurs and may run on another candidate (KeOps computes each
pair once for all columns, the CUDA kernels once per chunk: the ARD gradient's ``t(2d+1)``
columns are where they differ most).  The table lives in this process only (:func:`tunings`, :func:`clear`): a table on disk would keep a choice
made while another job shared the GPU.  A candidate that fails (compile error, missing library) is
left out with its reason.  Within :data:`TIE` of the fastest, the earlier candidate of the given
order wins, so the choice does not flip on timing noise.  Under ``torch.distributed`` with more than
one process no tuning runs (:func:`gpscale.operators.backends.select_backend` keeps the static
order): each rank tuning on its own could pick different backends, and the ranks' products would
then differ in the last bits.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

#: Rows of ``Z`` the probe product uses (all of ``Z`` when it has fewer).
PROBE_COLUMNS = 1 << 16
#: Output columns per block of the CUDA kernels: a product with more recomputes the kernel per chunk.
CHUNK_COLUMNS = 16
#: Right-hand-side columns of the CG product's probe (one chunk).
PROBE_RHS = CHUNK_COLUMNS
#: Timed runs per candidate after the untimed first run.
REPEATS = 2
#: Candidates within this fraction of the fastest count as tied (the earlier one wins).
TIE = 0.05

_TABLE: dict[tuple, "Tuning"] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Tuning:
    """What tuning measured for one problem class.

    Attributes
    ----------
    choice : str or None
        The backend ``auto`` uses (``None`` when every candidate failed).
    seconds : dict
        Best probe time per candidate that ran, keyed by its label (``"keops"``, ``"cuda:tc3"``).
    errors : dict
        Why each failed candidate was left out.
    probe : tuple
        ``(rows, columns, rhs)`` of the timed product.
    key : tuple
        The problem class (:func:`problem_class`).
    mode : str
        The product timed (``"f"``, ``"f_dq"`` or ``"d"``).
    """

    choice: str | None
    seconds: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    probe: tuple = ()
    key: tuple = ()
    mode: str = "f"

    def summary(self) -> str:
        """One line for solver statistics: ``"keops 0.0712 s, cuda:tc3 0.0904 s per 1000000x65536x16 f probe"``."""
        timed = ", ".join(f"{k} {v:.4g} s" for k, v in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        failed = "".join(f"; {k} failed: {v}" for k, v in self.errors.items())
        return f"{timed or 'no candidate ran'} per {'x'.join(map(str, self.probe))} {self.mode} probe{failed}"


def problem_class(op) -> tuple:
    """The key under which a tuning is remembered (see the module docstring)."""
    # Tuning runs only where auto already considers the cuda backend (a CUDA device), so importing
    # gpscale._ext here adds nothing to a CPU-only path.
    from .._ext.launch import ksteps  # noqa: PLC0415

    n, m = op.shape
    dev = op.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return (name, op.kernel.name, str(op.dtype), ksteps(op._Xs.shape[1]), round(math.log2(max(n, 1))),
            round(math.log2(max(min(m, PROBE_COLUMNS), 1))))


def _probe_view(op, backend: str):
    """A stand-in operator for ``fused_products``: all rows of ``op``, the first probe columns of ``Z``.

    It carries the full operator's norms (``_xn``, ``_zn``), so the CUDA backend's expansion guard
    (:func:`gpscale.operators.cuda_backend.variant_for`) picks the variant the real products will use.
    """
    cols = min(op.shape[1], PROBE_COLUMNS)
    return SimpleNamespace(backend=backend, kernel=op.kernel, _Xs=op._Xs, _Zs=op._Zs[:cols].contiguous(),
                           _xn=op._xn, _zn=op._zn, _symmetric=False, shape=(op.shape[0], cols))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_run(view, V, mode):
    from .backends import fused_products  # noqa: PLC0415 - backends imports this module (lazy both ways)

    return fused_products(view, V, mode)


def measure(op, candidates, *, mode: str = "f", rhs: int = PROBE_RHS, run=_default_run, clock=time.perf_counter,
            repeats: int = REPEATS) -> Tuning:
    """Time each candidate on ``op``'s probe product and pick the fastest (no table involved).

    Parameters
    ----------
    op : CrossKernelOperator or KernelOperator
        A built operator (its scaled inputs ``_Xs``, ``_Zs`` and norms are used).
    candidates : sequence of str
        Fused backends in order of preference (ties go to the earlier one).
    mode : {"f", "f_dq", "d"}
        The product to time (:mod:`gpscale.operators.backends`).
    rhs : int
        Right-hand-side columns of the probe.
    run : callable, optional
        ``run(view, V, mode)`` computes the probe product; the default is
        :func:`gpscale.operators.backends.fused_products`.
    clock : callable, optional
        Seconds as a float (injectable for tests).
    repeats : int
        Timed runs per candidate after the untimed first one.

    Notes
    -----
    Cost per candidate: ``(1 + repeats)`` products of ``n x min(m, PROBE_COLUMNS)`` pairs with
    ``rhs`` columns, plus whatever the first run compiles.
    """
    from .backends import backend_label  # noqa: PLC0415 - backends imports this module

    gen = torch.Generator(device=op.device).manual_seed(0)
    cols = min(op.shape[1], PROBE_COLUMNS)
    V = torch.randn(cols, rhs, dtype=op.dtype, device=op.device, generator=gen)
    seconds, errors, label_of = {}, {}, {}
    for cand in candidates:
        view = _probe_view(op, cand)
        try:
            run(view, V, mode)  # compiles / loads, and fills caches: never timed
            best = math.inf
            for _ in range(repeats):
                _sync(op.device)
                t0 = clock()
                run(view, V, mode)
                _sync(op.device)
                best = min(best, clock() - t0)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is left out, with its reason
            errors[cand] = f"{type(exc).__name__}: {exc}"
            continue
        label_of[cand] = backend_label(view)  # "cuda:tc3": the variant the CUDA backend picked
        seconds[label_of[cand]] = best
    ran = [c for c in candidates if c in label_of]
    choice = None
    if ran:
        fastest = min(seconds[label_of[c]] for c in ran)
        choice = next(c for c in ran if seconds[label_of[c]] <= fastest * (1 + TIE))
    return Tuning(choice, seconds, errors, (op.shape[0], cols, rhs), problem_class(op), mode)


def choose(op, candidates, *, mode: str = "f", rhs: int = PROBE_RHS, **kwargs) -> Tuning:
    """The remembered :class:`Tuning` for ``op``'s problem class, product and candidates, measured once.

    The product is ``mode`` with ``rhs`` columns, remembered per 16-column chunk count (the CUDA
    kernels recompute the kernel once per chunk; KeOps once for all columns, so wide products --
    the ARD derivative's ``t(2d+1)`` columns, a batch of predictive variances -- may prefer another
    backend than the CG product).  Keyword arguments go to :func:`measure`.  Thread-safe:
    concurrent first calls measure once.
    """
    key = (problem_class(op), mode, chunks(rhs), tuple(candidates))
    with _LOCK:
        if key not in _TABLE:
            _TABLE[key] = measure(op, candidates, mode=mode, rhs=rhs, **kwargs)
        return _TABLE[key]


def chunks(rhs: int) -> int:
    """16-column chunks of a product with ``rhs`` columns (the CUDA kernels' column blocks)."""
    return max(1, -(-int(rhs) // CHUNK_COLUMNS))


def tunings() -> dict:
    """A copy of this process's table: ``{(problem_class, mode, chunks, candidates): Tuning}``."""
    with _LOCK:
        return dict(_TABLE)


def clear() -> None:
    """Forget every tuning (the next ``auto`` operator of each class measures again)."""
    with _LOCK:
        _TABLE.clear()
