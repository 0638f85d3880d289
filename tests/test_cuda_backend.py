"""The ``cuda`` backend's options and variant policy, on CPU: ``CudaBackend`` / ``"cuda:<variant>"``
values, the expansion guard that picks ``tcbh`` or ``simt`` per product, and what an operator hands to
the launcher (``gpscale._ext.kernel_matmul`` replaced by a recorder: no GPU here).

The kernels themselves are tested in ``test_cuda_kernels.py`` (GPU), ``test_cuda_emulated.py`` (CPU
emulation) and compiled in ``test_csrc_compile.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_inputs

from gpscale.kernels import RBF, Matern
from gpscale.likelihood import mll_estimate
from gpscale.operators import CrossKernelOperator, CudaBackend, KernelOperator, backends, cuda_backend, expansion


# ----------------------------------------------------------------------------- backend= values
@pytest.mark.parametrize("value, want", [
    ("auto", ("auto", None)), ("torch", ("torch", None)), ("keops", ("keops", None)),
    ("cuda", ("cuda", CudaBackend())), ("cuda:tc3", ("cuda", CudaBackend(variant="tc3"))),
    (CudaBackend(variant="tcb", splits="auto"), ("cuda", CudaBackend(variant="tcb", splits="auto")))])
def test_backend_values_name_a_backend_and_the_cuda_options(value, want):
    assert backends.parse_backend(value) == want
    assert backends.check_backend_name(value) is value  # entry points keep the value as given


@pytest.mark.parametrize("value", ["cuda:", "cuda:tc4", "keops:tc3", "CUDA", 3, None])
def test_malformed_backend_values_name_every_accepted_form(value):
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda:<variant>'.*CudaBackend"):
        backends.parse_backend(value)


@pytest.mark.parametrize("kw, match", [({"variant": "tc4"}, "variant must be None"),
                                       ({"splits": 0}, "splits must be a positive int or 'auto'"),
                                       ({"splits": 2.0}, "splits must be"), ({"splits": True}, "splits must be"),
                                       ({"splits": "many"}, "splits must be")])
def test_cuda_backend_options_are_checked_when_made(kw, match):
    with pytest.raises(ValueError, match=match):
        CudaBackend(**kw)


@pytest.mark.parametrize("value", ["cuda:tcbh", CudaBackend(variant="tc3")])
def test_a_float32_variant_on_float64_data_is_refused_when_the_operator_is_built(value):
    X = make_inputs(20, 2).double()
    with pytest.raises(ValueError, match=r"computes in float32, but X is float64; use backend='cuda:simt'"):
        KernelOperator(X, RBF(), noise=0.1, backend=value)


def test_the_cuda_variant_names_match_the_launcher():
    from gpscale._ext import launch

    assert backends.CUDA_VARIANTS == tuple(launch.VARIANTS)


@pytest.mark.parametrize("value, dtype, want", [
    ("cuda", torch.float32, ("tcbh", 1)), ("cuda", torch.float64, ("simt", 1)),
    ("cuda:tc3", torch.float32, ("tc3", 1)), (CudaBackend(variant="tcb", splits=3), torch.float32, ("tcb", 3)),
    (CudaBackend(splits="auto"), torch.float32, ("tcbh", "auto")),
    (CudaBackend(variant="simt", splits=4), torch.float32, ("simt", 1))])  # simt launches take no splits
def test_an_operators_cuda_options_reach_every_launch(monkeypatch, value, dtype, want):
    """The options travel with the operator (no process-wide setting): each product launches the
    variant and column splits its ``backend=`` value names."""
    from gpscale import _ext

    launched = []
    monkeypatch.setattr(backends, "backend_available", lambda *a, **k: (True, ""))  # no GPU here
    monkeypatch.setattr(_ext, "kernel_matmul", lambda X, Z, V, name, mode, variant, symmetric, inputs_max_abs, splits:
                        launched.append((variant, splits)) or torch.zeros(X.shape[0], V.shape[1], dtype=V.dtype))
    X = make_inputs(40, 3).to(dtype)
    for op in (KernelOperator(X, RBF(), noise=0.1, backend=value), CrossKernelOperator(X, X[:9], RBF(), backend=value)):
        assert op.backend == "cuda"
        op.matmul(torch.ones(op.shape[1], 2, dtype=dtype))
        assert launched[-1] == want and backends.backend_label(op) == f"cuda:{want[0]}"


def test_the_entry_points_take_cuda_options_as_their_backend():
    """ExactGP and mll_estimate hand a CudaBackend down to their operators (here: CPU data, so the
    operator refuses it with the reason) and refuse a malformed value before any work."""
    import gpscale

    X = make_inputs(30, 2)
    y = X[:, 0].clone()
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here: .*CUDA tensors"):
        mll_estimate(X, y, RBF(), noise=0.1, method="iterative", backend=CudaBackend(splits="auto"))
    with pytest.raises(RuntimeError, match=r"cannot run here"):
        gpscale.ExactGP(method="iterative", max_iter=1, backend=CudaBackend(variant="simt"), verbose=False).fit(X, y)
    with pytest.raises(ValueError, match=r"'cuda:<variant>'"):
        gpscale.ExactGP(backend="cuda:tc4", verbose=False).fit(X, y)


# ----------------------------------------------------------------------------- CUDA variant guard (CPU)
@pytest.mark.parametrize("mode,slope", [("f", 0.5), ("f_dq", 0.5), ("d", 0.25)])
def test_rbf_expansion_error_is_the_profile_slope_times_the_distance_error(mode, slope):
    # max |f'| = 1/2 (f), max |d(f' q)/dq| = 1/2 (f_dq), max |f''| = 1/4 (d), all at q = 0
    assert expansion.expansion_error(RBF(), mode, 10.0) == pytest.approx(slope * expansion.expansion_delta(10.0),
                                                                            rel=1e-2)


def test_matern12_expansion_error_is_the_square_root_of_the_distance_error():
    delta = expansion.expansion_delta(10.0)
    assert expansion.expansion_error(Matern(nu=0.5), "f", 10.0) == pytest.approx(math.sqrt(delta), rel=0.05)
    assert expansion.expansion_error(Matern(nu=0.5), "d", 10.0) > 1e3  # f' ~ 1/r: singular


def test_expansion_error_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        expansion.expansion_error(RBF(), "fdq", 10.0)


def test_variant_for_falls_back_to_simt_where_the_expansion_is_too_coarse():
    f32, vf = torch.float32, cuda_backend.variant_for
    assert vf(torch.float64) == "simt" and vf(f32) == "tcbh"  # the float32 default since the third H100 run
    assert vf(f32, RBF(), "f", 20.0) == "tcbh"  # d = 8 at lengthscale ~1
    assert vf(f32, Matern(nu=2.5), "f_dq", 20.0) == "tcbh"
    # the failing cases of the first H100 run: d = 1, points spread over 60 lengthscales (r2 ~ 1800)
    assert vf(f32, RBF(), "f", 1800.0) == "simt"
    assert vf(f32, Matern(nu=0.5), "f", 1.0) == "simt"  # sqrt(delta) near coincident points
    assert vf(f32, Matern(nu=1.5), "d", 1.0) == "simt"  # steep f' at q = 0
    # an explicit variant wins (benchmarks, comparisons), in either dtype
    assert vf(f32, Matern(nu=0.5), "f", 1.0, CudaBackend(variant="tc")) == "tc"
    assert vf(torch.float64, RBF(), "f", 1.0, CudaBackend(variant="simt")) == "simt"


def test_cuda_products_choose_the_variant_per_call_and_measure_the_inputs_once(monkeypatch):
    from gpscale import _ext

    calls, splits_seen = [], []
    monkeypatch.setattr(_ext, "kernel_matmul", lambda X, Z, V, name, mode, variant, symmetric, inputs_max_abs, splits:
                        calls.append((name, mode, variant)) or splits_seen.append(splits) or V)
    X = torch.zeros(30, 2)
    X[0] = torch.tensor([3.0, 4.0])  # max |x|^2 = 25: r2 = 50
    xn = X.pow(2).sum(1)  # the operator's squared row norms, which the guard reads
    op = SimpleNamespace(_Xs=X, _Zs=X, _xn=xn, _zn=xn, kernel=RBF(), _symmetric=True, backend="cuda",
                         cuda_options=CudaBackend(splits="auto"))  # splits: passed to tcb-family launches only
    assert backends.backend_label(op) == "cuda"
    cuda_backend.products(op, torch.ones(30, 1), "f")
    assert op._cuda_r2 == pytest.approx(50.0) and calls[-1] == ("rbf", "f", "tcbh")
    assert backends.backend_label(op) == "cuda:tcbh"
    op.kernel = Matern(nu=0.5)  # the same operator data: r2 is not measured again
    op._Xs = op._Zs = X * 1e3
    op._xn = op._zn = xn * 1e6
    cuda_backend.products(op, torch.ones(30, 1), "f_dq")
    assert op._cuda_r2 == pytest.approx(50.0) and calls[-1] == ("matern12", "f_dq", "simt")
    assert backends.backend_label(op) == "cuda:simt"
    assert splits_seen == ["auto", 1]
    assert backends.backend_label(SimpleNamespace(backend="torch", cuda_variant="tc3")) == "torch"


def test_tcbh_products_measure_the_f16_range_once_per_operator(monkeypatch):
    from gpscale import _ext
    from gpscale._ext import launch

    seen, measured = [], []
    monkeypatch.setattr(_ext, "kernel_matmul", lambda X, Z, V, name, mode, variant, symmetric, inputs_max_abs, splits:
                        seen.append((variant, inputs_max_abs)) or V)
    real = launch.max_abs
    monkeypatch.setattr(launch, "max_abs", lambda X, Z: measured.append(1) or real(X, Z))
    X = torch.zeros(30, 2)
    X[4, 1] = -7.0
    xn = X.pow(2).sum(1)
    op = SimpleNamespace(_Xs=X, _Zs=X, _xn=xn, _zn=xn, kernel=RBF(), _symmetric=True, backend="cuda",
                         cuda_options=CudaBackend(variant="tcbh"))
    for _ in range(3):  # three CG products: the host synchronisation happens once
        cuda_backend.products(op, torch.ones(30, 1), "f")
    assert seen == [("tcbh", 7.0)] * 3 and measured == [1]
    # kernel_matmul's own check refuses what the operator measured, as it refuses a measured value
    with pytest.raises(ValueError, match="variant 'tcb'"):
        launch._check_f16_range(X, X, 2 * launch.F16_MAX)
