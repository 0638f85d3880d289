"""The host-side packing of the ``tcb`` kernel's inputs (gpscale/_ext/tcb_pack.py), on the CPU.

The kernel reads ``Zf`` / ``Vf`` as 16-byte words per lane and hands them to ``mma.sync`` as B
fragments.  These tests read the packed arrays the way the kernel does (``s.z[nt][ks][lane]`` of tile
``i`` is ``Zf[8 i + nt, ks, lane]``; ``s.v[kk][vn][lane]`` of block column ``y`` is
``Vf[y, i, kk, vn, lane]``), place each register's elements where the PTX ISA's fragment tables say
the tensor core takes them, and compare the matrices so rebuilt with the splits of
``tests/test_tcb_arithmetic.py`` bit for bit; then run the emulated product from the rebuilt
fragments against float64.  What stays for a GPU: that the kernel's index expressions are the ones
read here, which its GPU tests check against the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpscale._ext.launch import ksteps
from gpscale._ext.tcb_pack import COLUMN_CHUNK, PAD_ROWS, TILE_ROWS, pack_v, pack_z
from test_tcb_arithmetic import _mma, _relative, round_tf32, split_bf16, split_bf16_trunc, tf32_operand

LANES = [(lane >> 2, lane & 3) for lane in range(32)]  # lane = 4 g + c


def _data(m, d, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g) * 3, torch.randn(m, t, generator=g)


def rebuild_z(Zf: np.ndarray):
    """``(hi, lo)`` as (m_pad, 8 ks) matrices from the tf32 m16n8k8 B fragments: b0 = B[k = c][n = g],
    b1 = B[c + 4][g], with B[k][n] = z[8 nt + n][8 ks + k]."""
    groups, ks = Zf.shape[:2]
    hi = np.zeros((groups * 8, 8 * ks), np.float32)
    lo = np.zeros_like(hi)
    for r in range(groups):  # r = 8 i + nt: tile i, n-tile nt
        for s in range(ks):
            for lane, (g, c) in enumerate(LANES):
                w = Zf[r, s, lane]
                hi[8 * r + g, 8 * s + c], hi[8 * r + g, 8 * s + c + 4] = w[0], w[1]
                lo[8 * r + g, 8 * s + c], lo[8 * r + g, 8 * s + c + 4] = w[2], w[3]
    return hi, lo


def rebuild_z_f16(Zf: np.ndarray):
    """``(hi, lo)`` from tcbh's f16 m16n8k16 B fragments of ``B = [hi ; hi]`` (registers 0, 1) and
    ``[lo ; lo]`` (2, 3): b0 holds B[2c][g], B[2c + 1][g] (low half first) = features 2c, 2c + 1;
    b1 = B[2c + 8][g], ... = the same features again (k = 8..15 meet A's lo half)."""
    groups, ks = Zf.shape[:2]
    hi = np.zeros((groups * 8, 8 * ks), np.float32)
    lo = np.zeros_like(hi)
    halves = Zf.astype(np.int64) & 0xFFFFFFFF
    f16 = np.stack([halves & 0xFFFF, halves >> 16], -1).astype(np.uint16).view(np.float16).astype(np.float32)
    for r, s, lane in np.ndindex(groups, ks, 32):
        g, c = LANES[lane]
        np.testing.assert_array_equal(f16[r, s, lane, 0], f16[r, s, lane, 1])  # b0 and b1 of [hi ; hi]
        np.testing.assert_array_equal(f16[r, s, lane, 2], f16[r, s, lane, 3])
        hi[8 * r + g, 8 * s + 2 * c: 8 * s + 2 * c + 2] = f16[r, s, lane, 0]
        lo[8 * r + g, 8 * s + 2 * c: 8 * s + 2 * c + 2] = f16[r, s, lane, 2]
    return hi, lo


@pytest.mark.parametrize("m,d", [(1, 1), (70, 8), (130, 13)])
def test_compact_tcbh_z_words_are_lo_and_hi_of_the_full_ones(m, d):
    # TCB_DF16 = 2 reads {lo, hi} (B = [zl ; zh], hi alone for the m16n8k8): the same pairs, no copies
    Z, _ = _data(m, d, 1, seed=m + d)
    full, zn = pack_z(Z, ksteps(d), f16=1)
    compact, zn2 = pack_z(Z, ksteps(d), f16=2)
    assert compact.shape == (*full.shape[:-1], 2) and torch.equal(zn, zn2)
    assert torch.equal(compact[..., 0], full[..., 2]) and torch.equal(compact[..., 1], full[..., 0])
    with pytest.raises(ValueError, match="TCB_DF16"):
        pack_z(Z, ksteps(d), f16=3)


@pytest.mark.parametrize("m,d", [(1, 1), (70, 8), (130, 13), (64, 32)])
def test_tcbh_z_fragments_hold_the_f16_split_in_ptx_order(m, d):
    Z, _ = _data(m, d, 1, seed=m + d)
    Z[0, 0] = 3e-6  # an f16 subnormal: hi keeps what it can, lo the rest
    Zf, Zn = pack_z(Z, ksteps(d), f16=True)
    assert Zf.dtype == torch.int32 and Zf.shape == (-(-m // PAD_ROWS) * PAD_ROWS // 8, ksteps(d), 32, 4)
    hi, lo = rebuild_z_f16(Zf.numpy())
    z = np.zeros_like(hi)
    z[:m, :d] = Z.numpy()
    np.testing.assert_array_equal(hi, z.astype(np.float16).astype(np.float32))  # hi = f16(z), nearest
    np.testing.assert_array_equal(lo, (z - hi).astype(np.float16).astype(np.float32))
    assert np.all(np.abs(hi.astype(np.float64) + lo - z) <= 2.0**-22 * np.abs(z) + 2.0**-25)
    # |z|^2 as the kernel's accumulator quads: per 8-row group and c, rows 2c, 2c + 1 twice
    mp = hi.shape[0]
    quads = Zn.view(mp // 8, 4, 4)
    assert torch.equal(quads[..., :2], quads[..., 2:])
    np.testing.assert_allclose(quads[..., :2].reshape(-1)[:m].numpy(), (Z.double() ** 2).sum(1).numpy(), rtol=1e-6)


def _bf16_pair(word: int) -> tuple[np.float32, np.float32]:
    """A bf16x2 register -> its (low-half, high-half) elements as float32."""
    u = np.uint32(word & 0xFFFFFFFF)
    return (np.array([u << np.uint32(16)], np.uint32).view(np.float32)[0],
            np.array([u & np.uint32(0xFFFF0000)], np.uint32).view(np.float32)[0])


def rebuild_v(Vf: np.ndarray):
    """``(hi, lo)`` as (m_pad, t_pad) matrices from the bf16 m16n8k16 B fragments: b0 holds
    B[2c][g], B[2c + 1][g] (low half first), b1 holds B[2c + 8][g], B[2c + 9][g]; B[k][n] is
    V[64 i + 16 kk + k][16 y + 8 vn + n]."""
    ny, nt = Vf.shape[:2]
    hi = np.zeros((nt * TILE_ROWS, ny * COLUMN_CHUNK), np.float32)
    lo = np.zeros_like(hi)
    for y, i, kk, vn in np.ndindex(ny, nt, 4, 2):
        for lane, (g, c) in enumerate(LANES):
            w = Vf[y, i, kk, vn, lane]
            col, row = 16 * y + 8 * vn + g, 64 * i + 16 * kk + 2 * c
            for out, (b0, b1) in ((hi, (w[0], w[1])), (lo, (w[2], w[3]))):
                out[row, col], out[row + 1, col] = _bf16_pair(int(b0))
                out[row + 8, col], out[row + 9, col] = _bf16_pair(int(b1))
    return hi, lo


@pytest.mark.parametrize("m,d", [(1, 1), (70, 8), (130, 13), (64, 32)])
def test_z_fragments_hold_the_3xtf32_split_in_ptx_order(m, d):
    Z, _ = _data(m, d, 1)
    ks = ksteps(d)
    Zf, Zn = pack_z(Z, ks)
    mp = -(-m // PAD_ROWS) * PAD_ROWS
    assert Zf.shape == (mp // 8, ks, 32, 4) and Zf.dtype == torch.float32 and Zn.shape == (mp,)
    hi, lo = rebuild_z(Zf.numpy())
    z = np.zeros((mp, 8 * ks), np.float32)
    z[:m, :d] = Z.numpy()
    want_hi = round_tf32(z)
    assert np.array_equal(hi.view(np.uint32), want_hi.view(np.uint32))  # bit for bit, padding zero
    assert np.array_equal(lo.view(np.uint32), (z - want_hi).astype(np.float32).view(np.uint32))
    np.testing.assert_allclose(Zn.numpy(), (z.astype(np.float64) ** 2).sum(1), rtol=1e-7)


@pytest.mark.parametrize("m,t", [(1, 1), (70, 16), (130, 17), (64, 40)])
def test_v_fragments_hold_the_bf16_split_in_ptx_order(m, t):
    _, V = _data(m, 1, t)
    Vf = pack_v(V)
    mp, tp = -(-m // PAD_ROWS) * PAD_ROWS, -(-t // COLUMN_CHUNK) * COLUMN_CHUNK
    assert Vf.shape == (tp // COLUMN_CHUNK, mp // TILE_ROWS, 4, 2, 32, 4) and Vf.dtype == torch.int32
    hi, lo = rebuild_v(Vf.numpy())
    v = np.zeros((mp, tp), np.float32)
    v[:m, :t] = V.numpy()
    want_hi, want_lo = split_bf16(v)  # hi rounded, lo truncated by the packing
    assert np.array_equal(hi.view(np.uint32), want_hi.view(np.uint32))
    assert np.array_equal(lo.view(np.uint32), want_lo.view(np.uint32))


def test_the_split_survives_values_whose_rounding_carries_into_the_exponent():
    # 0x3F7FFFFF (just below 1) rounds up to 1.0 in both formats; negative and tiny values keep sign
    x = torch.tensor([[np.uint32(0x3F7FFFFF).view(np.float32), -1.9999999, 1e-30, -0.0, 3e38, 0.5]]).float()
    Zf, _ = pack_z(x[:, :6].reshape(1, 6), 1)
    hi, lo = rebuild_z(Zf.numpy())
    assert np.array_equal(hi[0, :6].view(np.uint32), round_tf32(x.numpy()[0]).view(np.uint32))
    hv, lv = rebuild_v(pack_v(x.T.contiguous()).numpy())
    want_hi, want_lo = split_bf16(x.numpy()[0])
    assert np.array_equal(hv[:6, 0].view(np.uint32), want_hi.view(np.uint32))
    assert np.array_equal(lv[:6, 0].view(np.uint32), want_lo.view(np.uint32))


def test_the_product_from_the_packed_fragments_meets_the_1e4_target():
    """tcb's arithmetic (RBF, folded norms) on the rebuilt fragments, including every padded row."""
    n, m, d, t = 40, 150, 5, 20
    g = torch.Generator().manual_seed(3)
    X, Z, V = torch.randn(n, d, generator=g) / 0.7, torch.randn(m, d, generator=g) / 0.7, torch.randn(m, t, generator=g)
    Zf, Zn = pack_z(Z, 1)
    zh, zl = rebuild_z(Zf.numpy())
    vh, vl = rebuild_v(pack_v(V).numpy())
    x = np.zeros((n, 8), np.float32)
    x[:, :d] = X.numpy()
    a = np.float32(-2.0) * x
    ah = round_tf32(a)
    al = (a - ah).astype(np.float32)
    s = np.broadcast_to(Zn.numpy()[None, :], (n, zh.shape[0])).astype(np.float32)
    for lhs, rhs in ((al, zh), (ah, zl), (ah, zh)):
        s = _mma(s, tf32_operand(lhs), tf32_operand(rhs))
    q = (s + (x.astype(np.float64) ** 2).sum(1)[:, None]).astype(np.float32)
    P = np.exp2(q * np.float32(-0.5 * np.log2(np.e))).astype(np.float32)
    ph, pl = split_bf16_trunc(P)
    out = np.zeros((n, vh.shape[1]), np.float32)
    for j0 in range(0, P.shape[1], TILE_ROWS):  # a fresh fragment per tile, added to the total
        frag = np.zeros_like(out)
        for k0 in range(j0, j0 + TILE_ROWS, 16):
            sl = slice(k0, k0 + 16)
            for lhs, rhs in ((pl, vh), (ph, vl), (ph, vh)):
                frag = _mma(frag, lhs[:, sl], rhs[sl].T)
        out = (out + frag).astype(np.float32)
    X64, Z64 = X.double().numpy(), Z.double().numpy()
    P64 = np.exp(-0.5 * ((X64[:, None] - Z64[None]) ** 2).sum(-1))
    assert _relative(out[:, :t], P64, V.numpy()).max() <= 6e-5


def test_the_tile_sizes_are_the_kernels():
    from gpscale._ext.sources import read_source
    from test_csrc_compile import _defines

    defs = _defines(read_source("kmm_tcb.cu"))
    assert (TILE_ROWS, COLUMN_CHUNK) == (defs["TCB_BN"], defs["TCB_TCH"])
    # the kernel's V column-chunk stride assumes the host's padding; a 128-row tile must be whole pad units
    assert PAD_ROWS == defs["TCB_PAD"] and PAD_ROWS % 128 == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packing_on_the_gpu_is_bit_identical_to_the_cpu():
    Z, V = _data(200, 11, 21, seed=5)
    for got, want in zip((*pack_z(Z.cuda(), 2), *pack_z(Z.cuda(), 2, f16=1), *pack_z(Z.cuda(), 2, f16=2),
                          pack_v(V.cuda())),
                         (*pack_z(Z, 2), *pack_z(Z, 2, f16=1), *pack_z(Z, 2, f16=2), pack_v(V))):
        assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))
