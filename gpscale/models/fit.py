"""Hyperparameter optimisation of :class:`~gpscale.models.ExactGP`: parameters, objective, fit session.

The optimisers that drive a :class:`FitSession` are in :mod:`gpscale.models.optimizers`.

The optimised vector is the concatenation of the *unconstrained* parameters
``[raw_lengthscale (d or 1), raw_outputscale, raw_noise, mean]`` (float64 always: L-BFGS-B's
finite-precision line search needs more than float32 even when the kernel products run in float32).
The objective is :math:`-\\log p(y \\mid X, \\theta) / n` of the standardised data, computed by
:func:`gpscale.mll_estimate`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..kernels.base import StationaryKernel, to_positive, to_raw
from ..likelihood.api import mll_estimate
from ..precision import LOW_PRECISION_GIVE_UP, FallbackStreak, PrecisionWarning
from .checkpoint import FORMAT_VERSION, save_checkpoint

_F64 = torch.float64


def _raw(value: float) -> float:
    return float(to_raw(torch.tensor(value, dtype=_F64)))


class GPParams(nn.Module):
    """All trainable parameters of an exact GP: kernel, noise (with a floor) and constant mean.

    Parameters
    ----------
    kernel : StationaryKernel
        Converted to float64 in place.
    noise : float
        Initial noise variance, ``> noise_floor``.
    mean : float
        Initial constant mean.
    noise_floor : float
        ``noise = noise_floor + softplus(raw_noise) + 1e-6``: keeps :math:`\\hat K` well conditioned
        (CG iterations grow like ``sqrt(outputscale / noise)``) whatever the optimiser tries.
    """

    def __init__(self, kernel: StationaryKernel, noise: float, mean: float, noise_floor: float):
        super().__init__()
        self.kernel = kernel.to(_F64)
        self.noise_floor = float(noise_floor)
        self.raw_noise = nn.Parameter(to_raw(torch.tensor(noise - noise_floor, dtype=_F64)))
        self.mean = nn.Parameter(torch.tensor(float(mean), dtype=_F64))

    @property
    def noise(self) -> torch.Tensor:
        """Constrained noise variance (keeps the graph to ``raw_noise``)."""
        return to_positive(self.raw_noise) + self.noise_floor

    def vector(self) -> torch.Tensor:
        """Detached copy of the unconstrained parameter vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).clone()

    @torch.no_grad()
    def set_vector(self, theta) -> None:
        """Copy an unconstrained vector (numpy or tensor) into the parameters."""
        theta = torch.as_tensor(theta, dtype=_F64)
        offset = 0
        for p in self.parameters():
            k = p.numel()
            p.copy_(theta[offset:offset + k].reshape(p.shape))
            offset += k

    def grad_vector(self) -> torch.Tensor:
        grads = [torch.zeros(p.numel(), dtype=_F64) if p.grad is None else p.grad.detach().reshape(-1)
                 for p in self.parameters()]
        return torch.cat(grads)

    def bounds(self) -> list[tuple[float | None, float | None]]:
        """Box bounds for L-BFGS-B on the unconstrained scale (standardised data).

        Wide enough never to bind at a sensible optimum; they stop the first line searches from
        trying values (outputscale 1e8, lengthscale 1e-9) where CG cannot converge.
        """
        ls = (_raw(1e-4), _raw(1e4))
        return [ls] * self.kernel.raw_lengthscale.numel() + [(_raw(1e-4), _raw(1e4)), (None, _raw(1e4)), (None, None)]

    def hyperparameters(self) -> dict:
        """Constrained values on the standardised scale, as plain python numbers."""
        with torch.no_grad():
            return {"lengthscale": self.kernel.lengthscale.reshape(-1).tolist(),
                    "outputscale": float(self.kernel.outputscale), "noise": float(self.noise),
                    "mean": float(self.mean)}


