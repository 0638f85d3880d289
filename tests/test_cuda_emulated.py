"""gpscale's tensor-core CUDA kernels run on the CPU by the emulation of tests/emu/cuda_emu.h.

``tcb`` (csrc/kmm_tcb.cu) was written without a GPU; it passed its GPU tests on the second lent H100,
which these emulated runs had predicted, so they now check changes to it between GPUs.  Its
arithmetic is emulated in ``test_tcb_arithmetic.py`` and its
host-side packing in ``test_tcb_pack.py``; this file runs the kernel's own source -- index
expressions, fragment reads, the cp.async double buffer and its barriers, the symmetric diagonal,
padding, every k-step specialisation and product mode -- with every thread a fiber and the tensor-core
instructions computed from the PTX ISA's fragment tables (``cuda_emu.h``), against the same float64
reference and error measure as the GPU tests (``kernel_reference.py``).  What it cannot show: speed,
and hardware behaviour the ISA leaves open (the MMA's internal rounding, cp.async timing beyond "not
before its wait").  ``tc`` / ``tc3`` (csrc/kmm_tc.cu), which passed their GPU tests on the first
lent H100, run here too: the emulation's tf32 fragment tables are thereby checked against hardware.
Needs a host C++ compiler (g++; CI has one beside nvcc); skips without.  ``test_cuda_emulated_launch.py``
runs the launcher and the operators around the emulation, and the ``TCB_TRI`` builds.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import emu_harness
from emu_harness import SCHEDULES, build_emulation, run_tcb
from kernel_reference import assert_products, make_data, reference

from gpscale._ext import launch
from gpscale._ext.launch import entry_name
from gpscale._ext.tcb_pack import _as_int32, pack_v, pack_z

RTOL = 1e-4  # the GPU tests' tolerance for tcb


@pytest.fixture(scope="module")
def emulated(tcb_builds):
    return tcb_builds()


@pytest.fixture(scope="module")
def emulated_poly(tcb_builds):
    """tcb with every exp on the FMA pipes (TCB_EMU = 4: gps_ex2_poly in csrc/profiles.cuh)."""
    return tcb_builds("-DTCB_EMU=4")


@pytest.fixture(scope="module")
def emulated_h(tcb_builds):
    """The ``tcbh`` build (TCB_DF16 = 1: distances from two f16 MMAs per k-step)."""
    return tcb_builds("-DTCB_DF16=1")


@pytest.fixture(scope="module")
def emulated_h_dpatch(tcb_builds):
    """``tcbh`` + one-level accumulation + the symmetric diagonal patched per n-tile (TCB_DPATCH = 1)."""
    return tcb_builds("-DTCB_DF16=1", "-DTCB_ACC1=1", "-DTCB_DPATCH=1")


@pytest.fixture(scope="module")
def emulated_tc(tmp_path_factory):
    return build_emulation(tmp_path_factory, "tc_harness")


# (kernel, mode, (n, m, d, t), lengthscale): every k-step count (d = 5, 13, 20, 32), kernel and mode, sizes
# that divide neither the 256-row blocks, the 64-row tiles nor the 16-column chunks, up to four column
# chunks, lengthscales 0.05 to 10 (the GPU tests' range).
CASES = [("rbf", "f", (300, 150, 5, 17), 1.0), ("rbf", "f_dq", (70, 130, 13, 3), 0.5),
         ("rbf", "d", (40, 65, 20, 16), 2.0), ("matern52", "f", (50, 129, 32, 5), 1.0),
         ("matern52", "f_dq", (33, 100, 8, 9), 1.0), ("matern32", "d", (45, 70, 3, 2), 0.7),
         ("matern12", "f", (20, 90, 1, 1), 10.0), ("rbf", "f", (37, 80, 8, 16), 0.05),
         ("matern32", "f_dq", (29, 66, 4, 64), 10.0), ("matern12", "d", (31, 70, 2, 5), 1.0)]


CASE_IDS = [f"{k}-{m}-{'x'.join(map(str, s))}-l{ls}" for k, m, s, ls in CASES]
DF16, DK8, ACC1, ACCS2 = "-DTCB_DF16=1", "-DTCB_DF16=2", "-DTCB_ACC1=1", "-DTCB_ACCS=2"
#: (build, -D options, copy schedule) run on every case: the shipped tcb and tcbh (f16 splits of the
#: distance operands, two m16n8k16 MMAs per k-step) in both schedules, their one-level-accumulation
#: builds (fewer registers, for more resident warps) and tcbh with totals in shared memory flushed every
#: 2 tiles (TCB_ACCS; the cases' 2-3 tiles flush both at a multiple of 2 and at the last) in the harsher one;
#: and tcbh with xh.zh in an m16n8k8 and compact Z words (TCB_DF16 = 2), alone in both schedules, on the
#: shipped options, and with the totals in shared memory beside 128-row tiles (which fits 48 KB only so)
BUILD_RUNS = ([("tcb", (), s) for s in SCHEDULES] + [("tcb-acc1", (ACC1,), "early-greedy")]
              + [("tcbh", (DF16,), s) for s in SCHEDULES] + [("tcbh-acc1", (DF16, ACC1), "early-greedy")]
              + [("tcbh-accs2", (DF16, ACCS2), "early-greedy")]
              + [("tcbh-shipped", launch.DEFINES["tcbh"], "early-greedy")]
              + [("tcbh-k8", (DK8,), s) for s in SCHEDULES]
              + [("tcbh-k8-shipped", (DK8, *(o for o in launch.DEFINES["tcbh"] if not o.startswith("-DTCB_DF16="))),
                  "early-greedy")]
              + [("tcbh-k8-accs2-bn128", (DK8, ACCS2, "-DTCB_BN=128"), "early-greedy")])


@pytest.mark.parametrize("build,defines,schedule", BUILD_RUNS, ids=[f"{b}-{s}" for b, _, s in BUILD_RUNS])
@pytest.mark.parametrize("kernel,mode,size,ls", CASES, ids=CASE_IDS)
def test_emulated_tcb_builds_match_the_float64_reference(tcb_builds, build, defines, schedule, kernel, mode, size,
                                                         ls):
    # every k-step count, kernel, mode and the 0.05 lengthscale, where |x|^2 and the cancellation are largest
    Xs, Zs, V = (A.float().double() for A in make_data(*size, ls, seed=sum(size)))
    layout = launch.build_df16(defines)  # the Z packing the build reads: 0 tcb, 1 / 2 tcbh's f16 splits
    got = run_tcb(tcb_builds(*defines), Xs, Zs, V, kernel, mode, schedule=schedule,
                  variant="tcbh" if layout else "tcb", layout=layout)
    assert_products(got, reference(Xs, Zs, V, kernel, mode, expansion=True), RTOL, mode)


@pytest.mark.parametrize("kernel,mode,size,ls", CASES, ids=CASE_IDS)
def test_emulated_tcb_with_the_polynomial_exp_matches_the_reference(emulated_poly, emulated, kernel, mode, size, ls):
    # the FMA-pipe exp (TCB_EMU) is a speed option: it must keep every kernel and mode at the GPU
    # tests' tolerance, and stay within its own 2.7e-6 (+ rounding) of the MUFU build's products
    Xs, Zs, V = (A.float().double() for A in make_data(*size, ls, seed=sum(size)))
    got = run_tcb(emulated_poly, Xs, Zs, V, kernel, mode)
    assert_products(got, reference(Xs, Zs, V, kernel, mode, expansion=True), RTOL, mode)
    mufu = run_tcb(emulated, Xs, Zs, V, kernel, mode)
    outs, mufus = (got, mufu) if mode == "f_dq" else ((got,), (mufu,))
    assert not all(torch.equal(a, b) for a, b in zip(outs, mufus)), "TCB_EMU=4 built the MUFU kernel"
    ref = reference(Xs, Zs, V, kernel, mode, expansion=True)
    for a, b, (_, absprod, _) in zip(outs, mufus, ref):  # scale: sum |F| |V| per row, as the GPU tests
        assert (a - b).double().abs().max() <= 1e-5 * absprod.max()


@pytest.mark.parametrize("scale", [1e-5, 3e-3, 1.0, 5.0])
def test_emulated_tcbh_distances_are_as_accurate_as_3xtf32(emulated_h, emulated, scale):
    # One pair per row at a known squared distance q = |x - z|^2 = 1 placed at |x| ~ scale (RBF, V = 1):
    # the f16 split must keep 3xTF32's accuracy from f16's subnormals (scale 1e-5) up to inputs at
    # the expansion guard's limit (|x|^2 + |z|^2 ~ 400 for RBF), where q is a small difference of
    # large terms.
    g = torch.Generator().manual_seed(4)
    X = scale * torch.randn(24, 8, generator=g)
    u = torch.randn(24, 8, generator=g)
    Z = X + u / u.norm(dim=1, keepdim=True)  # |x - z| = 1
    V = torch.ones(1, 1)
    h, b = ([run_tcb(so, X[i:i + 1], Z[i:i + 1], V, "rbf", "f", variant=v)[0, 0] for i in range(24)]
            for so, v in ((emulated_h, "tcbh"), (emulated, "tcb")))
    q = torch.stack([torch.cdist(X[i:i + 1].double(), Z[i:i + 1].float().double())[0, 0] ** 2 for i in range(24)])
    want = torch.exp(-0.5 * q)
    err_h, err_b = ((torch.tensor(e).double() - want).abs().max().item() for e in (h, b))
    # the expansion's own error ~ 8 u (|x|^2 + |z|^2) / 2 bounds both; tcbh within 2x of tcb's (+ P's split)
    bound = 4 * 2.0**-24 * 2 * (scale**2 * 8 + 1) + 2e-5
    assert err_h <= bound and err_h <= 2 * err_b + 2e-5, (err_h, err_b, bound)


def test_the_emulation_catches_a_wrong_tcbh_layout(emulated_h, monkeypatch):
    """Teeth for the f16 Z packing: the two features of each pair swapped give wrong distances."""
    Xs, Zs, V = (A.float().double() for A in make_data(40, 70, 4, 16, 1.0, seed=1))

    def swapped(Z, ks, f16=0, real=pack_z):
        Zf, Zn = real(Z, ks, f16)
        u = Zf.to(torch.int64) & 0xFFFFFFFF
        return _as_int32((u >> 16) | ((u & 0xFFFF) << 16)), Zn

    with monkeypatch.context() as mp:
        mp.setattr(emu_harness, "pack_z", swapped)  # what run_tcb packs Z with
        got = run_tcb(emulated_h, Xs, Zs, V, "rbf", "f", variant="tcbh")
    want = reference(Xs, Zs, V, "rbf", "f")[0][0]
    assert float((got.double() - want).abs().max()) > 1e-2 * float(want.abs().max())
    np.testing.assert_allclose(run_tcb(emulated_h, Xs, Zs, V, "rbf", "f", variant="tcbh").double(), want, atol=1e-3)


def test_the_polynomial_exp2_is_accurate_over_the_whole_float_range(emulated_poly):
    # through the kernel: one point pair at squared distance q gives exp(-q / 2) (RBF, V = 1)
    q = torch.tensor([0.0, 1e-6, 0.3, 1.0, 2.0, 7.5, 40.0, 170.0, 172.0, 240.0, 1e4, 1e30])
    X = torch.zeros(len(q), 1)
    Z = q.sqrt().unsqueeze(1)
    got = torch.stack([run_tcb(emulated_poly, X[i:i + 1], Z[i:i + 1], torch.ones(1, 1), "rbf", "f")[0, 0]
                       for i in range(len(q))]).double()
    want = torch.exp(-0.5 * q.double())
    assert torch.all(torch.isfinite(got)) and torch.all(got >= 0), got
    # below 2^-124 the argument is clamped (a result of ~2^-125 rather than 0, or bits lost to
    # subnormals): an absolute error below 1e-37 where every kernel value is negligible
    assert torch.all((got - want).abs() < 1e-37 + 7e-5 * want), got
    # elsewhere relative: the polynomial's 2.7e-6 plus the truncated bf16 split of P (< 2^-14)
    normal = want > 1e-30
    assert torch.all(((got - want) / want).abs()[normal] < 7e-5), (got - want) / want


def test_emulated_tcb_keeps_the_symmetric_diagonal_exact(emulated):
    Xs, _, V = (A.float().double() for A in make_data(90, 90, 6, 9, 0.3, seed=3))
    Xs[11] = Xs[5]  # a duplicate point: Matérn-1/2 would show sqrt(eps |x|^2) without q_ii = 0
    got = run_tcb(emulated, Xs, Xs, V, "matern12", "f", symmetric=True)
    assert_products(got, reference(Xs, Xs, V, "matern12", "f", expansion=True, symmetric=True), RTOL, "f")


@pytest.mark.parametrize("kernel,mode", [("matern12", "f"), ("matern12", "f_dq"), ("matern32", "d"), ("rbf", "f"),
                                         ("rbf", "d"), ("matern52", "f_dq")])
@pytest.mark.parametrize("build", ["tcb", "tcbh-dpatch"])
def test_emulated_symmetric_products_keep_the_diagonal_exact(emulated, emulated_h_dpatch, build, kernel, mode):
    # n = 300: the diagonal crosses two 256-row blocks, five 64-row tiles and both m-tiles of a warp
    Xs, _, V = (A.float().double() for A in make_data(300, 300, 5, 17, 0.4, seed=8))
    Xs[11] = Xs[5]  # a duplicate point: the exact-zero diagonal must not leak to the off-diagonal twin
    so, variant = (emulated, "tcb") if build == "tcb" else (emulated_h_dpatch, "tcbh")
    got = run_tcb(so, Xs, Xs, V, kernel, mode, symmetric=True, variant=variant, schedule="early-greedy")
    assert_products(got, reference(Xs, Xs, V, kernel, mode, expansion=True, symmetric=True), RTOL, mode)


def test_the_emulation_catches_a_wrong_layout(emulated, monkeypatch):
    """The check has teeth: V's fragments with their two k-halves swapped give a wrong product."""
    Xs, Zs, V = (A.float().double() for A in make_data(40, 70, 4, 16, 1.0, seed=1))
    with monkeypatch.context() as mp:  # {hi b0, hi b1, lo b0, lo b1} reversed
        mp.setattr(emu_harness, "pack_v", lambda A, real=pack_v: real(A).flip(-1).contiguous())
        got = run_tcb(emulated, Xs, Zs, V, "rbf", "f")
    want = reference(Xs, Zs, V, "rbf", "f")[0][0]
    assert float((got.double() - want).abs().max()) > 1e-2 * float(want.abs().max())
    np.testing.assert_allclose(run_tcb(emulated, Xs, Zs, V, "rbf", "f").double(), want, atol=1e-3)


