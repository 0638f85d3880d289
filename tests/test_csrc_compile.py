"""CI check of ``csrc/`` without a GPU: every ``.cu`` file compiles with nvcc for sm_80 and sm_90.

What is compiled is exactly the text :mod:`gpscale._ext` hands to NVRTC at run time (local
includes inlined, no include path, no torch headers), in one nvcc call per file for both
architectures (``-c`` runs ptxas, which also checks the inline ``mma``/``cvt`` assembly).  The PTX
kept from that call must define every entry point the launcher looks up.  Skipped, with the reason,
when nvcc is not installed.  The NVRTC route of :mod:`gpscale._ext.nvrtc` is compiled too (sm_90)
when a libnvrtc is found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpscale._ext import VARIANTS, cu_files, entry_names
from gpscale._ext.launch import builds
from gpscale._ext.sources import read_source

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from prebuild_cubins import all_builds  # noqa: E402

NVCC = shutil.which("nvcc")
ARCHS = ("80", "90")
NO_NVCC = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the csrc/ compile check needs "
                                                  "the CUDA toolkit (no GPU required)")


def test_sources_need_no_torch_or_system_headers():
    """Device code must compile with NVRTC against a CPU torch wheel: no torch/CUDA headers."""
    for path in cu_files():
        text = read_source(path.name)
        left = re.findall(r"^\s*#\s*include\s*\S+", text, re.MULTILINE)
        assert not left, f"{path.name}: includes survived inlining (NVRTC gets no include path): {left}"
        for banned in ("ATen/", "torch/", "c10/", "cuda_runtime"):
            assert banned not in text, f"{path.name} refers to {banned!r}: device code must be header-free"


#: every (source, -D options) the launcher compiles: a file's default build and e.g. tcbh's TCB_DF16=1
SHIPPED = sorted(builds())
#: and the candidate tcbh builds the next lent GPU tests and times (benchmarks/gpu_session.sh --tcbh-build)
BUILDS = all_builds()


def _built_variants(name: str, defines: tuple) -> list[str]:
    """The launcher variants a build serves: a candidate build stands in for ``tcbh``."""
    return builds().get((name, defines), ["tcbh"])


def test_every_cu_file_is_built():
    assert {name for name, _ in SHIPPED} == {p.name for p in cu_files()}


@pytest.mark.nvcc
@NO_NVCC
@pytest.mark.parametrize("name,defines", BUILDS, ids=[" ".join((n, *d)) for n, d in BUILDS])
def test_cu_file_compiles_for_sm80_and_sm90(tmp_path, name, defines):
    src = tmp_path / name
    src.write_text(read_source(name))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", "-std=c++17", *defines, *gencode, "--keep", f"--keep-dir={tmp_path}", "-Xptxas=-v",
           "-o", str(tmp_path / "out.o"), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"nvcc failed on {name}:\n{' '.join(cmd)}\n{res.stderr[-6000:]}"
    want = {e for v in _built_variants(name, defines) for e in entry_names(v)}
    for arch in ARCHS:
        ptx = list(tmp_path.glob(f"*{arch}*.ptx"))
        assert ptx, f"no PTX kept for sm_{arch}: {sorted(p.name for p in tmp_path.iterdir())}"
        got = set(re.findall(r"\.entry\s+(\w+)", ptx[0].read_text()))
        assert want <= got, f"{name} sm_{arch}: missing entry points {sorted(want - got)}"
    # Spills are a performance bug, not a correctness one: reported in the log (-s), not asserted.
    spills = [ln.strip() for ln in res.stderr.splitlines() if re.search(r"[1-9]\d* bytes spill stores", ln)]
    print(f"{name}: {len(want)} entry points x {len(ARCHS)} archs; functions with spills: {len(spills)}")


@pytest.mark.parametrize("name,defines", BUILDS, ids=[" ".join((n, *d)) for n, d in BUILDS])
def test_cu_file_compiles_with_nvrtc(name, defines):
    """The run-time route itself (gpscale._ext.nvrtc, no GPU needed) for sm_90, when libnvrtc is here.

    sm_80 is covered by the nvcc test above; one NVRTC architecture keeps CI time down.
    """
    from gpscale._ext import nvrtc
    from gpscale._ext.compiler import OPTIONS

    if nvrtc.library() is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc to test the run-time compile path)")
    cubin = nvrtc.compile_cubin(read_source(name), "90", (*OPTIONS, *defines), name)
    assert cubin[:4] == b"\x7fELF"
    for entry in {e for v in _built_variants(name, defines) for e in entry_names(v)}:
        assert entry.encode() in cubin, f"{name}: entry point {entry} missing from the NVRTC cubin"


def _defines(text: str) -> dict:
    """``#define NAME value`` of a source, values evaluated as integer expressions of earlier ones."""
    out = {}
    for name, expr in re.findall(r"^#define (\w+) +\(?([0-9A-Z_ *+/()-]+?)\)?\s*(?://.*)?$", text, re.M):
        try:
            out[name] = int(eval(re.sub(r"[A-Z_]\w*", lambda m: str(out[m.group(0)]), expr), {}))
        except (KeyError, SyntaxError):
            continue
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_launch_geometry_matches_the_kernel_source(variant):
    # The launcher's rows and threads per block must be what the kernel assumes: a mismatch would
    # leave rows uncomputed or read past the block's shared tiles, and only a GPU would show it.
    src, rows, tch, threads = VARIANTS[variant]
    prefix = {"kmm_simt.cu": "SIMT", "kmm_tc.cu": "TC", "kmm_tcb.cu": "TCB"}[src]
    defs = _defines(read_source(src))
    want_threads = defs[f"{prefix}_ROWS"] if prefix == "SIMT" else 32 * defs[f"{prefix}_WARPS"]
    assert (rows, tch, threads) == (defs[f"{prefix}_ROWS"], defs[f"{prefix}_TCH"], want_threads)


