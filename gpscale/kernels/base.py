"""Stationary kernel base class: hyperparameters, transforms and the dense reference.

Every gpscale kernel is *stationary* and written as

.. math:: k(x, z) = s \\, f(q), \\qquad q = \\sum_d (x_d - z_d)^2 / \\ell_d^2,

with outputscale :math:`s > 0`, lengthscales :math:`\\ell_d > 0` (one shared or one per dimension,
"ARD") and a profile :math:`f` of the squared scaled distance ``q``.  Writing every kernel this way lets
the operators compute products, derivative products and gradients for all kernels with one code
path: a kernel only supplies :math:`f(q)` and :math:`f'(q)`.

Positivity
----------
Hyperparameters are stored unconstrained (``raw_*``) and mapped through
``softplus(raw) + 1e-6`` (the same transform GPyTorch uses, so fitted values are comparable).
``kernel.parameters()`` are these raw tensors; ``kernel.lengthscale`` / ``kernel.outputscale`` are the
constrained values and carry autograd to the raw ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import softplus

from .._validation import check_positive_hyper

_FLOOR = 1e-6


def to_raw(value: torch.Tensor) -> torch.Tensor:
    """Inverse of the positive transform ``softplus(raw) + 1e-6``."""
    v = value - _FLOOR
    # softplus^{-1}(v) = v + log(-expm1(-v)), stable for large and small v.
    return v + torch.log(-torch.expm1(-v))


def to_positive(raw: torch.Tensor) -> torch.Tensor:
    """Positive transform ``softplus(raw) + 1e-6`` used for every hyperparameter."""
    return softplus(raw) + _FLOOR


def floor_sqdist_(q: torch.Tensor, snap: float = 0.0) -> torch.Tensor:
    """In place: an expanded squared distance's round-off below 0 set to 0 -- and, with ``snap > 0``,
    every ``q <= snap`` too (kernels with a kink at 0, see ``StationaryKernel.snap_near_coincident``).

    One elementwise pass either way (``threshold_`` where ``clamp_min_`` would do).
    """
    return torch.nn.functional.threshold_(q, snap, 0.0) if snap else q.clamp_min_(0.0)


class StationaryKernel(nn.Module):
    """Base class of gpscale's stationary kernels :math:`s f(\\|(x-z)/\\ell\\|^2)`.

    Parameters
    ----------
    lengthscale : float or sequence or tensor, default 1.0
        A scalar for one shared lengthscale, or a 1-D tensor of length ``d`` for ARD.
    outputscale : float, default 1.0
        Signal variance :math:`s`.
    ard_num_dims : int, optional
        Shortcut for ARD: replicate a scalar ``lengthscale`` over ``ard_num_dims`` dimensions.

    Notes
    -----
    Subclasses implement :meth:`profile` (``f(q)``) and :meth:`profile_derivative` (``f'(q)``), both
    elementwise and safe at ``q = 0``.
    """

    #: short name used by the estimator and the CLI
    name = "stationary"

    def __init__(self, lengthscale=1.0, outputscale=1.0, ard_num_dims: int | None = None):
        super().__init__()
        # Stored in float64 whatever the data dtype: products cast a snapshot to the data's dtype,
        # and a float32 store would cost ~1e-8 relative when the same kernel serves float64 data.
        ls = torch.as_tensor(lengthscale, dtype=torch.float64).detach().clone()
        if ls.dim() > 1:
            raise ValueError(
                f"lengthscale must be a scalar or a 1-D tensor of length d, got shape {tuple(ls.shape)}"
            )
        if ard_num_dims is not None:
            if ls.dim() == 0 or ls.numel() == 1:
                ls = ls.reshape(()).repeat(int(ard_num_dims))
            elif ls.numel() != ard_num_dims:
                raise ValueError(f"lengthscale has {ls.numel()} entries but ard_num_dims={ard_num_dims}")
        os_ = torch.as_tensor(outputscale, dtype=ls.dtype).detach().clone()
        if os_.dim() != 0:
            raise ValueError("outputscale must be a scalar")
        check_positive_hyper("lengthscale", ls)
        check_positive_hyper("outputscale", os_)
        self.raw_lengthscale = nn.Parameter(to_raw(ls))
        self.raw_outputscale = nn.Parameter(to_raw(os_))

    # ------------------------------------------------------------------ hyperparameters
    @property
    def lengthscale(self) -> torch.Tensor:
        """Constrained lengthscale(s): a scalar tensor, or shape ``(d,)`` for ARD."""
        return to_positive(self.raw_lengthscale)

    @lengthscale.setter
    def lengthscale(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_lengthscale.dtype)
        if value.numel() != 1 and value.shape != self.raw_lengthscale.shape:
            want = f"a scalar or {self.raw_lengthscale.numel()} values (one per input dimension)" if self.ard \
                else "a scalar (this kernel has one shared lengthscale; build it with ard_num_dims=d for ARD)"
            raise ValueError(f"lengthscale must be {want}, got shape {tuple(value.shape)}")
        check_positive_hyper("lengthscale", value)
        with torch.no_grad():
            self.raw_lengthscale.copy_(to_raw(value).reshape(-1 if value.numel() > 1 else ()).expand_as(
                self.raw_lengthscale))

    @property
    def outputscale(self) -> torch.Tensor:
        """Constrained outputscale :math:`s`."""
        return to_positive(self.raw_outputscale)

    @outputscale.setter
    def outputscale(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_outputscale.dtype)
        check_positive_hyper("outputscale", value)
        with torch.no_grad():
            self.raw_outputscale.copy_(to_raw(value))

    @property
    def ard(self) -> bool:
        """Whether the kernel has one lengthscale per input dimension."""
        return self.raw_lengthscale.dim() == 1

    def check_dims(self, d: int) -> None:
        """Raise a clear error when an ARD kernel meets inputs of the wrong width."""
        if self.ard and self.raw_lengthscale.numel() != d:
            raise ValueError(
                f"{type(self).__name__} has {self.raw_lengthscale.numel()} ARD lengthscales but X has "
                f"d={d} columns; build the kernel with ard_num_dims={d} (or a length-{d} lengthscale)"
            )

    def hyper_values(self, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(lengthscale, outputscale)``, keeping the autograd graph to the raw parameters."""
        ls, s = self.lengthscale, self.outputscale
        if dtype is not None or device is not None:
            ls, s = ls.to(dtype=dtype, device=device), s.to(dtype=dtype, device=device)
        return ls, s

    # ------------------------------------------------------------------ profile
    def profile(self, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``f(q)``: the kernel as a function of the squared scaled distance ``q >= 0``."""
        raise NotImplementedError

    def profile_derivative(self, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``f'(q) = df/dq``, finite (or zero by the limit argument) at ``q = 0``."""
        raise NotImplementedError

    #: The tiled products compute ``u = sqdist_scale * q`` in one GEMM; see :meth:`profile_scaled_`.
    sqdist_scale = 1.0
    #: ``f`` has a kink at ``q = 0`` (``f ~ 1 - c sqrt(q)``), so the expanded distance's residue at
    #: repeated inputs would cost ``O(sqrt(eps))``: the tiled products then set ``q`` below the
    #: expansion's error bound to 0 (:func:`gpscale.operators.expansion.coincidence_threshold`).
    snap_near_coincident = False

    def profile_(self, q: torch.Tensor) -> torch.Tensor:
        """``f(q)``, allowed to overwrite ``q`` (subclasses do it in place to save memory passes)."""
        return self.profile(q)

    def profile_scaled_(self, u: torch.Tensor, snap: float = 0.0) -> torch.Tensor:
        """``f(u / sqdist_scale)`` from a tile ``u`` that may be overwritten.

        ``u`` comes from an expanded-distance GEMM and can be slightly out of range by round-off
        (``q < 0``); implementations clamp where their formula needs it.  ``snap > 0``: every
        ``q <= snap`` becomes 0 in the same pass (see :attr:`snap_near_coincident`).
        """
        if self.sqdist_scale != 1.0:
            u = u.div_(self.sqdist_scale)
        return self.profile_(floor_sqdist_(u, snap))

    # ------------------------------------------------------------------ dense reference
    def forward(self, X: torch.Tensor, Z: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ``K(X, Z)`` through plain torch ops (autograd-capable reference).

        Complexity :math:`O(n m d)` time and :math:`O(n m)` memory (also in backward: ``cdist`` in its
        difference mode never forms the ``(n, m, d)`` tensor of differences, and it is exact -- no
        expanded-distance cancellation).  Used by tests as the oracle and by the Cholesky path; the
        operators in :mod:`gpscale.operators` never call this on the full data.
        """
        ls, s = self.hyper_values(X.dtype, X.device)
        return self.evaluate(X, X if Z is None else Z, ls, s)

    def evaluate(self, X: torch.Tensor, Z: torch.Tensor, lengthscale: torch.Tensor,
                 outputscale: torch.Tensor) -> torch.Tensor:
        """Dense ``s f(|(x - z)/ℓ|²)`` for *given* hyperparameter tensors (autograd flows into them).

        What :meth:`forward` computes with the module's own values; integrations whose
        hyperparameters live elsewhere (GPyTorch's constrained tensors) call it directly.
        ``lengthscale`` is a scalar or ``(d,)``; same cost and exactness as :meth:`forward`.
        """
        dist = torch.cdist(X / lengthscale, Z / lengthscale, compute_mode="donot_use_mm_for_euclid_dist")
        return outputscale * self.profile(dist * dist)

    def extra_repr(self) -> str:
        ls = self.lengthscale.detach()
        ls_txt = f"{ls.item():.4g}" if ls.dim() == 0 else "[" + ", ".join(f"{v:.3g}" for v in ls.tolist()) + "]"
        return f"lengthscale={ls_txt}, outputscale={self.outputscale.item():.4g}"


SQRT3 = math.sqrt(3.0)
SQRT5 = math.sqrt(5.0)
