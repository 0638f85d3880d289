"""``ExactGP.sample_y`` (pathwise conditioning) in one process: the samples have the posterior's moments.

The split of the sample columns over ranks is checked against these single-process samples in
``test_distributed.py::test_fit_and_sample_y``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gpscale
from gpscale.models.sampling import PathwiseSampler
from gpscale.precond import PivotedCholesky


def _problem(n=150, d=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 3, size=(n, d))
    y = np.sin(2 * X[:, 0]) + 0.5 * X[:, 1] + 0.1 * rng.standard_normal(n)
    return X, y


def _fitted(kernel="rbf", method="cholesky"):
    X, y = _problem()
    gp = gpscale.ExactGP(kernel=kernel, method=method, max_iter=15, predict_rtol=1e-8,
                         preconditioner=PivotedCholesky(rank=30))
    return gp.fit(X, y), X


@pytest.mark.parametrize("kernel,method,prior,tol", [
    ("rbf", "cholesky", "exact", 0.06),
    ("rbf", "iterative", "exact", 0.06),
    ("rbf", "cholesky", "rff", 0.12),
    ("matern32", "cholesky", "rff", 0.12),
])
def test_samples_have_posterior_moments(kernel, method, prior, tol):
    gp, _ = _fitted(kernel, method)
    Xt = np.linspace(0.2, 2.8, 12)[:, None].repeat(2, axis=1)
    S = 3000
    F = gp.sample_y(Xt, n_samples=S, seed=1, prior=prior, num_features=8192)
    assert F.shape == (12, S)
    mu, std_y = gp.predict(Xt, return_std=True)
    latent_sd = np.sqrt(np.clip(std_y ** 2 - gp.report_.noise, 1e-12, None))
    scale = math.sqrt(gp.report_.outputscale)
    assert np.all(np.abs(F.mean(1) - mu) < 5 * latent_sd / math.sqrt(S) + tol * scale * 0.2)
    assert np.all(np.abs(F.std(1) - latent_sd) < tol * latent_sd + 0.02 * scale)


def test_same_seed_same_samples_and_tensor_io():
    gp, X = _fitted()
    Xt = torch.as_tensor(X[:5])
    a = gp.sample_y(Xt, n_samples=4, seed=7)
    b = gp.sample_y(Xt, n_samples=4, seed=7)
    assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    assert not torch.equal(a, gp.sample_y(Xt, n_samples=4, seed=8))


def test_sample_y_bad_input():
    gp, X = _fitted()
    with pytest.raises(ValueError, match="n_samples"):
        gp.sample_y(X[:3], n_samples=0)
    with pytest.raises(ValueError, match="prior"):
        PathwiseSampler(prior="sobol")
    with pytest.raises(RuntimeError, match="not fitted"):
        gpscale.ExactGP().sample_y(X[:3])
    with pytest.raises(RuntimeError, match="torchrun"):
        gp.sample_y(X[:3], distributed="columns")


@pytest.mark.parametrize("kernel", [gpscale.kernels.RBF(lengthscale=torch.tensor([0.7, 1.3])),
                                    gpscale.kernels.Matern(nu=0.5, lengthscale=0.8),
                                    gpscale.kernels.Matern(nu=1.5, lengthscale=0.8),
                                    gpscale.kernels.Matern(nu=2.5, lengthscale=0.8, outputscale=2.0)],
                         ids=["rbf_ard", "matern12", "matern32", "matern52"])
def test_random_fourier_prior_covariance(kernel):
    """The RFF prior's covariance matches the kernel (checks each spectral density)."""
    from gpscale.models.sampling import _rff_prior

    kernel = kernel.double()
    X = torch.tensor([[0.0, 0.0], [0.3, 0.1], [0.8, -0.4], [1.5, 0.9]], dtype=torch.float64)
    F = _rff_prior(kernel, X, 4000, 4000, torch.Generator().manual_seed(0), slice(None))
    C = F @ F.T / F.shape[1]
    K = kernel(X).detach()
    assert (C - K).abs().max() < 0.08 * float(kernel.outputscale.detach())
