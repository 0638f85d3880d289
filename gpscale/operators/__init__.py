"""Kernel operators: memory-bounded products with ``K(X, Z)`` and ``K(X, X) + noise I``."""

from .backends import BACKENDS, CudaBackend, backend_available, backend_label
from .blocking import DEFAULT_MEMORY_BUDGET, Tiling, plan_tiling
from .cross_kernel import CrossKernelOperator
from .derivatives import bilinear_derivative, derivative_matmul
from .kernel_operator import KernelOperator

__all__ = ["KernelOperator", "CrossKernelOperator", "derivative_matmul", "bilinear_derivative",
           "DEFAULT_MEMORY_BUDGET", "Tiling", "plan_tiling", "BACKENDS", "CudaBackend",
           "backend_available", "backend_label"]
