"""GPyTorch backend: the whole predictive covariance (``gpscale.integrations.gpytorch_predict``).

Against stock GPyTorch with a dense float64 Cholesky: the backend's latent covariance is symmetric, too
large by a positive semi-definite matrix whose entries are at most ``solve_rtol * σ²`` (CG path), equal
to the dense one (Cholesky path), lazy above GPyTorch's eager size, and differentiable w.r.t. the test
inputs and the hyperparameters.  Near-duplicate test points make the exact covariance singular, the case
in which GPyTorch's first-order form broke sampling.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

gpytorch = pytest.importorskip("gpytorch")

import gpscale
import gpscale.integrations.gpytorch_predict as gpp
from gpscale.integrations.gpytorch import backend_stats, restore_gpytorch, use_gpscale
from gpscale.integrations.gpytorch_predict import GpscaleModelMixin, GpscalePredictionStrategy
from linear_operator.operators import DenseLinearOperator
from linear_operator.utils.warnings import NumericalWarning
from test_gpytorch_predict_certified import EXACT, _problem, stock_first_order_covariance

RTOL = 1e-3
ITERATIVE = dict(method="iterative", solve_rtol=RTOL, preconditioner=gpscale.precond.PivotedCholesky(rank=20),
                 max_iter=3000)


def _with_duplicates(m, dup=20, seed=0):
    model, lik, Xs = _problem(m=m, seed=seed)
    return model, lik, torch.cat([Xs, Xs[:dup] + 1e-5])


def _latent(model, Xs, **backend):
    if backend:
        use_gpscale(model, **backend)
    with torch.no_grad(), EXACT, warnings.catch_warnings():
        warnings.simplefilter("ignore", gpscale.CGWarning)
        return model(Xs)


@pytest.mark.parametrize("m", [60, 150])  # n + m below / above GPyTorch's max_eager_kernel_size (512)
def test_covariance_is_symmetric_and_too_large_by_a_certified_psd_matrix(m):
    model, lik, Xs = _with_duplicates(m)
    exact = _latent(model, Xs).covariance_matrix
    f = _latent(model, Xs, **ITERATIVE)
    C = f.covariance_matrix
    noise = float(lik.noise.detach())
    D = C - exact
    assert float((C - C.mT).abs().max()) <= 1e-12
    assert float(torch.linalg.eigvalsh((D + D.mT) / 2).min()) >= -1e-9 * noise  # EᵀK̂E ⪰ 0
    assert float(D.abs().max()) <= RTOL * noise * (1 + 1e-6)  # |eᵢᵀK̂eⱼ| <= rtol σ²
    assert float(torch.linalg.eigvalsh(C).min()) >= -1e-12  # PSD, unlike the first-order form below
    assert backend_stats(model)["last"]["predictive_covariance"]["status"] == "CONVERGED"
    assert isinstance(f.lazy_covariance_matrix, DenseLinearOperator) == (m == 60)  # lazy, as GPyTorch's


def test_first_order_form_breaks_symmetry_on_the_same_problem(monkeypatch):
    # the case above discriminates: GPyTorch's kᵢᵀvⱼ with the same certified solves is far from symmetric
    stock_first_order_covariance(monkeypatch)
    model, lik, Xs = _with_duplicates(150)
    C = _latent(model, Xs, **ITERATIVE).covariance_matrix
    assert float((C - C.mT).abs().max()) > 1e-3 * RTOL * float(lik.noise.detach())


def test_sampling_needs_no_jitter():
    model, _, Xs = _with_duplicates(150)
    f = _latent(model, Xs, **ITERATIVE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = f.rsample(torch.Size([4]))
    assert samples.shape == (4, Xs.shape[0]) and bool(torch.isfinite(samples).all())
    assert not [w for w in caught if issubclass(w.category, NumericalWarning)]


def test_variances_only_never_form_the_m_by_m_matrix(monkeypatch):
    model, lik, Xs = _problem(m=200)
    exact = _latent(model, Xs).variance
    calls = []
    original = gpp.MatmulLinearOperator.to_dense
    monkeypatch.setattr(gpp.MatmulLinearOperator, "to_dense", lambda self: calls.append(1) or original(self))
    var = _latent(model, Xs, **ITERATIVE).variance
    assert not calls
    rel = (var - exact) / (exact + float(lik.noise.detach()))
    assert float(rel.min()) >= -1e-10 and float(rel.max()) <= RTOL


def test_cholesky_path_is_the_dense_covariance():
    model, _, Xs = _with_duplicates(150)
    exact = _latent(model, Xs).covariance_matrix
    C = _latent(model, Xs, method="cholesky").covariance_matrix
    torch.testing.assert_close(C, exact, rtol=0, atol=1e-10)


def _gradient_problem(backend: bool, method: str):
    model, lik, Xs = _problem(m=40)
    if backend:  # solves tight enough that the first-order gradient error is below the comparison's tolerance
        use_gpscale(model, **dict(ITERATIVE, solve_rtol=1e-10, method=method))
    return model, lik, Xs


@pytest.mark.parametrize("method", ["iterative", "cholesky"])
def test_variance_gradient_wrt_test_inputs_matches_stock(method):
    def grad(backend):
        model, lik, Xs = _gradient_problem(backend, method)
        X = Xs.clone().requires_grad_(True)
        with EXACT, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the joint kernel with X requiring grad falls back, by design
            (lik(model(X)).variance.sum() + model(X).covariance_matrix[:5, 5:10].sum()).backward()
        return X.grad

    # first order in the CG error ‖e‖_K̂ <= sqrt(solve_rtol σ²): measured 1.4e-6 of the largest entry at 1e-10
    g, ref = grad(True), grad(False)
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["iterative", "cholesky"])
def test_hyperparameter_gradient_without_detached_caches_matches_stock(method):
    def grads(backend):
        model, lik, Xs = _gradient_problem(backend, method)
        with EXACT, gpytorch.settings.detach_test_caches(False), warnings.catch_warnings():
            warnings.simplefilter("ignore", gpscale.CGWarning)
            lik(model(Xs)).variance.sum().backward()
        k = model.covar_module
        return torch.cat([k.raw_outputscale.grad.reshape(-1), k.base_kernel.raw_lengthscale.grad.reshape(-1),
                          lik.raw_noise.grad.reshape(-1)])

    torch.testing.assert_close(grads(True), grads(False), rtol=1e-5, atol=1e-8)


def test_switch_installs_and_restore_removes_the_strategy():
    model, lik, Xs = _problem(m=30)
    original = type(model)
    keys = set(model.state_dict())
    use_gpscale(model, **ITERATIVE)
    assert isinstance(model, original) and isinstance(model, GpscaleModelMixin) and set(model.state_dict()) == keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switching again only changes the options, silently
        use_gpscale(model, **dict(ITERATIVE, solve_rtol=2e-3))
    assert backend_stats(model)["options"].solve_rtol == 2e-3
    assert type(model).__mro__[1:3] == (GpscaleModelMixin, original)  # one swapped class
    var = _latent(model, Xs).variance
    assert type(model.prediction_strategy) is GpscalePredictionStrategy
    twin = copy.deepcopy(model)
    twin.prediction_strategy = None
    torch.testing.assert_close(_latent(twin, Xs).variance, var, rtol=0, atol=0)
    model.train()
    assert model.prediction_strategy is None  # GPyTorch's own resets go through the property
    restore_gpytorch(model)
    assert type(model) is original and model.prediction_strategy is None
    model.eval()
    _latent(model, Xs)
    assert type(model.prediction_strategy) is gpytorch.models.exact_prediction_strategies.DefaultPredictionStrategy


def test_love_and_skipped_variances_run_gpytorch_code():
    model, lik, Xs = _problem(m=30)
    exact = _latent(model, Xs).variance
    use_gpscale(model, **ITERATIVE)
    with gpytorch.settings.fast_pred_var():
        model.prediction_strategy = None
        love = _latent(model, Xs).variance
    torch.testing.assert_close(love, exact, rtol=1e-3, atol=1e-6)
    with gpytorch.settings.skip_posterior_variances(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)  # GPyTorch's own note on its zero variances
        assert float(_latent(model, Xs).variance.abs().max()) <= 1e-6  # GPyTorch's zero (clamped) variance


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_switched_model_pickles_as_switched(save, tmp_path):
    import pickle

    model, lik, Xs = _problem(m=30)
    original, kernel_class = type(model), type(model.covar_module)
    use_gpscale(model, **ITERATIVE)
    var = _latent(model, Xs).variance
    if save == "pickle":
        copy_ = pickle.loads(pickle.dumps(model))
    else:
        torch.save(model, tmp_path / "model.pt")
        copy_ = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(copy_) is type(model) and type(copy_.covar_module) is type(model.covar_module)
    copy_.prediction_strategy = None
    torch.testing.assert_close(_latent(copy_, Xs).variance, var, rtol=0, atol=0)
    assert backend_stats(copy_)["options"] == backend_stats(model)["options"]
    restore_gpytorch(copy_)
    assert type(copy_) is original and type(copy_.covar_module) is kernel_class


def test_pickling_with_protocol_below_2_says_so():
    import pickle

    model, _, _ = _problem(m=5)
    use_gpscale(model, **ITERATIVE)
    with pytest.raises(pickle.PicklingError, match="protocol >= 2"):
        pickle.dumps(model, protocol=1)


def test_first_prediction_solves_mean_cache_and_covariance_in_one_cg_call():
    model, lik, Xs = _problem(m=150)
    with torch.no_grad(), EXACT:
        exact = lik(model(Xs))
        exact_mean, exact_var = exact.mean, exact.variance
    f = _latent(model, Xs, **ITERATIVE)
    counts = backend_stats(model)["counts"]
    assert counts == {"predictive_covariance": 1}  # no separate mean-cache solve
    s, noise = float(model.covar_module.outputscale.detach()), float(lik.noise.detach())
    assert float((f.mean - exact_mean).abs().max()) <= (s * RTOL * noise) ** 0.5  # the mean's certificate
    _latent(model, Xs[:7])  # later predictions reuse GPyTorch's mean cache
    assert backend_stats(model)["counts"] == {"predictive_covariance": 2}
    model.prediction_strategy = None
    with gpytorch.settings.fast_pred_var():  # LOVE: GPyTorch's covariance, the mean cache by its own solve
        torch.testing.assert_close(_latent(model, Xs).mean, f.mean, rtol=0, atol=(s * RTOL * noise) ** 0.5)
    assert backend_stats(model)["counts"]["solve"] == 1
    with torch.no_grad():
        var = lik(f).variance
    assert float(((var - exact_var) / exact_var).min()) >= -1e-10


def test_covariance_correction_refuses_a_wrong_shape():
    model, lik, Xs = _problem(m=5)
    use_gpscale(model, **ITERATIVE)
    with torch.no_grad():
        K = lik(model.forward(model.train_inputs[0])).lazy_covariance_matrix
    with pytest.raises(ValueError, match="shape"):
        gpp.negative_covariance_correction(K, torch.ones(3, 2, dtype=torch.float64))
