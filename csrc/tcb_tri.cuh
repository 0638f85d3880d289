// The symmetric product K(X, X) V from one triangle of K: kmm_tcb.cu built with TCB_TRI = 1.
//
// Why: CG multiplies by K(X, X) every iteration, and every pair's exp is paid twice by a kernel that
// sweeps all of K: once for row i and once for row j.  FlashAttention's backward pass (Dao 2023) forms
// dV = P^T dO from the same P tile that feeds dQ; here the tile of block I (its 16 TCB_MT TCB_WARPS rows)
// and column tile J feeds both O_I += P V_J (kmm_tcb's product) and O_J += P^T V_I, so each pair's
// distance, exp and split into bf16 hi + lo is computed once: half the MUFU and distance MMAs per
// product, for three more bf16 MMAs per 16 x 16 block of P (the transposed P V) and a reduction.
//
// Block I sweeps the column tiles from its own diagonal square on: inside the square only O_I (every
// pair of the square is one of its own rows'), past it both.  Rows of blocks I' < I reach O_I through
// the transposed products of those blocks.  Blocks with lower indices have more tiles and start first
// (the longest-first order of the hardware's block dispatch), which keeps the last wave short.
//
// Layouts (PTX ISA, lane = 4 g + c): P's C fragments of an n-tile pair are the A fragment of P V
// (rows i, k = j: a0 = P[i 0-7][j 0-7], a1 = P[i 8-15][j 0-7], a2 = P[i 0-7][j 8-15], a3 = P[i 8-15][j 8-15]).
// P^T's A fragment (rows j, k = i) is the same four 8 x 8 blocks, each transposed and the off-diagonal
// two swapped: movmatrix.m8n8.trans.b16 transposes an 8 x 8 block of 16-bit values held one pair per lane
// (sm_75+), one instruction per register, applied to P's bf16 hi and lo words as tcb_pv split them.  The
// B operand is this warp's own 16 rows of V, the same bf16 fragment words as a Z tile's V (tcb_pack.pack_v,
// V's rows being Z's), copied from Vf into dynamic shared memory once per block.
//
// The sum over i of P^T V_I spans the block's warps (each holds 16 TCB_MT rows).  Shared-memory float
// atomics are CAS loops on sm_90 (ATOMS.CAST.SPIN), so each warp stores its partial for the tile in its
// own slots and, after the tile's closing barrier, every thread sums one slot over the warps (LDS.128s and
// FADDs) and adds it into O with global reductions (RED.ADD.F32: one per TCB_WARPS 16 TCB_MT rows of
// pairs, against the L2's atomic rate).  O must start at zero; the float atomics make the result's last
// bits depend on the order blocks finish in (like FlashAttention-2's dQ).
#pragma once

// dynamic shared memory of a TCB_TRI launch: this block's V rows, then every warp's P^T V partial
#define TCB_TRI_VWORDS (TCB_ROWS / 16 * 2 * 32)                          // uint4 words of V_I
#define TCB_TRI_PWORDS(BN) (TCB_WARPS * ((BN) / 16) * 2 * 32)           // float4 partials of a tile
#define TCB_TRI_SMEM(BN) ((TCB_TRI_VWORDS + TCB_TRI_PWORDS(BN)) * 16)  // bytes (launch.py: triangle_smem)

// The 8 x 8 block of 16-bit values a warp holds one pair per lane (row g, columns 2c, 2c + 1), transposed.
__device__ __forceinline__ unsigned movmatrix_trans(unsigned x) {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    return gps_emu::movmatrix_trans(x);
#else
    unsigned y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
#endif
}

__device__ __forceinline__ void tcb_red_add(float* p, float v) {
#ifdef GPS_HOST_EMULATION
    *p += v;  // fibers of one OS thread, blocks one after another: no race
#else
    atomicAdd(p, v);  // result unused: compiled to RED.E.ADD.F32
#endif
}

#ifdef GPS_HOST_EMULATION
#define TCB_DYNAMIC_SMEM(name) uint4* const name = gps_emu::dynamic_smem<uint4>()
#else
#define TCB_DYNAMIC_SMEM(name) \
    extern __shared__ uint4 tcb_dynamic_smem_[]; \
    uint4* const name = tcb_dynamic_smem_
#endif

// Copy this block's rows of V (column chunk blockIdx.y) as bf16 fragment words into vrow: one word per
// thread and 16-row step; the packed V ends at the padded m, and steps past it are zeros.
__device__ __forceinline__ void tcb_tri_load_v(uint4* vrow, const uint4* __restrict__ Vf, int vtiles, int bn) {
    const int steps = vtiles * (bn / 16) - (int)blockIdx.x * (TCB_ROWS / 16);  // V's 16-row steps from row I
    const uint4* src =
        Vf + (long long)blockIdx.y * vtiles * (bn / 16) * 64 + (long long)blockIdx.x * (TCB_ROWS / 16) * 64;
    for (int w = threadIdx.x; w < TCB_TRI_VWORDS; w += 32 * TCB_WARPS)
        vrow[w] = (w >> 6) < steps ? src[w] : uint4{0u, 0u, 0u, 0u};
}

// acct[vn] += P^T V for one m-tile's 16 rows (k) and one 16-deep k-step of the tile (m: its 16 columns j),
// from P's bf16 hi / lo A fragments (ph, pl as tcb_pv formed them) and vr: those rows' V words [vn][lane].
__device__ __forceinline__ void tcb_pvt(float (&acct)[2][4], const unsigned (&ph)[4], const unsigned (&pl)[4],
                                        const uint4* vr) {
    const int lane = threadIdx.x & 31;
    const unsigned th[4] = {movmatrix_trans(ph[0]), movmatrix_trans(ph[2]), movmatrix_trans(ph[1]),
                            movmatrix_trans(ph[3])};
    const unsigned tl[4] = {movmatrix_trans(pl[0]), movmatrix_trans(pl[2]), movmatrix_trans(pl[1]),
                            movmatrix_trans(pl[3])};
#pragma unroll
    for (int vn = 0; vn < 2; ++vn) {
        const uint4 b = vr[vn * 32 + lane];
        mma_bf16(acct[vn], tl, b.x, b.y);  // small terms first, as in tcb_pv
        mma_bf16(acct[vn], th, b.z, b.w);
        mma_bf16(acct[vn], th, b.x, b.y);
    }
}

// After a tile's closing barrier: sum the warps' P^T V partials of column tile jt (first row jt) and add
// them into O rows jt.., columns c0..  Slot w = (kk 2 + vn) 32 + lane holds rows kk 16 + g, + 8 and
// columns vn 8 + 2c, + 1 (C layout).
template <int BN>
__device__ __forceinline__ void tcb_tri_flush(const float4* part, float* __restrict__ O, int jt, int c0, int n, int t) {
    constexpr int SLOTS = BN / 16 * 64;
    for (int w = threadIdx.x; w < SLOTS; w += 32 * TCB_WARPS) {
        float4 s = part[w];
#pragma unroll
        for (int k = 1; k < TCB_WARPS; ++k) {
            const float4 v = part[k * SLOTS + w];
            s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
        }
        const int l = w & 31, vn = (w >> 5) & 1, kk = w >> 6;
        const int j = jt + kk * 16 + (l >> 2), col = c0 + vn * 8 + 2 * (l & 3);
        const float vals[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int jj = j + (u >> 1) * 8, cc = col + (u & 1);
            if (jj < n && cc < t) tcb_red_add(O + (long long)jj * t + cc, vals[u]);
        }
    }
}
