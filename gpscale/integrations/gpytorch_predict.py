"""GPyTorch backend predictions: a symmetric, certified predictive covariance.

Stock GPyTorch forms the predictive covariance as ``K** − K*ᵀ (K̂⁻¹ K*)``: one solve with the test/train
block, then the *first-order* product ``bᵢᵀ vⱼ``.  With CG solutions ``vⱼ = K̂⁻¹ bⱼ + eⱼ`` that matrix is
off by ``bᵢᵀ eⱼ``: not symmetric, on either side of the truth, and (near-duplicate test points) not
positive semi-definite -- ``f.sample()`` then goes through linear_operator's jitter and eigen-decomposition
fallbacks (measured: asymmetry 2.2e-5, smallest eigenvalue −3.2e-5, n = 2000, σ² = 1e-3).

:class:`GpscalePredictionStrategy` replaces that one step.  Above the Cholesky crossover it uses the
second-order form (:func:`gpscale.solvers.error_bounds.second_order_quadratic`, all pairs)

.. math::
    C = B^T V + V^T (B - \\hat K V), \\qquad B^T \\hat K^{-1} B - C = E^T \\hat K E \\succeq 0,

so the predictive covariance is too large by a positive semi-definite matrix whose diagonal CG's
Gauss-Radau bound certifies ``<= solve_rtol · σ²`` (:func:`gpscale.solvers.error_bounds.energy_stopping`)
and whose entries are at most that (Cauchy-Schwarz): symmetric, PSD whenever the exact one is, every
variance of y in ``[var⋆, var⋆ (1 + solve_rtol)]``.  Below the crossover it is ``WᵀW`` with
``W = L⁻¹B`` (one triangular solve instead of GPyTorch's two).  Both stay lazy, as GPyTorch's does: the
variances alone cost ``O(n m)`` on top of the solve, never an ``m × m`` matrix.

The solutions ``V`` enter detached: ``C`` is stationary in ``V`` at ``K̂⁻¹B``, so autograd through ``B``
(gradients w.r.t. test inputs, e.g. BoTorch's acquisition optimisation) and through ``K̂`` (with
``gpytorch.settings.detach_test_caches(False)``) is right to first order in the CG error without a
second solve.

How it is installed: :func:`gpscale.integrations.gpytorch.use_gpscale` swaps the model's class to one
with :class:`GpscaleModelMixin`, whose ``prediction_strategy`` property turns the
``DefaultPredictionStrategy`` GPyTorch builds into this subclass (no state of its own, so the swap is
safe); ``restore_gpytorch`` undoes it.  LOVE (``fast_pred_var``), ``skip_posterior_variances`` and any
strategy GPyTorch builds for a kernel that fell back run GPyTorch's own code.
"""

from __future__ import annotations

import torch
from gpytorch import settings
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from gpytorch.utils.errors import CachingError
from gpytorch.utils.memoize import add_to_cache, get_from_cache
from linear_operator import to_dense, to_linear_operator
from linear_operator.operators import LinearOperator, MatmulLinearOperator

from .._validation import check_finite
from ..likelihood.cholesky import cholesky_factor
from ..logdet.slq import build_preconditioner
from .gpytorch_operator import GpscaleKernelLinearOperator, _chunked_cg, _prediction_solver

__all__ = ["GpscaleModelMixin", "GpscalePredictionStrategy", "certified_solve", "negative_covariance_correction"]

_SLOT = "_gpscale_prediction_strategy"


def certified_solve(K: GpscaleKernelLinearOperator, op, B: torch.Tensor) -> torch.Tensor:
    """``K̂⁻¹B`` by preconditioned CG, each column's squared energy-norm error certified ``<= solve_rtol σ²``."""
    opts = K.options
    P = build_preconditioner(op, opts.preconditioner)
    return _chunked_cg(op, P, B, opts, K.state, "predictive_covariance", _prediction_solver(op, P, opts))


def negative_covariance_correction(K: GpscaleKernelLinearOperator, B: torch.Tensor,
                                   V: torch.Tensor | None = None) -> LinearOperator:
    """``−Bᵀ K̂⁻¹ B`` as a lazy, symmetric operator (module docstring).

    Parameters
    ----------
    K : GpscaleKernelLinearOperator
        The symmetric training covariance ``s K_f(X, X) + σ² I``.
    B : (n, m) tensor
        The train/test kernel block ``K(X, X*)`` (may require gradients).
    V : (n, m) tensor, optional
        :func:`certified_solve` of ``B``, if already computed (CG path only).

    Returns
    -------
    LinearOperator
        ``−WᵀW`` (Cholesky path) or ``−(BᵀV + VᵀR)`` with ``R = B − K̂V`` (CG path), ``(m, m)``.

    Complexity: the CG path is one certified CG solve of width ``m`` (in blocks of ``solve_block``) plus one
    kernel product; memory four ``(n, m)`` blocks (``B``, ``V``, ``K̂V``, ``R``).  The Cholesky path is
    ``O(n³ + n² m)``.
    """
    if B.dim() != 2 or B.shape[0] != K.shape[0] or (V is not None and V.shape != B.shape):
        raise ValueError(f"negative_covariance_correction needs B = K(X, X*) of shape ({K.shape[0]}, m) and V of "
                         f"B's shape; got B {tuple(B.shape)}, V {None if V is None else tuple(V.shape)}")
    if K._use_cholesky():
        W = torch.linalg.solve_triangular(cholesky_factor(K.to_dense()), B, upper=False)
        return MatmulLinearOperator(W.mT, -W)
    op = K._gpscale_op()
    with torch.no_grad():
        V = certified_solve(K, op, B.detach()) if V is None else V
    if any(t.requires_grad for t in (K.lengthscale, K.outputscale, K.noise)):
        KV = K.matmul(V)  # differentiable in the hyperparameters (-Vᵀ ∂K̂ V), detach_test_caches(False)
    else:
        with torch.no_grad():
            KV = op.matmul(V)
    return MatmulLinearOperator(B.mT, -V) + MatmulLinearOperator(V.mT, KV - B)


