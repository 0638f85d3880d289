"""Mixed-precision batched CG: low-precision products, safe state, automatic fallback.

The solve runs in two phases (Maddox, Potapczynski & Wilson, UAI 2022, for the first; the second is
gpscale's safety net):

1. **Low-precision phase.**  Products in ``policy.product`` (rounded tiles and right-hand-side blocks,
   float32 accumulation, :meth:`KernelOperator.with_product_dtype`), every CG vector and inner product
   in ``policy.state``.  The right-hand sides are normalised, ``b_j / ||b_j||`` (``rescale``), the
   residuals re-orthogonalised (``reorth``, :mod:`gpscale.solvers.stability`) and a column that
   stagnates is stopped (``stall_window``).
2. **Fallback phase.**  One product in ``policy.fallback_product`` measures every column's *true*
   residual :math:`\\|b - A x\\|` (rounded products make the recurrence residual drift away from it).
   Columns above the tolerance -- stagnated, broken down (rounding can make ``K`` look indefinite),
   non-finite, or merely inaccurate -- continue in the fallback precision:

   * solve-only columns restart CG from their current iterate (the work done is kept);
   * **Lanczos-tracked columns (SLQ probes) that broke down or stagnated restart from zero.**  The log-det needs the tridiagonal
     of *one* Lanczos run started at the probe: a run restarted at the iterate ``x_k`` is a Lanczos
     process started at ``r_k``, whose tridiagonal estimates :math:`r_k^T \\log(A) r_k`, not
     :math:`z^T \\log(A) z`, and the two segments cannot be concatenated.  The probe's tridiagonal is
     therefore the fallback run's (entirely in the fallback precision).  Probes whose phase-1 run
     was sound and whose solve iterative refinement brings to the tolerance keep the low-precision
     tridiagonal (with re-orthogonalisation a valid Gauss quadrature of the rounded operator, whose
     log-det is then close to :math:`\\log|A|`); probes that refinement cannot fix restart as well,
     because the rounded operator is too far from ``A`` for its log-det to stand in for ``log|A|``.

   The result records per column the precision it finished in (``finished_precision``).

Cost: phase 1 as plain CG plus :math:`O(w n t)` per iteration for re-orthogonalisation; one extra
product for the true residuals; phase 2 only for the columns that fell back (at most ``max_iter``
more iterations each).
"""

from __future__ import annotations

import torch

from ..precision import dtype_name, lowp_mm, round_to, scale_columns
from .cg import CGResult, CGStatus, _as_matmul, _built_preconditioner, _precond_solve
from .lanczos import Tridiagonal

#: Refinement solves each correction to ``REFINE_MARGIN * tol / |r|`` (at least ``refine_rtol``): half
#: the reduction still missing, the other half left to the rounding error of the low-precision solve.
REFINE_MARGIN = 0.5
#: Phase-1 outcomes after which a column's Lanczos coefficients are unusable.
_BROKEN = (CGStatus.BREAKDOWN.value, CGStatus.NON_FINITE.value)


def low_precision_skip_reason(A, policy) -> str | None:
    """Why ``policy``'s low-precision products would be *slower* than ``A``'s own, or ``None``.

    16-bit products run on the blocked torch path; they pay off against float32 when their rounded
    tiles are computed once and cached (each product is then a pass of 16-bit GEMMs).  When ``A``
    itself chose a fused backend (``keops``/``cuda``: its float32 kernel does not fit the cache) and the
    16-bit kernel does not fit either, every low-precision product would recompute all tiles in torch
    -- about 10x slower than the fused product on an H100 (docs/backends.md) -- so the solve should
    stay in float32 on the fused backend.
    """
    if not policy.low_precision or getattr(A, "backend", "torch") == "torch" or not hasattr(A, "kernel_bytes"):
        return None
    need, have = A.kernel_bytes(policy.product), A.tiling.cache_bytes
    if need <= have:
        return None
    return (f"{policy.product} products would recompute every kernel tile on the torch backend: the "
            f"{policy.product} kernel needs {need / 2**30:.2f} GiB of cache and memory_budget leaves "
            f"{have / 2**30:.2f} GiB, while float32 products run fused on {A.backend!r}. Solving with "
            f"{A.backend} float32 products instead; raise memory_budget above {need / 2**30:.2f} GiB (plus "
            "the workspace) to cache the low-precision kernel, or pass precision=None")


