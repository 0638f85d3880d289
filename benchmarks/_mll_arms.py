"""Worker-side arms of ``bench_mll.py``: one MLL forward + backward per library, and the exact reference.

Each ``run_*`` takes ``(X, y, spec)`` in the child process and returns a JSON-able record
(times, value, gradient, CG statistics); ``bench_mll.worker_main`` wraps them.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

def _constrained_grad(raw, transform):
    """d/d(value) from d/d(raw) for ``value = transform(raw)`` (elementwise, monotone)."""
    if raw.grad is None:
        return None
    r = raw.detach().clone().requires_grad_(True)
    transform(r).sum().backward()
    return (raw.grad / r.grad).reshape(-1)[0].item()


def _capture_warnings():
    cm = warnings.catch_warnings(record=True)
    rec = cm.__enter__()
    warnings.simplefilter("always")
    return cm, rec


def _warning_summary(rec) -> list[str]:
    seen = []
    for w in rec:
        msg = f"{w.category.__name__}: {str(w.message)[:300]}"
        if msg not in seen:
            seen.append(msg)
    return seen[:10]


def run_gpscale(X, y, spec) -> dict:
    """gpscale arm: ``mll_estimate(method="iterative")`` then ``value.backward()``."""
    import torch

    import gpscale
    from gpscale.kernels import make_kernel, to_positive

    kernel = make_kernel(spec["kernel"], lengthscale=spec["lengthscale"], outputscale=spec["outputscale"])
    kernel = kernel.to(X.dtype)
    noise = torch.tensor(spec["noise"], dtype=X.dtype, requires_grad=True)
    precond = gpscale.precond.PivotedCholesky(rank=spec["rank"])
    budget = spec.get("gpscale_memory_budget_mb")
    budget = None if budget is None else int(budget * (1 << 20))
    cm, rec = _capture_warnings()
    try:
        t0 = time.perf_counter()
        r = gpscale.mll_estimate(X, y, kernel, noise=noise, mean=0.0, method="iterative", rtol=spec["rtol"],
                                 max_iter=spec["max_iter"], num_probes=spec["num_probes"], preconditioner=precond,
                                 seed=spec["seed"], memory_budget=budget)
        t1 = time.perf_counter()
        r.value.backward()
        t2 = time.perf_counter()
    finally:
        cm.__exit__(None, None, None)
    n = X.shape[0]
    stats = {k: v for k, v in r.stats.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {
        "forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
        "mll": float(r.value.detach()), "mll_per_point": float(r.value.detach()) / n,
        "logdet": stats.get("logdet"), "quad": stats.get("quad"),
        "grad": {"lengthscale": _constrained_grad(kernel.raw_lengthscale, to_positive),
                 "outputscale": _constrained_grad(kernel.raw_outputscale, to_positive),
                 "noise": float(noise.grad)},
        "cg_iterations": stats.get("iterations_max"), "cg_iterations_mean": stats.get("iterations_mean"),
        "cg_status": stats.get("status"), "stats": stats, "warnings": _warning_summary(rec),
    }


def gpytorch_settings(spec) -> list:
    """The GPyTorch / linear_operator settings that make GPyTorch run the same BBMM algorithm.

    Notes on each (linear_operator 0.6, gpytorch 1.15):

    * ``max_cholesky_size(0)``: otherwise n <= 800 silently uses a dense Cholesky.
    * ``cg_tolerance(rtol)``: the library default is 1 (!); the stopping test is on the *mean* over
      columns of the relative residual norm, and CG never stops before 11 iterations.
    * ``num_trace_samples(t)``: probes for the log-det and trace estimates.
    * ``max_preconditioner_size(k)`` + ``min_preconditioning_size(0)``: without the latter GPyTorch
      skips the preconditioner for n < 2000.  ``preconditioner_tolerance(1e-6)`` matches gpscale's
      pivoted-Cholesky stopping tolerance (GPyTorch's default is 1e-3).
    * ``max_lanczos_quadrature_iterations`` (default 20) caps the Lanczos tridiagonal used for the
      log-det *and* makes CG run at least that many iterations when log-dets are requested; raising
      it to ``max_cg_iterations`` would force every solve to run to the cap, so it stays at 20.
    * ``fast_computations(log_prob=True, solves=True)``, ``skip_logdet_forward(False)``,
      ``deterministic_probes(False)``, ``terminate_cg_by_size(False)``: the defaults, set explicitly.
    """
    import gpytorch
    import linear_operator

    s = gpytorch.settings
    return [
        s.max_cholesky_size(0),
        s.cg_tolerance(spec["rtol"]),
        s.num_trace_samples(spec["num_probes"]),
        s.max_preconditioner_size(spec["rank"]),
        linear_operator.settings.min_preconditioning_size(0),
        linear_operator.settings.preconditioner_tolerance(1e-6),
        s.max_cg_iterations(spec["max_iter"]),
        s.max_lanczos_quadrature_iterations(spec["lanczos_iters"]),
        s.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True),
        s.skip_logdet_forward(False),
        s.deterministic_probes(False),
        s.terminate_cg_by_size(False),
    ]


@contextlib.contextmanager
def _instrument_gpytorch():
    """Count CG iterations and capture the (inv_quad, logdet) terms; pass-through wrappers only."""
    import torch
    import linear_operator.utils as lo_utils
    from linear_operator.operators._linear_operator import LinearOperator

    calls: list[dict] = []
    terms: dict = {}
    orig_cg, orig_iql = lo_utils.linear_cg, LinearOperator.inv_quad_logdet

    def linear_cg(matmul_closure, rhs, *args, **kwargs):
        f = matmul_closure.matmul if torch.is_tensor(matmul_closure) else matmul_closure
        count = [0]

        def counted(v):
            count[0] += 1
            return f(v)

        out = orig_cg(counted, rhs, *args, **kwargs)
        calls.append({"columns": int(rhs.shape[-1]), "matmuls": count[0],
                      "iterations": max(count[0] - 1, 0), "n_tridiag": int(kwargs.get("n_tridiag", 0) or 0)})
        return out

    def inv_quad_logdet(self, *args, **kwargs):
        res = orig_iql(self, *args, **kwargs)
        if "logdet" not in terms and res[1] is not None:
            terms["quad"] = float(res[0].detach().sum()) if res[0] is not None else None
            terms["logdet"] = float(res[1].detach().sum())
        return res

    lo_utils.linear_cg, LinearOperator.inv_quad_logdet = linear_cg, inv_quad_logdet
    try:
        yield calls, terms
    finally:
        lo_utils.linear_cg, LinearOperator.inv_quad_logdet = orig_cg, orig_iql


def run_gpytorch(X, y, spec) -> dict:
    """GPyTorch arm: a standard ExactGP and ``loss = -ExactMarginalLogLikelihood(...) * n``; ``loss.backward()``."""
    import torch
    import gpytorch

    class ExactGPModel(gpytorch.models.ExactGP):
        def __init__(self, train_x, train_y, likelihood, base_kernel):
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    name = spec["kernel"]
    base = (gpytorch.kernels.RBFKernel() if name == "rbf"
            else gpytorch.kernels.MaternKernel(nu={"matern32": 1.5, "matern52": 2.5}[name]))
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood, base).to(X.dtype)
    likelihood = likelihood.to(X.dtype)
    model.covar_module.base_kernel.lengthscale = spec["lengthscale"]
    model.covar_module.outputscale = spec["outputscale"]
    likelihood.noise = spec["noise"]
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    n = X.shape[0]
    cm, rec = _capture_warnings()
    try:
        with contextlib.ExitStack() as stack:
            for ctx in gpytorch_settings(spec):
                stack.enter_context(ctx)
            calls, terms = stack.enter_context(_instrument_gpytorch())
            torch.manual_seed(spec["seed"])
            t0 = time.perf_counter()
            loss = -mll(model(X), y) * n
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
    finally:
        cm.__exit__(None, None, None)
    ck = model.covar_module
    value = -float(loss.detach())
    # loss = -log p, so d log p / d theta = -grad.
    grad = {"lengthscale": _constrained_grad(ck.base_kernel.raw_lengthscale,
                                             ck.base_kernel.raw_lengthscale_constraint.transform),
            "outputscale": _constrained_grad(ck.raw_outputscale, ck.raw_outputscale_constraint.transform),
            "noise": _constrained_grad(likelihood.noise_covar.raw_noise,
                                       likelihood.noise_covar.raw_noise_constraint.transform)}
    grad = {k: (None if v is None else -v) for k, v in grad.items()}
    main = max(calls, key=lambda c: c["columns"] * c["matmuls"]) if calls else {}
    return {
        "forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
        "mll": value, "mll_per_point": value / n, "logdet": terms.get("logdet"), "quad": terms.get("quad"),
        "grad": grad, "cg_iterations": main.get("iterations"), "cg_status": None, "cg_calls": calls,
        "stats": {"settings": {type(c).__name__: getattr(c, "_instance_value", getattr(c, "state", None))
                               for c in gpytorch_settings(spec) if not isinstance(c, gpytorch.settings.fast_computations)}},
        "warnings": _warning_summary(rec),
    }


def _profile_and_derivative(name: str, q):
    """Independent (not gpscale's) ``f(q)`` and ``f'(q)`` with ``q = ||x - z||^2 / ell^2``."""
    import torch

    if name == "rbf":
        f = torch.exp(-0.5 * q)
        return f, -0.5 * f
    r = q.sqrt()
    if name == "matern32":
        a = math.sqrt(3.0) * r
        e = torch.exp(-a)
        return (1 + a) * e, -1.5 * e
    if name == "matern52":
        a = math.sqrt(5.0) * r
        e = torch.exp(-a)
        return (1 + a + (5.0 / 3.0) * q) * e, -(5.0 / 6.0) * (1 + a) * e
    raise ValueError(name)


def run_reference(X, y, spec) -> dict:
    """Exact float64 MLL, log-det and gradient through one dense Cholesky (independent of gpscale).

    ``K = s f(D^2 / ell^2) + sigma^2 I``; with ``alpha = K^{-1} y`` and ``W = alpha alpha^T - K^{-1}``,
    ``d log p / d theta = 1/2 sum(W * dK/dtheta)``: ``dK/ds = f``, ``dK/dsigma^2 = I``,
    ``dK/d ell = s f'(q) (-2 q / ell)``.  About five n-by-n float64 buffers.
    """
    import torch

    X = X.to(torch.float64)
    y = y.to(torch.float64)
    n = X.shape[0]
    ell, s, sig2 = float(spec["lengthscale"]), float(spec["outputscale"]), float(spec["noise"])
    t0 = time.perf_counter()
    Xc = (X - X.mean(0)) / ell
    sq = Xc.pow(2).sum(1)
    Q = torch.addmm(sq[None, :], Xc, Xc.T, alpha=-2.0).add_(sq[:, None]).clamp_min_(0.0)
    Q.fill_diagonal_(0.0)
    F, dF = _profile_and_derivative(spec["kernel"], Q)
    K = F.mul(s)
    K.diagonal().add_(sig2)
    L, info = torch.linalg.cholesky_ex(K)
    del K
    if int(info) != 0:
        raise RuntimeError(f"reference Cholesky failed at column {int(info)}")
    logdet = 2.0 * float(L.diagonal().log().sum())
    alpha = torch.cholesky_solve(y[:, None], L)[:, 0]
    quad = float(y @ alpha)
    value = -0.5 * quad - 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)
    t1 = time.perf_counter()
    # K^{-1} = L^{-T} L^{-1}; torch.cholesky_inverse is ~6x slower than this on CPU (torch 2.13).
    Linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    del L
    W = torch.mm(Linv.T, Linv).neg_()                     # -K^{-1}
    del Linv
    W.addr_(alpha, alpha)                                 # alpha alpha^T - K^{-1}
    g_noise = 0.5 * float(W.diagonal().sum())
    g_s = 0.5 * float((W * F).sum())
    del F
    dF.mul_(Q).mul_(-2.0 * s / ell)                       # dK/d ell
    g_ell = 0.5 * float((W * dF).sum())
    t2 = time.perf_counter()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
            "mll": value, "mll_per_point": value / n, "logdet": logdet, "quad": quad,
            "grad": {"lengthscale": g_ell, "outputscale": g_s, "noise": g_noise},
            "cg_iterations": None, "cg_status": None, "stats": {"dtype": "float64", "method": "dense Cholesky"},
            "warnings": []}


def run_reference_gpscale(X, y, spec) -> dict:
    """Alternative reference: gpscale's own ``method="cholesky"`` path in float64 with autograd."""
    import torch

    import gpscale
    from gpscale.kernels import make_kernel, to_positive

    X, y = X.to(torch.float64), y.to(torch.float64)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the kernel stores its raw parameters in the default dtype
    try:
        kernel = make_kernel(spec["kernel"], lengthscale=spec["lengthscale"], outputscale=spec["outputscale"])
    finally:
        torch.set_default_dtype(prev)
    noise = torch.tensor(spec["noise"], dtype=torch.float64, requires_grad=True)
    t0 = time.perf_counter()
    v = gpscale.marginal_log_likelihood(X, y, kernel, noise=noise, mean=0.0, method="cholesky")
    t1 = time.perf_counter()
    v.backward()
    t2 = time.perf_counter()
    with torch.no_grad():
        K = kernel(X)
        K.diagonal().add_(spec["noise"])
        L = torch.linalg.cholesky(K)
        logdet = 2.0 * float(L.diagonal().log().sum())
    n = X.shape[0]
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
            "mll": float(v.detach()), "mll_per_point": float(v.detach()) / n, "logdet": logdet,
            "quad": -2.0 * float(v.detach()) - logdet - n * math.log(2 * math.pi),
            "grad": {"lengthscale": _constrained_grad(kernel.raw_lengthscale, to_positive),
                     "outputscale": _constrained_grad(kernel.raw_outputscale, to_positive),
                     "noise": float(noise.grad)},
            "cg_iterations": None, "cg_status": None,
            "stats": {"dtype": "float64", "method": "gpscale cholesky + autograd"}, "warnings": []}


ARMS = {"gpscale": run_gpscale, "gpytorch": run_gpytorch}
