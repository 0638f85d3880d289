"""``launch.kernel_matmul`` and the operators on the CPU, their launches run by the emulation of the CUDA source.

The launcher's own code -- packing, column splits and the sum of their partial outputs, the triangle
builds' zeroed outputs and shared memory -- and an operator built with a ``CudaBackend`` run around the
emulated kernels (``emu_harness.emulate_launches``), and so do the ``TCB_TRI`` builds (csrc/tcb_tri.cuh),
against the float64 reference.  The kernels alone are emulated in ``test_cuda_emulated.py``.  Needs a
host C++ compiler (g++); skips without.
"""

from __future__ import annotations

import pytest
import torch
from emu_harness import emulate_launches, run_tcb
from kernel_reference import assert_products, make_data, reference

from gpscale._ext import launch

RTOL = 1e-4  # the GPU tests' tolerance for tcb
DF16 = "-DTCB_DF16=1"


@pytest.fixture
def emulated_launcher(tcb_builds, monkeypatch):
    """``launch.kernel_matmul`` itself on CPU tensors, its launch run by the emulation of the shipped ``tcbh``
    build: the device checks, the module loader and the device's SM count replaced (``launches`` records each
    launch's grid)."""
    return emulate_launches(tcb_builds(*launch.DEFINES["tcbh"]), monkeypatch)


@pytest.mark.parametrize("mode", ["f", "f_dq"])
def test_the_launcher_adds_the_partial_outputs_of_column_splits(emulated_launcher, mode):
    Xs, Zs, V = (A.float().double() for A in make_data(40, 1000, 4, 16, 1.0, seed=5))
    want = reference(Xs, Zs, V, "rbf", mode, expansion=True)
    # one block and 8 tiles of 128 columns; 4 SMs x 2 blocks (the fallback occupancy): "auto" fills the
    # 8 slots with 8 splits of one tile each; 5 splits leave runs of 2, 2, 2, 2 and none
    for splits, S in ((1, 1), (5, 5), ("auto", 8)):
        got = launch.kernel_matmul(Xs.float(), Zs.float(), V.float(), "rbf", mode=mode, variant="tcbh",
                                   splits=splits, inputs_max_abs=1.0)
        assert emulated_launcher[-1] == (1, 1, S)
        assert_products(got, want, RTOL, mode)


@pytest.mark.parametrize("ard", [False, True], ids=["shared", "ard"])
@pytest.mark.parametrize("splits", [1, 3, "auto"])
def test_an_operator_built_with_cuda_options_runs_them_through_the_launcher(emulated_launcher, monkeypatch,
                                                                          splits, ard):
    """The whole path on the CPU: ``KernelOperator(..., backend=CudaBackend(splits=...))`` -> the variant
    policy -> ``launch.kernel_matmul`` -> the emulated ``tcbh`` launch with that many column splits, for
    the operator's product and its derivative products (``f_dq`` shared lengthscale, ``d`` ARD), against
    the torch operator."""
    from gpscale.kernels import RBF
    from gpscale.operators import CudaBackend, KernelOperator, backends, derivative_matmul

    monkeypatch.setattr(backends, "backend_available", lambda *a, **k: (True, ""))  # the emulation stands in
    g = torch.Generator().manual_seed(2)
    X = torch.rand(300, 4, generator=g, dtype=torch.float64)  # 2 row blocks, 3 column tiles of 128
    B = torch.randn(300, 3, generator=g, dtype=torch.float64)
    k = RBF(lengthscale=torch.linspace(0.5, 1.2, 4) if ard else 0.7, outputscale=1.3)
    ref = KernelOperator(X, k, noise=0.1, backend="torch")
    op = KernelOperator(X.float(), k, noise=0.1, backend=CudaBackend(splits=splits))

    def close(got, want, rtol, what):
        err = (got.double() - want).abs().max().item()
        assert err <= rtol * want.abs().max().item(), f"{what}: {err:.3e}"

    close(op.matmul(B.float()), ref.matmul(B), 2e-4, "(K + noise I) B")
    assert op.cuda_variant == "tcbh"
    got, want = derivative_matmul(op, B.float()), derivative_matmul(ref, B)
    assert set(got) == set(want)
    for key in want:
        close(got[key], want[key], 2e-3, f"dK/d{key} B")
    # the product, then f_dq (shared) or the d product (two 16-column chunks) and an f product (ARD);
    # "auto" fills the emulation's 4 SMs x 2 blocks: a 2-block grid takes all 3 column tiles, a 4-block one 2
    grids = [(2, 1), (2, 2), (2, 1)] if ard else [(2, 1), (2, 1)]
    auto = {2: 3, 4: 2}
    assert list(emulated_launcher) == [(*gr, auto[gr[0] * gr[1]] if splits == "auto" else splits) for gr in grids]


