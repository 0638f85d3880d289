"""The benchmark scripts a lent GPU runs (``benchmarks/gpu_session.sh``) work end to end on CPU.

A GPU session has 30 minutes and no second chance: a command that fails to parse, or a script that
crashes after its measurement, loses the figure.  These runs use tiny sizes on CPU; they check what
the scripts write, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_kernel_matmul as bkm  # noqa: E402
from gpscale._ext import launch  # noqa: E402
from session_script import session_commands, session_tcbh_builds, session_text  # noqa: E402
import bench_precision as bp  # noqa: E402
import lowp_perturbation as lp  # noqa: E402
import tune_tcb  # noqa: E402


def test_gpu_session_script_is_valid_bash_and_its_commands_parse():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_session.sh")], check=True)
    cmds = session_commands()
    # (bench_precision.py left the script once its 200k figure was taken; its branch below stays for a next one)
    assert {c[0] for c in cmds} == {"benchmarks/bench_kernel_matmul.py", "benchmarks/tune_tcb.py"}
    for script, *argv in cmds:
        if script.endswith("bench_kernel_matmul.py"):
            args = bkm.parse_args(argv)
            assert args.device == "cuda"
            assert args.tcbh_build is None or launch.parse_build(args.tcbh_build)
        elif script.endswith("tune_tcb.py"):
            assert all(len(c) == tune_tcb.NOPTS for c in tune_tcb.parse_args(argv).configs)
        else:
            args = bp.parse_args(argv)
            assert args.device == "cuda" and args.datasets == ["synthetic"]


def test_kernel_matmul_benchmark_runs_products_and_the_mll_on_cpu(tmp_path):
    out = tmp_path / "km.json"
    assert bkm.main(["--device", "cpu", "--sizes", "600", "--kernels", "rbf", "--backends", "torch", "cuda:tcb",
                     "--repeats", "1", "--ref-rows", "16", "--mll", "--mll-rank", "50", "--mll-max-iter", "40",
                     "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (rec,) = doc["results"]  # the CUDA variant is skipped on a CPU device
    assert rec["backend"] == "torch" and rec["rel_err"] < 1e-5
    mll = doc["mll"]
    assert mll["rank"] == 50 and mll["max_iter"] == 40 and mll["stats"]["preconditioner_rank"] == 50
    assert mll["stats"]["iterations_max"] <= 40 and mll["forward_seconds"] > 0


def test_the_session_tests_and_times_a_candidate_tcbh_build_other_than_the_shipped_one():
    builds = session_tcbh_builds()
    assert builds and all(b != launch.DEFINES["tcbh"] for b in builds)
    assert any("-DTCB_TRI=1" in b for b in builds) and any("-DTCB_DF16=2" in b for b in builds)
    text = session_text()
    assert "--tcbh-build " not in text, 'write --tcbh-build="...": a lone -D value would parse as an option'

    def lines(b, what):
        return [ln for ln in text.splitlines() if what(ln) and f'--tcbh-build="{" ".join(b)}"' in ln]

    def semantics(b):  # TCB_MINB only steers ptxas's register allocation: the same kernel's results
        return tuple(o for o in b if not o.startswith("-DTCB_MINB="))

    tested = {semantics(b) for b in builds if lines(b, lambda ln: ln.startswith("step tests"))}
    for b in builds:  # each candidate is timed, and tested against the reference (or its other allocation is)
        assert lines(b, lambda ln: "bench_kernel_matmul" in ln), f"gpu_session.sh must time the candidate {b}"
        assert semantics(b) in tested, f"gpu_session.sh must test the candidate {b}"


def test_kernel_matmul_benchmark_times_the_symmetric_product(tmp_path):
    out = tmp_path / "km.json"
    assert bkm.main(["--device", "cpu", "--sizes", "300", "--kernels", "matern12", "--backends", "torch",
                     "--repeats", "1", "--ref-rows", "300", "--symmetric", "--out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["symmetric"] and rec["rel_err"] < 1e-6  # against K(X, X) V: Matérn-1/2 shows a wrong diagonal


def test_kernel_matmul_benchmark_times_a_candidate_tcbh_build(tmp_path, monkeypatch):
    monkeypatch.setitem(launch.DEFINES, "tcbh", launch.DEFINES["tcbh"])  # the benchmark sets it for its process
    out = tmp_path / "km.json"
    assert bkm.main(["--device", "cpu", "--sizes", "300", "--kernels", "rbf", "--backends", "torch", "--repeats", "1",
                     "--ref-rows", "8", "--tcbh-build", "-DTCB_DF16=2 -DTCB_BN=128", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["tcbh_build"] == ["-DTCB_DF16=2", "-DTCB_BN=128"]
    assert launch.DEFINES["tcbh"] == ("-DTCB_DF16=2", "-DTCB_BN=128")
    with pytest.raises(SystemExit, match="--tcbh-build"):
        bkm.main(["--device", "cpu", "--tcbh-build", "TCB_DF16=2", "--out", str(out)])


def test_kernel_matmul_benchmark_records_the_column_splits_each_run_took(monkeypatch):
    from gpscale._ext import splits as splits_mod
    from gpscale._ext.splits import choose_splits, resident_blocks
    from gpscale.operators import CudaBackend

    assert bkm.parse_args(["--splits", "1", "auto", "4"]).splits == [1, "auto", 4]
    with pytest.raises(SystemExit):
        bkm.parse_args(["--splits", "0"])

    def product(splits):  # what a CUDA product does inside: the launcher's choice, through splits' names
        assert bkm.operator_backend("cuda:tcbh", splits) == CudaBackend(variant="tcbh", splits="auto")
        splits_mod.resident_blocks(object(), 256)
        return {"backend": "cuda:tcbh", "chosen": splits_mod.choose_splits(391, 782, 528)}

    rec = bkm._with_splits("cuda:tcbh", "auto", product)
    want = splits_mod.choose_splits(391, 782, 528)
    assert rec["splits"] == "auto" and rec["splits_taken"] == [rec["chosen"]] == [want]
    assert rec["blocks_per_sm"] == [None]
    # the observation is undone for the next backend
    assert splits_mod.choose_splits is choose_splits and splits_mod.resident_blocks is resident_blocks
    assert bkm.operator_backend("cuda") == CudaBackend() and bkm.operator_backend("keops", "auto") == "keops"


def test_tune_tcb_records_best_and_median_of_each_configuration(monkeypatch):
    # a fake build (the real one needs NVRTC and a GPU) whose products take 3, 1 and 2 time units
    monkeypatch.setattr(tune_tcb.torch.cuda, "synchronize", lambda: None)
    ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0] * 2)  # (start, end) of each timed run, both kernels
    monkeypatch.setattr(tune_tcb.time, "perf_counter", lambda: next(ticks))
    n, d, t = 300, 2, 3
    entries = {f"{tune_tcb.prefix(1)}_{k}_f": (lambda grid, block, args: None) for k in tune_tcb.KERNELS}
    monkeypatch.setattr(tune_tcb, "build", lambda *cfg: (entries, 0.5))
    Xs = torch.rand(n, d, generator=torch.Generator().manual_seed(0))
    V = torch.randn(n, t, generator=torch.Generator().manual_seed(1))
    refs = {k: torch.ones(8, t, dtype=torch.float64) for k in tune_tcb.KERNELS}
    a = tune_tcb.parse_args(["--n", str(n), "--d", str(d), "--t", str(t), "--repeats", "3", "--ref-rows", "8",
                             "--configs", "2,3,0,0,2,0,0,128"])
    out = tune_tcb.time_config(a.configs[0], {2: (Xs, None, None, V)}, refs, a)
    assert [r["kernel"] for r in out] == list(tune_tcb.KERNELS)
    rec = out[0]
    assert rec["df16"] == 2 and rec["bn"] == 128 and rec["seconds_all"] == [3.0, 1.0, 2.0]
    assert rec["seconds"] == 1.0 and rec["seconds_median"] == 2.0 and rec["compile_s"] == 0.5


def test_tune_tcb_times_each_configuration_at_each_column_split(monkeypatch):
    from types import SimpleNamespace

    from gpscale._ext.splits import choose_splits

    monkeypatch.setattr(tune_tcb.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(tune_tcb.torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(multi_processor_count=132))
    grids = []
    entries = {f"{tune_tcb.prefix(2)}_{k}_f": (lambda grid, block, args: grids.append(grid)) for k in tune_tcb.KERNELS}
    monkeypatch.setattr(tune_tcb, "build", lambda *cfg: (entries, 0.5))
    n, d, t = 100_000, 2, 16
    Xs, V = torch.zeros(n, d), torch.zeros(n, t)
    refs = {k: torch.ones(8, t, dtype=torch.float64) for k in tune_tcb.KERNELS}
    a = tune_tcb.parse_args(["--n", str(n), "--d", str(d), "--t", str(t), "--repeats", "1", "--ref-rows", "8",
                             "--configs", "2,4,0,0,2,0,4,128", "--splits", "1", "3", "auto"])
    out = tune_tcb.time_config(a.configs[0], {2: (Xs, None, None, V)}, refs, a)
    # 391 blocks of 256 rows, 782 tiles of 128 columns; no driver here: 2 blocks per SM assumed
    auto = choose_splits(391, 782, 2 * 132, partial_bytes=4 * n * t)
    assert [(r["kernel"], r["splits"], r["splits_taken"]) for r in out] == [
        (k, s, auto if s == "auto" else s) for k in tune_tcb.KERNELS for s in (1, 3, "auto")]
    assert grids[:4] == [(391, 1, 1)] * 2 + [(391, 1, 3)] * 2  # warm-up and one timed run per split
    with pytest.raises(SystemExit):
        tune_tcb.parse_args(["--splits", "0"])


def test_kernel_matmul_mll_only(tmp_path):
    out = tmp_path / "mll.json"
    assert bkm.main(["--device", "cpu", "--sizes", "400", "--mll-only", "--mll-rank", "20", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["results"] == [] and doc["mll"]["n"] == 400


def test_precision_benchmark_records_where_products_ran(tmp_path):
    # n = 300 train points: the bf16 upper-triangle kernel (~0.1 MB) fits a 0.25 MB budget's cache,
    # float32's (~0.2 MB) does not.
    out = tmp_path / "p.json"
    assert bp.main(["--datasets", "synthetic", "--max-n", "334", "--fit-iter", "0", "--precisions", "float32",
                    "bfloat16", "--memory-budget", "250000", "--noise", "0.5", "--threads", "1", "--no-markdown",
                    "--repeats", "2",
                    "--timeout", "300", "--out", str(out)]) == 0
    res = {r["precision"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["status"] == "ok" for r in res.values()), res
    assert res["bfloat16"]["mll_grad"]["products"]["low_cached"] is True
    assert res["float32"]["mll_grad"]["products"]["low_cached"] is False
    assert res["bfloat16"]["mll_grad"]["cg"]["finished_precision"] == {"bfloat16": 11}  # noise 0.5: no fallback
    assert res["bfloat16"]["lowrank_correction"] is False  # "auto": bf16 rounds K itself
    for r in res.values():  # timed twice, the warm (last) call reported
        assert len(r["mll_grad"]["seconds_all"]) == 2 and r["mll_grad"]["seconds"] == r["mll_grad"]["seconds_all"][-1]


def test_low_precision_perturbation_orders_the_roundings(tmp_path):
    out = tmp_path / "lp.json"
    assert lp.main(["--sizes", "150", "300", "--noises", "0.1", "1.0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rho = {(r["n"], r["rounding"], r["noise"]): r["rho"] for r in doc["rows"]}
    for n in (150, 300):
        for s2 in (0.1, 1.0):
            assert rho[n, "bfloat16", s2] > 4 * rho[n, "float16", s2] > 100 * rho[n, "bfloat16x2", s2]
            assert rho[n, "float16", s2] == pytest.approx(rho[n, "tf32", s2], rel=0.3)  # both u = 2^-11
        assert rho[n, "bfloat16", 0.1] > rho[n, "bfloat16", 1.0]  # more noise, smaller perturbation
    assert rho[300, "bfloat16", 0.1] > rho[150, "bfloat16", 0.1]  # and it grows with n
    assert doc["fits"]["bfloat16@0.1"]["exponent"] > 0.3
