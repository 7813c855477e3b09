// Thread count control and the one parallel loop the kernels use. OpenMP is optional: without it
// everything runs on the calling thread, with identical results.
#pragma once

#include <Eigen/Core>
#include <atomic>
#include <cstdint>

#include "kvattn/config/errors.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kvattn {

namespace detail {
inline std::atomic<int>& global_threads() {
  static std::atomic<int> n{0};
  return n;
}
}  // namespace detail

/// Threads the hardware/OpenMP runtime offers (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// The most threads a call may ask for: each thread takes its own scratch, and a call starts as
/// many as it has work items up to the count asked for, so an unbounded count could ask the
/// runtime for thousands of threads.
inline constexpr int max_thread_count = 1024;

namespace detail {
inline void check_thread_count(int n, const char* what) {
  if (n < 0 || n > max_thread_count)
    fail<config_error>(what, ": thread count must be in [0, ", max_thread_count, "], got ", n);
}
}  // namespace detail

/// Sets the default thread count of kvattn calls (0: OpenMP's default), including the Eigen GEMMs
/// of the layer operators (Eigen::setNbThreads). Attention results never depend on it.
inline void set_num_threads(int n) {
  detail::check_thread_count(n, "set_num_threads");
  detail::global_threads() = n;
  Eigen::setNbThreads(n);  // 0 restores Eigen's default
}

/// The thread count a call with `requested` threads (0: the global default) will use.
inline int resolve_threads(int requested) {
  int n = requested > 0 ? requested : detail::global_threads().load();
  if (n <= 0) n = std::min(max_threads(), max_thread_count);  // OMP_NUM_THREADS may ask for more
#if !defined(_OPENMP)
  n = 1;
#endif
  return n;
}

namespace kernels {

/// Runs body(item, next, thread) for item in [0, n) on `threads` threads, dynamically scheduled,
/// where `next` is the item the same thread will run after this one, or -1 when not yet known: a
/// thread claims its next item before running the current one (while more items remain than
/// threads, so the last ones still go to whichever thread is free first), and a kernel can fetch
/// the next item's first data while it works. Work items must be independent: results then do not
/// depend on the schedule.
template <class Body>
void parallel_for_lookahead(std::int64_t n, int threads, Body&& body) {
#if defined(_OPENMP)
  if (threads > 1 && n > 1) {
    std::atomic<std::int64_t> claimed{0};
#pragma omp parallel num_threads(threads)
    {
      // The team may be smaller than asked (nested regions, OMP_DYNAMIC, OMP_THREAD_LIMIT): every
      // item, the first ones too, is claimed from the shared counter.
      const int thread = omp_get_thread_num(), team = omp_get_num_threads();
      std::int64_t item = claimed.fetch_add(1, std::memory_order_relaxed);
      while (item < n) {
        std::int64_t next = -1;
        if (claimed.load(std::memory_order_relaxed) + team <= n) next = claimed.fetch_add(1, std::memory_order_relaxed);
        body(item, next < n ? next : -1, thread);
        item = next >= 0 ? next : claimed.fetch_add(1, std::memory_order_relaxed);
      }
    }
    return;
  }
#else
  (void)threads;
#endif
  for (std::int64_t i = 0; i < n; ++i) body(i, i + 1 < n ? i + 1 : -1, 0);
}

/// Runs body(item, thread) for item in [0, n) on `threads` threads, dynamically scheduled.
/// Work items must be independent: results then do not depend on the schedule.
template <class Body>
void parallel_for(std::int64_t n, int threads, Body&& body) {
  parallel_for_lookahead(n, threads, [&](std::int64_t item, std::int64_t, int thread) { body(item, thread); });
}

}  // namespace kernels
}  // namespace kvattn