class Objective:
    """``-MLL / n`` of standardised data through :func:`gpscale.mll_estimate`.

    Parameters
    ----------
    X, y : tensors
        Standardised training data (same dtype and device).
    params : GPParams
    mll_kwargs : dict
        ``method``, ``rtol``, ``num_probes``, ``preconditioner``, ``memory_budget``, ``backend`` for
        :func:`gpscale.mll_estimate`.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, params: GPParams, mll_kwargs: dict):
        self.X, self.y, self.params, self.mll_kwargs = X, y, params, mll_kwargs

    def value_and_grad(self, theta, seed: int) -> tuple[float, np.ndarray, dict]:
        """Set the parameters to ``theta``, evaluate the loss and its gradient (probe ``seed``)."""
        self.params.set_vector(theta)
        self.params.zero_grad(set_to_none=True)
        res = mll_estimate(self.X, self.y, self.params.kernel, self.params.noise, self.params.mean,
                           seed=seed, warn=False, **self.mll_kwargs)
        loss = -res.value / self.X.shape[0]
        loss.backward()
        return float(loss.detach()), self.params.grad_vector().numpy().copy(), _plain(res.stats)


def _plain(stats: dict) -> dict:
    """Keep only plain scalars (JSON- and ``weights_only``-checkpoint-friendly)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}


@dataclass
class OptimResult:
    """What an optimiser run produced (input of :class:`FitReport`)."""

    theta: torch.Tensor
    loss: float
    iterations: int
    evaluations: int
    converged: bool
    message: str
    losses: list = field(default_factory=list)
    step_seconds: list = field(default_factory=list)
    last_stats: dict = field(default_factory=dict)
    cg_failures: int = 0
    resumed_from: int = 0
    #: ``max |d loss / d theta|`` (per point, unconstrained parameters) at the returned vector, as the
    #: optimiser last estimated it; NaN when unknown.
    grad_inf: float = math.nan
    #: :func:`precision_check` of the fitted point (low-precision policies only)
    precision_check: dict | None = None
    #: ``(columns finished in the low precision, all columns)`` over the fit's CG solves, or None
    low_precision_columns: tuple | None = None
    #: the evaluation after which the fit dropped its low-precision policy (every column of
    #: :data:`LOW_PRECISION_GIVE_UP` evaluations in a row fell back), or None
    low_precision_given_up: int | None = None


#: Relative difference between a low-precision fit's own loss and the float32-product loss at the
#: fitted hyperparameters above which :func:`precision_check` warns (the MLL tolerance of issue 4).
PRECISION_CHECK_RTOL = 1e-2


def precision_check(objective: Objective, theta, seed: int, own_loss: float | None = None) -> dict | None:
    """Re-evaluate a low-precision fit's optimum with float32 kernel products (same probes).

    Why: the low-precision estimator is accurate where the noise dominates the product error, but
    its log-determinant drifts as the fitted noise shrinks (measured with ``bench_precision.py``,
    protein, n = 2700: bfloat16's own MLL/point -0.7639 against -0.7794 with float32 products at
    noise 0.0145, 2%; 4e-4 at noise 0.03) -- and the optimiser follows the drift.  Two MLL
    evaluations at ``theta`` with the same probe ``seed`` (common random numbers: the difference is
    the products' alone), about two optimisation steps, tell the user -- one when the optimiser
    already evaluated ``theta`` with ``seed`` and passes that value as ``own_loss`` (L-BFGS-B).

    Returns
    -------
    dict or None
        ``None`` unless ``objective`` uses a low-precision policy; else ``loss_own``,
        ``loss_float32`` (standardised negative MLL per point), ``relative`` (their relative
        difference) and ``ok`` (``relative <= PRECISION_CHECK_RTOL``; otherwise a
        :class:`~gpscale.precision.PrecisionWarning` was issued).
    """
    policy = objective.mll_kwargs.get("precision")
    if policy is None or not policy.low_precision:
        return None
    if own_loss is None:
        own_loss, _, _ = objective.value_and_grad(theta, seed)
    ref = Objective(objective.X, objective.y, objective.params, {**objective.mll_kwargs, "precision": None})
    loss_ref, _, _ = ref.value_and_grad(theta, seed)
    rel = abs(own_loss - loss_ref) / max(abs(loss_ref), 1e-12)
    out = {"loss_own": float(own_loss), "loss_float32": float(loss_ref), "relative": float(rel),
           "ok": bool(rel <= PRECISION_CHECK_RTOL)}
    if not out["ok"]:
        warnings.warn(f"the {policy.product} MLL estimate at the fitted hyperparameters differs from the float32-"
                      f"product estimate by {rel:.1%} (loss {own_loss:.5f} vs {loss_ref:.5f} per point), more "
                      f"than {PRECISION_CHECK_RTOL:.0%}: the optimum may be biased by the low-precision products "
                      "(typical when the fitted noise is small). Refit with precision=None, or start a float32 "
                      "fit from these hyperparameters; see report_.precision_check", PrecisionWarning,
                      stacklevel=3)
    return out


