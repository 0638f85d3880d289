"""Log-determinant estimators: preconditioned stochastic Lanczos quadrature (SLQ)."""

from .slq import ProbeSolve, build_preconditioner, probe_solve, slq_logdet

__all__ = ["slq_logdet", "probe_solve", "ProbeSolve", "build_preconditioner"]
