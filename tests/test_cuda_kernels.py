"""GPU tests of gpscale's fused CUDA kernels against the float64 pure-torch reference.

Every kernel (RBF, Matérn 1/2, 3/2, 5/2), variant (``simt`` f32/f64, ``tc``, ``tc3``, ``tcb``, ``tcbh``) and product mode
(``f``, ``f_dq``, ``d``) on sizes that divide none of the tile sizes (64/128 rows, 16 columns),
lengthscales 0.05..10, d from 1 to 32 and t from 1 to 64; then the operators and derivative
products with ``backend="cuda"``.  Skipped (with the reason) without a CUDA device.

Error measure, per output entry: ``|got - want| <= rtol * max(max(|G| |V|), max|V|) + env``.  ``want`` is the
float64 product of the *float32-rounded* inputs (input rounding is not the kernel's error: it moves
Matérn-1/2's singular ``f'`` by 100% near coincident points whatever the kernel does), ``|G| |V|``
is the product of absolute values -- the natural scale of a sum's rounding error, which keeps
long-lengthscale cases, where every entry is near 1 and the rounding of P is correlated, fair --
and ``max|V|`` its floor, the kernel's own scale ``f(0) = 1`` (cross products at a short lengthscale
underflow in float32: measured against that scale, not their own tiny size).  ``env`` is, for the
tensor-core variants only, what the documented expansion error of ``q``
(``gpscale.operators.expansion.expansion_delta``) can move the product: ``|G(q +- delta) - G(q)| |V|``.
The operators never use a tensor-core variant where that envelope exceeds their tolerance
(``cuda_backend.variant_for``, tested on CPU in ``tests/test_cuda_backend.py``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from gpscale.kernels import RBF, Matern

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the fused-kernel tests need a GPU", allow_module_level=True)

from gpscale import _ext  # noqa: E402
from gpscale.operators import (  # noqa: E402
    CrossKernelOperator,
    CudaBackend,
    KernelOperator,
    backend_label,
    bilinear_derivative,
    derivative_matmul,
)
from gpscale.operators.backends import parse_backend  # noqa: E402
from kernel_reference import KERNELS, assert_products, assert_within, make_data, reference  # noqa: E402

_OK, _WHY = _ext.available(compile=True)
if not _OK:
    pytest.skip(f"gpscale's CUDA kernels are unavailable: {_WHY}", allow_module_level=True)

#: (variant, dtype, rtol)
VARIANTS = [("simt", torch.float64, 1e-12), ("simt", torch.float32, 2e-5), ("tc3", torch.float32, 1e-4),
            ("tc", torch.float32, 3e-3), ("tcb", torch.float32, 1e-4), ("tcbh", torch.float32, 1e-4)]
EXPANSION_VARIANTS = ("tc", "tc3", "tcb", "tcbh")
#: (n, m, d, t): none divides 64 / 128 / 256 rows or 16 columns
SIZES = [(1000, 777, 1, 1), (333, 1025, 8, 16), (129, 65, 32, 64), (517, 2049, 5, 17)]
#: tcb / tcbh are compiled once per k-step count ceil(d / 8): SIZES reach 1 and 4, these 2 and 3
SIZES_TCB_KSTEPS = [(300, 257, 13, 16), (257, 300, 20, 3)]
LENGTHSCALES = [0.05, 1.0, 10.0]


CASES = list(itertools.product(VARIANTS, KERNELS, ("f", "f_dq", "d"), SIZES, LENGTHSCALES)) + list(
    itertools.product([v for v in VARIANTS if v[0] in ("tcb", "tcbh")], KERNELS, ("f", "f_dq", "d"), SIZES_TCB_KSTEPS,
                      LENGTHSCALES))


@pytest.mark.parametrize("variant,name,mode,size,ls", CASES,
                         ids=[f"{v[0]}-{str(v[1])[6:]}-{k}-{m}-{s[0]}x{s[1]}x{s[2]}x{s[3]}-l{ls}"
                              for v, k, m, s, ls in CASES])
def test_cross_products_match_float64_reference(variant, name, mode, size, ls):
    (var, dtype, rtol) = variant
    Xs, Zs, V = (A.to(dtype).double() for A in make_data(*size, ls))  # the kernel's inputs, exactly
    dev = torch.device("cuda")
    got = _ext.kernel_matmul(Xs.to(dev, dtype), Zs.to(dev, dtype), V.to(dev, dtype), name, mode=mode, variant=var)
    assert_products(got, reference(Xs, Zs, V, name, mode, expansion=var in EXPANSION_VARIANTS), rtol, mode)


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{v}-{str(d)[6:]}" for v, d, _ in VARIANTS])
@pytest.mark.parametrize("name", list(KERNELS))
def test_symmetric_products_keep_the_diagonal_exact(variant, name):
    """``Z is X`` with a duplicated point: q_ii = 0 exactly (Matérn-1/2 would show sqrt(eps |x|^2))."""
    var, dtype, rtol = variant
    Xs, _, V = (A.to(dtype).double() for A in make_data(700, 700, 6, 9, 0.3, seed=3))
    Xs[11] = Xs[5]
    dev = torch.device("cuda")
    Xd = Xs.to(dev, dtype)
    got = _ext.kernel_matmul(Xd, Xd, V.to(dev, dtype), name, mode="f", variant=var, symmetric=True)
    ref = reference(Xs, Xs, V, name, "f", expansion=var in EXPANSION_VARIANTS, symmetric=True)[0]
    assert_within(got, ref, rtol, "symmetric F V")


SPLIT_CASES = list(itertools.product(("tcb", "tcbh"), ("rbf", "matern12"), ("f", "f_dq", "d"), (3, 7, "auto")))


@pytest.mark.parametrize("var,name,mode,splits", SPLIT_CASES, ids=["-".join(map(str, c)) for c in SPLIT_CASES])
def test_column_splits_match_float64_reference(var, name, mode, splits):
    """Grid z = S blocks per output tile, each summing a run of Z tiles into a partial output the launcher adds
    (gpscale/_ext/splits.py): 1025 columns are 9 tiles of 128 (17 of 64), so 7 splits leave an empty run."""
    Xs, Zs, V = (A.float().double() for A in make_data(333, 1025, 8, 16, 1.0, seed=11))
    dev = torch.device("cuda")
    got = _ext.kernel_matmul(Xs.to(dev).float(), Zs.to(dev).float(), V.to(dev).float(), name, mode=mode,
                             variant=var, splits=splits)
    assert_products(got, reference(Xs, Zs, V, name, mode, expansion=True), 1e-4, mode)
    Xd = Xs.to(dev).float()
    sym = _ext.kernel_matmul(Xd, Xd, V[:333].to(dev).float(), name, mode="f", variant=var, symmetric=True,
                             splits=splits)
    assert_within(sym, reference(Xs, Xs, V[:333], name, "f", expansion=True, symmetric=True)[0], 1e-4, "split F V")


def test_clear_errors():
    dev = torch.device("cuda")
    X = torch.rand(10, 33, device=dev)
    with pytest.raises(ValueError, match="d <= 32"):
        _ext.kernel_matmul(X, X, torch.rand(10, 2, device=dev), "rbf")
    X64 = torch.rand(10, 3, device=dev, dtype=torch.float64)
    with pytest.raises(ValueError, match="variant='simt' for float64"):
        _ext.kernel_matmul(X64, X64, torch.rand(10, 2, device=dev, dtype=torch.float64), "rbf", variant="tc3")
    with pytest.raises(ValueError, match="CUDA tensor"):
        _ext.kernel_matmul(X.cpu()[:, :3], X.cpu()[:, :3], torch.rand(10, 2), "rbf")


# ----------------------------------------------------------------------------- operators on the GPU
def _plain(want, B):
    """Reference of an operator product: scale ``max(|want|, |B|)``, no envelope (``variant_for`` guards)."""
    want = want.double().cpu()
    scale = max(want.abs().max().item(), B.abs().max().item())
    return want, torch.full_like(want, scale), torch.zeros_like(want)


def _kernel(name, ard, d):
    ls = torch.linspace(0.4, 1.6, d) if ard else 0.7
    return RBF(lengthscale=ls, outputscale=1.3) if name == "rbf" else \
        Matern(nu={"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}[name], lengthscale=ls, outputscale=1.3)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("ard", [False, True], ids=["shared", "ard"])
def test_operator_and_derivatives_with_cuda_backend(dtype, rtol, name, ard):
    g = torch.Generator().manual_seed(7)
    X = torch.rand(1500, 4, generator=g, dtype=torch.float64) * 2
    A, B = (torch.randn(1500, 5, generator=g, dtype=torch.float64) for _ in range(2))
    k = _kernel(name, ard, 4)
    ref = KernelOperator(X, k, noise=0.1, backend="torch")
    op = KernelOperator(X.cuda().to(dtype), k, noise=0.1, backend="cuda")
    assert op.backend == "cuda"
    assert_within(op.matmul(B.cuda().to(dtype)), _plain(ref.matmul(B), B), rtol, "(K + noise I) B")
    got, want = derivative_matmul(op, B.cuda().to(dtype)), derivative_matmul(ref, B)
    for key in want:
        assert_within(got[key], _plain(want[key], B), rtol * 10, f"dK/d{key} B")
    got, want = bilinear_derivative(op, A.cuda().to(dtype), B.cuda().to(dtype)), bilinear_derivative(ref, A, B)
    for key in want:
        w = want[key].double()
        err = (got[key].double().cpu() - w).abs().max().item()
        assert err <= rtol * 10 * max(w.abs().max().item(), 1.0) * 1500, f"bilinear {key}: {err:.3e}"
    cr = CrossKernelOperator(X[:333].cuda().to(dtype), X.cuda().to(dtype), k, backend="cuda")
    assert_within(cr.matmul(B.cuda().to(dtype)), _plain(CrossKernelOperator(X[:333], X, k).matmul(B), B), rtol,
                  "K(X', X) B")


@pytest.mark.parametrize("backend", [CudaBackend(variant="tcbh", splits=3), CudaBackend(splits="auto"),
                                     CudaBackend(variant="tcb", splits=7), "cuda:tc3", "cuda:simt"],
                         ids=["tcbh-3", "default-auto", "tcb-7", "tc3", "simt"])
def test_operators_take_the_variant_and_column_splits_of_their_backend(backend):
    """The variant and column splits a ``backend=`` value names reach the launches of an operator's
    products and derivative products (1025 columns: 9 tiles of 128, so 7 splits leave an empty run)."""
    g = torch.Generator().manual_seed(3)
    X = torch.rand(1025, 6, generator=g, dtype=torch.float64) * 2
    B = torch.randn(1025, 18, generator=g, dtype=torch.float64)
    k = _kernel("matern52", True, 6)
    ref = KernelOperator(X, k, noise=0.1, backend="torch")
    op = KernelOperator(X.cuda().float(), k, noise=0.1, backend=backend)
    assert_within(op.matmul(B.cuda().float()), _plain(ref.matmul(B), B), 2e-4, "(K + noise I) B")
    variant = parse_backend(backend)[1].variant
    assert backend_label(op) == f"cuda:{variant or 'tcbh'}"  # r2 ~ 20 here: the guard keeps tcbh
    got, want = derivative_matmul(op, B.cuda().float()), derivative_matmul(ref, B)
    for key in want:
        assert_within(got[key], _plain(want[key], B), 2e-3, f"dK/d{key} B")


def test_auto_picks_a_fused_backend_for_large_uncached_problems():
    from gpscale.operators import autotune
    from gpscale.operators.backends import AUTO_ORDER_CUDA, backend_available

    autotune.clear()
    X = torch.rand(4096, 3, device="cuda")
    op = KernelOperator(X, RBF(), noise=0.1, memory_budget=16 << 20)
    avail = [b for b in AUTO_ORDER_CUDA if backend_available(b, X.device, X.dtype, "rbf")[0]]
    assert op.backend in avail
    if len(avail) > 1:  # measured: the choice is within the tie margin of the fastest candidate that ran
        tuning = op.backend_tuning
        assert tuning.choice == op.backend and not tuning.errors, tuning.summary()
        best = min(tuning.seconds.values())
        assert min(v for k, v in tuning.seconds.items() if k.split(":")[0] == op.backend) <= best * (1 + autotune.TIE)
        assert KernelOperator(X, RBF(), noise=0.2, memory_budget=16 << 20).backend_tuning is tuning  # remembered
    assert KernelOperator(X[:500], RBF(), noise=0.1).backend == "torch"