#: share of low-precision solves below which a fit warns that the policy bought nothing
LOW_PRECISION_SHARE_WARN = 0.1


def check_low_precision_use(objective: Objective, columns: tuple | None) -> None:
    """Warn when a low-precision fit redid (almost) every solve in the fallback precision.

    The rounded kernel ``K + E`` stays usable only while ``rho = ||A^-1 E||`` is well below 1, and
    ``rho`` grows with ``n`` and as the noise shrinks (``benchmarks/lowp_perturbation.py``,
    docs/precision.md).  Past that, every column falls back, and the low-precision phase was work
    that ``precision=None`` would not have done.
    """
    policy = objective.mll_kwargs.get("precision")
    if policy is None or not policy.low_precision or not columns:
        return
    low, total = columns
    if low < LOW_PRECISION_SHARE_WARN * total:
        warnings.warn(f"only {low} of {total} CG solves of this fit finished in {policy.product}; the others were "
                      f"redone in {policy.fallback_product}, so the policy cost time instead of saving it. At this n "
                      f"and noise the {policy.product}-rounded kernel is too far from K + noise I (||A^-1 E|| >~ 1/2, "
                      "growing with n and 1/noise; docs/precision.md): fit with precision=None, or with "
                      "PrecisionPolicy('float16') (8x smaller rounding than bfloat16)", PrecisionWarning, stacklevel=3)


