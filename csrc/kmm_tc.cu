// Fused kernel product O = F(X, Z) V on tensor cores, FlashAttention-style ("tc", "tc3").
//
// Dao et al., "FlashAttention" (NeurIPS 2022) / FlashAttention-2 (2023): a block owns a tile of
// query rows, streams key/value tiles through shared memory, computes the score tile on tensor
// cores, applies the nonlinearity in registers and multiplies by V on tensor cores without ever
// writing the score tile.  Here "scores" are squared distances and the nonlinearity is f(q):
//
//   q_ij = |x_i|^2 + |z_j|^2 - 2 x_i.z_j      (x_i.z_j on tensor cores, norms in fp32 registers)
//   O_i += sum_j f(q_ij) v_j                   (P V on tensor cores)
//
// Accuracy (BBMM's CG needs relative errors <= 1e-4):
// * Inputs are centred and divided by the lengthscales on the host, so |x|^2 stays O(d) and the
//   cancellation error of the expansion is O(eps d) in fp32.
// * The dot product uses the 3xTF32 split a = a_hi + a_lo (a_hi = tf32(a)): a.b ~ a_hi b_hi +
//   a_hi b_lo + a_lo b_hi, about fp32 accuracy; plain tf32 (2^-11) would leave errors growing with
//   |x|^2 / l^2, fatal for short lengthscales.
// * The norms are added in fp32 outside the MMA instead of as two extra augmented feature columns:
//   the same single fused "dot gives the exponent" per pair, but exact, and no extra k-step when d
//   is a multiple of 8.
// * P V: "tc3" splits P and V the same way (~fp32, 1e-6 relative); "tc" uses one tf32 MMA (~5e-4
//   relative: faster, for preconditioner-quality products).  Accumulation is fp32, two-level (a
//   fresh fragment per Z tile, added to a register total) to keep the error independent of m.
// * The symmetric case (Z is X) sets q_ii = 0 exactly, as the expansion leaves O(eps |x|^2).
//
// Fragment layouts are those of mma.sync.m16n8k8 (PTX ISA, "Matrix fragments for mma.m16n8k8"):
// lane = 4 g + c; A rows g, g+8 x cols c, c+4; B rows(k) c, c+4 x col g; C rows g, g+8 x cols 2c, 2c+1.
// The P tile leaves the first MMA in C layout and must enter the second in A layout.  Instead of
// shuffling, the reduction index is permuted inside each 8-block (logical k = c <-> column 2c,
// k = c + 4 <-> column 2c + 1), and V's B fragment is read with the same permutation.
//
// Entry points: gpscale_kmm_{tc,tc3}_{rbf,matern12,matern32,matern52}_{f,f_dq,d}
//   (X[n,d], Z[m,d], V[m,t], O0[n,t], O1[n,t], n, m, d, t, sym), float32, row-major;
//   grid (ceil(n / TC_ROWS), ceil(t / TC_TCH)), block 32 * TC_WARPS.  Needs sm_80+, d <= TC_DMAX.
#include "mma.cuh"
#include "profiles.cuh"

#define TC_WARPS 4
#define TC_ROWS (16 * TC_WARPS)  // X rows per block (16 per warp: the MMA's M)
#define TC_BN 64                 // Z rows per tile
#define TC_DMAX 32               // largest d (4 k-steps of 8)
#define TC_TCH 16                // output columns per block (two MMA n-tiles)
#define TC_ZS (TC_DMAX + 4)      // padded strides: conflict-free fragment loads from shared memory
#define TC_VS (TC_TCH + 4)

__device__ __forceinline__ unsigned tf32_of(float x) {
    unsigned r;
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    r = gps_emu::cvt_rna_tf32(x);
#else
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#endif
    return r;
}

__device__ __forceinline__ void tf32_split(float x, unsigned& hi, unsigned& lo) {
    hi = tf32_of(x);
    lo = tf32_of(x - __uint_as_float(hi));
}