def run_tc(so, X, Z, V, kernel, mode, variant, schedule="late"):
    """``launch.kernel_matmul(..., variant="tc" | "tc3")`` under the emulation."""
    X, Z, V = (A.float().contiguous() for A in (X, Z, V))
    n, d = X.shape
    m, t = V.shape
    O0, O1 = torch.zeros(n, t), torch.zeros(n, t)
    err = ctypes.create_string_buffer(512)
    ptr = [ctypes.c_void_p(a.data_ptr()) for a in (X, Z, V, O0, O1)]
    rc = so.gps_emu_tc(entry_name(variant, kernel, mode, torch.float32, d).encode(), *ptr, n, m, d, t, 0,
                       *SCHEDULES[schedule], err, len(err))
    assert rc == 0, f"emulation failed ({rc}): {err.value.decode()}"
    return (O0, O1) if mode == "f_dq" else O0


@pytest.mark.parametrize("variant,rtol", [("tc3", 1e-4), ("tc", 3e-3)])
@pytest.mark.parametrize("kernel,mode,size", [("rbf", "f_dq", (70, 130, 13, 17)), ("matern52", "d", (65, 64, 8, 3))])
def test_emulated_tc_variants_match_the_reference_as_on_the_h100(emulated_tc, variant, rtol, kernel, mode, size):
    Xs, Zs, V = (A.float().double() for A in make_data(*size, 1.0, seed=2))
    got = run_tc(emulated_tc, Xs, Zs, V, kernel, mode, variant)
    assert_products(got, reference(Xs, Zs, V, kernel, mode, expansion=True), rtol, mode, f"{variant} {kernel}")


