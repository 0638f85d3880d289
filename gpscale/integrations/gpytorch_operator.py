"""A ``linear_operator.LinearOperator`` whose products, solves and log-dets run on gpscale.

:class:`GpscaleKernelLinearOperator` stands for :math:`s\\,K_f(X_1, X_2) + \\sigma^2 I` where
:math:`K_f` is an RBF or Matérn profile of the scaled distance.  Its *representation* is the five
tensors ``(x1, x2, lengthscale, outputscale, noise)`` exactly as GPyTorch hands them over
(constrained values that still carry GPyTorch's autograd graph to the raw parameters), so
linear_operator can rebuild, detach and differentiate it like any of its own operators.

Which hooks are overridden and why:

* ``inv_quad_logdet`` -- the whole training loss: one gpscale CG call on ``[probes, y - m]``
  (preconditioned SLQ, Wenger et al. 2022) and a hand-written backward that reuses those solves
  (:func:`gpscale.operators.bilinear_derivative`).  Below the Cholesky crossover a dense Cholesky on
  the autograd-capable reference kernel.  linear_operator's own mBCG path is never entered.
* ``solve`` -- prediction caches (``mean_cache``): gpscale CG with its preconditioner, each column
  stopped once its energy-norm error is certified ``<= solve_rtol * σ²`` (Gauss-Radau bound); columns
  chunked to bound memory, a custom backward.  The predictive covariance does not go through ``solve``:
  :mod:`gpscale.integrations.gpytorch_predict` forms it in a second-order, symmetric form.
* ``_matmul`` / ``_bilinear_derivative`` -- tiled products without storing ``K`` and a tiled
  derivative pass instead of autograd through the product.
* ``__add__`` -- absorbs the likelihood's homoscedastic ``ConstantDiagLinearOperator`` so that
  ``K + σ²I`` stays this class (a stock ``AddedDiagLinearOperator`` would route to linear_operator's
  CG and its preconditioner).
"""

from __future__ import annotations

import warnings

import torch
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DiagLinearOperator,
    LinearOperator,
)

from .._validation import check_finite
from ..kernels import make_kernel
from ..likelihood.cholesky import CholeskyInvQuadLogdet, cholesky_factor
from ..logdet.slq import build_preconditioner, probe_solve
from ..logdet.trace import derivative_width, trace_pairs
from ..operators import CrossKernelOperator, KernelOperator
from ..operators.derivatives import bilinear_derivative
from ..precision import LOW_PRECISION_GIVE_UP, FallbackStreak, PrecisionWarning
from ..solvers.cg import CGWarning, ConjugateGradients
from ..solvers.error_bounds import energy_stopping


class GPyTorchFallbackWarning(UserWarning):
    """gpscale hands a computation back to stock GPyTorch (unsupported model feature)."""


def _gpscale_kernel(kind: str, ls: torch.Tensor, s: torch.Tensor):
    """A gpscale kernel holding a detached snapshot of GPyTorch's constrained hyperparameters."""
    ls = ls.detach().reshape(-1)
    ls = ls.reshape(()) if ls.numel() == 1 else ls
    return make_kernel(kind, lengthscale=ls.to(torch.float64), outputscale=s.detach().reshape(()).to(torch.float64))


def _dense(kind: str, x1, x2, ls, s):
    """Autograd-capable dense ``s K_f(x1, x2)`` (the kernels' reference formula, exact distances)."""
    return _PROFILES[kind].evaluate(x1, x2, ls.reshape(-1).to(x1.dtype), s.reshape(()).to(x1.dtype))


_PROFILES = {k: make_kernel(k) for k in ("rbf", "matern12", "matern32", "matern52")}


def _stats_of(res) -> dict:
    s = res.summary()
    return {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool)) or v is None}


