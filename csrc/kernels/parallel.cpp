// The worker pool of parallel.h.
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__)
#include <unistd.h>
#endif

#include "../blas.h"

namespace neuralmerge {
namespace detail {
namespace {

// Set while a thread runs a unit of a pool job: a parallel_units call from inside one (a layer
// inside a task that runs beside others) runs its units itself, since the pool is busy with
// the outer job and waiting for it would never end.
thread_local bool in_job = false;

struct JobScope {
    bool saved = in_job;
    JobScope() { in_job = true; }
    ~JobScope() { in_job = saved; }
};

// Spin-wait hint to the CPU (lets the sibling hyper-thread run; saves power).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Helper threads kept for the life of the process: starting and joining std::threads on every
// call cost tens of microseconds, as much as a small layer's whole compute. Idle helpers spin
// for kSpin before they sleep, and the caller spins for their results: waking a sleeping thread
// through a condition variable cost ~80 us per call on this (virtualised) machine, 10x the
// compute of a small layer. Layers run back to back, so the next job usually arrives while the
// helpers still spin.
class WorkerPool {
 public:
    static WorkerPool& instance() {
        // Never destroyed: its threads outlive static destructors. A forked child has none of
        // the parent's threads, so it starts a pool of its own.
        static WorkerPool* pool = nullptr;
        static std::mutex create;
        std::lock_guard<std::mutex> lock(create);
#if defined(__unix__)
        if (pool && pool->owner_ != getpid()) pool = nullptr;  // the parent's pool: leaked
#endif
        if (!pool) pool = new WorkerPool;
        return *pool;
    }

    // Runs fn(worker, unit) for every unit < units; worker w < workers takes units w, w + workers, ...
    // The caller is worker 0. Concurrent callers take turns.
    void run(int64_t units, int64_t workers, const std::function<void(int64_t, int64_t)>& fn) {
        std::lock_guard<std::mutex> turn(run_mutex_);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            while (static_cast<int64_t>(threads_.size()) < workers - 1) {
                const int64_t id = static_cast<int64_t>(threads_.size()) + 1;
                threads_.emplace_back([this, id] { serve(id); });
            }
            // Published before the ticket moves (release); read by helpers after they see it.
            job_.store(&fn, std::memory_order_relaxed);
            units_.store(units, std::memory_order_relaxed);
            pending_.store(workers - 1, std::memory_order_relaxed);
            const uint64_t generation = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
            ticket_.store(generation << 32 | static_cast<uint64_t>(workers), std::memory_order_release);
        }
        wake_.notify_all();
        {
            JobScope scope;
            for (int64_t u = 0; u < units; u += workers) fn(0, u);
        }
        for (int64_t spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
            if (spins < kCallerSpins) {
                cpu_relax();
            } else {
                std::this_thread::yield();
            }
        }
    }

 private:
    static constexpr int64_t kCallerSpins = int64_t{1} << 16;
    static constexpr std::chrono::microseconds kSpin{200};

    // A job's generation and worker count travel in one atomic ticket, so that a helper decides
    // whether it is needed with the count of the generation it marks as seen. Read apart, a
    // helper not needed for one job could read the next job's larger count before that job's
    // generation, run the next job's units for it, then run them again as the new generation,
    // and count itself done twice (units run twice or never; found by a stress test).
    void serve(int64_t id) {
        uint64_t seen = 0;
        for (;;) {
            uint64_t ticket = ticket_.load(std::memory_order_acquire);
            const auto deadline = std::chrono::steady_clock::now() + kSpin;
            for (int64_t spins = 0; ticket >> 32 == seen; ++spins) {
                if (spins % 256 == 0 && std::chrono::steady_clock::now() > deadline) break;
                cpu_relax();
                ticket = ticket_.load(std::memory_order_acquire);
            }
            if (ticket >> 32 == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return ticket_.load(std::memory_order_acquire) >> 32 != seen; });
                ticket = ticket_.load(std::memory_order_acquire);
            }
            seen = ticket >> 32;
            // A helper needed for this generation is counted in pending_, so the next run()
            // cannot overwrite the job before it has finished with it.
            const auto workers = static_cast<int64_t>(ticket & 0xffffffffu);
            if (id >= workers) continue;  // not needed this time
            const auto* job = job_.load(std::memory_order_relaxed);
            const int64_t units = units_.load(std::memory_order_relaxed);
            {
                JobScope scope;
                for (int64_t u = id; u < units; u += workers) (*job)(id, u);
            }
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }

    std::mutex run_mutex_, mutex_;
    std::condition_variable wake_;
    std::vector<std::thread> threads_;
    std::atomic<const std::function<void(int64_t, int64_t)>*> job_{nullptr};
    std::atomic<int64_t> units_{0}, pending_{0};
    std::atomic<uint64_t> ticket_{0};  // generation << 32 | workers
#if defined(__unix__)
    const pid_t owner_ = getpid();
#endif
};

}  // namespace

void parallel_units(int64_t units, int threads, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, units));
    if (workers == 1 || in_job) {
        for (int64_t u = 0; u < units; ++u) fn(0, u);
        return;
    }
    WorkerPool::instance().run(units, workers, fn);
}

void parallel_ranges(int64_t count, int threads, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, count));
    parallel_units(parts, static_cast<int>(parts), [&](int64_t, int64_t part) {
        fn(count * part / parts, count * (part + 1) / parts);
    });
}

void use_single_threaded_blas() { NM_BLAS_SET_THREADS(1); }

}  // namespace detail
}  // namespace neuralmerge
