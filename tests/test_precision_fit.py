"""Mixed precision in a fit (issue 4): the float32 check of a low-precision optimum, tiles rounded once
and cached, how many solves stayed in low precision, and dropping a policy whose every solve falls back.

The CG-level failure and fix are in test_mixed_precision.py; the shared ``regression`` data set is a
conftest fixture.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gpscale
from gpscale import KernelOperator, PrecisionPolicy
from gpscale.kernels import RBF
from gpscale.precision import LOW_PRECISION_GIVE_UP, FallbackStreak
from gpscale.precond import PivotedCholesky

LOW = ("bfloat16", "float16")


def test_low_precision_fit_is_checked_against_float32_products(regression, monkeypatch):
    """report_.precision_check re-evaluates the optimum with float32 products and the same probes."""
    from gpscale.models import fit as fit_mod

    X, y = regression
    kw = dict(kernel="rbf", method="iterative", max_iter=2, dtype=torch.float32, seed=3,
              preconditioner=PivotedCholesky(rank=30))
    calls = []
    original = fit_mod.Objective.value_and_grad
    monkeypatch.setattr(fit_mod.Objective, "value_and_grad",
                        lambda self, theta, seed: calls.append(seed) or original(self, theta, seed))
    gp = gpscale.ExactGP(precision="bfloat16", **kw).fit(X[:300], y[:300])
    chk = gp.report_.precision_check
    assert set(chk) == {"loss_own", "loss_float32", "relative", "ok"}
    # L-BFGS-B's own final value is reused: the check costs one (float32) evaluation, not two
    assert len(calls) == gp.report_.evaluations + 1
    assert chk["loss_own"] == pytest.approx(-gp.report_.mll_per_point - math.log(gp.scaler_.y_scale), rel=1e-9)
    own = gpscale.mll_estimate(gp.X_train_, gp.y_train_, gp.kernel_, gp.noise_, gp.mean_, method="iterative",
                               seed=3, rtol=gp.rtol, num_probes=gp.num_probes, preconditioner=gp.preconditioner,
                               precision="bfloat16", warn=False)
    assert chk["loss_own"] == pytest.approx(-float(own.value.detach()) / 300, rel=1e-5)  # it is the value at theta
    # the reference is the float32-product MLL at the fitted hyperparameters with the fit's probe seed
    ref = gpscale.mll_estimate(gp.X_train_, gp.y_train_, gp.kernel_, gp.noise_, gp.mean_, method="iterative",
                               seed=3, rtol=gp.rtol, num_probes=gp.num_probes, preconditioner=gp.preconditioner,
                               warn=False)
    assert chk["loss_float32"] == pytest.approx(-float(ref.value.detach()) / 300, rel=1e-5)
    assert chk["relative"] == pytest.approx(abs(chk["loss_own"] - chk["loss_float32"]) / abs(chk["loss_float32"]))
    assert "float32-product check" in str(gp.report_)
    assert gpscale.ExactGP(precision=None, **kw).fit(X[:300], y[:300]).report_.precision_check is None
    monkeypatch.setattr(fit_mod, "PRECISION_CHECK_RTOL", 0.0)  # any difference now counts as too large
    with pytest.warns(gpscale.PrecisionWarning, match="differs from the float32-product estimate"):
        gp = gpscale.ExactGP(precision="bfloat16", **kw).fit(X[:300], y[:300])
    assert gp.report_.precision_check["ok"] is False and "WARNING" in str(gp.report_)


@pytest.mark.parametrize("name", LOW)
def test_rounded_tiles_cache_the_whole_kernel_where_float32_cannot(name):
    # The GPU speed of low precision at n >= 200k rests on this: at a budget between the 16-bit and
    # the float32 size of the upper-triangle kernel, the low-precision operator keeps every tile (each
    # later product is one pass of 16-bit GEMMs) while float32 must recompute (bench_precision's
    # --memory-budget, benchmarks/gpu_session.sh).
    n, tile = 600, 100
    X = torch.rand(n, 3, generator=torch.Generator().manual_seed(0))
    need32 = sum((i1 - i0) * (j1 - j0) * 4 for i0, i1, j0, j1 in
                 gpscale.operators.blocking.plan_symmetric_tiling(n, torch.float32, X.device, tile=tile)
                 .upper_tiles(n))
    budget = int(0.75 * need32) + (int(0.75 * need32) // 3)  # cache part (budget - budget/4) = 0.75 need32
    op = KernelOperator(X, RBF(lengthscale=0.5), noise=0.1, memory_budget=budget, tile=tile, backend="torch")
    low = op.with_product_dtype(name)
    V = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        op.matmul(V), low.matmul(V)
    assert low.cached_fraction == 1.0
    assert 0.5 < op.cached_fraction < 1.0
    # and the cached 16-bit product still is the 16-bit product (the cache changes no number)
    fresh = op.with_product_dtype(name)
    torch.testing.assert_close(low.matmul(V), fresh.matmul(V), rtol=0, atol=0)


def test_large_cuda_budgets_get_larger_tiles_and_the_default_is_unchanged():
    from gpscale.operators.blocking import (
        MAX_WORKSPACE,
        plan_symmetric_tiling,
        workspace_bytes,
    )

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU needed
    for budget in (1 << 30, 2 << 30, 48 * 10 ** 9):
        assert workspace_bytes(budget, cpu) == MAX_WORKSPACE
    assert workspace_bytes(1 << 30, cuda) == workspace_bytes(2 << 30, cuda) == MAX_WORKSPACE
    assert workspace_bytes(48 * 10 ** 9, cuda) == 1 << 30
    assert workspace_bytes(1 << 20, cuda) == (1 << 20) // 4
    big = plan_symmetric_tiling(200_001, torch.float32, cuda, 48 * 10 ** 9)
    default = plan_symmetric_tiling(200_001, torch.float32, cuda)
    assert big.tile == 8192 and len(big.upper_tiles(200_001)) < len(default.upper_tiles(200_001)) / 10
    assert big.cache_bytes == 48 * 10 ** 9 - (1 << 30)


def test_fit_reports_how_many_solves_stayed_in_low_precision_and_warns_when_none_did(regression):
    X, y = regression
    kw = dict(kernel="rbf", method="iterative", max_iter=1, dtype=torch.float32, seed=0,
              preconditioner=PivotedCholesky(rank=20), precision="bfloat16")
    # noise 1e-3 on a smooth kernel, plain rounding: the bf16 kernel is indefinite, every solve falls back
    # (one Adam step: one evaluation, below the give-up streak of the next test)
    plain = PrecisionPolicy("bfloat16", lowrank_correction=False)
    with pytest.warns(gpscale.PrecisionWarning, match=r"only 0 of \d+ CG solves of this fit finished in bfloat16"):
        gp = gpscale.ExactGP(noise_init=1e-3, noise_floor=1e-4, optimizer="adam",
                             **{**kw, "precision": plain}).fit(X[:400], y[:400])
    assert gp.report_.low_precision_share == 0.0
    assert "0% of solves finished in bfloat16" in str(gp.report_) and gp.report_.precision == "bfloat16"
    # noise 1: the rounding is harmless, the solves stay in bf16 and nothing is said about it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gp = gpscale.ExactGP(noise_init=1.0, **kw).fit(X[:400], y[:400])
    assert not [w for w in caught if "CG solves of this fit" in str(w.message)]
    assert gp.report_.low_precision_share > 0.5
    assert gpscale.ExactGP(**{**kw, "precision": None}).fit(X[:400], y[:400]).report_.low_precision_share is None


def test_a_fit_drops_a_low_precision_policy_whose_every_solve_falls_back(regression, tmp_path):
    X, y = regression
    plain = PrecisionPolicy("bfloat16", lowrank_correction=False)  # indefinite at noise 1e-3: all fall back
    kw = dict(kernel="rbf", method="iterative", dtype=torch.float32, seed=0, noise_init=1e-3, noise_floor=1e-4,
              preconditioner=PivotedCholesky(rank=20), precision=plain, optimizer="adam")
    ckpt = tmp_path / "fit.pt"
    with pytest.warns(gpscale.PrecisionWarning, match="fell back from bfloat16 to float32: the rest of this fit"):
        gp = gpscale.ExactGP(max_iter=4, checkpoint=ckpt, **kw).fit(X[:400], y[:400])
    rep = gp.report_
    assert rep.low_precision_given_up == LOW_PRECISION_GIVE_UP == 2  # after the second evaluation
    assert "precision" not in rep.cg_stats  # evaluations 3 and 4 ran without the policy
    assert rep.low_precision_share == 0.0 and rep.precision == "bfloat16"
    assert "dropped after evaluation 2" in str(rep)
    assert rep.precision_check is None  # the final evaluations were float32 already: nothing to re-check
    # resumed from the checkpoint, the fit stays without the policy, silently
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gp2 = gpscale.ExactGP(max_iter=6, checkpoint=ckpt, **kw).fit(X[:400], y[:400])
    assert gp2.report_.resumed_from == 4 and gp2.report_.low_precision_given_up == 2
    assert "precision" not in gp2.report_.cg_stats
    assert not [w for w in caught if issubclass(w.category, gpscale.PrecisionWarning)]
    # solves that do finish in low precision reset the streak: noise 1, nothing is dropped
    gp3 = gpscale.ExactGP(max_iter=4, **{**kw, "noise_init": 1.0, "precision": "bfloat16"}).fit(X[:400], y[:400])
    assert gp3.report_.low_precision_given_up is None and gp3.report_.cg_stats["precision"] == "bfloat16"


def test_fallback_streak_counts_only_low_precision_solves_that_fell_back_entirely():
    bf16, f32 = PrecisionPolicy("bfloat16"), PrecisionPolicy("float32")
    none_low = {"columns": 11, "low_precision_columns": 0}
    streak = FallbackStreak()
    assert not streak.update(bf16, none_low)
    assert not streak.update(bf16, {"columns": 11, "low_precision_columns": 1})  # one column held: reset
    assert not streak.update(bf16, none_low) and streak.update(bf16, none_low)  # two in a row
    for policy in (None, f32):  # no low precision asked for: never a fallback
        other = FallbackStreak()
        assert not any(other.update(policy, none_low) for _ in range(2 * LOW_PRECISION_GIVE_UP))
    assert not FallbackStreak().update(bf16, {})  # a failed solve reports no columns: not counted