class _InvQuadLogdet(torch.autograd.Function):
    """``(rhsᵀ K̂⁻¹ rhs, log|K̂|)`` by one CG call on ``[probes, rhs]``; backward reuses the solves."""

    @staticmethod
    def forward(ctx, rhs, ls, s, noise, cfg):
        op, opts, state = cfg
        t = opts.num_probes
        gen = None if opts.seed is None else torch.Generator(device=rhs.device).manual_seed(int(opts.seed))
        policy = state.training_precision(opts)
        solver = ConjugateGradients(rtol=opts.rtol, max_iter=opts.max_iter, precision=policy)
        ps = probe_solve(op, rhs if rhs.shape[1] else None, t, solver, opts.preconditioner, gen)
        alpha = ps.cg.x[:, t:]
        state.record("inv_quad_logdet", ps.cg, policy=policy, logdet_stderr=ps.logdet_stderr)
        ctx.op, ctx.alpha, ctx.ps = op, alpha, ps
        ctx.shapes = [(v.shape, v.dtype) for v in (ls, s, noise)]
        ctx.kernel_trace = rhs.shape[0] * float(s)  # stationary: k(x, x) = s
        quad = (rhs * alpha).sum(0)
        return quad, ps.logdet.to(rhs.dtype)

    @staticmethod
    def backward(ctx, g_quad, g_logdet):
        op, alpha, ps = ctx.op, ctx.alpha, ctx.ps
        # d(quad_c)/dθ = -α_cᵀ ∂K α_c ;  d(logdet)/dθ = tr(K⁻¹ ∂K), estimated from the probe solves
        # with the preconditioner as control variate (gpscale.logdet.trace).
        At, Bt, const = trace_pairs(ps, g_logdet, kernel_trace=ctx.kernel_trace,
                                    derivative_width=derivative_width(op.lengthscale, op.X.shape[1]))
        A = torch.cat([alpha, At], dim=1)
        B = torch.cat([-alpha * g_quad, Bt], dim=1)
        g = bilinear_derivative(op, A, B)
        g = {k: v + const[k] for k, v in g.items()}
        g_rhs = 2.0 * alpha * g_quad
        return (g_rhs, *_shaped(g, ctx.shapes), None)


class _Solve(torch.autograd.Function):
    """``K̂⁻¹ B`` by gpscale CG; backward: one more solve for the right-hand side's gradient."""

    @staticmethod
    def forward(ctx, rhs, ls, s, noise, cfg):
        op, opts, state = cfg
        P = build_preconditioner(op, opts.preconditioner)
        X = _chunked_cg(op, P, rhs, opts, state, "solve", _prediction_solver(op, P, opts))
        ctx.op, ctx.P, ctx.X, ctx.cfg = op, P, X, cfg
        ctx.shapes = [(v.shape, v.dtype) for v in (ls, s, noise)]
        return X

    @staticmethod
    def backward(ctx, G):
        op, X, (_, opts, state) = ctx.op, ctx.X, ctx.cfg
        solver = ConjugateGradients(rtol=opts.solve_rtol, max_iter=opts.max_iter)
        Y = _chunked_cg(op, ctx.P, G, opts, state, "solve_backward", solver)  # K̂ symmetric: K̂⁻ᵀ G = K̂⁻¹ G
        if any(ctx.needs_input_grad[1:4]):
            g = bilinear_derivative(op, Y, -X)  # d(K̂⁻¹B) = -K̂⁻¹ (∂K̂) K̂⁻¹ B
            return (Y, *_shaped(g, ctx.shapes), None)
        return Y, None, None, None, None


def _shaped(g: dict, shapes) -> tuple:
    """gpscale's gradient dict reshaped to GPyTorch's tensor shapes (e.g. ``(1, d)`` lengthscales)."""
    return tuple(g[k].reshape(sh).to(dt) for k, (sh, dt) in zip(("lengthscale", "outputscale", "noise"), shapes))


def _prediction_solver(op, P, opts) -> ConjugateGradients:
    """CG for the prediction solves: each column's squared energy-norm error certified ``<= solve_rtol * σ²``.

    Why not a relative residual: the predictive covariance (:mod:`gpscale.integrations.gpytorch_predict`)
    is off by exactly those energy-norm errors, which a residual test does not bound (at ``solve_rtol =
    1e-4`` it left standard deviations up to 0.87 % off on kin40k, n = 4000, some variances 1.7 % too
    small; docs/benchmarks.md), and the mean by at most ``sqrt(s * solve_rtol) * σ`` (Cauchy-Schwarz).
    ``op`` is a :class:`~gpscale.operators.KernelOperator`, whose noise is > 0 by construction.
    """
    return ConjugateGradients(max_iter=opts.max_iter, **energy_stopping(P, float(op.noise), opts.solve_rtol))


