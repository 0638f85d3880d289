"""The measured choice of ``backend="auto"`` between fused backends (gpscale.operators.autotune), on CPU.

The timing itself is replaced by a fake clock driven by the fake products, so these tests never
depend on how fast this machine is; the real products run in ``test_backends.py`` (KeOps on CPU)
and ``test_cuda_kernels.py`` (a GPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

from gpscale.kernels import RBF, Matern
from gpscale.likelihood import mll_estimate
from gpscale.operators import CrossKernelOperator, KernelOperator, autotune
from gpscale.operators import kernel_operator as kernel_operator_module


@pytest.fixture(autouse=True)
def _empty_table():
    autotune.clear()
    yield
    autotune.clear()


class FakeProducts:
    """``run(view, V)`` that advances a fake clock by each backend's cost and records the calls."""

    def __init__(self, cost: dict, fail=()):
        self.cost, self.fail, self.now, self.calls = cost, set(fail), 0.0, []

    def clock(self) -> float:
        return self.now

    def __call__(self, view, V, mode):
        self.calls.append((view.backend, tuple(view._Zs.shape), tuple(V.shape), mode))
        if view.backend in self.fail:
            raise RuntimeError(f"{view.backend} cannot compile here")
        if view.backend == "cuda":
            view.cuda_variant = "tc3"
        self.now += self.cost[view.backend]
        return torch.zeros(view.shape[0], V.shape[1], dtype=V.dtype)


def _op(n=300, m=None, d=3, kernel=None):
    X = make_inputs(n, d, seed=1)
    if m is None:
        return KernelOperator(X, kernel or RBF(), noise=0.1)
    return CrossKernelOperator(X, make_inputs(m, d, seed=2), kernel or RBF())


def test_measure_picks_the_fastest_candidate_and_reports_every_time():
    fake = FakeProducts({"keops": 0.3, "cuda": 0.1})
    t = autotune.measure(_op(), ["keops", "cuda"], run=fake, clock=fake.clock)
    assert t.choice == "cuda"
    assert t.seconds == pytest.approx({"keops": 0.3, "cuda:tc3": 0.1})  # the CUDA variant is in the label
    assert not t.errors
    # one untimed run (compiles, loads) and REPEATS timed ones per candidate
    assert [c[0] for c in fake.calls] == ["keops"] * (1 + autotune.REPEATS) + ["cuda"] * (1 + autotune.REPEATS)
    assert t.summary().startswith("cuda:tc3 0.1 s, keops 0.3 s per 300x300x16 f probe")


def test_a_near_tie_goes_to_the_earlier_candidate():
    fake = FakeProducts({"keops": 0.104, "cuda": 0.1})  # within TIE = 5%: timing noise, keep the order
    assert autotune.measure(_op(), ["keops", "cuda"], run=fake, clock=fake.clock).choice == "keops"
    fake = FakeProducts({"keops": 0.2, "cuda": 0.1})
    assert autotune.measure(_op(), ["keops", "cuda"], run=fake, clock=fake.clock).choice == "cuda"


def test_a_failing_candidate_is_left_out_with_its_reason():
    fake = FakeProducts({"keops": 0.3, "cuda": 0.1}, fail={"cuda"})
    t = autotune.measure(_op(), ["keops", "cuda"], run=fake, clock=fake.clock)
    assert t.choice == "keops" and list(t.seconds) == ["keops"]
    assert t.errors == {"cuda": "RuntimeError: cuda cannot compile here"}
    assert "cuda failed: RuntimeError" in t.summary()
    fake = FakeProducts({}, fail={"keops", "cuda"})
    t = autotune.measure(_op(), ["keops", "cuda"], run=fake, clock=fake.clock)
    assert t.choice is None and not t.seconds and set(t.errors) == {"keops", "cuda"}


