"""A reusable contract for gpscale kernel operators (in the spirit of linear_operator's
``LinearOperatorTestCase``).

Usage
-----
Either call :func:`check_operator` on a built operator and its dense float64 oracle, or mix
:class:`OperatorContract` (any operator) or :class:`SquareOperatorContract` (``K + noise I``) into a
test class that provides a ``case`` fixture returning an :class:`OperatorCase`; every ``test_*``
method of the mixin then runs as its own test.

Every check compares against the oracle in float64 with ``|got - want| <= atol + rtol * scale``
where ``scale`` is the largest magnitude of the expected result (a norm-wise relative error, the
right measure for float32 products whose entries cancel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OperatorCase:
    """An operator under test together with its dense float64 oracles.

    Attributes
    ----------
    op : object
        The operator (``KernelOperator`` or ``CrossKernelOperator``).
    dense : (n, m) float64 tensor
        Oracle of ``op.matmul`` (``K + noise I`` for a ``KernelOperator``, ``K(X, Z)`` for a cross one).
    kernel_dense : (n, n) float64 tensor, optional
        Oracle of the noise-free kernel ``K``; enables the ``kernel_*`` and diagonal checks.
    rtol, atol : float
        Norm-wise relative and absolute tolerances.
    seed : int
        Seed for the random right-hand sides.
    expect_cached : {"none", "partial", "full"} or None
        Cache level the operator must report after one product (``None``: not checked).
    dtype, device : optional
        Expected ``op.dtype`` / ``op.device`` (default: those of the oracle's inputs, ``op.X``).
    """

    op: object
    dense: torch.Tensor
    kernel_dense: torch.Tensor | None = None
    rtol: float = 1e-10
    atol: float = 0.0
    seed: int = 0
    expect_cached: str | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """Norm-wise comparison in float64: ``max|got - want| <= atol + rtol * max|want|``."""
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64, want64 = got.detach().to(torch.float64), want.detach().to(torch.float64)
    assert torch.isfinite(got64).all(), f"{what}: non-finite entries"
    err = (got64 - want64).abs().max().item() if want64.numel() else 0.0
    scale = want64.abs().max().item() if want64.numel() else 0.0
    bound = atol + rtol * scale
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e} (rtol={rtol:g}, scale={scale:.3e})"


def _rhs(case: OperatorCase, shape, offset: int = 0) -> torch.Tensor:
    """Standard-normal right-hand side in the operator's dtype, seeded by ``case.seed + offset``."""
    g = torch.Generator().manual_seed(case.seed + offset)
    V = torch.randn(*shape, generator=g, dtype=torch.float64)
    return V.to(case.op.dtype)


def cached_fraction(op) -> float:
    """Fraction of the kernel matrix an operator keeps cached (meaningful after one product).

    Supports both cache designs: square upper-triangle tile caches (``op.cached_fraction``) and
    leading-row caches (``op.tiling.cached_rows``).
    """
    if hasattr(op, "cached_fraction"):
        return float(op.cached_fraction)
    return op.tiling.cached_rows / op.shape[0]


def _row_indices(n: int) -> list[int]:
    """Unsorted row indices with a repeat, covering the first, last and a middle row."""
    return sorted({0, n - 1, n // 2, min(n - 1, 1)}, reverse=True) + [n // 2]


# ----------------------------------------------------------------------------- individual checks
def check_metadata(case: OperatorCase) -> None:
    """``shape``, ``dtype`` and ``device`` describe the operator (plain ints, torch dtype/device)."""
    op = case.op
    assert tuple(op.shape) == tuple(case.dense.shape)
    assert all(type(s) is int for s in op.shape)
    assert op.dtype == (case.dtype if case.dtype is not None else op.X.dtype)
    assert torch.device(op.device) == torch.device(case.device if case.device is not None else op.X.device)


def check_matmul_vector(case: OperatorCase) -> None:
    """A 1-D right-hand side gives a 1-D result equal to ``dense @ v``."""
    v = _rhs(case, (case.dense.shape[1],))
    out = case.op.matmul(v)
    assert out.dim() == 1 and out.dtype == case.op.dtype and out.device == case.op.device
    assert_close(out, case.dense @ v.to(torch.float64), case.rtol, case.atol, "matmul(vector)")
    # The ``@`` operator is the same product.
    assert_close(case.op @ v, out, 1e-12 if case.op.dtype == torch.float64 else 1e-6, 0.0, "op @ v")


def check_matmul_matrix(case: OperatorCase) -> None:
    """A ``(m, t)`` right-hand side gives ``(n, t)`` equal to ``dense @ V`` (also for ``t = 1``)."""
    m = case.dense.shape[1]
    for t in (1, 5):
        V = _rhs(case, (m, t))
        out = case.op.matmul(V)
        assert out.shape == (case.dense.shape[0], t) and out.dtype == case.op.dtype
        assert_close(out, case.dense @ V.to(torch.float64), case.rtol, case.atol, f"matmul(matrix, t={t})")


def check_matmul_repeatable(case: OperatorCase) -> None:
    """The first product (which may fill the cache) and later ones (served from it) agree."""
    V = _rhs(case, (case.dense.shape[1], 3))
    first = case.op.matmul(V)
    second = case.op.matmul(V)
    tol = 1e-12 if case.op.dtype == torch.float64 else 1e-5
    assert_close(second, first, tol, 0.0, "matmul after cache fill")
    assert_close(second, case.dense @ V.to(torch.float64), case.rtol, case.atol, "cached matmul")


def check_to_dense(case: OperatorCase) -> None:
    """``to_dense()`` equals the oracle."""
    D = case.op.to_dense()
    assert D.dtype == case.op.dtype
    assert_close(D, case.dense, case.rtol, case.atol, "to_dense")


def check_rows(case: OperatorCase) -> None:
    """``rows(idx)`` equals the oracle's rows, for unsorted indices with a repeat, lists and tensors."""
    n = case.dense.shape[0]
    idx = _row_indices(n)
    R = case.op.rows(idx)
    assert R.shape == (len(idx), case.dense.shape[1])
    assert_close(R, case.dense[idx], case.rtol, case.atol, "rows(list)")
    R_t = case.op.rows(torch.tensor(idx))
    assert_close(R_t, R, 0.0, 0.0, "rows(tensor) vs rows(list)")


def check_diagonal(case: OperatorCase) -> None:
    """``diagonal()`` is the diagonal of ``K + noise I``."""
    diag = case.op.diagonal()
    assert diag.shape == (case.dense.shape[0],)
    assert_close(diag, case.dense.diagonal(), case.rtol, case.atol, "diagonal")


def check_kernel_diagonal(case: OperatorCase) -> None:
    """``kernel_diagonal()`` is the diagonal of ``K`` without the noise."""
    diag = case.op.kernel_diagonal()
    assert diag.shape == (case.dense.shape[0],)
    assert_close(diag, case.kernel_dense.diagonal(), case.rtol, case.atol, "kernel_diagonal")


def check_kernel_rows(case: OperatorCase) -> None:
    """``kernel_rows(idx)`` are the rows of ``K`` (noise only on ``rows``)."""
    idx = _row_indices(case.dense.shape[0])
    R = case.op.kernel_rows(idx)
    assert_close(R, case.kernel_dense[idx], case.rtol, case.atol, "kernel_rows")
    # rows() adds the noise exactly on the diagonal entries of the requested rows.
    diff = case.op.rows(idx).to(torch.float64) - R.to(torch.float64)
    expected = (case.dense - case.kernel_dense)[idx]
    assert_close(diff, expected, case.rtol, case.atol, "rows - kernel_rows")


def check_kernel_matmul(case: OperatorCase) -> None:
    """``kernel_matmul`` is the product with ``K`` (no noise)."""
    V = _rhs(case, (case.dense.shape[1], 2))
    assert_close(case.op.kernel_matmul(V), case.kernel_dense @ V.to(torch.float64), case.rtol, case.atol,
                 "kernel_matmul")


def check_symmetric(case: OperatorCase) -> None:
    """A square kernel operator is symmetric: ``u^T (A v) == v^T (A u)``."""
    u = _rhs(case, (case.dense.shape[0],))
    v = _rhs(case, (case.dense.shape[0],), offset=1)
    a = torch.dot(u.to(torch.float64), case.op.matmul(v).to(torch.float64))
    b = torch.dot(v.to(torch.float64), case.op.matmul(u).to(torch.float64))
    scale = (u.to(torch.float64).norm() * v.to(torch.float64).norm() * case.dense.abs().max()).item()
    assert abs(a - b).item() <= 10 * case.rtol * scale + case.atol


def check_cache_level(case: OperatorCase) -> None:
    """After one product the operator caches nothing / part / all of the kernel matrix."""
    if case.expect_cached is None:
        return
    case.op.matmul(_rhs(case, (case.dense.shape[1], 1)))
    frac = cached_fraction(case.op)
    if case.expect_cached == "none":
        assert frac == 0.0, f"expected no cache, got fraction {frac}"
    elif case.expect_cached == "partial":
        assert 0.0 < frac < 1.0, f"expected a partial cache, got fraction {frac}"
    else:
        assert frac == 1.0, f"expected a full cache, got fraction {frac}"


#: Checks valid for every operator.
GENERIC_CHECKS = (check_metadata, check_matmul_vector, check_matmul_matrix, check_matmul_repeatable,
                  check_to_dense, check_rows, check_cache_level)
#: Checks that need a square ``K + noise I`` operator and ``kernel_dense``.
SQUARE_CHECKS = (check_diagonal, check_kernel_diagonal, check_kernel_rows, check_kernel_matmul, check_symmetric)


def check_operator(op, dense, kernel_dense=None, rtol: float = 1e-10, atol: float = 0.0, seed: int = 0,
                   expect_cached: str | None = None) -> None:
    """Run the whole contract on ``op``.

    Parameters
    ----------
    op : operator
    dense : float64 tensor
        Oracle of ``op.matmul``.
    kernel_dense : float64 tensor, optional
        Noise-free oracle; when given the square-operator checks run as well.
    rtol, atol : float
        Tolerances (norm-wise, see :func:`assert_close`).
    """
    case = OperatorCase(op, dense, kernel_dense, rtol, atol, seed, expect_cached)
    checks = GENERIC_CHECKS + (SQUARE_CHECKS if kernel_dense is not None else ())
    for check in checks:
        check(case)


class OperatorContract:
    """Mixin: one pytest test per generic contract check.

    Subclasses provide a ``case`` fixture returning an :class:`OperatorCase`.
    """

    def test_metadata(self, case):
        check_metadata(case)

    def test_matmul_vector(self, case):
        check_matmul_vector(case)

    def test_matmul_matrix(self, case):
        check_matmul_matrix(case)

    def test_matmul_repeatable(self, case):
        check_matmul_repeatable(case)

    def test_to_dense(self, case):
        check_to_dense(case)

    def test_rows(self, case):
        check_rows(case)

    def test_cache_level(self, case):
        check_cache_level(case)


class SquareOperatorContract(OperatorContract):
    """Mixin for ``K + noise I`` operators: the generic checks plus diagonal / kernel-only access.

    The ``case`` fixture must set ``kernel_dense``.
    """

    def test_diagonal(self, case):
        check_diagonal(case)

    def test_kernel_diagonal(self, case):
        check_kernel_diagonal(case)

    def test_kernel_rows(self, case):
        check_kernel_rows(case)

    def test_kernel_matmul(self, case):
        check_kernel_matmul(case)

    def test_symmetric(self, case):
        check_symmetric(case)
