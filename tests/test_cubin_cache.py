"""The on-disk cubin cache of :mod:`gpscale._ext.compiler`, and the prebuilt cache a lent GPU carries.

No GPU: the driver's module loader, the device queries and NVRTC are replaced by fakes, so what is
checked is the bookkeeping -- that a cubin prebuilt without a GPU (``benchmarks/prebuild_cubins.py``)
sits exactly where :func:`~gpscale._ext.compiler.load_module` looks, that it is loaded and not
compiled again, and that a cached cubin the driver refuses is compiled again rather than raised.  The
real NVRTC compile runs when a libnvrtc is found.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.cuda._utils as cu

from gpscale._ext import compiler, launch, nvrtc
from gpscale._ext.sources import read_source

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import prebuild_cubins  # noqa: E402
from session_script import session_tcbh_builds  # noqa: E402

ENTRIES = ["gpscale_kmm_simt_f32_rbf_f"]


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """An sm_90 device with torch CUDA 13.0 and NVRTC 13.0; returns the compile and load records."""
    seen = {"compiled": [], "loaded": []}

    def compile_(how, text, first, arch, opts=compiler.OPTIONS):
        seen["compiled"].append((how, arch, opts))
        return b"\x7fELF fresh " + "|".join(opts).encode()

    def load(cubin, entries):
        seen["loaded"].append(cubin)
        if cubin.startswith(b"refused"):
            raise RuntimeError("CUDA error: device kernel image is invalid")
        return {e: cubin for e in entries}

    monkeypatch.setenv("GPSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compiler, "route", lambda: ("nvrtc", ""))
    monkeypatch.setattr(compiler, "_compile", compile_)
    monkeypatch.setattr(nvrtc, "version", lambda: (13, 0))
    monkeypatch.setattr(cu, "_cuda_load_module", load, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    return seen


def test_a_prebuilt_cubin_is_loaded_not_compiled(fake_gpu, tmp_path):
    opts = ("-DTCB_DF16=1",)
    path = compiler.compile_to_cache("kmm_simt.cu", opts, "90", "13.0", tmp_path / "cache")
    assert fake_gpu["compiled"] == [("nvrtc", "90", (*compiler.OPTIONS, *opts))]
    got = compiler.load_module("kmm_simt.cu", ENTRIES, torch.device("cuda", 0), options=opts)
    assert len(fake_gpu["compiled"]) == 1, "the GPU side compiled a build that was prebuilt"
    assert got[ENTRIES[0]] == path.read_bytes() == fake_gpu["loaded"][0]
    # compile_to_cache keeps an existing cubin
    compiler.compile_to_cache("kmm_simt.cu", opts, "90", "13.0", tmp_path / "cache")
    assert len(fake_gpu["compiled"]) == 1


def test_a_cubin_the_driver_refuses_is_compiled_again(fake_gpu):
    text = read_source("kmm_simt.cu")
    path = compiler.cubin_path("kmm_simt.cu", text, "90", "nvrtc", compiler.OPTIONS, "13.0")
    path.write_bytes(b"refused: half a file")
    with pytest.warns(RuntimeWarning, match="did not load .*compiling it again"):
        got = compiler.load_module("kmm_simt.cu", ENTRIES, torch.device("cuda", 0))
    assert len(fake_gpu["compiled"]) == 1 and got[ENTRIES[0]].startswith(b"\x7fELF fresh")
    assert path.read_bytes() == got[ENTRIES[0]]  # the bad file is replaced ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiler.load_module("kmm_simt.cu", ENTRIES, torch.device("cuda", 0))  # ... and then just loaded
    assert len(fake_gpu["compiled"]) == 1


def test_the_key_holds_what_changes_the_binary_or_the_driver_s_verdict(monkeypatch, tmp_path):
    monkeypatch.setattr(nvrtc, "version", lambda: (13, 0))
    text = read_source("kmm_simt.cu")

    def key(text=text, arch="90", how="nvrtc", opts=compiler.OPTIONS, cuda="13.0"):
        return compiler.cubin_path("kmm_simt.cu", text, arch, how, opts, cuda, tmp_path).name

    base = key()
    assert base.startswith("kmm_simt-sm90-") and base == key()
    others = [key(text=text + "\n"), key(arch="80"), key(how="torch"), key(opts=(*compiler.OPTIONS, "-DX=1")),
              key(cuda="12.8")]
    monkeypatch.setattr(nvrtc, "version", lambda: (13, 1))
    others.append(key())
    assert len({base, *others}) == len(others) + 1


def test_prebuild_covers_the_shipped_builds_and_the_session_s_candidates():
    got = prebuild_cubins.all_builds()
    assert len(got) == len(set(got))
    assert set(launch.builds()) <= set(got)
    assert {("kmm_tcb.cu", b) for b in session_tcbh_builds()} <= set(got)
    assert ("kmm_tcb.cu", launch.DEFINES["tcbh"]) in got


def test_prebuild_covers_the_session_s_tune_configurations():
    import tune_tcb

    got = prebuild_cubins.tune_configs()
    assert (2, 4, 0, 0, 2, 0, 4, 128) in got  # K8A, swept in the kernels stage
    assert all(len(c) == tune_tcb.NOPTS for c in got) and len(got) == len(set(got))


def test_a_prebuilt_tune_configuration_is_loaded_not_compiled(fake_gpu, tmp_path):
    import tune_tcb

    cfg = (2, 4, 0, 0, 2, 0, 4, 128)
    a = prebuild_cubins.parse_args([])
    prebuild_cubins.build_one(("tune", cfg), a, tmp_path / "cache")
    assert len(fake_gpu["compiled"]) == 1
    mod, _ = tune_tcb.build(*cfg)
    assert len(fake_gpu["compiled"]) == 1, "tune_tcb compiled a configuration that was prebuilt"
    assert set(mod) == {f"{tune_tcb.prefix(2)}_{k}_f" for k in tune_tcb.KERNELS}


def test_prebuild_script_writes_a_manifest_and_checks_nvrtc(monkeypatch, tmp_path):
    out = tmp_path / "c"
    monkeypatch.setattr(prebuild_cubins.nvrtc, "version", lambda: (13, 0))

    def fake(name, text, arch, opts, cuda, directory):
        directory.mkdir(parents=True, exist_ok=True)
        p = directory / f"{Path(name).stem}-{arch}-{cuda}-{'_'.join(opts)}.cubin"
        p.write_bytes(b"x" * 10)
        return p

    monkeypatch.setattr(prebuild_cubins, "cached_cubin", fake)
    monkeypatch.setattr(prebuild_cubins, "compile_to_cache",
                        lambda name, options, arch, cuda, directory: fake(name, "", arch, options, cuda, directory))
    assert prebuild_cubins.main(["--out", str(out), "--jobs", "2"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["arch"] == "90" and man["cuda"] == "13.0" and man["nvrtc"] == [13, 0]
    builds = prebuild_cubins.all_builds()
    assert [(b["file"], tuple(b["options"])) for b in man["builds"][: len(builds)]] == builds
    assert len(man["builds"]) == len(builds) + len(prebuild_cubins.tune_configs())
    assert len({b["cubin"] for b in man["builds"]}) == len(man["builds"])
    with pytest.raises(SystemExit, match="NVRTC 13.0 cannot build for a CUDA 12.8 machine"):
        prebuild_cubins.main(["--out", str(out), "--cuda", "12.8"])
    monkeypatch.setattr(prebuild_cubins.nvrtc, "version", lambda: None)
    with pytest.raises(SystemExit, match="libnvrtc not found"):
        prebuild_cubins.main(["--out", str(out)])


def test_compile_to_cache_with_the_real_nvrtc(tmp_path):
    if nvrtc.library() is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or set GPSCALE_NVRTC)")
    path = compiler.compile_to_cache("kmm_simt.cu", (), "90", "13.0", tmp_path)
    cubin = path.read_bytes()
    assert cubin[:4] == b"\x7fELF" and b"gpscale_kmm_simt_f32_rbf_f" in cubin
    assert path == compiler.cubin_path("kmm_simt.cu", read_source("kmm_simt.cu"), "90", "nvrtc", compiler.OPTIONS,
                                       "13.0", tmp_path)


def test_allow_shared_memory_opts_in_once_and_says_when_it_cannot():
    from gpscale._ext.compiler import allow_shared_memory

    class Kernel:  # torch's loaded kernel (torch.cuda._utils._CudaKernel): the opt-in and its record
        _max_shared_mem_bytes = 0
        calls: list = []

        def set_shared_memory_config(self, nbytes):
            self.calls.append(nbytes)
            self._max_shared_mem_bytes = nbytes

    k = Kernel()
    allow_shared_memory(k, 0)  # no dynamic shared memory: nothing to allow
    assert k.calls == []
    # 40 KB beside the build's static tiles can pass 48 KB in all: opt in, at least to 48 KB (torch's
    # set_shared_memory_config only records smaller values, and the attribute's default is 48 KB - static)
    allow_shared_memory(k, 40 * 1024)
    allow_shared_memory(k, 49152)  # already allowed
    allow_shared_memory(k, 65536)
    allow_shared_memory(k, 60000)
    assert k.calls == [49152, 65536]

    def cupy_call(grid, block, args, shared_mem=0):
        pass
    cupy_call.sets_shared_memory = True  # compiler._load_cupy's launcher sets the attribute per launch
    allow_shared_memory(cupy_call, 65536)
    with pytest.raises(RuntimeError, match="48 KB"):
        allow_shared_memory(lambda grid, block, args: None, 65536)
    allow_shared_memory(lambda grid, block, args: None, 40 * 1024)  # no way to opt in: the launch may still fit
