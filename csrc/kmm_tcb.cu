// Fused kernel product O = F(X, Z) V on tensor cores with a bf16x3 P V product ("tcb").
//
// Status: written after the first H100 measurement of kmm_tc.cu (2026-11-24: "tc3" 0.025 s per
// product at n = m = 100k, d = 8, t = 16 -- 10x the exp bound and slower than KeOps), compiled in
// CI, NOT yet run on a GPU: it is opt-in (variant="tcb" / GPSCALE_CUDA_VARIANT=tcb) until the GPU
// tests pass on a lent machine.  Why kmm_tc.cu is slow, counted per pair: ~5 cvt.rna.tf32
// conversions (each warp re-splits the shared Z and V tiles; 16/clk/SM like the exp itself) and
// ~2.5 shared-memory wavefronts with one 16-row m-tile per warp.  This file removes both: splits
// are integer round-and-mask (no cvt), Z and V are split once when the tile is loaded, every warp
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
// MMA to the next without shuffles.  V is stored in shared memory as packed bf16 pairs along k.
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
// Entry points: gpscale_kmm_tcb_k{1,2,3,4}_{rbf,matern12,matern32,matern52}_{f,f_dq,d}, k = ceil(d / 8)
//   (X[n,d], Z[m,d], V[m,t], O0[n,t], O1[n,t], n, m, d, t, sym), float32, row-major;
//   grid (ceil(n / TCB_ROWS), ceil(t / TCB_TCH)), block 32 * TCB_WARPS.  Needs sm_80+, d <= TCB_DMAX.
#include "mma.cuh"
#include "profiles.cuh"

#define TCB_WARPS 8
#define TCB_MT 2                            // 16-row m-tiles per warp
#define TCB_ROWS (16 * TCB_MT * TCB_WARPS)  // X rows per block
#define TCB_BN 64                           // Z rows per tile
#define TCB_DMAX 32                         // largest d (4 k-steps of 8)
#define TCB_TCH 16                          // output columns per block (two MMA n-tiles)
#define TCB_KC (TCB_DMAX / 8)               // 8-wide k-chunks (k-steps) of the largest d
#define TCB_ZS (TCB_DMAX + 4)               // padded strides: conflict-free fragment loads
#define TCB_VS (TCB_TCH + 8)                

// float -> hi with its top 19 (tf32) or 16 (bf16) bits rounded to nearest (ties away), low bits 0.
__device__ __forceinline__ float round_tf32(float x) {
    return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
}
__device__ __forceinline__ unsigned round_bf16_bits(float x) { return (__float_as_uint(x) + 0x8000u) & 0xffff0000u; }
// Two floats' upper halves as one bf16x2 register (x in the low half: the lower k index).
__device__ __forceinline__ unsigned pack_hi(unsigned x, unsigned y) { return __byte_perm(x, y, 0x7632); }

// (x, y) -> bf16x2 hi (rounded) and lo = remainder (truncated to bf16 by the packing).
__device__ __forceinline__ void split_bf16x2(float x, float y, unsigned& hi, unsigned& lo) {
    const unsigned hx = round_bf16_bits(x), hy = round_bf16_bits(y);
    hi = pack_hi(hx, hy);
    lo = pack_hi(__float_as_uint(x - __uint_as_float(hx)), __float_as_uint(y - __uint_as_float(hy)));
}