def _chunked_cg(op, P, B, opts, state, what: str, solver: ConjugateGradients) -> torch.Tensor:
    """Solve in blocks of ``opts.solve_block`` columns (CG state is ``5 n`` numbers per column)."""
    out = torch.empty_like(B)
    for c0 in range(0, B.shape[1], opts.solve_block):
        c1 = min(B.shape[1], c0 + opts.solve_block)
        res = solver(op, B[:, c0:c1], preconditioner=P)
        state.record(what, res)
        out[:, c0:c1] = res.x
    return out


class BackendState:
    """Mutable per-model record of what the backend did (the options object itself is frozen)."""

    def __init__(self):
        self.last: dict = {}
        self.counts: dict = {}
        self._warned: set = set()
        self.fell_back = FallbackStreak()
        #: the training-loss call after which the low-precision policy was dropped, or None
        self.low_precision_dropped_at: int | None = None

    def training_precision(self, opts):
        """The policy for the training loss's solve: the options', until it has only cost time."""
        return opts.precision if self.low_precision_dropped_at is None else None

    def record(self, what: str, res, policy=None, **extra) -> None:
        s = _stats_of(res)
        s.update(extra)
        self.last[what] = s
        self.counts[what] = self.counts.get(what, 0) + 1
        if what == "inv_quad_logdet" and self.low_precision_dropped_at is None:
            self._watch_low_precision(s, policy)
        if not res.converged:
            warnings.warn(f"gpscale backend ({what}): CG ended with status {res.status.name} "
                          f"(max relative residual {s['relative_residual_max']:.2e}); {res.message}",
                          CGWarning, stacklevel=4)

    def _watch_low_precision(self, s: dict, policy) -> None:
        # as ExactGP.fit does (gpscale.precision.FallbackStreak): stop paying for 16 bits that never finish
        if self.fell_back.update(policy, s):
            self.low_precision_dropped_at = self.counts["inv_quad_logdet"]
            warnings.warn(f"gpscale backend: every CG column of the last {LOW_PRECISION_GIVE_UP} training-loss solves "
                          f"fell back from {policy.product} to {policy.fallback_product}; the following solves "
                          "run without the precision option (the rounded kernel is too far from K + noise I at "
                          "this n and noise; docs/precision.md). backend_stats(model) records where.",
                          PrecisionWarning, stacklevel=4)

    def fallback(self, reason: str) -> None:
        """Warn once per reason that a computation runs on stock GPyTorch."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"gpscale backend: {reason}; this computation runs on stock GPyTorch instead "
                          "(correct, but without gpscale's memory and speed).", GPyTorchFallbackWarning,
                          stacklevel=4)


def _same_index(a, b) -> bool:
    if isinstance(a, slice) and isinstance(b, slice):
        return a == b
    return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool((a == b).all())


class GpscaleKernelLinearOperator(LinearOperator):
    """:math:`s K_f(x_1, x_2) + \\sigma^2 I` (noise only on the symmetric operator), computed by gpscale.

    Parameters
    ----------
    x1 : (n, d) tensor
    x2 : (m, d) tensor
        The same tensor as ``x1`` for the symmetric training operator.
    lengthscale : (1, 1) or (1, d) tensor
    outputscale : 0-d tensor
    noise : 0-d tensor
        Zero unless the likelihood's homoscedastic noise was absorbed.
    kind : {"rbf", "matern12", "matern32", "matern52"}
    options : BackendOptions
    state : BackendState
    symmetric : bool
        ``x1`` and ``x2`` are the same points (the operator is square and symmetric).
    """

    def __init__(self, x1, x2, lengthscale, outputscale, noise, *, kind, options, state, symmetric):
        super().__init__(x1, x2, lengthscale, outputscale, noise, kind=kind, options=options, state=state,
                         symmetric=symmetric)
        self.x1, self.x2 = x1, x2
        self.lengthscale, self.outputscale, self.noise = lengthscale, outputscale, noise
        self.kind, self.options, self.state, self.symmetric = kind, options, state, symmetric

    # ----------------------------------------------------------------------------------- helpers
    def _with(self, **changes) -> GpscaleKernelLinearOperator:
        kw = dict(x1=self.x1, x2=self.x2, lengthscale=self.lengthscale, outputscale=self.outputscale,
                  noise=self.noise, kind=self.kind, options=self.options, state=self.state,
                  symmetric=self.symmetric)
        kw.update(changes)
        return GpscaleKernelLinearOperator(**kw)

    def _gpscale_op(self):
        """A gpscale operator over a detached snapshot of the hyperparameters."""
        k = _gpscale_kernel(self.kind, self.lengthscale, self.outputscale)
        kw = {"memory_budget": self.options.memory_budget, "backend": self.options.product_backend}
        x1 = self.x1.detach()
        if self.symmetric:
            return KernelOperator(x1, k, noise=self.noise.detach().reshape(()).to(x1.dtype), **kw)
        return CrossKernelOperator(x1, self.x2.detach(), k, **kw)

    def _use_cholesky(self) -> bool:
        o = self.options
        return o.method == "cholesky" or (o.method == "auto" and self.x1.shape[-2] <= o.cholesky_crossover)

    # ------------------------------------------------------------------------- required hooks
    def _size(self) -> torch.Size:
        return torch.Size([self.x1.shape[-2], self.x2.shape[-2]])

    def _transpose_nonbatch(self) -> GpscaleKernelLinearOperator:
        return self if self.symmetric else self._with(x1=self.x2, x2=self.x1)

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        vec = rhs.dim() == 1
        if rhs.dim() > 2:
            return torch.stack([self._matmul(r) for r in rhs.reshape(-1, *rhs.shape[-2:])]).reshape(
                *rhs.shape[:-2], self.shape[0], rhs.shape[-1])
        out = self._gpscale_op().matmul(rhs[:, None] if vec else rhs)
        return out[:, 0] if vec else out

    def _bilinear_derivative(self, left_vecs, right_vecs):
        """Gradients of ``Σ left ∘ (K right)`` w.r.t. the representation, without autograd through K."""
        L, R = left_vecs.reshape(self.shape[0], -1), right_vecs.reshape(self.shape[1], -1)
        if self.symmetric:
            g = bilinear_derivative(self._gpscale_op(), L, R)
            grads = [g["lengthscale"], g["outputscale"], g["noise"]]
        else:
            grads = self._cross_bilinear(L, R)
        ref = (self.lengthscale, self.outputscale, self.noise)
        return (None, None, *[None if v is None else v.reshape(r.shape).to(r.dtype) for v, r in zip(grads, ref)])

    def _cross_bilinear(self, L, R, block: int = 1024):
        """Rectangular case (predictions only): autograd over row blocks of the reference kernel."""
        ls = self.lengthscale.detach().requires_grad_(True)
        s = self.outputscale.detach().requires_grad_(True)
        g_ls, g_s = torch.zeros_like(ls), torch.zeros_like(s)
        for i0 in range(0, L.shape[0], block):
            with torch.enable_grad():
                K = _dense(self.kind, self.x1[i0:i0 + block].detach(), self.x2.detach(), ls, s)
                a, b = torch.autograd.grad((L[i0:i0 + block] * (K @ R)).sum(), (ls, s))
            g_ls, g_s = g_ls + a, g_s + b
        return [g_ls, g_s, None]

    def _getitem(self, row_index, col_index, *batch_indices):
        if batch_indices:
            return super()._getitem(row_index, col_index, *batch_indices)
        same = self.symmetric and _same_index(row_index, col_index)
        if self.noise_is_zero or same:
            # A block of a kernel matrix is the kernel of the selected points: stays lazy and tiled.
            return self._with(x1=self.x1[row_index], x2=self.x2[col_index], symmetric=same,
                              noise=self.noise if same else torch.zeros_like(self.noise))
        return super()._getitem(row_index, col_index)

    def _get_indices(self, row_index, col_index, *batch_indices):
        a, b = self.x1[row_index], self.x2[col_index]
        ls = self.lengthscale.reshape(-1).to(a.dtype)
        q = (((a - b) / ls) ** 2).sum(-1)
        out = self.outputscale.to(a.dtype) * _PROFILES[self.kind].profile(q)
        if self.symmetric and not self.noise_is_zero:
            out = out + self.noise.to(a.dtype) * (torch.as_tensor(row_index) == torch.as_tensor(col_index))
        return out

    def _diagonal(self) -> torch.Tensor:
        if self.symmetric:  # stationary: f(0) = 1
            ones = torch.ones(self.shape[0], dtype=self.x1.dtype, device=self.x1.device)
            return ones * (self.outputscale.to(self.x1.dtype) + self.noise.to(self.x1.dtype))
        idx = torch.arange(min(self.shape), device=self.x1.device)
        return self._get_indices(idx, idx)

    def to_dense(self) -> torch.Tensor:
        """Dense matrix through the reference formula (autograd-capable; ``O(n m)`` memory)."""
        K = _dense(self.kind, self.x1, self.x2, self.lengthscale, self.outputscale)
        if self.symmetric and not self.noise_is_zero:
            K = K + self.noise.to(K.dtype) * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        return K

    @property
    def noise_is_zero(self) -> bool:
        return not self.noise.requires_grad and bool((self.noise == 0).all())

    def __add__(self, other):
        if isinstance(other, ConstantDiagLinearOperator) and self.symmetric and other.shape == self.shape:
            return self._with(noise=self.noise + other.diag_values.reshape(()).to(self.noise.dtype))
        if isinstance(other, DiagLinearOperator) and self.symmetric:
            self.state.fallback("a non-constant diagonal (heteroscedastic or fixed per-point noise) is not "
                                "absorbed by the gpscale operator")
        return super().__add__(other)

    def _expand_batch(self, batch_shape):
        if len(batch_shape) == 0:
            return self
        self.state.fallback("batched kernel matrices are not supported by the gpscale operator")
        return super()._expand_batch(batch_shape)

    # ------------------------------------------------------------------------------ solves
    def _preconditioner(self):
        return None, None, None  # gpscale builds its own inside inv_quad_logdet / solve

    def _solve(self, rhs, preconditioner=None, num_tridiag=0):
        if num_tridiag:
            raise NotImplementedError("GpscaleKernelLinearOperator computes log-dets in inv_quad_logdet")
        return self.solve(rhs)

    def solve(self, right_tensor, left_tensor=None):
        """``K̂⁻¹ B`` (or ``L K̂⁻¹ B``): Cholesky below the crossover, gpscale CG above."""
        if not self.symmetric:
            raise RuntimeError("solve needs the square, symmetric training covariance")
        vec = right_tensor.dim() == 1
        B = right_tensor[:, None] if vec else right_tensor
        if B.dim() != 2:
            self.state.fallback("batched right-hand sides in solve")
            return super().solve(right_tensor, left_tensor)
        check_finite("right-hand side of the GPyTorch solve (training targets minus mean)", B)
        if self._use_cholesky():
            L = cholesky_factor(self.to_dense())
            X = torch.cholesky_solve(B, L)
        else:
            X = _Solve.apply(B, self.lengthscale, self.outputscale, self.noise,
                             (self._gpscale_op(), self.options, self.state))
        X = X[:, 0] if vec else X
        return X if left_tensor is None else left_tensor @ X

    def inv_quad_logdet(self, inv_quad_rhs=None, logdet=False, reduce_inv_quad=True):
        """``(rhsᵀ K̂⁻¹ rhs, log|K̂|)``: the GPyTorch training loss, computed by gpscale."""
        zero = torch.zeros([], dtype=self.dtype, device=self.device)
        if inv_quad_rhs is None and not logdet:
            raise RuntimeError("Either `inv_quad_rhs` or `logdet` must be specified.")
        if not self.symmetric:
            raise RuntimeError("inv_quad_logdet needs the square, symmetric training covariance")
        R = None if inv_quad_rhs is None else (inv_quad_rhs[:, None] if inv_quad_rhs.dim() == 1 else inv_quad_rhs)
        if R is not None and R.dim() != 2:
            self.state.fallback("batched right-hand sides in inv_quad_logdet")
            return super().inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)
        if R is not None:
            check_finite("training targets minus mean (GPyTorch inv_quad_logdet right-hand side)", R)
        if self._use_cholesky():  # exact; a closed-form backward through gpscale's tile pass
            rhs = R if R is not None else torch.zeros(self.shape[0], 0, dtype=self.dtype, device=self.device)
            quad, ld = CholeskyInvQuadLogdet.apply(rhs, self.lengthscale, self.outputscale, self.noise,
                                                   self._gpscale_op())
            ld = ld if logdet else zero
        elif logdet:
            rhs = R if R is not None else torch.zeros(self.shape[0], 0, dtype=self.dtype, device=self.device)
            quad, ld = _InvQuadLogdet.apply(rhs, self.lengthscale, self.outputscale, self.noise,
                                            (self._gpscale_op(), self.options, self.state))
        else:
            quad, ld = (R * self.solve(R)).sum(0), zero
        if R is None:
            return zero, ld
        return (quad.sum(-1) if reduce_inv_quad else quad), ld
