"""Launch the fused kernel-product kernels of ``csrc/`` on torch tensors.

=========  =============  ========  =====================================================
variant    file           dtypes    what
=========  =============  ========  =====================================================
``simt``   kmm_simt.cu    f32, f64  CUDA cores, difference-form distances (exact reference)
``tc``     kmm_tc.cu      f32       tensor cores, 3xTF32 distances, 1xTF32 ``P V`` (~5e-4)
``tc3``    kmm_tc.cu      f32       tensor cores, 3xTF32 distances and ``P V`` (~1e-6)
``tcb``    kmm_tcb.cu     f32       tensor cores, 3xTF32 distances, bf16x3 ``P V`` (~1e-5); the
                                    float32 default since its first H100 run (3.4x KeOps at 1M)
``tcbh``   kmm_tcb.cu     f32       ``tcb`` built with ``TCB_DF16=1``: the same distances from two
           (TCB_DF16=1)             f16 MMAs per k-step instead of three tf32 ones; the float32 default
                                    since the third lent H100 (RBF at 1M under 0.5 s)
=========  =============  ========  =====================================================
"""

from __future__ import annotations

import threading

import torch

from .._validation import check_splits
from .compiler import allow_shared_memory, load_module
from .splits import auto_splits
from .tcb_pack import pack_v, pack_z

#: variant -> (source file, X rows per block, output columns per block, threads per block)
VARIANTS = {"simt": ("kmm_simt.cu", 128, 16, 128), "tc": ("kmm_tc.cu", 64, 16, 128),
            "tc3": ("kmm_tc.cu", 64, 16, 128), "tcb": ("kmm_tcb.cu", 256, 16, 256),
            "tcbh": ("kmm_tcb.cu", 256, 16, 256)}
#: Compile-time definitions of a variant built from a shared source (each build is its own module).
#: ``tcbh``: f16 distances; at d <= 8, 3 blocks per SM (80 registers: 24 warps) and 128-row Z tiles
#: (half the barriers per pair), measured fastest on the third lent H100 (RBF 0.492 s at 1M against 0.525 s
#: with neither; benchmarks/results/tune_tcb_bn128_h100.json).
DEFINES = {"tcbh": ("-DTCB_DF16=1", "-DTCB_MINB=3", "-DTCB_BN=128")}
#: Variants that ``available(compile=True)`` does not compile (and so cannot make unavailable): a
#: variant written without a GPU stays here, opt-in, until its GPU tests have passed on a lent machine
#: (``tcb`` left it on 2026-11-24, ``tcbh`` on the third lent H100).
EXPERIMENTAL: frozenset = frozenset()
KINDS = ("rbf", "matern12", "matern32", "matern52")
MODES = ("f", "f_dq", "d")
#: Largest input dimension the kernels hold in registers.
DMAX = 32
#: The variants built from kmm_tcb.cu: compiled once per k-step count ``ceil(d / 8)`` (entry suffix ``_k1`` ..
#: ``_k4``), their ``Z`` and ``V`` packed by :mod:`.tcb_pack`, their launches split by columns (:mod:`.splits`).
TCB_FAMILY = frozenset({"tcb", "tcbh"})
#: Largest ``|x|`` (scaled inputs) ``tcbh`` takes: ``-2 x`` must stay below f16's 65504 (with room for
#: rounding).  Inputs this large fail the expansion guard of the float32 path long before.
F16_MAX = 16384.0


def build_value(options: tuple[str, ...], name: str, default: int = 0) -> int:
    """``-D<name>=<int>`` of a build's options (the last one wins, as in the compiler); ``default`` if unset."""
    vals = [o.split("=", 1)[1] for o in options if o.startswith(f"-D{name}=")]
    return int(vals[-1]) if vals else default


def build_df16(options: tuple[str, ...]) -> int:
    """``TCB_DF16`` of a kmm_tcb.cu build's ``-D`` options; 0 if unset."""
    return build_value(options, "TCB_DF16", 0)


def tile_rows(variant: str, d: int) -> int:
    """Rows of ``Z`` per tile of a ``tcb``-family entry point: ``TCB_BN`` of its build at ``d <= 8``, else 64."""
    return build_value(DEFINES.get(variant, ()), "TCB_BN", 64) if ksteps(d) == 1 else 64


