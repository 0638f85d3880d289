// Warp-level tensor-core MMAs shared by the tensor-core kernel families (kmm_tc.cu, kmm_tcb.cu).
//
// Fragment layouts: PTX ISA, "Matrix fragments for mma.m16n8k8" (tf32) and "for mma.m16n8k16"
// (bf16); lane = 4 g + c.  Inline PTX, no headers: the text compiles with NVRTC and a bare nvcc.
#pragma once

// c += a b, m16n8k8, tf32 inputs (fp32 bit patterns; the tensor core reads the top 19 bits).
__device__ __forceinline__ void mma_tf32(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