class FitSession:
    """Bookkeeping shared by both optimisers: timing, CG failures, progress bar and checkpoints."""

    def __init__(self, objective: Objective, *, optimizer: str, max_iter: int, checkpoint=None,
                 fingerprint: dict | None = None, verbose: bool = False, desc: str = "gpscale fit"):
        self.objective, self.optimizer = objective, optimizer
        self.path, self.fingerprint = checkpoint, fingerprint
        self.iteration = self.evaluations = self.cg_failures = self.resumed_from = 0
        self.best_value = math.inf
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.last_stats: dict = {}
        self.low_columns = self.columns = 0  # CG columns finished in low precision / all (policy fits)
        self.fell_back, self.low_precision_given_up = FallbackStreak(), None
        self.pbar = tqdm(total=max_iter, disable=not verbose, desc=f"{desc} ({optimizer})", unit="it",
                         dynamic_ncols=True)

    def restore(self, state: dict) -> None:
        """Counters of a resumed fit (L-BFGS-B recounts iterations during the replay instead)."""
        self.resumed_from = int(state.get("iteration", 0))
        self.best_value = float(state.get("best_value", math.inf))
        self.cg_failures = int(state.get("cg_failures", 0))
        self.last_stats = dict(state.get("last_stats", {}))
        self.low_columns = int(state.get("low_columns", 0))
        self.columns = int(state.get("columns", 0))
        if state.get("low_precision_given_up") is not None:  # the checkpointed fit had dropped its policy
            self._drop_low_precision(int(state["low_precision_given_up"]), warn=False)

    def evaluate(self, theta, seed: int) -> tuple[float, np.ndarray | None, dict]:
        """One real objective evaluation; ``(nan, None, stats)`` when the solver failed outright."""
        t0 = time.perf_counter()
        try:
            f, g, stats = self.objective.value_and_grad(theta, seed)
        except ValueError as exc:  # e.g. Cholesky of a matrix that is not PD in this precision
            f, g, stats = math.nan, None, {"status": "FAILED", "error": str(exc)}
        self.step_seconds.append(time.perf_counter() - t0)
        self.evaluations += 1
        if g is not None and not (math.isfinite(f) and np.isfinite(g).all()):
            f, g = math.nan, None
        if stats.get("status", "CONVERGED") != "CONVERGED":
            self.cg_failures += 1
        self.last_stats = stats
        self.columns += int(stats.get("columns", 0))
        self.low_columns += int(stats.get("low_precision_columns", 0))
        self._watch_low_precision(stats)
        if math.isfinite(f):
            self.best_value = min(self.best_value, f)
        # At large n one iteration takes minutes: show every evaluation, not only finished iterations.
        self.pbar.set_postfix(loss=f"{f:.5f}", evals=self.evaluations, cg_iters=stats.get("iterations_max", "-"),
                              step=f"{self.step_seconds[-1]:.1f}s")
        return f, g, stats

    def _watch_low_precision(self, stats: dict) -> None:
        """Drop the low-precision policy once it only costs time (:class:`~gpscale.precision.FallbackStreak`).

        The values do not jump: a column that fell back was finished in float32 anyway.
        """
        if self.fell_back.update(self.objective.mll_kwargs.get("precision"), stats):
            self._drop_low_precision(self.evaluations, warn=True)

    def _drop_low_precision(self, evaluation: int, *, warn: bool) -> None:
        policy = self.objective.mll_kwargs.get("precision")
        self.objective.mll_kwargs = {**self.objective.mll_kwargs, "precision": None}
        self.low_precision_given_up = evaluation
        if warn and policy is not None:
            warnings.warn(f"every CG column of the last {LOW_PRECISION_GIVE_UP} evaluations fell back from "
                          f"{policy.product} to {policy.fallback_product}: the rest of this fit runs without the "
                          "low-precision policy (at this n and noise the rounded kernel is too far from "
                          "K + noise I; docs/precision.md). report_.low_precision_given_up records where.",
                          PrecisionWarning, stacklevel=6)

    def end_iteration(self, loss: float) -> None:
        self.iteration += 1
        self.losses.append(float(loss))
        self.pbar.update(1)

    def save(self, theta, finished: bool = False, message: str = "", **extra) -> None:
        if self.path is None:
            return
        self.objective.params.set_vector(theta)
        state = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "optimizer": self.optimizer,
                 "theta": torch.as_tensor(theta, dtype=_F64).clone(), "iteration": self.iteration,
                 "best_value": self.best_value, "losses": list(self.losses), "cg_failures": self.cg_failures,
                 "last_stats": self.last_stats, "low_columns": self.low_columns, "columns": self.columns,
                 "low_precision_given_up": self.low_precision_given_up,
                 "hyperparameters": self.objective.params.hyperparameters(),
                 "finished": finished, "message": message}
        state.update(extra)
        save_checkpoint(self.path, state)

    def result(self, theta, loss, converged, message, grad=None) -> OptimResult:
        self.pbar.close()
        grad_inf = float(np.abs(np.asarray(grad)).max()) if grad is not None and np.size(grad) else math.nan
        return OptimResult(torch.as_tensor(theta, dtype=_F64).clone(), float(loss), self.iteration,
                           self.evaluations, bool(converged), str(message), self.losses, self.step_seconds,
                           self.last_stats, self.cg_failures, self.resumed_from, grad_inf,
                           low_precision_columns=(self.low_columns, self.columns) if self.columns else None,
                           low_precision_given_up=self.low_precision_given_up)
