// Fused kernel product O = F(X, Z) V on CUDA cores: the exact reference variant ("simt").
//
// F_ij = f(|x_i - z_j|^2) with X, Z already centred and divided by the lengthscales on the host
// (ARD is then free here).  One thread owns one row x_i (in registers) and its t-chunk of outputs;
// a block streams tiles of Z and V through shared memory, so every thread reads the same z_j
// (a broadcast) -- the map-reduce scheme of KeOps (Charlier et al., JMLR 2021), written anew.
//
// * Distances in difference form: no cancellation, coincident points give q = 0 exactly.
// * Two-level summation: each Z tile is summed into a fresh partial that is then added to the
//   total, so the rounding error grows like (TILE + m / TILE) eps instead of m eps.
// * float and double instantiations (double is the float64 path of the operators).
//
// Entry points: gpscale_kmm_simt_{f32,f64}_{rbf,matern12,matern32,matern52}_{f,f_dq,d}
//   (X[n,d], Z[m,d], V[m,t], O0[n,t], O1[n,t] (FDQ only), n, m, d, t, sym (unused here)),
//   all row-major contiguous; grid (ceil(n / SIMT_ROWS), ceil(t / SIMT_TCH)), block SIMT_ROWS.
// Cost per pair: d FMA + one exp (+ one sqrt for Matern) + t FMA per output.  d <= SIMT_DMAX.
#include "profiles.cuh"

#define SIMT_ROWS 128  // threads (= X rows) per block
#define SIMT_TILE 64   // Z rows per shared-memory tile
#define SIMT_DMAX 32   // largest supported input dimension (registers per thread)
#define SIMT_TCH 16    // output columns per block; wider t runs more blocks along grid.y

template <int KIND, int MODE, typename T>
__device__ __forceinline__ void simt_load_tiles(T (*zs)[SIMT_DMAX], T (*vs)[SIMT_TCH], const T* __restrict__ Z,
                                                const T* __restrict__ V, int j0, int m, int d, int t, int c0) {
    // Zero padding (k >= d, j >= m, c >= t) makes padded pairs contribute exactly 0.
    for (int e = threadIdx.x; e < SIMT_TILE * SIMT_DMAX; e += SIMT_ROWS) {
        const int r = e / SIMT_DMAX, k = e % SIMT_DMAX, j = j0 + r;
        zs[r][k] = (j < m && k < d) ? Z[(long long)j * d + k] : T(0);
    }
    for (int e = threadIdx.x; e < SIMT_TILE * SIMT_TCH; e += SIMT_ROWS) {
        const int r = e / SIMT_TCH, c = e % SIMT_TCH, j = j0 + r;
        vs[r][c] = (j < m && c0 + c < t) ? V[(long long)j * t + c0 + c] : T(0);
    }
}

template <int KIND, int MODE, typename T>
__device__ __forceinline__ void kmm_simt(const T* __restrict__ X, const T* __restrict__ Z,
                                         const T* __restrict__ V, T* __restrict__ O0, T* __restrict__ O1,
                                         int n, int m, int d, int t) {
    __shared__ T zs[SIMT_TILE][SIMT_DMAX];
    __shared__ T vs[SIMT_TILE][SIMT_TCH];
    const int i = blockIdx.x * SIMT_ROWS + threadIdx.x;
    const int c0 = blockIdx.y * SIMT_TCH;
    T x[SIMT_DMAX];
#pragma unroll
    for (int k = 0; k < SIMT_DMAX; ++k) x[k] = (i < n && k < d) ? X[(long long)i * d + k] : T(0);
    T tot0[SIMT_TCH], tot1[SIMT_TCH];
#pragma unroll
    for (int c = 0; c < SIMT_TCH; ++c) tot0[c] = tot1[c] = T(0);

    for (int j0 = 0; j0 < m; j0 += SIMT_TILE) {
        simt_load_tiles<KIND, MODE, T>(zs, vs, Z, V, j0, m, d, t, c0);
        __syncthreads();
        T acc0[SIMT_TCH], acc1[SIMT_TCH];
#pragma unroll
        for (int c = 0; c < SIMT_TCH; ++c) acc0[c] = acc1[c] = T(0);
        const int jn = min(SIMT_TILE, m - j0);
        for (int r = 0; r < jn; ++r) {
            T q = T(0);
            // Blocks of 8 dimensions, fully unrolled so x[] stays in registers; the zero padding
            // of both x and zs makes the tail of a partial block harmless.
#pragma unroll
            for (int kb = 0; kb < SIMT_DMAX; kb += 8) {
                if (kb < d) {
#pragma unroll
                    for (int kk = 0; kk < 8; ++kk) {
                        const T df = x[kb + kk] - zs[r][kb + kk];
                        q += df * df;
                    }
                }
            }
            T p0, p1;
            gps_profile<KIND, MODE, false>(q, p0, p1);
#pragma unroll
            for (int c = 0; c < SIMT_TCH; ++c) {
                acc0[c] += p0 * vs[r][c];
                if (MODE == GPS_MODE_FDQ) acc1[c] += p1 * vs[r][c];
            }
        }
#pragma unroll
        for (int c = 0; c < SIMT_TCH; ++c) {
            tot0[c] += acc0[c];
            tot1[c] += acc1[c];
        }
        __syncthreads();  // the next tile overwrites zs / vs
    }
    if (i >= n) return;
#pragma unroll
    for (int c = 0; c < SIMT_TCH; ++c) {
        if (c0 + c < t) {
            O0[(long long)i * t + c0 + c] = tot0[c];
            if (MODE == GPS_MODE_FDQ) O1[(long long)i * t + c0 + c] = tot1[c];
        }
    }
}

#define GPS_SIMT_ENTRY(NAME, KIND, MODE, T)                                                           \
    extern "C" __global__ void __launch_bounds__(SIMT_ROWS)                                           \
        NAME(const T* X, const T* Z, const T* V, T* O0, T* O1, int n, int m, int d, int t, int sym) { \
        kmm_simt<KIND, MODE, T>(X, Z, V, O0, O1, n, m, d, t);                                        \
    }

GPS_ENTRIES(GPS_SIMT_ENTRY, gpscale_kmm_simt_f32, float)
GPS_ENTRIES(GPS_SIMT_ENTRY, gpscale_kmm_simt_f64, double)
