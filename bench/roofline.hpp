// Machine limits measured in-process, so a kernel's time can be compared with the fastest this
// build could possibly be: floor = max(time to stream its bytes, its FLOPs at peak rate).
// Both probes are plain C++ compiled with the same flags as the kernels (no -march), so they
// measure what the default-flag compiler can do, not the CPU's datasheet numbers.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "common.hpp"
#include "kvattn/kernels/parallel.hpp"

namespace kvattn_bench {

namespace detail {

/// Sum of n words with 16 independent accumulators: no loop-carried latency chain, so the loop is
/// limited by loads (bandwidth), not by add latency.
inline std::uint64_t sum_words(const std::uint64_t* p, std::int64_t n) {
  std::uint64_t acc[16] = {};
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
  for (; i < n; ++i) acc[0] += p[i];
  std::uint64_t s = 0;
  for (std::uint64_t a : acc) s += a;
  return s;
}

/// `iters` rounds of x = x * a + b on N independent floats. N is small enough to stay in
/// registers and large enough to hide the multiply and add latencies.
template <int N>
[[gnu::noinline]] float madd_chains(std::int64_t iters, float a, float b) {
  float x[N];
  for (int j = 0; j < N; ++j) x[j] = 1.f + 0.01f * static_cast<float>(j);
  for (std::int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < N; ++j) x[j] = x[j] * a + b;
  float s = 0.f;
  for (float v : x) s += v;
  return s;
}

/// Peak of madd_chains<N> on `threads` threads (each running its own copy), GFLOP/s.
template <int N>
double madd_gflops(int threads) {
  constexpr std::int64_t iters = std::int64_t{1} << 21;
  const float a = 0.999999f, b = 1e-6f;  // x stays near 1: no overflow, no denormals
  const double s = median_seconds(5, [&] {
    kvattn::kernels::parallel_for(threads, threads, [&](std::int64_t, int) {
      benchmark::DoNotOptimize(madd_chains<N>(iters, a, b));
    });
  });
  return 2.0 * N * static_cast<double>(iters) * threads / s * 1e-9;
}

}  // namespace detail

/// Peak f32 multiply-add rate of `threads` threads in GFLOP/s, measured once per thread count.
/// The max over two chain counts: which one the compiler keeps fully in registers varies between
/// g++ and clang++ (a spilled variant runs 2-6x slower).
inline double peak_gflops(int threads) {
  static std::map<int, double> memo;
  auto it = memo.find(threads);
  if (it == memo.end())
    it = memo.emplace(threads, std::max(detail::madd_gflops<48>(threads), detail::madd_gflops<56>(threads))).first;
  return it->second;
}

/// Seconds `threads` threads take to read `bytes` bytes (median of several runs), measured once per
/// (bytes, threads). Like the kernel it is compared with, it reads the same buffer over and over,
/// so small sizes run from cache. Past the last-level cache bandwidth no longer depends on size,
/// so at most 1 GiB is allocated and the time is scaled to `bytes`.
inline double stream_seconds(std::int64_t bytes, int threads) {
  static std::map<std::pair<std::int64_t, int>, double> memo;
  const auto key = std::make_pair(bytes, threads);
  if (auto it = memo.find(key); it != memo.end()) return it->second;

  const std::int64_t words = std::max<std::int64_t>(16, std::min(bytes, GiB) / 8);
  const std::vector<std::uint64_t> buf(static_cast<std::size_t>(words), 1);  // written: pages are real
  const std::int64_t chunks = std::int64_t{threads} * 16;
  const std::int64_t chunk = (words + chunks - 1) / chunks;
  // Enough passes that one measurement takes milliseconds, not microseconds.
  const std::int64_t passes = std::max<std::int64_t>(1, (256 << 20) / (words * 8));
  std::vector<std::uint64_t> sums(static_cast<std::size_t>(threads));
  const double s = median_seconds(7, [&] {
    for (std::int64_t p = 0; p < passes; ++p)
      kvattn::kernels::parallel_for(chunks, threads, [&](std::int64_t c, int t) {
        const std::int64_t begin = std::min(words, c * chunk);
        sums[static_cast<std::size_t>(t)] += detail::sum_words(buf.data() + begin, std::min(words, begin + chunk) - begin);
      });
    benchmark::DoNotOptimize(sums.data());
  });
  const double per_byte = s / static_cast<double>(passes) / static_cast<double>(words * 8);
  return memo.emplace(key, per_byte * static_cast<double>(bytes)).first->second;
}

}  // namespace kvattn_bench
