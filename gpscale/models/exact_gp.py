"""``ExactGP``: a scikit-learn style exact Gaussian process regressor on top of the BBMM engine."""

from __future__ import annotations

import copy
import math
import time
import warnings

import numpy as np
import torch

from .._validation import as_tensor, check_inputs, check_targets
from ..distributed.fitting import FitCoordinator
from ..kernels import StationaryKernel, make_kernel
from ..likelihood.api import CHOLESKY_CROSSOVER
from ..precision import as_policy
from ..precond.pivoted_cholesky import PivotedCholesky
from ..solvers.cg import CGWarning
from .checkpoint import check_compatible, fingerprint, load_checkpoint
from .config import DEFAULT_MAX_ITER, ParamsMixin, check_config, training_policy
from .fit import (
    FitSession,
    GPParams,
    Objective,
    check_low_precision_use,
    precision_check,
)
from .optimizers import run_adam, run_lbfgs
from .predict import (
    Standardizer,
    latent_mean,
    latent_variance,
    prepare_predictor,
)
from .report import FitReport


class ExactGP(ParamsMixin):
    """Exact GP regression with learned hyperparameters, scikit-learn style (``fit`` / ``predict``).

    The model is :math:`y = m + f(x) + \\varepsilon` with :math:`f \\sim GP(0, k)`, a constant mean
    ``m`` and Gaussian noise :math:`\\varepsilon \\sim N(0, \\sigma^2)`.  ``fit`` standardises the
    inputs (per column) and the targets, then maximises the log marginal likelihood over the kernel
    hyperparameters, :math:`\\sigma^2` and ``m``.

    Parameters
    ----------
    kernel : {"rbf", "matern12", "matern32", "matern52"} or StationaryKernel, default "matern52"
        A kernel instance is copied and its hyperparameters are the initial values (they act on the
        *standardised* inputs).
    ard : bool, default True
        One lengthscale per input column (ignored when ``kernel`` is an instance).
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        L-BFGS-B (SciPy) on the unconstrained parameters with autograd gradients, or torch's Adam.
        With the iterative method L-BFGS-B's line search trusts the *value* estimate and can stop
        where that no longer resolves the decrease, at a point that depends on the probe ``seed``
        (``report_.grad_inf`` shows what gradient was left); Adam uses gradients only, with fresh
        probes every step, and ends at the same point whatever the seed (measured in
        docs/benchmarks.md, "Why L-BFGS-B's endpoints scatter").
    max_iter : int, optional
        Optimiser iterations; default 100 (L-BFGS-B) or 200 (Adam).
    lr : float, default 0.1
        Adam step size.
    tol : float, default 1e-7
        L-BFGS-B stops when the loss (``-MLL / n``) improves by less than ``tol`` relatively.
    method : {"auto", "cholesky", "iterative"}, default "auto"
        ``auto``: dense Cholesky for ``n <= gpscale.CHOLESKY_CROSSOVER``, BBMM (CG + SLQ) above.
    rtol : float, default 1e-2
        CG tolerance of the training objective.
    predict_rtol : float, default 1e-3
        Accuracy of the prediction solves (iterative method).  Predictive variances are certified: each
        test point's CG stops on a guaranteed bound, so the variance of ``y`` is never too small and at
        most ``predict_rtol`` too large relatively (:func:`gpscale.models.predict.latent_variance`).  The
        mean and sample solves stop at relative residual ``predict_rtol``.
    cg_max_iter : int, default 1000
        Iteration cap of every CG solve (training and prediction); a solve that hits it is reported
        (``CGWarning``, ``report_.cg_failures``) rather than left to run on.
    num_probes : int, default 10
        Probe vectors of the stochastic log-det and trace estimates.
    preconditioner : factory or None, default ``PivotedCholesky(rank=100)``
    seed : int, default 0
        Probe seed.  L-BFGS-B uses it for every step (a deterministic objective for its line
        search); Adam uses ``seed + step``.
    dtype : torch.dtype, default torch.float64
        Precision of the kernel products.  float64 is the safe default on CPU; ``torch.float32``
        is about twice as fast and is fine for the iterative method with moderate noise.
    device : str or torch.device, optional
        Where the data and products live (default CPU).
    memory_budget : int, optional
        Bytes for each kernel operator (cache and tiles), and a quarter of it for the right-hand
        sides of the prediction solves; default ``gpscale.operators.DEFAULT_MEMORY_BUDGET``.
    backend : {"auto", "cuda", "keops", "torch"}, "cuda:<variant>" or CudaBackend, default "auto"
        How kernel products are computed (:mod:`gpscale.operators.backends`); ``auto`` picks the
        fastest available for the device and size, and ``report_`` / the fit's statistics say which.
    noise_init, noise_floor : float, default 0.1 and 1e-4
        Initial noise variance and its lower bound, both on the standardised scale.
    lengthscale_init : float, optional
        Initial lengthscale on the standardised inputs; default ``sqrt(d)``, which keeps the typical
        scaled distance between points of order one whatever the dimension.
    init_subset : int, optional
        First fit the hyperparameters on a random subset of this many points (dense Cholesky when
        it is below the crossover: seconds), then optimise on all the data from there.  At large
        ``n``, where one step costs minutes, this saves most of the expensive iterations.
    verbose : bool, default False
        Show a progress bar with the loss.
    checkpoint : str or path, optional
        Save the optimiser state after every step (atomically) and resume from the file when it
        exists.  See :mod:`gpscale.models.checkpoint`.
    precision : PrecisionPolicy or dtype name, optional
        Mixed-precision CG for the iterative training objective (``docs/precision.md``), e.g.
        ``PrecisionPolicy("bfloat16")``.  The prediction solves stay in ``dtype`` (they need
        ``predict_rtol``).

    Attributes
    ----------
    report_ : FitReport
        Iterations, final MLL, hyperparameters in original units, CG statistics, timings.
    kernel_ : StationaryKernel
        Fitted kernel (on the standardised inputs).
    noise_, mean_ : float
        Fitted noise variance and constant mean (standardised scale).
    method_ : str
        ``"cholesky"`` or ``"iterative"``.

    Notes
    -----
    Predictive means cost one kernel product with the training data.  Predictive variances cost a
    triangular solve per test batch below the Cholesky crossover and a **batched CG solve per test
    batch** above it: :math:`O(n^2 m)` per CG iteration for ``m`` test points, exact up to a
    certified relative error ``predict_rtol`` but expensive for very large test sets.

    Examples
    --------
    >>> gp = ExactGP(kernel="matern52").fit(X_train, y_train)
    >>> mean, std = gp.predict(X_test, return_std=True)
    >>> print(gp.report_)
    """

    def __init__(self, kernel="matern52", *, ard: bool = True, optimizer: str = "lbfgs", max_iter: int | None = None,
                 lr: float = 0.1, tol: float = 1e-7, method: str = "auto", rtol: float = 1e-2,
                 predict_rtol: float = 1e-3, cg_max_iter: int = 1000, num_probes: int = 10,
                 preconditioner=PivotedCholesky(rank=100),
                 seed: int = 0, dtype: torch.dtype = torch.float64, device=None, memory_budget: int | None = None,
                 noise_init: float = 0.1, noise_floor: float = 1e-4, lengthscale_init: float | None = None,
                 init_subset: int | None = None, verbose: bool = False, checkpoint=None, precision=None,
                 backend: str = "auto"):
        self.kernel, self.ard, self.optimizer = kernel, ard, optimizer
        self.max_iter, self.lr, self.tol = max_iter, lr, tol
        self.method, self.rtol, self.predict_rtol, self.num_probes = method, rtol, predict_rtol, num_probes
        self.cg_max_iter = cg_max_iter
        self.preconditioner, self.seed, self.dtype, self.device = preconditioner, seed, dtype, device
        self.memory_budget, self.noise_init, self.noise_floor = memory_budget, noise_init, noise_floor
        self.lengthscale_init, self.init_subset = lengthscale_init, init_subset
        self.verbose, self.checkpoint, self.precision, self.backend = verbose, checkpoint, precision, backend

    # ------------------------------------------------------------------ configuration
    def _resolved_max_iter(self) -> int:
        return DEFAULT_MAX_ITER[self.optimizer] if self.max_iter is None else int(self.max_iter)

    def _init_kernel(self, d: int) -> StationaryKernel:
        if isinstance(self.kernel, StationaryKernel):
            k = copy.deepcopy(self.kernel)
            k.check_dims(d)
            return k
        ls0 = float(self.lengthscale_init) if self.lengthscale_init is not None else math.sqrt(d)
        ls = torch.full((d,), ls0) if self.ard else ls0
        return make_kernel(self.kernel, lengthscale=ls, outputscale=1.0)

    def _fingerprint_config(self, method: str) -> dict:
        kname = self.kernel.name if isinstance(self.kernel, StationaryKernel) else str(self.kernel).lower()
        return {"kernel": kname, "ard": bool(self.ard), "optimizer": self.optimizer, "method": method,
                "dtype": str(self.dtype), "seed": int(self.seed), "num_probes": int(self.num_probes),
                "rtol": float(self.rtol), "cg_max_iter": int(self.cg_max_iter), "tol": float(self.tol),
                "lr": float(self.lr),
                "noise_init": float(self.noise_init), "noise_floor": float(self.noise_floor),
                "lengthscale_init": self.lengthscale_init, "init_subset": self.init_subset,
                "preconditioner": repr(self.preconditioner),
                **({"precision": repr(as_policy(self.precision))} if self.precision is not None else {})}

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, *, distributed=None) -> "ExactGP":
        """Learn the hyperparameters by maximising the marginal likelihood, then cache the predictor.

        Parameters
        ----------
        X : (n, d) array-like or tensor, n >= 2
        y : (n,) or (n, 1) array-like or tensor
        distributed : {"columns", "rows", "hybrid"} or gpscale.distributed.Partition, optional
            Split every MLL evaluation over the initialised ``torch.distributed`` process group (every
            rank calls ``fit`` with the same data; ``method="auto"`` then means iterative).  All ranks
            end with identical hyperparameters; only rank 0 writes the checkpoint and the progress bar.

        Returns
        -------
        self
        """
        check_config(self)
        t_start = time.perf_counter()
        X, y = _check_data(X, y)
        self.scaler_ = Standardizer.fit(X, y)
        dev = torch.device(self.device) if self.device is not None else X.device
        Xs = self.scaler_.transform_X(X).to(self.dtype).to(dev)
        ys = self.scaler_.transform_y(y).to(self.dtype).to(dev)
        n, d = Xs.shape
        dist_fit = FitCoordinator(distributed)
        method = self.method if self.method != "auto" else (
            "cholesky" if n <= CHOLESKY_CROSSOVER and distributed is None else "iterative")
        params = GPParams(self._init_kernel(d), self.noise_init, 0.0, self.noise_floor)
        mll_kwargs = {"method": method, "rtol": self.rtol, "max_iter": self.cg_max_iter,
                      "num_probes": self.num_probes, "preconditioner": self.preconditioner,
                      "memory_budget": self.memory_budget, "backend": self.backend, "distributed": distributed,
                      "precision": training_policy(self, method, n)}
        fp = fingerprint(X, y, self._fingerprint_config(method))
        state = dist_fit.from_writer(lambda: self._load_state(fp))
        theta0 = self._start_vector(state, Xs, ys, params, mll_kwargs)
        objective = Objective(Xs, ys, params, mll_kwargs)  # its mll_kwargs may drop the policy mid-fit
        max_iter = self._resolved_max_iter()
        session = FitSession(objective, optimizer=self.optimizer, max_iter=max_iter,
                             checkpoint=self.checkpoint if dist_fit.writer else None, fingerprint=fp,
                             verbose=self.verbose and dist_fit.writer)
        if self.optimizer == "lbfgs":
            out = run_lbfgs(session, theta0, max_iter=max_iter, tol=self.tol, seed=self.seed, state=state)
        else:
            out = run_adam(session, theta0, max_iter=max_iter, lr=self.lr, seed=self.seed, state=state)
        out.theta = dist_fit.agree(out.theta)
        return self._finish_fit(objective, out, method, t_start, mll_kwargs["precision"])

    def _finish_fit(self, objective: Objective, out, method: str, t_start: float, mll_policy) -> "ExactGP":
        """Checks of the optimum, the fitted attributes, the cached predictor and ``report_``."""
        # L-BFGS-B's final value was computed at out.theta with self.seed (Adam's was not: per-step seeds).
        own = out.loss if self.optimizer == "lbfgs" else None
        out.precision_check = precision_check(objective, out.theta, self.seed, own_loss=own)
        if out.low_precision_given_up is None:  # a fit that dropped its policy has warned already
            check_low_precision_use(objective, out.low_precision_columns)
        params = objective.params
        params.set_vector(out.theta)
        self._params, self.method_, self.n_features_in_ = params, method, objective.X.shape[1]
        self.X_train_, self.y_train_ = objective.X, objective.y
        self.kernel_ = params.kernel
        self.noise_, self.mean_ = float(params.noise.detach()), float(params.mean.detach())
        t_pred = time.perf_counter()
        alpha_stats = self._prepare_prediction()
        self.report_ = FitReport.from_fit(self, out, alpha_stats, fit_seconds=time.perf_counter() - t_start,
                                          predict_setup_seconds=time.perf_counter() - t_pred,
                                          policy=mll_policy)
        if out.cg_failures:
            warnings.warn(f"CG did not converge in {out.cg_failures} of {out.evaluations} objective evaluations "
                          "(see report_.cg_stats); the hyperparameters may be less accurate. Raise the "
                          "preconditioner rank, loosen rtol, or use method='cholesky' for small n", CGWarning,
                          stacklevel=2)
        return self

    def _start_vector(self, state, Xs, ys, params: GPParams, mll_kwargs: dict) -> torch.Tensor:
        """Initial vector: the defaults, or the optimum on a random ``init_subset`` of the points.

        A resumed fit takes it from the checkpoint instead (no need to redo the subset fit): Adam's
        current vector, or the first point L-BFGS-B evaluated, where its replay starts.
        """
        if state is not None and self.optimizer == "adam":
            return state["theta"].clone()
        history = (state or {}).get("history") or {}
        if len(history.get("x", [])):
            return history["x"][0].clone()
        n = Xs.shape[0]
        if self.init_subset is None or self.init_subset >= n:
            return params.vector()
        m = int(self.init_subset)
        idx = torch.from_numpy(np.random.default_rng(self.seed).choice(n, size=m, replace=False)).to(Xs.device)
        sub = Objective(Xs[idx], ys[idx], params, dict(mll_kwargs, method="cholesky" if m <= CHOLESKY_CROSSOVER
                                                       else "iterative"))
        session = FitSession(sub, optimizer="lbfgs", max_iter=DEFAULT_MAX_ITER["lbfgs"], verbose=self.verbose,
                             desc=f"subset init (n={m})")
        return run_lbfgs(session, params.vector(), max_iter=DEFAULT_MAX_ITER["lbfgs"], tol=self.tol,
                         seed=self.seed).theta

    def _load_state(self, fp: dict) -> dict | None:
        if self.checkpoint is None:
            return None
        state = load_checkpoint(self.checkpoint)
        if state is not None:
            check_compatible(state, fp, self.checkpoint)  # the fingerprint includes the optimizer
        return state

    def _prepare_prediction(self) -> dict:
        """Cache ``alpha = K^-1 (y - m)`` (and the Cholesky factor / built preconditioner)."""
        cache, stats = prepare_predictor(self.X_train_, self.y_train_, self.kernel_, self.noise_, self.mean_,
                                          method=self.method_, rtol=self.predict_rtol, max_iter=self.cg_max_iter,
                                          preconditioner=self.preconditioner, memory_budget=self.memory_budget,
                                          backend=self.backend)
        self._cache = cache
        self.alpha_ = cache.alpha
        if stats.get("status", "CONVERGED") != "CONVERGED":
            warnings.warn(f"the CG solve for the predictive mean ended with status {stats['status']} "
                          f"(relative residual {stats.get('relative_residual_max', float('nan')):.2e}); "
                          "predictions may be inaccurate: raise cg_max_iter or the preconditioner rank, or "
                          "loosen predict_rtol", CGWarning, stacklevel=3)
        return stats

    # ------------------------------------------------------------------ predict
    def _check_is_fitted(self) -> None:
        if not hasattr(self, "alpha_"):
            raise RuntimeError("this ExactGP instance is not fitted yet; call fit(X, y) before predict or score")

    def _test_inputs(self, X) -> torch.Tensor:
        X = as_tensor("X", X)
        check_inputs(X, "X", min_rows=1)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} columns but the model was fitted on d={self.n_features_in_}; "
                             "pass test inputs with the training columns")
        return self.scaler_.transform_X(X).to(self.dtype).to(self.X_train_.device)

    def predict(self, X, return_std: bool = False):
        """Predictive mean (and standard deviation of ``y``) at new inputs, in original units.

        Parameters
        ----------
        X : (m, d) array-like or tensor
        return_std : bool, default False
            Also return the std of a new observation: :math:`\\sqrt{\\operatorname{var} f + \\sigma^2}`.
            Costs a solve per test batch (a batched CG above the Cholesky crossover).

        Returns
        -------
        mean : (m,) array, or tensor when ``X`` is a tensor
        std : (m,) array or tensor, only with ``return_std=True``
        """
        self._check_is_fitted()
        as_numpy = not isinstance(X, torch.Tensor)
        Xs = self._test_inputs(X)
        with torch.no_grad():
            mean_s = latent_mean(Xs, self.X_train_, self.kernel_, self.alpha_, self.mean_,
                                 memory_budget=self.memory_budget, backend=self.backend)
            mean = self.scaler_.inverse_y(mean_s)
            if not return_std:
                return _output(mean, as_numpy)
            var = latent_variance(Xs, self.X_train_, self.kernel_, self.noise_, self._cache, rtol=self.predict_rtol,
                                  max_iter=self.cg_max_iter, memory_budget=self.memory_budget, backend=self.backend)
            std = (var.to(torch.float64) + self.noise_).sqrt() * self.scaler_.y_scale
        return _output(mean, as_numpy), _output(std, as_numpy)

    def score(self, X, y) -> float:
        """Coefficient of determination :math:`R^2` of the predictive mean (as in scikit-learn)."""
        self._check_is_fitted()
        y = as_tensor("y", y).to(torch.float64)
        y = check_targets(y, y.shape[0] if y.dim() else 0)
        mean = torch.as_tensor(self.predict(X if isinstance(X, torch.Tensor) else np.asarray(X)), dtype=torch.float64)
        if mean.shape[0] != y.shape[0]:
            raise ValueError(f"X has {mean.shape[0]} rows but y has {y.shape[0]} entries; they must match")
        ss_res = float(((y - mean.to(y.device)) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)

    def sample_y(self, X, n_samples: int = 1, seed: int = 0, *, distributed=None, prior: str = "auto",
                 num_features: int = 2048):
        """Posterior samples of the latent function (plus the mean) at ``X``, in original units.

        Pathwise conditioning (Wilson et al. 2020): a prior draw at the training and test points
        (exact below 2000 points in all, random Fourier features above), then **one** batched solve
        for all samples (Cholesky or preconditioned CG at ``predict_rtol``).  See
        :mod:`gpscale.models.sampling`.

        Parameters
        ----------
        X : (m, d) array-like or tensor
        n_samples : int, default 1
        seed : int, default 0
            The same seed gives the same samples, in one process or split over ranks.
        distributed : {"columns", "rows", "hybrid"} or Partition, optional
            Split the sample columns over the process group; every rank returns all samples.
        prior : {"auto", "exact", "rff"}
        num_features : int, default 2048

        Returns
        -------
        (m, n_samples) array, or tensor when ``X`` is a tensor
        """
        from .sampling import PathwiseSampler, pathwise_samples

        self._check_is_fitted()
        as_numpy = not isinstance(X, torch.Tensor)
        F = pathwise_samples(self._test_inputs(X), self.X_train_, self.y_train_, self.kernel_, self.noise_, self.mean_,
                             n_samples, seed, sampler=PathwiseSampler(prior, num_features), chol=self._cache.chol,
                             precond=self._cache.precond, rtol=self.predict_rtol, max_iter=self.cg_max_iter,
                             distributed=distributed, memory_budget=self.memory_budget, backend=self.backend)
        return _output(self.scaler_.inverse_y(F), as_numpy)

    def __repr__(self) -> str:
        k = self.kernel if isinstance(self.kernel, str) else type(self.kernel).__name__
        return f"ExactGP(kernel={k!r}, optimizer={self.optimizer!r}, method={self.method!r})"


def _check_data(X, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate training data with the shared checks; return float64 tensors (standardisation precision)."""
    X = as_tensor("X", X)
    check_inputs(X, "X", min_rows=2)
    y = check_targets(as_tensor("y", y), X.shape[0])
    if not y.is_floating_point():
        y = y.to(torch.float64)
    return X.to(torch.float64), y.to(torch.float64).to(X.device)


def _output(t: torch.Tensor, as_numpy: bool):
    return t.detach().cpu().numpy().astype(np.float64) if as_numpy else t