// The same with hi truncated: one PRMT packs both his, and only a mask and a subtract per element
// remain (3 instructions per element instead of 4; this split runs once per kernel pair).  lo >= 0
// carries the whole truncation, so the error is lo's own truncation: < 2^-14 relative (2^-15 at most
// and 7e-6 on average over random values), one-sided.  Used for P (>= 0, per pair): the emulated
// P V error grows from 3.0e-5 to 4.8e-5 of sum |P||V| (tests/test_tcb_arithmetic.py), inside 1e-4.
// V keeps the rounded split (once per tile load).
__device__ __forceinline__ void split_bf16x2_trunc(float x, float y, unsigned& hi, unsigned& lo) {
    hi = pack_hi(__float_as_uint(x), __float_as_uint(y));
    const float lx = x - __uint_as_float(__float_as_uint(x) & 0xffff0000u);
    const float ly = y - __uint_as_float(__float_as_uint(y) & 0xffff0000u);
    lo = pack_hi(__float_as_uint(lx), __float_as_uint(ly));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Load one Z tile split into tf32 hi/lo with its squared norms, and the V tile as packed bf16 hi/lo
// pairs along k.  Zero padding: padded Z rows meet V rows of 0, padded dimensions add 0.  Every
// thread's share is fixed at compile time (no runtime division or loop bound: the per-element index
// arithmetic of a strided loop cost ~3 instructions per kernel pair, benchmarks/sass_model.py):
// a thread splits dimensions 8 kc .. 8 kc + 7 of a row r and keeps their partial norm in zn[kc][r]
// (whole warps skip the chunks beyond d); the readers add the KS partials.
template <int KS>
__device__ __forceinline__ void tcb_load_tiles(float (*zh)[TCB_ZS], float (*zl)[TCB_ZS], float (*zn)[TCB_BN],
                                              unsigned (*vh)[TCB_VS], unsigned (*vl)[TCB_VS],
                                              const float* __restrict__ Z, const float* __restrict__ V, int j0,
                                              int m, int d, int t, int c0) {
    static_assert(TCB_BN % 32 == 0, "a k-chunk is whole warps");
#pragma unroll
    for (int it = 0; it < (TCB_BN * KS + 32 * TCB_WARPS - 1) / (32 * TCB_WARPS); ++it) {
        const int e = threadIdx.x + it * 32 * TCB_WARPS, kc = e / TCB_BN, r = e % TCB_BN, j = j0 + r;
        if (kc < KS) {  // the same for a whole warp
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int k = kc * 8 + i;
                const float z = (j < m && k < d) ? Z[(long long)j * d + k] : 0.f;
                const float h = round_tf32(z);
                zh[r][k] = h;
                zl[r][k] = z - h;
                s = fmaf(z, z, s);
            }
            zn[kc][r] = s;
        }
    }
    static_assert((TCB_BN / 2) * TCB_TCH % (32 * TCB_WARPS) == 0, "whole V-tile trips per thread");
#pragma unroll
    for (int it = 0; it < (TCB_BN / 2) * TCB_TCH / (32 * TCB_WARPS); ++it) {
        const int e = threadIdx.x + it * 32 * TCB_WARPS;
        const int kq = e / TCB_TCH, c = e % TCB_TCH, j2 = j0 + 2 * kq;
        const bool col = c0 + c < t;
        const float v0 = (col && j2 < m) ? V[(long long)j2 * t + c0 + c] : 0.f;
        const float v1 = (col && j2 + 1 < m) ? V[(long long)(j2 + 1) * t + c0 + c] : 0.f;
        split_bf16x2(v0, v1, vh[kq][c], vl[kq][c]);
    }
}

// This warp's rows (m-tile mt) as split A fragments of -2 X for every k-step, and their squared norms.
template <int KS>
__device__ __forceinline__ void tcb_load_rows(const float* __restrict__ X, int row0, int n, int d,
                                              unsigned (&ah)[KS][4], unsigned (&al)[KS][4], float& na, float& nb) {
    load_rows_split(X, row0, n, d, KS, ah, al, na, nb, [](float v, unsigned& hi, unsigned& lo) {
        const float a = -2.f * v;  // exact: the MMA then adds -2 x.z to the norms
        const float h = round_tf32(a);
        hi = __float_as_uint(h);
        lo = __float_as_uint(a - h);
    });
}

// f (and f' q) of one 8-wide n-tile for both m-tiles: q from one 3xTF32 MMA chain per k-step,
// started from |x|^2 + |z|^2.  The B fragments are read once for both m-tiles.
template <int KIND, int MODE, int KS>
__device__ __forceinline__ void tcb_profile_tile(float (&p0)[TCB_MT][4], float (&p1)[TCB_MT][4],
                                                const float (*zh)[TCB_ZS], const float (*zl)[TCB_ZS],
                                                const float (*zn)[TCB_BN], int nt,
                                                const unsigned (&ah)[TCB_MT][KS][4], const unsigned (&al)[TCB_MT][KS][4],
                                                const float (&na)[TCB_MT], const float (&nb)[TCB_MT], int row0, int jt,
                                                int sym) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    float z0 = zn[0][nt * 8 + 2 * c], z1 = zn[0][nt * 8 + 2 * c + 1];
