// Fused kernel product O = F(X, Z) V on tensor cores with a bf16x3 P V product ("tcb").
//
// Status: written after the first H100 measurement of kmm_tc.cu (2026-11-24: "tc3" 0.025 s per
// product at n = m = 100k, d = 8, t = 16 -- 10x the exp bound and slower than KeOps) without a GPU;
// on the second lent H100 all its GPU tests passed and it ran RBF at 1M in 0.57-0.59 s (3.4x KeOps,
// 2.45x the exp bound), Matern within 1.8x of theirs: the float32 default since (docs/backends.md,
// where the ncu profile and the TCB_MT / TCB_MINB / TCB_EMU sweep are).  Its source also runs in
// CI, on the CPU: tests/test_cuda_emulated.py (every thread a fiber, mma.sync from the PTX ISA's
// fragment tables, cp.async landing late or early).  Why kmm_tc.cu is slow, counted per pair: ~5 cvt.rna.tf32
// conversions (each warp re-splits the shared Z and V tiles; 16/clk/SM like the exp itself) and
// ~2.5 shared-memory wavefronts with one 16-row m-tile per warp.  This file removes both: splits
// are integer round-and-mask (no cvt), Z and V are split once per product (host side), every warp
// owns two m-tiles that share each B fragment, and P V runs as bf16 m16n8k16 (half the MMAs).
//
// The FlashAttention scheme itself is the one of kmm_tc.cu:
//
// Dao et al., "FlashAttention" (NeurIPS 2022) / FlashAttention-2 (2023): a block owns a tile of
// query rows, streams key/value tiles through shared memory, computes the score tile on tensor
// cores, applies the nonlinearity in registers and multiplies by V on tensor cores without ever
// writing the score tile.  Here "scores" are squared distances and the nonlinearity is f(q):
//
//   q_ij = |x_i|^2 + |z_j|^2 - 2 x_i.z_j      (x_i.z_j on tensor cores; the norms initialise the
//                                              accumulator, so the MMA returns q itself)
//   O_i += sum_j f(q_ij) v_j                   (P V on tensor cores)
//
// Accuracy (BBMM's CG needs relative errors <= 1e-4):
// * Inputs are centred and divided by the lengthscales on the host, so |x|^2 stays O(d).  The
//   expansion still leaves an absolute error ~ eps (|x|^2 + |z|^2) in q;
//   gpscale/operators/cuda_backend.py predicts it (expansion_error) and falls back to "simt"
//   where it would exceed the target (short lengthscales, Matern-1/2 near coincident points).
// * The dot product uses the 3xTF32 split a = a_hi + a_lo: a.b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi,
//   about fp32 accuracy; plain tf32 (2^-11) would leave errors growing with |x|^2.  The split is
//   integer arithmetic (round the top 19 bits, subtract): no cvt instruction, and a_lo keeps all
//   its bits -- the tensor core ignores the 13 low ones, an error of 2^-22 |a|.
// * P V in bf16 (m16n8k16, twice the reduction depth of a tf32 MMA per instruction): P and V are
//   split into bf16 hi + lo (P V ~ Ph Vh + Ph Vl + Pl Vh).  V's hi is rounded to nearest, P's is
//   truncated (one instruction fewer per pair; see split_bf16x2_trunc), both lo are truncated by the
//   packing; the CPU emulation in tests/test_tcb_arithmetic.py measures 5.1e-5 of sum |P||V| against
//   the 1e-4 target.  P <= 1 and bf16 has float32's exponent range, so nothing
//   overflows and V needs no rescaling.  Accumulation is fp32, two-level (a fresh fragment per Z
//   tile, added to a register total).
// * The symmetric case (Z is X) sets q_ii = 0 exactly, as the expansion leaves O(eps |x|^2).
//
// Layouts (PTX ISA, "Matrix fragments for mma.m16n8k8 / m16n8k16"; lane = 4 g + c).  The distance
// MMA (m16n8k8) returns rows g, g+8 x columns 2c, 2c+1 of an 8-wide Z tile; two such n-tiles are
// exactly the bf16 A fragment of m16n8k16 (k pairs 2c, 2c+1 and 2c+8, 2c+9), so P goes from one
// MMA to the next without shuffles.  Z and V arrive split and in *fragment order*
// (gpscale/_ext/tcb_pack.py): lane l's four B-fragment registers of an MMA step are one 16-byte
// word, Zf[8-row group][k-step][l] = {hi(z[g][c]), hi(z[g][c+4]), lo(z[g][c]), lo(z[g][c+4])} (k
// offsets in the step) and Vf[column chunk][tile][k-step kk][n-tile vn][l] = {hi b0, hi b1, lo b0,
// lo b1} (b0 = V rows 2c, 2c+1, b1 = rows 2c+8, 2c+9 of the 16-deep step, column g, as bf16 pairs).
//
// Cost per warp and 64-row Z tile (32 X rows, 2 m-tiles): 2 x 8 x 3 x ceil(d/8) tf32 MMAs,
// 2 x 4 x 2 x 3 bf16 MMAs, 2048 exps; shared-memory fragments are shared by both m-tiles.
//
// Second pass, still without a GPU, from the SASS (benchmarks/sass_model.py, d = 8, t = 16, sm_90):
// every csrc variant is bound by instruction issue, not by the exp unit, so the pass removed
// instructions per pair: exp and sqrt as ex2 / sqrt.approx.ftz (profiles.cuh, FAST = 2), RBF without
// the q >= 0 clamp, P's split truncated, tile loads with a fixed share per thread shared by 8 warps,
// one kernel per k-step count (no registers for unused k-steps: 104 per thread for RBF at d <= 8),
// and for RBF values |x|^2 added inside the exp's FFMA instead of the accumulator's initialisation.
// RBF: 22.5 -> 11.7 warp instructions per 32 pairs (tc3: 45.8), a bound of 0.35 s per product at
// n = m = 1M, ~0.54-0.63 s at the 55-64% of their bound the measured variants reach; Matern-5/2:
// 39.6 -> 17.2.
//
// Third pass (the model again): the tile loads cost ~2.6 of the 11.7 instructions per 32 pairs
// (global and shared address arithmetic, bounds checks, the splits of every Z and V element: done
// again by every block) and the fragment reads one LDS per register (1.1).  Z and V are now split
// once per product on the host side, zero-padded to whole tiles and laid out in fragment order, so a
// tile load is KS + 1 (+ 1) cp.async copies of 16 bytes per thread into a double buffer (the next
// tile lands while this one is used) and every B fragment is one LDS.128.  RBF: 11.7 -> 8.7
// instructions per 32 pairs (2.2 SM clocks of issue), below the tensor pipe's 2.5 clocks at the
// model's 60% mma.sync efficiency and near the exp unit's 2.0: a bound of 0.30 s per 1M product.
// Matern-5/2: 17.2 -> 14.2, now bound by its own exp + sqrt (0.48 s).
//
// Fourth pass, "tcbh" (TCB_DF16 = 1; 2026-11-24, no GPU): the model's binding resource is now the
// tensor pipe, and 3xTF32 spends three m16n8k8 per k-step on the distance.  f16 has tf32's 11
// significant bits and m16n8k16 reduces over 16 at the same rate, so A = [xh | xl] against
// B = [zl ; zl] and [zh ; zh] gives (xh + xl).(zh + zl) in two MMAs (tcbh_load_rows), and |z|^2 is
// stored as the accumulator quads it initialises (no register copies): RBF 8.7 -> 7.7 instructions and
// 1.5 -> 1.25 MMAs per 32 pairs, 120 -> 108 registers; built as its own variant
// (gpscale/_ext/launch.py: DEFINES) and opt-in until its GPU tests pass.
//
// Fifth pass (third lent H100): tcbh passed every GPU test; at d <= 8 its shipped build takes 3 blocks
// per SM (TCB_MINB = 3: 80 registers, no spills) and 128-row Z tiles (TCB_BN: half the barriers and
// loop overhead per pair): RBF 0.525 -> 0.49-0.51 s at 1M.  One-level accumulation (TCB_ACC1) cost
// 3.6e-3 relative error (mma.sync's accumulator truncates); TCB_ACCS keeps its registers without that.
//
// Sixth pass (no GPU; the model's binding resource is still the tensor pipe, 1.25 m16n8k16 per 32 pairs
// of which 0.5 the distance): TCB_DF16 = 2 forms the two cross terms xh.zl + xl.zh from [xh | xl]
// against [zl ; zh] in an m16n8k16 and xh.zh in an m16n8k8, whose A fragment is the first half of the
// m16n8k16 one (the same registers), dropping xl.zl (<= 2^-22 |x_k z_k| per feature: the size of lo's
// own f16 rounding, and the term 3xTF32 drops in tcb).  The same instructions issue, with 1.125 instead
// of 1.25 m16n8k16's worth of tensor work per 32 pairs.  Z's words shrink to {lo, hi} (8 bytes,
// tcb_pack.pack_z(f16=2)): the m16n8k16 B pair as loaded and hi alone, so no register is copied (B =
// [zh ; zh] would need zh twice in a register pair: +0.35 instructions per 32 pairs in the SASS), half
// the shared-memory traffic of Z (the model's wavefronts 1.70 -> 1.45 per 32 pairs), and tiles small
// enough that TCB_ACCS's totals fit 48 KB beside 128-row tiles (then RBF fits 64 registers, 4 blocks per
// SM, with an 8-byte spill; 80 without one at 3).  Opt-in (gpu_session.sh's K8 / K8A, tune_tcb.py
// DF16 = 2) until a lent GPU has timed and tested it.
//
// Seventh pass (no GPU): TCB_TRI = 1 computes symmetric products (sym) from one triangle of K, each
// off-diagonal pair's distance and exp once, adding P^T V into the rows of the tiles past a block's
// diagonal square (tcb_tri.cuh; docs/backends.md).  Opt-in (gpu_session.sh's KT) until a lent GPU has
// tested and timed it; with TCB_TRI = 0 the shipped builds' SASS is unchanged.
//
// Entry points: gpscale_kmm_tcb_k{1,2,3,4}_{rbf,matern12,matern32,matern52}_{f,f_dq,d}, k = ceil(d / 8)
//   (tcbh: gpscale_kmm_tcbh_k...)
//   (X[n,d], Zf, Zn, Vf, O0[n,t], O1[n,t], n, m, d, t, sym), float32, row-major X and O, Zf / Zn /
//   Vf from gpscale/_ext/tcb_pack.py (pack_tcb); grid (ceil(n / TCB_ROWS), ceil(t / TCB_TCH), S),
//   block 32 * TCB_WARPS; with S > 1 column splits, O0 and O1 are S partial outputs of n x t each, to be
//   summed.  A TCB_TRI build's symmetric f / d launch: S = 1, O0 zeroed, TCB_TRI_SMEM(BN) bytes of dynamic
//   shared memory.  Needs sm_80+, d <= TCB_DMAX.
#include "mma.cuh"
#include "profiles.cuh"

