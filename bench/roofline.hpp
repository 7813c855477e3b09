// Machine limits measured in-process, so a kernel's time can be compared with the fastest it could
// possibly be: floor = max(time to stream its bytes, its FLOPs at peak rate). Both probes are the
// library's own (kvattn/kernels/dispatch.hpp) and run on the ISA path the kernels use
// (active_isa(), e.g. AVX-512 through target attributes even in a build without -march flags), so
// the floor is that of the code actually measured. KVATTN_ISA=scalar|avx2|avx512 switches both.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "common.hpp"
#include "kvattn/kernels/dispatch.hpp"
#include "kvattn/kernels/parallel.hpp"

namespace kvattn_bench {

/// Peak f32 FMA rate of `threads` threads in GFLOP/s (each thread runs its own register-resident
/// FMA chains), measured once per thread count and ISA path. Many ~1 ms runs, best kept: on a shared machine
/// some run of all threads soon fits between other processes' time slices.
inline double peak_gflops(int threads) {
  // Per ISA path too: benchmarks force paths (Roofline/...), and each path has its own peak.
  static std::map<std::pair<int, kvattn::isa>, double> memo;
  const auto key = std::make_pair(threads, kvattn::active_isa());
  if (auto it = memo.find(key); it != memo.end()) return it->second;
  constexpr std::int64_t iterations = std::int64_t{1} << 18;
  double flops = 0;
  const double s = best_seconds(25, [&] {
    kvattn::kernels::parallel_for(threads, threads, [&](std::int64_t, int t) {
      float sink = static_cast<float>(t);
      const double f = kvattn::kernels::fma_peak_flops(iterations, sink);
      if (t == 0) flops = f;
      benchmark::DoNotOptimize(sink);
    });
  });
  return memo.emplace(key, flops * threads / s * 1e-9).first->second;
}

/// Seconds `threads` threads take to read `bytes` bytes (best of many short runs), measured once per ISA path and
/// per (bytes, threads). Like the kernel it is compared with, it reads the same buffer over and
/// over, so small sizes run from cache. Past the last-level cache, bandwidth no longer depends on
/// size, so at most 256 MiB (past common last-level caches) is read and the time is scaled to `bytes`.
inline double stream_seconds(std::int64_t bytes, int threads) {
  static std::map<std::tuple<std::int64_t, int, kvattn::isa>, double> memo;
  const auto key = std::make_tuple(bytes, threads, kvattn::active_isa());
  if (auto it = memo.find(key); it != memo.end()) return it->second;

  const std::int64_t n = std::max<std::int64_t>(64, std::min<std::int64_t>(bytes, 256 << 20) / 4);  // floats
  const std::vector<float> buf(static_cast<std::size_t>(n), 1.f);  // written, so the pages are real
  const std::int64_t chunks = std::int64_t{threads} * 16;
  const std::int64_t chunk = (n / chunks + 63) / 64 * 64;  // whole cache lines per chunk
  // Enough passes that one run reads >= 64 MiB: long enough to time, short enough to often run undisturbed.
  const std::int64_t passes = std::max<std::int64_t>(1, (64 << 20) / (n * 4));
  std::vector<float> sums(static_cast<std::size_t>(threads));
  const double s = best_seconds(15, [&] {
    for (std::int64_t p = 0; p < passes; ++p)
      kvattn::kernels::parallel_for(chunks, threads, [&](std::int64_t c, int t) {
        const std::int64_t begin = std::min(n, c * chunk), end = c + 1 == chunks ? n : std::min(n, begin + chunk);
        sums[static_cast<std::size_t>(t)] += kvattn::kernels::stream_sum(buf.data() + begin, end - begin);
      });
    benchmark::DoNotOptimize(sums.data());
  });
  const double per_byte = s / static_cast<double>(passes) / static_cast<double>(n * 4);
  return memo.emplace(key, per_byte * static_cast<double>(bytes)).first->second;
}

}  // namespace kvattn_bench
