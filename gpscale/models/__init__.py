"""User-facing models: the scikit-learn style :class:`ExactGP` estimator and its :class:`FitReport`."""

from .exact_gp import ExactGP
from .report import FitReport

__all__ = ["ExactGP", "FitReport"]