#define TCB_WARPS 8
#ifndef TCB_MT
#define TCB_MT 2                            // 16-row m-tiles per warp
#endif
#ifndef TCB_ACC1  // 1: accumulate P V straight into the per-thread totals (fewer registers, see kmm_tcb)
#define TCB_ACC1 0
#endif
#ifndef TCB_EMU  // of a thread's 4 accumulator entries per fragment, how many take the FMA-pipe exp (gps_ex2_poly)
#define TCB_EMU 0
#endif
#ifndef TCB_DF16  // 1: distances from two f16 MMAs per k-step instead of three tf32 ones: variant "tcbh" (below);
                  // 2: the cross terms in one m16n8k16 and xh.zh in an m16n8k8 (sixth pass, below)
#define TCB_DF16 0
#endif
#ifndef TCB_ACCS  // F > 0: mode F accumulates P V in registers for F tiles, then adds it into per-thread
                  // totals in shared memory (one-level's registers, two-level's accuracy; see kmm_tcb)
#define TCB_ACCS 0
#endif
#ifndef TCB_DPATCH  // 1: the symmetric diagonal patched in a warp-uniform branch, not tested per pair
#define TCB_DPATCH 0
#endif
#ifndef TCB_MINB  // blocks per SM the register allocation must allow, for mode F (the CG product) at d <= 8
                  // only: the f_dq kernels hold twice the accumulators and spill at 80 registers, KS >= 2 too
