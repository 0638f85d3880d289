"""Backend dispatch (``backend="auto"|"cuda"|"keops"|"torch"``) and fallbacks, on CPU.

The KeOps tests compile a few small formulas with the machine's C++ compiler (seconds each the first
time, cached by KeOps afterwards); they skip with the reason when pykeops cannot compile here.
The ``cuda`` backend's options and variant policy are tested in ``test_cuda_backend.py``, its kernels
in ``test_cuda_kernels.py`` (GPU only) and compiled in ``test_csrc_compile.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import KERNEL_IDS, KERNEL_SPECS, build_kernel, make_inputs
from operator_contract import assert_close

from gpscale.kernels import RBF, Matern
from gpscale.likelihood import mll_estimate
from gpscale.operators import (
    CrossKernelOperator,
    autotune,
    KernelOperator,
    backends,
    bilinear_derivative,
    derivative_matmul,
)
from gpscale.operators.blocking import plan_symmetric_tiling


def _kernel(kidx, ard=False, d=3):
    family, nu = KERNEL_SPECS[kidx]
    return build_kernel(family, nu, ard=ard, d=d)


# ----------------------------------------------------------------------------- dispatch on CPU
def test_auto_on_cpu_is_torch():
    X = make_inputs(50, 3)
    assert KernelOperator(X, RBF(), noise=0.1).backend == "torch"
    assert CrossKernelOperator(X, X[:7], Matern()).backend == "torch"


def test_unknown_backend_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda', 'keops', 'torch'\)"):
        KernelOperator(make_inputs(5, 2), RBF(), backend="triton")


@pytest.mark.parametrize("cls", ["square", "cross"])
def test_cuda_backend_on_cpu_tensors_is_a_clear_error(cls):
    X = make_inputs(20, 2)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here: .*CUDA tensors.*X\.cuda\(\)"):
        if cls == "square":
            KernelOperator(X, RBF(), noise=0.1, backend="cuda")
        else:
            CrossKernelOperator(X, X, RBF(), backend="cuda")


def test_fused_backend_refuses_unknown_kernels():
    class Cauchy(RBF):
        name = "cauchy"

    ok, why = backends.backend_available("keops", torch.device("cpu"), torch.float64, "cauchy")
    assert not ok and "backend='torch'" in why
    with pytest.raises(RuntimeError, match="not kernel 'cauchy'"):
        KernelOperator(make_inputs(5, 2), Cauchy(), backend="keops")
    # auto never picks a fused backend for a kernel the fused code does not know
    assert KernelOperator(make_inputs(5, 2), Cauchy()).backend == "torch"


def test_cuda_unavailable_reason_without_gpu():
    ok, why = backends.backend_available("cuda", torch.device("cuda"), torch.float32, "rbf")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the reason string is only checked without one")
    assert not ok and why  # says what is missing (no CUDA device / no NVRTC)


def _fake_op(n, device="cuda", budget=None, name="rbf"):
    dev = torch.device(device)
    tiling = plan_symmetric_tiling(n, torch.float32, dev, budget)
    return SimpleNamespace(kernel=SimpleNamespace(name=name), device=dev, dtype=torch.float32,
                           shape=(n, n), tiling=tiling)


def _fake_choose(choice, calls):
    def choose(op, cands):
        calls.append(list(cands))
        return autotune.Tuning(choice, {c: 1.0 for c in cands}, {}, (1, 1, 1), (), "f")
    return choose


@pytest.mark.parametrize("avail,want,tuned", [({"cuda", "keops"}, "cuda", True), ({"keops"}, "keops", False),
                                              ({"cuda"}, "cuda", False), (set(), "torch", False)])
def test_auto_on_cuda_times_the_available_fused_backends_then_torch(monkeypatch, avail, want, tuned):
    # two candidates: the measured choice (here "cuda"); one: taken untimed; none: torch
    calls = []
    monkeypatch.setattr(backends, "backend_available", lambda b, *a, **k: (b in avail, "" if b in avail else "no"))
    monkeypatch.setattr(autotune, "choose", _fake_choose("cuda", calls))
    op = _fake_op(200_000)
    assert backends.select_backend(op, "auto") == want
    assert calls == ([list(backends.AUTO_ORDER_CUDA)] if tuned else [])
    assert hasattr(op, "backend_tuning") == tuned


def test_auto_falls_back_to_torch_when_every_timed_candidate_failed(monkeypatch):
    monkeypatch.setattr(backends, "backend_available", lambda *a, **k: (True, ""))
    monkeypatch.setattr(autotune, "choose", _fake_choose(None, []))
    assert backends.select_backend(_fake_op(200_000), "auto") == "torch"


def test_auto_under_several_processes_takes_the_static_order_untimed(monkeypatch):
    # each rank tuning alone could pick a different backend; the static order keeps them identical
    calls = []
    monkeypatch.setattr(backends, "backend_available", lambda *a, **k: (True, ""))
    monkeypatch.setattr(autotune, "choose", _fake_choose("cuda", calls))
    monkeypatch.setattr(backends, "_multi_process", lambda: True)
    assert backends.select_backend(_fake_op(200_000), "auto") == backends.AUTO_ORDER_CUDA[0]
    assert calls == []


def test_auto_on_cuda_keeps_torch_when_the_kernel_is_cached_or_tiny(monkeypatch):
    monkeypatch.setattr(backends, "backend_available", lambda b, *a, **k: (b == "keops", ""))
    assert backends.select_backend(_fake_op(1000), "auto") == "torch"  # tiny
    assert backends.select_backend(_fake_op(20_000, budget=4 << 30), "auto") == "torch"  # cached whole
    assert backends.select_backend(_fake_op(20_000, budget=64 << 20), "auto") == "keops"


@pytest.mark.parametrize("n,budget", [(1, None), (999, None), (1001, 1 << 20), (4097, 1 << 20), (20_000, 64 << 20)])
def test_upper_entries_counts_the_upper_tiles_and_auto_uses_the_exact_size(monkeypatch, n, budget):
    t = plan_symmetric_tiling(n, torch.float32, torch.device("cpu"), budget)
    assert t.upper_entries(n) == sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in t.upper_tiles(n))
    # auto's "whole kernel cached" rule and the cache's admission agree at the exact byte count
    monkeypatch.setattr(backends, "backend_available", lambda b, *a, **k: (b == "keops", ""))
    op = _fake_op(4000)
    op.tiling = replace(op.tiling, cache_bytes=op.tiling.upper_entries(4000) * 4)
    assert backends.select_backend(op, "auto") == "torch"
    op.tiling = replace(op.tiling, cache_bytes=op.tiling.cache_bytes - 1)
    assert backends.select_backend(op, "auto") == "keops"


def test_mll_stats_report_the_backend():
    X = make_inputs(300, 2, seed=3)
    y = torch.sin(X[:, 0])
    res = mll_estimate(X, y, RBF(lengthscale=0.7), noise=0.1, method="iterative", seed=0, num_probes=4)
    assert res.stats["backend"] == "torch"
    res = mll_estimate(X[:50], y[:50], RBF(), noise=0.1, method="cholesky")
    assert res.stats["backend"] == "torch"


# ----------------------------------------------------------------------------- KeOps on CPU
@pytest.fixture(scope="module")
def keops_ok():
    """Skip the KeOps tests (with the reason) unless pykeops imports *and* compiles here."""
    ok, why = backends.backend_available("keops", torch.device("cpu"), torch.float64)
    if not ok:
        pytest.skip(why)
    try:
        from pykeops.torch import LazyTensor

        x = torch.rand(4, 1, dtype=torch.float64)
        (LazyTensor(x[:, None, :]).sqdist(LazyTensor(x[None, :, :]))).sum(dim=1)
    except Exception as exc:  # noqa: BLE001 - any compile failure means "cannot test here"
        pytest.skip(f"pykeops cannot compile on this machine: {type(exc).__name__}: {exc}")
    return True


T = 3  # one right-hand-side width everywhere: each KeOps formula compiles once per width


@pytest.mark.keops
@pytest.mark.parametrize("kidx", range(len(KERNEL_SPECS)), ids=KERNEL_IDS)
def test_keops_products_match_torch(keops_ok, kidx):
    """Square and cross products on odd sizes equal the torch path (float64, exact diagonal)."""
    X = make_inputs(67, 3, seed=kidx) + 50.0  # offset: the difference form has no cancellation
    k = _kernel(kidx, ard=True)
    V = torch.randn(67, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = KernelOperator(X, k, noise=0.2, backend="torch")
    op = KernelOperator(X, k, noise=0.2, backend="keops")
    assert op.backend == "keops"
    assert_close(op.matmul(V), ref.matmul(V), 1e-12, what="keops (K + noise I) V")
    Z = make_inputs(41, 3, seed=9) + 50.0
    cr = CrossKernelOperator(Z, X, k, backend="keops")
    assert_close(cr.matmul(V), CrossKernelOperator(Z, X, k).matmul(V), 1e-12, what="keops K(Z, X) V")


@pytest.mark.keops
@pytest.mark.parametrize("kidx,ard", [(0, False), (1, False), (3, True)], ids=["rbf", "matern12", "matern52-ard"])
def test_keops_derivatives_match_torch(keops_ok, kidx, ard):
    """``derivative_matmul`` and ``bilinear_derivative`` dispatch to KeOps and agree with torch."""
    X = make_inputs(53, 3, seed=4)
    X[7] = X[3]  # duplicate point: Matérn-1/2's f' limit at q = 0
    k = _kernel(kidx, ard=ard)
    g = torch.Generator().manual_seed(2)
    A, B = (torch.randn(53, T, generator=g, dtype=torch.float64) for _ in range(2))
    ref = KernelOperator(X, k, noise=0.3, backend="torch")
    op = KernelOperator(X, k, noise=0.3, backend="keops")
    got, want = derivative_matmul(op, B), derivative_matmul(ref, B)
    for key in want:
        assert_close(got[key], want[key], 1e-10, what=f"keops dK/d{key} @ V")
    got, want = bilinear_derivative(op, A, B), bilinear_derivative(ref, A, B)
    for key in want:
        assert_close(got[key], want[key], 1e-10, what=f"keops bilinear {key}")


# ----------------------------------------------------------------------------- lazy imports, sources
def test_cpu_use_never_imports_the_cuda_loader_or_pykeops():
    """A CPU-only workflow (auto backend, MLL) must not import gpscale._ext or pykeops."""
    import subprocess
    import sys

    code = ("import sys, torch, gpscale\n"
            "from gpscale.operators import KernelOperator, derivative_matmul\n"
            "from gpscale.kernels import RBF\n"
            "X = torch.rand(40, 2, dtype=torch.float64)\n"
            "op = KernelOperator(X, RBF(), noise=0.1)\n"
            "op.matmul(torch.ones(40, dtype=X.dtype)); derivative_matmul(op, torch.ones(40, 2, dtype=X.dtype))\n"
            "bad = [m for m in ('gpscale._ext', 'pykeops', 'cupy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_sources_are_found_and_includes_inlined(tmp_path, monkeypatch):
    from gpscale._ext import sources

    assert (sources.csrc_dir() / "profiles.cuh").is_file()  # the checkout's csrc/
    (tmp_path / "profiles.cuh").write_text("#pragma once\n#define ANSWER 42\n")
    (tmp_path / "a.cu").write_text('#include "profiles.cuh"\n#include "profiles.cuh"\nint x = ANSWER;\n')
    monkeypatch.setenv("GPSCALE_CSRC", str(tmp_path))
    assert sources.csrc_dir() == tmp_path
    text = sources.read_source("a.cu")
    assert "#include" not in text and text.count("#define ANSWER 42") == 1
    assert "#pragma once" not in text  # redundant once inlined, and nvcc warns about it in a main file
    monkeypatch.setenv("GPSCALE_CSRC", str(tmp_path / "missing"))
    monkeypatch.setattr(sources, "__file__", str(tmp_path / "pkg" / "gpscale" / "_ext" / "sources.py"))
    monkeypatch.setattr(sources.sys, "prefix", str(tmp_path / "prefix"))
    with pytest.raises(FileNotFoundError, match="GPSCALE_CSRC"):
        sources.csrc_dir()


# ----------------------------------------------------------------------------- low precision vs fused float32
def test_low_precision_is_skipped_only_when_it_would_recompute_what_a_fused_backend_streams():
    from gpscale import PrecisionPolicy
    from gpscale.solvers.mixed import low_precision_skip_reason

    def fake(backend, need16, have):
        return SimpleNamespace(backend=backend, tiling=SimpleNamespace(cache_bytes=have),
                               kernel_bytes=lambda p: need16 * (2 if p in ("float32", "tf32") else 1))

    bf16 = PrecisionPolicy("bfloat16")
    why = low_precision_skip_reason(fake("keops", 3 << 30, 1 << 30), bf16)
    assert "recompute every kernel tile" in why and "raise memory_budget above 3.00 GiB" in why
    assert low_precision_skip_reason(fake("keops", 1 << 29, 1 << 30), bf16) is None  # the 16-bit kernel fits
    assert low_precision_skip_reason(fake("torch", 3 << 30, 1 << 30), bf16) is None  # torch anyway (CPU)
    assert low_precision_skip_reason(fake("cuda", 3 << 30, 1 << 30), PrecisionPolicy("float32")) is None
    # tf32 keeps 4-byte tiles: where float32 does not fit, neither does it
    assert low_precision_skip_reason(fake("cuda", 1 << 29, 1 << 29), PrecisionPolicy("tf32")) is not None
    # the operator's own count: upper-triangle tiles, 2 bytes per 16-bit entry
    op = KernelOperator(make_inputs(300, 2), RBF(), 0.1, tile=64)
    assert op.kernel_bytes("bfloat16") * 4 == op.kernel_bytes() == 2 * op.kernel_bytes("float32")  # float64 X
    assert op.kernel_bytes("tf32") == op.kernel_bytes("float32") == 2 * op.kernel_bytes("float16")  # tf32: float32 storage
    assert op.kernel_bytes() >= 300 * 301 // 2 * 8


@pytest.mark.keops
def test_cg_keeps_float32_on_a_fused_backend_when_the_16bit_kernel_cannot_be_cached(keops_ok):
    from gpscale import PrecisionWarning, cg

    X = make_inputs(400, 2, seed=5)
    B = torch.randn(400, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    small = KernelOperator(X, RBF(lengthscale=0.5), 0.1, backend="keops", memory_budget=200_000)
    with pytest.warns(PrecisionWarning, match="recompute every kernel tile"):
        res = cg(small, B, rtol=1e-6, precision="bfloat16")
    ref = cg(small, B, rtol=1e-6)
    assert res.finished_precision is None and torch.equal(res.x, ref.x)  # the plain float path, same numbers
    big = KernelOperator(X, RBF(lengthscale=0.5), 0.1, backend="keops", memory_budget=4 << 20)
    res = cg(big, B, rtol=1e-2, precision="bfloat16")  # the 16-bit kernel fits: the policy runs
    assert set(res.finished_precision) <= {"bfloat16", "float32"} and res.finished_precision is not None


@pytest.mark.keops
def test_the_backend_option_reaches_every_operator_of_the_user_entry_points(keops_ok):
    """mll_estimate and ExactGP (fit, predict, variance, samples) run on the backend asked for, and
    agree with the torch path."""
    import gpscale

    X = make_inputs(150, 2, seed=5)
    y = torch.sin(3 * X[:, 0]) + 0.1 * torch.cos(5 * X[:, 1])
    kw = dict(noise=0.1, method="iterative", seed=0, num_probes=3, rtol=1e-8)
    res = {b: mll_estimate(X, y, RBF(lengthscale=0.5), backend=b, **kw) for b in ("keops", "torch")}
    assert res["keops"].stats["backend"] == "keops" and res["torch"].stats["backend"] == "torch"
    assert float(res["keops"].value.detach()) == pytest.approx(float(res["torch"].value.detach()), rel=1e-8)

    made = []  # (class, backend) of every operator built (not the parent-class call inside KernelOperator)
    real = {KernelOperator: KernelOperator.__init__, CrossKernelOperator: CrossKernelOperator.__init__}

    def spy(cls):
        def init(self, *a, backend="auto", **k):
            if type(self) is cls:
                made.append((cls.__name__, backend))
            real[cls](self, *a, backend=backend, **k)
        return init

    gps = {b: gpscale.ExactGP(kernel="rbf", method="iterative", max_iter=2, backend=b, seed=1, verbose=False)
           for b in ("keops", "torch")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KernelOperator, "__init__", spy(KernelOperator))
        mp.setattr(CrossKernelOperator, "__init__", spy(CrossKernelOperator))
        gps["keops"].fit(X, y)
        got = gps["keops"].predict(X[:20], return_std=True), gps["keops"].sample_y(X[:20], n_samples=2)
    # every operator of fit, predict, variance and samples; the one cross operator left on "auto" only
    # serves latent_variance's dense rows (CrossKernelOperator.rows, never a product)
    assert {b for c, b in made if c == "KernelOperator"} == {"keops"}
    assert [b for c, b in made if c == "CrossKernelOperator"].count("keops") == 2  # mean, samples
    assert gps["keops"].report_.cg_stats["backend"] == "keops"
    gps["torch"].fit(X, y)
    want = gps["torch"].predict(X[:20], return_std=True), gps["torch"].sample_y(X[:20], n_samples=2)
    for g, w in zip((*got[0], got[1]), (*want[0], want[1])):
        assert_close(torch.as_tensor(g), torch.as_tensor(w), 1e-6, what="keops vs torch ExactGP outputs")


def test_the_row_partition_refuses_a_fused_backend():
    from gpscale.distributed.mll import grid_operator

    with pytest.raises(ValueError, match="cannot run the row partition"):
        grid_operator(make_inputs(10, 2), RBF(), 0.1, SimpleNamespace(rows=2), {"backend": "keops"})


@pytest.mark.keops
def test_auto_tuning_times_the_real_products_and_leaves_out_what_cannot_run(keops_ok):
    """autotune.measure with the real fused_products: KeOps runs on CPU tensors, the CUDA kernels
    refuse them (the reason is kept), so KeOps is chosen from a finite time."""
    op = KernelOperator(make_inputs(200, 2, seed=4), RBF(lengthscale=0.5), noise=0.1)
    t = autotune.measure(op, ["cuda", "keops"], rhs=T)  # the width the KeOps tests above already compiled
    assert t.choice == "keops" and set(t.seconds) == {"keops"} and 0 < t.seconds["keops"] < math.inf
    assert "CUDA" in t.errors["cuda"] and t.probe == (200, 200, T)