def test_the_probe_keeps_every_row_and_the_first_columns_with_the_full_norms(monkeypatch):
    monkeypatch.setattr(autotune, "PROBE_COLUMNS", 64)
    op = _op(n=200, m=150)
    view = autotune._probe_view(op, "keops")
    assert view.backend == "keops" and view.shape == (200, 64)
    assert torch.equal(view._Xs, op._Xs) and torch.equal(view._Zs, op._Zs[:64])
    # the norms are the whole operator's, so the CUDA expansion guard sees the real r2
    assert view._zn is op._zn and view._xn is op._xn and not view._symmetric
    fake = FakeProducts({"keops": 1.0})
    t = autotune.measure(op, ["keops"], run=fake, clock=fake.clock)
    assert t.probe == (200, 64, autotune.PROBE_RHS)
    assert {c[1:] for c in fake.calls} == {((64, 3), (64, autotune.PROBE_RHS), "f")}
    fake = FakeProducts({"keops": 1.0})
    t = autotune.measure(op, ["keops"], mode="d", rhs=70, run=fake, clock=fake.clock)
    assert t.probe == (200, 64, 70) and t.mode == "d" and {c[1:] for c in fake.calls} == {((64, 3), (64, 70), "d")}


def test_choose_measures_each_problem_class_once():
    fake = FakeProducts({"keops": 0.3, "cuda": 0.1})
    kw = {"run": fake, "clock": fake.clock}
    first = autotune.choose(_op(), ["keops", "cuda"], **kw)
    again = autotune.choose(_op(n=310), ["keops", "cuda"], **kw)  # same power of two, same everything else
    assert again is first and len(fake.calls) == 2 * (1 + autotune.REPEATS)
    for other in (_op(n=1000), _op(d=9), _op(kernel=Matern(nu=2.5))):  # rows, k-steps, kernel
        assert autotune.choose(other, ["keops", "cuda"], **kw) is not first
    assert autotune.choose(_op(), ["cuda"], **kw) is not first  # other candidates: measured apart
    # other products of the same class: per mode and 16-column chunk count
    wide = autotune.choose(_op(), ["keops", "cuda"], mode="d", rhs=204, **kw)
    assert wide is not first and wide.probe[2] == 204 and wide.mode == "d"
    assert autotune.choose(_op(), ["keops", "cuda"], mode="d", rhs=193, **kw) is wide  # also 13 chunks
    assert autotune.choose(_op(), ["keops", "cuda"], mode="f", rhs=17, **kw) is not first  # 2 chunks
    assert autotune.choose(_op(), ["keops", "cuda"], mode="f", rhs=5, **kw) is first  # 1 chunk
    assert len(autotune.tunings()) == 7
    autotune.clear()
    assert not autotune.tunings()


def test_problem_class_buckets():
    base = autotune.problem_class(_op())
    assert base == ("cpu", "rbf", "torch.float64", 1, 8, 8)
    assert autotune.problem_class(_op(d=8))[3] == 1 and autotune.problem_class(_op(d=9))[3] == 2
    assert autotune.problem_class(_op(n=100, m=1000))[4:] == (7, 10)
    assert autotune.problem_class(_op(n=100, m=200_000))[5] == 16  # the probe's width, PROBE_COLUMNS


def test_the_mll_statistics_carry_what_auto_measured(monkeypatch):
    measured = autotune.Tuning("keops", {"keops": 0.07, "cuda:tc3": 0.09}, {}, (300, 300, 16), (), "f")

    def select(op, requested):  # stands in for a GPU run where auto timed two fused backends
        op.backend_tuning = measured
        return "torch"

    monkeypatch.setattr(kernel_operator_module, "select_backend", select)
    X = make_inputs(300, 2, seed=3)
    res = mll_estimate(X, torch.sin(X[:, 0]), RBF(lengthscale=0.7), noise=0.1, method="iterative", seed=0,
                       num_probes=4)
    assert res.stats["backend_tuning"] == measured.summary() == "keops 0.07 s, cuda:tc3 0.09 s per 300x300x16 f probe"
    monkeypatch.undo()
    res = mll_estimate(X, torch.sin(X[:, 0]), RBF(lengthscale=0.7), noise=0.1, method="iterative", seed=0,
                       num_probes=4)
    assert "backend_tuning" not in res.stats  # nothing timed on CPU