#define TCB_MINB 1
#endif
#ifndef TCB_TRI  // 1: a symmetric product (sym) sweeps one triangle of K and adds P^T V too (tcb_tri.cuh)
#define TCB_TRI 0
#endif
#define TCB_ROWS (16 * TCB_MT * TCB_WARPS)  // X rows per block
#ifndef TCB_BN  // Z rows per tile at d <= 8, 64 or 128 (the host pads to 128: tcb_pack.PAD_ROWS); larger
                // k-step counts keep 64: their double-buffered tiles would outgrow 48 KB of static shared memory
#define TCB_BN 64
#endif
static_assert(TCB_BN == 64 || TCB_BN == 128, "TCB_BN: 64 or 128 rows per tile");
#define TCB_BN_K(KS) ((KS) == 1 ? TCB_BN : 64)  // Z rows per tile of the KS-k-step entries
#define TCB_PAD 128  // the host pads Z and V rows to a multiple of this (tcb_pack.PAD_ROWS)
#define TCB_DMAX 32                         // largest d (4 k-steps of 8)
#define TCB_TCH 16                          // output columns per block (two MMA n-tiles)

// float -> hi with its top 19 (tf32) bits rounded to nearest (ties away), low bits 0.
__device__ __forceinline__ float round_tf32(float x) {
    return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
}
// Two floats' upper halves as one bf16x2 register (x in the low half: the lower k index).
__device__ __forceinline__ unsigned pack_hi(unsigned x, unsigned y) { return __byte_perm(x, y, 0x7632); }

