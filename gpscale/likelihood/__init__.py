"""Marginal log-likelihood: dense Cholesky and iterative (BBMM) estimators."""

from .api import CHOLESKY_CROSSOVER, MLLResult, marginal_log_likelihood, mll_estimate

__all__ = ["marginal_log_likelihood", "mll_estimate", "MLLResult", "CHOLESKY_CROSSOVER"]
