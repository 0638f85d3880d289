"""End-to-end tests of :class:`gpscale.ExactGP`: accuracy, calibration, exactness of the predictor
against a dense oracle, standardisation, both optimisers, checkpoint/resume, reports, bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

import gpscale
from gpscale import ExactGP, FitReport
from gpscale.models.exact_gp import Standardizer
from gpscale.models.fit import Objective

NOISE_STD = 0.1


def _f(X: np.ndarray) -> np.ndarray:
    return np.sin(3 * X[:, 0]) + 0.5 * np.cos(2 * X[:, 1])


def _data(n: int, seed: int, d: int = 2):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(n, d))
    return X, _f(X) + NOISE_STD * rng.standard_normal(n)


@pytest.fixture(scope="module")
def train():
    return _data(300, seed=0)


@pytest.fixture(scope="module")
def test():
    return _data(200, seed=1)


@pytest.fixture(scope="module")
def chol_gp(train):
    return ExactGP(max_iter=60).fit(*train)


def _check_accuracy(gp, test, rmse_max=0.16):
    Xt, yt = test
    mean, std = gp.predict(Xt, return_std=True)
    rmse = float(np.sqrt(np.mean((mean - yt) ** 2)))
    inside = float(np.mean(np.abs(mean - yt) <= 2 * std))
    assert rmse < rmse_max, rmse  # noise std is 0.1; a constant predictor has RMSE ~0.8
    assert 0.85 <= inside <= 1.0, inside
    assert np.all(std >= NOISE_STD * 0.7)  # std of y includes the noise


# ----------------------------------------------------------------------------- accuracy
def test_cholesky_fit_is_accurate_and_calibrated(chol_gp, test):
    assert chol_gp.method_ == "cholesky"
    _check_accuracy(chol_gp, test)
    rep = chol_gp.report_
    assert isinstance(rep, FitReport) and rep.method == "cholesky" and rep.optimizer == "lbfgs"
    assert 0.5 * NOISE_STD ** 2 < rep.noise < 2 * NOISE_STD ** 2  # in original units
    assert len(rep.lengthscale) == 2 and rep.iterations >= 5


def test_iterative_fit_is_accurate_and_calibrated(train, test):
    gp = ExactGP(method="iterative", max_iter=25).fit(*train)
    assert gp.method_ == "iterative" and gp.report_.method == "iterative"
    _check_accuracy(gp, test)
    stats = gp.report_.cg_stats
    assert stats["status"] == "CONVERGED" and stats["iterations_max"] >= 1
    assert stats["preconditioner"] == "pivchol"
    assert gp.report_.alpha_cg["status"] == "CONVERGED"


def test_predictions_match_dense_oracle(chol_gp, test):
    """Mean and std in original units against textbook dense float64 GP formulas."""
    gp, (Xt, _) = chol_gp, test
    sc = gp.scaler_
    Xtr = gp.X_train_
    Xs = sc.transform_X(torch.as_tensor(Xt))
    with torch.no_grad():
        K = gp.kernel_(Xtr) + gp.noise_ * torch.eye(Xtr.shape[0], dtype=torch.float64)
        Ks = gp.kernel_(Xs, Xtr)
        mean = Ks @ torch.linalg.solve(K, gp.y_train_ - gp.mean_) + gp.mean_
        var = gp.kernel_.outputscale - (Ks * torch.linalg.solve(K, Ks.T).T).sum(1) + gp.noise_
    m, s = gp.predict(Xt, return_std=True)
    np.testing.assert_allclose(m, (mean * sc.y_scale + sc.y_mean).numpy(), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(s, (var.sqrt() * sc.y_scale).numpy(), rtol=1e-6)


@pytest.mark.parametrize("budget", [None, 4 * 10 * 300 * 8 * 7])  # the second forces batches of 7 test points
def test_cg_predictor_matches_cholesky_predictor(chol_gp, test, budget):
    """Same hyperparameters, CG path (alpha and batched variance solves) vs the Cholesky factor."""
    gp_cg = copy.deepcopy(chol_gp)
    gp_cg.method_, gp_cg.predict_rtol, gp_cg.memory_budget = "iterative", 1e-6, budget
    gp_cg._prepare_prediction()
    m0, s0 = chol_gp.predict(test[0], return_std=True)
    m1, s1 = gp_cg.predict(test[0], return_std=True)
    np.testing.assert_allclose(m1, m0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s1, s0, rtol=1e-4)


def test_adam_path(train, test):
    gp = ExactGP(optimizer="adam", max_iter=80, lr=0.1).fit(*train)
    rep = gp.report_
    assert rep.optimizer == "adam" and rep.iterations == 80 and len(rep.loss_history) == 80
    assert rep.loss_history[-1] < rep.loss_history[0] - 0.5
    _check_accuracy(gp, test, rmse_max=0.2)


def test_score_and_tensor_io(chol_gp, test):
    Xt, yt = test
    assert chol_gp.score(Xt, yt) > 0.95
    out = chol_gp.predict(torch.as_tensor(Xt))
    assert isinstance(out, torch.Tensor) and out.shape == (Xt.shape[0],)
    assert isinstance(chol_gp.predict(Xt), np.ndarray)


def test_shared_lengthscale_and_kernel_instance(train):
    X, y = train[0][:100], train[1][:100]
    gp = ExactGP(kernel="rbf", ard=False, max_iter=5).fit(X, y)
    assert gp.kernel_.lengthscale.dim() == 0 and len(gp.report_.lengthscale) == 2  # one per column, original units
    np.testing.assert_allclose(np.array(gp.report_.lengthscale) / gp.scaler_.x_scale.numpy(),
                               float(gp.kernel_.lengthscale.detach()), rtol=1e-10)
    init = gpscale.kernels.Matern(nu=1.5, lengthscale=torch.tensor([0.5, 2.0]))
    gp = ExactGP(kernel=init, max_iter=5).fit(X, y)
    assert gp.report_.kernel == "matern32" and gp.kernel_ is not init  # the instance is copied, not trained
    assert torch.allclose(init.lengthscale.double(), torch.tensor([0.5, 2.0], dtype=torch.float64))


def test_float32_iterative(train):
    X, y = train
    gp = ExactGP(method="iterative", dtype=torch.float32, max_iter=8).fit(X.astype(np.float32), y)
    assert gp.X_train_.dtype == torch.float32
    mean = gp.predict(X[:20])
    assert np.all(np.isfinite(mean)) and np.sqrt(np.mean((mean - y[:20]) ** 2)) < 0.3


# ----------------------------------------------------------------------------- standardisation
def test_standardizer_round_trip_and_constant_column():
    rng = np.random.default_rng(3)
    X = torch.as_tensor(rng.normal(5.0, 3.0, size=(50, 3)))
    X[:, 1] = 7.0  # zero variance
    y = torch.as_tensor(rng.normal(-2.0, 10.0, size=50))
    sc = Standardizer.fit(X, y)
    Xs, ys = sc.transform_X(X), sc.transform_y(y)
    assert sc.x_scale[1] == 1.0 and torch.all(Xs[:, 1] == 0)
    torch.testing.assert_close(Xs[:, [0, 2]].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Xs[:, [0, 2]].std(0, unbiased=False), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(sc.inverse_y(ys), y)


def test_fit_is_affine_equivariant(train, test):
    """Fitting rescaled / shifted data gives the same predictions in the new units."""
    X, y = train
    a, b = np.array([10.0, 0.01]), np.array([-3.0, 100.0])
    gp0 = ExactGP(max_iter=10).fit(X, y)
    gp1 = ExactGP(max_iter=10).fit(X * a + b, 5.0 * y - 2.0)
    m0, s0 = gp0.predict(test[0], return_std=True)
    m1, s1 = gp1.predict(test[0] * a + b, return_std=True)
    np.testing.assert_allclose(m1, 5.0 * m0 - 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s1, 5.0 * s0, rtol=1e-5)
    np.testing.assert_allclose(gp1.report_.lengthscale, np.array(gp0.report_.lengthscale) * a, rtol=1e-5)


def test_constant_column_and_constant_target():
    X, y = _data(60, seed=5, d=2)
    X = np.column_stack([X, np.full(60, 3.0)])
    gp = ExactGP(max_iter=5).fit(X, y)
    assert np.all(np.isfinite(gp.predict(X[:5])))
    gp = ExactGP(max_iter=3).fit(X, np.full(60, 2.5))
    np.testing.assert_allclose(gp.predict(X[:5]), 2.5, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints
def _theta(gp):
    return gp._params.vector().numpy()


@pytest.fixture
def count_evaluations(monkeypatch):
    """Count real objective evaluations (a resumed fit must not redo the checkpointed ones)."""
    calls = []
    original = Objective.value_and_grad

    def counted(self, theta, seed):
        calls.append(seed)
        return original(self, theta, seed)

    monkeypatch.setattr(Objective, "value_and_grad", counted)
    return calls


@pytest.mark.parametrize("method", ["cholesky", "iterative"])
def test_lbfgs_resume_equals_uninterrupted(train, tmp_path, method, count_evaluations):
    X, y = train[0][:150], train[1][:150]
    kw = dict(method=method, max_iter=8 if method == "cholesky" else 4)
    full = ExactGP(**kw).fit(X, y)
    path = tmp_path / "fit.ckpt"
    part = ExactGP(**dict(kw, max_iter=3 if method == "cholesky" else 2), checkpoint=path).fit(X, y)
    assert path.exists() and part.report_.iterations < full.report_.iterations
    count_evaluations.clear()
    resumed = ExactGP(**kw, checkpoint=path).fit(X, y)
    np.testing.assert_allclose(_theta(resumed), _theta(full), rtol=1e-9, atol=1e-12)
    assert resumed.report_.iterations == full.report_.iterations
    assert resumed.report_.resumed_from == part.report_.iterations
    # Only the evaluations after the interruption are computed; the rest are replayed.
    assert len(count_evaluations) == full.report_.evaluations - part.report_.evaluations
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes leave no litter


def test_adam_resume_equals_uninterrupted(train, tmp_path, count_evaluations):
    X, y = train[0][:150], train[1][:150]
    kw = dict(optimizer="adam", method="iterative", lr=0.05)
    full = ExactGP(**kw, max_iter=6).fit(X, y)
    path = tmp_path / "adam.ckpt"
    ExactGP(**kw, max_iter=2, checkpoint=path).fit(X, y)
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == 2 and "adam_state" in state and state["optimizer"] == "adam"
    count_evaluations.clear()
    resumed = ExactGP(**kw, max_iter=6, checkpoint=path).fit(X, y)
    np.testing.assert_allclose(_theta(resumed), _theta(full), rtol=1e-10, atol=1e-12)
    assert resumed.report_.resumed_from == 2 and resumed.report_.iterations == 6
    assert count_evaluations == [2, 3, 4, 5]  # probe seeds seed + step continue where they stopped


def test_checkpoint_refuses_other_data_or_settings(train, tmp_path):
    X, y = train[0][:80], train[1][:80]
    path = tmp_path / "c.ckpt"
    ExactGP(max_iter=2, checkpoint=path).fit(X, y)
    with pytest.raises(ValueError, match="different fit"):
        ExactGP(max_iter=2, checkpoint=path).fit(X, y + 1.0)
    with pytest.raises(ValueError, match="kernel"):
        ExactGP(kernel="rbf", max_iter=2, checkpoint=path).fit(X, y)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ExactGP(max_iter=2, checkpoint=tmp_path / "junk.ckpt").fit(X, y)


# ----------------------------------------------------------------------------- report and warnings
def test_report_contents(chol_gp):
    rep = chol_gp.report_
    text = str(rep)
    for fragment in ("matern52", "MLL / point", "lengthscale", "noise", "Cholesky", "converged="):
        assert fragment in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["n"] == 300 and d["d"] == 2 and math.isfinite(d["mll_per_point"])
    assert rep.fit_seconds > 0 and rep.step_seconds > 0 and rep.evaluations >= rep.iterations


def test_cg_non_convergence_warns_and_is_recorded():
    X, y = _data(40, seed=7)
    with pytest.warns(gpscale.CGWarning) as caught:
        # rtol 0 alone is not enough: at n = 40 CG can drive the residual to exactly 0 (seen: 364 iterations)
        gp = ExactGP(method="iterative", rtol=0.0, preconditioner=None, max_iter=1, cg_max_iter=5).fit(X, y)
    said = [str(w.message) for w in caught]
    assert any("did not converge" in m for m in said) and any("predictive mean" in m for m in said), said
    assert gp.report_.cg_failures >= 1 and gp.report_.cg_stats["status"] != "CONVERGED"
    assert gp.report_.alpha_cg["status"] != "CONVERGED"


def test_subset_initialisation(train, test):
    gp = ExactGP(init_subset=100, max_iter=3).fit(*train)
    _check_accuracy(gp, test, rmse_max=0.2)


# ----------------------------------------------------------------------------- bad input
def test_predict_before_fit():
    with pytest.raises(RuntimeError, match="not fitted yet; call fit"):
        ExactGP().predict(np.zeros((3, 2)))


@pytest.mark.parametrize("X, y, exc, match", [
    (np.array([[0.0, np.nan], [1.0, 2.0], [2.0, 1.0]]), np.zeros(3), ValueError, "NaN"),
    (np.ones((3, 2)), np.array([0.0, np.inf, 1.0]), ValueError, "NaN/Inf"),
    (np.ones((3, 2)), np.zeros(4), ValueError, "X has 3 rows but y has 4"),
    (np.ones((1, 2)), np.zeros(1), ValueError, "at least 2"),
    (np.ones(5), np.zeros(5), ValueError, "2-D"),
    (np.ones((4, 2)), np.zeros((4, 2)), ValueError, "multi-output"),
    (np.array([["a", "b"], ["c", "d"]]), np.zeros(2), TypeError, "array-like of numbers"),
])
def test_bad_training_data(X, y, exc, match):
    with pytest.raises(exc, match=match):
        ExactGP(max_iter=1).fit(X, y)


@pytest.mark.parametrize("kwargs, match", [
    ({"kernel": "cosine"}, "kernel must be one of"), ({"optimizer": "sgd"}, "optimizer must be"),
    ({"method": "fast"}, "method must be"), ({"max_iter": 0}, "max_iter"), ({"lr": -1.0}, "lr"),
    ({"rtol": -1.0}, "rtol"), ({"noise_floor": 0.5}, "noise_floor"), ({"num_probes": 0}, "num_probes"),
])
def test_bad_settings(kwargs, match):
    X, y = _data(10, seed=2)
    with pytest.raises(ValueError, match=match):
        ExactGP(**kwargs).fit(X, y)


def test_predict_with_wrong_width(chol_gp):
    with pytest.raises(ValueError, match="3 columns but the model was fitted on d=2"):
        chol_gp.predict(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        chol_gp.predict(np.full((2, 2), np.nan))


def test_no_warning_on_clean_fit(train):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExactGP(max_iter=5).fit(*train).predict(train[0][:5], return_std=True)


def test_report_gives_the_gradient_at_the_fitted_point(train, monkeypatch):
    seen = []
    original = Objective.value_and_grad

    def recorded(self, theta, seed):
        f, g, stats = original(self, theta, seed)
        seen.append((np.asarray(theta, dtype=np.float64).copy(), g))
        return f, g, stats

    monkeypatch.setattr(Objective, "value_and_grad", recorded)
    gp = ExactGP(method="iterative", max_iter=6).fit(*train)
    theta = _theta(gp)
    g = next(g for th, g in reversed(seen) if np.allclose(th, theta, rtol=0, atol=1e-6))
    assert gp.report_.grad_inf == pytest.approx(np.abs(g).max()) and gp.report_.grad_inf > 0
    assert "max |grad|" in str(gp.report_) and math.isfinite(gp.report_.to_dict()["grad_inf"])
    adam = ExactGP(method="iterative", optimizer="adam", max_iter=3).fit(*train)
    assert math.isfinite(adam.report_.grad_inf) and adam.report_.grad_inf > 0


@pytest.mark.parametrize("method", ["cholesky", "iterative"])
def test_lbfgs_stop_on_a_stalled_estimate_is_named_as_such_for_the_iterative_method(train, monkeypatch, method):
    """L-BFGS-B's "relative reduction" stop is only an optimum when the value is exact (docs/benchmarks.md)."""
    from scipy.optimize import OptimizeResult

    import gpscale.models.optimizers as opt

    def one_step(fun, x0, jac, method, bounds, callback, options):
        f, g = fun(x0)
        return OptimizeResult(x=x0, fun=f, jac=g, success=True, status=0, nit=0,
                              message="CONVERGENCE: RELATIVE REDUCTION OF F <= FACTR*EPSMCH")

    monkeypatch.setattr(opt, "minimize", one_step)
    rep = ExactGP(method=method, max_iter=5).fit(*train).report_
    if method == "iterative":
        assert "estimate's resolution" in rep.message and "adam" in rep.message
    else:
        assert rep.message.startswith("CONVERGENCE: RELATIVE REDUCTION")