// (x, y) -> bf16x2 hi, truncated: one PRMT packs both his, and only a mask and a subtract per
// element remain (3 instructions per element instead of 4 for a rounded hi; this split runs once
// per kernel pair).  lo >= 0 carries the whole truncation, so the error is lo's own truncation by
// the packing: < 2^-14 relative (2^-15 at most and 7e-6 on average over random values), one-sided.
// Used for P (>= 0, per pair): the emulated P V error grows from 3.0e-5 to 5.1e-5 of sum |P||V|
// (tests/test_tcb_arithmetic.py), inside 1e-4.  V keeps a rounded hi (split on the host).
__device__ __forceinline__ void split_bf16x2_trunc(float x, float y, unsigned& hi, unsigned& lo) {
    hi = pack_hi(__float_as_uint(x), __float_as_uint(y));
    const float lx = x - __uint_as_float(__float_as_uint(x) & 0xffff0000u);
    const float ly = y - __uint_as_float(__float_as_uint(y) & 0xffff0000u);
    lo = pack_hi(__float_as_uint(lx), __float_as_uint(ly));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    gps_emu::mma_m16n8k16_bf16(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

#include "tcb_tri.cuh"

// Asynchronous 16-byte global -> shared copy (sm_80+; inline PTX: compiles with NVRTC and bare nvcc).
// The emulation copies at the commit and lands a group at the wait that retires it, so a read of
// the buffer before its wait sees stale data there too.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    gps_emu::cp_async16(smem, gmem);
#else
    unsigned s;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }\n" : "=r"(s) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    gps_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most one of this thread's committed copy groups is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_one() {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    gps_emu::cp_async_wait(1);
#else
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

// One 64-row tile of Z and V in fragment order (see the header), as the host packed it.
#if TCB_DF16 == 2
typedef uint2 TcbZWord;  // per 8-row n-tile and k-step, each lane's f16 B fragments {lo, hi} (pairs)
#define TCB_AL 1
#elif TCB_DF16
typedef uint4 TcbZWord;  // per 8-row n-tile and k-step, each lane's f16 B fragments {hi, hi, lo, lo} (pairs)
#define TCB_AL 1         // the A fragment [xh | xl] is whole in ah; al is unused (optimised away)
#else
typedef float4 TcbZWord;  // per 8-row n-tile and k-step, each lane's {hi b0, hi b1, lo b0, lo b1} (tf32)
#define TCB_AL 4
#endif

template <int KS>
struct TcbTile {
    TcbZWord z[TCB_BN_K(KS) / 8][KS][32];
    uint4 v[TCB_BN_K(KS) / 16][2][32];  // per 16-deep k-step and n-tile of 8 columns: the same, bf16 pairs
#if TCB_DF16
    float4 zn[TCB_BN_K(KS) / 8][4];  // |z|^2 per n-tile and c: {zn[2c], zn[2c + 1], zn[2c], zn[2c + 1]}, the
                                    // MMA's initial accumulator as one LDS.128 (no register copies)
#else
    float zn[TCB_BN_K(KS)];         // |z|^2
#endif
};

// Start copying tile i into s: (KS + 1) BN / 64 16-byte copies per thread (+ 1 for the first few).
// The host padded Z and V to whole tiles with zeros (a padded row meets V rows of 0), so there are
// no bounds checks, and every thread's share is fixed.
template <int KS>
__device__ __forceinline__ void tcb_copy_tile(TcbTile<KS>& s, const float4* __restrict__ Zf,
                                              const float* __restrict__ Zn, const uint4* __restrict__ Vf, int i,
                                              int vtiles) {
    constexpr int BN = TCB_BN_K(KS), VW = (BN / 16) * 2 * 32;  // rows and 16-byte words of V per tile
    static_assert(VW % (32 * TCB_WARPS) == 0, "whole 16-byte words of V per thread and tile");
    constexpr int ZW = sizeof(s.z) / 16, NT = 32 * TCB_WARPS;  // 16-byte words of Z per tile; threads
    static_assert(ZW % (NT / 2) == 0, "whole half-blocks of Z words");
    const int tid = threadIdx.x;
    const float4* zsrc = Zf + (long long)i * ZW;
    float4* zdst = reinterpret_cast<float4*>(&s.z[0][0][0]);
#pragma unroll
    for (int w = 0; w < ZW; w += NT)  // flat copies: global and shared share the [n-tile][k-step][lane] order
        if (ZW % NT == 0 || w + tid < ZW) cp_async16(zdst + w + tid, zsrc + w + tid);
    const uint4* vsrc = Vf + ((long long)blockIdx.y * vtiles + i) * VW;
#pragma unroll
    for (int w = 0; w < VW; w += NT) cp_async16(&s.v[0][0][0] + w + tid, vsrc + w + tid);
#if TCB_DF16  // the duplicated |z|^2 quads: 32 words per tile
    if (tid < BN / 2) cp_async16(&s.zn[0][0] + tid, Zn + (long long)i * 2 * BN + 4 * tid);
#else
    if (tid < BN / 4) cp_async16(&s.zn[4 * tid], Zn + (long long)i * BN + 4 * tid);
#endif
}

// tcbh: this warp's 16 rows of -2 X as the m16n8k16 A fragment of A = [xh | xl] (k = 0..7 the f16 hi
// parts of a k-step's 8 features, k = 8..15 their lo parts): a0, a1 = hi of rows g, g + 8 at k = 2c,
// 2c + 1, a2, a3 = their lo; and the squared norms of the unsplit rows.  hi = f16(a) and
// lo = f16(a - hi), round to nearest: a - hi is exact in float32, and lo's own rounding leaves
// 2^-22 |a| -- 3xTF32's error, from f16's 11-bit significand.  Against B = [zh ; zh] and [zl ; zl]
// (the packed Z word {hi, hi, lo, lo}) two MMAs give (xh + xl).(zh + zl); the four A registers are
// distinct, so none is copied into place per MMA (A = [xh | xh], [xl | xl] against B = [zh ; zl]
// made ptxas duplicate two of them before every MMA).  The launcher keeps |2x| inside f16's range
// (launch.py: F16_MAX).
template <int KS>
__device__ __forceinline__ void tcbh_load_rows(const float* __restrict__ X, int row0, int n, int d,
                                               unsigned (&a)[KS][4], float& na, float& nb) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    na = nb = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // rows g and g + 8: the A fragment's a0 and a1
            const int row = row0 + g + 8 * r, k = ks * 8 + 2 * c;
            const float v0 = (row < n && k < d) ? X[(long long)row * d + k] : 0.f;
            const float v1 = (row < n && k + 1 < d) ? X[(long long)row * d + k + 1] : 0.f;
            (r ? nb : na) += v0 * v0 + v1 * v1;
            a[ks][r] = pack_f16x2(-2.f * v0, -2.f * v1);
            float h0, h1;
            unpack_f16x2(a[ks][r], h0, h1);
            a[ks][2 + r] = pack_f16x2(-2.f * v0 - h0, -2.f * v1 - h1);
        }
    na = quad_sum(na);
    nb = quad_sum(nb);
}

