"""Kernel operators against dense float64 oracles, and derivative products against autograd."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    KERNEL_IDS,
    KERNEL_SPECS,
    build_kernel,
    dense_kernel,
    dense_oracle,
    make_inputs,
)
from operator_contract import (
    OperatorCase,
    OperatorContract,
    SquareOperatorContract,
    assert_close,
    cached_fraction,
    check_operator,
)
from torch.func import functional_call

from gpscale import CrossKernelOperator, KernelOperator
from gpscale.kernels import to_positive
from gpscale.operators import bilinear_derivative, derivative_matmul

N, M, D = 203, 157, 3
TILE_ROWS, TILE_COLS = 37, 50  # neither divides n = 203 nor m = 157
NOISE = 0.1
#: memory budgets (bytes): tiny -> nothing cached, medium -> part cached, large -> all cached
BUDGETS = {"none": 512, "partial": 100_000, "full": 1 << 30}
TOLS = {torch.float64: 1e-10, torch.float32: 1e-4}

CONFIGS = list(itertools.product(range(len(KERNEL_SPECS)), [False, True], [torch.float64, torch.float32],
                                 list(BUDGETS)))
CONFIG_IDS = [f"{KERNEL_IDS[k]}-{'ard' if ard else 'shared'}-{str(dt)[6:]}-cache_{b}"
              for k, ard, dt, b in CONFIGS]


def _kernel_for(kidx: int, ard: bool, dtype):
    family, nu = KERNEL_SPECS[kidx]
    return build_kernel(family, nu, ard=ard, d=D, dtype=dtype)


class TestKernelOperatorContract(SquareOperatorContract):
    """``KernelOperator`` (``K + noise I``) over kernels x lengthscale kind x dtype x cache level."""

    @pytest.fixture(params=CONFIGS, ids=CONFIG_IDS)
    def case(self, request):
        kidx, ard, dtype, budget = request.param
        X = make_inputs(N, D, dtype=dtype, seed=3)
        k = _kernel_for(kidx, ard, dtype)
        op = KernelOperator(X, k, noise=NOISE, memory_budget=BUDGETS[budget], tile_rows=TILE_ROWS,
                            tile_cols=TILE_COLS)
        return OperatorCase(op, dense_oracle(k, X, NOISE), dense_kernel(k, X), rtol=TOLS[dtype],
                            seed=kidx, expect_cached=budget, dtype=dtype, device=torch.device("cpu"))


class TestCrossKernelOperatorContract(OperatorContract):
    """``CrossKernelOperator`` ``K(X, Z)`` against ``kernel(X, Z)``."""

    @pytest.fixture(params=CONFIGS, ids=CONFIG_IDS)
    def case(self, request):
        kidx, ard, dtype, budget = request.param
        X = make_inputs(N, D, dtype=dtype, seed=3)
        Z = make_inputs(M, D, dtype=dtype, seed=4, scale=3.5)
        k = _kernel_for(kidx, ard, dtype)
        op = CrossKernelOperator(X, Z, k, memory_budget=BUDGETS[budget], tile_rows=TILE_ROWS, tile_cols=TILE_COLS)
        return OperatorCase(op, dense_kernel(k, X, Z), rtol=TOLS[dtype], seed=kidx, expect_cached=budget,
                            dtype=dtype, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- further operator tests
@pytest.mark.parametrize("kidx", range(len(KERNEL_SPECS)), ids=KERNEL_IDS)
def test_check_operator_default_tiling(kidx):
    """The functional contract with the operator's own tiling choice (float64, default budget)."""
    X = make_inputs(97, 2, seed=5)
    k = _kernel_for(kidx, False, torch.float64)
    op = KernelOperator(X, k, noise=0.3)
    check_operator(op, dense_oracle(k, X, 0.3), dense_kernel(k, X), rtol=1e-10, expect_cached="full")


def test_cache_disabled_matches_oracle():
    """``cache=False`` keeps nothing in memory and still gives the right product."""
    X = make_inputs(120, 2, seed=6)
    k = build_kernel("matern", 1.5, d=2)
    op = KernelOperator(X, k, noise=0.2, cache=False, tile_rows=17, tile_cols=23)
    check_operator(op, dense_oracle(k, X, 0.2), dense_kernel(k, X), rtol=1e-10, expect_cached="none")


