"""Column splits of the tcb-family launches (gpscale/_ext/splits.py): the policy and the launcher's checks.

The split products themselves run under the CPU emulation in ``test_cuda_emulated.py`` (the kernels)
and ``test_cuda_emulated_launch.py`` (the launcher).
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from gpscale._ext import launch, splits
from gpscale._ext.splits import choose_splits, predicted_tiles, resident_blocks

H100 = 132  # SMs


def test_a_grid_of_nearly_whole_waves_is_not_split():
    # n = m = 1M at 3 blocks per SM: 3907 blocks are 9.87 waves of 396; splitting would save ~1%
    assert choose_splits(3907, 7813, 3 * H100) == 1
    assert choose_splits(391, 782, 3 * H100) == 1  # 100k at 3 per SM: one wave, 391 of 396 slots


@pytest.mark.parametrize("blocks,tiles,per_sm", [(3907, 7813, 4), (391, 782, 4), (489, 7813, 3), (179, 358, 3)])
def test_a_grid_with_a_ragged_last_wave_is_split_and_predicted_faster(blocks, tiles, per_sm):
    # 1M at 4 per SM (7.4 waves), 100k at 4 per SM (74% of one wave), 1M / 8 GPUs' rows (1.23 waves), 45k rows
    s = choose_splits(blocks, tiles, per_sm * H100)
    assert s > 1
    one, split = (predicted_tiles(blocks, tiles, per_sm * H100, k) for k in (1, s))
    assert split <= (1 - splits.MIN_GAIN) * one
    # and no other count within the cap is predicted faster
    assert all(predicted_tiles(blocks, tiles, per_sm * H100, k) >= split for k in range(1, splits.MAX_SPLITS + 1))


def test_splits_respect_the_tile_count_and_the_memory_cap():
    assert choose_splits(1, 8, 64) == 8  # one block, 8 tiles, idle slots: one tile per split, no more
    assert choose_splits(1, 1, 64) == 1
    # partials of 400 MB each: at most 2 fit 1 GiB
    assert choose_splits(1, 100, 64, partial_bytes=400 << 20) == 2
    assert choose_splits(1, 100, 64, partial_bytes=2 << 30) == 1


@pytest.mark.parametrize("args", [(0, 8, 8), (8, 0, 8), (8, 8, 0)])
def test_choose_splits_rejects_empty_grids(args):
    with pytest.raises(ValueError, match=">= 1"):
        choose_splits(*args)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "x", True, None])
def test_kernel_matmul_rejects_bad_splits_before_touching_the_gpu(bad):
    X = torch.zeros(4, 2)  # CPU tensors: the splits check comes first, with its own message
    with pytest.raises(ValueError, match="splits must be a positive int or 'auto'"):
        launch.kernel_matmul(X, X, torch.ones(4, 1), "rbf", variant="tcbh", splits=bad)


def test_only_the_tcb_family_takes_column_splits():
    X = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="variant 'simt' takes splits=1"):
        launch.kernel_matmul(X, X, torch.ones(4, 1), "rbf", variant="simt", splits=2)


def test_tile_rows_follow_the_build():
    assert launch.tile_rows("tcbh", 8) == launch.build_value(launch.DEFINES["tcbh"], "TCB_BN", 64)
    assert launch.tile_rows("tcbh", 9) == 64  # two k-steps keep 64-row tiles
    assert launch.tile_rows("tcb", 3) == 64
    assert launch.build_value(("-DTCB_BN=128", "-DTCB_BN=64"), "TCB_BN") == 64  # the last one wins


def test_resident_blocks_asks_the_driver_and_falls_back_to_none(monkeypatch):
    import torch.cuda._utils as cu

    seen = []

    def occupancy(out, func, threads, smem):
        seen.append((func, threads.value, smem.value))
        out.contents.value = 3
        return 0

    monkeypatch.setattr(cu, "_get_gpu_runtime_library",
                        lambda: SimpleNamespace(cuOccupancyMaxActiveBlocksPerMultiprocessor=occupancy))
    fn = SimpleNamespace(func=ctypes.c_void_p(1234))
    assert resident_blocks(fn, 256) == 3 and seen == [(fn.func, 256, 0)]
    assert resident_blocks(SimpleNamespace(), 256) is None  # cupy's launchers carry no driver handle
    monkeypatch.setattr(cu, "_get_gpu_runtime_library", lambda: SimpleNamespace(
        cuOccupancyMaxActiveBlocksPerMultiprocessor=lambda *a: 700))  # an error code
    assert resident_blocks(fn, 256) is None
