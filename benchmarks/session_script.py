"""``benchmarks/gpu_session.sh`` as data, for what checks and prepares it without a GPU.

A lent GPU runs that script with 30 minutes of device time and no second chance, so its commands are
parsed (tests/test_bench_smoke.py), the candidate kernel builds it tests and times are compiled
(tests/test_csrc_compile.py) in CI first, and their cubins are built before the lease
(benchmarks/prebuild_cubins.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from gpscale._ext import launch

SCRIPT = Path(__file__).resolve().parent / "gpu_session.sh"


def session_text() -> str:
    """gpu_session.sh with continuation lines joined and its ``NAME="..."`` variables substituted."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    for name, value in re.findall(r'^(\w+)="([^"$]*)"$', text, re.M):
        text = text.replace(f'"${name}"', f'"{value}"')
    return text


def session_tcbh_builds() -> list[tuple[str, ...]]:
    """The candidate ``tcbh`` builds (kmm_tcb.cu ``-D`` options) the script tests and times.

    Always ``--tcbh-build="..."``: argparse (pytest's too) takes a value starting with ``-`` as an option
    unless it holds a space, so ``--tcbh-build "-DTCB_DF16=2"`` alone would not parse.
    """
    return sorted({launch.parse_build(b) for b in re.findall(r'--tcbh-build="([^"]*)"', session_text())})


def session_commands() -> list[list[str]]:
    """The python benchmark commands of the script, ``[script, *argv]`` (``$OUT`` read as ``/tmp/out``)."""
    cmds = []
    for line in session_text().splitlines():
        m = re.match(r"\s*step \S+ \d+ (?:ncu .*?)?python3 (benchmarks/\S+\.py) (.*)$", line)  # ncu runs one too
        if m and "pytest" not in line:
            cmds.append([m.group(1), *shlex.split(m.group(2).replace('"$OUT', '"/tmp/out'))])
    return cmds