def test_cross_operator_with_identical_inputs_matches_kernel_part():
    """``CrossKernelOperator(X, X)`` is the noise-free kernel of ``KernelOperator(X)``, exact diagonal."""
    X = make_inputs(64, 3, seed=7)
    k = build_kernel("matern", 0.5, ard=True, d=3)
    cross = CrossKernelOperator(X, X, k, tile_rows=9, tile_cols=13)
    sq = KernelOperator(X, k, noise=0.5)
    V = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_close(cross.matmul(V), sq.kernel_matmul(V), 1e-12, what="cross(X, X) vs kernel_matmul")
    R = cross.rows([5, 0, 63])
    assert_close(R, dense_kernel(k, X)[[5, 0, 63]], 1e-12, what="cross rows")
    # The diagonal entries of the rows are exactly the outputscale (q = 0 exactly, even for Matérn-1/2).
    s = k.outputscale.detach().to(torch.float64)
    assert torch.equal(R[torch.arange(3), torch.tensor([5, 0, 63])], s.expand(3))


def test_far_from_origin_inputs_keep_diagonal_exact():
    """Inputs with a large offset (cancellation in the expanded distance) keep K accurate."""
    X = make_inputs(80, 2, seed=8) + 1e3
    k = build_kernel("matern", 0.5, d=2)
    op = KernelOperator(X, k, noise=0.1, tile_rows=31, tile_cols=31)
    assert_close(op.to_dense(), dense_oracle(k, X, 0.1), 1e-8, what="offset inputs")


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_operators(n):
    """Degenerate sizes (a single point, two points) follow the contract."""
    X = make_inputs(n, 2, seed=9)
    k = build_kernel("rbf", d=2)
    op = KernelOperator(X, k, noise=0.4, tile_rows=1, tile_cols=1)
    check_operator(op, dense_oracle(k, X, 0.4), dense_kernel(k, X), rtol=1e-12)


def test_operator_is_a_hyperparameter_snapshot():
    """Changing the kernel after construction does not change an existing operator."""
    X = make_inputs(30, 2, seed=10)
    k = build_kernel("rbf", d=2)
    op = KernelOperator(X, k, noise=0.1)
    before = dense_oracle(k, X, 0.1)
    k.lengthscale = 2.5
    assert_close(op.to_dense(), before, 1e-12, what="snapshot")


# ----------------------------------------------------------------------------- derivative products
def _autograd_constrained_grads(kernel, X, fn):
    """Gradient of ``fn(K)`` w.r.t. the *constrained* hyperparameters via autograd on ``kernel(X)``.

    Differentiates the module's forward w.r.t. its raw parameters and divides by the derivative
    of the positive transform ``softplus(raw) + 1e-6``, which is ``sigmoid(raw)``.
    """
    params = {name: p.detach().clone().requires_grad_(True) for name, p in kernel.named_parameters()}
    K = functional_call(kernel, params, (X,))
    graw = torch.autograd.grad(fn(K), [params["raw_lengthscale"], params["raw_outputscale"]])
    return {"lengthscale": graw[0] / torch.sigmoid(params["raw_lengthscale"].detach()),
            "outputscale": graw[1] / torch.sigmoid(params["raw_outputscale"].detach())}


def _dense_derivatives(kernel, X):
    """Dense ``dK/dθ`` for θ = each lengthscale and the outputscale, by forward-mode autodiff.

    Returns ``(dK/dl, dK/ds)`` with ``dK/dl`` of shape ``(d, n, n)`` for ARD and ``(n, n)`` otherwise.
    """
    raw_l = kernel.raw_lengthscale.detach().clone()
    raw_s = kernel.raw_outputscale.detach().clone()

    def K_of(rl, rs):
        # Written out with explicit differences (forward-mode AD does not go through cdist).
        diff = (X[:, None, :] - X[None, :, :]) / to_positive(rl)
        return to_positive(rs) * kernel.profile(diff.pow(2).sum(-1))

    Jl, Js = torch.func.jacfwd(K_of, argnums=(0, 1))(raw_l, raw_s)
    Jl = Jl / torch.sigmoid(raw_l)
    Js = Js / torch.sigmoid(raw_s)
    if raw_l.dim() == 1:
        Jl = Jl.permute(2, 0, 1)
    return Jl, Js


DERIV_CONFIGS = list(itertools.product(range(len(KERNEL_SPECS)), [False, True], ["none", "full"]))
DERIV_IDS = [f"{KERNEL_IDS[k]}-{'ard' if ard else 'shared'}-cache_{b}" for k, ard, b in DERIV_CONFIGS]


def _deriv_problem(kidx, ard, budget, duplicate=False):
    X = make_inputs(61, D, seed=12)
    if duplicate:
        X[7] = X[3]
        X[40] = X[20]
    k = _kernel_for(kidx, ard, torch.float64)
    op = KernelOperator(X, k, noise=0.25, memory_budget=BUDGETS[budget], tile_rows=13, tile_cols=17)
    return X, k, op


