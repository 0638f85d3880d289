""":class:`~gpscale.ExactGP`'s constructor arguments: validation, scikit-learn's parameter protocol,
and the precision policy a fit actually uses.

As in scikit-learn, the constructor only stores its arguments and ``fit`` validates them, so
``set_params`` / cloning never see a half-checked object; every error names the argument, what it
got and what it accepts.
"""

from __future__ import annotations

import inspect
import numbers
import warnings

import torch

from .._validation import check_device, check_positive_int, check_tolerance
from ..kernels import StationaryKernel
from ..likelihood.api import METHODS
from ..operators.backends import check_backend_name
from ..precision import PrecisionPolicy, PrecisionWarning, as_policy

KERNELS = ("rbf", "matern12", "matern32", "matern52")
OPTIMIZERS = ("lbfgs", "adam")
#: ``max_iter`` when none is given: L-BFGS-B usually stops earlier on its own (``tol``).
DEFAULT_MAX_ITER = {"lbfgs": 100, "adam": 200}


def check_config(gp) -> None:
    """Raise ``ValueError`` / ``TypeError`` for the first invalid constructor argument of ``gp``."""
    if not isinstance(gp.kernel, StationaryKernel) and str(gp.kernel).lower() not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or a gpscale kernel, got {gp.kernel!r}")
    for name, value, allowed in (("optimizer", gp.optimizer, OPTIMIZERS), ("method", gp.method, METHODS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if gp.max_iter is not None:
        check_positive_int("max_iter", gp.max_iter)
    if gp.init_subset is not None:
        check_positive_int("init_subset", gp.init_subset, minimum=2)
    check_positive_int("num_probes", gp.num_probes)
    check_positive_int("cg_max_iter", gp.cg_max_iter)
    check_positive_int("seed", gp.seed, minimum=0)
    for name in ("rtol", "predict_rtol", "tol"):
        check_tolerance(name, getattr(gp, name))
    if not (isinstance(gp.lr, numbers.Real) and gp.lr > 0):
        raise ValueError(f"lr must be a number > 0, got {gp.lr!r}")
    if gp.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {gp.dtype!r}")
    if not (0 < gp.noise_floor < gp.noise_init):
        raise ValueError(f"need 0 < noise_floor < noise_init, got noise_floor={gp.noise_floor!r}, "
                         f"noise_init={gp.noise_init!r}")
    as_policy(gp.precision)  # raises on a bad policy
    check_backend_name(gp.backend)
    if gp.device is not None:
        check_device("device", gp.device)
    if gp.lengthscale_init is not None and not gp.lengthscale_init > 0:
        raise ValueError(f"lengthscale_init must be > 0, got {gp.lengthscale_init!r}")


def training_policy(gp, method: str, n: int) -> PrecisionPolicy | None:
    """The precision policy the fit's MLL evaluations use: ``gp.precision``, unless the fit is dense.

    A policy shapes the CG solves; the dense Cholesky path has none, so a low-precision policy there
    would only buy :func:`~gpscale.models.fit.precision_check` two wasted evaluations and a report
    that claims a check of nothing.  The user asked for low precision and is not getting it: say so.
    """
    policy = as_policy(gp.precision)
    if method != "cholesky":
        return policy
    if policy is None or not policy.low_precision:
        return None  # float32/float64 products: what the dense path computes anyway, nothing to say
    why = "method='cholesky'" if gp.method == "cholesky" else f"n={n} <= gpscale.CHOLESKY_CROSSOVER"
    warnings.warn(f"precision={policy.product!r} applies to the CG solves of the iterative method, but this fit is "
                  f"dense Cholesky ({why}) and runs in {gp.dtype}; pass method='iterative' to use the policy",
                  PrecisionWarning, stacklevel=3)
    return None


class ParamsMixin:
    """scikit-learn's estimator-parameter protocol (``get_params`` / ``set_params``) without scikit-learn.

    The parameters are the constructor's arguments, stored under their own names, so
    ``sklearn.base.clone``, ``GridSearchCV`` and pipelines work with the estimator.
    """

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values()
                      if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def get_params(self, deep: bool = True) -> dict:
        """The constructor arguments as a dict (``deep`` is accepted for scikit-learn; no sub-estimators)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        """Set constructor arguments by name (validated at the next ``fit``); returns ``self``."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}; valid parameters: {valid}")
            setattr(self, name, value)
        return self
