"""The summary of an :class:`~gpscale.models.ExactGP` fit (``gp.report_``): fields and the readable text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .fit import OptimResult

_F64 = torch.float64


@dataclass
class FitReport:
    """Summary of an :class:`~gpscale.models.ExactGP` fit (``gp.report_``); ``str(report)`` is readable.

    Hyperparameters are in the *original* units of ``X`` and ``y``; ``mll_per_point`` is
    :math:`\\log p(y)/n` of the original targets (the standardised value minus ``log(y_scale)``).
    ``cg_stats`` are the solver statistics of the last optimisation step (from
    :attr:`gpscale.MLLResult.stats`), ``alpha_cg`` those of the predictive-mean solve; ``cg_failures``
    counts steps whose CG did not converge.  ``grad_inf`` is the largest gradient entry of the loss
    (``-MLL / n``, unconstrained parameters) at the returned hyperparameters as the optimiser last
    estimated it: with the iterative method L-BFGS-B can stop where the *value* estimate no longer
    confirms a decrease although the gradient is not small (docs/benchmarks.md).  ``step_seconds``
    is the mean time of one objective evaluation (this session's evaluations only when the fit was resumed from a checkpoint).
    """

    kernel: str
    method: str
    optimizer: str
    n: int
    d: int
    iterations: int
    evaluations: int
    converged: bool
    message: str
    mll_per_point: float
    lengthscale: list
    outputscale: float
    noise: float
    mean: float
    cg_stats: dict
    cg_failures: int
    alpha_cg: dict
    fit_seconds: float
    step_seconds: float
    predict_setup_seconds: float
    resumed_from: int = 0
    init_subset: int = 0
    loss_history: list = field(default_factory=list)
    precision_check: dict | None = None
    grad_inf: float = math.nan
    #: share of the fit's CG columns that finished in the policy's low precision (None: no policy)
    low_precision_share: float | None = None
    #: the product precision of the fit's policy (``"float16"`` ...); None without one or when dense
    precision: str | None = None
    #: the evaluation after which the fit dropped its low-precision policy (every column fell back), or None
    low_precision_given_up: int | None = None

    @classmethod
    def from_fit(cls, gp, out: OptimResult, alpha_stats: dict, *, fit_seconds: float,
                 predict_setup_seconds: float, policy=None) -> "FitReport":
        """The report of ``gp``'s fit; ``policy`` is the precision policy its MLL evaluations used."""
        sc, k = gp.scaler_, gp.kernel_
        with torch.no_grad():
            ls = (k.lengthscale.reshape(-1).to(_F64) * sc.x_scale.cpu()).tolist()
            s = float(k.outputscale)
        steps = out.step_seconds
        return cls(kernel=getattr(k, "name", type(k).__name__), method=gp.method_, optimizer=gp.optimizer,
                   n=int(gp.X_train_.shape[0]), d=int(gp.n_features_in_), iterations=out.iterations,
                   evaluations=out.evaluations, converged=out.converged, message=out.message,
                   mll_per_point=-out.loss - math.log(sc.y_scale), lengthscale=ls, outputscale=s * sc.y_scale ** 2,
                   noise=gp.noise_ * sc.y_scale ** 2, mean=gp.mean_ * sc.y_scale + sc.y_mean,
                   cg_stats=dict(out.last_stats), cg_failures=out.cg_failures, alpha_cg=dict(alpha_stats),
                   fit_seconds=fit_seconds, step_seconds=sum(steps) / len(steps) if steps else 0.0,
                   predict_setup_seconds=predict_setup_seconds, resumed_from=out.resumed_from,
                   init_subset=int(gp.init_subset) if gp.init_subset and gp.init_subset < gp.X_train_.shape[0] else 0,
                   loss_history=list(out.losses), precision_check=out.precision_check, grad_inf=out.grad_inf,
                   low_precision_share=(out.low_precision_columns[0] / out.low_precision_columns[1]
                                        if out.low_precision_columns else None),
                   precision=policy.product if policy is not None else None,
                   low_precision_given_up=out.low_precision_given_up)

    def to_dict(self) -> dict:
        """JSON-friendly dict of every field."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        ls = ", ".join(f"{v:.4g}" for v in self.lengthscale)
        cg = self.cg_stats
        if self.method == "iterative":
            solver = (f"CG {cg.get('status', '?')}, iterations max {cg.get('iterations_max', '?')} / mean "
                      f"{cg.get('iterations_mean', float('nan')):.1f}, preconditioner {cg.get('preconditioner')} "
                      f"rank {cg.get('preconditioner_rank')}, {self.cg_failures} step(s) not converged")
            if cg.get("backend"):
                solver += f", kernel products on {cg['backend']}"
            if cg.get("backend_tuning"):
                solver += f" (auto timed {cg['backend_tuning']})"
            if self.low_precision_share is not None:
                solver += f", {self.low_precision_share:.0%} of solves finished in {self.precision or 'low precision'}"
            if self.low_precision_given_up is not None:
                solver += f" (dropped after evaluation {self.low_precision_given_up}: every column fell back)"
        else:
            solver = "dense Cholesky"
        resumed = f" (resumed at iteration {self.resumed_from})" if self.resumed_from else ""
        if self.init_subset:
            resumed += f", started from the optimum on a {self.init_subset}-point subset"
        return "\n".join([
            f"ExactGP fit: {self.kernel} kernel, n={self.n}, d={self.d}, method={self.method}",
            f"  optimizer    {self.optimizer}: {self.iterations} iterations, {self.evaluations} evaluations"
            f"{resumed}, converged={self.converged} ({self.message}), max |grad| {self.grad_inf:.2e}",
            f"  MLL / point  {self.mll_per_point:.5f}" + _check_text(self.precision_check),
            f"  lengthscale  [{ls}]",
            f"  outputscale  {self.outputscale:.5g}   noise {self.noise:.5g}   mean {self.mean:.5g}",
            f"  solver       {solver}",
            f"  time         fit {self.fit_seconds:.2f} s, {self.step_seconds:.3f} s per step, "
            f"predictor setup {self.predict_setup_seconds:.2f} s",
        ])


def _check_text(check: dict | None) -> str:
    if not check:
        return ""
    verdict = "ok" if check["ok"] else "WARNING"
    return f"   (float32-product check: {check['relative']:.1e} relative, {verdict})"
