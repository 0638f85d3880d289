"""GPyTorch backend: unchanged ``gpytorch.models.ExactGP`` code trains and predicts on gpscale.

One line switches a model::

    from gpscale.integrations.gpytorch import use_gpscale
    use_gpscale(model)                       # model.likelihood must be a GaussianLikelihood

after which GPyTorch's own training loop (``loss = -mll(model(X), y); loss.backward()``) and
prediction (``model.eval(); likelihood(model(Xs))``) run on gpscale's tiled kernel products, batched
preconditioned CG, preconditioners and preconditioned SLQ log-det.  ``restore_gpytorch(model)`` (or the
context manager :func:`gpscale_backend`) switches back.  Parameters, their names, ``state_dict`` and
optimiser state are untouched: the switch changes the *class* of ``model.covar_module`` to a subclass
whose ``__call__`` returns a :class:`~gpscale.integrations.gpytorch_operator.GpscaleKernelLinearOperator`, and
that of an ``ExactGP`` to a subclass whose prediction strategy forms a symmetric, certified predictive
covariance (:mod:`gpscale.integrations.gpytorch_predict`).

Supported: ``ScaleKernel(RBFKernel | MaternKernel(nu))`` or the bare base kernel, shared or ARD
lengthscale, ``GaussianLikelihood`` (homoscedastic noise), any mean, 2-D inputs, no batch shape.
Anything else -- other kernels, ``active_dims``, batch or multitask models, inputs that require
gradients (deep kernel learning), heteroscedastic / fixed noise -- runs on stock GPyTorch with one
:class:`GPyTorchFallbackWarning`, never a wrong answer.

gpytorch is an optional dependency: importing this module imports it.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import pickle
from dataclasses import dataclass

import gpytorch
import torch

from .._validation import check_finite, check_positive_int
from ..likelihood.api import CHOLESKY_CROSSOVER, METHODS
from ..operators.backends import check_backend_name
from ..precision import as_policy
from ..precond.pivoted_cholesky import PivotedCholesky
from .gpytorch_operator import (
    BackendState,
    GpscaleKernelLinearOperator,
    GPyTorchFallbackWarning,
)
from .gpytorch_predict import _SLOT as _PREDICTION_SLOT
from .gpytorch_predict import GpscaleModelMixin

__all__ = [
    "BackendOptions",
    "GPyTorchFallbackWarning",
    "GpscaleKernelLinearOperator",
    "backend_stats",
    "gpscale_backend",
    "restore_gpytorch",
    "use_gpscale",
]


@dataclass(frozen=True)
class BackendOptions:
    """How the gpscale backend computes GPyTorch's loss and predictions (explicit, per model).

    Parameters
    ----------
    method : {"auto", "cholesky", "iterative"}
        ``auto``: dense Cholesky for ``n <= cholesky_crossover`` (exact, fast at small n), iterative above.
    rtol : float, default 1e-2
        CG tolerance of the training solves, ``‖r‖ ≤ rtol‖b‖`` per column (GPyTorch's default is 1).
    num_probes : int, default 10
        Probe vectors of the stochastic log-det / trace estimates.
    preconditioner : factory, default ``PivotedCholesky(rank=100)``
        Any :mod:`gpscale.precond` factory, or None.
    solve_rtol : float, default 1e-4
        Accuracy of the prediction solves (mean cache, predictive covariance): each column stops when
        CG's Gauss-Radau bound certifies its squared energy-norm error ``<= solve_rtol * σ²``, so every
        predictive variance of y lies in ``[var⋆, var⋆ (1 + solve_rtol)]``, the whole covariance is too
        large by a PSD matrix with entries ``<= solve_rtol * σ²``, and the mean errs by at most
        ``sqrt(outputscale * solve_rtol) * σ`` (docs/gpytorch.md).  The backward of a differentiated
        solve stops on the relative residual ``solve_rtol``.
    max_iter : int, default 1000
    memory_budget : int, optional
        Bytes for one kernel operator's tile cache + workspace (gpscale's default: 1 GiB).
    product_backend : {"auto", "cuda", "keops", "torch"}, "cuda:<variant>" or CudaBackend, default "auto"
        How gpscale's operators compute kernel products (:mod:`gpscale.operators.backends`); ``auto``
        picks the fastest available for the device and size.
    seed : int, optional
        Fixes the probes (same loss for the same hyperparameters); ``None`` draws fresh probes per
        step from torch's global generator, as GPyTorch does.
    solve_block : int, default 256
        Right-hand sides per CG call in prediction solves (bounds CG memory at ``5 n`` numbers each).
    cholesky_crossover : int
        Largest n for the dense path under ``method="auto"``.
    precision : PrecisionPolicy or dtype name, optional
        Mixed-precision CG for the training loss's solve (``docs/precision.md``): e.g. ``"float16"``
        runs the probe and ``y`` solves with 16-bit kernel products, float32 state,
        re-orthogonalisation and the automatic float32 fallback -- the low-precision CG GPyTorch itself
        lacks (gpytorch #969).  ``backend_stats(model)`` counts the columns that finished in low
        precision.  The derivative pass, prediction solves and the dense path keep the inputs' dtype.
    """

    method: str = "auto"
    rtol: float = 1e-2
    num_probes: int = 10
    preconditioner: object = PivotedCholesky(rank=100)
    solve_rtol: float = 1e-4
    max_iter: int = 1000
    memory_budget: int | None = None
    product_backend: str = "auto"
    seed: int | None = None
    solve_block: int = 256
    cholesky_crossover: int = CHOLESKY_CROSSOVER
    precision: object = None

    def __post_init__(self):
        object.__setattr__(self, "precision", as_policy(self.precision))  # raises on a bad policy
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("rtol", "solve_rtol"):
            v = getattr(self, name)
            if not (0 < v < 1):
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        for name in ("num_probes", "max_iter", "solve_block"):
            check_positive_int(name, getattr(self, name))
        check_backend_name(self.product_backend)


# ------------------------------------------------------------------------------ kernel inspection
def _kernel_kind(base) -> str | None:
    cls = getattr(base, "_gpscale_original_class", type(base))  # a switched bare kernel
    if cls is gpytorch.kernels.RBFKernel:
        return "rbf"
    if cls is gpytorch.kernels.MaternKernel:
        return {0.5: "matern12", 1.5: "matern32", 2.5: "matern52"}.get(float(base.nu))
    return None


def _unsupported_reason(kernel) -> str | None:
    """Why ``kernel`` cannot run on gpscale (``None`` if it can)."""
    # a kernel switched earlier is judged by its own class: use_gpscale again only changes the options
    scale = kernel if getattr(kernel, "_gpscale_original_class", type(kernel)) is gpytorch.kernels.ScaleKernel else None
    base = kernel.base_kernel if scale is not None else kernel
    if _kernel_kind(base) is None:
        return (f"covar_module {type(kernel).__name__}({type(base).__name__}) is not supported (gpscale runs "
                "ScaleKernel(RBFKernel | MaternKernel(nu=0.5|1.5|2.5)) or the bare base kernel)")
    for k in (kernel, base):
        if k.active_dims is not None:
            return f"{type(k).__name__} has active_dims (select the columns of X before the model instead)"
        if len(k.batch_shape):
            return f"{type(k).__name__} has batch_shape {tuple(k.batch_shape)} (batched models)"
    return None


class _GpscaleKernelMixin:
    """Swapped in front of the model's kernel class: ``__call__`` returns gpscale's operator."""

    def __call__(self, x1, x2=None, diag=False, last_dim_is_batch=False, **params):
        state: BackendState = self._gpscale_state
        reason = self._gpscale_call_reason(x1, x2, diag, last_dim_is_batch, params)
        if reason is not None:
            if reason:  # "" = handled by GPyTorch silently (diagonals are cheap and exact there)
                state.fallback(reason)
            return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)
        # CG on NaN inputs returns a NaN loss (or a bogus "converged" one); stock GPyTorch at least fails
        # in its Cholesky, so say what is wrong before any kernel product runs.
        check_finite("GPyTorch kernel input x1", x1)
        if x2 is not None and x2 is not x1:
            check_finite("GPyTorch kernel input x2", x2)
        scale = self if isinstance(self, gpytorch.kernels.ScaleKernel) else None
        base = self.base_kernel if scale is not None else self
        s = scale.outputscale if scale is not None else torch.ones((), dtype=x1.dtype, device=x1.device)
        symmetric = x2 is None or x2 is x1 or (x2.shape == x1.shape and torch.equal(x2, x1))
        x2 = x1 if symmetric else x2
        noise = torch.zeros((), dtype=x1.dtype, device=x1.device)
        return GpscaleKernelLinearOperator(x1, x2, base.lengthscale, s, noise, kind=_kernel_kind(base),
                                           options=self._gpscale_options, state=state, symmetric=symmetric)

    def _gpscale_call_reason(self, x1, x2, diag, last_dim_is_batch, params) -> str | None:
        if diag:
            return ""
        if last_dim_is_batch or params:
            return "kernel called with last_dim_is_batch or extra parameters"
        if x1.dim() != 2 or (x2 is not None and x2.dim() != 2):
            return f"batched inputs of shape {tuple(x1.shape)} (gpscale runs 2-D (n, d) inputs)"
        if torch.is_grad_enabled() and (x1.requires_grad or (x2 is not None and x2.requires_grad)):
            return "inputs that require gradients (e.g. deep kernel learning) are not differentiated by gpscale"
        return None


_SWAPPED: dict[tuple[type, type], type] = {}


def _swapped_class(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin`` in front (cached: one class per pair, so ``isinstance`` stays stable)."""
    if (cls, mixin) not in _SWAPPED:
        _SWAPPED[cls, mixin] = type(f"Gpscale{cls.__name__}", (mixin, cls),
                                    {"__module__": __name__, "_gpscale_original_class": cls,
                                     "__reduce_ex__": _reduce_swapped})
    return _SWAPPED[cls, mixin]


def _new_swapped(cls: type, mixin: type):
    """Unpickling a switched kernel or model: a bare instance of its swapped class (its state follows)."""
    swapped = _swapped_class(cls, mixin)
    return swapped.__new__(swapped)


def _reduce_swapped(self, protocol):
    # A swapped class is made at run time, so pickle cannot find it by name: record the user's class and
    # the mixin instead (both importable), so that torch.save(model) / copy.deepcopy keep the switch.
    swapped = type(self)
    reduced = super(swapped, self).__reduce_ex__(protocol)
    if protocol < 2 or reduced[0] is not copyreg.__newobj__ or reduced[1][:1] != (swapped,):
        raise pickle.PicklingError(f"{swapped.__name__} (a gpscale-switched "
                                   f"{swapped._gpscale_original_class.__name__}) pickles with protocol >= 2 only "
                                   "(pickle's and torch.save's defaults)")
    return (_new_swapped, (swapped._gpscale_original_class, swapped.__mro__[1]), *reduced[2:])


def _switch_model(model) -> None:
    """Give an ``ExactGP`` gpscale's prediction strategy (:mod:`gpscale.integrations.gpytorch_predict`)."""
    if isinstance(model, gpytorch.models.ExactGP) and not isinstance(model, GpscaleModelMixin):
        model.__dict__.pop("prediction_strategy", None)  # the property below takes over the attribute
        model.__class__ = _swapped_class(type(model), GpscaleModelMixin)
    if hasattr(model, "prediction_strategy"):
        model.prediction_strategy = None  # caches computed before the switch


def _unswitch_model(model) -> None:
    if isinstance(model, GpscaleModelMixin):
        model.__dict__.pop(_PREDICTION_SLOT, None)
        model.__class__ = model._gpscale_original_class
        model.prediction_strategy = None  # a plain attribute again (GPyTorch rebuilds its own strategy)
    elif hasattr(model, "prediction_strategy"):
        model.prediction_strategy = None


# ------------------------------------------------------------------------------------ the switch
def _likelihood_reason(model) -> str | None:
    lik = getattr(model, "likelihood", None)
    if lik is None:
        return None
    if type(lik) is not gpytorch.likelihoods.GaussianLikelihood:
        return (f"likelihood {type(lik).__name__} is not supported (gpscale absorbs a homoscedastic "
                "GaussianLikelihood's noise); non-Gaussian, fixed-noise and multitask likelihoods")
    if len(lik.noise.shape) > 1 or lik.noise.numel() != 1:
        return f"GaussianLikelihood with noise of shape {tuple(lik.noise.shape)} (batched noise)"
    return None


def use_gpscale(model, options: BackendOptions | None = None, **kwargs):
    """Switch a GPyTorch exact GP to the gpscale backend (in place); returns ``model``.

    Parameters
    ----------
    model : gpytorch.models.ExactGP
        With ``model.covar_module`` a ``ScaleKernel(RBFKernel | MaternKernel)`` (or the bare base kernel)
        and ``model.likelihood`` a ``GaussianLikelihood``.
    options : BackendOptions, optional
    **kwargs
        Shortcut for ``BackendOptions(**kwargs)`` (or changes to ``options``), e.g. ``rtol=1e-3``.

    Returns
    -------
    model
        Unchanged parameters, names and state; only the classes of the kernel and (for an ``ExactGP``, to
        install gpscale's predictive covariance, :mod:`gpscale.integrations.gpytorch_predict`) of the model
        are swapped for subclasses.  An unsupported model is returned unswitched with one
        :class:`GPyTorchFallbackWarning` saying why.  Calling it again on a switched model changes its options.

    Examples
    --------
    >>> use_gpscale(model, preconditioner=gpscale.precond.PivotedCholesky(rank=200))  # doctest: +SKIP
    """
    options = options if options is not None else BackendOptions()
    if not isinstance(options, BackendOptions):
        raise TypeError(f"options must be a BackendOptions, got {type(options).__name__}")
    options = dataclasses.replace(options, **kwargs) if kwargs else options
    kernel = getattr(model, "covar_module", None)
    if not isinstance(kernel, gpytorch.kernels.Kernel):
        raise TypeError("use_gpscale needs a GPyTorch model with a `covar_module` kernel attribute "
                        f"(got {type(model).__name__} without one)")
    reason = _unsupported_reason(kernel) or _likelihood_reason(model)
    if reason is not None:
        BackendState().fallback(reason)
        return model
    if not isinstance(kernel, _GpscaleKernelMixin):
        kernel.__class__ = _swapped_class(type(kernel), _GpscaleKernelMixin)
        kernel._gpscale_state = BackendState()
    kernel._gpscale_options = options
    _switch_model(model)
    return model


def restore_gpytorch(model):
    """Undo :func:`use_gpscale`: the model runs on stock GPyTorch again; returns ``model``."""
    kernel = getattr(model, "covar_module", None)
    if isinstance(kernel, _GpscaleKernelMixin):
        kernel.__class__ = kernel._gpscale_original_class
        for attr in ("_gpscale_state", "_gpscale_options"):
            kernel.__dict__.pop(attr, None)
        _unswitch_model(model)
    return model


@contextlib.contextmanager
def gpscale_backend(model, options: BackendOptions | None = None, **kwargs):
    """``with gpscale_backend(model): ...`` runs the block on gpscale and restores GPyTorch after."""
    was_on = isinstance(getattr(model, "covar_module", None), _GpscaleKernelMixin)
    use_gpscale(model, options, **kwargs)
    try:
        yield model
    finally:
        if not was_on:
            restore_gpytorch(model)


def backend_stats(model) -> dict:
    """What the backend last did: ``{"last": {what: CG stats}, "counts": {what: calls}}`` (empty if off).

    ``"low_precision_dropped_at"``: the training-loss call after which a ``precision`` option was
    dropped because every column of two solves in a row fell back to float32 (None: never).
    """
    kernel = getattr(model, "covar_module", None)
    if not isinstance(kernel, _GpscaleKernelMixin):
        return {}
    st = kernel._gpscale_state
    return {"last": dict(st.last), "counts": dict(st.counts), "options": kernel._gpscale_options,
            "low_precision_dropped_at": st.low_precision_dropped_at}
