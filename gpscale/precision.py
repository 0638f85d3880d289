"""Precision policies for mixed-precision BBMM: low-precision kernel products, safe CG state.

A :class:`PrecisionPolicy` separates two things that plain BBMM ties together:

* the **product dtype** -- the arithmetic of the kernel products ``K V`` (``float32``, ``tf32``,
  ``bfloat16`` or ``float16``): the tile ``F`` and the right-hand-side block are rounded to it and
  the GEMM accumulates in float32 (tensor-core semantics);
* the **state dtype** -- the precision of every CG vector (``x, r, z, p``), of the inner products
  and of the Lanczos coefficients (``float32`` or ``float64``; never 16-bit).

and switches on the three fixes that make low-precision CG safe (Maddox, Potapczynski & Wilson, "Low-
Precision Arithmetic for Fast Gaussian Processes", UAI 2022): rescaling of the right-hand sides,
re-orthogonalisation of the residuals, and -- gpscale's addition -- stagnation detection with an
automatic fallback to a full-precision product for the columns that stall.  See
:mod:`gpscale.solvers.mixed` and ``docs/precision.md``.

The policy is an explicit argument (``precision=``) of :func:`gpscale.cg`,
:func:`gpscale.marginal_log_likelihood` and :class:`gpscale.ExactGP`; nothing is set globally (TF32
is switched on only around the GEMM that asks for it, see :func:`lowp_mm`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ._validation import check_bool

#: Accepted product precisions, from the most to the least accurate.
PRODUCT_DTYPES = ("float64", "float32", "tf32", "bfloat16", "float16")
#: Accepted CG-state precisions.
STATE_DTYPES = ("float32", "float64")
#: Unit roundoff of each product precision (mantissa bits incl. the implicit one: 53, 24, 11, 8, 11).
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "tf32": 2.0 ** -11, "bfloat16": 2.0 ** -8,
                 "float16": 2.0 ** -11}
_REORTH = ("auto", "none", "full", "window")
_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


def dtype_name(dtype) -> str:
    """Normalise ``torch.bfloat16`` / ``"bf16"`` / ``"tf32"`` ... to a name in :data:`PRODUCT_DTYPES`."""
    if isinstance(dtype, torch.dtype):
        for name, d in _TORCH_DTYPES.items():
            if d == dtype:
                return name
        raise ValueError(f"unsupported dtype {dtype}; use one of {PRODUCT_DTYPES}")
    aliases = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32", "bf16": "bfloat16",
               "fp16": "float16", "half": "float16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower()) if isinstance(dtype, str) else None
    if name not in PRODUCT_DTYPES:
        raise ValueError(f"unknown precision {dtype!r}; use one of {PRODUCT_DTYPES} (or a torch dtype)")
    return name


def storage_dtype(precision) -> torch.dtype:
    """The dtype a tile rounded to ``precision`` is held in (:func:`round_to`; tf32 keeps float32 storage)."""
    return _TORCH_DTYPES.get(dtype_name(precision), torch.float32)


def is_low_precision(name: str | None) -> bool:
    """True for products that round their operands below float32 (``tf32``, ``bfloat16``, ``float16``)."""
    return name in ("tf32", "bfloat16", "float16")


@dataclass(frozen=True)
class PrecisionPolicy:
    """How BBMM trades precision for speed (immutable; pass it as ``precision=``).

    Parameters
    ----------
    product : {"float32", "tf32", "bfloat16", "float16"} or torch.dtype, default "float32"
        Arithmetic of the kernel products.  16-bit products round the kernel tile and the right-hand
        side and accumulate in float32; ``tf32`` rounds both to a 10-bit mantissa (CUDA: tensor cores,
        switched on locally; CPU: emulated by rounding).  ``"float64"`` is accepted for symmetry.
    state : {"float32", "float64"} or torch.dtype, default "float32"
        Precision of the CG vectors, inner products and Lanczos coefficients.  16-bit state is
        refused: the recurrences lose orthogonality within a few steps at 3 significant digits.
    rescale : bool, default True
        Solve for ``B / ||B||`` column by column (Maddox et al.) and scale every right-hand side block
        by a power of two before rounding it to the product dtype, so nothing overflows (float16
        saturates at 65504) or underflows (float16 loses digits below 6e-5).
    reorth : {"auto", "none", "full", "window"}, default "auto"
        Re-orthogonalise each new residual against earlier ones (in the preconditioner's inner
        product).  ``auto``: ``full`` for 16-bit/TF32 products, ``none`` otherwise.
    reorth_window : int, optional
        ``window``: keep the last this many residuals (default 20).  ``full`` keeps all of them while
        they fit ``reorth_memory``, then the most recent that fit.
    reorth_memory : int, default 1 GiB
        Byte cap of the stored residuals (``2 n t`` numbers per kept step).
    stall_window : int, default 20
        A column *stagnates* when its residual norm has not reached a new minimum below
        ``(1 - stall_decrease)`` times the best so far for this many iterations; 0 disables.
    stall_decrease : float, default 0.01
    fallback : bool, default True
        Columns that stagnate, break down, go non-finite, or whose true residual (one product in the
        fallback precision) misses the tolerance continue in ``fallback_product``.
    fallback_product : str or torch.dtype, default "float32"
        Product precision of the fallback phase (``"float64"`` needs float64 inputs).
    refine_steps : int, default 4
        Before falling back, columns that are only inaccurate (not broken down) get up to this many
        cycles of mixed-precision iterative refinement: true residual in ``fallback_product``,
        correction solved in ``product`` just as tightly as the cycle needs.  0 disables.
    refine_rtol : float, default 0.1
        Tightest relative tolerance of a refinement's inner solve (a column near its tolerance gets
        a looser one: half the reduction it still needs, :data:`gpscale.solvers.mixed.REFINE_MARGIN`).
    lowrank_correction : {"auto", True, False}, default "auto"
        With a low-rank preconditioner :math:`P = LL^T + D` (pivoted Cholesky, RPCholesky, Nyström),
        round only the residual kernel :math:`K - LL^T` and add :math:`L(L^T V)` in the state
        precision.  The rounding error :math:`E` scales with the entries it rounds, and those of the
        residual are several times smaller than the kernel's: measured :math:`\\|A^{-1}E\\|_2` 6x
        smaller at rank 100 (``benchmarks/lowp_perturbation.py``, docs/precision.md).  Costs one
        ``k``-wide GEMM per cached tile (once per operator) and :math:`O(nkt)` per product.
        ``"auto"``: on for ``float16`` and ``tf32`` (unit roundoff :math:`2^{-11}`), off for
        ``bfloat16``: corrected bf16 solves stay in bf16, but the log-determinant bias, second order in
        :math:`E` and so ~64x fp16's, then steers fits (measured: a pol fit's noise 3.1 -> 5.8 and
        test RMSE +1.9%), whereas plain bf16 falls back to float32 and stays accurate.

    Examples
    --------
    >>> policy = PrecisionPolicy("bfloat16")               # all fixes on
    >>> naive = PrecisionPolicy("float16", rescale=False, reorth="none", fallback=False)
    >>> gpscale.marginal_log_likelihood(X, y, kernel, noise, precision=policy)

    References
    ----------
    Maddox, Potapczynski & Wilson, UAI 2022 (half-precision CG with re-orthogonalisation and
    rescaling); Paige (1976) and Parlett & Scott (1979) on the loss of orthogonality in Lanczos.
    """

    product: str = "float32"
    state: str = "float32"
    rescale: bool = True
    reorth: str = "auto"
    reorth_window: int | None = None
    reorth_memory: int = 1 << 30
    stall_window: int = 20
    stall_decrease: float = 0.01
    fallback: bool = True
    fallback_product: str = "float32"
    refine_steps: int = 4
    refine_rtol: float = 0.1
    lowrank_correction: bool | str = "auto"

    def __post_init__(self):
        # Normalise names in place (frozen dataclass: object.__setattr__ is the documented escape).
        object.__setattr__(self, "product", dtype_name(self.product))
        state = self.state
        if isinstance(state, torch.dtype) and state in (torch.float16, torch.bfloat16) or \
                (isinstance(state, str) and dtype_name(state) in ("float16", "bfloat16", "tf32")):
            raise ValueError(f"state={state!r}: the CG state (vectors, inner products, Lanczos coefficients) must be "
                             "float32 or float64; put the low precision in the product instead, e.g. "
                             f"PrecisionPolicy(product={state!r}, state='float32')")
        object.__setattr__(self, "state", dtype_name(state))
        object.__setattr__(self, "fallback_product", dtype_name(self.fallback_product))
        if is_low_precision(self.fallback_product):
            raise ValueError(f"fallback_product must be float32 or float64 (the precision that rescues a stalled "
                             f"column), got {self.fallback_product!r}")
        if self.reorth not in _REORTH:
            raise ValueError(f"reorth must be one of {_REORTH}, got {self.reorth!r}")
        if self.reorth_window is not None and (not isinstance(self.reorth_window, int) or self.reorth_window < 1):
            raise ValueError(f"reorth_window must be a positive int or None, got {self.reorth_window!r}")
        if not isinstance(self.reorth_memory, int) or self.reorth_memory < 1:
            raise ValueError(f"reorth_memory must be a positive number of bytes, got {self.reorth_memory!r}")
        if not isinstance(self.stall_window, int) or self.stall_window < 0:
            raise ValueError(f"stall_window must be an int >= 0 (0 disables), got {self.stall_window!r}")
        if not 0.0 <= float(self.stall_decrease) < 1.0:
            raise ValueError(f"stall_decrease must be in [0, 1), got {self.stall_decrease!r}")
        if not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be an int >= 0, got {self.refine_steps!r}")
        if not 0.0 < float(self.refine_rtol) < 1.0:
            raise ValueError(f"refine_rtol must be in (0, 1), got {self.refine_rtol!r}")
        for name in ("rescale", "fallback"):
            check_bool(name, getattr(self, name))
        if self.lowrank_correction != "auto" and not isinstance(self.lowrank_correction, bool):
            raise TypeError(f"lowrank_correction must be 'auto', True or False, got {self.lowrank_correction!r}")

    # ------------------------------------------------------------------ derived
    @property
    def low_precision(self) -> bool:
        """Whether the products round below float32."""
        return is_low_precision(self.product)

    @property
    def state_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.state]

    @property
    def resolved_lowrank_correction(self) -> bool:
        """``lowrank_correction`` with ``auto`` resolved: on for float16/tf32 (unit roundoff 2^-11), off otherwise."""
        if self.lowrank_correction == "auto":  # the 11-bit formats; bf16's bias steers fits (see above)
            return self.low_precision and UNIT_ROUNDOFF[self.product] <= 2.0 ** -11
        return bool(self.lowrank_correction) and self.low_precision

    @property
    def resolved_reorth(self) -> str:
        """``reorth`` with ``auto`` resolved (``full`` for low-precision products, else ``none``)."""
        if self.reorth == "auto":
            return "full" if self.low_precision else "none"
        return self.reorth

    def reorth_steps(self, n: int, t: int) -> int:
        """How many earlier residuals each column keeps (0 = no re-orthogonalisation)."""
        mode = self.resolved_reorth
        if mode == "none":
            return 0
        el = torch.empty((), dtype=self.state_dtype).element_size()
        cap = max(1, self.reorth_memory // max(1, 2 * n * t * el))
        if mode == "window":
            return max(1, min(cap, self.reorth_window or 20))
        return cap

    def with_product(self, product) -> "PrecisionPolicy":
        """The same policy with another product precision."""
        import dataclasses

        return dataclasses.replace(self, product=product)


#: The plain float32 product and float32 state of gpscale without a policy.
FLOAT32 = PrecisionPolicy()


class PrecisionWarning(UserWarning):
    """A low-precision result that float32 products would give noticeably differently."""


def as_policy(precision) -> PrecisionPolicy | None:
    """``None`` stays ``None``; a dtype or name becomes ``PrecisionPolicy(product=...)``."""
    if precision is None or isinstance(precision, PrecisionPolicy):
        return precision
    if isinstance(precision, (str, torch.dtype)):
        return PrecisionPolicy(product=precision)
    raise TypeError(f"precision must be a gpscale.PrecisionPolicy, a dtype name or None, got "
                    f"{type(precision).__name__}")


#: consecutive solves in which every CG column fell back after which a caller (``ExactGP.fit``, the
#: GPyTorch backend) stops using its low-precision policy
LOW_PRECISION_GIVE_UP = 2


class FallbackStreak:
    """Counts consecutive low-precision solves whose every column fell back to the fallback precision.

    Past ``||A^-1 E|| ~ 1/2`` (large n, small noise: docs/precision.md) every column stagnates in 16
    bits and is redone in float32, so each solve pays for both (measured on an H100 at n = 200k: 1.6x
    float32's time).  Hyperparameters move slowly between a training run's solves, so
    :data:`LOW_PRECISION_GIVE_UP` such solves in a row predict the rest.
    """

    def __init__(self):
        self.count = 0

    def update(self, policy: PrecisionPolicy | None, stats: dict) -> bool:
        """Record one solve's CG ``stats``; ``True`` once ``policy`` has only cost time.

        Solves without a low-precision policy (none, float32, float64) never count.
        """
        if policy is None or not policy.low_precision or not stats.get("columns"):
            return False
        self.count = 0 if stats.get("low_precision_columns") else self.count + 1
        return self.count >= LOW_PRECISION_GIVE_UP


# ---------------------------------------------------------------------- low-precision GEMM
def round_to(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` rounded to the product precision ``name`` (bf16/fp16 tensors; tf32 as float32 values)."""
    if name in ("bfloat16", "float16"):
        return t.to(_TORCH_DTYPES[name])
    if name == "tf32":
        # Round to nearest on the 13 dropped mantissa bits of float32 (ties away from zero), which is
        # what the tensor cores see; the result stays a float32 tensor.
        bits = t.to(torch.float32).contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return t.to(_TORCH_DTYPES[name]) if name in _TORCH_DTYPES else t


@contextlib.contextmanager
def _local_cuda_flags(tf32: bool):
    """Set the CUDA matmul flags for one GEMM and restore them afterwards (never a global switch)."""
    m = torch.backends.cuda.matmul
    old = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    try:
        m.allow_tf32 = tf32
        # Accumulate 16-bit GEMMs in float32 (cuBLAS may otherwise reduce in 16 bits).
        m.allow_bf16_reduced_precision_reduction = False
        m.allow_fp16_reduced_precision_reduction = False
        yield
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = old


def lowp_mm(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    """``a @ b`` with operands already rounded to ``name`` (:func:`round_to`), float32 result.

    CUDA: bf16/fp16 tensor-core GEMM with float32 output (``torch.mm(..., out_dtype=)``) where torch
    offers it, else the 16-bit result widened; TF32 with the flag switched on for this call only.
    CPU (no tensor cores): the operands are widened to float32 and multiplied there.  This is exact
    emulation, not an approximation: a product of two bf16 (8-bit) or fp16 (11-bit) mantissas fits the
    24-bit float32 mantissa, so only the float32 accumulation rounds -- as on the tensor cores.
    """
    if name in ("float32", "float64"):
        return (a @ b).float()
    if a.device.type == "cuda":
        if name == "tf32":
            with _local_cuda_flags(True):
                return a @ b
        with _local_cuda_flags(False):
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError):  # older torch: 16-bit output, float32 accumulate
                return (a @ b).float()
    return a.float() @ b.float()


def scale_columns(V: torch.Tensor) -> torch.Tensor:
    """Per-column power-of-two factors ``s`` with ``max |V_:j| * s_j`` in ``[0.5, 1)``.

    Powers of two make the scaling exact in every binary format; computed on the device (no host
    synchronisation).  Zero columns get factor 1.
    """
    m = V.abs().amax(0).to(torch.float32)
    e = torch.floor(torch.log2(torch.where(m > 0, m, torch.ones_like(m)))) + 1.0
    return torch.exp2(-e).to(V.dtype)
