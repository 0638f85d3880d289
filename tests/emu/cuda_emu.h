// Run gpscale's CUDA kernels (csrc/) on the CPU, for tests on machines without a GPU.
//
// Force-included (g++ -include cuda_emu.h -DGPS_HOST_EMULATION) before a csrc/ file: CUDA's keywords
// become plain C++, and every thread of a block becomes a fiber (ucontext) on one OS thread.  A fiber
// runs until it reaches __syncthreads() or a warp-collective instruction and then yields; the last
// fiber to arrive completes the operation for all of them.  What the kernels express with inline PTX
// goes through the GPS_HOST_EMULATION branches of csrc/ to the functions below, written from the PTX
// ISA's definitions and never from the kernels:
//
// * mma.sync m16n8k8 (tf32) and m16n8k16 (bf16, f16): every lane's registers placed by the ISA's fragment
//   tables ("Matrix fragments for mma.m16n8k8 / m16n8k16", lane = 4 groupID + threadID_in_group),
//   tf32 operands with their low 13 bits dropped, the sum formed in double and rounded to float once
//   per instruction (the hardware rounds differently by a few float32 units);
// * __shfl_xor_sync; movmatrix.m8n8.trans.b16 (the 8 x 8 block of 16-bit values, one pair per lane as
//   mma's C fragments hold it, transposed); ex2 / sqrt .approx.ftz as exp2f / sqrtf with results below 2^-126 flushed;
//   cvt.rna.tf32 (round to nearest, ties away); cvt.rn.f16x2.f32 and back through g++'s _Float16
//   (IEEE binary16, round to nearest even, subnormals kept);
// * cp.async: a GPU may land a copy at any time between its issue and the wait that retires its
//   group, so the emulation runs in two modes (g_early): "late" lands every copy only at that wait
//   (reading a buffer before its wait, or before the barrier after other threads' waits, sees stale
//   data) and "early" lands it at issue (overwriting a buffer that other threads still read shows).
//
// Scheduling: round-robin (each runnable fiber in turn until it blocks: warps move in step) or, with
// g_greedy, always the lowest-numbered runnable fiber, so warp 0 runs as far ahead of the others as
// the barriers allow -- with early copies, what exposes a missing barrier before a buffer is refilled.
// Blocks run one after another, so `__shared__` variables (static here) are each block's own.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct gps_dim3 { unsigned x = 0, y = 0, z = 0; };

