// Kernel profiles shared by every fused kernel-product family in csrc/.
//
// gpscale writes every stationary kernel as k(x, z) = s * f(q), q = |(x - z) / l|^2 (see
// gpscale/kernels/base.py).  A fused product needs f(q) and, for the MLL gradient, f'(q): the
// isotropic lengthscale derivative is dK/dl = -(2 s / l) * f'(q) * q, so one pass can return
// F V and (F' o Q) V together (mode GPS_MODE_FDQ); the ARD derivative expands Delta^2 around
// F' V (mode GPS_MODE_D, see gpscale/operators/fused_derivatives.py).
//
// Device code only: no torch, no CUDA runtime headers, so the same text compiles with NVRTC at run
// time (gpscale/_ext) and with a bare nvcc in CI.  Outputscale is applied by the caller.
#pragma once

#define GPS_RBF 0
#define GPS_M12 1
#define GPS_M32 2
#define GPS_M52 3

#define GPS_MODE_F 0    // out0 = F V
#define GPS_MODE_FDQ 1  // out0 = F V, out1 = (F' o Q) V
#define GPS_MODE_D 2    // out0 = F' V

// exp/sqrt per precision.  FAST selects the special-function unit's approximations (__expf is one
// MUFU.EX2 plus a multiply: ~2 ulp + |x| * 2^-23 relative error, far below the 1e-4 target).
template <int FAST>
__device__ __forceinline__ float gps_exp(float x) { return FAST ? __expf(x) : expf(x); }
template <int FAST>
__device__ __forceinline__ double gps_exp(double x) { return exp(x); }

__device__ __forceinline__ float gps_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double gps_sqrt(double x) { return sqrt(x); }

// FAST = 2 (the tcb kernels): exp(c x) for a compile-time constant c as ex2.approx.ftz(x (c log2 e)),
// one FMUL and one MUFU.EX2.  __expf spends four FMULs and a compare around its MUFU.EX2 to keep
// results below 2^-126 out of the flush to zero; a kernel value that small cannot matter at the 1e-4
// target, and in a kernel bound by instruction issue those five instructions were a fifth of all per
// pair (benchmarks/sass_model.py).  sqrt as sqrt.approx.ftz (one MUFU, ~2^-22 relative) instead of
// sqrtf's correctly rounded sequence with its branches and slow-path call (~12 instructions per pair).
// FAST = 0, 1 keep the expressions they always had, so those kernels compile exactly as before.
__device__ __forceinline__ float gps_ex2(float x) {  // 2^x, results below 2^-126 flushed to 0
    float y;
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    y = gps_emu::ex2_ftz(x);
#else
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
#endif
    return y;
}
// 2^x on the FMA and integer pipes instead of the special-function unit (FlashAttention-4's device on
// Blackwell, where MUFU is as scarce as here).  x = j + f with j = rint(x) by the 1.5 * 2^23
// magic-number add and f in [-1/2, 1/2]; 2^f by a degree-4 polynomial (relative-error minimax, 2.7e-6:
// well inside the 1e-4 target, below the bf16x3 P V split's 5e-5); 2^j added to the exponent field as
// an integer.  Arguments below -125 are clamped there (a result of ~2^-125 instead of 0: an absolute
// 2e-38, nothing at the 1e-4 target), which keeps the exponent field from wrapping.  10 instructions
// against MUFU.EX2's one, on pipes an exp-bound kernel leaves idle.  tcb is not exp-bound (ncu on an
// H100: latency-bound at 16 warps per SM), so there each quarter of its exps moved here cost 0.06 s
// per 1M product (benchmarks/results/tune_tcb_emu_h100.json): TCB_EMU stays 0, kept for kernels
// that are (and for the next GPU's sweep).
__device__ __forceinline__ float gps_ex2_poly(float x) {
    x = fmaxf(x, -125.f);
    const float magic = 12582912.f;  // 1.5 * 2^23: t's low mantissa bits hold rint(x) + 2^22
    const float t = x + magic;
    const float f = x - (t - magic);
    float p = 0.009569993242621422f;
    p = fmaf(p, f, 0.055917542427778244f);
    p = fmaf(p, f, 0.240247443318367f);
    p = fmaf(p, f, 0.6931218504905701f);
    p = fmaf(p, f, 0.9999992847442627f);
    // (bits(t) << 23) is rint(x) << 23 mod 2^32: the magic's own bits above the low 9 shift out
    return __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));
}
__device__ __forceinline__ double gps_ex2_poly(double x) { return exp2(x); }
__device__ __forceinline__ float gps_ex2_scaled(float x, float c) { return gps_ex2(x * (c * 1.4426950408889634f)); }
__device__ __forceinline__ double gps_ex2_scaled(double x, double c) { return exp(c * x); }
// FAST = 3: gps_ex2_scaled with the exp on the FMA pipes (gps_ex2_poly); sqrt stays on MUFU.
template <int FAST, typename T>
__device__ __forceinline__ T gps_ex2_scaled_t(T x, T c) {
    return FAST == 3 ? gps_ex2_poly(x * (c * T(1.4426950408889634))) : gps_ex2_scaled(x, c);
}
__device__ __forceinline__ float gps_sqrt_approx(float x) {
    float y;
#ifdef GPS_HOST_EMULATION  // tests/emu/cuda_emu.h runs the kernels on the CPU (one fiber per thread)
    y = gps_emu::sqrt_ftz(x);
#else
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
#endif
    return y;
}
__device__ __forceinline__ double gps_sqrt_approx(double x) { return sqrt(x); }

