"""Where the CUDA sources live, and their text with local includes inlined.

The sources stay in the repository's top-level ``csrc/`` (one kernel family per ``.cu`` file, shared
device helpers in ``.cuh``).  They are found, in this order:

1. ``$GPSCALE_CSRC`` (a directory), for development against another checkout;
2. ``<repo>/csrc`` next to the ``gpscale`` package: a source checkout or an editable install;
3. ``<sys.prefix>/share/gpscale/csrc``: a wheel or regular install, where ``pyproject.toml``'s
   ``[tool.setuptools.data-files]`` puts the same files.

Local ``#include "x.cuh"`` lines are inlined, so NVRTC needs no include path and the compile cache
key (a hash of the text) changes whenever any included file changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.MULTILINE)


def csrc_dir() -> Path:
    """The directory holding ``kmm_*.cu``; raises ``FileNotFoundError`` naming the places searched."""
    cands = []
    env = os.environ.get("GPSCALE_CSRC")
    if env:
        cands.append(Path(env))
    cands.append(Path(__file__).resolve().parents[2] / "csrc")
    cands.append(Path(sys.prefix) / "share" / "gpscale" / "csrc")
    for c in cands:
        if (c / "profiles.cuh").is_file():
            return c
    raise FileNotFoundError("gpscale's CUDA sources (csrc/*.cu) were not found in any of: "
                            + ", ".join(map(str, cands))
                            + "; reinstall gpscale, or set GPSCALE_CSRC to a checkout's csrc directory")


def cu_files() -> list[Path]:
    """Every ``.cu`` file of the sources (the CI compile test iterates over these)."""
    return sorted(csrc_dir().glob("*.cu"))


def read_source(name: str) -> str:
    """Text of ``csrc/<name>`` with local includes inlined (each header once)."""
    root = csrc_dir()
    seen: set[str] = set()

    def expand(fname: str) -> str:
        text = (root / fname).read_text()

        def sub(mt):
            inc = mt.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            # "#pragma once" is redundant once inlined (each header once) and warns in a main file.
            body = _PRAGMA_ONCE.sub("", expand(inc))
            return f"// ---- inlined {inc}\n" + body + f"\n// ---- end {inc}\n"

        return _INCLUDE.sub(sub, text)

    return expand(name)


def source_hash(text: str, *extra: str) -> str:
    """Stable cache key of a source text and its compile settings."""
    h = hashlib.sha256(text.encode())
    for e in extra:
        h.update(b"\0" + e.encode())
    return h.hexdigest()[:20]
