// The process-wide worker pool every multi-threaded kernel and executor op runs on, and the
// BLAS setting that goes with it.
#pragma once

#include <cstdint>
#include <functional>

namespace neuralmerge {
namespace detail {

/// Runs fn(worker, unit) for every unit < units on up to `threads` threads (the caller's thread
/// is worker 0; worker w takes units w, w + workers, ...). Returns when all units are done.
/// Called from inside a unit, it runs serially on the calling thread. fn must not throw.
void parallel_units(int64_t units, int threads, const std::function<void(int64_t, int64_t)>& fn);

/// Runs fn(begin, end) over [0, count) cut into up to `threads` contiguous ranges.
void parallel_ranges(int64_t count, int threads, const std::function<void(int64_t, int64_t)>& fn);

/// Makes BLAS single-threaded. Our ops split dense work over the pool above themselves; a
/// multi-threaded OpenBLAS next to it kept its own threads spinning after every call (for ~0.1 s)
/// and took the cores the pool needed: the VGG pair ran no faster on 2 threads than on 1.
void use_single_threaded_blas();

}  // namespace detail
}  // namespace neuralmerge
