"""Benchmarks behind ``gpscale bench ...`` (each also runs standalone: ``python -m gpscale.bench.<name>``).

Wiring into the ``gpscale`` command line (``gpscale/cli.py``)::

    from .bench import add_parser as _add_bench   # with the other imports
    _add_bench(sub)                               # in build_parser(), next to _add_fit(sub)

Each benchmark sets ``func`` to its ``run(args) -> int``, which ``cli.main`` calls.

Benchmarks
----------
``precond``
    :mod:`gpscale.bench.precond`: preconditioners compared on the same GP systems.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` and its benchmarks on the ``gpscale`` subparsers object."""
    from . import precond

    p = subparsers.add_parser("bench", help="run a benchmark (see gpscale bench -h)",
                              description="Benchmarks of gpscale's components; results as JSON, Markdown and PNG.")
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    precond.add_parser(sub)
    return p


__all__ = ["add_parser"]
