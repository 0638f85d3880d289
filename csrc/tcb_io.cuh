// Data in and out of csrc/kmm_tcb.cu's blocks: the Z / V tiles (cp.async into a double buffer, in the
// fragment order gpscale/_ext/tcb_pack.py packs them), each warp's rows of X as split A fragments, the
// per-thread P V totals and their stores.  Included by kmm_tcb.cu after its TCB_* configuration and
// tcb_tri.cuh.
#pragma once

// float -> hi with its top 19 (tf32) bits rounded to nearest (ties away), low bits 0.
__device__ __forceinline__ float round_tf32(float x) {
    return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
}

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

// One 64-row tile of Z and V in fragment order (see kmm_tcb.cu's header), as the host packed it.
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

// After tile i: the tile's P V (acc) into the totals -- two-level accumulation, see kmm_tcb -- and acc = 0.
// With SMEM_TOT (TCB_ACCS = F) acc runs on over F tiles and then adds into the shared totals (flush).
template <int MODE, bool SMEM_TOT>
__device__ __forceinline__ void tcb_add_tile(float (&acc0)[TCB_MT][2][4], float (&acc1)[TCB_MT][2][4],
                                             float (&tot0)[TCB_MT][2][4], float (&tot1)[TCB_MT][2][4],
                                             float4 (*tsum)[32 * TCB_WARPS], bool flush) {
    if (SMEM_TOT) {
        if (flush) tcb_flush_smem(tsum, acc0);
    } else if (!TCB_ACC1) {
        tcb_each_output([&](int mt, int vn, int u) {
            tot0[mt][vn][u] += acc0[mt][vn][u];
            acc0[mt][vn][u] = 0.f;
            if (MODE == GPS_MODE_FDQ) tot1[mt][vn][u] += acc1[mt][vn][u];
            if (MODE == GPS_MODE_FDQ) acc1[mt][vn][u] = 0.f;
        });
    }
}

// The block's outputs into split blockIdx.z's partial output: the totals (acc for TCB_ACC1, the shared
// totals tsum with SMEM_TOT).  A TCB_TRI symmetric launch (tri) adds them: other blocks' P^T V reach these rows.
template <int MODE, bool SMEM_TOT>
__device__ __forceinline__ void tcb_store(float* O0, float* O1,
                                          const float (&acc0)[TCB_MT][2][4], const float (&acc1)[TCB_MT][2][4],
                                          float (&tot0)[TCB_MT][2][4], const float (&tot1)[TCB_MT][2][4],
                                          const float4 (*tsum)[32 * TCB_WARPS], int row0, int g, int c, int c0,
                                          int n, int t, bool tri) {
    if (SMEM_TOT)
        tcb_each_output([&](int mt, int vn, int u) { tot0[mt][vn][u] = tcb_f4(tsum[mt * 2 + vn][threadIdx.x], u); });
    O0 += (long long)blockIdx.z * n * t;  // this split's partial output
    O1 += (long long)blockIdx.z * n * t;
    tcb_each_output([&](int mt, int vn, int u) {
        const int ri = row0 + mt * 16 + g + (u >> 1) * 8, cc = c0 + vn * 8 + 2 * c + (u & 1);
        if (ri < n && cc < t) {
            const float o = TCB_ACC1 && !SMEM_TOT ? acc0[mt][vn][u] : tot0[mt][vn][u];
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
