"""Split and lay out ``Z`` and ``V`` in the fragment order of the ``tcb`` kernel (csrc/kmm_tcb.cu).

Every block of ``tcb`` streams all of ``Z`` and ``V`` through shared memory.  Splitting each element
there (3xTF32 for ``Z``, bf16 hi/lo for ``V``) and computing its address cost ~2.6 of the kernel's
11.7 warp instructions per 32 kernel pairs (``benchmarks/sass_model.py``), repeated by every one of
the ``n / 256`` blocks.  Done once here, per product, in O(m (d + t)) torch operations on the device,
the kernel's tile load becomes a few 16-byte ``cp.async`` copies per thread, and each tensor-core
B fragment one 16-byte shared-memory read.

Layouts (PTX ISA, "Matrix fragments for mma.m16n8k8 / m16n8k16", lane ``l = 4 g + c``):

* ``Zf``: ``(m_pad / 8, ks, 32, 4)`` float32.  For the 8-row group ``r`` (rows ``8 r + g``), k-step
  ``s`` and lane ``l``: ``hi(z[8s + c]), hi(z[8s + c + 4]), lo(z[8s + c]), lo(z[8s + c + 4])`` of row
  ``8 r + g`` -- the tf32 B-fragment registers ``b0, b1`` of the 3xTF32 split ``z = hi + lo``.
* ``Zf`` of ``tcbh`` (``pack_z(..., f16=True)``): ``(m_pad / 8, ks, 32, 4)`` int32, f16 pairs.  For
  the same ``r, s, l``: ``H, H, L, L`` with ``H = (hi(z[8s + 2c]), hi(z[8s + 2c + 1]))`` (lower k in
  the low half) and ``L`` the same of ``lo`` -- the m16n8k16 B-fragment registers ``b0, b1`` of
  ``B = [hi ; hi]`` and of ``B = [lo ; lo]`` (16 deep: the features twice, against ``A = [xh | xl]``),
  with ``hi = f16(z)`` and ``lo = f16(z - hi)``, both rounded to nearest even.
* ``Zf`` of a ``TCB_DF16 = 2`` build (``pack_z(..., f16=2)``): ``(m_pad / 8, ks, 32, 2)`` int32, ``L, H``: the
  m16n8k16 B pair of ``B = [lo ; hi]`` (against ``A = [xh | xl]``: the cross terms) whose ``H`` is also the
  m16n8k8 B register (against ``xh``): half the bytes per tile to copy and read, and no register copies.
* ``Zn``: ``(m_pad,)`` float32, ``|z|^2`` (accumulated in float64); for ``tcbh`` ``(2 m_pad,)``: per
  8-row group ``r`` and ``c``, ``zn[8r + 2c], zn[8r + 2c + 1]`` twice (one 16-byte read gives the
  distance MMA's initial accumulator).
* ``Vf``: ``(ceil(t / 16), m_pad / 64, 4, 2, 32, 4)`` int32 (bit patterns of bf16 pairs).  For column
  chunk ``y``, 64-row tile ``i``, 16-deep k-step ``kk``, 8-column n-tile ``vn`` and lane ``l``:
  ``hi b0, hi b1, lo b0, lo b1`` with ``b0`` = rows ``16 kk + 2c, 16 kk + 2c + 1`` and ``b1`` = rows
  ``16 kk + 2c + 8, 16 kk + 2c + 9`` of column ``16 y + 8 vn + g`` (lower row in the low half).

Padding rows and columns are zero: a padded ``Z`` row meets ``V`` rows of zero, so it adds nothing.
The splits are the kernel's former device arithmetic, bit for bit: ``hi`` = the top 19 (tf32) or
16 (bf16) bits rounded to nearest with ties away (integer add and mask), ``lo = x - hi`` in float32;
``V``'s ``lo`` is then truncated to bf16 by keeping its upper half (what the packing did).
"""

from __future__ import annotations

import torch

#: Z rows per fragment-layout tile (kmm_tcb.cu's default TCB_BN); output columns per block (TCB_TCH).
TILE_ROWS = 64
#: Z and V rows are zero-padded to a multiple of this: whole tiles for a TCB_BN of 64 or 128 (a kernel
#: tile of 128 rows is two consecutive layout tiles).
PAD_ROWS = 128
COLUMN_CHUNK = 16


def _round_bits(x: torch.Tensor, low_bits: int) -> torch.Tensor:
    """float32 -> the same value with its low ``low_bits`` bits rounded off (ties away), as float32."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the uint32 bit pattern
    u = (u + (1 << (low_bits - 1))) & (0xFFFFFFFF ^ ((1 << low_bits) - 1))
    return _as_int32(u).view(torch.float32)


def _as_int32(u: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 with the same bit pattern."""
    return torch.where(u >= 1 << 31, u - (1 << 32), u).to(torch.int32)


