"""Mixed-precision CG (issue 4): the policy, low-precision products, and the failure and the fix.

The failure: with bfloat16/float16 kernel products and no safeguards, CG on an ill-conditioned kernel
(small noise) breaks down (the rounded kernel is not positive definite in the explored directions) or
"converges" by its recurrence residual while the true residual stays far above the tolerance.  The
fix: rescaling + re-orthogonalisation + preconditioning + true-residual check with refinement and a
float32 fallback reaches rtol 1e-2 in the true residual, and records per column where it finished.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gpscale
from gpscale import CGStatus, KernelOperator, PrecisionPolicy, cg, mll_estimate
from gpscale.kernels import RBF, Matern
from gpscale.logdet.slq import slq_logdet
from gpscale.precision import as_policy, round_to
from gpscale.precond import PivotedCholesky
from gpscale.solvers.stability import StallDetector

LOW = ("bfloat16", "float16")
NAIVE = dict(rescale=False, reorth="none", fallback=False, stall_window=0, lowrank_correction=False)


def _system(noise, n=600, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4
    op = KernelOperator(X, RBF(lengthscale=0.5), noise=noise)
    B = torch.randn(n, t, generator=g, dtype=torch.float64)
    return op, op.dense(), B


def _true_rel(dense, B, x):
    return float(((B - dense @ x.to(torch.float64)).norm(dim=0) / B.norm(dim=0)).max())


@pytest.fixture(scope="module")
def ill():
    """RBF, noise 1e-2: condition number ~7e3."""
    return _system(1e-2)


# ----------------------------------------------------------------------------- policy
def test_policy_normalises_and_validates():
    p = PrecisionPolicy(torch.bfloat16, state=torch.float64)
    assert (p.product, p.state, p.state_dtype, p.low_precision) == ("bfloat16", "float64", torch.float64, True)
    assert PrecisionPolicy("fp16").product == "float16" and PrecisionPolicy("tf32").low_precision
    assert PrecisionPolicy("bfloat16").resolved_reorth == "full" and PrecisionPolicy().resolved_reorth == "none"
    assert as_policy("bf16") == PrecisionPolicy("bfloat16") and as_policy(None) is None
    with pytest.raises(ValueError, match="product='float16', state='float32'"):
        PrecisionPolicy("float32", state="float16")
    with pytest.raises(ValueError, match="state"):
        PrecisionPolicy(state=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown precision"):
        PrecisionPolicy("float8")
    with pytest.raises(ValueError, match="fallback_product"):
        PrecisionPolicy("bfloat16", fallback_product="float16")
    for bad in (dict(reorth="sometimes"), dict(reorth_window=0), dict(stall_window=-1), dict(stall_decrease=1.0),
                dict(refine_steps=-1), dict(refine_rtol=0.0), dict(reorth_memory=0)):
        with pytest.raises(ValueError):
            PrecisionPolicy("bfloat16", **bad)
    with pytest.raises(TypeError):
        PrecisionPolicy("bfloat16", fallback="yes")
    with pytest.raises(TypeError):
        as_policy(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.product = "float32"
    assert PrecisionPolicy("bfloat16", reorth="window", reorth_window=7).reorth_steps(100, 2) == 7
    assert PrecisionPolicy("bfloat16", reorth_memory=8 * 2 * 100 * 2 * 4).reorth_steps(100, 2) == 8


# ----------------------------------------------------------------------------- products
@pytest.mark.parametrize("name,bound", [("float32", 1e-6), ("tf32", 2e-3), ("bfloat16", 1e-2), ("float16", 2e-3)])
def test_low_precision_product_accuracy(name, bound):
    op, dense, _ = _system(1e-2, n=500)
    V = torch.randn(500, 4, dtype=torch.float64)
    low = op.with_product_dtype(name)
    err = float((low.matmul(V) - dense @ V).norm() / (dense @ V).norm())
    assert err < bound
    if name != "float32":
        assert err > 1e-7  # it really rounds
    assert low.matmul(V).dtype == torch.float64 and low.backend == "torch"
    if name in LOW:
        assert low._tile_cache[0].dtype == getattr(torch, name)  # the cache holds rounded tiles
    assert op._tile_cache[0].dtype == torch.float64  # the original operator is untouched


def test_float16_product_rescales_extreme_right_hand_sides():
    op, dense, _ = _system(1e-1, n=300)
    low = op.with_product_dtype("float16")
    for scale in (1e8, 1e-9):  # beyond float16's range (65504) and below its normal range (6e-5)
        V = torch.randn(300, 2, dtype=torch.float64) * scale
        out = low.matmul(V)
        assert torch.isfinite(out).all()
        assert float((out - dense @ V).norm() / (dense @ V).norm()) < 2e-3


def test_tf32_rounding_and_operator_arguments():
    x = torch.randn(1000)
    r = round_to(x, "tf32")
    assert r.dtype == torch.float32 and int((r.view(torch.int32) & 0x1FFF).abs().sum()) == 0
    assert float(((r - x) / x).abs().max()) <= 2.0 ** -11
    X = torch.randn(50, 2)
    op = KernelOperator(X, RBF(), 0.1, product_dtype="bf16")
    assert op.product_precision == "bfloat16" and op.with_product_dtype("bfloat16") is op
    assert op.with_product_dtype(None).product_precision is None
    with pytest.raises(ValueError, match="torch backend"):
        KernelOperator(X, RBF(), 0.1, product_dtype="bfloat16", backend="keops")
    with pytest.raises(ValueError, match="float64 inputs"):
        KernelOperator(X, RBF(), 0.1, product_dtype="float64")


# ----------------------------------------------------------------------------- the failure and the fix
@pytest.mark.parametrize("name", LOW)
def test_naive_low_precision_cg_fails_on_ill_conditioned_kernel(ill, name):
    op, dense, B = ill
    res = cg(op, B, rtol=1e-2, max_iter=300, precision=PrecisionPolicy(name, **NAIVE), warn=False)
    true = _true_rel(dense, B, res.x)
    # bf16 breaks down (the rounded kernel looks indefinite) and its iterate diverges; fp16 "converges"
    # by the recurrence while the true residual stalls an order of magnitude above the tolerance.
    assert true > 5e-2
    assert res.status == CGStatus.BREAKDOWN or float((res.residual_norm / res.rhs_norm).max()) < 1e-2 < true
    assert res.finished_precision == (name,) * B.shape[1]


@pytest.mark.parametrize("name", LOW)
def test_fixes_reach_rtol_on_ill_conditioned_kernel(ill, name):
    op, dense, B = ill
    res = cg(op, B, rtol=1e-2, max_iter=300, precision=PrecisionPolicy(name),
             preconditioner=PivotedCholesky(rank=30), warn=False)
    assert res.status == CGStatus.CONVERGED
    assert _true_rel(dense, B, res.x) <= 1e-2
    assert float((res.residual_norm / res.rhs_norm).max()) <= 1e-2  # reported = true residual
    assert len(res.finished_precision) == B.shape[1]
    assert set(res.finished_precision) <= {name, "float32"}
    assert res.summary()["finished_precision"]


def test_refinement_finishes_in_low_precision_when_the_rounding_allows():
    op, dense, B = _system(1e-1)
    res = cg(op, B, rtol=1e-2, max_iter=300, precision="float16", preconditioner=PivotedCholesky(rank=30))
    assert res.converged and res.finished_precision == ("float16",) * 3
    assert _true_rel(dense, B, res.x) <= 1e-2
    assert (res.iterations >= res.low_precision_iterations).all()


def test_fallback_records_float32_and_iterations():
    op, dense, B = _system(1e-3, n=400, t=2)
    policy = PrecisionPolicy("bfloat16", state="float64", fallback_product="float64")
    res = cg(op, B, rtol=1e-2, max_iter=400, precision=policy, preconditioner=PivotedCholesky(rank=30), warn=False)
    assert res.converged and res.finished_precision == ("float64", "float64")
    assert (res.iterations > res.low_precision_iterations).all()
    assert _true_rel(dense, B, res.x) <= 1e-2
    no_fb = cg(op, B, rtol=1e-2, max_iter=400, precision=PrecisionPolicy("bfloat16", fallback=False), warn=False)
    assert not no_fb.converged and no_fb.finished_precision == ("bfloat16", "bfloat16")


@pytest.mark.parametrize("reorth", ["full", "window"])
def test_reorthogonalisation_cuts_iterations(ill, reorth):
    op, dense, B = ill
    base = dict(fallback=False, stall_window=0)
    naive = cg(op, B, rtol=1e-2, max_iter=400, precision=PrecisionPolicy("float16", reorth="none", **base),
               warn=False)
    fixed = cg(op, B, rtol=1e-2, max_iter=400,
               precision=PrecisionPolicy("float16", reorth=reorth, reorth_window=30, **base), warn=False)
    assert fixed.converged
    assert int(fixed.iterations.max()) < (0.6 if reorth == "full" else 0.9) * int(naive.iterations.max())


def test_stall_detector_fires_only_without_progress():
    rn = torch.tensor([1.0, 1.0])
    det = StallDetector(window=3, decrease=0.01, rnorm=rn)
    active = torch.tensor([True, True])
    fired = []
    for k in range(5):
        now = torch.tensor([0.5 ** (k + 1), 0.999])  # column 0 improves, column 1 is flat
        fired.append(det.update(now, active).tolist())
    assert fired[1] == [False, False] and fired[2] == [False, True] and not any(f[0] for f in fired)


def test_vector_rhs_float64_state_and_plain_tensor():
    op, dense, B = _system(1e-1, n=300)
    res = cg(op, B[:, 0], precision=PrecisionPolicy("bfloat16", state="float64"),
             preconditioner=PivotedCholesky(rank=20))
    assert res.x.shape == (300,) and res.x.dtype == torch.float64 and res.converged
    x0 = torch.zeros_like(B)
    r2 = cg(dense, B, x0=x0, precision="float16")  # a dense tensor: rounded once, fallback on dense
    assert r2.converged and _true_rel(dense, B, r2.x) <= 1e-2


def test_slq_logdet_under_low_precision_matches_float32():
    op, dense, _ = _system(1e-2, n=500)
    ref = slq_logdet(op, num_probes=8, preconditioner=PivotedCholesky(rank=30),
                     generator=torch.Generator().manual_seed(3))
    for name in LOW:
        ps = slq_logdet(op, num_probes=8, preconditioner=PivotedCholesky(rank=30),
                        generator=torch.Generator().manual_seed(3), precision=name)
        assert ps.cg.converged and len(ps.cg.finished_precision) == 8
        assert abs(float(ps.logdet) - float(ref.logdet)) < 0.02 * abs(float(ref.logdet))


# ----------------------------------------------------------------------------- MLL and ExactGP
@pytest.mark.parametrize("name", LOW)
def test_mll_under_low_precision_close_to_float32(regression, name):
    X, y = regression
    out = {}
    for prec in (None, name):
        k = Matern(nu=2.5, lengthscale=0.8)
        r = mll_estimate(X, y, k, 0.1, method="iterative", seed=1, rtol=1e-3, precision=prec, warn=False)
        r.value.backward()
        out[prec] = (float(r.value.detach()), float(k.raw_lengthscale.grad), r.stats)
    (v0, g0, _), (v1, g1, stats) = out[None], out[name]
    assert abs(v1 - v0) <= 1e-2 * abs(v0)
    assert abs(g1 - g0) <= 0.05 * abs(g0)
    assert stats["precision"] == name and stats["status"] == "CONVERGED"
    assert "low_precision_columns" in stats


def test_exact_gp_accepts_a_policy(regression):
    X, y = regression
    gp = gpscale.ExactGP(kernel="rbf", method="iterative", max_iter=3, precision=PrecisionPolicy("bfloat16"),
                         dtype=torch.float32, preconditioner=PivotedCholesky(rank=30))
    gp.fit(X[:400], y[:400])
    assert gp.report_.n == 400 and gp.score(X[400:600], y[400:600]) > 0.5
    with pytest.raises(ValueError, match="unknown precision"):
        gpscale.ExactGP(precision="float8").fit(X[:50], y[:50])


# ----------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ("tf32",) + LOW)
def test_cuda_low_precision_cg(name):
    op, dense, B = _system(1e-2)
    op = KernelOperator(op.X.cuda(), RBF(lengthscale=0.5), noise=1e-2)
    flag = torch.backends.cuda.matmul.allow_tf32
    res = cg(op, B.cuda(), rtol=1e-2, max_iter=300, precision=name, preconditioner=PivotedCholesky(rank=30))
    assert res.converged and _true_rel(dense, B, res.x.cpu()) <= 1e-2
    assert torch.backends.cuda.matmul.allow_tf32 == flag  # switched locally, restored


def test_probes_that_refinement_cannot_fix_restart_their_lanczos_run():
    """bf16 too coarse for this kernel (||A^-1 E|| ~ 1): the solves fall back, and so must the log-det.

    A long-lengthscale Matérn-5/2 on 1500 points in 6-D at noise 0.1: bf16 rounding of the tile is not
    small against the noise, refinement cannot reach the tolerance, every column finishes in float32.
    Before the probes restarted too, their bf16 tridiagonals estimated log|A + E| and the MLL was off
    by ~5% (on UCI elevators at n = 2700: 5.6%); now it matches float32 to the SLQ noise of one run.
    """
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1500, 6, generator=g)
    y = torch.sin(X[:, :3].sum(1)) + 0.3 * torch.randn(1500, generator=g)
    vals = {}
    # without the low-rank correction (next test): with it, bf16 holds on this problem
    for prec in (None, PrecisionPolicy("bfloat16", lowrank_correction=False)):
        k = Matern(nu=2.5, lengthscale=6 ** 0.5)
        r = mll_estimate(X, y, k, 0.1, method="iterative", seed=0, rtol=1e-2,
                         preconditioner=PivotedCholesky(rank=100), precision=prec, warn=False)
        vals[prec] = (float(r.value.detach()), r.stats)
    (v32, _), (v16, stats) = vals.values()
    assert set(stats["finished_precision"]) == {"float32"}
    assert abs(v16 - v32) <= 2e-3 * abs(v32)


def test_lowrank_correction_auto_is_on_for_11_bit_products_only():
    assert PrecisionPolicy("float16").resolved_lowrank_correction
    assert PrecisionPolicy("tf32").resolved_lowrank_correction
    assert not PrecisionPolicy("bfloat16").resolved_lowrank_correction  # its log-det bias steers fits
    assert PrecisionPolicy("bfloat16", lowrank_correction=True).resolved_lowrank_correction
    assert not PrecisionPolicy("float16", lowrank_correction=False).resolved_lowrank_correction
    assert not PrecisionPolicy("float32", lowrank_correction=True).resolved_lowrank_correction
    with pytest.raises(TypeError, match="'auto', True or False"):
        PrecisionPolicy("float16", lowrank_correction="yes")


def test_lowrank_correction_lets_bfloat16_hold_where_plain_rounding_falls_back():
    """Round K - LL^T (L: the pivoted-Cholesky preconditioner's factor), not K.

    Same problem as above: plain bf16 rounding is too coarse (every column falls back, 77 products);
    rounding only the residual kernel, whose entries are several times smaller, keeps every column
    in bf16 with about half the products, and the MLL within 1e-3 of float32's.
    """
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1500, 6, generator=g)
    y = torch.sin(X[:, :3].sum(1)) + 0.3 * torch.randn(1500, generator=g)
    out = {}
    for key, prec in (("f32", None), ("plain", PrecisionPolicy("bfloat16")),  # "auto": plain for bf16
                      ("corrected", PrecisionPolicy("bfloat16", lowrank_correction=True)),
                      ("fp16", PrecisionPolicy("float16")),  # "auto": corrected for fp16
                      ("fp16 plain", PrecisionPolicy("float16", lowrank_correction=False))):
        r = mll_estimate(X, y, Matern(nu=2.5, lengthscale=6 ** 0.5), 0.1, method="iterative", seed=0, rtol=1e-2,
                         preconditioner=PivotedCholesky(rank=100), precision=prec, warn=False)
        out[key] = (float(r.value.detach()), r.stats)
    (v32, _), (_, plain), (v16, corr) = out["f32"], out["plain"], out["corrected"]
    assert corr["finished_precision"] == {"bfloat16": 11} and plain["finished_precision"] == {"float32": 11}
    assert corr["num_matmuls"] < 0.6 * plain["num_matmuls"]
    assert abs(v16 - v32) <= 1e-3 * abs(v32)
    # fp16's default is corrected: no more products (26 each since refinement solves only as tightly as
    # needed; 27 vs 35 before) and a log-det closer to float32's than plain fp16
    (vh, h), (vhp, hp) = out["fp16"], out["fp16 plain"]
    assert h["num_matmuls"] <= hp["num_matmuls"] and abs(vh - v32) < abs(vhp - v32) / 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_lowrank_corrected_operator_is_the_kernel_with_a_smaller_rounding(device):
    n = 400
    X = torch.rand(n, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    op = KernelOperator(X, RBF(lengthscale=0.7, outputscale=2.0).double().to(device), noise=0.05, tile=96)
    L = PivotedCholesky(rank=40).build(op).L
    dense = op.dense()
    plain, corr = op.with_product_dtype("bfloat16"), op.with_product_dtype("bfloat16", lowrank=L)
    assert corr is not plain and corr.backend == "torch"
    V = torch.randn(n, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    err = {k: float((o.matmul(V) - dense @ V).norm() / (dense @ V).norm()) for k, o in (("plain", plain),
                                                                                      ("corr", corr))}
    assert err["corr"] < err["plain"] / 3
    # dense() of the corrected operator adds the low-rank part back: it is K + noise I up to rounding
    Dc = corr.dense()
    assert float((Dc - dense).abs().max()) <= 2 ** -8 * float((dense - L @ L.T).abs().max()) * 2.0 + 1e-12
    # an exact product ignores the factor; a wrong shape or device is refused
    assert op.with_product_dtype("float64", lowrank=L) is op
    with pytest.raises(ValueError, match=r"\(n, k\) = \(400, k\)"):
        op.with_product_dtype("bfloat16", lowrank=L[:10])
    bad = L.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="lowrank contains 1 NaN/Inf"):
        op.with_product_dtype("bfloat16", lowrank=bad)
    with pytest.raises(TypeError, match="floating-point factor"):
        op.with_product_dtype("bfloat16", lowrank=torch.ones(n, 2, dtype=torch.int64, device=device))