def policy_products(A, policy, state: torch.dtype, lowrank: torch.Tensor | None = None):
    """``(low, full)`` product closures on state-dtype vectors; ``full`` is None when impossible.

    * an operator with ``with_product_dtype`` (``KernelOperator``): its low- and fallback-precision
      siblings (the low one rounding only ``K - LL^T`` when a ``lowrank`` factor ``L`` is given);
    * a dense tensor: rounded once to the product precision, float32 accumulation;
    * anything else (a callable, another operator): used as given for the low phase, no fallback.
    """
    if hasattr(A, "with_product_dtype"):
        low_op = A.with_product_dtype(policy.product, lowrank=lowrank)
        full_op = A.with_product_dtype(policy.fallback_product)
        return _cast(low_op.matmul, A.dtype, state), _cast(full_op.matmul, A.dtype, state)
    if isinstance(A, torch.Tensor):
        name = policy.product
        if name == "float64" and A.dtype != torch.float64:
            raise ValueError("product='float64' needs a float64 matrix")
        Ar = round_to(A, name) if name != dtype_name(A.dtype) else A

        def low(V):
            s = scale_columns(V)
            return (lowp_mm(Ar, round_to(V * s, name), name).to(state) / s) if name != dtype_name(A.dtype) \
                else (A @ V.to(A.dtype)).to(state)

        Af = A.to(_torch_dtype(policy.fallback_product))
        return low, (lambda V: (Af @ V.to(Af.dtype)).to(state))
    return _cast(_as_matmul(A), getattr(A, "dtype", state), state), None


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _cast(fn, op_dtype, state):
    if op_dtype == state:
        return fn
    return lambda V: fn(V.to(op_dtype)).to(state)


def mixed_precision_solve(cfg, A, B: torch.Tensor, X0, preconditioner) -> CGResult:
    """Run ``cfg`` (a :class:`ConjugateGradients` with ``precision`` set) as described above."""
    policy, state = cfg.precision, cfg.precision.state_dtype
    preconditioner = _built_preconditioner(preconditioner, A)
    # A low-rank preconditioner P = LL^T + D hands its factor to the low-precision product, which then
    # rounds only the residual kernel K - LL^T (PrecisionPolicy.lowrank_correction).
    lowrank = getattr(preconditioner, "L", None) if policy.resolved_lowrank_correction else None
    low, full = policy_products(A, policy, state, lowrank)
    solve = _cast(_precond_solve(preconditioner, A), getattr(A, "dtype", state), state)
    Bs = B.to(state)
    bnorm = Bs.norm(dim=0)
    tol = torch.clamp(cfg.rtol * bnorm, min=cfg.atol)
    # Maddox et al.: solve for b / ||b||, so the iterates are O(1) whatever the scale of b.
    scale = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm)) if policy.rescale else torch.ones_like(bnorm)
    Bn, tol_n = Bs / scale, tol / scale
    X0n = None if X0 is None else X0.to(state) / scale
    n, t = Bs.shape
    nt = min(cfg.num_tridiag, t)
    inner = {"reorth": policy.reorth_steps(n, t),
             "stall": (policy.stall_window, policy.stall_decrease) if policy.low_precision else None}
    res = cfg._run(low, solve, Bn, X0n, tol=tol_n, num_tridiag=nt, **inner)
    st = _State(res.x, res.column_status, res.iterations, res.residual_norm, res.tridiag, res.num_matmuls,
                [policy.product] * t)
    low_iters, stagnated = res.iterations.clone(), res.column_status == CGStatus.STAGNATED.value
    if policy.low_precision and policy.fallback and full is not None and t:
        _rescue(cfg, policy, low, full, solve, Bn, tol_n, st, nt, inner)
    worst = CGStatus(int(st.status.max())) if t else CGStatus.CONVERGED
    tri = st.tri
    if tri is not None:
        tri = Tridiagonal(tri.alphas, tri.betas, tri.lengths, tri.initial_norm2 * scale[:nt] ** 2)
    hist = None if res.residual_history is None else res.residual_history * scale
    return CGResult((st.x * scale).to(B.dtype), worst, st.status, st.iters, st.rnorm * scale, bnorm, tol, tri,
                    st.nmm, hist, finished_precision=tuple(st.names), low_precision_iterations=low_iters,
                    stagnated=stagnated)