def _upper_half(x: torch.Tensor) -> torch.Tensor:
    """The upper 16 bits of float32 values (a bf16 truncation), as int64 in [0, 2^16)."""
    return (x.contiguous().view(torch.int32).to(torch.int64) >> 16) & 0xFFFF


def pack_z(Z: torch.Tensor, ksteps: int, f16: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Zf, Zn)`` of a float32 ``(m, d)`` tensor with ``d <= 8 ksteps`` (module docstring).

    ``f16`` is the kernel build's ``TCB_DF16``: 0 (``tcb``, 3xTF32 splits), 1 (``tcbh``, f16 splits) or 2
    (f16 splits, compact words); for 1 and 2 the caller keeps ``|z|`` below f16's largest value
    (:data:`gpscale._ext.launch.F16_MAX`).
    """
    if f16 not in (0, 1, 2):
        raise ValueError(f"f16 is a kmm_tcb.cu build's TCB_DF16: 0, 1 or 2, got {f16!r}")
    m, d = Z.shape
    mp = -(-m // PAD_ROWS) * PAD_ROWS
    Zp = torch.zeros(mp, 8 * ksteps, dtype=torch.float32, device=Z.device)
    Zp[:m, :d] = Z
    Zn = Zp.double().square().sum(1).float()
    if f16:  # |z|^2 as {zn[2c], zn[2c + 1]} twice per 8-row group and c: the kernel's accumulator quad
        pairs = Zn.view(mp // 8, 4, 2)
        return _pack_z_f16(Zp, ksteps, compact=f16 == 2), torch.cat([pairs, pairs], dim=-1).reshape(-1).contiguous()
    hi = _round_bits(Zp, 13)
    lo = Zp - hi

    def frag(a):  # (mp, 8 ks) -> (mp/8, ks, g, c, half): element [r, s, g, c, h] = a[8r + g, 8s + 4h + c]
        return a.view(mp // 8, 8, ksteps, 2, 4).permute(0, 2, 1, 4, 3)

    Zf = torch.stack([frag(hi), frag(lo)], dim=-2)  # (..., c, hi/lo, half)
    return Zf.reshape(mp // 8, ksteps, 32, 4).contiguous(), Zn


def _pack_z_f16(Zp: torch.Tensor, ksteps: int, compact: bool = False) -> torch.Tensor:
    """``Zf`` of ``tcbh``: f16 hi / lo pairs in m16n8k16 B-fragment order, ``H, H, L, L`` or ``L, H`` (module
    docstring)."""
    mp = Zp.shape[0]
    hi = Zp.half()
    lo = (Zp - hi.float()).half()

    def frag(a):  # (mp, 8 ks) f16 -> pairs [r, s, g, c] = (a[8r + g, 8s + 2c], a[8r + g, 8s + 2c + 1])
        bits = a.view(torch.int16).to(torch.int64) & 0xFFFF
        pairs = bits[:, 0::2] | (bits[:, 1::2] << 16)  # (mp, 4 ks): feature pair 2c, 2c + 1 of each k-step
        return pairs.view(mp // 8, 8, ksteps, 4).permute(0, 2, 1, 3)

    H, L = frag(hi), frag(lo)
    Zf = torch.stack([L, H] if compact else [H, H, L, L], dim=-1)  # (r, s, g, c, register)
    return _as_int32(Zf.reshape(mp // 8, ksteps, 32, Zf.shape[-1])).contiguous()


def pack_v(V: torch.Tensor) -> torch.Tensor:
    """``Vf`` of a float32 ``(m, t)`` tensor (module docstring)."""
    m, t = V.shape
    mp = -(-m // PAD_ROWS) * PAD_ROWS
    tp = -(-t // COLUMN_CHUNK) * COLUMN_CHUNK
    Vp = torch.zeros(mp, tp, dtype=torch.float32, device=V.device)
    Vp[:m, :t] = V
    hi = _round_bits(Vp, 16)
    lo = Vp - hi

    def frag(a):  # bf16 pairs along rows, then [y, tile, kk, vn, g, c, half]
        h = _upper_half(a)
        pairs = h[0::2] | (h[1::2] << 16)  # (mp/2, tp): rows 2q (low half), 2q + 1
        # pair row q = 32 i + 8 kk + 4 half + c; column = 16 y + 8 vn + g
        return pairs.view(mp // TILE_ROWS, 4, 2, 4, tp // COLUMN_CHUNK, 2, 8).permute(4, 0, 1, 5, 6, 3, 2)

    Vf = torch.stack([frag(hi), frag(lo)], dim=-2)  # (..., c, hi/lo, half)
    return _as_int32(Vf.reshape(tp // COLUMN_CHUNK, mp // TILE_ROWS, 4, 2, 32, 4)).contiguous()
