// Fused kernel product O = F(X, Z) V on tensor cores with a bf16x3 P V product ("tcb"; built with
// TCB_DF16 = 1 it is "tcbh", the float32 default).  docs/backends.md has the design notes, every
// measurement, and the history that the end of this header sums up.
//
// The scheme is FlashAttention's (Dao et al., NeurIPS 2022; FlashAttention-2, 2023).  A block owns a tile
// of X rows and streams Z / V tiles through shared memory.  It computes the score tile on tensor cores,
// applies the nonlinearity in registers and multiplies by V on tensor cores, never writing the score tile.
// Here the scores are squared distances and the nonlinearity is the kernel's profile f(q):
//
//   q_ij = |x_i|^2 + |z_j|^2 - 2 x_i.z_j      (x_i.z_j on tensor cores, the MMA chain started from the norms)
//   O_i += sum_j f(q_ij) v_j                   (P V on tensor cores)
//
// Accuracy (BBMM's CG needs relative errors <= 1e-4):
// * The host centres the inputs and divides them by the lengthscales, so |x|^2 stays O(d).  The expansion
//   still leaves an absolute error ~ eps (|x|^2 + |z|^2) in q.  gpscale/operators/cuda_backend.py predicts
//   it (expansion_error) and falls back to "simt" where it would exceed the target.
// * The dot product is error-compensated, so plain tf32's error (growing with |x|^2) never enters:
//   3xTF32 (a = a_hi + a_lo by integer round-and-mask, no cvt), or in tcbh two f16 m16n8k16 per k-step.
//   f16 has tf32's 11 significant bits (tcb_io.cuh: tcbh_load_rows).
// * P V is bf16x3: P and V split into bf16 hi + lo, P V ~ Ph Vh + Ph Vl + Pl Vh (P's hi truncated, see
//   split_bf16x2_trunc).  The emulation measures 5.1e-5 of sum |P||V| (tests/test_tcb_arithmetic.py).
//   P <= 1 and bf16 has float32's range, so nothing overflows.
// * Accumulation is fp32 and two-level: a fresh fragment per tile, added to a total.  One level measured
//   3.6e-3 on the H100, because mma.sync truncates into its accumulator.
// * The symmetric case (Z is X, sym) sets q_ii = 0 exactly, where the expansion leaves O(eps |x|^2).
//
// Layouts (PTX ISA, "Matrix fragments for mma.m16n8k8 / m16n8k16"; lane = 4 g + c).  The distance MMA
// returns rows g, g + 8 x columns 2c, 2c + 1 of an 8-wide Z tile.  Two such n-tiles are exactly the bf16
// A fragment of m16n8k16, so P goes from one MMA to the next without shuffles.  Z and V arrive split,
// zero-padded to whole tiles and in fragment order (gpscale/_ext/tcb_pack.py: a lane's B registers of one
// MMA step are one 16-byte word).  So a tile load is a few cp.async copies per thread into a double
// buffer, and each B fragment is one LDS.128 (tcb_io.cuh).
//
// Cost per warp and 64-row Z tile (two 16-row m-tiles sharing every shared-memory fragment):
// 2 x 8 x 3 x ceil(d/8) tf32 MMAs (tcbh: 2 x 8 x 2 f16 m16n8k16), 2 x 4 x 2 x 3 bf16 MMAs, 2048 exps.
//
// How it got here (docs/backends.md: "Benchmark" and "Static model from the SASS").  It was written
// without a GPU after kmm_tc.cu measured 10x the exp bound.  Passes guided by the SASS model
// (benchmarks/sass_model.py) took RBF from 22.5 to 8.7 warp instructions per 32 pairs: ex2 and
// sqrt.approx, no clamp for RBF, a truncated P split, one entry per k-step count, host-side packing.
// On lent H100s tcb ran RBF at 1M in 0.57-0.59 s (3.4x KeOps), and tcbh in 0.49-0.51 s (TCB_DF16 = 1,
// 3 blocks per SM, 128-row tiles).  Every GPU test passed.  Two opt-in builds await a GPU: TCB_DF16 = 2
// (less tensor work for the distances) and TCB_TRI = 1 (symmetric products from one triangle of K,
// tcb_tri.cuh).
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
#ifndef TCB_DF16  // 1: distances from two f16 MMAs per k-step instead of three tf32 ones: variant "tcbh";
                  // 2: the cross terms in one m16n8k16 and xh.zh in an m16n8k8 (docs/backends.md: sixth pass)
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

