"""gpscale.distributed on CPU with gloo: 2-4 processes started by the tests, torchrun-style.

Each test launches this very file as a worker script in ``world`` subprocesses with the environment
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port); a
worker joins the group with :func:`gpscale.distributed.init_process_group`, runs one *scenario* and
writes its results as JSON.  The parent computes the single-process reference in-process with the
same seed and compares (float64, ``1e-6`` relative).  Every launch has a wall-clock bound: a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpscale
import gpscale.distributed
from gpscale.kernels import RBF, Matern
from gpscale.precond import PivotedCholesky

HERE = Path(__file__).resolve()
RTOL = 1e-6
STRATEGIES = ("columns", "rows", "hybrid")


# ----------------------------------------------------------------------------- problems
def _data(n=320, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=torch.float64) * 3
    y = torch.sin(1.5 * X[:, 0]) + 0.3 * X[:, -1] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


CASES = {
    # name: (kernel factory, noise, num_probes)
    "rbf_ard": (lambda: RBF(lengthscale=torch.tensor([0.6, 0.9, 1.2]), outputscale=1.3).double(), 0.05, 7),
    "matern12": (lambda: Matern(nu=0.5, lengthscale=0.8, outputscale=0.9).double(), 0.1, 8),
    # smooth kernel, rank-20 preconditioner explains it: the trace control variate is on (the exact
    # tr(P⁻¹∂K̂) part must be counted once across the grid)
    "rbf_control_variate": (lambda: RBF(lengthscale=1.2, outputscale=1.0).double(), 0.3, 6),
}


def mll_and_grad(case: str, distributed=None) -> dict:
    """Value and gradient (lengthscale(s), outputscale, noise, mean) of one case; tight CG tolerance."""
    make_kernel, noise0, t = CASES[case]
    X, y = _data()
    k = make_kernel()
    noise = torch.tensor(noise0, dtype=torch.float64, requires_grad=True)
    mean = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    res = gpscale.mll_estimate(X, y, k, noise, mean, method="iterative", rtol=1e-9, max_iter=400, num_probes=t,
                               preconditioner=PivotedCholesky(rank=20), seed=7, distributed=distributed)
    res.value.backward()
    grad = [*k.raw_lengthscale.grad.reshape(-1).tolist(), float(k.raw_outputscale.grad), float(noise.grad),
            float(mean.grad)]
    return {"value": float(res.value.detach()), "grad": grad, "status": res.stats["status"],
            "grid": res.stats.get("grid")}


# ----------------------------------------------------------------------------- worker side
def _scenario_mll(rank: int, world: int) -> dict:
    return {f"{s}/{c}": mll_and_grad(c, s) for s in STRATEGIES for c in CASES}


def fit_and_sample(distributed=None, checkpoint=None, sample_strategies=(None,)) -> dict:
    """A short distributed-or-not ``ExactGP`` fit, then posterior samples (exact and RFF priors)."""
    X, y = _data(300)
    gp = gpscale.ExactGP(kernel="rbf", method="iterative", max_iter=3, num_probes=5, rtol=1e-8,
                         preconditioner=PivotedCholesky(rank=20), checkpoint=checkpoint)
    gp.fit(X, y, distributed=distributed)
    Xt = _data(16, seed=5)[0]
    out = {"theta": gp._params.vector().tolist()}
    for s in sample_strategies:
        out[f"exact/{s}"] = gp.sample_y(Xt, n_samples=5, seed=3, distributed=s).tolist()
        out[f"rff/{s}"] = gp.sample_y(Xt, n_samples=5, seed=3, distributed=s, prior="rff",
                                      num_features=256).tolist()
    return out


def _scenario_fit(rank: int, world: int) -> dict:
    ck = Path(os.environ["GPSCALE_DIST_OUT"]).parent / f"ck{rank}.pt"
    return fit_and_sample("columns", checkpoint=str(ck), sample_strategies=STRATEGIES)


def _scenario_die(rank: int, world: int) -> dict:
    """Rank 1 dies without a word; rank 0 must get a DistributedError, not a hang."""
    if rank == 1:
        time.sleep(0.5)
        os._exit(1)
    return _expect_failure(lambda: mll_and_grad("rbf_ard", "columns"))


def _scenario_hang(rank: int, world: int) -> dict:
    """Rank 1 stalls for longer than the collective timeout; rank 0 must raise within the timeout."""
    if rank == 1:
        time.sleep(float(os.environ["GPSCALE_DIST_TIMEOUT"]) + 8)
        return {}
    return _expect_failure(lambda: mll_and_grad("rbf_ard", "columns"))


class _FailingOnRank1(PivotedCholesky):
    def build(self, op):
        if torch.distributed.get_rank() == 1:
            raise ValueError("injected failure on rank 1")
        return super().build(op)


def _scenario_raise(rank: int, world: int) -> dict:
    """Rank 1 raises inside the distributed code: every rank stops at once with a clear error."""
    X, y = _data()
    out = {}
    for strategy in ("columns", "rows"):
        out[strategy] = _expect_failure(lambda s=strategy: gpscale.marginal_log_likelihood(
            X, y, RBF(lengthscale=0.7).double(), 0.1, method="iterative", seed=0, distributed=s,
            preconditioner=_FailingOnRank1(rank=10)))
    return out


def _scenario_raise_in_product(rank: int, world: int) -> dict:
    """Rank 1 raises inside a row-partition product (mid-CG): the failure flag stops rank 0 at once."""
    from gpscale.distributed import row_operator

    if rank == 1:
        calls = {"n": 0}
        original = row_operator.RowBlockOperator.local_matmul

        def failing(self, V):
            calls["n"] += 1
            if calls["n"] == 3:
                raise ValueError("injected failure in a product on rank 1")
            return original(self, V)

        row_operator.RowBlockOperator.local_matmul = failing
    X, y = _data()
    return {"rows": _expect_failure(lambda: gpscale.marginal_log_likelihood(
        X, y, RBF(lengthscale=0.7).double(), 0.1, method="iterative", seed=0, distributed="rows"))}


def _expect_failure(fn) -> dict:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def _worker() -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    gpscale.distributed.init_process_group(backend="gloo", timeout_s=float(os.environ["GPSCALE_DIST_TIMEOUT"]))
    result = globals()["_scenario_" + os.environ["GPSCALE_DIST_SCENARIO"]](rank, world)
    Path(os.environ["GPSCALE_DIST_OUT"]).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # a peer may be gone: skip the process-group teardown


# ----------------------------------------------------------------------------- parent side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, scenario: str, tmp_path: Path, *, timeout_s: float = 60.0, deadline_s: float = 240.0):
    """Start ``world`` workers; return ``(results, returncodes, logs)``; kill them all past ``deadline_s``."""
    port, procs = _free_port(), []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", GPSCALE_DIST_SCENARIO=scenario,
                   GPSCALE_DIST_TIMEOUT=str(timeout_s), GPSCALE_DIST_OUT=str(tmp_path / f"{scenario}{r}.json"))
        procs.append(subprocess.Popen([sys.executable, str(HERE)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    end, logs = time.monotonic() + deadline_s, []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"distributed scenario {scenario!r} on {world} ranks did not finish in {deadline_s} s")
        logs.append(out)
    results = []
    for r in range(world):
        f = tmp_path / f"{scenario}{r}.json"
        results.append(json.loads(f.read_text()) if f.exists() else None)
    return results, [p.returncode for p in procs], logs


def _close(a: float, b: float, rtol: float = RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-3)


@pytest.fixture(scope="module")
def references():
    return {c: mll_and_grad(c) for c in CASES}


@pytest.mark.parametrize("world", [2, 3])
def test_strategies_match_single_process(world, references, tmp_path):
    results, _codes, logs = launch(world, "mll", tmp_path)
    assert all(r is not None for r in results), "\n".join(logs)
    for key, got in results[0].items():
        ref = references[key.split("/")[1]]
        assert got["status"] == "CONVERGED"
        assert _close(got["value"], ref["value"]), (key, got["value"], ref["value"])
        for g, r in zip(got["grad"], ref["grad"]):
            assert _close(g, r), (key, got["grad"], ref["grad"])
        for other in results[1:]:  # bitwise the same on every rank
            assert other[key]["value"] == got["value"] and other[key]["grad"] == got["grad"]


def test_hybrid_two_by_two(references, tmp_path):
    results, _codes, logs = launch(4, "mll", tmp_path)
    assert all(r is not None for r in results), "\n".join(logs)
    for case, ref in references.items():
        got = results[0][f"hybrid/{case}"]
        assert got["grid"] == "2x2"
        assert _close(got["value"], ref["value"]) and all(_close(g, r) for g, r in zip(got["grad"], ref["grad"]))
        assert all(o[f"hybrid/{case}"] == got for o in results[1:])


def test_fit_and_sample_y(tmp_path):
    results, _codes, logs = launch(2, "fit", tmp_path)
    assert all(r is not None for r in results), "\n".join(logs)
    ref = fit_and_sample()
    assert results[0]["theta"] == results[1]["theta"]  # identical hyperparameters on every rank
    assert all(_close(a, b) for a, b in zip(results[0]["theta"], ref["theta"])), (results[0]["theta"], ref["theta"])
    assert (tmp_path / "ck0.pt").exists() and not (tmp_path / "ck1.pt").exists()  # only rank 0 writes
    for prior in ("exact", "rff"):
        want = torch.tensor(ref[f"{prior}/None"])
        for s in STRATEGIES:
            got = torch.tensor(results[0][f"{prior}/{s}"])
            assert got.shape == want.shape == (16, 5)
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (prior, s, (got - want).abs().max())
            assert results[1][f"{prior}/{s}"] == results[0][f"{prior}/{s}"]


def test_dead_rank_ends_the_job_with_an_error(tmp_path):
    results, codes, logs = launch(2, "die", tmp_path, timeout_s=10.0, deadline_s=90.0)
    assert codes[1] == 1
    r0 = results[0]
    assert r0 is not None, logs[0]
    assert r0["error"] == "DistributedError", r0
    assert "rank 0" in r0["message"] and "died" in r0["message"]
    assert r0["seconds"] < 10.0 + 5.0


def test_stalled_rank_times_out(tmp_path):
    results, _codes, logs = launch(2, "hang", tmp_path, timeout_s=3.0, deadline_s=90.0)
    r0 = results[0]
    assert r0 is not None, logs[0]
    assert r0["error"] == "DistributedError", r0
    assert r0["seconds"] < 3.0 + 5.0


def test_raising_rank_stops_every_rank_at_once(tmp_path):
    results, _codes, logs = launch(2, "raise", tmp_path, timeout_s=60.0, deadline_s=120.0)
    assert all(r is not None for r in results), "\n".join(logs)
    for strategy in ("columns", "rows"):
        r0, r1 = results[0][strategy], results[1][strategy]
        assert r1["error"] == "ValueError" and "injected" in r1["message"]
        assert r0["error"] == "DistributedError" and "rank(s) [1]" in r0["message"], r0
        assert r0["seconds"] < 30.0  # well inside the 60 s timeout: no waiting for it


def test_rank_raising_inside_a_row_product_stops_every_rank(tmp_path):
    results, _codes, logs = launch(2, "raise_in_product", tmp_path, timeout_s=60.0, deadline_s=120.0)
    assert all(r is not None for r in results), "\n".join(logs)
    r0, r1 = results[0]["rows"], results[1]["rows"]
    assert r1["error"] == "ValueError" and "injected" in r1["message"]
    assert r0["error"] == "DistributedError" and "rank(s) [1]" in r0["message"], r0
    assert r0["seconds"] < 30.0  # the flag in the all-gather, not the 60 s timeout


def test_without_process_group_says_how_to_launch():
    X, y = _data(50)
    with pytest.raises(RuntimeError, match="torchrun"):
        gpscale.marginal_log_likelihood(X, y, RBF().double(), 0.1, method="iterative", distributed="columns")


def test_bad_strategy():
    with pytest.raises(ValueError, match="columns"):
        gpscale.distributed.Partition("diagonal")


if __name__ == "__main__":
    _worker()


def test_control_variate_case_uses_it():
    from gpscale.logdet.trace import use_control_variate

    X, _ = _data()
    make_kernel, noise, _ = CASES["rbf_control_variate"]
    k = make_kernel()
    P = PivotedCholesky(rank=20).build(gpscale.KernelOperator(X, k, noise=noise))
    assert use_control_variate(P, X.shape[0] * float(k.outputscale.detach()))
    make_kernel, noise, _ = CASES["matern12"]
    k = make_kernel()
    P = PivotedCholesky(rank=20).build(gpscale.KernelOperator(X, k, noise=noise))
    assert not use_control_variate(P, X.shape[0] * float(k.outputscale.detach()))


def test_tile_shares_are_balanced_disjoint_and_cover_the_upper_triangle():
    from gpscale.distributed import share_tiles
    from gpscale.operators.blocking import plan_symmetric_tiling

    tiles = plan_symmetric_tiling(1000, torch.float64, torch.device("cpu"), tile=96).upper_tiles(1000)
    area = lambda ts: sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in ts)  # noqa: E731
    for parts in (1, 2, 3):
        shares = [share_tiles(tiles, parts, r) for r in range(parts)]
        assert sorted(t for s in shares for t in s) == sorted(tiles)  # disjoint, complete
        loads = [area(s) for s in shares]
        assert max(loads) - min(loads) <= 96 * 96  # within one tile's area
        assert all(s == [t for t in tiles if t in s] for s in shares)  # original order kept


@pytest.mark.parametrize("parts,index", [(0, 0), (2, 2), (2, -1), (2.0, 0)])
def test_share_tiles_rejects_bad_parts_or_index(parts, index):
    from gpscale.distributed import share_tiles

    with pytest.raises(ValueError, match="share_tiles needs parts >= 1"):
        share_tiles([(0, 2, 0, 2)], parts, index)