// c += a b with the 3xTF32 split (small terms first; a_lo b_lo ~ 2^-22 relative is dropped).
__device__ __forceinline__ void mma_3xtf32(float (&c)[4], const unsigned (&ah)[4], const unsigned (&al)[4],
                                           const unsigned (&bh)[2], const unsigned (&bl)[2]) {
    mma_tf32(c, al[0], al[1], al[2], al[3], bh[0], bh[1]);
    mma_tf32(c, ah[0], ah[1], ah[2], ah[3], bl[0], bl[1]);
    mma_tf32(c, ah[0], ah[1], ah[2], ah[3], bh[0], bh[1]);
}

__device__ __forceinline__ void tc_load_tiles(float (*zs)[TC_ZS], float (*vs)[TC_VS], const float* __restrict__ Z,
                                              const float* __restrict__ V, int j0, int m, int d, int kp, int t,
                                              int c0) {
    // Zero padding: padded Z rows meet V rows of 0, padded dimensions add 0 to every dot product.
    for (int e = threadIdx.x; e < TC_BN * kp; e += 32 * TC_WARPS) {
        const int r = e / kp, k = e - r * kp, j = j0 + r;
        zs[r][k] = (j < m && k < d) ? Z[(long long)j * d + k] : 0.f;
    }
    for (int e = threadIdx.x; e < TC_BN * TC_TCH; e += 32 * TC_WARPS) {
        const int r = e / TC_TCH, c = e % TC_TCH, j = j0 + r;
        vs[r][c] = (j < m && c0 + c < t) ? V[(long long)j * t + c0 + c] : 0.f;
    }
}

// This warp's 16 rows as split A fragments for every k-step, and the squared norms of rows g, g+8.
__device__ __forceinline__ void tc_load_rows(const float* __restrict__ X, int row0, int n, int d, int ksteps,
                                             unsigned (&ah)[4][4], unsigned (&al)[4][4], float& na, float& nb) {
    load_rows_split(X, row0, n, d, ksteps, ah, al, na, nb,
                    [](float v, unsigned& hi, unsigned& lo) { tf32_split(v, hi, lo); });
}

// S = X_w Z_tile^T for n-tile nt (8 Z rows), 3xTF32.
__device__ __forceinline__ void tc_dot_tile(float (&s)[4], const float (*zs)[TC_ZS], int nt, int ksteps,
                                            const unsigned (&ah)[4][4], const unsigned (&al)[4][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    s[0] = s[1] = s[2] = s[3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        if (ks < ksteps) {
            unsigned bh[2], bl[2];
            tf32_split(zs[nt * 8 + g][ks * 8 + c], bh[0], bl[0]);
            tf32_split(zs[nt * 8 + g][ks * 8 + c + 4], bh[1], bl[1]);
            mma_3xtf32(s, ah[ks], al[ks], bh, bl);
        }
    }
}

// o[vn] += P_nt V_nt for both output n-tiles; P given in C layout (see the permutation above).
template <bool PV3>
__device__ __forceinline__ void tc_pv(float (&o)[2][4], const float (&p)[4], const float (*vs)[TC_VS], int nt) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    unsigned ph[4], pl[4];
    // A(g, k=c) = P(g, 2c) = p[0]; A(g+8, c) = p[2]; A(g, c+4) = P(g, 2c+1) = p[1]; A(g+8, c+4) = p[3].
    const float pa[4] = {p[0], p[2], p[1], p[3]};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        if (PV3) tf32_split(pa[u], ph[u], pl[u]);
        else ph[u] = tf32_of(pa[u]);
    }
