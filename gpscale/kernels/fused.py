"""One-pass evaluation of kernel tiles with ``torch.compile``, for the tiled torch products and gradients.

Why
---
The blocked products evaluate ``f`` on every tile they do not hold in the cache (and once on every tile
they cache, e.g. the 16-bit kernel of a mixed-precision solve).  In eager torch the Matérn profiles
take several elementwise passes over the tile (floor, ``sqrt``, scale, ``exp``, the polynomial: about
nine for ν = 5/2), each reading and writing the whole tile; compiled, they are one pass that reads
the distance tile and overwrites it with ``f`` (in place, like the eager path: a fresh output tile
costs its page faults, about as much as the pass).  Measured on the 2-core CI machine, one
4096 x 4096 float32 tile, two threads: Matérn-5/2 90 -> 7 ms, Matérn-1/2 41 -> 6 ms; one uncached
20 000 x 20 000 product with 16 columns (``bench_kernel_matmul.py --device cpu --sizes 20000
--backends torch``, two runs each): Matérn-5/2 2.7-3.5 -> 0.52-0.54 s, Matérn-1/2 1.5-1.7 -> 0.50 s,
RBF 0.53-0.55 s either way.  RBF is already one in-place ``exp`` of the GEMM output (7 ms per tile;
compiled, no faster) and stays eager.

The MLL gradient's tile pass (:func:`fused_weighted`, every kernel RBF included) is compiled the same
way: ``sum(M o f(q))`` and ``M o f'(q)`` from the distance and weight tiles in one pass instead of
``profile_and_derivative``'s passes and two more over ``M``.  Measured on the same machine, n = 20 000,
d = 8 (ARD), 11 column pairs, uncached: ``bilinear_derivative`` Matérn-5/2 1.37 -> 0.64 s, RBF 0.77 ->
0.61 s; the backward pass of one MLL (Matérn-5/2, rank-100 pivoted Cholesky) 1.8-2.1 -> 0.6-1.0 s.

When
----
Only for operators with at least :data:`COMPILE_MIN_ENTRIES` kernel entries: compiling costs seconds
once per (kernel, dtype, device) and process (inductor caches the code on disk), which a small
operator would never earn back.  If compilation fails -- no C++ compiler, no triton, an unsupported
platform -- the process falls back to the eager profile for good, with one :class:`FusedProfileWarning`
naming the reason.  ``TORCH_COMPILE_DISABLE=1`` (torch's own switch) runs the same function eagerly.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .matern import Matern
from .rbf import RBF

#: Kernel entries (rows x columns) from which an operator evaluates its tiles with the compiled profile.
COMPILE_MIN_ENTRIES = 1 << 28

_LOCK = threading.Lock()
_COMPILED: dict = {}
_FAILED: list = []  # the reason, once a compilation failed (the process then stays eager)


class FusedProfileWarning(RuntimeWarning):
    """The compiled tile profile is unavailable; the tiles are evaluated by the eager ops instead."""


def _floored(u: torch.Tensor, snap: torch.Tensor) -> torch.Tensor:
    """``floor_sqdist_`` out of place: round-off below 0 -- for Matérn-1/2 everything up to ``snap`` -- to 0."""
    return torch.where(u > snap, u, torch.zeros_like(u))


# One function per kernel, each calling the kernel's own reference formula (``Matern.profile``), so the
# compiled pass cannot drift from the definition.  Separate functions, not one closure: dynamo keeps
# its compiled variants per code object (at most 8), and dtypes x devices x kernels would exceed that.
_M12, _M32, _M52 = Matern(nu=0.5), Matern(nu=1.5), Matern(nu=2.5)


def _matern12(u: torch.Tensor, snap: torch.Tensor) -> torch.Tensor:
    return u.copy_(_M12.profile(_floored(u, snap)))


def _matern32(u: torch.Tensor, snap: torch.Tensor) -> torch.Tensor:
    return u.copy_(_M32.profile(_floored(u, snap)))


def _matern52(u: torch.Tensor, snap: torch.Tensor) -> torch.Tensor:
    return u.copy_(_M52.profile(_floored(u, snap)))


#: Kernels whose eager tile profile takes several passes (RBF's is one in-place ``exp``: nothing to gain).
FUSED = {"matern12": _matern12, "matern32": _matern32, "matern52": _matern52}


# The gradient's tile pass (gpscale.operators.derivatives._weighted_sums) needs, per tile of distances q
# and weights M, sum(M o f(q)) and M o f'(q): eagerly profile_and_derivative's passes (up to ten for
# Matérn-5/2) plus two over M.  One function per kernel again, each calling the kernel's own
# profile_and_derivative; M is overwritten with M o f' (in place, as the eager pass did).
_RBF_REF = RBF()


def _weighted(ref, q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``sum(M o f(q))``, leaving ``M o f'(q)`` in ``M``; compiled (per kernel, below) or eager."""
    f, fp = ref.profile_and_derivative(q)
    s = (M * f).sum()
    M.mul_(fp)
    return s