#pragma unroll
    for (int kc = 1; kc < KS; ++kc) {
        z0 += zn[kc][nt * 8 + 2 * c];
        z1 += zn[kc][nt * 8 + 2 * c + 1];
    }
    // RBF (F, D): the chain starts from |z|^2 alone and |x|^2 joins in the FFMA that forms the exp's
    // argument (no FADD per pair: 0.6 fewer instructions per 32 pairs); the others start from both.
    constexpr bool fold = KIND == GPS_RBF && MODE != GPS_MODE_FDQ;
    float s[TCB_MT][4];
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt) {
        s[mt][0] = fold ? z0 : na[mt] + z0;
        s[mt][1] = fold ? z1 : na[mt] + z1;
        s[mt][2] = fold ? z0 : nb[mt] + z0;
        s[mt][3] = fold ? z1 : nb[mt] + z1;
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const float* hr = zh[nt * 8 + g] + ks * 8 + c;
        const float* lr = zl[nt * 8 + g] + ks * 8 + c;
        const unsigned bh0 = __float_as_uint(hr[0]), bh1 = __float_as_uint(hr[4]);
        const unsigned bl0 = __float_as_uint(lr[0]), bl1 = __float_as_uint(lr[4]);
#pragma unroll
        for (int mt = 0; mt < TCB_MT; ++mt) {  // small terms first
            mma_tf32(s[mt], al[mt][ks][0], al[mt][ks][1], al[mt][ks][2], al[mt][ks][3], bh0, bh1);
            mma_tf32(s[mt], ah[mt][ks][0], ah[mt][ks][1], ah[mt][ks][2], ah[mt][ks][3], bl0, bl1);
            mma_tf32(s[mt], ah[mt][ks][0], ah[mt][ks][1], ah[mt][ks][2], ah[mt][ks][3], bh0, bh1);
        }
    }
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const bool diag = sym && row0 + mt * 16 + g + (u >> 1) * 8 == jt + nt * 8 + 2 * c + (u & 1);
            if (fold) {  // exp(-q / 2) = 2^(C q), q = s + |x|^2
                constexpr float C = -0.5f * 1.4426950408889634f;
                const float e = gps_ex2(diag ? 0.f : fmaf(s[mt][u], C, (u < 2 ? na[mt] : nb[mt]) * C));
                p0[mt][u] = MODE == GPS_MODE_D ? -0.5f * e : e;
                continue;
            }
            // The clamp only guards the Matern sqrt: RBF takes a rounding-small negative q as it is.
            float q = KIND == GPS_RBF ? s[mt][u] : fmaxf(s[mt][u], 0.f);
            if (diag) q = 0.f;
            gps_profile<KIND, MODE, 2>(q, p0[mt][u], p1[mt][u]);
        }
}

// acc[mt][vn] += P V for one 16-deep k-step; P = two n-tiles (h = 0, 1) in C layout = A layout.
__device__ __forceinline__ void tcb_pv(float (&acc)[TCB_MT][2][4], const float (&p)[2][TCB_MT][4],
                                      const unsigned (&bh)[2][2], const unsigned (&bl)[2][2]) {
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
            mma_bf16(acc[mt][vn], pl, bh[vn][0], bh[vn][1]);  // small terms first
            mma_bf16(acc[mt][vn], ph, bl[vn][0], bl[vn][1]);
            mma_bf16(acc[mt][vn], ph, bh[vn][0], bh[vn][1]);
        }
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