class GpscalePredictionStrategy(DefaultPredictionStrategy):
    """GPyTorch's default strategy with the predictive covariance of :func:`negative_covariance_correction`.

    The first prediction also solves for GPyTorch's mean cache ``K̂⁻¹(y − μ)`` in the *same* CG call as the
    covariance's columns: every kernel product serves both, instead of a separate single-column solve that
    costs about as many products (the tiles are recomputed whatever the width).
    """

    _gpscale_solved = None  # (B, V) of the running prediction's joint solve

    def exact_prediction(self, test_mean, test_test_covar, test_train_covar):
        K = self._joint_solve_operator(test_train_covar)
        if K is None:
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        B = to_dense(test_train_covar).mT
        train = self.likelihood(self.train_prior_dist, self.train_inputs)
        r = (self.train_labels - train.loc).detach()
        check_finite("training targets minus mean (GPyTorch mean cache)", r)
        with torch.no_grad():
            V = certified_solve(K, K._gpscale_op(), torch.cat([r[:, None], B.detach()], dim=1))
        add_to_cache(self, "mean_cache", V[:, 0], "ignore")  # GPyTorch's key: _mean_cache(nan_policy)
        self._gpscale_solved = (B, V[:, 1:])
        try:
            return super().exact_prediction(test_mean, test_test_covar, B.mT)
        finally:
            self._gpscale_solved = None

    def _joint_solve_operator(self, test_train_covar) -> GpscaleKernelLinearOperator | None:
        """The training operator if this prediction can solve mean cache and covariance together."""
        if (settings.fast_pred_var.on() or settings.skip_posterior_variances.on() or settings.detach_test_caches.off()
                or settings.observation_nan_policy.value() != "ignore" or test_train_covar.dim() != 2):
            return None
        try:
            get_from_cache(self, "mean_cache", "ignore")
            return None  # later predictions: the mean cache is there, the covariance solves alone
        except CachingError:
            pass
        K = self._gpscale_train_covar()
        return None if K is None or K._use_cholesky() else K

    def _solved(self, B: torch.Tensor) -> torch.Tensor | None:
        solved = self._gpscale_solved
        if solved is None or solved[0].shape != B.shape or solved[0].data_ptr() != B.data_ptr():
            return None
        return solved[1]

    def exact_predictive_covar(self, test_test_covar, test_train_covar):
        if settings.fast_pred_var.on() or settings.skip_posterior_variances.on():
            return super().exact_predictive_covar(test_test_covar, test_train_covar)
        K = self._gpscale_train_covar()
        if K is None or test_train_covar.dim() != 2:
            return super().exact_predictive_covar(test_test_covar, test_train_covar)
        B = to_dense(test_train_covar).mT
        correction = negative_covariance_correction(K, B, self._solved(B))  # None: no joint solve ran
        if torch.is_tensor(test_test_covar):  # small joints: GPyTorch hands dense blocks over
            return to_linear_operator(test_test_covar + correction.to_dense())
        return test_test_covar + correction

    def _gpscale_train_covar(self) -> GpscaleKernelLinearOperator | None:
        """``K + σ²I`` as GPyTorch's own ``exact_predictive_covar`` builds it, if gpscale runs it."""
        prior = self.train_prior_dist
        dist = prior.__class__(torch.zeros_like(prior.mean), prior.lazy_covariance_matrix)
        K = self.likelihood(dist, self.train_inputs).lazy_covariance_matrix
        if settings.detach_test_caches.on():
            K = K.detach()
        return K if isinstance(K, GpscaleKernelLinearOperator) and K.symmetric else None


class GpscaleModelMixin:
    """Swapped in front of a switched ``ExactGP``'s class: its prediction strategy is gpscale's."""

    @property
    def prediction_strategy(self):
        return self.__dict__.get(_SLOT)

    @prediction_strategy.setter
    def prediction_strategy(self, value):
        # GPyTorch builds a DefaultPredictionStrategy for gpscale's operator (it dispatches on
        # LazyEvaluatedKernelTensor only); the subclass adds no state, so changing the class is safe.
        if type(value) is DefaultPredictionStrategy:
            value.__class__ = GpscalePredictionStrategy
        self.__dict__[_SLOT] = value
