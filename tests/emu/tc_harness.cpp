// The tc / tc3 kernels (csrc/kmm_tc.cu) compiled for the CPU emulation of tests/emu/cuda_emu.h.
// They passed their GPU tests on the first lent H100, so running them here checks the emulation's
// tf32 fragment tables against hardware.  Built by tests/emu_harness.py like tcb_harness.cpp.
#include "kmm_tc.cu"

#include "harness.h"

namespace {
using Entry = void (*)(const float*, const float*, const float*, float*, float*, int, int, int, int, int);
#define GPS_EMU_ROW(NAME, KIND, MODE, PV3) {#NAME, &NAME},
const gps_emu::Row<Entry> kEntries[] = {GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tc, false)
                                            GPS_ENTRIES(GPS_EMU_ROW, gpscale_kmm_tc3, true)};
}  // namespace

// Launch `entry` as launch.kernel_matmul does for tc / tc3 (grid (ceil(n / TC_ROWS), ceil(t / TC_TCH)),
// block 32 TC_WARPS).  Returns 0, 1 for an unknown entry, 2 for an emulation error (message in err).
extern "C" int gps_emu_tc(const char* entry, const float* X, const float* Z, const float* V, float* O0, float* O1,
                          int n, int m, int d, int t, int sym, int early, int greedy, char* err, int err_len) {
    const Entry fn = gps_emu::find_entry(kEntries, entry);
    if (!fn) return 1;
    auto call = [=] { fn(X, Z, V, O0, O1, n, m, d, t, sym); };
    return gps_emu::run(call, {unsigned((n + TC_ROWS - 1) / TC_ROWS), unsigned((t + TC_TCH - 1) / TC_TCH), 1},
                        {32 * TC_WARPS, 1, 1}, early, greedy, err, err_len);
}