inline int min(int a, int b) { return a < b ? a : b; }  // CUDA's integer min (device code calls it unqualified)
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __expf(float x) { return std::exp(x); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = (uint64_t(y) << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}

namespace gps_emu {

enum Wait { RUN = 0, WARP = 1, BLOCK = 2, DONE = 3 };
enum Op { MMA_TF32 = 1, MMA_BF16 = 2, SHFL_XOR = 3, MMA_F16 = 4, MOVM_T = 5 };

struct Copy { void* dst; const void* src; };
struct Fiber {
    ucontext_t ctx;
    gps_dim3 tid;
    int wait = RUN;
    unsigned gen = 0;                      // warp collectives this lane has entered
    std::vector<char> stack;
    std::vector<Copy> pending;             // issued, not yet committed
    std::vector<std::vector<Copy>> groups; // committed, not yet landed (oldest first)
};
struct Slot {
    int op;
    unsigned a[4], b[2], mask;
    float c[4], d[4], v;
};
struct Warp { Slot slots[2][32]; int arrived[2] = {0, 0}; };

inline std::vector<Fiber>* g_fibers = nullptr;
inline std::vector<Warp> g_warps;
inline Fiber* g_cur = nullptr;
inline ucontext_t g_sched;
inline gps_dim3 g_block, g_grid, g_bdim;
inline void (*g_body)(void*) = nullptr;
inline void* g_arg = nullptr;
inline int g_block_arrived = 0;
inline bool g_early = false, g_greedy = false;

inline void yield(int why) {
    g_cur->wait = why;
    swapcontext(&g_cur->ctx, &g_sched);
}

inline float tf32(unsigned u) { return __uint_as_float(u & 0xffffe000u); }
inline float bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
inline float bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }
inline float f16_bits(unsigned short h) { _Float16 f; std::memcpy(&f, &h, 2); return float(f); }
inline float f16_lo(unsigned u) { return f16_bits(static_cast<unsigned short>(u & 0xffffu)); }
inline float f16_hi(unsigned u) { return f16_bits(static_cast<unsigned short>(u >> 16)); }
inline unsigned cvt_rn_f16x2(float lo, float hi) {
    const _Float16 l = static_cast<_Float16>(lo), h = static_cast<_Float16>(hi);
    unsigned short a, b;
    std::memcpy(&a, &l, 2), std::memcpy(&b, &h, 2);
    return unsigned(a) | (unsigned(b) << 16);
}
inline void f16x2_to_f32(unsigned p, float& lo, float& hi) { lo = f16_lo(p), hi = f16_hi(p); }

// D = A B + C of one warp, from the lanes' registers, per the PTX ISA's fragment layouts.
inline void complete(Slot (&s)[32]) {
    const int op = s[0].op;
    for (int l = 0; l < 32; ++l)
        if (s[l].op != op) throw std::logic_error("lanes of a warp met different collective instructions");
    if (op == SHFL_XOR) {
        for (int l = 0; l < 32; ++l) s[l].d[0] = s[l ^ s[l].mask].v;
        return;
    }
    if (op == MOVM_T) {  // movmatrix.m8n8.trans.b16: lane 4 r + c holds M[r][2c] (low half), M[r][2c + 1]
        unsigned short M[8][8];
        for (int l = 0; l < 32; ++l)
            M[l >> 2][2 * (l & 3)] = s[l].a[0] & 0xffffu, M[l >> 2][2 * (l & 3) + 1] = s[l].a[0] >> 16;
        for (int l = 0; l < 32; ++l)  // and receives the transpose's M^T[r][2c], M^T[r][2c + 1]
            s[l].b[0] = unsigned(M[2 * (l & 3)][l >> 2]) | (unsigned(M[2 * (l & 3) + 1][l >> 2]) << 16);
        return;
    }
    const int K = op == MMA_TF32 ? 8 : 16;
    double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, c = l & 3;
        const unsigned* a = s[l].a;
        if (op == MMA_TF32) {  // A 16x8 row: a0 (g, c) a1 (g+8, c) a2 (g, c+4) a3 (g+8, c+4); B 8x8 col
            A[g][c] = tf32(a[0]), A[g + 8][c] = tf32(a[1]), A[g][c + 4] = tf32(a[2]), A[g + 8][c + 4] = tf32(a[3]);
            B[c][g] = tf32(s[l].b[0]), B[c + 4][g] = tf32(s[l].b[1]);
        } else {  // A 16x16 row: a0 (g, 2c..2c+1) a1 (g+8, 2c..) a2 (g, 2c+8..) a3 (g+8, 2c+8..); B 16x8 col
            const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
            // the same fragment layout for bf16 and f16 pairs (lower k in the low half)
            float (*lo)(unsigned) = op == MMA_F16 ? f16_lo : bf16_lo;
            float (*hi)(unsigned) = op == MMA_F16 ? f16_hi : bf16_hi;
            for (int i = 0; i < 4; ++i) {
                A[rows[i]][cols[i]] = lo(a[i]);
                A[rows[i]][cols[i] + 1] = hi(a[i]);
            }
            B[2 * c][g] = lo(s[l].b[0]), B[2 * c + 1][g] = hi(s[l].b[0]);
            B[2 * c + 8][g] = lo(s[l].b[1]), B[2 * c + 9][g] = hi(s[l].b[1]);
        }
        // C/D 16x8: c0 (g, 2c) c1 (g, 2c+1) c2 (g+8, 2c) c3 (g+8, 2c+1)
        C[g][2 * c] = s[l].c[0], C[g][2 * c + 1] = s[l].c[1], C[g + 8][2 * c] = s[l].c[2];
        C[g + 8][2 * c + 1] = s[l].c[3];
    }
    double D[16][8];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double acc = C[i][j];
            for (int k = 0; k < K; ++k) acc += A[i][k] * B[k][j];
            D[i][j] = acc;
        }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, c = l & 3;
        s[l].d[0] = float(D[g][2 * c]), s[l].d[1] = float(D[g][2 * c + 1]);
        s[l].d[2] = float(D[g + 8][2 * c]), s[l].d[3] = float(D[g + 8][2 * c + 1]);
    }
}

// Enter a warp collective: fill this lane's slot, wait for the other 31, read the result.
template <typename Fill>
inline Slot& collective(int op, Fill fill) {
    Fiber* f = g_cur;
    const int lane = f->tid.x & 31, w = f->tid.x >> 5, buf = f->gen++ & 1;
    Warp& warp = g_warps[w];
    Slot& s = warp.slots[buf][lane];  // double-buffered: a fast lane's next collective cannot overwrite it
    s.op = op;
    fill(s);
    if (++warp.arrived[buf] == 32) {
        warp.arrived[buf] = 0;
        complete(warp.slots[buf]);
        for (int l = 0; l < 32; ++l) {
            Fiber& o = (*g_fibers)[w * 32 + l];
            if (o.wait == WARP) o.wait = RUN;
        }
    } else {
        yield(WARP);
    }
    return s;
}

