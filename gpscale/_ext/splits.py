"""Column splits of the ``tcb``-family kernels: over how many runs of ``Z`` tiles each output tile is summed.

Why.  A grid of ``B`` blocks on a GPU with ``P`` resident-block slots (SMs x blocks per SM) runs in
``ceil(B / P)`` waves, and in the last one only ``B mod P`` slots work (*wave quantisation*).  ``tcb``'s
blocks are few and long -- one per 256 rows of ``X`` and 16 output columns, each sweeping all of ``Z`` --
so the loss is large exactly where a product is short: at ``n = 100k`` (391 blocks) an H100 with 4
blocks per SM (528 slots) runs one wave at three quarters of its slots; at ``n = 125k`` per GPU (rows
split over 8 GPUs) and 3 blocks per SM, 489 blocks take two waves of which the second is a quarter
full.  With ``S`` column splits every block becomes ``S`` blocks that each sum over ``1 / S`` of ``Z``'s
tiles into their own partial output, and the launcher adds the ``S`` partials (``S n t`` floats more
memory, one reduction: O(S n t) against the product's O(n m (d + t))).  This is Flash-Decoding's split of
the keys (Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference", 2023) without the
softmax rescaling, which a kernel sum does not need; Stream-K (Osama et al., PPoPP 2023) is the GEMM
form of the same fix.

:func:`choose_splits` takes the ``S`` with the fewest predicted tile-times, ``ceil(B S / P)`` waves of
``ceil(T / S) + c`` tiles each (``T`` tiles of ``Z``, ``c`` a block's fixed cost in tiles).  The slots come
from the driver's occupancy calculator for the entry point that runs (:func:`resident_blocks`).
"""

from __future__ import annotations

import argparse
import ctypes
import math

from .._validation import check_splits

#: A block's fixed cost (its rows' fragments, the first tile's copy, writing its outputs), in tiles.
OVERHEAD_TILES = 2.0
#: Most splits the launcher takes (each is a partial output of ``n x t`` floats).
MAX_SPLITS = 16
#: Most memory the partial outputs of one product may take.
MAX_PARTIAL_BYTES = 1 << 30
#: A split is taken only if it saves at least this fraction of the predicted time.
MIN_GAIN = 0.02


def predicted_tiles(blocks: int, tiles: int, slots: int, splits: int, overhead: float = OVERHEAD_TILES) -> float:
    """Tile-times of a launch: ``ceil(blocks splits / slots)`` waves of ``ceil(tiles / splits) + overhead``."""
    return math.ceil(blocks * splits / slots) * (math.ceil(tiles / splits) + overhead)


def choose_splits(blocks: int, tiles: int, slots: int, *, partial_bytes: int = 0, max_splits: int = MAX_SPLITS,
                  max_partial_bytes: int = MAX_PARTIAL_BYTES, overhead: float = OVERHEAD_TILES) -> int:
    """Column splits ``S >= 1`` for a grid of ``blocks`` blocks that each sweep ``tiles`` tiles of ``Z``.

    Parameters
    ----------
    blocks : int
        Blocks of the unsplit grid (row blocks x column chunks).
    tiles : int
        ``Z`` tiles each block sums over.
    slots : int
        Blocks resident at once on the whole device (SMs x blocks per SM).
    partial_bytes : int
        Bytes of one partial output (all of a product's outputs): ``S`` of them must fit
        ``max_partial_bytes``.

    Returns
    -------
    int
        The ``S`` of fewest :func:`predicted_tiles`; 1 unless another saves at least :data:`MIN_GAIN`.
        Every split keeps at least one tile.  O(max_splits).
    """
    if blocks < 1 or tiles < 1 or slots < 1:
        raise ValueError(f"blocks, tiles and slots must be >= 1, got {blocks}, {tiles}, {slots}")
    cap = min(max_splits, tiles)
    if partial_bytes > 0:
        cap = min(cap, max(1, max_partial_bytes // partial_bytes))
    base = predicted_tiles(blocks, tiles, slots, 1, overhead)
    best, best_cost = 1, base
    for s in range(2, cap + 1):
        cost = predicted_tiles(blocks, tiles, slots, s, overhead)
        if cost < best_cost:
            best, best_cost = s, cost
    return best if best_cost <= (1.0 - MIN_GAIN) * base else 1


def splits_arg(text: str) -> int | str:
    """``argparse`` type of the benchmarks' ``--splits``: ``"auto"`` or a positive int."""
    try:
        splits = text if text == "auto" else int(text)
        check_splits(splits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits takes positive ints or 'auto', got {text!r}") from None
    return splits


def auto_splits(fn, threads: int, device, blocks: int, tiles: int, partial_bytes: int) -> int:
    """``splits="auto"`` of a launch of ``blocks`` blocks of ``threads`` threads of entry point ``fn``, each
    sweeping ``tiles`` tiles: :func:`choose_splits` with the device's slots (SMs x :func:`resident_blocks`,
    2 per SM -- the tcb builds' usual occupancy -- when the driver can't say)."""
    import torch  # noqa: PLC0415 - CUDA launches only

    slots = (resident_blocks(fn, threads) or 2) * torch.cuda.get_device_properties(device).multi_processor_count
    return choose_splits(blocks, tiles, slots, partial_bytes=partial_bytes)


def resident_blocks(fn, threads: int) -> int | None:
    """Blocks of ``threads`` threads of the loaded entry point ``fn`` one SM holds at once, or ``None``.

    Asks the CUDA driver (``cuOccupancyMaxActiveBlocksPerMultiprocessor``: registers, static shared
    memory and the block limit of the compiled function) through the handle of torch's module loader;
    ``None`` on any other route (cupy) or failure, so callers fall back.
    """
    func = getattr(fn, "func", None)
    if func is None:
        return None
    try:
        from torch.cuda._utils import _get_gpu_runtime_library  # noqa: PLC0415 - CUDA only

        lib = _get_gpu_runtime_library()
        out = ctypes.c_int(0)
        rc = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.pointer(out), func, ctypes.c_int(threads),
                                                              ctypes.c_size_t(0))
    except Exception:  # noqa: BLE001 - an estimate only: any failure means "unknown"
        return None
    return out.value if rc == 0 and out.value > 0 else None
