"""Kernels: definitions, positive transforms and the dense pure-torch reference.

See :class:`~gpscale.kernels.StationaryKernel` for the ``s f(q)`` form every kernel follows.
"""

from .base import StationaryKernel, to_positive, to_raw
from .matern import Matern
from .rbf import RBF

__all__ = ["StationaryKernel", "RBF", "Matern", "make_kernel", "to_positive", "to_raw"]

_NAMES = {"rbf": (RBF, {}), "matern12": (Matern, {"nu": 0.5}), "matern32": (Matern, {"nu": 1.5}),
          "matern52": (Matern, {"nu": 2.5})}


def make_kernel(name: str, **kwargs) -> StationaryKernel:
    """Build a kernel from its short name: ``rbf``, ``matern12``, ``matern32`` or ``matern52``."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _NAMES:
        raise ValueError(f"unknown kernel {name!r}; choose one of {sorted(_NAMES)}")
    cls, extra = _NAMES[key]
    return cls(**extra, **kwargs)
