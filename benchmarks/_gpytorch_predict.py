"""GPyTorch arms of ``predict_variance.py``: the same fitted model predicted by stock GPyTorch and by the
gpscale backend, compared with the dense Cholesky mean and variances.

* ``gpytorch``: stock GPyTorch at its defaults (above ``max_cholesky_size`` its prediction caches are
  linear_operator CG solves at ``eval_cg_tolerance``), what a user gets without gpscale;
* ``gpscale-backend``: ``use_gpscale(model, method="iterative", solve_rtol=rtol)``, whose prediction
  solves stop on the certified energy-norm error and whose covariance is the second-order, symmetric form
  (:mod:`gpscale.integrations.gpytorch_predict`).
"""

from __future__ import annotations

import time
import warnings

GPYTORCH_ARMS = (("gpytorch", None), ("gpscale-backend", 1e-3), ("gpscale-backend", 1e-4))


def _model(Xt, yt, h):
    import gpytorch
    import torch

    class _GP(gpytorch.models.ExactGP):
        def __init__(self, lik):
            super().__init__(Xt, yt, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=Xt.shape[1]))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    lik = gpytorch.likelihoods.GaussianLikelihood().to(Xt.dtype)
    model = _GP(lik).to(Xt.dtype)
    model.covar_module.base_kernel.lengthscale = torch.tensor(h["lengthscale"], dtype=Xt.dtype)
    model.covar_module.outputscale = h["outputscale"]
    lik.noise = h["noise"]
    model.mean_module.constant.data.fill_(h["mean"])
    model.eval()
    lik.eval()
    return model, lik


def covariance_errors(C, exact, noise: float) -> dict:
    """How far a predictive covariance of y is from the dense one, in units of the noise variance:
    asymmetry, the extreme eigenvalues of the (symmetrised) difference (certified: >= 0) and its largest entry."""
    import torch

    D = (C - exact) / noise
    eig = torch.linalg.eigvalsh((D + D.mT) / 2)
    return {"cov_asymmetry_max_over_noise": float((C - C.mT).abs().max() / noise),
            "cov_excess_eig_min_over_noise": float(eig.min()), "cov_excess_eig_max_over_noise": float(eig.max()),
            "cov_entry_error_max_over_noise": float(D.abs().max())}


def gpytorch_arm(Xt, yt, Xs, h, exact_mean, exact_var, kind: str, rtol, exact_cov=None) -> dict:
    """One GPyTorch prediction of ``Xs``: errors against the exact mean / latent variance (and, given the exact
    latent covariance, of the whole covariance: :func:`covariance_errors`), seconds."""
    import torch

    from gpscale.integrations.gpytorch import backend_stats, use_gpscale

    model, lik = _model(Xt, yt, h)
    if kind == "gpscale-backend":
        # one block of columns (the mean cache's and the test points'), so that backend_stats' last solve
        # holds every column's iterations
        use_gpscale(model, method="iterative", solve_rtol=rtol, solve_block=Xs.shape[0] + 1)
    noise = h["noise"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        pred = lik(model(Xs))
        mu, var = pred.mean, pred.variance
        secs = time.perf_counter() - t0
    rel = (var - (exact_var + noise)) / (exact_var + noise)
    std_rel = (var / (exact_var + noise)).sqrt() - 1
    out = {"rule": kind, "rtol": rtol, "seconds": secs,
           "mean_error_max_over_sigma": float((mu - exact_mean).abs().max() / noise ** 0.5),
           "var_y_rel_excess_max": float(rel.max()), "var_y_rel_excess_min": float(rel.min()),
           "std_rel_error_max": float(std_rel.abs().max()),
           "within_rtol": None if rtol is None else bool(((rel >= 0) & (rel <= rtol)).all())}
    if exact_cov is not None:  # not timed: the m x m matrix, which a variance-only prediction never forms
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            C = pred.covariance_matrix
        out.update(covariance_errors(C, exact_cov + noise * torch.eye(len(C), dtype=C.dtype), noise))
    if kind == "gpscale-backend":
        st = backend_stats(model)["last"]["predictive_covariance"]
        out.update(status=st["status"], iterations_max=int(st["iterations_max"]),
                   iterations_mean=float(st["iterations_mean"]))
    return out


def gpytorch_markdown(datasets) -> list[str]:
    """Table rows of the GPyTorch arms (empty if none ran)."""
    rows = [(ds, a) for ds in datasets for a in ds["arms"] if a["rule"] in dict(GPYTORCH_ARMS)]
    if not rows:
        return []
    lines = ["", "The same fitted model in GPyTorch: stock GPyTorch at its defaults and `use_gpscale(model, "
             "method=\"iterative\", solve_rtol=rtol)` (certified prediction solves).  *mean err*: the largest "
             "error of the predictive mean in units of the noise standard deviation; *excess min / max*: of the "
             "predictive variance of y relative to the dense one (certified: within [0, rtol]); *covariance*: the "
             "whole m x m predictive covariance against the dense one, in units of σ²: its asymmetry, the smallest "
             "eigenvalue of the difference (certified: >= 0, the covariance is too large by a PSD matrix) and the "
             "largest entry of the difference (certified: <= rtol).", "",
             "| data | arm | solve_rtol | CG its max / mean | seconds | mean err / σ | excess min / max | "
             "std err max | in [0, rtol] | covariance: asym / eig min / entry max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ds, a in rows:
        its = f"{a['iterations_max']} / {a['iterations_mean']:.1f}" if "iterations_max" in a else "–"
        held = "–" if a["within_rtol"] is None else ("yes" if a["within_rtol"] else "**no**")
        rtol = "default" if a["rtol"] is None else f"{a['rtol']:.0e}"
        lines.append(f"| {ds['dataset']} | {a['rule']} | {rtol} | "
                     f"{its} | {a['seconds']:.2f} | {a['mean_error_max_over_sigma']:.1e} | "
                     f"{a['var_y_rel_excess_min']:.1e} / {a['var_y_rel_excess_max']:.1e} | "
                     f"{a['std_rel_error_max']:.1e} | {held} | {_covariance_cell(a)} |")
    return lines


def _covariance_cell(a: dict) -> str:
    if "cov_asymmetry_max_over_noise" not in a:
        return "–"
    return (f"{a['cov_asymmetry_max_over_noise']:.1e} / {a['cov_excess_eig_min_over_noise']:.1e} / "
            f"{a['cov_entry_error_max_over_noise']:.1e}")