@pytest.mark.parametrize("kidx,ard,budget", DERIV_CONFIGS, ids=DERIV_IDS)
def test_derivative_matmul_matches_autograd(kidx, ard, budget):
    """``derivative_matmul(op, V)`` equals ``(dK/dθ) V`` from autodiff of ``kernel(X)``."""
    X, k, op = _deriv_problem(kidx, ard, budget)
    g = torch.Generator().manual_seed(kidx)
    V = torch.randn(X.shape[0], 4, generator=g, dtype=torch.float64)
    dKl, dKs = _dense_derivatives(k, X)
    got = derivative_matmul(op, V)
    want_l = dKl @ V
    assert got["lengthscale"].shape == ((D, X.shape[0], 4) if ard else (X.shape[0], 4))
    assert_close(got["lengthscale"], want_l, 1e-10, what="dK/dl @ V")
    assert_close(got["outputscale"], dKs @ V, 1e-10, what="dK/ds @ V")
    assert_close(got["noise"], V, 0.0, what="dK/dnoise @ V")
    # a 1-D right-hand side gives 1-D results
    got_v = derivative_matmul(op, V[:, 0])
    assert_close(got_v["lengthscale"], want_l[..., 0], 1e-10, what="dK/dl @ v")
    assert_close(got_v["outputscale"], (dKs @ V)[:, 0], 1e-10, what="dK/ds @ v")
    assert_close(got_v["noise"], V[:, 0], 0.0, what="dK/dnoise @ v")


@pytest.mark.parametrize("kidx,ard,budget", DERIV_CONFIGS, ids=DERIV_IDS)
def test_bilinear_derivative_matches_autograd(kidx, ard, budget):
    """``bilinear_derivative(op, A, B)`` equals ``d/dθ sum_c a_c^T K b_c`` by reverse-mode autograd."""
    X, k, op = _deriv_problem(kidx, ard, budget)
    g = torch.Generator().manual_seed(100 + kidx)
    A = torch.randn(X.shape[0], 3, generator=g, dtype=torch.float64)
    B = torch.randn(X.shape[0], 3, generator=g, dtype=torch.float64)
    want = _autograd_constrained_grads(k, X, lambda K: (A * (K @ B)).sum())
    got = bilinear_derivative(op, A, B)
    assert got["lengthscale"].shape == ((D,) if ard else ())
    assert_close(got["lengthscale"], want["lengthscale"], 1e-10, what="bilinear dK/dl")
    assert_close(got["outputscale"], want["outputscale"], 1e-10, what="bilinear dK/ds")
    assert_close(got["noise"], (A * B).sum(), 1e-12, what="bilinear dK/dnoise")


def test_bilinear_derivative_is_not_symmetric_in_general():
    """A non-symmetric pair (A, B) is handled: the result equals autograd, not its symmetrisation."""
    X, k, op = _deriv_problem(3, True, "none")
    g = torch.Generator().manual_seed(7)
    A = torch.randn(X.shape[0], 1, generator=g, dtype=torch.float64)
    B = torch.zeros(X.shape[0], 1, dtype=torch.float64)
    B[:20] = 1.0
    want = _autograd_constrained_grads(k, X, lambda K: (A * (K @ B)).sum())
    got = bilinear_derivative(op, A, B)
    assert_close(got["lengthscale"], want["lengthscale"], 1e-10, what="dK/dl")
    assert_close(got["outputscale"], want["outputscale"], 1e-10, what="dK/ds")


def test_bilinear_derivative_consistent_with_derivative_matmul():
    """``sum a^T (dK/dθ) b`` equals ``sum a * derivative_matmul(op, b)`` for every θ."""
    X, k, op = _deriv_problem(0, True, "full")
    g = torch.Generator().manual_seed(8)
    A = torch.randn(X.shape[0], 2, generator=g, dtype=torch.float64)
    B = torch.randn(X.shape[0], 2, generator=g, dtype=torch.float64)
    bil = bilinear_derivative(op, A, B)
    dm = derivative_matmul(op, B)
    assert_close(bil["lengthscale"], (A[None] * dm["lengthscale"]).sum((1, 2)), 1e-10, what="lengthscale")
    assert_close(bil["outputscale"], (A * dm["outputscale"]).sum(), 1e-10, what="outputscale")
    assert_close(bil["noise"], (A * dm["noise"]).sum(), 1e-12, what="noise")


def test_cache_level_of_budgets_is_as_planned():
    """Sanity of the budget fixtures themselves for both dtypes (guards the contract's cache cases)."""
    for dtype in (torch.float64, torch.float32):
        X = make_inputs(N, D, dtype=dtype, seed=3)
        k = build_kernel("rbf", dtype=dtype)
        fracs = {}
        for name, budget in BUDGETS.items():
            op = KernelOperator(X, k, noise=NOISE, memory_budget=budget, tile_rows=TILE_ROWS, tile_cols=TILE_COLS)
            op.matmul(torch.ones(N, dtype=dtype))
            fracs[name] = cached_fraction(op)
        assert fracs["none"] == 0.0 and 0.0 < fracs["partial"] < 1.0 and fracs["full"] == 1.0, fracs


