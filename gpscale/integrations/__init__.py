"""Integrations with other libraries (each imports its library lazily, on first use).

* :mod:`gpscale.integrations.gpytorch` -- gpscale as the solver backend of unchanged GPyTorch
  ``ExactGP`` models (``use_gpscale(model)``).
"""
