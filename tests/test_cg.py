"""Batched preconditioned CG: a catalogue of systems (like scipy's), stopping rule, statuses and
the Lanczos tridiagonals recovered from the CG coefficients."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pytest
import torch
from conftest import (
    build_kernel,
    dense_oracle,
    make_generator,
    make_inputs,
    sym_fn,
    sym_inv_sqrt,
    sym_log,
)

import gpscale
from gpscale import CGStatus, CGWarning, ConjugateGradients, KernelOperator
from gpscale.precond import PivotedCholesky


# ----------------------------------------------------------------------------- case catalogue
@dataclass
class CGCase:
    """One linear system of the catalogue.

    Attributes
    ----------
    name : str
    op : KernelOperator
        The system matrix as an operator (``dense`` is its float64 oracle).
    B : (n, t) tensor
    kwargs : dict
        Arguments for :func:`gpscale.cg`.
    solution_rtol : float
        Required relative accuracy of ``x`` (column-wise, in the 2-norm) against a dense solve.
    """

    name: str
    op: KernelOperator
    dense: torch.Tensor
    B: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    solution_rtol: float = 1e-6


def _kernel_system(n, d, noise, dtype=torch.float64, seed=0, ls=0.7, t=3):
    X = make_inputs(n, d, dtype=dtype, seed=seed, scale=2.0)
    k = build_kernel("rbf", d=d, dtype=dtype, outputscale=1.0)
    k.lengthscale = ls
    op = KernelOperator(X, k, noise=noise)
    B = torch.randn(n, t, generator=make_generator(seed + 100), dtype=torch.float64).to(dtype)
    return op, dense_oracle(k, X, noise), B


def _catalogue():
    cases = []
    op, K, B = _kernel_system(150, 2, 0.5, seed=1)
    cases.append(CGCase("well_conditioned", op, K, B, dict(rtol=1e-10, max_iter=500), 1e-8))
    # Noise 1e-6: condition number ~3e7; plain CG needs far more than n iterations in float64.
    op, K, B = _kernel_system(100, 2, 1e-6, seed=2, ls=0.5, t=2)
    cases.append(CGCase("ill_conditioned", op, K, B, dict(rtol=1e-6, max_iter=6000), 1e-4))
    op, K, B = _kernel_system(120, 2, 0.1, dtype=torch.float32, seed=3)
    cases.append(CGCase("float32", op, K, B, dict(rtol=1e-4, max_iter=500), 2e-3))
    op, K, B = _kernel_system(90, 3, 0.05, seed=4, t=4)
    cases.append(CGCase("preconditioned", op, K, B,
                        dict(rtol=1e-10, max_iter=500, preconditioner=PivotedCholesky(rank=30)), 1e-7))
    return cases


CATALOGUE = _catalogue()
A_FORMS = ["tensor", "operator", "callable"]


def _as_form(case: CGCase, form: str):
    """The system matrix as a dense tensor, the operator itself, or a bare callable."""
    if form == "tensor":
        return case.dense.to(case.B.dtype)
    if form == "operator":
        return case.op
    return lambda V: case.op.matmul(V)


def _true_relres(dense, B, x):
    """Column-wise ``||b - A x|| / ||b||`` computed densely in float64."""
    B64, x64 = B.to(torch.float64), x.to(torch.float64)
    return (B64 - dense @ x64).norm(dim=0) / B64.norm(dim=0)


@pytest.mark.parametrize("form", A_FORMS)
@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_catalogue_converges_to_dense_solution(case, form):
    """Every catalogue system converges, for every way of passing ``A``, to the dense solution."""
    kwargs = dict(case.kwargs)
    if form != "operator" and "preconditioner" in kwargs:
        # A factory builds from kernel-row access, so tensors and callables get the built one.
        kwargs["preconditioner"] = kwargs["preconditioner"].build(case.op)
    res = gpscale.cg(_as_form(case, form), case.B, **kwargs)
    assert res.status == CGStatus.CONVERGED, res.message
    assert res.converged
    assert bool((res.column_status == CGStatus.CONVERGED.value).all())
    assert res.x.shape == case.B.shape and res.x.dtype == case.B.dtype
    x_ref = torch.linalg.solve(case.dense, case.B.to(torch.float64))
    err = (res.x.to(torch.float64) - x_ref).norm(dim=0) / x_ref.norm(dim=0)
    assert bool((err <= case.solution_rtol).all()), err
    # the reported stopping quantities are consistent with the formula
    assert bool((res.residual_norm <= res.tolerance).all())
    assert res.num_matmuls >= int(res.iterations.max())


def test_ill_conditioned_needs_many_iterations():
    """The noise-1e-6 system needs more than ``n`` iterations: capped at ``n`` it does not converge."""
    case = next(c for c in CATALOGUE if c.name == "ill_conditioned")
    n = case.B.shape[0]
    full = gpscale.cg(case.op, case.B, **case.kwargs)
    assert full.converged and int(full.iterations.min()) > n
    with pytest.warns(CGWarning):
        capped = gpscale.cg(case.op, case.B, rtol=case.kwargs["rtol"], max_iter=n)
    assert capped.status == CGStatus.MAX_ITERATIONS


def test_results_agree_across_forms_of_A():
    """The operator and a callable wrapping it give identical runs; a dense tensor (different
    rounding in the products: exact differences vs the expanded distance) agrees to the solve
    accuracy, and each run stops where the other's residual is at the tolerance too.

    Not "within k iterations": CG's residual is not monotone, and where it hovers at the threshold
    (on one machine a column went 1.01e-8, 1.27e-8, 1.54e-8, 5e-10 against 1e-8 in one form and
    9.8e-9 in the other) a 3% rounding difference moves the stop by several steps."""
    case = CATALOGUE[0]
    dense, op, fn = [gpscale.cg(_as_form(case, f), case.B, rtol=1e-8, record_history=True) for f in A_FORMS]
    assert torch.equal(op.iterations, fn.iterations)
    assert torch.equal(op.x, fn.x)
    assert float((dense.x - op.x).norm() / op.x.norm()) < 1e-6
    for a, b in ((dense, op), (op, dense)):  # b's residual where a stopped (flat after b's own stop)
        at = a.iterations.clamp(max=b.residual_history.shape[0] - 1)
        other = b.residual_history.gather(0, at.unsqueeze(0))[0]
        assert bool((other <= 2 * b.tolerance).all()), (a.iterations, b.iterations, other / b.tolerance)
    assert int((dense.iterations - op.iterations).abs().max()) < 8  # and both stop where the residual is small


def test_vector_rhs_returns_vector():
    """A 1-D ``b`` gives a 1-D ``x`` and per-column statistics of length 1."""
    case = CATALOGUE[0]
    b = case.B[:, 0]
    res = gpscale.cg(case.op, b, rtol=1e-10)
    assert res.x.shape == b.shape
    assert res.iterations.shape == (1,) and res.column_status.shape == (1,)
    full = gpscale.cg(case.op, case.B[:, :1], rtol=1e-10)
    torch.testing.assert_close(res.x, full.x[:, 0], rtol=0, atol=0)


def test_zero_rhs_converges_at_zero_iterations():
    """``b = 0`` is solved by ``x = 0`` without any iteration, alone or next to other columns."""
    case = CATALOGUE[0]
    n = case.B.shape[0]
    res = gpscale.cg(case.op, torch.zeros(n, dtype=torch.float64), rtol=1e-8)
    assert res.status == CGStatus.CONVERGED
    assert int(res.iterations[0]) == 0
    assert torch.equal(res.x, torch.zeros(n, dtype=torch.float64))
    B = case.B.clone()
    B[:, 1] = 0.0
    mixed = gpscale.cg(case.op, B, rtol=1e-8, preconditioner=PivotedCholesky(rank=10))
    assert mixed.converged
    assert int(mixed.iterations[1]) == 0 and int(mixed.iterations[0]) > 0
    assert torch.equal(mixed.x[:, 1], torch.zeros(n, dtype=torch.float64))


def test_warm_start_uses_fewer_iterations():
    """A good ``x0`` converges in fewer iterations to the same answer."""
    case = CATALOGUE[0]
    x_ref = torch.linalg.solve(case.dense, case.B)
    x0 = x_ref + 1e-4 * torch.randn(case.B.shape, generator=make_generator(9), dtype=torch.float64)
    cold = gpscale.cg(case.op, case.B, rtol=1e-10)
    warm = gpscale.cg(case.op, case.B, rtol=1e-10, x0=x0)
    assert cold.converged and warm.converged
    assert bool((warm.iterations < cold.iterations).all()), (warm.iterations, cold.iterations)
    torch.testing.assert_close(warm.x, cold.x, rtol=1e-7, atol=1e-8)
    # an exact initial guess needs no iteration at all
    exact = gpscale.cg(case.dense, case.B, rtol=1e-6, x0=x_ref)
    assert int(exact.iterations.max()) == 0 and torch.equal(exact.x, x_ref)
    # a 1-D x0 works with a 1-D b
    vec = gpscale.cg(case.op, case.B[:, 0], rtol=1e-10, x0=x0[:, 0])
    assert int(vec.iterations[0]) == int(warm.iterations[0])


def test_max_iterations_exhaustion_flags_columns_and_warns():
    """Columns still running at ``max_iter`` get MAX_ITERATIONS; finished ones stay CONVERGED."""
    case = CATALOGUE[0]
    K = case.dense
    evals, evecs = torch.linalg.eigh(K)
    B = torch.stack([torch.zeros(K.shape[0], dtype=torch.float64),  # converged at 0 iterations
                     evecs[:, -1],                                  # an eigenvector: 1 iteration
                     case.B[:, 0], case.B[:, 1]], dim=1)            # need many iterations
    with pytest.warns(CGWarning, match="MAX_ITERATIONS"):
        res = gpscale.cg(case.op, B, rtol=1e-10, max_iter=5)
    assert res.status == CGStatus.MAX_ITERATIONS
    assert not res.converged
    assert res.column_status.tolist() == [CGStatus.CONVERGED, CGStatus.CONVERGED,
                                          CGStatus.MAX_ITERATIONS, CGStatus.MAX_ITERATIONS]
    assert res.iterations.tolist() == [0, 1, 5, 5]
    assert "max_iter" in res.message
    # the same run without the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = gpscale.cg(case.op, B, rtol=1e-10, max_iter=5, warn=False)
    assert quiet.status == CGStatus.MAX_ITERATIONS
    # the configuration object never warns; it only reports
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ConjugateGradients(rtol=1e-10, max_iter=5)(case.op, B)
    assert cfg.column_status.tolist() == res.column_status.tolist()


def test_breakdown_on_indefinite_matrix():
    """Non-positive curvature ``p^T A p <= 0`` stops the column with status BREAKDOWN."""
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    B = torch.stack([torch.ones(4, dtype=torch.float64),                          # indefinite direction
                     torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)], 1)  # stays in the SPD block
    with pytest.warns(CGWarning, match="BREAKDOWN"):
        res = gpscale.cg(A, B, rtol=1e-12, max_iter=50)
    assert res.status == CGStatus.BREAKDOWN
    assert res.column_status.tolist() == [CGStatus.BREAKDOWN, CGStatus.CONVERGED]
    assert torch.isfinite(res.x).all()
    torch.testing.assert_close(res.x[:, 1], torch.tensor([1.0, 0.0, 1 / 3, 2.0], dtype=torch.float64))
    # first step: p^T A p = 1 - 2 + 3 + 0.5 > 0, so the breakdown happens after at least one step
    assert int(res.iterations[0]) >= 1
    with pytest.warns(CGWarning):
        neg = gpscale.cg(-torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert neg.status == CGStatus.BREAKDOWN and int(neg.iterations[0]) == 0


def test_non_finite_operator_is_reported():
    """An operator that returns NaN gives status NON_FINITE (not a silent wrong answer)."""
    def bad(V):
        out = V.clone()
        out[0] = float("nan")
        return out

    with pytest.warns(CGWarning, match="NON_FINITE"):
        res = gpscale.cg(bad, torch.ones(5, dtype=torch.float64), rtol=1e-8)
    assert res.status == CGStatus.NON_FINITE


def test_columns_converge_independently():
    """Columns of different difficulty take different iteration counts and match solo solves."""
    case = CATALOGUE[0]
    K = case.dense
    evals, evecs = torch.linalg.eigh(K)
    e1 = evecs[:, -1]                                        # 1 iteration in exact arithmetic
    e3 = evecs[:, -1] + evecs[:, -2] + evecs[:, -3]          # 3 distinct eigenvalues: 3 iterations
    B = torch.stack([e1, e3, case.B[:, 0]], dim=1)
    res = gpscale.cg(case.op, B, rtol=1e-9)
    assert res.converged
    assert res.iterations.tolist()[:2] == [1, 3]
    assert int(res.iterations[2]) > 10
    for j in range(3):
        solo = gpscale.cg(case.op, B[:, j], rtol=1e-9)
        assert int(solo.iterations[0]) == int(res.iterations[j])
        # same iterates up to the rounding of products with a different number of columns
        assert float((solo.x - res.x[:, j]).norm() / res.x[:, j].norm()) < 1e-8


@pytest.mark.parametrize("atol", [0.0, 1e-3])
def test_stopping_rule_per_column(atol):
    """``||r_j|| <= max(rtol ||b_j||, atol)`` holds per column, also for the true residual.

    One column has a tiny norm so that ``atol`` (when set) is the active threshold for it.
    """
    case = CATALOGUE[0]
    B = case.B.clone()
    B[:, 2] *= 1e-4
    rtol = 1e-6
    res = gpscale.cg(case.op, B, rtol=rtol, atol=atol)
    assert res.converged
    bnorm = B.norm(dim=0)
    expected_tol = torch.clamp(rtol * bnorm, min=atol)
    torch.testing.assert_close(res.rhs_norm, bnorm)
    torch.testing.assert_close(res.tolerance, expected_tol)
    assert bool((res.residual_norm <= res.tolerance).all())
    true_res = (B - case.dense @ res.x).norm(dim=0)
    # the recurrence residual drifts from the true one by O(eps * ||A|| ||x||): allow 1% slack
    assert bool((true_res <= 1.01 * expected_tol + 1e-12).all()), (true_res, expected_tol)
    # the solver stopped as soon as it could: one iteration fewer would not have met the rule
    fewer = ConjugateGradients(rtol=rtol, atol=atol, max_iter=int(res.iterations.max()) - 1)(case.op, B)
    assert fewer.status == CGStatus.MAX_ITERATIONS
    if atol > 0:
        # the atol column stops earlier than it would with the relative rule alone
        rel_only = gpscale.cg(case.op, B, rtol=rtol)
        assert int(res.iterations[2]) < int(rel_only.iterations[2])


def test_preconditioning_reduces_iterations():
    """PivotedCholesky (passed as a factory) converges in fewer iterations to the same solution."""
    case = next(c for c in CATALOGUE if c.name == "preconditioned")
    plain = gpscale.cg(case.op, case.B, rtol=1e-10, max_iter=500)
    pre = gpscale.cg(case.op, case.B, rtol=1e-10, max_iter=500, preconditioner=PivotedCholesky(rank=30))
    assert plain.converged and pre.converged
    assert int(pre.iterations.max()) < int(plain.iterations.min())
    x_ref = torch.linalg.solve(case.dense, case.B)
    for r in (plain, pre):
        assert float(((r.x - x_ref).norm(dim=0) / x_ref.norm(dim=0)).max()) < 1e-7
    # a built preconditioner gives the same run as its factory
    built = gpscale.cg(case.op, case.B, rtol=1e-10, preconditioner=PivotedCholesky(rank=30).build(case.op))
    assert torch.equal(built.iterations, pre.iterations)


@pytest.mark.parametrize("check_every", [1, 3, 8, 1000])
def test_check_every_does_not_change_iterations(check_every):
    """Host checks only decide when to leave the loop and which columns enter the product;
    counts are unchanged and iterates agree to rounding (products of column subsets round
    differently in BLAS)."""
    case = CATALOGUE[0]
    B = torch.cat([case.B, torch.linalg.eigh(case.dense)[1][:, -1:]], dim=1)
    ref = gpscale.cg(case.op, B, rtol=1e-9, check_every=1, num_tridiag=2)
    res = gpscale.cg(case.op, B, rtol=1e-9, check_every=check_every, num_tridiag=2)
    assert torch.equal(res.iterations, ref.iterations)
    assert torch.equal(res.column_status, ref.column_status)
    torch.testing.assert_close(res.x, ref.x, rtol=1e-8, atol=1e-12)
    # Late Lanczos coefficients amplify rounding once orthogonality is lost; the quadrature they
    # feed is the stable quantity.
    torch.testing.assert_close(res.tridiag.quadrature(torch.log), ref.tridiag.quadrature(torch.log),
                               rtol=1e-8, atol=1e-10)
    assert res.num_matmuls >= ref.num_matmuls


def test_summary_is_plain_python():
    """``summary()`` reports plain numbers (for logs and JSON)."""
    case = CATALOGUE[0]
    s = gpscale.cg(case.op, case.B, rtol=1e-8).summary()
    assert s["status"] == "CONVERGED"
    assert isinstance(s["iterations_max"], int) and isinstance(s["relative_residual_max"], float)
    assert s["relative_residual_max"] <= 1e-8


# ----------------------------------------------------------------------------- Lanczos tridiagonals
def _lanczos_problem():
    X = make_inputs(40, 2, seed=21)
    k = build_kernel("matern", 1.5, d=2, outputscale=1.0)
    op = KernelOperator(X, k, noise=0.05)
    B = torch.randn(40, 3, generator=make_generator(22), dtype=torch.float64)
    return op, dense_oracle(k, X, 0.05), B


def test_lanczos_quadrature_matches_dense_unpreconditioned():
    """``||b||^2 e1^T log(T) e1 == b^T log(A) b`` when CG runs to a tiny tolerance from ``x0 = 0``."""
    op, K, B = _lanczos_problem()
    res = gpscale.cg(op, B, rtol=1e-13, max_iter=400, num_tridiag=3)
    tri = res.tridiag
    assert tri.num_columns == 3
    torch.testing.assert_close(tri.initial_norm2, B.pow(2).sum(0))
    assert torch.equal(tri.lengths, res.iterations)
    want = (B * (sym_log(K) @ B)).sum(0)
    got = tri.quadrature(torch.log)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    # Gauss quadrature of 1/x reproduces b^T A^{-1} b (= b^T x) as well
    torch.testing.assert_close(tri.quadrature(torch.reciprocal), (B * torch.linalg.solve(K, B)).sum(0),
                               rtol=1e-8, atol=1e-10)


def test_lanczos_quadrature_matches_dense_preconditioned():
    """With ``P``: ``initial_norm2 = b^T P^{-1} b`` and the quadrature is ``w^T log(P^-1/2 A P^-1/2) w``."""
    op, K, B = _lanczos_problem()
    P = PivotedCholesky(rank=8).build(op)
    Pd = P.to_dense()
    Pmh = sym_inv_sqrt(Pd)
    W = Pmh @ B
    res = gpscale.cg(op, B, rtol=1e-13, max_iter=400, num_tridiag=3, preconditioner=P)
    tri = res.tridiag
    torch.testing.assert_close(tri.initial_norm2, W.pow(2).sum(0))
    want = (W * (sym_log(Pmh @ K @ Pmh) @ W)).sum(0)
    torch.testing.assert_close(tri.quadrature(torch.log), want, rtol=1e-8, atol=1e-8)


def test_lanczos_ritz_values_inside_spectrum():
    """Every tridiagonal is symmetric with Ritz values inside ``[lambda_min, lambda_max]`` of A."""
    op, K, B = _lanczos_problem()
    res = gpscale.cg(op, B, rtol=1e-4, num_tridiag=3)
    T = res.tridiag.matrices()
    assert T.shape == (3, int(res.iterations.max()), int(res.iterations.max()))
    torch.testing.assert_close(T, T.transpose(-1, -2), rtol=0, atol=0)
    ev = torch.linalg.eigvalsh(K)
    for j in range(3):
        m = int(res.tridiag.lengths[j])
        ritz = torch.linalg.eigvalsh(T[j, :m, :m])
        assert float(ritz.min()) >= float(ev.min()) * (1 - 1e-8)
        assert float(ritz.max()) <= float(ev.max()) * (1 + 1e-8)


def test_num_tridiag_selects_leading_columns():
    """Only the first ``num_tridiag`` columns are tracked, and ``0`` tracks none."""
    op, K, B = _lanczos_problem()
    assert gpscale.cg(op, B, rtol=1e-6).tridiag is None
    res = gpscale.cg(op, B, rtol=1e-6, num_tridiag=2)
    assert res.tridiag.num_columns == 2
    assert torch.equal(res.tridiag.lengths, res.iterations[:2])


def test_sym_fn_helper_sanity():
    """The dense oracle helpers themselves: ``exp(log(A)) == A`` and ``A^-1/2 A A^-1/2 == I``."""
    _, K, _ = _lanczos_problem()
    torch.testing.assert_close(sym_fn(sym_log(K), torch.exp), K, rtol=1e-10, atol=1e-10)
    R = sym_inv_sqrt(K)
    torch.testing.assert_close(R @ K @ R, torch.eye(K.shape[0], dtype=torch.float64), rtol=1e-8, atol=1e-8)