# ----------------------------------------------------------------------------- column splits (grid z)
#: (build, -D options): the shipped tcbh, the K8 candidate with shared-memory totals flushed every 2 tiles
#: of a run (the flush counts from the run's first tile) and 64-row tiles, so more tiles per split
SPLIT_BUILDS = [("tcbh-shipped", launch.DEFINES["tcbh"]), ("tcbh-k8-accs2", (DK8, ACCS2)), ("tcb", ())]


@pytest.mark.parametrize("splits", [2, 4, 7])
@pytest.mark.parametrize("build,defines", SPLIT_BUILDS, ids=[b for b, _ in SPLIT_BUILDS])
@pytest.mark.parametrize("kernel,mode,size,ls", [("rbf", "f", (300, 700, 5, 17), 1.0),
                                                 ("matern52", "f_dq", (70, 450, 13, 3), 0.5)], ids=["rbf-f", "m52-fdq"])
def test_emulated_column_splits_sum_to_the_reference(tcb_builds, build, defines, splits, kernel, mode, size, ls):
    # 700 columns are 6 tiles of 128 (11 of 64): 7 splits leave empty runs (their blocks write zeros); 4 splits of
    # 11 tiles are runs of 3, 3, 3, 2 (the totals in shared memory, flushed every 2 tiles, must also be flushed at
    # the end of each run, not only at the last tile of Z)
    Xs, Zs, V = (A.float().double() for A in make_data(*size, ls, seed=sum(size)))
    layout = launch.build_df16(defines)
    got = run_tcb(tcb_builds(*defines), Xs, Zs, V, kernel, mode, schedule="early-greedy",
                  variant="tcbh" if layout else "tcb", layout=layout, splits=splits)
    assert_products(got, reference(Xs, Zs, V, kernel, mode, expansion=True), RTOL, mode)


def test_emulated_column_splits_keep_the_symmetric_diagonal_exact(emulated_h):
    # the diagonal pairs lie in different runs of tiles: each split must test them by global column
    Xs, _, V = (A.float().double() for A in make_data(300, 300, 5, 17, 0.4, seed=8))
    Xs[11] = Xs[5]
    got = run_tcb(emulated_h, Xs, Xs, V, "matern12", "f", symmetric=True, variant="tcbh", splits=3)
    assert_products(got, reference(Xs, Xs, V, "matern12", "f", expansion=True, symmetric=True), RTOL, "f")
