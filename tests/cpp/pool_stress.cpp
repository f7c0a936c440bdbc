// Stress test of the worker pool (csrc/kernels/parallel.h): calls with 4 threads whose unit
// counts cycle 2, 4, 3, as a threads=4 session's layers do when some have fewer units than
// threads. Every unit must run exactly once per call, and none may still run after the call
// returns. A helper that read the next call's worker count before its generation once ran a
// unit twice, skipped another, and then crashed or hung (a few thousand calls were enough).
//
//   nm_pool_stress [CALLS]     prints "ok CALLS" and exits 0, or names the first bad call and exits 1
#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "kernels/parallel.h"

int main(int argc, char** argv) {
    const long calls = argc > 1 ? std::atol(argv[1]) : 50000;
    constexpr int kMaxUnits = 4;
    std::atomic<int> running{0};
    for (long call = 0; call < calls; ++call) {
        const int units = 2 + static_cast<int>(call % 3 == 0 ? 0 : call % 3 == 1 ? 2 : 1);
        std::atomic<int> runs[kMaxUnits] = {};
        neuralmerge::detail::parallel_units(units, 4, [&](int64_t, int64_t unit) {
            running.fetch_add(1);
            runs[unit].fetch_add(1);
            running.fetch_sub(1);
        });
        bool bad = running.load() != 0;
        for (int u = 0; u < kMaxUnits; ++u) bad |= runs[u].load() != (u < units ? 1 : 0);
        if (bad) {
            std::printf("call %ld (%d units): runs per unit", call, units);
            for (int u = 0; u < kMaxUnits; ++u) std::printf(" %d", runs[u].load());
            std::printf(", %d still running\n", running.load());
            return 1;
        }
    }
    std::printf("ok %ld\n", calls);
    return 0;
}
