"""Mixed-precision iterative refinement (``gpscale.solvers.mixed._refine``): how tightly each correction
is solved, which cycles are accepted, and how many fallback-precision products it costs.

On a GPU a float32 product of an uncached kernel costs several cached 16-bit ones, so the refinement's
float32 products and its extra low-precision iterations decide whether a low-precision MLL is faster
at all (issue 4's GPU figure).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import gpscale
import gpscale.solvers.mixed as mixed
from gpscale import PrecisionPolicy
from gpscale.kernels import RBF
from gpscale.precond import PivotedCholesky
from gpscale.solvers.cg import CGStatus, ConjugateGradients


def _spd(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.linspace(0.5, 5.0, n, dtype=torch.float64)) @ Q.T, g


def _refine_once(A, b, x, tol, shrink: float):
    """Run ``_refine`` with an inner solver that removes ``1 - shrink`` of the residual exactly."""
    seen = []

    def run(low, solve, B, X0, *, tol, num_tridiag, **kw):
        seen.append(tol.clone())
        return SimpleNamespace(x=(1 - shrink) * torch.linalg.solve(A, B), num_matmuls=3,
                               iterations=torch.full((B.shape[1],), 3, dtype=torch.long))

    r = b - A @ x
    st = mixed._State(x, torch.full((b.shape[1],), CGStatus.MAX_ITERATIONS.value), torch.zeros(b.shape[1],
                      dtype=torch.long), r.norm(dim=0), None, 0, ["float16"] * b.shape[1])
    cols = torch.arange(b.shape[1])
    mixed._refine(SimpleNamespace(_run=run), PrecisionPolicy("float16"), None, lambda V: A @ V, None, b, r,
                  tol, st, cols, {})
    return st, seen


def test_inner_tolerance_is_what_the_cycle_needs():
    A, g = _spd()
    b = torch.randn(40, 3, generator=g, dtype=torch.float64)
    x = torch.linalg.solve(A, b) + 1e-2 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    rn = (b - A @ x).norm(dim=0)
    tol = rn / torch.tensor([1.5, 4.0, 100.0], dtype=torch.float64)  # 1.5x, 4x and 100x above the tolerance
    _, seen = _refine_once(A, b, x, tol, shrink=0.05)
    # half the missing reduction, between refine_rtol (0.1) and REFINE_MARGIN (0.5)
    expected = torch.tensor([0.5 / 1.5, 0.5 / 4.0, 0.1], dtype=torch.float64)
    torch.testing.assert_close(seen[0], expected)


def test_a_cycle_that_reaches_the_tolerance_without_halving_is_kept():
    A, g = _spd()
    b = torch.randn(40, 1, generator=g, dtype=torch.float64)
    x = torch.linalg.solve(A, b) + 1e-2 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    tol = (b - A @ x).norm(dim=0) / 1.5
    st, seen = _refine_once(A, b, x, tol, shrink=0.6)  # residual x0.6: 0.9 tol, converged but not halved
    assert len(seen) == 1 and int(st.status[0]) == CGStatus.CONVERGED.value and bool(st.rnorm[0] <= tol[0])
    assert st.names == ["float16"]  # stays a low-precision column: no fallback needed


def test_a_cycle_that_neither_halves_nor_converges_ends_refinement():
    A, g = _spd()
    b = torch.randn(40, 1, generator=g, dtype=torch.float64)
    x = torch.linalg.solve(A, b) + 1e-2 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    rn0 = (b - A @ x).norm(dim=0)
    st, seen = _refine_once(A, b, x, rn0 / 10, shrink=0.8)  # residual x0.8: not enough to continue
    assert len(seen) == 1 and int(st.status[0]) != CGStatus.CONVERGED.value
    torch.testing.assert_close(st.rnorm, rn0)  # the rejected correction is not applied


def test_refinement_costs_one_fallback_product_per_cycle():
    # fp16 at noise 1e-2: phase 1 leaves true residuals far above the tolerance, refinement brings them down
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 3, generator=g)
    op = gpscale.KernelOperator(X, RBF(lengthscale=1.0), noise=1e-2)
    B = torch.randn(600, 4, generator=g)
    runs, full_products = [], []
    orig_run, orig_products = ConjugateGradients._run, mixed.policy_products

    def spy_run(self, *a, **kw):
        runs.append(kw.get("tol"))
        return orig_run(self, *a, **kw)

    def spy_products(*a, **kw):
        low, full = orig_products(*a, **kw)
        return low, (lambda V: (full_products.append(V.shape[1]), full(V))[1])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConjugateGradients, "_run", spy_run)
        mp.setattr(mixed, "policy_products", spy_products)
        res = gpscale.cg(op, B, rtol=1e-2, precision="float16", preconditioner=PivotedCholesky(rank=20), warn=False)
    cycles = len(runs) - 1  # phase 1, then one inner solve per refinement cycle
    assert res.converged and res.finished_precision == ("float16",) * 4 and cycles >= 2
    assert len(full_products) == 1 + cycles  # the rescue's true residual feeds the first cycle
    inner = torch.cat(runs[1:])
    assert bool((inner >= 0.1 - 1e-12).all() and (inner <= 0.5).all()) and bool((inner > 0.1 + 1e-6).any())
    exact = (B.double() - op.to_dense().double() @ res.x.double()).norm(dim=0)
    assert bool((exact <= 1e-2 * B.double().norm(dim=0) * 1.001).all())