def test_entry_name_picks_dtype_for_simt_and_ksteps_for_tcb():
    import torch

    from gpscale._ext.launch import entry_name

    assert entry_name("simt", "rbf", "f", torch.float64, 8) == "gpscale_kmm_simt_f64_rbf_f"
    assert entry_name("tc3", "matern52", "d", torch.float32, 20) == "gpscale_kmm_tc3_matern52_d"
    # tcb is compiled once per k-step count: d = 1..8 -> k1, 9..16 -> k2, ..., 25..32 -> k4
    got = {d: entry_name("tcb", "rbf", "f_dq", torch.float32, d) for d in (1, 8, 9, 16, 17, 25, 32)}
    assert got == {1: "gpscale_kmm_tcb_k1_rbf_f_dq", 8: "gpscale_kmm_tcb_k1_rbf_f_dq", 9: "gpscale_kmm_tcb_k2_rbf_f_dq",
                   16: "gpscale_kmm_tcb_k2_rbf_f_dq", 17: "gpscale_kmm_tcb_k3_rbf_f_dq",
                   25: "gpscale_kmm_tcb_k4_rbf_f_dq", 32: "gpscale_kmm_tcb_k4_rbf_f_dq"}
    for variant in VARIANTS:  # every name a launch can ask for is one the module loads
        names = set(entry_names(variant))
        for d in range(1, 33):
            for dtype in (torch.float32, torch.float64) if variant == "simt" else (torch.float32,):
                assert entry_name(variant, "matern12", "f", dtype, d) in names


def test_tcbh_is_its_own_build_of_the_tcb_source_and_the_float32_default():
    from gpscale._ext.launch import DEFINES, EXPERIMENTAL, entry_name
    from gpscale.operators.cuda_backend import FLOAT32_VARIANT

    assert builds()["kmm_tcb.cu", ()] == ["tcb"] and builds()["kmm_tcb.cu", DEFINES["tcbh"]] == ["tcbh"]
    assert "-DTCB_DF16=1" in DEFINES["tcbh"]
    # its GPU tests passed on the third lent H100: compiled by available(compile=True), picked for float32
    assert "tcbh" not in EXPERIMENTAL and FLOAT32_VARIANT == "tcbh"
    assert entry_name("tcbh", "matern52", "f", torch.float32, 13) == "gpscale_kmm_tcbh_k2_matern52_f"


def test_tcbh_refuses_inputs_outside_the_f16_range():
    from gpscale._ext.launch import F16_MAX, _check_f16_range

    ok = torch.full((3, 2), F16_MAX)
    _check_f16_range(ok, -ok)
    for bad, says in ((2 * F16_MAX, "variant 'tcb'"), (-2 * F16_MAX, "variant 'tcb'"), (float("nan"), "NaN or Inf"),
                      (float("inf"), "NaN or Inf"), (-float("inf"), "NaN or Inf")):
        X = ok.clone()
        X[1, 1] = bad
        with pytest.raises(ValueError, match=says):  # too large: another variant; not finite: the inputs
            _check_f16_range(ok, X)


def test_z_layout_follows_the_build_that_runs(monkeypatch):
    from gpscale._ext import launch

    assert launch.z_layout("tcb") == 0 and launch.z_layout("tcbh") == 1  # as shipped: -DTCB_DF16=1
    monkeypatch.setitem(launch.DEFINES, "tcbh", launch.parse_build("-DTCB_DF16=2 -DTCB_BN=128"))
    assert launch.z_layout("tcbh") == 2
    assert launch.build_df16(("-DTCB_BN=128",)) == 0 and launch.build_df16(("-DTCB_DF16=1", "-DTCB_DF16=2")) == 2
    with pytest.raises(ValueError, match="-DTCB_NAME=VALUE"):
        launch.parse_build("TCB_DF16=2")
    with pytest.raises(ValueError, match="-DTCB_NAME=VALUE"):
        launch.parse_build("  ")