// This warp's rows (m-tile mt) as split A fragments of -2 X for every k-step, and their squared norms.
template <int KS>
__device__ __forceinline__ void tcb_load_rows(const float* __restrict__ X, int row0, int n, int d,
                                              unsigned (&ah)[KS][4], unsigned (&al)[KS][TCB_AL],
                                              float& na, float& nb) {
#if TCB_DF16
    tcbh_load_rows<KS>(X, row0, n, d, ah, na, nb);
#else
    load_rows_split(X, row0, n, d, KS, ah, al, na, nb, [](float v, unsigned& hi, unsigned& lo) {
        const float a = -2.f * v;  // exact: the MMA then adds -2 x.z to the norms
        const float h = round_tf32(a);
        hi = __float_as_uint(h);
        lo = __float_as_uint(a - h);
    });
#endif
}

// f (and f' q) of one 8-wide n-tile for both m-tiles: q from one 3xTF32 MMA chain per k-step,
// started from |x|^2 + |z|^2.  The B fragments (one LDS.128 per k-step) serve both m-tiles.
template <int KIND, int MODE, int KS>
__device__ __forceinline__ void tcb_profile_tile(float (&p0)[TCB_MT][4], float (&p1)[TCB_MT][4], const TcbTile<KS>& s,
                                                int nt, const unsigned (&ah)[TCB_MT][KS][4],
                                                const unsigned (&al)[TCB_MT][KS][TCB_AL], const float (&na)[TCB_MT],
                                                const float (&nb)[TCB_MT], int row0, int jt, int sym) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#if TCB_DF16
    const float4 zz = s.zn[nt][c];
#else
    const float2 zz = *reinterpret_cast<const float2*>(&s.zn[nt * 8 + 2 * c]);
#endif
    // RBF (F, D): the chain starts from |z|^2 alone and |x|^2 joins in the FFMA that forms the exp's
    // argument (no FADD per pair: 0.6 fewer instructions per 32 pairs); the others start from both.
    constexpr bool fold = KIND == GPS_RBF && MODE != GPS_MODE_FDQ;
    float q[TCB_MT][4];
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt) {
        q[mt][0] = fold ? zz.x : na[mt] + zz.x;
        q[mt][1] = fold ? zz.y : na[mt] + zz.y;
#if TCB_DF16
        q[mt][2] = fold ? zz.z : nb[mt] + zz.z;
        q[mt][3] = fold ? zz.w : nb[mt] + zz.w;
#else
        q[mt][2] = fold ? zz.x : nb[mt] + zz.x;
        q[mt][3] = fold ? zz.y : nb[mt] + zz.y;
#endif
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#if TCB_DF16 == 2  // [xh | xl] against [zl ; zh] (the two cross terms), then xh.zh in an m16n8k8 (a0, a1 = xh)
        const uint2 b = s.z[nt][ks][lane];  // {lo, hi}: the m16n8k16 B pair as it lies, hi alone the m16n8k8 B
#pragma unroll
        for (int mt = 0; mt < TCB_MT; ++mt) {  // small terms first
            mma_f16(q[mt], ah[mt][ks][0], ah[mt][ks][1], ah[mt][ks][2], ah[mt][ks][3], b.x, b.y);
            mma_f16_k8(q[mt], ah[mt][ks][0], ah[mt][ks][1], b.y);
        }
#elif TCB_DF16  // A = [xh | xl] against B = [zl ; zl], then [zh ; zh]: (xh + xl).(zh + zl) in two MMAs
        const uint4 b = s.z[nt][ks][lane];
#pragma unroll
        for (int mt = 0; mt < TCB_MT; ++mt) {  // small terms first
            mma_f16(q[mt], ah[mt][ks][0], ah[mt][ks][1], ah[mt][ks][2], ah[mt][ks][3], b.z, b.w);
            mma_f16(q[mt], ah[mt][ks][0], ah[mt][ks][1], ah[mt][ks][2], ah[mt][ks][3], b.x, b.y);
        }
#else
        const float4 b = s.z[nt][ks][lane];
        const unsigned bh0 = __float_as_uint(b.x), bh1 = __float_as_uint(b.y);
        const unsigned bl0 = __float_as_uint(b.z), bl1 = __float_as_uint(b.w);
#pragma unroll
        for (int mt = 0; mt < TCB_MT; ++mt) {  // small terms first
            mma_tf32(q[mt], al[mt][ks][0], al[mt][ks][1], al[mt][ks][2], al[mt][ks][3], bh0, bh1);
            mma_tf32(q[mt], ah[mt][ks][0], ah[mt][ks][1], ah[mt][ks][2], ah[mt][ks][3], bl0, bl1);
            mma_tf32(q[mt], ah[mt][ks][0], ah[mt][ks][1], ah[mt][ks][2], ah[mt][ks][3], bh0, bh1);
        }
#endif
    }
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const bool diag = !TCB_DPATCH && sym && row0 + mt * 16 + g + (u >> 1) * 8 == jt + nt * 8 + 2 * c + (u & 1);
            if (fold) {  // exp(-q / 2) = 2^(C q), q = s + |x|^2
                constexpr float C = -0.5f * 1.4426950408889634f;
                const float arg = diag ? 0.f : fmaf(q[mt][u], C, (u < 2 ? na[mt] : nb[mt]) * C);
                const float e = u < TCB_EMU ? gps_ex2_poly(arg) : gps_ex2(arg);  // u is unrolled: no branch
                p0[mt][u] = MODE == GPS_MODE_D ? -0.5f * e : e;
                continue;
            }
            // The clamp only guards the Matern sqrt: RBF takes a rounding-small negative q as it is.
            float qq = KIND == GPS_RBF ? q[mt][u] : fmaxf(q[mt][u], 0.f);
            if (diag) qq = 0.f;
            if (u < TCB_EMU)
                gps_profile<KIND, MODE, 3>(qq, p0[mt][u], p1[mt][u]);
            else
                gps_profile<KIND, MODE, 2>(qq, p0[mt][u], p1[mt][u]);
        }
