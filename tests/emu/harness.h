// Shared by the per-file harnesses (tcb_harness.cpp, tc_harness.cpp): find an entry point by name
// and launch it under the emulation of cuda_emu.h.
#pragma once

#include <cstring>
#include <exception>

namespace gps_emu {

template <typename Entry>
struct Row { const char* name; Entry fn; };

template <typename Entry, int N>
Entry find_entry(const Row<Entry> (&rows)[N], const char* name) {
    for (const Row<Entry>& r : rows)
        if (std::strcmp(r.name, name) == 0) return r.fn;
    return nullptr;
}

template <typename Fn>
void invoke(void* f) { (*static_cast<Fn*>(f))(); }

// Run call() as a kernel of the given grid and block in the given mode (cuda_emu.h); 0 on success,
// 2 with the message in err when the emulation fails (a deadlock, lanes at different collectives).
template <typename Fn>
int run(Fn call, gps_dim3 grid, gps_dim3 block, int early, int greedy, char* err, int err_len) {
    g_early = early != 0;
    g_greedy = greedy != 0;
    try {
        launch(&invoke<Fn>, &call, grid, block);
    } catch (const std::exception& e) {
        std::strncpy(err, e.what(), err_len - 1);
        return 2;
    }
    return 0;
}

}  // namespace gps_emu