// p0, p1 per MODE: F -> (f, -), FDQ -> (f, f' q), D -> (f', -).  q >= 0 on entry (RBF also
// accepts a rounding-small negative q: f stays within rounding of 1 there).  FAST: see gps_ex2_scaled.
template <int KIND, int MODE, int FAST, typename T>
__device__ __forceinline__ void gps_profile(T q, T& p0, T& p1) {
    if (KIND == GPS_RBF) {
        const T e = FAST >= 2 ? gps_ex2_scaled_t<FAST>(q, T(-0.5)) : gps_exp<FAST>(T(-0.5) * q);
        p0 = (MODE == GPS_MODE_D) ? T(-0.5) * e : e;
        p1 = T(-0.5) * e * q;
        return;
    }
    const T r = FAST >= 2 ? gps_sqrt_approx(q) : gps_sqrt(q);
    if (KIND == GPS_M12) {
        const T e = FAST >= 2 ? gps_ex2_scaled_t<FAST>(r, T(-1)) : gps_exp<FAST>(-r);
        // f' = -e / (2 r) diverges at r = 0 but every use multiplies it by a squared difference
        // <= q, whose product tends to 0: gpscale defines it as 0 there (gpscale.kernels.Matern).
        p0 = (MODE == GPS_MODE_D) ? (r > T(0) ? T(-0.5) * e / r : T(0)) : e;
        p1 = T(-0.5) * e * r;  // f' q = -e r / 2, finite everywhere
        return;
    }
    if (KIND == GPS_M32) {
        const T a = T(1.7320508075688772) * r;
        const T e = FAST >= 2 ? gps_ex2_scaled_t<FAST>(r, T(-1.7320508075688772)) : gps_exp<FAST>(-a);
        p0 = (MODE == GPS_MODE_D) ? T(-1.5) * e : (T(1) + a) * e;
        p1 = T(-1.5) * e * q;
        return;
    }
    const T a = T(2.23606797749979) * r;  // Matern 5/2
    const T e = FAST >= 2 ? gps_ex2_scaled_t<FAST>(r, T(-2.23606797749979)) : gps_exp<FAST>(-a);
    const T fp = T(-5.0 / 6.0) * (T(1) + a) * e;
    p0 = (MODE == GPS_MODE_D) ? fp : (T(1) + a + T(5.0 / 3.0) * q) * e;
    p1 = fp * q;
}

// Twelve extern "C" entry points (4 kernels x 3 modes) for one variant: ENTRY(name, KIND, MODE, ...).
#define GPS_ENTRIES(ENTRY, PREFIX, ...)                                   \
    ENTRY(PREFIX##_rbf_f, GPS_RBF, GPS_MODE_F, __VA_ARGS__)               \
    ENTRY(PREFIX##_rbf_f_dq, GPS_RBF, GPS_MODE_FDQ, __VA_ARGS__)          \
    ENTRY(PREFIX##_rbf_d, GPS_RBF, GPS_MODE_D, __VA_ARGS__)               \
    ENTRY(PREFIX##_matern12_f, GPS_M12, GPS_MODE_F, __VA_ARGS__)          \
    ENTRY(PREFIX##_matern12_f_dq, GPS_M12, GPS_MODE_FDQ, __VA_ARGS__)     \
    ENTRY(PREFIX##_matern12_d, GPS_M12, GPS_MODE_D, __VA_ARGS__)          \
    ENTRY(PREFIX##_matern32_f, GPS_M32, GPS_MODE_F, __VA_ARGS__)          \
    ENTRY(PREFIX##_matern32_f_dq, GPS_M32, GPS_MODE_FDQ, __VA_ARGS__)     \
    ENTRY(PREFIX##_matern32_d, GPS_M32, GPS_MODE_D, __VA_ARGS__)          \
    ENTRY(PREFIX##_matern52_f, GPS_M52, GPS_MODE_F, __VA_ARGS__)          \
    ENTRY(PREFIX##_matern52_f_dq, GPS_M52, GPS_MODE_FDQ, __VA_ARGS__)     \
    ENTRY(PREFIX##_matern52_d, GPS_M52, GPS_MODE_D, __VA_ARGS__)
