"""Batched preconditioned conjugate gradients with Lanczos coefficients (mBCG).

One call solves :math:`A X = B` for all columns of ``B`` at once, so every iteration costs a single
matrix-matrix product with ``A`` (Gardner et al., "GPyTorch: Blackbox Matrix-Matrix Gaussian Process
Inference with GPU Acceleration", NeurIPS 2018).  Columns stop independently: a converged column's
step sizes are masked to zero on the device, and the host only checks every ``check_every``
iterations whether any column is still running -- no host synchronisation per step.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from .._validation import check_positive_int, check_tolerance
from ..precision import PrecisionPolicy, PrecisionWarning, as_policy
from .error_bounds import RadauBound
from .lanczos import Tridiagonal
from .result import CGResult, CGStatus, CGWarning
from .stability import ResidualBasis, StallDetector

__all__ = ["CGResult", "CGStatus", "CGWarning", "ConjugateGradients", "cg"]


def _as_matmul(A):
    if isinstance(A, torch.Tensor):
        return A.__matmul__
    if hasattr(A, "matmul"):
        return A.matmul
    if callable(A):
        return A
    raise TypeError(f"A must be a tensor, an operator with .matmul, or a callable; got {type(A).__name__}")


@dataclass(frozen=True)
class ConjugateGradients:
    """Configuration of a batched preconditioned CG solve (immutable; call it to solve).

    Parameters
    ----------
    rtol, atol : float
        Column ``j`` stops when :math:`\\|r_j\\|_2 \\le \\max(\\mathrm{rtol}\\,\\|b_j\\|_2,\\ \\mathrm{atol})`.
    max_iter : int
        Iteration cap; columns still running get ``CGStatus.MAX_ITERATIONS``.
    check_every : int
        Host check of "any column still running" every this many iterations (GPU hygiene).
    num_tridiag : int
        Record Lanczos coefficients for the first ``num_tridiag`` columns.
    record_history : bool
        Keep every column's residual norm at every iteration (:attr:`CGResult.residual_history`):
        one ``(t,)`` device tensor per step, stacked at the end -- no extra host synchronisation.
    precision : PrecisionPolicy, optional
        Mixed-precision solve (:mod:`gpscale.solvers.mixed`): products in ``precision.product``, CG
        state in ``precision.state``, with re-orthogonalisation, stagnation detection and fallback as
        the policy says.  ``None`` (default): the products and state of ``A`` and ``B`` as given.
    error_floor : float, optional
        A lower bound :math:`\\mu > 0` on the eigenvalues of :math:`P^{-1}A` (see
        :meth:`gpscale.precond.base.BuiltPreconditioner.spectrum_floor`).  Given, columns stop on a
        Gauss-Radau *upper bound* of the energy-norm error instead of the residual: column ``j`` stops
        when that bound on :math:`\\|x_j - x^\\star_j\\|_A` is at most ``max(rtol * e_j, atol)``, with
        :math:`e_j^2 = \\sum_k \\alpha_k r_k^T z_k` the A-norm of the correction found so far
        (:mod:`gpscale.solvers.error_bounds`); :attr:`CGResult.error_bound` holds the bounds.  Not with
        ``precision`` (the bound assumes products in one precision).

    Notes
    -----
    Per iteration: one product with ``A`` (``n x t``), one preconditioner solve and :math:`O(nt)`
    vector work.  Convergence masks are updated on the device every iteration, so iteration counts
    are exact even though the host looks only every ``check_every`` steps.
    """

    rtol: float = 1e-2
    atol: float = 0.0
    max_iter: int = 1000
    check_every: int = 8
    num_tridiag: int = 0
    record_history: bool = False
    precision: PrecisionPolicy | None = None
    error_floor: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "precision", as_policy(self.precision))
        check_tolerance("rtol", self.rtol)
        check_tolerance("atol", self.atol)
        check_positive_int("max_iter", self.max_iter)
        check_positive_int("check_every", self.check_every)
        check_positive_int("num_tridiag", self.num_tridiag, minimum=0)
        if self.error_floor is not None:
            mu = check_tolerance("error_floor", self.error_floor)
            if mu == 0:
                raise ValueError("error_floor must be > 0 (a lower bound on the eigenvalues of P^-1 A), got 0; "
                                 "pass None to stop on the residual")
            if self.precision is not None:
                raise ValueError("error_floor (Gauss-Radau error bounds) needs products in one precision; "
                                 "pass precision=None, or drop error_floor to stop on the residual")

    def __call__(self, A, B: torch.Tensor, x0: torch.Tensor | None = None, preconditioner=None) -> CGResult:
        matmul = _as_matmul(A)
        if not isinstance(B, torch.Tensor):
            raise TypeError(f"B must be a torch.Tensor, got {type(B).__name__}")
        if x0 is not None and not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a torch.Tensor or None, got {type(x0).__name__}")
        vec = B.dim() == 1
        B2 = B[:, None] if vec else B
        X0 = None if x0 is None else (x0[:, None] if x0.dim() == 1 else x0)
        _check_system(A, B2, X0, check_dtype=self.precision is None)
        res = None
        if self.precision is not None:
            from .mixed import low_precision_skip_reason, mixed_precision_solve

            skip = low_precision_skip_reason(A, self.precision)
            if skip:  # A's own fused float path; the policy accepted any right-hand-side dtype, it needs A's
                warnings.warn(skip, PrecisionWarning, stacklevel=2)
                B2, X0 = B2.to(A.dtype), None if X0 is None else X0.to(A.dtype)
            else:
                res = mixed_precision_solve(self, A, B2, X0, preconditioner)
        if res is None:
            res = self._run(matmul, _precond_solve(preconditioner, A), B2, X0)
        if res.x.dtype != B.dtype:
            res = dataclasses.replace(res, x=res.x.to(B.dtype))
        if vec:
            res = dataclasses.replace(res, x=res.x[:, 0])
        return res

    def _run(self, matmul, solve, B, X0, *, tol=None, num_tridiag=None, reorth: int = 0,
             stall: tuple[int, float] | None = None) -> CGResult:
        """The CG loop.  ``tol`` overrides the per-column thresholds, ``num_tridiag`` the config's;
        ``reorth`` keeps that many residuals for re-orthogonalisation and ``stall = (window,
        decrease)`` switches on stagnation detection (:mod:`gpscale.solvers.stability`)."""
        t, dev = B.shape[1], B.device
        st = _start(matmul, solve, B, X0)
        tol = torch.clamp(self.rtol * st.bnorm, min=self.atol) if tol is None else tol
        radau = None if self.error_floor is None else RadauBound(self.error_floor, st.rz, self.rtol, self.atol)
        st.classify(st.rnorm <= tol if radau is None else radau.met())
        nt = min(self.num_tridiag if num_tridiag is None else num_tridiag, t)
        basis = ResidualBasis(reorth, B.shape[0], t, B.dtype, dev) if reorth else None
        if basis is not None:
            basis.store(st.r, st.z, st.rz, st.active)
        stalls = StallDetector(stall[0], stall[1], st.rnorm) if stall and stall[0] else None
        rz0 = st.rz[:nt].clone()
        alphas, betas = [], []
        history = [st.rnorm] if self.record_history else None
        cols = None  # columns multiplied by A; None = all
        for k in range(self.max_iter):
            if k % self.check_every == 0:
                cols = _running_columns(st.active)
                if cols is not None and cols.numel() == 0:
                    break
            Ap = _masked_matmul(matmul, st.p, cols)
            st.products += 1
            alpha, beta = st.step(Ap, solve, tol, basis, stalls, radau)
            if nt:
                alphas.append(alpha[:nt])
                betas.append(beta[:nt])
            if history is not None:
                history.append(st.rnorm)
        status = torch.where(st.active, CGStatus.MAX_ITERATIONS.value, st.status)
        tri = None
        if nt:
            stack = (lambda xs: torch.stack(xs) if xs else torch.zeros(0, nt, dtype=B.dtype, device=dev))
            tri = Tridiagonal(stack(alphas), stack(betas), st.iters[:nt].clone(), rz0)
        worst = CGStatus(int(status.max())) if t else CGStatus.CONVERGED
        hist = None
        if history is not None:  # the loop sees convergence every check_every steps: trim the tail
            hist = torch.stack(history)[: (int(st.iters.max()) if t else 0) + 1]
        if radau is not None:
            tol = radau.tolerance()
        return CGResult(st.x, worst, status, st.iters, st.rnorm, st.bnorm, tol, tri, st.products, hist,
                        error_bound=None if radau is None else radau.error_norm)


@dataclass
class _Iterate:
    """The per-column state of the CG recurrences (mutable; private to :meth:`ConjugateGradients._run`)."""

    x: torch.Tensor
    r: torch.Tensor
    z: torch.Tensor
    p: torch.Tensor
    rz: torch.Tensor
    rnorm: torch.Tensor
    bnorm: torch.Tensor
    products: int
    active: torch.Tensor | None = None
    status: torch.Tensor | None = None
    iters: torch.Tensor | None = None

    def classify(self, done: torch.Tensor) -> None:
        """Columns already converged (``done``: met the stopping test) or non-finite at the start do not run."""
        # "not done" rather than "rnorm > tol": a NaN residual must not count as converged.
        finite = torch.isfinite(self.rnorm)
        self.active = ~done & finite
        self.status = torch.where(finite, CGStatus.CONVERGED.value, CGStatus.NON_FINITE.value)
        self.iters = torch.zeros(self.r.shape[1], dtype=torch.long, device=self.r.device)

    def step(self, Ap, solve, tol, basis, stalls, radau=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One masked CG step given ``Ap``; returns the step's ``(alpha, beta)`` (zero where stopped).

        With ``radau`` (:class:`RadauBound`) a column stops on its error bound, otherwise on ``tol``.
        """
        active, rz, p = self.active, self.rz, self.p
        pAp = (p * Ap).sum(0)
        bad = active & ~torch.isfinite(pAp)
        brk = active & (pAp <= 0) & ~bad
        status = torch.where(bad, CGStatus.NON_FINITE.value, torch.where(brk, CGStatus.BREAKDOWN.value, self.status))
        active = active & ~bad & ~brk
        alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        self.x.addcmul_(alpha, p)
        self.r.addcmul_(alpha, Ap, value=-1.0)
        if basis is not None:  # departs from textbook CG: see gpscale.solvers.stability
            basis.orthogonalize_(self.r, active)
        self.z = solve(self.r)
        rz_new = (self.r * self.z).sum(0)
        if basis is not None:
            basis.store(self.r, self.z, rz_new, active)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        self.p = self.z + beta * p
        self.rz = torch.where(active, rz_new, rz)
        self.iters += active.long()
        self.rnorm = rnorm = torch.where(active, self.r.norm(dim=0), self.rnorm)
        bad = active & ~torch.isfinite(rnorm)
        status = torch.where(bad, CGStatus.NON_FINITE.value, status)
        if radau is not None:
            radau.update(alpha, beta, rz, rz_new, active)
            active = active & ~bad & ~radau.met()
        else:
            active = active & ~bad & (rnorm > tol)
        if stalls is not None:
            stalled = stalls.update(rnorm, active)
            status = torch.where(stalled, CGStatus.STAGNATED.value, status)
            active = active & ~stalled
        self.active, self.status = active, status
        return alpha, beta