class _State:
    """Mutable per-column state shared by the phases (normalised units)."""

    def __init__(self, x, status, iters, rnorm, tri, nmm, names):
        self.x, self.status, self.iters, self.rnorm = x.clone(), status.clone(), iters.clone(), rnorm.clone()
        self.tri, self.nmm, self.names = tri, nmm, names


def _rescue(cfg, policy, low, full, solve, Bn, tol_n, st: _State, nt: int, inner: dict) -> None:
    """Phase 2: true residuals, refinement in low precision, then the fallback precision."""
    R = Bn - full(st.x)
    true = R.norm(dim=0)
    st.nmm += 1
    broken = torch.isin(st.status, torch.tensor(_BROKEN, device=st.status.device)) | ~torch.isfinite(true)
    st.rnorm = torch.where(broken, st.rnorm, true)
    need = broken | ~(true <= tol_n)
    # A probe that stagnated has a tridiagonal with spurious near-zero Ritz values (measured: a log-det
    # term of -75 instead of +275 under bf16 at noise 1e-2): its Lanczos run restarts like a broken one.
    tracked = torch.arange(st.x.shape[1], device=st.x.device) < nt
    restart = (broken | (st.status == CGStatus.STAGNATED.value)) & tracked
    st.status = torch.where(need, st.status, torch.full_like(st.status, CGStatus.CONVERGED.value))
    cols = (need & ~broken & ~restart).nonzero()[:, 0]  # one host synchronisation per phase
    if cols.numel() and policy.refine_steps:
        _refine(cfg, policy, low, full, solve, Bn, R[:, cols], tol_n, st, cols, inner)
    todo_mask = ~(st.rnorm <= tol_n) | broken | restart
    # A probe that refinement could not bring to the tolerance ran its Lanczos on a rounded kernel too far
    # from A (||A^{-1}E|| >~ 1/2, see _refine): its tridiagonal estimates log|A + E|, not log|A|.  Measured
    # under bf16 at n = 2700, noise 0.1 (elevators / protein / pol): every solve fell back to float32 while
    # the kept bf16 tridiagonals biased the MLL by 5.6% / 2.3% / 9.2%.  Such probes restart too.
    restart = restart | (todo_mask & tracked)
    todo = todo_mask.nonzero()[:, 0]
    if todo.numel():
        _fallback(cfg, full, solve, Bn, tol_n, st, todo, restart[todo], nt)
        for j in todo.tolist():
            st.names[j] = policy.fallback_product