def z_layout(variant: str) -> int:
    """How :func:`gpscale._ext.tcb_pack.pack_z` lays out ``Z`` for a ``tcb``-family variant: its build's
    ``TCB_DF16`` (0 for ``tcb``; 1 or 2 for ``tcbh``, whichever build :data:`DEFINES` holds)."""
    return build_df16(DEFINES.get(variant, ()))


def triangle_smem(variant: str, d: int) -> int:
    """Dynamic shared memory (bytes) of a symmetric launch of a ``TCB_TRI`` build, 0 for other builds.

    ``TCB_TRI = 1`` (csrc/tcb_tri.cuh) computes a symmetric product ``K(X, X) V`` from one triangle of
    ``K``; a block keeps its rows of ``V`` (256 rows x 16 columns of bf16 hi + lo words, 16 KB) and every
    warp's ``P^T V`` partial of a tile (8 warps x tile rows x 16 columns of float32) there: the
    ``TCB_TRI_SMEM`` of the source.
    """
    if not build_value(DEFINES.get(variant, ()), "TCB_TRI"):
        return 0
    rows, warps = VARIANTS[variant][1], VARIANTS[variant][3] // 32
    return (rows // 16 * 2 * 32 + warps * tile_rows(variant, d) // 16 * 2 * 32) * 16


def parse_build(text: str) -> tuple[str, ...]:
    """``"-DTCB_DF16=2 -DTCB_BN=128"`` -> the options of a candidate kmm_tcb.cu build, as :data:`DEFINES` holds them.

    For the benchmarks and the GPU tests (``--tcbh-build``), which time and test a build on a lent GPU
    before it ships; raises ``ValueError`` on anything but ``-DTCB_NAME=VALUE`` options.
    """
    opts = tuple(text.split())
    bad = [o for o in opts if not (o.startswith("-DTCB_") and "=" in o)]
    if bad or not opts:
        raise ValueError(f"a kmm_tcb.cu build is -DTCB_NAME=VALUE options, e.g. '-DTCB_DF16=2 -DTCB_BN=128'; got "
                         f"{text!r}")
    return opts


_MODULES: dict = {}
_LOCK = threading.Lock()


def entry_names(variant: str) -> list[str]:
    """All ``extern "C"`` entry points of a variant, in the naming scheme of the ``.cu`` files."""
    return [f"{p}_{k}_{m}" for p in _prefixes(variant) for k in KINDS for m in MODES]


def _prefixes(variant: str) -> list[str]:
    if variant == "simt":
        return ["gpscale_kmm_simt_f32", "gpscale_kmm_simt_f64"]
    if variant in TCB_FAMILY:
        return [f"gpscale_kmm_{variant}_k{ks}" for ks in range(1, DMAX // 8 + 1)]
    return [f"gpscale_kmm_{variant}"]


def ksteps(d: int) -> int:
    """8-wide k-steps of the tensor-core kernels for input dimension ``d``: ``ceil(d / 8)``, at least 1.

    ``tcb`` is compiled per k-step count (its entry points' ``_k`` suffix) and its packed ``Z``
    (:func:`gpscale._ext.tcb_pack.pack_z`) must have the same count: both take it from here.
    """
    return max(1, -(-d // 8))


def entry_name(variant: str, kernel: str, mode: str, dtype: torch.dtype, d: int) -> str:
    """The entry point a product runs: by dtype for ``simt``, by ``ceil(d / 8)`` for ``tcb``."""
    if variant == "simt":
        prefix = f"gpscale_kmm_simt_{'f64' if dtype == torch.float64 else 'f32'}"
    elif variant in TCB_FAMILY:
        prefix = f"gpscale_kmm_{variant}_k{ksteps(d)}"
    else:
        prefix = f"gpscale_kmm_{variant}"
    return f"{prefix}_{kernel}_{mode}"


def _build(variant: str) -> tuple[str, tuple]:
    return VARIANTS[variant][0], DEFINES.get(variant, ())


def builds() -> dict[tuple[str, tuple], list[str]]:
    """``{(source file, defines): variants}``: what is compiled, one module per key (CI compiles each)."""
    out: dict = {}
    for v in VARIANTS:
        out.setdefault(_build(v), []).append(v)
    return out


def _module(variant: str, device: torch.device) -> dict:
    key = (*_build(variant), device.index)
    with _LOCK:
        if key not in _MODULES:  # every variant of the same build shares its module (tc and tc3)
            names = sorted({e for v in builds()[key[:2]] for e in entry_names(v)})
            _MODULES[key] = load_module(key[0], names, device, options=key[1])
    return _MODULES[key]


def _check(X, Z, V, variant, kind, mode):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    if kind not in KINDS:
        raise ValueError(f"kernel must be one of {KINDS}, got {kind!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, t in (("X", X), ("Z", Z), ("V", V)):
        if not t.is_cuda:
            raise ValueError(f"{name} must be a CUDA tensor for gpscale's CUDA kernels, got device {t.device}")
        if t.dtype != X.dtype or t.device != X.device:
            raise ValueError(f"X, Z and V must share dtype and device; {name} has {t.dtype} on {t.device}")
    ok_dtypes = (torch.float32, torch.float64) if variant == "simt" else (torch.float32,)
    if X.dtype not in ok_dtypes:
        raise ValueError(f"variant {variant!r} supports {ok_dtypes}, got {X.dtype}; use variant='simt' for float64")
    if X.shape[1] != Z.shape[1] or V.shape[0] != Z.shape[0]:
        raise ValueError(f"shape mismatch: X {tuple(X.shape)}, Z {tuple(Z.shape)}, V {tuple(V.shape)}")
    if X.shape[1] > DMAX:
        raise ValueError(f"the CUDA kernels support d <= {DMAX} input dimensions, got d={X.shape[1]}; "
                         "use backend='keops' or 'torch'")
    if max(X.shape[0], Z.shape[0], V.shape[1]) >= 2**31:
        raise ValueError("sizes must be < 2^31 (32-bit indices in the kernels)")


def max_abs(X: torch.Tensor, Z: torch.Tensor) -> float:
    """Largest ``|entry|`` of non-empty ``X`` and ``Z`` (NaN if any is NaN): one host synchronisation."""
    return torch.stack([X.detach().abs().amax(), Z.detach().abs().amax()]).amax().item()


def _check_f16_range(X: torch.Tensor, Z: torch.Tensor, big: float | None = None) -> None:
    # big: max_abs(X, Z) when the caller already knows it (an operator, once), else measured here
    big = max_abs(X, Z) if big is None else big
    if big != big or big == float("inf"):  # no variant can help: the inputs themselves are broken
        raise ValueError(f"the scaled inputs X / lengthscale contain NaN or Inf (max |x| = {big:g}); find them with "
                         "torch.isfinite(X) and check the lengthscales are finite and positive")
    if not big <= F16_MAX:
        raise ValueError(f"variant 'tcbh' splits the scaled inputs into f16 and needs |x| <= {F16_MAX:g}, got "
                         f"{big:g}; use variant 'tcb' (or centre the inputs and check the lengthscales)")


def _launch_inputs(variant: str, X: torch.Tensor, Z: torch.Tensor, V: torch.Tensor, d: int,
                   inputs_max_abs: float | None) -> list:
    """The kernel's operands after ``X``: ``Z`` and ``V`` as given, or a tcb build's split ``Zf, Zn, Vf``."""
    if variant not in TCB_FAMILY:
        return [Z, V]
    if variant == "tcbh":
        _check_f16_range(X, Z, inputs_max_abs)
    Zf, Zn = pack_z(Z, ksteps(d), f16=z_layout(variant))  # the layout of the build that runs (see tcb_pack)
    return [Zf, Zn, pack_v(V)]


def _launch(X, Z, V, O0, O1, kernel: str, mode: str, variant: str, symmetric: bool, inputs_max_abs, splits) -> None:
    """One launch of ``variant``'s entry into the zeroed ``O0`` (, ``O1``); :func:`kernel_matmul` checked the rest."""
    n, d = X.shape
    m, t = V.shape
    _, rows, tch, threads = VARIANTS[variant]
    fn = _module(variant, X.device)[entry_name(variant, kernel, mode, X.dtype, d)]
    blocks = ((n + rows - 1) // rows, (t + tch - 1) // tch)
    inputs = _launch_inputs(variant, X, Z, V, d, inputs_max_abs)
    # TCB_TRI builds sweep one triangle of a symmetric product and add into the zeroed outputs (the
    # f_dq kernels sweep all of K): one run of tiles per block, S = 1
    smem = triangle_smem(variant, d) if symmetric and mode != "f_dq" else 0
    if smem:
        S = 1
    elif splits == "auto":
        S = auto_splits(fn, threads, X.device, blocks[0] * blocks[1], -(-m // tile_rows(variant, d)),
                        O0.numel() * O0.element_size() * (2 if mode == "f_dq" else 1)) if variant in TCB_FAMILY else 1
    else:
        S = splits
    P0 = torch.empty(S, n, t, dtype=X.dtype, device=X.device) if S > 1 else O0  # S partial outputs
    P1 = (torch.empty_like(P0) if S > 1 else O1) if mode == "f_dq" else P0
    with torch.cuda.device(X.device):
        allow_shared_memory(fn, smem)  # a no-op at 0 (every launch but a TCB_TRI build's symmetric one)
        fn((*blocks, S), (threads, 1, 1), [X, *inputs, P0, P1, n, m, d, t, int(bool(symmetric))], shared_mem=smem)
    if S > 1:
        torch.sum(P0, 0, out=O0)
        if mode == "f_dq":
            torch.sum(P1, 0, out=O1)


def kernel_matmul(X: torch.Tensor, Z: torch.Tensor, V: torch.Tensor, kernel: str, *, mode: str = "f",
                  variant: str = "tc3", symmetric: bool = False, inputs_max_abs: float | None = None,
                  splits: int | str = 1):
    """Profile products of scaled inputs on the GPU: ``F V`` (and ``(F' o Q) V`` / ``F' V``).

    Parameters
    ----------
    X : (n, d) CUDA tensor, Z : (m, d) CUDA tensor
        Centred inputs divided by the lengthscales (the operators' ``_Xs``, ``_Zs``).
    V : (m, t) CUDA tensor
    kernel : {"rbf", "matern12", "matern32", "matern52"}
    mode : {"f", "f_dq", "d"}
        See :mod:`gpscale.operators.backends`.
    variant : {"simt", "tc", "tc3", "tcb", "tcbh"}
    symmetric : bool
        ``Z`` is ``X``: the kernels set ``q_ii = 0`` exactly.
    inputs_max_abs : float, optional
        :func:`max_abs` of ``X`` and ``Z`` if the caller knows it (``tcbh`` checks its f16 range with it;
        without it, ``tcbh`` measures it: one host synchronisation per call).
    splits : int or "auto"
        Column splits of ``tcb`` / ``tcbh`` launches (:mod:`gpscale._ext.splits`): each output tile summed
        over this many runs of ``Z`` tiles by separate blocks, into partial outputs that are then added.
        ``"auto"`` picks it from the grid and the device's occupancy; other variants take 1, and so do the
        symmetric ``f`` / ``d`` products of a ``TCB_TRI`` build (:func:`triangle_smem`), which sweep one
        triangle of ``K`` and add ``P^T V`` into the rows past each block's diagonal (float atomics: their
        last bits vary from run to run).

    Returns
    -------
    (n, t) tensor, or a pair of them for ``mode="f_dq"``.

    Notes
    -----
    Time :math:`O(n m (d + t))`, one ``exp`` per pair and column chunk of 16; extra memory the
    outputs (and for ``tcb`` split copies of ``Z`` and ``V``, :mod:`gpscale._ext.tcb_pack`).  The
    first call per variant and device compiles ``csrc/`` (seconds) or loads the cached cubin.
    """
    check_splits(splits)
    if splits not in (1, "auto") and variant not in TCB_FAMILY:
        raise ValueError(f"column splits are a tcb / tcbh launch option; variant {variant!r} takes splits=1")
    _check(X, Z, V, variant, kernel, mode)
    if symmetric and X.shape != Z.shape:  # a TCB_TRI build reads Z's rows as X's: it would be silently wrong
        raise ValueError(f"symmetric=True means Z is X, but X is {tuple(X.shape)} and Z {tuple(Z.shape)}; "
                         "pass symmetric=False for a cross product")
    X, Z, V = X.contiguous(), Z.contiguous(), V.contiguous()
    n, d = X.shape
    m, t = V.shape
    O0 = torch.zeros(n, t, dtype=X.dtype, device=X.device)
    O1 = torch.zeros_like(O0) if mode == "f_dq" else O0
    if n == 0 or t == 0:
        return (O0, O1) if mode == "f_dq" else O0
    if m > 0:
        _launch(X, Z, V, O0, O1, kernel, mode, variant, symmetric, inputs_max_abs, splits)
    return (O0, O1) if mode == "f_dq" else O0

