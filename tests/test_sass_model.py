"""benchmarks/sass_model.py: the static throughput model of the csrc/ kernels.

The counting and the model run on a small hand-written SASS listing (no CUDA tools needed); every
variant's probe instantiation compiles with nvcc where it is installed (CI has it), so the model's
template calls cannot drift from csrc/; the whole pipeline runs where nvdisasm is found too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sass_model  # noqa: E402

LISTING = """
.text.other:
        /*0000*/                   EXIT ;
.text.probe:
        /*0000*/                   MOV R1, RZ ;
.L_x_1:
        /*0010*/                   FMUL R2, R2, R3 ;
.L_x_2:
        /*0020*/                   STS [R1], R2 ;
        /*0030*/              @P0 BRA `(.L_x_2) ;
        /*0040*/                   MUFU.EX2 R4, R2 ;
        /*0050*/                   HMMA.1688.F32.TF32 R4, R2, R3, R4 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""


@pytest.fixture
def toy_variant(monkeypatch):
    # One warp handles 32 pairs per tile; the nested loop stores 4 times per tile, once per trip.
    monkeypatch.setitem(sass_model.VARIANTS, "toy", dict(file="-", call="-", pairs=32, nested=[("STS", 4)]))
    return "toy"


def test_parse_finds_the_function_its_loops_and_strips_predicates():
    ins, labels = sass_model.parse(LISTING)
    assert [op for op, _ in ins] == ["MOV", "FMUL", "STS", "BRA", "MUFU.EX2", "HMMA.1688.F32.TF32", "BRA", "EXIT"]
    assert sorted(sass_model.loops(ins, labels)) == [(1, 6), (2, 3)]


def test_nested_loops_are_weighted_by_their_trip_count(toy_variant):
    ins, labels = sass_model.parse(LISTING)
    counts = sass_model.count_loop(ins, labels, toy_variant, d=8)
    assert counts == {"FMUL": 1, "STS": 4, "BRA": 5, "MUFU.EX2": 1, "HMMA.1688.F32.TF32": 1}


def test_model_takes_the_slowest_resource(toy_variant):
    ins, labels = sass_model.parse(LISTING)
    rec = sass_model.model(sass_model.count_loop(ins, labels, toy_variant, d=8), pairs=32, mma_efficiency=0.5)
    cyc = rec["sm_cycles_per_32_pairs"]
    assert cyc["issue"] == 12 * 0.25 and cyc["mufu"] == 2.0 and cyc["tensor"] == 2.0 and cyc["shared"] == 4.0
    assert rec["bound_by"] == "shared" and rec["pairs_per_sm_clock"] == 8.0
    assert rec["warp_instructions_per_32_pairs"]["alu"] == 0  # MOV is before the loop
    # With one store per tile and a full-rate tensor core, the exp unit is the bound: the MUFU bound.
    fewer = sass_model.model({"FMUL": 1, "STS": 1, "BRA": 2, "MUFU.EX2": 1, "HMMA.1688.F32.TF32": 1}, 32, 1.0)
    assert fewer["bound_by"] == "mufu" and fewer["pairs_per_sm_clock"] == 16.0


def test_tensor_work_counts_an_f16_m16n8k8_as_half_an_m16n8k16():
    # tf32 m16n8k8: half the multiply-adds at half the rate, so as long as a 16-bit m16n8k16
    ops = ("HMMA.16816.F32", "HMMA.16816.F32.BF16", "HMMA.1688.F32.TF32", "HMMA.1688.F32", "HMMA.1688.F32.BF16")
    assert [sass_model.tensor_work(op) for op in ops] == [1.0, 1.0, 1.0, 0.5, 0.5]
    k16 = sass_model.model({"HMMA.16816.F32": 2, "MUFU.EX2": 1}, pairs=32, mma_efficiency=1.0)
    k8 = sass_model.model({"HMMA.16816.F32": 1, "HMMA.1688.F32": 1, "MUFU.EX2": 1}, pairs=32, mma_efficiency=1.0)
    assert k16["sm_cycles_per_32_pairs"]["tensor"] == 2.0 and k8["sm_cycles_per_32_pairs"]["tensor"] == 1.5
    assert k8["warp_instructions_per_32_pairs"]["tensor"] == 2 and k8["tensor_work_per_32_pairs"] == 1.5


def test_the_tcbh_model_variants_are_the_shipped_build_and_its_k8_twin():
    from gpscale._ext import launch

    shipped = dict(o[2:].split("=", 1) for o in launch.DEFINES["tcbh"])
    assert sass_model.VARIANTS["tcbh"]["defines"] == shipped
    assert sass_model.VARIANTS["tcbh2"]["defines"] == {**shipped, "TCB_DF16": "2"}
    assert sass_model.VARIANTS["tcbh"]["pairs"] == 32 * int(shipped.get("TCB_BN", 64))
    src = sass_model.probe_source("tcbh2", "rbf", 8, 16)
    assert "#define TCB_DF16 2" in src and f"__launch_bounds__(256, {shipped.get('TCB_MINB', 1)})" in src


def test_a_nested_loop_that_does_not_divide_its_count_is_refused(monkeypatch, toy_variant):
    monkeypatch.setitem(sass_model.VARIANTS["toy"], "nested", [("STS", 3)])
    ins, labels = sass_model.parse(LISTING.replace("STS [R1], R2 ;", "STS [R1], R2 ;\n        /*0028*/   STS [R1], R3 ;"))
    with pytest.raises(RuntimeError, match="does not divide 3"):
        sass_model.count_loop(ins, labels, "toy", d=8)


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("variant", list(sass_model.VARIANTS))
def test_every_probe_instantiation_compiles(tmp_path, variant):
    cu = tmp_path / "probe.cu"
    cu.write_text(sass_model.probe_source(variant, "matern52", 8, 16))
    res = subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-O3", f"-I{sass_model.CSRC}", str(cu), "-o",
                          str(tmp_path / "probe.cubin")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.skipif(NVCC is None or shutil.which("nvdisasm") is None, reason="needs nvcc and nvdisasm on PATH")
def test_model_of_the_real_kernels_counts_one_exp_per_pair(tmp_path):
    out = tmp_path / "m.json"
    sass_model.main(["--variants", "tc3", "tcb", "--kernels", "rbf", "--out", str(out)])
    import json

    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["tc3", "tcb"]
    assert all(r["warp_instructions_per_32_pairs"]["mufu"] == 1.0 for r in rows)


def test_ptxas_log_gives_each_entry_its_registers_and_the_occupancy_follows():
    log = """ptxas info    : Compiling entry function 'a_kernel' for 'sm_90'
ptxas info    : Function properties for a_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 104 registers, used 1 barriers, 25600 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'b_kernel' for 'sm_90'
ptxas info    : Used 79 registers, 17664 bytes smem, 400 bytes cmem[0]
"""
    assert sass_model.entry_resources(log) == {"a_kernel": (104, 25600), "b_kernel": (79, 17664)}
    # 104 registers x 256 threads: two blocks of 8 warps fit 64 K registers
    assert sass_model.warps_per_sm(104, 25600, 256) == 16
    # 79 -> 80 registers per thread (256 per warp): six 4-warp blocks
    assert sass_model.warps_per_sm(79, 17664, 128) == 24
    # shared memory can bind too: 100 KB per block leaves room for two
    assert sass_model.warps_per_sm(32, 100 * 1024, 128) == 8


def test_wide_shared_accesses_count_their_wavefronts_where_lanes_read_distinct_words():
    # tcb: 32 lanes x 16 bytes = 4 wavefronts of 128 bytes; cp.async (LDGSTS) writes shared memory too.
    ops = ("LDS", "STS.64", "LDS.128", "LDGSTS.E.BYPASS.128", "LDG.E.128", "FADD")
    assert [sass_model.shared_wavefronts(op, distinct_wide=True) for op in ops] == [1, 2, 4, 4, 0, 0]
    rec = sass_model.model({"LDS.128": 2, "MUFU.EX2": 1}, pairs=32, mma_efficiency=1.0, distinct_wide=True)
    assert rec["sm_cycles_per_32_pairs"]["shared"] == 8.0 and rec["bound_by"] == "shared"
    # simt's wide reads are broadcasts (every lane the same Z row): one wavefront each
    assert [sass_model.shared_wavefronts(op) for op in ops] == [1, 1, 1, 1, 0, 0]
    assert sass_model.VARIANTS["tcb"]["distinct_wide"] and "distinct_wide" not in sass_model.VARIANTS["simt"]