#if TCB_DPATCH
    // q_ii = 0 exactly, set after the fact and only in the n-tiles that meet this warp's rows: a
    // warp-uniform branch taken in 1 of every m / (16 TCB_MT) n-tiles.  The per-pair test above costs
    // an integer compare and select per pair, and with `sym` a runtime value the compiler keeps part of
    // the profile code twice in the loop (SASS of the default build: 1.6 MUFU per 32 pairs counted
    // statically against 1.0 with sym = 0); which is faster on the symmetric products CG runs is for
    // tune_tcb.py --sym to measure.
    const int col0 = jt + nt * 8;
    if (sym && col0 < row0 + 16 * TCB_MT && row0 < col0 + 8) {
#pragma unroll
        for (int mt = 0; mt < TCB_MT; ++mt)
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (row0 + mt * 16 + g + (u >> 1) * 8 == col0 + 2 * c + (u & 1))
                    gps_profile<KIND, MODE, 2>(0.f, p0[mt][u], p1[mt][u]);
    }
#endif
}

// acc[mt][vn] += P V for one 16-deep k-step kk; P = two n-tiles (h = 0, 1) in C layout = A layout.
// TRI: also acct += P^T V_I, vr this warp's rows of V (tcb_tri.cuh), from the same bf16 split of P.
template <int KS, bool TRI = false>
__device__ __forceinline__ void tcb_pv(float (&acc)[TCB_MT][2][4], const float (&p)[2][TCB_MT][4],
                                      const TcbTile<KS>& s, int kk, float (&acct)[2][4], const uint4* vr) {
    const int lane = threadIdx.x & 31;
    uint4 b[2];
#pragma unroll
    for (int vn = 0; vn < 2; ++vn) b[vn] = s.v[kk][vn][lane];
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt) {
        unsigned ph[4], pl[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            split_bf16x2_trunc(p[h][mt][0], p[h][mt][1], ph[2 * h], pl[2 * h]);
            split_bf16x2_trunc(p[h][mt][2], p[h][mt][3], ph[2 * h + 1], pl[2 * h + 1]);
        }
#pragma unroll
        for (int vn = 0; vn < 2; ++vn) {
            mma_bf16(acc[mt][vn], pl, b[vn].x, b[vn].y);  // small terms first
            mma_bf16(acc[mt][vn], ph, b[vn].z, b[vn].w);
            mma_bf16(acc[mt][vn], ph, b[vn].x, b[vn].y);
        }
        if (TRI) tcb_pvt(acct, ph, pl, vr + mt * 64);
    }
}

// f(mt, vn, u) for every accumulator entry of a warp's output fragments [TCB_MT][2][4] (fully
// unrolled, so the register arrays f indexes stay in registers).
template <typename F>
__device__ __forceinline__ void tcb_each_output(F f) {
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt)
#pragma unroll
        for (int vn = 0; vn < 2; ++vn)
#pragma unroll
            for (int u = 0; u < 4; ++u) f(mt, vn, u);
}

__device__ __forceinline__ float tcb_f4(const float4& v, int u) {
    return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w;
}

// tsum[mt * 2 + vn][thread] += acc[mt][vn] (one LDS.128, four FADDs and one STS.128 per fragment);
// acc = 0.  Every thread touches only its own slots, so no barrier is needed.
__device__ __forceinline__ void tcb_flush_smem(float4 (*tsum)[32 * TCB_WARPS], float (&acc)[TCB_MT][2][4]) {
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt)
#pragma unroll
        for (int vn = 0; vn < 2; ++vn) {
            float4 v = tsum[mt * 2 + vn][threadIdx.x];
            v.x += acc[mt][vn][0], v.y += acc[mt][vn][1], v.z += acc[mt][vn][2], v.w += acc[mt][vn][3];
            tsum[mt * 2 + vn][threadIdx.x] = v;
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[mt][vn][u] = 0.f;
        }
}