# Thin per-kernel entry points (their own code objects, see above); dynamo inlines _weighted into each.
def _ws_rbf(q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return _weighted(_RBF_REF, q, M)


def _ws_matern12(q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return _weighted(_M12, q, M)


def _ws_matern32(q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return _weighted(_M32, q, M)


def _ws_matern52(q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return _weighted(_M52, q, M)


#: The gradient tile pass per kernel (RBF too: its eager pass is three, the exp and two over M).
FUSED_WEIGHTED = {"rbf": _ws_rbf, "matern12": _ws_matern12, "matern32": _ws_matern32, "matern52": _ws_matern52}


def fused_weighted(kernel, entries: int):
    """The compiled ``(q, M) -> sum(M o f(q))`` (``M`` overwritten with ``M o f'(q)``), or ``None``.

    Same rules as :func:`fused_profile`: large operators only, known kernels, nothing after a failure.
    """
    name = _eligible(kernel, entries, FUSED_WEIGHTED)
    return None if name is None else _compiled(("weighted", name), FUSED_WEIGHTED[name])


def weighted_tile(fn, kernel, q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``sum(M o f(q))``, leaving ``M o f'(q)`` in ``M``: by the compiled ``fn``, or eagerly."""
    if fn is not None and not _FAILED:
        try:
            return fn(q, M)
        except Exception as exc:  # noqa: BLE001 - any compile/runtime failure means: stay eager
            _fail(exc)
    return _weighted(kernel, q, M)


def fused_profile(kernel, entries: int):
    """The compiled ``(u, snap) -> f(u)`` for ``kernel``'s tiles, or ``None`` (evaluate eagerly).

    ``None`` for small operators (``entries < COMPILE_MIN_ENTRIES``), for kernels not in
    :data:`FUSED` (or subclasses of gpscale's) and after a compilation failed in this process.
    """
    name = _eligible(kernel, entries, FUSED)
    return None if name is None else _compiled(name, FUSED[name])


def _eligible(kernel, entries: int, table: dict) -> str | None:
    """``kernel``'s name when its tiles should take a compiled function of ``table``, else ``None``."""
    name = getattr(kernel, "name", None)
    # exact classes only: a subclass may redefine the formulas the reference functions call
    if entries < COMPILE_MIN_ENTRIES or type(kernel) not in (RBF, Matern) or name not in table or _FAILED:
        return None
    return name


def _compiled(key, fn):
    """``torch.compile(fn)``, once per key and process."""
    with _LOCK:
        if key not in _COMPILED:
            # dynamic: edge tiles have other shapes (and snap is a 0-d tensor: a new value never recompiles)
            _COMPILED[key] = torch.compile(fn, dynamic=True, fullgraph=True)
        return _COMPILED[key]


def evaluate(fn, kernel, u: torch.Tensor, snap: float, snap_t: torch.Tensor | None) -> torch.Tensor:
    """``f(u)`` of a distance tile by the compiled ``fn``, or eagerly if it is ``None`` or fails.

    ``snap_t`` is ``snap`` as a 0-d tensor on ``u``'s device (needed with ``fn``), made once by the
    caller: building it per tile would copy a scalar to the GPU (a host synchronisation) for every tile.

    Both paths overwrite ``u`` with the result (the eager one is
    :meth:`~gpscale.kernels.StationaryKernel.profile_scaled_`).
    """
    if fn is not None and not _FAILED:
        try:
            return fn(u, snap_t)
        except Exception as exc:  # noqa: BLE001 - any compile/runtime failure means: stay eager
            _fail(exc)
    return kernel.profile_scaled_(u, snap=snap)


def _fail(exc: Exception) -> None:
    """Record the first compilation failure and warn once; the process is eager from then on."""
    with _LOCK:
        if not _FAILED:
            _FAILED.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            warnings.warn(f"the compiled kernel-tile profile is unavailable ({_FAILED[0]}); tiles are "
                          "evaluated by eager torch ops from now on (correct, 3-7x slower per "
                          "Matérn tile)", FusedProfileWarning, stacklevel=4)


def status() -> str:
    """``"eager"`` after a failure (with its reason), else ``"compiled"`` (what large operators use)."""
    return f"eager ({_FAILED[0]})" if _FAILED else "compiled"