@pytest.mark.parametrize("kidx", range(len(KERNEL_SPECS)), ids=KERNEL_IDS)
def test_duplicate_inputs(kidx):
    """Repeated input points (``q = 0`` off the diagonal) keep products and derivatives accurate.

    The expanded distance ``|x|^2 - 2 x.z + |z|^2`` leaves an ``O(eps |x|^2)`` residue where the
    exact ``q`` is 0; through the Matérn-1/2 square root this becomes an ``O(sqrt(eps))`` error
    (~1e-8 in float64), so that kernel gets a looser tolerance.  The smooth kernels stay at 1e-10.
    """
    X, k, op = _deriv_problem(kidx, True, "none", duplicate=True)
    tol = 1e-6 if KERNEL_SPECS[kidx] == ("matern", 0.5) else 1e-10
    assert_close(op.to_dense(), dense_oracle(k, X, 0.25), tol, what="to_dense with duplicates")
    g = torch.Generator().manual_seed(5)
    A = torch.randn(X.shape[0], 2, generator=g, dtype=torch.float64)
    B = torch.randn(X.shape[0], 2, generator=g, dtype=torch.float64)
    want = _autograd_constrained_grads(k, X, lambda K: (A * (K @ B)).sum())
    got = bilinear_derivative(op, A, B)
    assert_close(got["lengthscale"], want["lengthscale"], tol, what="bilinear dK/dl with duplicates")
    assert_close(got["outputscale"], want["outputscale"], tol, what="bilinear dK/ds with duplicates")
    dKl, dKs = _dense_derivatives(k, X)
    dm = derivative_matmul(op, B)
    assert_close(dm["lengthscale"], dKl @ B, tol, what="dK/dl @ V with duplicates")
    assert_close(dm["outputscale"], dKs @ B, tol, what="dK/ds @ V with duplicates")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_duplicate_inputs_get_the_exact_diagonal_value_for_matern12(dtype):
    """K(x, x') for x' = x is the outputscale exactly, in every precision (float32 was off by ~1e-3)."""
    X = make_inputs(300, 3, seed=4).to(dtype) * 3
    X[200:240] = X[:40]
    k = build_kernel("matern", 0.5, d=3)
    op = CrossKernelOperator(X, X, k)  # symmetric (Z is X), no noise on the diagonal
    assert op._qsnap > 0
    K = op.to_dense()
    s = float(op.outputscale)
    assert torch.equal(K[torch.arange(40), torch.arange(200, 240)], torch.full((40,), s, dtype=dtype))
    assert torch.equal(op.rows(torch.arange(40))[torch.arange(40), torch.arange(200, 240)],
                       torch.full((40,), s, dtype=dtype))
    assert_close(K, dense_kernel(k, X.double()), 2e-3 if dtype == torch.float32 else 1e-10, what="K with the shift")
    # smooth kernels are left alone (no kink at 0: the residue costs only O(eps) there)
    assert KernelOperator(X, build_kernel("matern", 2.5, d=3), noise=0.1)._qsnap == 0.0


def test_duplicate_inputs_matern12_full_precision():
    """Repeated inputs are as exact as the diagonal: ``K_ij = s`` and zero derivative terms.

    Checks both the product path (``to_dense``) and the derivative path (``bilinear_derivative``)
    at float64 precision.  Was an xfail (an O(sqrt(eps)) ~ 1e-8 error: the expanded distance's
    residue through the square root) until the coincidence shift (``gpscale.operators.expansion``).
    """
    X = make_inputs(N, D, seed=3)
    X[100:130] = X[:30]  # 30 duplicate pairs: the residue is a matter of rounding luck per pair
    k = build_kernel("matern", 0.5, d=D)
    op = KernelOperator(X, k, noise=0.25, tile_rows=TILE_ROWS, tile_cols=TILE_COLS)
    errors = []
    try:
        assert_close(op.to_dense(), dense_oracle(k, X, 0.25), 1e-10, what="K")
    except AssertionError as exc:
        errors.append(str(exc))
    g = torch.Generator().manual_seed(5)
    A = torch.randn(N, 2, generator=g, dtype=torch.float64)
    B = torch.randn(N, 2, generator=g, dtype=torch.float64)
    want = _autograd_constrained_grads(k, X, lambda K: (A * (K @ B)).sum())
    try:
        assert_close(bilinear_derivative(op, A, B)["lengthscale"], want["lengthscale"], 1e-10, what="dK/dl")
    except AssertionError as exc:
        errors.append(str(exc))
    assert not errors, errors
