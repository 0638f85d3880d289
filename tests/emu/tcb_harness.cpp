// The tcb kernel (csrc/kmm_tcb.cu) compiled for the CPU emulation of tests/emu/cuda_emu.h.
// Built by tests/emu_harness.py (build_emulation):
//   g++ -std=c++17 -O1 -shared -fPIC -include cuda_emu.h -DGPS_HOST_EMULATION -I csrc tcb_harness.cpp
#include "kmm_tcb.cu"

#include "harness.h"

namespace {
using Entry = void (*)(const float*, const float4*, const float*, const uint4*, float*, float*, int, int, int, int,
                       int);
#define GPS_EMU_ROW(NAME, KIND, MODE, KS) {#NAME, &NAME},
const gps_emu::Row<Entry> kEntries[] = {
#if TCB_DF16  // the "tcbh" build (-DTCB_DF16=1)
    GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcbh_k1, 1) GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcbh_k2, 2)
    GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcbh_k3, 3) GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcbh_k4, 4)
#else
    GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcb_k1, 1) GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcb_k2, 2)
    GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcb_k3, 3) GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tcb_k4, 4)
#endif
};
}  // namespace

// Launch `entry` as launch.kernel_matmul does for tcb: grid (ceil(n / TCB_ROWS), ceil(t / TCB_TCH), splits),
// block 32 TCB_WARPS (O0, O1: splits partial outputs of n x t each).  Returns 0, 1 for an unknown entry, 2 for
// an emulation error (message in err).
extern "C" int gps_emu_tcb(const char* entry, const float* X, const float* Zf, const float* Zn, const int* Vf,
                           float* O0, float* O1, int n, int m, int d, int t, int sym, int splits, int early,
                           int greedy, char* err, int err_len) {
    const Entry fn = gps_emu::find_entry(kEntries, entry);
    if (!fn) return 1;
    auto call = [=] {
        fn(X, reinterpret_cast<const float4*>(Zf), Zn, reinterpret_cast<const uint4*>(Vf), O0, O1, n, m, d, t, sym);
    };
    return gps_emu::run(call, {unsigned((n + TCB_ROWS - 1) / TCB_ROWS), unsigned((t + TCB_TCH - 1) / TCB_TCH),
                         unsigned(splits)},
                        {32 * TCB_WARPS, 1, 1}, early, greedy, err, err_len);
}