#include "tcb_tri.cuh"
#include "tcb_io.cuh"

// q[mt] += -2 x.z for one 8-wide n-tile and both m-tiles: per k-step an error-compensated MMA chain
// (3xTF32, or tcbh's f16 pairs), small terms first.  The B fragments (one shared-memory read per k-step)
// serve both m-tiles.
template <int KS>
__device__ __forceinline__ void tcb_distances(float (&q)[TCB_MT][4], const TcbTile<KS>& s, int nt,
                                              const unsigned (&ah)[TCB_MT][KS][4],
                                              const unsigned (&al)[TCB_MT][KS][TCB_AL]) {
    const int lane = threadIdx.x & 31;
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
}

// TCB_DPATCH: q_ii = 0 exactly, set after the fact and only in the n-tiles that meet this warp's rows: a
// warp-uniform branch taken in 1 of every m / (16 TCB_MT) n-tiles.  tcb_profile_tile's per-pair test costs
// an integer compare and select per pair, and with `sym` a runtime value the compiler keeps part of
// the profile code twice in the loop (SASS of the default build: 1.6 MUFU per 32 pairs counted
// statically against 1.0 with sym = 0); which is faster on the symmetric products CG runs is for
// tune_tcb.py --sym to measure.
template <int KIND, int MODE>
__device__ __forceinline__ void tcb_patch_diagonal(float (&p0)[TCB_MT][4], float (&p1)[TCB_MT][4], int row0, int col0,
                                                   int sym) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    if (sym && col0 < row0 + 16 * TCB_MT && row0 < col0 + 8) {
#pragma unroll
        for (int mt = 0; mt < TCB_MT; ++mt)
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (row0 + mt * 16 + g + (u >> 1) * 8 == col0 + 2 * c + (u & 1))
                    gps_profile<KIND, MODE, 2>(0.f, p0[mt][u], p1[mt][u]);
    }
}

// f (and f' q) of one 8-wide n-tile for both m-tiles: q from the MMA chain of tcb_distances, started from
// |x|^2 + |z|^2 (or |z|^2 alone, below).
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
    tcb_distances<KS>(q, s, nt, ah, al);
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
    if (TCB_DPATCH) tcb_patch_diagonal<KIND, MODE>(p0, p1, row0, jt + nt * 8, sym);
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
    // More blocks of less work each fill the last wave of a grid of a few waves (wave quantisation); the
    // launcher picks S (gpscale/_ext/splits.py).  A run may be empty.  The buffers alternate by the global
    // tile index and the output offset is formed after the loop, so only i and i1 live through it; an
    // empty run's block copies a valid tile it never reads (docs/backends.md: "Column splits").
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
        tcb_add_tile<MODE, smem_tot>(acc0, acc1, tot0, tot1, tsum, (i + 1) % flush_every == 0 || i + 1 == i1);
        __syncthreads();  // this tile's buffer is consumed before iteration i + 1 copies tile i + 2 into it
#if TCB_TRI  // every warp's partial is stored; the next writes follow the next iteration's barrier
        if (off) tcb_tri_flush<BN>(parts, O0, i * BN, c0, n, t);
#endif
    }
    tcb_store<MODE, smem_tot>(O0, O1, acc0, acc1, tot0, tot1, tsum, row0, g, c, c0, n, t, tri);
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