#pragma unroll
    for (int vn = 0; vn < 2; ++vn) {
        const float v0 = vs[nt * 8 + 2 * c][vn * 8 + g], v1 = vs[nt * 8 + 2 * c + 1][vn * 8 + g];
        if (PV3) {
            unsigned bh[2], bl[2];
            tf32_split(v0, bh[0], bl[0]);
            tf32_split(v1, bh[1], bl[1]);
            mma_3xtf32(o[vn], ph, pl, bh, bl);
        } else {
            mma_tf32(o[vn], ph[0], ph[1], ph[2], ph[3], tf32_of(v0), tf32_of(v1));
        }
    }
}

template <int KIND, int MODE, bool PV3>
__device__ __forceinline__ void kmm_tc(const float* __restrict__ X, const float* __restrict__ Z,
                                       const float* __restrict__ V, float* __restrict__ O0, float* __restrict__ O1,
                                       int n, int m, int d, int t, int sym) {
    __shared__ float zs[TC_BN][TC_ZS];
    __shared__ float vs[TC_BN][TC_VS];
    __shared__ float zn[TC_BN];
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * TC_ROWS + (threadIdx.x >> 5) * 16;
    const int c0 = blockIdx.y * TC_TCH;
    const int ksteps = (d + 7) >> 3, kp = ksteps * 8;
    unsigned ah[4][4], al[4][4];
    float na, nb;
    tc_load_rows(X, row0, n, d, ksteps, ah, al, na, nb);
    float tot0[2][4] = {}, tot1[2][4] = {};

    for (int j0 = 0; j0 < m; j0 += TC_BN) {
        __syncthreads();  // the previous tile is consumed
        tc_load_tiles(zs, vs, Z, V, j0, m, d, kp, t, c0);
        __syncthreads();
        if (threadIdx.x < TC_BN) {
            float s = 0.f;
            for (int k = 0; k < kp; ++k) s += zs[threadIdx.x][k] * zs[threadIdx.x][k];
            zn[threadIdx.x] = s;
        }
        __syncthreads();
        float acc0[2][4] = {}, acc1[2][4] = {};
#pragma unroll
        for (int nt = 0; nt < TC_BN / 8; ++nt) {
            float s[4], p0[4], p1[4];
            tc_dot_tile(s, zs, nt, ksteps, ah, al);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int ri = row0 + g + (u >> 1) * 8, cj = j0 + nt * 8 + 2 * c + (u & 1);
                float q = fmaxf((u < 2 ? na : nb) + zn[nt * 8 + 2 * c + (u & 1)] - 2.f * s[u], 0.f);
                if (sym && ri == cj) q = 0.f;
                gps_profile<KIND, MODE, true>(q, p0[u], p1[u]);
            }
            tc_pv<PV3>(acc0, p0, vs, nt);
            if (MODE == GPS_MODE_FDQ) tc_pv<PV3>(acc1, p1, vs, nt);
        }
#pragma unroll
        for (int vn = 0; vn < 2; ++vn)
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                tot0[vn][u] += acc0[vn][u];
                tot1[vn][u] += acc1[vn][u];
            }
    }
#pragma unroll
    for (int vn = 0; vn < 2; ++vn)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int ri = row0 + g + (u >> 1) * 8, cc = c0 + vn * 8 + 2 * c + (u & 1);
            if (ri < n && cc < t) {
                O0[(long long)ri * t + cc] = tot0[vn][u];
                if (MODE == GPS_MODE_FDQ) O1[(long long)ri * t + cc] = tot1[vn][u];
            }
        }
}

#define GPS_TC_ENTRY(NAME, KIND, MODE, PV3)                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * TC_WARPS)                                                \
        NAME(const float* X, const float* Z, const float* V, float* O0, float* O1, int n, int m, int d, int t, \
             int sym) {                                                                                        \
        kmm_tc<KIND, MODE, PV3>(X, Z, V, O0, O1, n, m, d, t, sym);                                            \
    }

GPS_ENTRIES(GPS_TC_ENTRY, gpscale_kmm_tc, false)
GPS_ENTRIES(GPS_TC_ENTRY, gpscale_kmm_tc3, true)