# TCB_TRI (csrc/tcb_tri.cuh): symmetric products from one triangle of K, each pair's exp once, P^T V added
# into the rows of the column tiles past a block's diagonal square.  Sizes span several 256-row blocks (so
# rows get contributions from earlier blocks' transposed products) and divide neither blocks, tiles nor
# column chunks; f_dq runs the full sweep in a TCB_TRI build (the kernel's own fallback).
TRI_CASES = [("rbf", "f", (600, 5, 17), 1.0, ()), ("matern52", "d", (530, 13, 3), 0.7, ()),
             ("matern12", "f", (300, 2, 5), 1.0, ()), ("rbf", "f_dq", (290, 8, 2), 1.0, ()),
             ("matern32", "f", (700, 8, 16), 2.0, ("-DTCB_BN=128",)), ("rbf", "d", (513, 20, 1), 3.0, ())]


@pytest.mark.parametrize("kernel,mode,size,ls,extra", TRI_CASES,
                         ids=[f"{k}-{m}-{'x'.join(map(str, s))}-{len(e)}" for k, m, s, ls, e in TRI_CASES])
def test_emulated_triangle_builds_match_the_symmetric_reference(tcb_builds, kernel, mode, size, ls, extra):
    n, d, t = size
    Xs, _, V = (A.float().double() for A in make_data(n, n, d, t, ls, seed=n + d))
    so = tcb_builds(DF16, "-DTCB_TRI=1", *extra)
    got = run_tcb(so, Xs, Xs, V, kernel, mode, symmetric=True, variant="tcbh", schedule="early-greedy",
                  zeros=True)
    assert_products(got, reference(Xs, Xs, V, kernel, mode, expansion=True, symmetric=True), RTOL, mode)


def test_emulated_triangle_build_runs_non_symmetric_products_in_full(tcb_builds):
    # sym = 0 in a TCB_TRI build: every block sweeps every tile and writes its rows (no zeros needed)
    Xs, Zs, V = (A.float().double() for A in make_data(300, 290, 6, 9, 1.0, seed=3))
    got = run_tcb(tcb_builds(DF16, "-DTCB_TRI=1"), Xs, Zs, V, "rbf", "f", variant="tcbh")
    assert_products(got, reference(Xs, Zs, V, "rbf", "f", expansion=True), RTOL, "f")


@pytest.mark.parametrize("tile", [64, 128])
def test_the_launcher_runs_triangle_builds_on_zeroed_outputs_without_splits(tcb_builds, monkeypatch, tile):
    # launch.kernel_matmul with a TCB_TRI tcbh build: symmetric f / d products get the triangle's dynamic
    # shared memory, one run per block (splits ignored) and zeroed outputs; non-symmetric ones and f_dq neither
    build = (DF16, "-DTCB_TRI=1", f"-DTCB_BN={tile}")
    monkeypatch.setitem(launch.DEFINES, "tcbh", build)
    launches = emulate_launches(tcb_builds(*build), monkeypatch)
    Xs, Zs, V = (A.float().double() for A in make_data(530, 530, 4, 16, 1.0, seed=7))
    smem = (256 // 16 + 8 * tile // 16) * 2 * 32 * 16  # TCB_TRI_SMEM(BN) of csrc/tcb_tri.cuh
    assert launch.triangle_smem("tcbh", 4) == smem and launch.triangle_smem("tcbh", 9) == 48 * 1024  # 64-row tiles
    for mode in ("f", "d", "f_dq"):
        got = launch.kernel_matmul(Xs.float(), Xs.float(), V.float(), "rbf", mode=mode, variant="tcbh",
                                   symmetric=True, splits=3, inputs_max_abs=1.0)
        assert_products(got, reference(Xs, Xs, V, "rbf", mode, expansion=True, symmetric=True), RTOL, mode)
        assert (launches[-1], launches.smem[-1]) == (((3, 1, 3), 0) if mode == "f_dq" else ((3, 1, 1), smem))
    got = launch.kernel_matmul(Xs.float(), Zs.float(), V.float(), "rbf", variant="tcbh", splits=2, inputs_max_abs=1.0)
    assert_products(got, reference(Xs, Zs, V, "rbf", "f", expansion=True), RTOL, "f")
    assert (launches[-1], launches.smem[-1]) == ((3, 1, 2), 0)
    with pytest.raises(ValueError, match="Z is X"):
        launch.kernel_matmul(Xs.float(), Zs[:500].float(), V[:500].float(), "rbf", variant="tcbh", symmetric=True)