def test_the_fit_report_says_what_auto_measured(monkeypatch):
    import gpscale

    measured = autotune.Tuning("keops", {"keops": 0.07, "cuda:tc3": 0.09}, {}, (300, 300, 16), ())

    def select(op, requested):
        op.backend_tuning = measured
        return "torch"

    monkeypatch.setattr(kernel_operator_module, "select_backend", select)
    X = make_inputs(300, 2, seed=3)
    gp = gpscale.ExactGP(kernel="rbf", method="iterative", max_iter=2).fit(X, torch.sin(X[:, 0]))
    assert "(auto timed keops 0.07 s, cuda:tc3 0.09 s per 300x300x16 f probe)" in str(gp.report_)


def test_wide_and_derivative_products_run_on_the_candidate_timed_fastest_for_them(monkeypatch):
    """An auto operator's CG product stays on op.backend; a "d" product with t(2d+1) columns, or a
    wide "f" product, takes what choose() measured for that mode and chunk count."""
    from gpscale.operators import backends, cuda_backend, keops_backend

    ran, asked = [], []
    monkeypatch.setattr(keops_backend, "products", lambda Xs, Zs, name, V, mode: ran.append(("keops", mode)))
    monkeypatch.setattr(cuda_backend, "products", lambda op, V, mode: ran.append(("cuda", mode)))

    def choose(op, cands, *, mode, rhs):
        asked.append((tuple(cands), mode, rhs))
        return autotune.Tuning("cuda" if mode == "d" else "keops", probe=(1, 1, rhs), mode=mode)

    monkeypatch.setattr(autotune, "choose", choose)
    op = _op()
    op.backend, op.fused_candidates = "keops", ("keops", "cuda")  # as select_backend leaves a timed operator
    V = torch.zeros(300, 16, dtype=torch.float64)
    backends.fused_products(op, V, "f")  # the CG product: op.backend, nothing timed
    backends.fused_products(op, torch.zeros(300, 7 * 16, dtype=torch.float64), "d")
    backends.fused_products(op, torch.zeros(300, 40, dtype=torch.float64), "f")
    assert ran == [("keops", "f"), ("cuda", "d"), ("keops", "f")]
    assert asked == [(("keops", "cuda"), "d", 112), (("keops", "cuda"), "f", 40)]
    del op.fused_candidates  # an operator whose backend was not timed (explicit, one candidate) never asks
    backends.fused_products(op, torch.zeros(300, 112, dtype=torch.float64), "d")
    assert ran[-1] == ("keops", "d") and len(asked) == 2


def test_a_timed_operator_keeps_the_candidates_that_ran(monkeypatch):
    from types import SimpleNamespace

    from gpscale.operators import backends
    from gpscale.operators.blocking import plan_symmetric_tiling

    monkeypatch.setattr(backends, "backend_available", lambda *a, **k: (True, ""))
    dev = torch.device("cuda")  # a stand-in operator: auto only times on a GPU
    op = SimpleNamespace(kernel=SimpleNamespace(name="rbf"), device=dev, dtype=torch.float32, shape=(200_000, 200_000),
                         tiling=plan_symmetric_tiling(200_000, torch.float32, dev, None))
    monkeypatch.setattr(autotune, "choose", lambda o, cands: autotune.Tuning("keops", {"keops": 1.0},
                                                                              {"cuda": "RuntimeError: x"}))
    assert backends.select_backend(op, "auto") == "keops"
    assert op.fused_candidates == ("keops",)  # cuda failed: never asked again for this operator