template <int KIND, int MODE, int KS>
__device__ __forceinline__ void kmm_tcb(const float* __restrict__ X, const float* __restrict__ Z,
                                       const float* __restrict__ V, float* __restrict__ O0, float* __restrict__ O1,
                                       int n, int m, int d, int t, int sym) {
    __shared__ float zh[TCB_BN][TCB_ZS], zl[TCB_BN][TCB_ZS];
    __shared__ unsigned vh[TCB_BN / 2][TCB_VS], vl[TCB_BN / 2][TCB_VS];
    __shared__ float zn[TCB_KC][TCB_BN];  // partial squared norms per k-chunk
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * TCB_ROWS + (threadIdx.x >> 5) * (16 * TCB_MT);
    const int c0 = blockIdx.y * TCB_TCH;
    unsigned ah[TCB_MT][KS][4], al[TCB_MT][KS][4];
    float na[TCB_MT], nb[TCB_MT];
#pragma unroll
    for (int mt = 0; mt < TCB_MT; ++mt) tcb_load_rows<KS>(X, row0 + 16 * mt, n, d, ah[mt], al[mt], na[mt], nb[mt]);
    float tot0[TCB_MT][2][4] = {}, tot1[TCB_MT][2][4] = {};

    for (int j0 = 0; j0 < m; j0 += TCB_BN) {
        __syncthreads();  // the previous tile is consumed
        tcb_load_tiles<KS>(zh, zl, zn, vh, vl, Z, V, j0, m, d, t, c0);
        __syncthreads();
        float acc0[TCB_MT][2][4] = {}, acc1[TCB_MT][2][4] = {};
#pragma unroll
        for (int kk = 0; kk < TCB_BN / 16; ++kk) {
            float p0[2][TCB_MT][4], p1[2][TCB_MT][4];
#pragma unroll
            for (int h = 0; h < 2; ++h)
                tcb_profile_tile<KIND, MODE, KS>(p0[h], p1[h], zh, zl, zn, 2 * kk + h, ah, al, na, nb, row0, j0,
                                            sym);
            unsigned bh[2][2], bl[2][2];
#pragma unroll
            for (int vn = 0; vn < 2; ++vn) {
                bh[vn][0] = vh[kk * 8 + c][vn * 8 + g];
                bh[vn][1] = vh[kk * 8 + 4 + c][vn * 8 + g];
                bl[vn][0] = vl[kk * 8 + c][vn * 8 + g];
                bl[vn][1] = vl[kk * 8 + 4 + c][vn * 8 + g];
            }
            tcb_pv(acc0, p0, bh, bl);
            if (MODE == GPS_MODE_FDQ) tcb_pv(acc1, p1, bh, bl);
        }
        tcb_each_output([&](int mt, int vn, int u) {
            tot0[mt][vn][u] += acc0[mt][vn][u];
            if (MODE == GPS_MODE_FDQ) tot1[mt][vn][u] += acc1[mt][vn][u];
        });
    }
    tcb_each_output([&](int mt, int vn, int u) {
        const int ri = row0 + mt * 16 + g + (u >> 1) * 8, cc = c0 + vn * 8 + 2 * c + (u & 1);
        if (ri < n && cc < t) {
            O0[(long long)ri * t + cc] = tot0[mt][vn][u];
            if (MODE == GPS_MODE_FDQ) O1[(long long)ri * t + cc] = tot1[mt][vn][u];
        }
    });
}

#define GPS_TCB_ENTRY(NAME, KIND, MODE, KS)                                                                \
    extern "C" __global__ void __launch_bounds__(32 * TCB_WARPS)                                               \
        NAME(const float* X, const float* Z, const float* V, float* O0, float* O1, int n, int m, int d, int t, \
             int sym) {                                                                                        \
        kmm_tcb<KIND, MODE, KS>(X, Z, V, O0, O1, n, m, d, t, sym);                                                \
    }

// One entry per k-step count KS = ceil(d / 8) (the launcher picks it from d): fragment registers
// for unused k-steps cost occupancy (160 -> ~100 registers per thread at KS = 1).
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k1, 1)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k2, 2)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k3, 3)
GPS_ENTRIES(GPS_TCB_ENTRY, gpscale_kmm_tcb_k4, 4)