# ----------------------------------------------------------------------------- estimator protocol
def test_get_params_set_params_follow_scikit_learn():
    gp = ExactGP(kernel="rbf", max_iter=7, precision="float16")
    params = gp.get_params()
    assert params["kernel"] == "rbf" and params["max_iter"] == 7 and params["precision"] == "float16"
    assert set(params) == {"kernel", "ard", "optimizer", "max_iter", "lr", "tol", "method", "rtol", "predict_rtol",
                           "cg_max_iter", "num_probes", "preconditioner", "seed", "dtype", "device",
                           "memory_budget", "noise_init", "noise_floor", "lengthscale_init", "init_subset",
                           "verbose", "checkpoint", "precision", "backend"}
    # what sklearn.base.clone does: a new estimator from the (deep-copied) parameters, unfitted
    twin = type(gp)(**copy.deepcopy(gp.get_params()))
    assert repr(twin.get_params()) == repr(params) and not hasattr(twin, "report_")
    assert gp.set_params(max_iter=3, kernel="matern32") is gp and gp.max_iter == 3 and gp.kernel == "matern32"
    with pytest.raises(ValueError, match="has no parameter 'maxiter'; valid parameters"):
        gp.set_params(maxiter=3)


def test_low_precision_policy_on_a_dense_fit_warns_and_is_not_used(train):
    X, y = train
    with pytest.warns(gpscale.PrecisionWarning, match=r"dense Cholesky \(n=300 <= gpscale.CHOLESKY_CROSSOVER\)"):
        gp = ExactGP(max_iter=3, precision="float16").fit(X, y)
    ref = ExactGP(max_iter=3).fit(X, y)
    assert gp.method_ == "cholesky" and gp.report_.precision is None and gp.report_.precision_check is None
    assert gp.report_.mll_per_point == ref.report_.mll_per_point  # the float64 dense fit, untouched
    with pytest.warns(gpscale.PrecisionWarning, match=r"dense Cholesky \(method='cholesky'\)"):
        ExactGP(max_iter=1, method="cholesky", precision="bfloat16").fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpscale.PrecisionWarning)
        ExactGP(max_iter=1, precision="float32").fit(X, y)  # not a low precision: nothing to say
