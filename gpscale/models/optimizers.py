"""The optimisers of :class:`~gpscale.models.ExactGP`: SciPy's L-BFGS-B and ``torch.optim.Adam``.

Both drive a :class:`~gpscale.models.fit.FitSession` (objective, progress, checkpoints) and resume from
a checkpoint: L-BFGS-B by replaying its recorded evaluations (:class:`_History`; SciPy's optimiser has no
state to save), Adam from its state dict.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize

from .fit import FitSession, OptimResult

_F64 = torch.float64

class _History:
    """L-BFGS-B evaluations ``(x, f, g, stats)``, replayable on resume (see :mod:`.checkpoint`)."""

    def __init__(self, state: dict | None):
        h = (state or {}).get("history") or {}
        self.x = [row.numpy().copy() for row in h.get("x", [])]
        self.f = [float(v) for v in h.get("f", [])]
        self.g = [row.numpy().copy() for row in h.get("g", [])]
        self.stats = [dict(s) for s in h.get("stats", [{}] * len(self.x))]
        self.pos = 0
        self.replaying = bool(self.x)

    def replay(self, x: np.ndarray):
        """The recorded ``(f, g, stats)`` when ``x`` is the next recorded point, else ``None``."""
        if self.replaying and self.pos < len(self.x) and np.array_equal(x, self.x[self.pos]):
            self.pos += 1
            return self.f[self.pos - 1], self.g[self.pos - 1].copy(), self.stats[self.pos - 1]
        if self.replaying:
            # Diverged (or ran past the record): forget the unreplayed tail, compute from here on.
            del self.x[self.pos:], self.f[self.pos:], self.g[self.pos:], self.stats[self.pos:]
            self.replaying = False
        return None

    def append(self, x, f, g, stats) -> None:
        self.x.append(x.copy())
        self.f.append(float(f))
        self.g.append(g.copy())
        self.stats.append(stats)

    def to_state(self) -> dict:
        if not self.x:
            return {"x": torch.zeros(0), "f": torch.zeros(0), "g": torch.zeros(0), "stats": []}
        return {"x": torch.from_numpy(np.stack(self.x)), "f": torch.tensor(self.f, dtype=_F64),
                "g": torch.from_numpy(np.stack(self.g)), "stats": self.stats}

    def stats_at(self, x) -> dict | None:
        for xi, si in zip(reversed(self.x), reversed(self.stats)):
            if np.array_equal(xi, x):
                return si
        return None


def run_lbfgs(session: FitSession, theta0: torch.Tensor, *, max_iter: int, tol: float, seed: int,
              state: dict | None = None) -> OptimResult:
    """Minimise with SciPy's L-BFGS-B on the unconstrained vector, with the same probe seed every step.

    A fixed seed makes the stochastic (iterative) objective a deterministic function of ``theta``,
    which the line search needs.  Failed evaluations return a value above the best seen so far with a
    zero gradient, so the line search backtracks instead of stopping.
    """
    hist = _History(state)
    if state is not None:
        session.restore(state)
    x0 = theta0.numpy().astype(np.float64)

    def fun(x):
        hit = hist.replay(x)
        if hit is not None:
            session.evaluations += 1
            session.last_stats = hit[2]
            return hit[0], hit[1]
        f, g, stats = session.evaluate(x, seed)
        if g is None:
            if not math.isfinite(session.best_value):
                raise RuntimeError(f"the objective cannot be evaluated at the initial hyperparameters: "
                                   f"{stats.get('error', 'non-finite value')}")
            f, g = session.best_value + 1.0 + abs(session.best_value), np.zeros_like(x)
        hist.append(x, f, g, stats)
        session.save(x, history=hist.to_state())
        return f, g

    def callback(intermediate_result):
        session.end_iteration(intermediate_result.fun)
        if not hist.replaying:
            session.save(intermediate_result.x, history=hist.to_state())

    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=session.objective.params.bounds(),
                   callback=callback, options={"maxiter": int(max_iter), "ftol": float(tol), "gtol": 1e-5})
    stats = hist.stats_at(res.x)
    if stats is not None:
        session.last_stats = stats
    message = str(res.message)
    iterative = session.objective.mll_kwargs.get("method") == "iterative"
    if iterative and message.startswith("CONVERGENCE: REL"):
        # Measured (docs/benchmarks.md): on the stochastic objective this stop comes where the value
        # estimate's resolution hides the decrease, not at a stationary point; the gradient says which.
        message = ("the estimated loss stopped decreasing by more than tol; with the iterative method that "
                   "can be the estimate's resolution rather than the optimum (see max |grad|; optimizer="
                   "'adam' reaches the same point whatever the probe seed)")
    elif message.startswith("ABNORMAL"):
        # The iterative objective's gradient is an unbiased estimate, not the exact derivative of the
        # estimated value, so near the optimum the line search cannot find a consistent decrease.
        message = ("line search failed (ABNORMAL): the optimum was reached to the accuracy of the objective "
                   "and gradient estimates")
    if not hist.replaying:
        session.save(res.x, finished=res.status != 1, message=message, history=hist.to_state())
    return session.result(res.x, res.fun, res.success, message, grad=res.jac)


def run_adam(session: FitSession, theta0: torch.Tensor, *, max_iter: int, lr: float, seed: int,
             gtol: float = 1e-5, state: dict | None = None) -> OptimResult:
    """Minimise with ``torch.optim.Adam``; step ``k`` uses probe seed ``seed + k``.

    Fresh probes every step average the estimator's noise out over the run (Adam tolerates a
    stochastic objective).  The state dict of the optimiser is checkpointed after every step.
    """
    params = session.objective.params
    params.set_vector(theta0)
    opt = torch.optim.Adam(params.parameters(), lr=lr)
    start = 0
    if state is not None:
        session.restore(state)
        params.set_vector(state["theta"])
        opt.load_state_dict(state["adam_state"])
        start = int(state["iteration"])
        session.iteration, session.losses = start, list(state.get("losses", []))
        session.pbar.update(start)
    loss, message, converged, g = math.nan, "reached max_iter", False, None
    for step in range(start, max_iter):
        theta = params.vector()
        loss, g, stats = session.evaluate(theta, seed + step)
        if g is None:
            raise RuntimeError(f"the objective became non-finite at Adam step {step} "
                               f"({stats.get('error', 'NaN/Inf')}); lower lr or use dtype=torch.float64")
        if np.abs(g).max() < gtol:
            message, converged = f"gradient below gtol={gtol:g}", True
            break
        opt.step()  # value_and_grad left the gradient in params' .grad
        session.end_iteration(loss)
        session.save(params.vector(), adam_state=opt.state_dict())
    theta = params.vector()
    if math.isnan(loss) and session.losses:
        loss = session.losses[-1]
    session.save(theta, finished=converged or start >= max_iter, message=message, adam_state=opt.state_dict())
    return session.result(theta, loss, converged, message, grad=g)
