// Machine limits measured in-process, so a kernel's time can be compared with the fastest it could
// possibly be: floor = max(time to stream its bytes, time of its FLOPs at the peak FMA rate). The
// benchmarks time both probes alternating with the kernel (bench_decode.cpp): the stream on the
// kernel's own K/V bytes, the FMA loop on its FLOP count. Both probes are the library's own
// (kvattn/kernels/dispatch.hpp) and run on the ISA path the kernels use (active_isa(), e.g.
// AVX-512 through target attributes even in a build without -march flags), so the floor is that of
// the code actually measured. KVATTN_ISA=scalar|avx2|avx512 switches both.
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "kvattn/kernels/dispatch.hpp"
#include "kvattn/kernels/parallel.hpp"

namespace kvattn_bench {

/// Seconds `threads` threads take for `flops` FLOPs of register-resident FMA chains (each thread
/// its share), on the active ISA path: the compute floor of a kernel doing that many FLOPs. Timed
/// beside each kernel step like the stream (bench_decode's paired loop), because this machine's
/// clock moves with its neighbours' load: a peak measured once per process made compute-bound
/// ratios drift by 15% between runs (357 vs 423 GFLOP/s on 2 threads, an hour apart).
inline double fma_seconds(double flops, int threads) {
  float probe = 0;
  const double per_iteration = kvattn::kernels::fma_peak_flops(1, probe);  // FLOPs of one iteration
  const auto iterations = static_cast<std::int64_t>(std::ceil(flops / threads / per_iteration));
  std::vector<float> sinks(static_cast<std::size_t>(threads));
  const auto t0 = std::chrono::steady_clock::now();
  kvattn::kernels::parallel_for(threads, threads, [&](std::int64_t, int t) {
    float sink = static_cast<float>(t);
    kvattn::kernels::fma_peak_flops(iterations, sink);
    sinks[static_cast<std::size_t>(t)] = sink;
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  benchmark::DoNotOptimize(sinks.data());
  return s;
}

/// One streaming read of the ranges `parts` by `threads` threads (16 pieces per thread per range,
/// dynamically scheduled like the kernels' work), in seconds: of floats with `prefetch`'s software
/// prefetches; with `fmas` > 0, of stored elements (f32, f16 or bf16) with that many FMAs on every
/// converted vector (kvattn::kernels::stream_fma, the overlap probe, which prefetches as
/// read_prefetch::l1).
template <class T = float>
double stream_read_seconds(std::span<const std::span<const T>> parts, int threads, int fmas = 0,
                           kvattn::kernels::read_prefetch prefetch = kvattn::kernels::read_prefetch::l1) {
  // (Checked here: stream_fma's own refusal would be thrown inside the parallel loop.)
  if (!std::is_same_v<T, float> && fmas < 1) throw std::invalid_argument("stream_read_seconds: 16-bit reads need fmas >= 1");
  const std::int64_t pieces = std::int64_t{threads} * 16;
  std::vector<float> sums(static_cast<std::size_t>(threads));
  const auto t0 = std::chrono::steady_clock::now();
  kvattn::kernels::parallel_for(static_cast<std::int64_t>(parts.size()) * pieces, threads, [&](std::int64_t i, int t) {
    const std::span<const T> part = parts[static_cast<std::size_t>(i / pieces)];
    const auto n = static_cast<std::int64_t>(part.size());
    constexpr std::int64_t line = 64 / sizeof(T);
    const std::int64_t chunk = (n / pieces + line - 1) / line * line;  // whole cache lines
    const std::int64_t begin = std::min(n, i % pieces * chunk), end = i % pieces + 1 == pieces ? n : std::min(n, begin + chunk);
    float& sum = sums[static_cast<std::size_t>(t)];
    if constexpr (std::is_same_v<T, float>) {
      if (fmas == 0) return void(sum += kvattn::kernels::stream_sum(part.data() + begin, end - begin, kvattn::active_isa(), prefetch));
    }
    sum += kvattn::kernels::stream_fma(part.data() + begin, end - begin, fmas);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  benchmark::DoNotOptimize(sums.data());
  return s;
}

}  // namespace kvattn_bench