def _start(matmul, solve, B, X0) -> _Iterate:
    """Initial residual, preconditioned residual and search direction (one product if ``X0`` is given)."""
    x = torch.zeros_like(B) if X0 is None else X0.clone()
    r = B.clone() if X0 is None else B - matmul(X0)
    z = solve(r)
    return _Iterate(x=x, r=r, z=z, p=z.clone(), rz=(r * z).sum(0), rnorm=r.norm(dim=0), bnorm=B.norm(dim=0),
                    products=0 if X0 is None else 1)


def _running_columns(active: torch.Tensor) -> torch.Tensor | None:
    """Indices of the running columns, or None while most still run (one host sync per check).

    Converged columns stay masked (step size 0) either way; once a fifth of them have stopped,
    dropping them from the product saves that share of the kernel work, which dominates.
    """
    idx = active.nonzero()[:, 0]
    return None if idx.numel() > 0.8 * active.numel() else idx


def _masked_matmul(matmul, p: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    if cols is None:
        return matmul(p)
    Ap = torch.zeros_like(p)
    if cols.numel():
        Ap[:, cols] = matmul(p[:, cols])
    return Ap


def _check_system(A, B, X0, check_dtype: bool = True) -> None:
    if not isinstance(B, torch.Tensor):
        raise TypeError(f"B must be a torch.Tensor, got {type(B).__name__}")
    if B.dim() != 2:
        raise ValueError(f"B must have shape (n,) or (n, t), got {tuple(B.shape)}")
    shape = tuple(A.shape) if hasattr(A, "shape") else None
    if shape is not None and (len(shape) != 2 or shape[0] != shape[1] or shape[1] != B.shape[0]):
        raise ValueError(f"A has shape {shape} but B has {B.shape[0]} rows; A must be square (n, n) with n = B.shape[0]")
    if not torch.isfinite(B).all():
        raise ValueError("B contains NaN/Inf; clean the right-hand side before solving")
    if X0 is not None:
        if X0.shape != B.shape:
            raise ValueError(f"x0 must have the shape of B {tuple(B.shape)}, got {tuple(X0.shape)}")
        if X0.dtype != B.dtype or X0.device != B.device:
            raise TypeError(f"x0 ({X0.dtype}, {X0.device}) must match B ({B.dtype}, {B.device}); use x0.to(B)")
        if not torch.isfinite(X0).all():
            raise ValueError("x0 contains NaN/Inf; pass a finite initial guess or None")
    ref = getattr(A, "dtype", None)
    if check_dtype and ref is not None and ref != B.dtype:
        raise TypeError(f"A has dtype {ref} but B has dtype {B.dtype}; convert B with B.to({ref})")
    dev = getattr(A, "device", None)
    if dev is not None and torch.device(dev) != B.device:
        raise ValueError(f"A is on {dev} but B is on {B.device}; move B with B.to(device)")


def _built_preconditioner(preconditioner, A):
    """A factory (``.build(A)``) built against ``A``; a built preconditioner or None as given."""
    return preconditioner.build(A) if hasattr(preconditioner, "build") else preconditioner


def _precond_solve(preconditioner, A):
    """Accept None, a built preconditioner (``.solve``) or a factory (``.build(A)``)."""
    if preconditioner is None:
        return lambda r: r.clone()
    preconditioner = _built_preconditioner(preconditioner, A)
    if not hasattr(preconditioner, "solve"):
        raise TypeError(f"preconditioner must be a gpscale.precond object, got {type(preconditioner).__name__}")
    return preconditioner.solve


def cg(A, B, *, rtol: float = 1e-2, atol: float = 0.0, max_iter: int = 1000, x0=None, preconditioner=None,
       num_tridiag: int = 0, check_every: int = 8, record_history: bool = False, warn: bool = True,
       precision=None, error_floor: float | None = None) -> CGResult:
    """Solve ``A X = B`` by batched preconditioned CG.

    Column ``j`` stops when :math:`\\|b_j - A x_j\\|_2 \\le \\max(\\mathrm{rtol}\\,\\|b_j\\|_2,\\ \\mathrm{atol})`
    (recurrence residual).

    Parameters
    ----------
    A : KernelOperator, tensor, or callable
        Symmetric positive-definite ``(n, n)`` operator.
    B : (n,) or (n, t) tensor
    rtol, atol, max_iter, check_every, num_tridiag, record_history, error_floor
        See :class:`ConjugateGradients`.
    x0 : tensor, optional
        Initial guess (warm start).
    preconditioner : optional
        A factory such as ``gpscale.precond.PivotedCholesky(rank=50)`` (built from ``A``) or an
        already built preconditioner.
    warn : bool, default True
        Emit a :class:`CGWarning` when the status is not ``CONVERGED``.
    precision : PrecisionPolicy or dtype name, optional
        Mixed-precision solve, see :class:`gpscale.PrecisionPolicy` and ``docs/precision.md``; a name
        such as ``"bfloat16"`` means ``PrecisionPolicy(product="bfloat16")`` (all fixes on).

    Returns
    -------
    CGResult

    References
    ----------
    Hestenes & Stiefel (1952); Gardner et al. (2018) for the batched (mBCG) form; Maddox, Potapczynski &
    Wilson (UAI 2022) for low-precision CG.
    """
    solver = ConjugateGradients(rtol=rtol, atol=atol, max_iter=max_iter, check_every=check_every,
                                num_tridiag=num_tridiag, record_history=record_history, precision=precision,
                                error_floor=error_floor)
    res = solver(A, B, x0=x0, preconditioner=preconditioner)
    if warn and not res.converged:
        warnings.warn(f"CG ended with status {res.status.name}: {res.message}", CGWarning, stacklevel=2)
    return res
