"""The compiled one-pass tile profile (``gpscale.kernels.fused``) against the eager one it replaces."""

from __future__ import annotations

import pytest
import torch

import gpscale
import gpscale.kernels.fused as fused
from gpscale.kernels import RBF, Matern

# torch's inductor calls its own deprecated torch.jit.script_method while compiling: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture
def compile_everything(monkeypatch):
    """Every operator takes the compiled path (the threshold is for cost, not for correctness)."""
    monkeypatch.setattr(fused, "COMPILE_MIN_ENTRIES", 0)
    monkeypatch.setattr(fused, "_FAILED", [])


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_compiled_tiles_match_eager_tiles(compile_everything, nu, dtype, device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 5, generator=g, dtype=dtype).to(device)  # CUDA: the compiled pass is a triton kernel
    X[7] = X[3]  # a repeated point: q = 0 off the diagonal, floored like the eager path does
    k = Matern(nu=nu, lengthscale=torch.linspace(0.5, 2.0, 5)).to(device)
    op = gpscale.KernelOperator(X, k, noise=0.1, memory_budget=1 << 16, tile=128)  # several tiles, none cached
    assert op._fused is fused._COMPILED[k.name]
    eager = gpscale.KernelOperator(X, k, noise=0.1, memory_budget=1 << 16, tile=128)
    eager._fused = None
    V = torch.randn(300, 3, generator=g, dtype=dtype).to(device)
    got, want = op.matmul(V), eager.matmul(V)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float((got - want).abs().max() / want.abs().max()) <= rtol
    torch.testing.assert_close(op.profile_tile(0, 128, 0, 128), eager.profile_tile(0, 128, 0, 128),
                               rtol=rtol, atol=rtol)
    dense = k(X, X).detach() + 0.1 * torch.eye(300, dtype=dtype, device=device)
    assert float((got - dense @ V).abs().max() / (dense @ V).abs().max()) <= 10 * rtol
    assert not fused._FAILED  # really compiled: a fallback (e.g. dynamo's recompile limit) would compare eager to eager


def test_small_operators_and_rbf_stay_eager():
    X = torch.randn(200, 3)
    assert gpscale.KernelOperator(X, Matern(nu=2.5), noise=0.1)._fused is None  # 4e4 entries << 2^28
    assert fused.fused_profile(Matern(nu=2.5), 1 << 28) is not None or fused._FAILED
    assert fused.fused_profile(RBF(), 1 << 30) is None  # one in-place exp already


def test_a_failing_compilation_falls_back_to_eager_once(compile_everything):
    X = torch.randn(150, 4, dtype=torch.float64)
    k = Matern(nu=2.5)
    op = gpscale.KernelOperator(X, k, noise=0.1, memory_budget=1 << 16, tile=64)

    def broken(u, snap):
        raise RuntimeError("InductorError: no working C++ compiler\nlong traceback")

    op._fused = broken
    V = torch.randn(150, 2, dtype=torch.float64)
    with pytest.warns(fused.FusedProfileWarning, match="no working C\\+\\+ compiler"):
        got = op.matmul(V)
    torch.testing.assert_close(got, (k(X, X).detach() + 0.1 * torch.eye(150, dtype=torch.float64)) @ V)
    assert fused.status().startswith("eager (RuntimeError: InductorError")
    assert fused.fused_profile(k, 1 << 30) is None  # the process stays eager


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["rbf", "matern12", "matern32", "matern52"])
@pytest.mark.parametrize("ard", [True, False])
def test_compiled_gradient_tiles_match_eager_ones(compile_everything, kernel, ard, dtype, device):
    from gpscale.operators.derivatives import bilinear_derivative

    g = torch.Generator().manual_seed(1)
    X = torch.randn(260, 4, generator=g, dtype=dtype).to(device)
    X[9] = X[2]  # q = 0 off the diagonal: f'(0) of Matérn-1/2 is defined as 0 on both paths
    ls = torch.linspace(0.6, 1.8, 4) if ard else 1.1
    k = (RBF(lengthscale=ls) if kernel == "rbf" else
         Matern(nu={"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}[kernel], lengthscale=ls)).to(device)
    A, B = (torch.randn(260, 3, generator=g, dtype=dtype).to(device) for _ in range(2))
    op = gpscale.KernelOperator(X, k, noise=0.1, memory_budget=1 << 16, tile=96, backend="torch")
    got = bilinear_derivative(op, A, B)
    assert ("weighted", kernel) in fused._COMPILED and not fused._FAILED  # the compiled pass really ran
    fused._FAILED.append("eager reference")  # the same call, eagerly (the fixture resets it)
    want = bilinear_derivative(op, A, B)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for name in ("lengthscale", "outputscale", "noise"):
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * float(want[name].abs().max()))
