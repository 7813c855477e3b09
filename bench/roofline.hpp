// Machine limits measured in-process, so a kernel's time can be compared with the fastest it could
// possibly be: floor = max(time to stream its bytes, its FLOPs at peak rate). The benchmarks time
// the stream on the kernel's own K/V bytes, alternating with the kernel (bench_decode.cpp). Both
// probes are the library's own (kvattn/kernels/dispatch.hpp) and run on the ISA path the kernels
// use (active_isa(), e.g. AVX-512 through target attributes even in a build without -march flags),
// so the floor is that of the code actually measured. KVATTN_ISA=scalar|avx2|avx512 switches both.
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <span>
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

/// One streaming read of the float ranges `parts` by `threads` threads (16 pieces per thread per
/// range, dynamically scheduled like the kernels' work), in seconds.
inline double stream_read_seconds(std::span<const std::span<const float>> parts, int threads) {
  const std::int64_t pieces = std::int64_t{threads} * 16;
  std::vector<float> sums(static_cast<std::size_t>(threads));
  const auto t0 = std::chrono::steady_clock::now();
  kvattn::kernels::parallel_for(static_cast<std::int64_t>(parts.size()) * pieces, threads, [&](std::int64_t i, int t) {
    const std::span<const float> part = parts[static_cast<std::size_t>(i / pieces)];
    const auto n = static_cast<std::int64_t>(part.size());
    const std::int64_t chunk = (n / pieces + 15) / 16 * 16;  // whole cache lines
    const std::int64_t begin = std::min(n, i % pieces * chunk), end = i % pieces + 1 == pieces ? n : std::min(n, begin + chunk);
    sums[static_cast<std::size_t>(t)] += kvattn::kernels::stream_sum(part.data() + begin, end - begin);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  benchmark::DoNotOptimize(sums.data());
  return s;
}

}  // namespace kvattn_bench