// One tile's sweep: profiles and P V for each 16-deep k-step, and with OFF (past the
// block's diagonal square) P^T V, this warp's partial of which goes to its slots `part` (tcb_tri_flush).
template <int KIND, int MODE, int KS, bool OFF>
__device__ __forceinline__ void tcb_sweep(float (&acc0)[TCB_MT][2][4], float (&acc1)[TCB_MT][2][4],
                                         const TcbTile<KS>& s, const unsigned (&ah)[TCB_MT][KS][4],
                                         const unsigned (&al)[TCB_MT][KS][TCB_AL], const float (&na)[TCB_MT],
                                         const float (&nb)[TCB_MT], int row0, int jt, int sym, const uint4* vr,
                                         float4* part) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < TCB_BN_K(KS) / 16; ++kk) {
        float p0[2][TCB_MT][4], p1[2][TCB_MT][4], acct[2][4] = {};
#pragma unroll
        for (int h = 0; h < 2; ++h)
            tcb_profile_tile<KIND, MODE, KS>(p0[h], p1[h], s, 2 * kk + h, ah, al, na, nb, row0, jt, sym);
        tcb_pv<KS, OFF>(acc0, p0, s, kk, acct, vr);
        if (MODE == GPS_MODE_FDQ) tcb_pv<KS>(acc1, p1, s, kk, acct, vr);
        if (OFF)  // this warp's partial of P^T V for the k-step's 16 rows j
#pragma unroll
            for (int vn = 0; vn < 2; ++vn)
                part[(kk * 2 + vn) * 32 + lane] = float4{acct[vn][0], acct[vn][1], acct[vn][2], acct[vn][3]};
    }
}

template <int KIND, int MODE, int KS>
__device__ __forceinline__ void kmm_tcb(const float* __restrict__ X, const float4* __restrict__ Zf,
                                       const float* __restrict__ Zn, const uint4* __restrict__ Vf,
                                       float* __restrict__ O0, float* __restrict__ O1, int n, int m, int d, int t,
                                       int sym) {
    __shared__ TcbTile<KS> buf[2];  // double buffer: tile i + 1 is copied while tile i is used
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * TCB_ROWS + (threadIdx.x >> 5) * (16 * TCB_MT);
    constexpr int BN = TCB_BN_K(KS);
    const int c0 = blockIdx.y * TCB_TCH, ntiles = (m + BN - 1) / BN;
    // V's column chunks lie m_pad = ceil(m / TCB_PAD) TCB_PAD rows apart, which can be more than ntiles tiles
    const int vtiles = (m + TCB_PAD - 1) / TCB_PAD * (TCB_PAD / BN);
    // Column splits (gridDim.z = S > 1; Flash-Decoding's split of the keys): block z sums over its own
    // run of Z tiles [i0, i1) into its own partial output, O + z n t, and the host adds the S partials.
    // More blocks of less work each: a grid of a few waves' blocks leaves most SMs idle in its last
    // wave (wave quantisation); the launcher picks S (gpscale/_ext/splits.py).  A run may be empty.
    // The buffers alternate by the global tile index and the output offset is formed after the loop, so
    // only i and i1 live through it (as i and ntiles did); an empty run's block copies a valid tile it
    // never reads.  What ptxas does differently is the first copy's run-time tile index (any, even a
    // pointer offset): the d <= 8 builds now keep 4-8 of the per-thread totals in local memory, reloaded
    // once per tile (~8 of ~1200 instructions per 128-column tile); the SASS model counts 7.38
    // instructions per 32 RBF pairs in the shipped build against 7.50 before (benchmarks/sass_model.py).
    // TCB_TRI (tcb_tri.cuh): a symmetric product's block starts at its diagonal square, tile `first`, and
    // past the square adds P^T V into the rows of each tile as well (O must start at zero).
    constexpr bool tri_build = TCB_TRI && MODE != GPS_MODE_FDQ;  // f_dq would need twice the partials
    const bool tri = tri_build && sym;
    const int first = tri ? (int)blockIdx.x * (TCB_ROWS / BN) : 0;
    const int run = (ntiles - first + (int)gridDim.z - 1) / (int)gridDim.z;
    const int i0 = first + (int)blockIdx.z * run, i1 = min(ntiles, i0 + run);
    tcb_copy_tile<KS>(buf[i0 & 1], Zf, Zn, Vf, min(i0, ntiles - 1), vtiles);
    cp_async_commit();
    unsigned ah[TCB_MT][KS][4], al[TCB_MT][KS][TCB_AL];
    float na[TCB_MT], nb[TCB_MT];
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt) tcb_load_rows<KS>(X, row0 + 16 * mt, n, d, ah[mt], al[mt], na[mt], nb[mt]);
    // Where P V is summed.  Two-level (default): per tile in acc, then into the totals with FADDs --
    // mma.sync adds into its fp32 accumulator with truncation, and one level over m = 1M columns
    // (TCB_ACC1) measured 3.6e-3 relative error on the H100 against 1.5e-5 (tune_tcb_df16_h100.json).
    // TCB_ACCS = F keeps acc across F tiles and then adds it into totals in shared memory: the
    // registers of one level (80 without spills at TCB_MINB = 3) and the accuracy of two; mode F only
    // (f_dq would need twice the totals), and only where the tiles leave room in 48 KB of static shared
    // memory (KS <= 2 at TCB_BN = 64, none at 128; with TCB_DF16 = 2's compact Z words, every KS).
    constexpr bool smem_tot = TCB_ACCS > 0 && MODE == GPS_MODE_F &&  // and where it fits 48 KB
                              2 * sizeof(TcbTile<KS>) + 2 * TCB_MT * 32 * TCB_WARPS * 16 <= 48 * 1024;
    constexpr int flush_every = TCB_ACCS > 0 ? TCB_ACCS : 1;
    __shared__ float4 tsum[smem_tot ? 2 * TCB_MT : 1][32 * TCB_WARPS];  // [mt * 2 + vn][thread]: no conflicts
    if (smem_tot)
        for (int q = 0; q < 2 * TCB_MT; ++q) tsum[q][threadIdx.x] = float4{0.f, 0.f, 0.f, 0.f};
