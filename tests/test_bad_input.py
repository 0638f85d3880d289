"""Bad input raises a clear error (exception type and a message fragment that names the problem).

Each case is a ``(id, thunk, exception, match)`` row; ``thunk`` builds fresh inputs and makes the
offending call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

import gpscale
from gpscale import CrossKernelOperator, KernelOperator
from gpscale.kernels import RBF, Matern, make_kernel
from gpscale.logdet import slq_logdet
from gpscale.operators import bilinear_derivative, derivative_matmul
from gpscale.precond import PivotedCholesky

N, D = 12, 2
F32, F64 = torch.float32, torch.float64
NAN, INF = float("nan"), float("inf")


def _X(dtype=F64):
    """Valid ``(N, D)`` inputs."""
    return make_inputs(N, D, dtype=dtype, seed=81)


def _y(dtype=F64, n=N):
    """Valid targets of length ``n``."""
    return torch.linspace(-1.0, 1.0, n, dtype=dtype)


def _k(**kw):
    """A float64 RBF kernel."""
    return RBF(**kw).to(F64)


def _op(**kw):
    """A valid ``KernelOperator`` on :func:`_X`."""
    return KernelOperator(_X(), _k(), **kw)


def _with(t, index, value):
    """Copy of ``t`` with ``t[index] = value``."""
    t = t.clone()
    t[index] = value
    return t


def _mll(X=None, y=None, kernel=None, **kw):
    """Call ``marginal_log_likelihood`` with valid defaults for whatever is not given."""
    X = _X() if X is None else X
    y = _y(n=X.shape[0] if X.dim() >= 1 else N) if y is None else y
    return gpscale.marginal_log_likelihood(X, y, _k() if kernel is None else kernel, **kw)


def _kernel_with_raw(name, value):
    """A kernel whose raw parameter ``name`` is overwritten with ``value`` (bypassing the setters)."""
    k = _k()
    with torch.no_grad():
        getattr(k, name).fill_(value)
    return k


def _set(kernel, attr, value):
    """``setattr`` as an expression (for the setter cases)."""
    setattr(kernel, attr, value)


def _eye():
    """An ``(N, N)`` float64 identity (a valid SPD system)."""
    return torch.eye(N, dtype=F64)


def _ones(dtype=F64, shape=(N,)):
    """A ones tensor (a valid right-hand side by default)."""
    return torch.ones(*shape, dtype=dtype)


CASES = [
    # ---------------------------------------------------------------- non-finite data
    ("X_nan", lambda: _mll(X=_with(_X(), (3, 1), NAN)), ValueError, r"X contains 1 NaN/Inf.*\(3, 1\)"),
    ("X_inf", lambda: _mll(X=_with(_X(), (2, 0), INF)), ValueError, r"X contains 1 NaN/Inf"),
    ("y_nan", lambda: _mll(y=_with(_y(), 4, NAN)), ValueError, r"y contains 1 NaN/Inf.*\(4,\)"),
    ("y_inf", lambda: _mll(y=_with(_y(), 4, -INF)), ValueError, r"y contains 1 NaN/Inf"),
    ("X_nan_operator", lambda: KernelOperator(_with(_X(), (0, 0), NAN), _k()), ValueError, "X contains"),
    ("Z_inf_cross", lambda: CrossKernelOperator(_X(), _with(_X(), (1, 1), INF), _k()), ValueError,
     "Z contains"),
    # ---------------------------------------------------------------- shapes
    ("X_1d", lambda: _mll(X=_X()[:, 0], y=_y()), ValueError, r"X must be 2-D.*X\[:, None\]"),
    ("X_3d", lambda: _mll(X=_X()[None], y=_y()), ValueError, r"X must be 2-D \(n, d\), got shape \(1, 12, 2\)"),
    ("X_no_columns", lambda: _mll(X=torch.zeros(N, 0, dtype=F64)), ValueError, "no columns"),
    ("X_1d_operator", lambda: KernelOperator(_X()[:, 0], _k()), ValueError, "X must be 2-D"),
    ("y_wrong_length", lambda: _mll(y=_y(n=N - 1)), ValueError, r"X has 12 rows but y has 11 entries"),
    ("y_two_columns", lambda: _mll(y=torch.stack([_y(), _y()], 1)), ValueError, r"y must be 1-D.*multi-output"),
    ("y_3d", lambda: _mll(y=_y()[:, None, None]), ValueError, r"y must be 1-D"),
    ("n_below_2", lambda: _mll(X=_X()[:1], y=_y()[:1]), ValueError, r"n=1 rows; at least 2"),
    ("cross_d_mismatch", lambda: CrossKernelOperator(_X(), make_inputs(4, 3, seed=1), _k()), ValueError,
     r"X has d=2 columns but Z has d=3"),
    # ---------------------------------------------------------------- dtypes and types
    ("X32_y64", lambda: _mll(X=_X(F32), y=_y(F64)), TypeError,
     r"X has dtype torch.float32 but y has dtype torch.float64"),
    ("X64_y32", lambda: _mll(y=_y(F32)), TypeError, r"dtype torch.float64 but y has dtype torch.float32"),
    ("X_integer", lambda: _mll(X=torch.randint(0, 5, (N, D)), y=_y()), TypeError, r"X must be a floating tensor"),
    ("X_integer_operator", lambda: KernelOperator(torch.randint(0, 5, (N, D)), _k()), TypeError, "floating"),
    ("y_integer", lambda: _mll(y=torch.arange(N)), TypeError, r"y has dtype torch.int64"),
    ("X_list", lambda: _mll(X=[[0.0, 1.0]] * N, y=_y()), TypeError, r"X must be a torch.Tensor"),
    ("y_not_array_like", lambda: _mll(y=object()), TypeError, r"y must be a tensor or array-like"),
    ("cross_dtype", lambda: CrossKernelOperator(_X(), _X(F32), _k()), TypeError, "Z has dtype"),
    ("kernel_not_a_kernel_mll", lambda: _mll(kernel=lambda a: a), TypeError, "gpscale kernel"),
    ("kernel_not_a_kernel_op", lambda: KernelOperator(_X(), object()), TypeError, "gpscale kernel"),
    # ---------------------------------------------------------------- hyperparameters: constructor
    ("lengthscale_negative_ctor", lambda: RBF(lengthscale=-1.0), ValueError, r"lengthscale must be finite and > 0"),
    ("lengthscale_zero_ctor", lambda: Matern(lengthscale=0.0), ValueError, r"lengthscale must be finite and > 0"),
    ("lengthscale_nan_ctor", lambda: RBF(lengthscale=NAN), ValueError, "lengthscale must be finite"),
    ("ard_lengthscale_negative_ctor", lambda: RBF(lengthscale=torch.tensor([1.0, -1.0])), ValueError,
     "lengthscale must be finite and > 0"),
    ("outputscale_zero_ctor", lambda: RBF(outputscale=0.0), ValueError, r"outputscale must be finite and > 0"),
    ("outputscale_negative_ctor", lambda: Matern(outputscale=-2.0), ValueError, "outputscale must be finite"),
    ("outputscale_vector_ctor", lambda: RBF(outputscale=torch.ones(2)), ValueError, "outputscale must be a scalar"),
    ("lengthscale_matrix_ctor", lambda: RBF(lengthscale=torch.ones(2, 2)), ValueError, "scalar or a 1-D tensor"),
    ("ard_num_dims_mismatch_ctor", lambda: RBF(lengthscale=torch.ones(2), ard_num_dims=3), ValueError,
     r"lengthscale has 2 entries but ard_num_dims=3"),
    ("matern_bad_nu", lambda: Matern(nu=2.0), ValueError, r"nu in \(0.5, 1.5, 2.5\)"),
    # ---------------------------------------------------------------- hyperparameters: setters
    ("lengthscale_negative_setter", lambda: _set(_k(), "lengthscale", -2.0), ValueError, "lengthscale must be"),
    ("lengthscale_zero_setter_ard", lambda: _set(_k(ard_num_dims=2), "lengthscale", torch.tensor([1.0, 0.0])),
     ValueError, "lengthscale must be"),
    ("outputscale_zero_setter", lambda: _set(_k(), "outputscale", 0.0), ValueError, "outputscale must be"),
    ("outputscale_inf_setter", lambda: _set(_k(), "outputscale", INF), ValueError, "outputscale must be"),
    ("ard_lengthscale_wrong_length_setter", lambda: _set(_k(ard_num_dims=3), "lengthscale", torch.tensor([1.0, 2.0])), ValueError, "lengthscale"),
    ("shared_lengthscale_vector_setter", lambda: _set(_k(), "lengthscale", torch.tensor([1.0, 2.0])), ValueError, "lengthscale"),
    # ---------------------------------------------------------------- hyperparameters: KernelOperator
    ("noise_zero_operator", lambda: KernelOperator(_X(), _k(), noise=0.0), ValueError, r"noise must be finite and > 0"),
    ("noise_negative_operator", lambda: KernelOperator(_X(), _k(), noise=-1.0), ValueError, "noise must be finite"),
    ("noise_nan_operator", lambda: KernelOperator(_X(), _k(), noise=NAN), ValueError, "noise must be finite"),
    ("noise_vector_operator", lambda: KernelOperator(_X(), _k(), noise=torch.ones(2)), ValueError,
     "noise must be a scalar"),
    ("lengthscale_nan_operator", lambda: KernelOperator(_X(), _kernel_with_raw("raw_lengthscale", NAN)),
     ValueError, "lengthscale must be finite"),
    ("outputscale_nan_operator", lambda: KernelOperator(_X(), _kernel_with_raw("raw_outputscale", NAN)), ValueError, "outputscale"),
    ("ard_length_vs_d_operator", lambda: KernelOperator(_X(), _k(ard_num_dims=3)), ValueError,
     r"3 ARD lengthscales but X has d=2 columns"),
    ("memory_budget_zero", lambda: KernelOperator(_X(), _k(), memory_budget=0), ValueError, "memory_budget"),
    ("backend_unknown", lambda: KernelOperator(_X(), _k(), backend="keops-gpu"), ValueError, "backend must be one of"),
    # ---------------------------------------------------------------- hyperparameters: marginal_log_likelihood
    ("noise_zero_mll", lambda: _mll(noise=0.0), ValueError, r"noise must be finite and > 0"),
    ("noise_negative_mll", lambda: _mll(noise=-0.1), ValueError, "noise must be finite and > 0"),
    ("noise_negative_tensor_mll", lambda: _mll(noise=torch.tensor(-1.0, dtype=F64, requires_grad=True)),
     ValueError, "noise must be finite"),
    ("noise_vector_mll", lambda: _mll(noise=torch.ones(2, dtype=F64)), ValueError, "must be scalars"),
    ("lengthscale_nan_mll", lambda: _mll(kernel=_kernel_with_raw("raw_lengthscale", NAN)), ValueError,
     "lengthscale must be finite"),
    ("lengthscale_inf_mll", lambda: _mll(kernel=_kernel_with_raw("raw_lengthscale", INF)), ValueError,
     "lengthscale must be finite"),
    ("outputscale_nan_mll", lambda: _mll(kernel=_kernel_with_raw("raw_outputscale", NAN)), ValueError,
     "outputscale must be finite"),
    ("ard_length_vs_d_mll", lambda: _mll(kernel=_k(ard_num_dims=3)), ValueError,
     r"3 ARD lengthscales but X has d=2 columns; build the kernel with ard_num_dims=2"),
    ("mean_nan_mll", lambda: _mll(mean=NAN), ValueError, "mean"),
    # ---------------------------------------------------------------- method / estimator options
    ("method_unknown", lambda: _mll(method="exact"),
     ValueError, r"method must be one of \('auto', 'cholesky', 'iterative'\)"),
    ("num_probes_zero", lambda: _mll(method="iterative", num_probes=0),
     ValueError, "num_probes must be an integer >= 1"),
    ("rtol_negative_mll", lambda: _mll(method="iterative", rtol=-1e-3), ValueError, "rtol must be a finite number"),
    ("max_iter_zero_mll", lambda: _mll(method="iterative", max_iter=0), ValueError, "max_iter must be an integer"),
    ("slq_num_probes_zero", lambda: slq_logdet(_op(), num_probes=0), ValueError, "num_probes"),
    ("pivchol_rank_negative", lambda: PivotedCholesky(rank=-1), ValueError, "rank must be an integer >= 0"),
    ("pivchol_rank_float", lambda: PivotedCholesky(rank=2.5), ValueError, "rank must be an integer"),
    ("pivchol_tol_negative", lambda: PivotedCholesky(tol=-1.0), ValueError, "tol must be a finite number"),
    ("kernel_name_unknown", lambda: make_kernel("gaussian"), ValueError,
     r"unknown kernel 'gaussian'; choose one of \['matern12', 'matern32', 'matern52', 'rbf'\]"),
    ("kernel_name_none", lambda: make_kernel(None), ValueError, "unknown kernel"),
    # ---------------------------------------------------------------- operator products
    ("matmul_wrong_rows", lambda: _op().matmul(_ones(shape=(N - 1,))), ValueError,
     r"cannot multiply an operator of shape \(12, 12\) by a tensor of shape \(11,\)"),
    ("matmul_wrong_rows_matrix", lambda: _op().matmul(_ones(shape=(N + 1, 2))), ValueError,
     "needs 12 rows"),
    ("matmul_3d", lambda: _op().matmul(_ones(shape=(N, 2, 2))), ValueError, "cannot multiply"),
    ("matmul_cross_wrong_rows", lambda: CrossKernelOperator(_X(), make_inputs(5, D, seed=2), _k()).matmul(_ones()),
     ValueError, r"needs 5 rows"),
    ("matmul_dtype", lambda: _op().matmul(_ones(F32)), TypeError,
     "right-hand side has dtype torch.float32"),
    ("matmul_list", lambda: _op().matmul([1.0] * N), TypeError, "must be a torch.Tensor"),
    ("to_dense_too_large", lambda: _op().to_dense(max_entries=100), MemoryError, "max_entries"),
    ("derivative_wrong_rows", lambda: derivative_matmul(KernelOperator(_X(), _k()), _ones(shape=(3,))),
     ValueError, "cannot multiply"),
    ("bilinear_shape_mismatch",
     lambda: bilinear_derivative(KernelOperator(_X(), _k()), _ones(shape=(N, 2)), _ones(shape=(N, 3))),
     ValueError, "same shape"),
    # ---------------------------------------------------------------- cg
    ("cg_rtol_negative", lambda: gpscale.cg(_eye(), _ones(), rtol=-1.0),
     ValueError, r"rtol must be a finite number >= 0"),
    ("cg_rtol_nan", lambda: gpscale.cg(_eye(), _ones(), rtol=NAN), ValueError, "rtol must be a finite"),
    ("cg_rtol_inf", lambda: gpscale.cg(_eye(), _ones(), rtol=INF), ValueError, "rtol must be a finite"),
    ("cg_rtol_string", lambda: gpscale.cg(_eye(), _ones(), rtol="1e-3"), ValueError, "rtol must be a finite"),
    ("cg_atol_negative", lambda: gpscale.cg(_eye(), _ones(), atol=-1.0), ValueError, "atol must be a finite"),
    ("cg_max_iter_zero", lambda: gpscale.cg(_eye(), _ones(), max_iter=0),
     ValueError, r"max_iter must be an integer >= 1"),
    ("cg_max_iter_negative", lambda: gpscale.cg(_eye(), _ones(), max_iter=-5),
     ValueError, "max_iter must be an integer"),
    ("cg_max_iter_float", lambda: gpscale.cg(_eye(), _ones(), max_iter=10.5),
     ValueError, "max_iter must be an integer"),
    ("cg_check_every_zero", lambda: gpscale.cg(_eye(), _ones(), check_every=0), ValueError, "check_every"),
    ("cg_num_tridiag_negative", lambda: gpscale.cg(_eye(), _ones(), num_tridiag=-1), ValueError, "num_tridiag"),
    ("cg_rhs_wrong_rows", lambda: gpscale.cg(_eye(), _ones(shape=(N - 1,))), ValueError,
     r"A has shape \(12, 12\) but B has 11 rows"),
    ("cg_A_not_square", lambda: gpscale.cg(torch.ones(N, N - 1, dtype=F64), _ones()), ValueError,
     "must be square"),
    ("cg_rhs_3d", lambda: gpscale.cg(_eye(), _ones(shape=(N, 1, 1))),
     ValueError, r"B must have shape \(n,\) or \(n, t\)"),
    ("cg_rhs_nan", lambda: gpscale.cg(_eye(), _with(_ones(), 0, NAN)), ValueError, "B contains NaN/Inf"),
    ("cg_rhs_dtype", lambda: gpscale.cg(_eye(), _ones(F32)), TypeError,
     r"A has dtype torch.float64 but B has dtype torch.float32"),
    ("cg_x0_shape", lambda: gpscale.cg(_eye(), _ones(), x0=_ones(shape=(N - 1,))),
     ValueError, "x0 must have the shape"),
    ("cg_A_unsupported", lambda: gpscale.cg("not a matrix", _ones()), TypeError, "A must be a tensor"),
    ("cg_bad_preconditioner", lambda: gpscale.cg(_eye(), _ones(), preconditioner=object()), TypeError,
     "preconditioner must be"),
    ("cg_rhs_list", lambda: gpscale.cg(_eye(), [1.0] * N), TypeError, "B must be a torch.Tensor"),
    ("cg_x0_dtype", lambda: gpscale.cg(_eye(), _ones(), x0=_ones(F32)), TypeError, "x0"),
    # the product backend and the device, through the user-facing entry points
    ("mll_backend_unknown", lambda: gpscale.mll_estimate(_X(), _y(), _k(), backend="gpu"), ValueError,
     r"backend must be one of \('auto', 'cuda', 'keops', 'torch'\)"),
    ("exactgp_backend_unknown", lambda: gpscale.ExactGP(backend="KeOps").fit(_X(), _y()), ValueError,
     "backend must be one of"),
    ("exactgp_device_unknown", lambda: gpscale.ExactGP(device="tpu").fit(_X(), _y()), ValueError,
     "device must be a device such as 'cpu', 'cuda'"),
    pytest.param("exactgp_device_cuda_without_gpu", lambda: gpscale.ExactGP(device="cuda").fit(_X(), _y()),
                 ValueError, "sees no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                          reason="a GPU is visible")),
]


def _ids(cases):
    """Test ids: the first field of each row (or of each ``pytest.param``)."""
    return [c.values[0] if hasattr(c, "values") else c[0] for c in cases]


@pytest.mark.parametrize("name,thunk,exc,match", CASES, ids=_ids(CASES))
def test_bad_input_raises_clear_error(name, thunk, exc, match):
    """The offending call raises ``exc`` with a message matching ``match``."""
    with pytest.raises(exc, match=match):
        thunk()


# ----------------------------------------------------------------------------- not errors
def test_column_vector_targets_are_accepted():
    """``y`` of shape ``(n, 1)`` is the same as ``(n,)`` (no error, same value)."""
    X, y, k = _X(), _y(), _k()
    a = gpscale.marginal_log_likelihood(X, y, k, 0.1)
    b = gpscale.marginal_log_likelihood(X, y[:, None], k, 0.1)
    assert torch.equal(a, b)


def test_array_like_targets_are_converted():
    """A plain list ``y`` is converted to ``X``'s dtype."""
    X, k = _X(), _k()
    a = gpscale.marginal_log_likelihood(X, _y(), k, 0.1)
    b = gpscale.marginal_log_likelihood(X, _y().tolist(), k, 0.1)
    torch.testing.assert_close(a, b)


def test_make_kernel_names():
    """All documented short names (case and separator insensitive) build the right kernel."""
    assert isinstance(make_kernel("RBF"), RBF)
    for name, nu in (("matern12", 0.5), ("Matern-32", 1.5), ("matern_52", 2.5)):
        k = make_kernel(name, lengthscale=0.5)
        assert isinstance(k, Matern) and k.nu == nu
        assert float(k.lengthscale.detach()) == pytest.approx(0.5, rel=1e-6)


def test_cg_nan_x0_is_not_reported_converged():
    """A NaN initial guess must not come back as a CONVERGED NaN solution."""
    x0 = _with(_ones(), 0, NAN)
    try:
        res = gpscale.cg(_eye(), _ones(), x0=x0, warn=False)
    except ValueError:
        return  # rejecting the input up front is fine too
    assert res.status != gpscale.CGStatus.CONVERGED or bool(torch.isfinite(res.x).all())
