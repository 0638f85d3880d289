"""gpscale: exact Gaussian processes at millions of points.

Data flow: ``X -> kernels -> operators -> solvers / precond -> logdet -> likelihood -> models``.
"""

from . import kernels, logdet, operators, precond, solvers
from .likelihood import CHOLESKY_CROSSOVER, MLLResult, marginal_log_likelihood, mll_estimate
from .operators import CrossKernelOperator, CudaBackend, KernelOperator
from .solvers import CGResult, CGStatus, CGWarning, ConjugateGradients, cg
from .precision import PrecisionPolicy, PrecisionWarning

__version__ = "0.1.0"

__all__ = ["kernels", "operators", "precond", "solvers", "logdet", "KernelOperator", "CrossKernelOperator",
           "CudaBackend", "cg", "ConjugateGradients", "CGResult", "CGStatus", "CGWarning", "marginal_log_likelihood",
           "mll_estimate", "MLLResult", "CHOLESKY_CROSSOVER", "PrecisionPolicy", "PrecisionWarning",
           "__version__"]

from .models import ExactGP, FitReport  # noqa: E402  (models build on everything above)

__all__ += ["ExactGP", "FitReport"]

from . import distributed  # noqa: E402  (torch.distributed strategies over the engine and models)

__all__ += ["distributed"]
