"""Error of the expanded squared distance ``q = |x|^2 + |z|^2 - 2 x.z``, and what it does to a kernel.

Every fast path of gpscale (the torch tiles' augmented GEMM, the CUDA tensor-core kernels) forms
``q`` from norms and a dot product.  However exactly the dot product is computed, the result carries
an absolute error ``delta ~ units * u * (max|x|^2 + max|z|^2)`` (``u`` the unit roundoff of the
dtype): ``q`` of coincident points comes out as a small positive residue instead of 0, and an entry
moves by ``|f(q + delta) - f(q)|``.  That is ``~ delta / 2`` for RBF, but ``~ sqrt(delta)`` for
Matérn-1/2 near coincident points (and worse for the singular ``f'`` outputs).  Two uses:

* :func:`expansion_error` tells the CUDA backend where ``tc3`` is accurate enough
  (:mod:`gpscale.operators.cuda_backend`);
* :func:`coincidence_threshold` lets the torch tiles give repeated inputs ``q = 0`` exactly for
  kernels with a kink at 0 (``kernel.snap_near_coincident``): every computed ``q <= delta`` -- below
  the expansion's resolution, where it carries no information -- becomes 0 (``threshold_``, the same
  single pass as the ``clamp_min_(0)`` it replaces); larger ``q`` are left as they are.
"""

from __future__ import annotations

import math

import torch

#: ``delta = EXPANSION_UNITS * u * (max|x|^2 + max|z|^2)``: two rounded norms, the dot product and
#: two additions, each worth about one unit roundoff of the largest term, with a factor 2 to spare.
#: The GPU tests check the CUDA kernels against this envelope.
EXPANSION_UNITS = 8.0
#: Grid of q on which the profile change is maximised: 0, then log-spaced to where every profile is
#: below float32's resolution of 1.
_Q_GRID = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-14, 3.5, 2000, dtype=torch.float64)])


def expansion_delta(r2: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of the expanded ``q`` for inputs with ``max |x|^2 + max |z|^2 = r2`` in ``dtype``."""
    return EXPANSION_UNITS * torch.finfo(dtype).eps / 2 * float(r2)


def _profile_outputs(kernel, q: torch.Tensor, mode: str) -> list[torch.Tensor]:
    if mode not in ("f", "f_dq", "d"):
        raise ValueError(f"mode must be one of ('f', 'f_dq', 'd'), got {mode!r}")
    f, fp = kernel.profile_and_derivative(q)
    return {"f": [f], "f_dq": [f, fp * q], "d": [fp]}[mode]


def expansion_error(kernel, mode: str, r2: float, dtype: torch.dtype = torch.float32) -> float:
    """Largest change of a fused product's profile entries when ``q`` is off by :func:`expansion_delta`.

    Parameters
    ----------
    kernel : gpscale.kernels.StationaryKernel
        Only its profile ``f`` (and ``f'``) is used.
    mode : {"f", "f_dq", "d"}
        Which profile outputs the product forms: ``f``; ``f`` and ``f' q``; ``f'``.
    r2 : float
        ``max |x|^2 + max |z|^2`` of the centred, lengthscale-divided inputs.
    dtype : torch.dtype
        Precision the expansion is computed in.

    Returns
    -------
    float
        ``max_q max_out |g(q + delta) - g(q)|`` over a grid of ``q`` (``inf`` for outputs singular at
        ``q = 0``, such as Matérn-1/2's ``f'``).  Time: a few thousand profile evaluations.
    """
    delta = expansion_delta(r2, dtype)
    q = _Q_GRID
    worst = 0.0
    for lo, hi in zip(_profile_outputs(kernel, q, mode), _profile_outputs(kernel, q + delta, mode)):
        # Matérn-1/2's f' is defined as 0 at q = 0 (it only ever meets a vanishing factor), but the
        # kernel sees the expanded q > 0 there: its jump is part of the error.
        err = (hi - lo).abs().max().item()
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


def norm_bound(xn: torch.Tensor, zn: torch.Tensor) -> float:
    """``r2 = max |x|^2 + max |z|^2`` from the squared row norms (0 for an empty side); one host sync."""
    return sum(float(t.max()) for t in (xn, zn) if t.numel())


def coincidence_threshold(kernel, xn: torch.Tensor, zn: torch.Tensor) -> float:
    """``delta``, below which an expanded ``q`` is set to 0, for a kernel with a kink at 0; else 0.

    Repeated inputs then get ``q = 0`` (so ``K_ij = s``) exactly, as the diagonal does.  Only pairs
    with a computed ``q <= delta`` change, by at most ``f(0) - f(delta) ~ sqrt(delta)`` for
    Matérn-1/2 -- the size of the error the expansion leaves there anyway.  (Subtracting ``delta``
    from every ``q`` instead, free inside the augmented GEMM, was measured worse: float32 Matérn-1/2,
    n = 2000, no duplicates: max error 4.2e-3 against 3.9e-4, mean 4e-7 against 1e-8 -- the bound is
    pessimistic and the shift biases every pair.)  The threshold, same data with 400 duplicate pairs:
    max error 6.6e-3 -> 1.6e-4, mean 1.3e-7 -> 1.0e-8; without duplicates unchanged (3.9e-4, 1.0e-8).
    One host sync per operator (two maxima).
    """
    if not getattr(kernel, "snap_near_coincident", False) or xn.numel() == 0 or zn.numel() == 0:
        return 0.0
    return expansion_delta(norm_bound(xn, zn), xn.dtype)