// One warp-wide mma.sync of kind op (D = A B + C, C and D in c); a: this lane's A registers.
inline void mma(int op, float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    Slot& s = collective(op, [&](Slot& t) {
        std::memcpy(t.a, a, sizeof t.a), t.b[0] = b0, t.b[1] = b1, std::memcpy(t.c, c, sizeof t.c);
    });
    std::memcpy(c, s.d, sizeof s.d);
}
inline void mma_m16n8k8_tf32(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                             unsigned b1) {
    const unsigned a[4] = {a0, a1, a2, a3};
    mma(MMA_TF32, c, a, b0, b1);
}
inline void mma_m16n8k16_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    mma(MMA_BF16, c, a, b0, b1);
}
inline void mma_m16n8k16_f16(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                             unsigned b1) {
    const unsigned a[4] = {a0, a1, a2, a3};
    mma(MMA_F16, c, a, b0, b1);
}
// m16n8k8 (f16): the first half of m16n8k16's fragments, its k = 8..15 zero (PTX ISA, "Matrix fragments
// for mma.m16n8k8": a0 row g, a1 row g + 8, k pairs 2c, 2c + 1; b0 k pair 2c, 2c + 1 of column g).
inline void mma_m16n8k8_f16(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
    const unsigned a[4] = {a0, a1, 0u, 0u};
    mma(MMA_F16, c, a, b0, 0u);
}

inline float shfl_xor(float v, unsigned mask) {
    return collective(SHFL_XOR, [&](Slot& t) { t.v = v, t.mask = mask; }).d[0];
}

inline unsigned movmatrix_trans(unsigned x) {
    return collective(MOVM_T, [&](Slot& t) { t.a[0] = x; }).b[0];
}

// A launch's dynamic shared memory (extern __shared__): blocks run one after another, so one buffer serves.
alignas(16) inline char g_dynamic_smem[256 * 1024];
template <typename T>
T* dynamic_smem() { return reinterpret_cast<T*>(g_dynamic_smem); }

inline float flush(float y) { return std::fabs(y) < 0x1p-126f ? 0.f : y; }
inline float ex2_ftz(float x) { return flush(std::exp2(flush(x))); }
inline float sqrt_ftz(float x) { return flush(std::sqrt(flush(x))); }
inline unsigned cvt_rna_tf32(float x) { return (__float_as_uint(x) + 0x1000u) & 0xffffe000u; }

inline void cp_async16(void* smem, const void* gmem) {
    if (g_early)
        std::memcpy(smem, gmem, 16);
    else
        g_cur->pending.push_back({smem, gmem});
}
inline void cp_async_commit() {
    g_cur->groups.push_back(std::move(g_cur->pending));
    g_cur->pending.clear();
}
inline void cp_async_wait(size_t keep) {
    auto& gs = g_cur->groups;
    while (gs.size() > keep) {
        for (const Copy& c : gs.front()) std::memcpy(c.dst, c.src, 16);
        gs.erase(gs.begin());
    }
}

inline void syncthreads() {
    int live = 0;
    for (const Fiber& f : *g_fibers) live += f.wait != DONE;
    if (++g_block_arrived == live) {
        g_block_arrived = 0;
        for (Fiber& f : *g_fibers)
            if (f.wait == BLOCK) f.wait = RUN;
    } else {
        yield(BLOCK);
    }
}

inline void fiber_main() {
    g_body(g_arg);
    g_cur->wait = DONE;  // returns to g_sched through uc_link
}

// Run body(arg) as a kernel: every block of the grid in turn, all its threads as fibers.
inline void launch(void (*body)(void*), void* arg, gps_dim3 grid, gps_dim3 block) {
    const unsigned nt = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || nt % 32) throw std::invalid_argument("1-D blocks of whole warps only");
    g_body = body, g_arg = arg, g_grid = grid, g_bdim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                g_block = {bx, by, bz};
                std::vector<Fiber> fibers(nt);
                g_fibers = &fibers;
                g_warps.assign(nt / 32, Warp{});
                g_block_arrived = 0;
                for (unsigned t = 0; t < nt; ++t) {
                    Fiber& f = fibers[t];
                    f.tid = {t, 0, 0};
                    f.stack.resize(1 << 18);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &g_sched;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                for (;;) {
                    bool ran = false, done = true;
                    for (Fiber& f : fibers) {
                        if (f.wait == RUN) {
                            g_cur = &f;
                            swapcontext(&g_sched, &f.ctx);
                            ran = true;
                            if (g_greedy) break;  // start again from fiber 0
                        }
                        done = done && f.wait == DONE;
                    }
                    if (ran) continue;
                    if (done) break;
                    throw std::logic_error("deadlock: every thread waits (a barrier or collective not all reach)");
                }
            }
}

}  // namespace gps_emu

#define threadIdx (gps_emu::g_cur->tid)
#define blockIdx (gps_emu::g_block)
#define blockDim (gps_emu::g_bdim)
#define gridDim (gps_emu::g_grid)
inline void __syncthreads() { gps_emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return gps_emu::shfl_xor(v, unsigned(mask)); }
