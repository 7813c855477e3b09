// Helpers shared by the benchmark binaries.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

namespace kvattn_bench {

inline constexpr std::int64_t GiB = std::int64_t{1} << 30;

/// n values uniform in [-1, 1], reproducible from the seed. Real data rather than zeros, so type
/// conversions, dot products and exp() see typical inputs.
inline std::vector<float> random_floats(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

/// The benchmark loop: calls body() once per iteration and returns the wall seconds per iteration,
/// the same quantity as the reported "Time" (real time). Counters such as GB/s are computed from it:
/// plain numbers, unlike kIsRate counters, which divide by CPU time unless the benchmark uses
/// UseRealTime() (which would append "/real_time" to every name).
template <class Body>
double timed_loop(benchmark::State& state, Body&& body) {
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) body();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s / static_cast<double>(std::max<benchmark::IterationCount>(1, state.iterations()));
}

}  // namespace kvattn_bench