def _refine(cfg, policy, low, full, solve, Bn, r, tol_n, st: _State, cols, inner: dict) -> None:
    r"""Mixed-precision iterative refinement of the columns ``cols``.

    Each cycle solves ``A d = r`` for the true residual ``r`` (one fallback-precision product; the
    first comes from :func:`_rescue`) by low-precision CG and updates ``x += d``.  The error contracts
    by about :math:`\max(\text{inner rtol}, \|A^{-1}E\|)` per cycle, ``E`` the rounding of the kernel
    (Carson & Higham, SISC 2018, for LU/GMRES-IR; the same argument holds for CG inner solves).  A
    column whose true residual does not halve in a cycle leaves refinement (the rounded kernel is
    too far from ``A``: ``||A^{-1}E|| >~ 1``) and is handed to the fallback precision.  The Lanczos
    coefficients of phase 1 are kept: refinement touches only the solution.

    The inner tolerance is what the cycle needs, ``REFINE_MARGIN * tol / |r|``, between
    ``policy.refine_rtol`` and ``REFINE_MARGIN``: phase 1 typically leaves a true residual a few times
    the tolerance, and a fixed 0.1 then solved tighter than needed -- measured (Matérn-5/2 ARD, d = 8,
    n = 8000, noise 0.1, rank 100, fp16, 11 columns): 56 low-precision and 3 float32 products with
    a fixed 0.1 and the duplicate residual product, 48 and 2 now, against float32's 40.
    """
    b, tol = Bn[:, cols], tol_n[cols]
    x, rn = st.x[:, cols].clone(), st.rnorm[cols].clone()  # r: the caller's R[:, cols], already a copy
    alive = ~(rn <= tol)
    for _ in range(policy.refine_steps):
        idx = alive.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        rr = r[:, idx]
        s = rr.norm(dim=0).clamp_min(torch.finfo(rr.dtype).tiny)
        # Solve no tighter than this cycle needs: the residual must shrink by tol / |r|, and
        # REFINE_MARGIN leaves room for the rounding's own share of the error; refine_rtol is the floor.
        inner_rtol = (REFINE_MARGIN * tol[idx] / rn[idx]).clamp(min=policy.refine_rtol, max=REFINE_MARGIN)
        sol = cfg._run(low, solve, rr / s, None, tol=inner_rtol, num_tridiag=0, **inner)
        st.nmm += sol.num_matmuls + 1
        st.iters[cols[idx]] += sol.iterations
        cand = x[:, idx] + torch.nan_to_num(sol.x * s, nan=0.0, posinf=0.0, neginf=0.0)
        r_new = b[:, idx] - full(cand)
        new = r_new.norm(dim=0)
        better = (new <= 0.5 * rn[idx]) | (new <= tol[idx])  # converged counts even without halving
        x[:, idx] = torch.where(better, cand, x[:, idx])
        r[:, idx] = torch.where(better, r_new, r[:, idx])
        rn[idx] = torch.where(better, new, rn[idx])
        alive[idx] = better & ~(new <= tol[idx])
    st.x[:, cols], st.rnorm[cols] = x, rn
    ok = rn <= tol
    st.status[cols] = torch.where(ok, torch.full_like(st.status[cols], CGStatus.CONVERGED.value), st.status[cols])


def _fallback(cfg, full, solve, Bn, tol_n, st: _State, idx, restart, nt: int) -> None:
    """Continue the columns ``idx`` by CG in the fallback precision (``restart``: from zero)."""
    X0 = st.x[:, idx].clone()
    X0[:, restart] = 0.0  # broken probes restart their Lanczos run from the probe (module notes)
    X0 = torch.where(torch.isfinite(X0), X0, torch.zeros_like(X0))
    nt2 = int(restart.sum())
    order = torch.cat([idx[restart], idx[~restart]])  # tracked columns first (num_tridiag takes a prefix)
    X0 = torch.cat([X0[:, restart], X0[:, ~restart]], dim=1)
    r2 = cfg._run(full, solve, Bn[:, order], X0, tol=tol_n[order], num_tridiag=nt2)
    st.x[:, order] = r2.x
    st.status[order] = r2.column_status
    st.iters[order] = st.iters[order] + r2.iterations
    st.rnorm[order] = r2.residual_norm
    st.nmm += r2.num_matmuls
    if nt2 and st.tri is not None:
        st.tri = _merge_tridiag(st.tri, r2.tridiag, order[:nt2])


def _merge_tridiag(tri: Tridiagonal, new: Tridiagonal, cols: torch.Tensor) -> Tridiagonal:
    """Replace the Lanczos coefficients of ``cols`` by those of the fallback run (zero-padded)."""
    k = max(tri.alphas.shape[0], new.alphas.shape[0])

    def pad(a):
        return torch.cat([a, a.new_zeros(k - a.shape[0], a.shape[1])]) if a.shape[0] < k else a

    alphas, betas = pad(tri.alphas).clone(), pad(tri.betas).clone()
    alphas[:, cols] = 0.0
    betas[:, cols] = 0.0
    alphas[: new.alphas.shape[0], cols] = new.alphas.to(alphas.dtype)
    betas[: new.betas.shape[0], cols] = new.betas.to(betas.dtype)
    lengths, norm2 = tri.lengths.clone(), tri.initial_norm2.clone()
    lengths[cols] = new.lengths
    norm2[cols] = new.initial_norm2.to(norm2.dtype)
    return Tridiagonal(alphas, betas, lengths, norm2)
