// Warp-level tensor-core MMAs shared by the tensor-core kernel families (kmm_tc.cu, kmm_tcb.cu).
//
// Fragment layouts: PTX ISA, "Matrix fragments for mma.m16n8k8" (tf32) and "for mma.m16n8k16"
// (bf16); lane = 4 g + c.  Inline PTX, no headers: the text compiles with NVRTC and a bare nvcc.
#pragma once

// c += a b, m16n8k8, tf32 inputs (fp32 bit patterns; the tensor core reads the top 19 bits).
__device__ __forceinline__ void mma_tf32(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    gps_emu::mma_m16n8k8_tf32(c, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// c += a b, m16n8k16, f16 inputs (pairs, the lower k index in the low half), f32 accumulation.
__device__ __forceinline__ void mma_f16(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                        unsigned b0, unsigned b1) {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    gps_emu::mma_m16n8k16_f16(c, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// c += a b, m16n8k8, f16 inputs: half the tensor work of m16n8k16.  Its A fragment is the first half
// of m16n8k16's (a0 = row g, a1 = row g + 8, k pairs 2c, 2c + 1), its B fragment is m16n8k16's b0.
__device__ __forceinline__ void mma_f16_k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    gps_emu::mma_m16n8k8_f16(c, a0, a1, b0);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
#endif
}

// c += a b, m16n8k16, bf16 inputs (pairs, the lower k index in the low half), f32 accumulation.
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

// (x, y) -> one f16x2 register, each rounded to nearest even (x in the low half); cvt.rn.f16x2.f32.
__device__ __forceinline__ unsigned pack_f16x2(float x, float y) {
#ifdef GPS_HOST_EMULATION
    return gps_emu::cvt_rn_f16x2(x, y);
#else
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(y), "f"(x));  // the first source goes high
    return r;
#endif
}

// The two halves of an f16x2 register as floats (exact).
__device__ __forceinline__ void unpack_f16x2(unsigned p, float& x, float& y) {
#ifdef GPS_HOST_EMULATION
    gps_emu::f16x2_to_f32(p, x, y);
#else
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }\n"
        : "=f"(x), "=f"(y) : "r"(p));
#endif
}

// The four A-fragment elements of m16n8k8 for rows row0 + g, row0 + g + 8 of row-major X[n, d] at
// k-step ks (columns ks*8 + c, ks*8 + c + 4), in fragment order; zero outside X or when !on.
__device__ __forceinline__ void a_frag_m16k8(const float* __restrict__ X, int row0, int n, int d, int ks, bool on,
                                             float (&v)[4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int ra = row0 + g, rb = row0 + g + 8, k0 = ks * 8 + c, k1 = k0 + 4;
    v[0] = (on && ra < n && k0 < d) ? X[(long long)ra * d + k0] : 0.f;
    v[1] = (on && rb < n && k0 < d) ? X[(long long)rb * d + k0] : 0.f;
    v[2] = (on && ra < n && k1 < d) ? X[(long long)ra * d + k1] : 0.f;
    v[3] = (on && rb < n && k1 < d) ? X[(long long)rb * d + k1] : 0.f;
}

// Sum over the 4 lanes of a quad (a fragment row's entries are spread over them).
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// A warp's 16 rows of X as hi/lo A fragments for every k-step (split(v, hi, lo) decides how, e.g.
// 3xTF32), and the squared norms na, nb of rows g and g + 8 (of the unsplit values).
// KS: the fragment arrays' k-steps (4 = any d <= 32 with ksteps live; a kernel specialised on
// ceil(d / 8) passes exactly its k-steps and so holds no registers for unused ones).
template <int KS, typename Split>
__device__ __forceinline__ void load_rows_split(const float* __restrict__ X, int row0, int n, int d, int ksteps,
                                                unsigned (&ah)[KS][4], unsigned (&al)[KS][4], float& na, float& nb,
                                                Split split) {
    na = nb = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        float v[4];
        a_frag_m16k8(X, row0, n, d, ks, ks < ksteps, v);
#pragma unroll
        for (int u = 0; u < 4; ++u) split(v[u], ah[ks][u], al[ks][u]);
        na += v[0] * v[0] + v[2] * v[2];
        nb += v[1] * v[1] + v[3] * v[3];
    }
    na = quad_sum(na);
    nb = quad_sum(nb);
}