#if TCB_TRI
    TCB_DYNAMIC_SMEM(dyn);  // [V_I words][warps' partials], TCB_TRI_SMEM(BN) bytes from the launcher
    const uint4* const vr = dyn + (threadIdx.x >> 5) * TCB_MT * 64;  // this warp's rows of V
    float4* const parts = reinterpret_cast<float4*>(dyn + TCB_TRI_VWORDS);  // every warp's, for tcb_tri_flush
    float4* const part = parts + (threadIdx.x >> 5) * (BN / 16) * 64;     // this warp's
    if (tri) tcb_tri_load_v(dyn, Vf, vtiles, BN);  // read after the first tile's barrier
#else  // no P^T V
    const uint4* const vr = nullptr;
    float4* const part = nullptr;
#endif
    float acc0[TCB_MT][2][4] = {}, acc1[TCB_MT][2][4] = {};
    float tot0[TCB_MT][2][4] = {}, tot1[TCB_MT][2][4] = {};

    for (int i = i0; i < i1; ++i) {
        if (i + 1 < i1) tcb_copy_tile<KS>(buf[(i + 1) & 1], Zf, Zn, Vf, i + 1, vtiles);
        cp_async_commit();  // an empty group on the last tile keeps the wait below uniform
        cp_async_wait_all_but_one();  // this thread's copies of tile i have landed ...
        __syncthreads();              // ... and everyone's
        const TcbTile<KS>& s = buf[i & 1];
        const bool off = tri && i >= first + TCB_ROWS / BN;  // block-uniform: a TCB_TRI build has both sweeps
        if (tri_build && off)
            tcb_sweep<KIND, MODE, KS, tri_build>(acc0, acc1, s, ah, al, na, nb, row0, i * BN, sym, vr, part);
        else
            tcb_sweep<KIND, MODE, KS, false>(acc0, acc1, s, ah, al, na, nb, row0, i * BN, sym, vr, part);
        if (smem_tot) {
            if ((i + 1) % flush_every == 0 || i + 1 == i1) tcb_flush_smem(tsum, acc0);
        } else if (!TCB_ACC1) {
            tcb_each_output([&](int mt, int vn, int u) {
                tot0[mt][vn][u] += acc0[mt][vn][u];
                acc0[mt][vn][u] = 0.f;
                if (MODE == GPS_MODE_FDQ) tot1[mt][vn][u] += acc1[mt][vn][u];
                if (MODE == GPS_MODE_FDQ) acc1[mt][vn][u] = 0.f;
            });
        }
        __syncthreads();  // this tile's buffer is consumed before iteration i + 1 copies tile i + 2 into it
#if TCB_TRI  // every warp's partial is stored; the next writes follow the next iteration's barrier
        if (off) tcb_tri_flush<BN>(parts, O0, i * BN, c0, n, t);
#endif
    }
    if (smem_tot)
        tcb_each_output([&](int mt, int vn, int u) { tot0[mt][vn][u] = tcb_f4(tsum[mt * 2 + vn][threadIdx.x], u); });
    O0 += (long long)blockIdx.z * n * t;  // this split's partial output
    O1 += (long long)blockIdx.z * n * t;
    tcb_each_output([&](int mt, int vn, int u) {
        const int ri = row0 + mt * 16 + g + (u >> 1) * 8, cc = c0 + vn * 8 + 2 * c + (u & 1);
        if (ri < n && cc < t) {
            const float o = TCB_ACC1 && !smem_tot ? acc0[mt][vn][u] : tot0[mt][vn][u];
#if TCB_TRI
            if (tri)  // other blocks' P^T V reach these rows too
                tcb_red_add(O0 + (long long)ri * t + cc, o);
            else
#endif
                O0[(long long)ri * t + cc] = o;
            if (MODE == GPS_MODE_FDQ)
                O1[(long long)ri * t + cc] = TCB_ACC1 ? acc1[mt][vn][u] : tot1[mt][vn][u];
        }
    });
}

#define GPS_TCB_ENTRY(NAME, KIND, MODE, KS)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * TCB_WARPS, MODE == GPS_MODE_F && KS == 1 ? TCB_MINB : 1) \
        NAME(const float* X, const float4* Zf, const float* Zn, const uint4* Vf, float* O0, float* O1, int n,   \
             int m, int d, int t, int sym) {                                                                     \
        kmm_tcb<KIND, MODE, KS>(X, Zf, Zn, Vf, O0, O1, n, m, d, t, sym);                                          \
    }

// One entry per k-step count KS = ceil(d / 8) (the launcher picks it from d): fragment registers
// for unused k-steps cost occupancy (160 -> ~100 registers per thread at KS = 1).
#if TCB_DF16
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcbh_k1, 1)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcbh_k2, 2)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcbh_k3, 3)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcbh_k4, 4)
#else
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k1, 1)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k2, 2)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k3, 3)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k4, 4)
#endif
