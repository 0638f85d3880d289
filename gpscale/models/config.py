"""Validation of :class:`~gpscale.ExactGP`'s constructor arguments.

As in scikit-learn, the constructor only stores its arguments and ``fit`` validates them, so
``set_params`` / cloning never see a half-checked object; every error names the argument, what it
got and what it accepts.
"""

from __future__ import annotations

import numbers

import torch

from .._validation import check_device, check_positive_int, check_tolerance
from ..kernels import StationaryKernel
from ..likelihood.api import METHODS
from ..operators.backends import check_backend_name
from ..precision import as_policy

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
