// Helpers shared by the benchmark binaries.
#pragma once

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

/// Median wall time of `reps` calls of fn(), in seconds: robust to one-off interruptions.
template <class Fn>
double median_seconds(int reps, Fn&& fn) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
  return t[static_cast<std::size_t>(reps / 2)];
}

}  // namespace kvattn_bench
