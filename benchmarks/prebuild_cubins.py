"""Compile every kernel build a lent GPU will load, here and without a GPU, into a cache it can carry.

Why.  A lent GPU's lease is 30 minutes of device time, and a machine that sat idle comes back bare: each
``benchmarks/gpu_session.sh`` call would otherwise spend its first minutes in NVRTC (each build of
``kmm_tcb.cu`` is ~1.8 MB of sm_90 code: 48 entry points, ~12 s on one core) before timing anything.
The builds are those the launcher ships (``launch.builds()``), the candidate ``tcbh`` builds the
session script tests and times (``--tcbh-build``) and the ``tune_tcb.py`` configurations it sweeps
(``--configs``, trimmed to their d <= 8 entry points); the cubins are keyed exactly as
:func:`gpscale._ext.compiler.load_module` looks them up on the GPU (source, ``sm_<arch>``, options,
torch's CUDA version, NVRTC's version), so a mismatch costs only the compile it would have cost anyway.

Usage (NVRTC from ``pip download nvidia-cuda-nvrtc==13.0.*``, unzipped, if torch here is a CPU build)::

    GPSCALE_NVRTC=<dir>/nvidia/cu13/lib/libnvrtc.so.13 python benchmarks/prebuild_cubins.py
    run(command="bash benchmarks/gpu_session.sh kernels", carry=[".cubin-cache", ".whl"])

``--cuda`` must be the lent machine's ``torch.version.cuda`` (13.0 for its torch 2.11+cu130, KINDS.md)
and NVRTC the same major.minor as its ``nvidia-cuda-nvrtc`` (13.0): the script refuses another major.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpscale._ext import nvrtc
from gpscale._ext.compiler import cached_cubin, compile_to_cache
from gpscale._ext.launch import builds

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_tcb  # noqa: E402
from session_script import session_commands, session_tcbh_builds  # noqa: E402

#: The carried cache at the repository root (git-ignored; gpu_session.sh points GPSCALE_CACHE_DIR at it
#: when it is there).
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".cubin-cache"


def all_builds() -> list[tuple[str, tuple[str, ...]]]:
    """Every ``(source file, -D options)`` a session loads: the shipped builds, then its candidates."""
    out = sorted(builds())
    return out + [("kmm_tcb.cu", b) for b in session_tcbh_builds() if ("kmm_tcb.cu", b) not in out]


def tune_configs() -> list[tuple[int, ...]]:
    """The ``tune_tcb.py`` configurations the session script times (each its own trimmed build)."""
    cfgs = [c for script, *argv in session_commands() if script.endswith("tune_tcb.py")
            for c in tune_tcb.parse_args(argv).configs]
    return sorted(set(cfgs))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="compute capability digits of the GPU (H100 / H200: 90)")
    p.add_argument("--cuda", default="13.0", help="torch.version.cuda on the GPU machine (its cache key)")
    p.add_argument("--out", default=DEFAULT_DIR, help=f"cache directory to fill (default {DEFAULT_DIR})")
    p.add_argument("--jobs", type=int, default=2, help="builds compiled at once (NVRTC releases the GIL)")
    return p.parse_args(argv)


def build_one(job, a, out: Path) -> dict:
    """Compile one job into ``out``: ``("build", (file, options))`` or ``("tune", tune_tcb configuration)``."""
    t0 = time.perf_counter()
    kind, item = job
    if kind == "build":
        name, opts = item
        path = compile_to_cache(name, opts, a.arch, a.cuda, out)
    else:
        name, text, opts = tune_tcb.tune_source(*item)
        path = cached_cubin(name, text, a.arch, opts, a.cuda, out)
    rec = {"file": name, "options": list(opts), "cubin": path.name, "bytes": path.stat().st_size,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(rec), flush=True)
    return rec


def main(argv=None) -> int:
    a = parse_args(argv)
    have = nvrtc.version()
    if have is None:
        sys.exit("libnvrtc not found: pip download nvidia-cuda-nvrtc==13.0.* and unzip it, then set "
                 "GPSCALE_NVRTC to its nvidia/cu13/lib/libnvrtc.so.13")
    if str(have[0]) != a.cuda.split(".")[0]:
        sys.exit(f"NVRTC {have[0]}.{have[1]} cannot build for a CUDA {a.cuda} machine: use NVRTC {a.cuda}")
    out = Path(a.out)
    jobs = [("build", b) for b in all_builds()] + [("tune", c) for c in tune_configs()]
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        recs = list(pool.map(lambda job: build_one(job, a, out), jobs))
    manifest = {"arch": a.arch, "cuda": a.cuda, "nvrtc": list(have), "builds": recs}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(recs)} cubins in {out} ({sum(r['bytes'] for r in recs) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
