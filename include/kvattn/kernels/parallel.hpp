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

/// Sets the default thread count of kvattn calls (0: OpenMP's default), including the Eigen GEMMs
/// of the layer operators (Eigen::setNbThreads). Attention results never depend on it.
inline void set_num_threads(int n) {
  if (n < 0) detail::fail<config_error>("thread count must be >= 0, got ", n);
  detail::global_threads() = n;
  Eigen::setNbThreads(n);  // 0 restores Eigen's default
}

/// The thread count a call with `requested` threads (0: the global default) will use.
inline int resolve_threads(int requested) {
  int n = requested > 0 ? requested : detail::global_threads().load();
  if (n <= 0) n = max_threads();
#if !defined(_OPENMP)
  n = 1;
#endif
  return n;
}

namespace kernels {

/// Runs body(item, thread) for item in [0, n) on `threads` threads, dynamically scheduled.
/// Work items must be independent: results then do not depend on the schedule.
template <class Body>
void parallel_for(std::int64_t n, int threads, Body&& body) {
#if defined(_OPENMP)
  if (threads > 1 && n > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (std::int64_t i = 0; i < n; ++i) body(i, omp_get_thread_num());
    return;
  }
#else
  (void)threads;
#endif
  for (std::int64_t i = 0; i < n; ++i) body(i, 0);
}

}  // namespace kernels
}  // namespace kvattn
