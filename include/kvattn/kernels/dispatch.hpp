// Runtime-to-template dispatch: (ISA path, storage type, group size, head dim) -> tile kernel.
// Every ISA's kernels are instantiated here, each under its own target attribute; the CPU check in
// simd/cpu.hpp picks one at run time.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "kvattn/kernels/attend_portable.hpp"
#include "kvattn/simd/vec.hpp"

#if defined(KVATTN_ARCH_X86_64)
// GCC 12 flags the _mm512_undefined_* placeholders inside its own intrinsics as uninitialized once
// they are inlined here (GCC bug 105593); the warning is about GCC's headers, not this code.
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace kvattn::kernels::avx512 {
using V = simd::avx512::V;
#define KVATTN_TARGET KVATTN_TARGET_AVX512
#include "kvattn/kernels/attend_simd-inl.hpp"
#undef KVATTN_TARGET
}  // namespace kvattn::kernels::avx512

namespace kvattn::kernels::avx2 {
using V = simd::avx2::V;
#define KVATTN_TARGET KVATTN_TARGET_AVX2
#include "kvattn/kernels/attend_simd-inl.hpp"
#undef KVATTN_TARGET
}  // namespace kvattn::kernels::avx2
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#if defined(KVATTN_ARCH_AARCH64)
namespace kvattn::kernels::neon {
using V = simd::neon::V;
#define KVATTN_TARGET
#include "kvattn/kernels/attend_simd-inl.hpp"
#undef KVATTN_TARGET
}  // namespace kvattn::kernels::neon
#endif

namespace kvattn::kernels {

/// Group sizes and head dims with compile-time specialized kernels; other shapes take the generic
/// (runtime-shaped, still vectorized) kernel.
inline constexpr std::array<int, 5> specialized_groups{1, 2, 4, 8, 16};
inline constexpr std::array<int, 5> specialized_head_dims{64, 80, 96, 128, 256};

namespace detail {

constexpr int index_of(const std::array<int, 5>& values, int v) {
  for (std::size_t i = 0; i < values.size(); ++i)
    if (values[i] == v) return static_cast<int>(i);
  return -1;
}

/// Table [group index 0..5 (5: dynamic)][head-dim index 0..5 (5: dynamic)] of one ISA's kernels
/// for one storage type.
template <template <int, int, kv_dtype> class Entry, kv_dtype Dtype>
struct KernelTable {
  using Fn = void (*)(const AttendTile&, float*);
  static constexpr int n = 6;
  template <std::size_t I>
  static constexpr int value_at(const std::array<int, 5>& values) {
    if constexpr (I < 5) return values[I]; else return dynamic;
  }
  template <std::size_t... I>
  static constexpr std::array<Fn, n * n> build(std::index_sequence<I...>) {
    return {Entry<value_at<I / n>(specialized_groups), value_at<I % n>(specialized_head_dims), Dtype>::fn...};
  }
  static constexpr std::array<Fn, n * n> table = build(std::make_index_sequence<n * n>{});
  static Fn lookup(int group, int head_dim) {
    int g = index_of(specialized_groups, group), d = index_of(specialized_head_dims, head_dim);
    if (g < 0) g = n - 1;
    if (d < 0) d = n - 1;
    return table[static_cast<std::size_t>(g * n + d)];
  }
};

#if defined(KVATTN_ARCH_X86_64)
template <int G, int D, kv_dtype T> struct Avx512Entry { static constexpr auto fn = &avx512::attend_tile_typed<G, D, T>; };
template <int G, int D, kv_dtype T> struct Avx512Bf16DotEntry { static constexpr auto fn = &avx512::attend_tile_typed<G, D, T, true>; };
template <int G, int D, kv_dtype T> struct Avx2Entry { static constexpr auto fn = &avx2::attend_tile_typed<G, D, T>; };
#endif
#if defined(KVATTN_ARCH_AARCH64)
template <int G, int D, kv_dtype T> struct NeonEntry { static constexpr auto fn = &neon::attend_tile_typed<G, D, T>; };
#endif

/// The tile kernel for a path, a storage type and a shape. StaticGroup/StaticDim (from a static
/// HeadLayout) instantiate exactly that shape; otherwise the runtime shape picks a specialization.
template <template <int, int, kv_dtype> class Entry, kv_dtype Dtype, int StaticGroup, int StaticDim, class LoadRows>
TileKernel simd_kernel(int group, int head_dim, LoadRows load_rows) {
  if constexpr (StaticGroup != dynamic && StaticDim != dynamic)
    return {Entry<StaticGroup, StaticDim, Dtype>::fn, load_rows};
  else
    return {KernelTable<Entry, Dtype>::lookup(group, head_dim), load_rows};
}

}  // namespace detail

/// Picks the tile kernel for an ISA path (by default the active one) and the arithmetic allowed
/// (fpmath_mode: bf16 products only for bf16 storage on the AVX-512 path of a CPU with AVX512_BF16).
template <int StaticGroup = dynamic, int StaticDim = dynamic>
TileKernel select_tile_kernel(kv_dtype dtype, int group, int head_dim, isa path = active_isa(),
                              [[maybe_unused]] fpmath_mode fpmath = fpmath_mode::strict) {  // (x86 only)
  return visit_dtype(dtype, [&](auto tag) -> TileKernel {
    constexpr kv_dtype T = decltype(tag)::value;
    switch (path) {
#if defined(KVATTN_ARCH_X86_64)
      case isa::avx512:
        if constexpr (T == kv_dtype::bf16)
          if (fpmath == fpmath_mode::bf16 && cpu_supports_bf16_dot())
            return detail::simd_kernel<detail::Avx512Bf16DotEntry, T, StaticGroup, StaticDim>(group, head_dim, &avx512::load_rows<T>);
        return detail::simd_kernel<detail::Avx512Entry, T, StaticGroup, StaticDim>(group, head_dim, &avx512::load_rows<T>);
      case isa::avx2:
        return detail::simd_kernel<detail::Avx2Entry, T, StaticGroup, StaticDim>(group, head_dim, &avx2::load_rows<T>);
#endif
#if defined(KVATTN_ARCH_AARCH64)
      case isa::neon:
        return detail::simd_kernel<detail::NeonEntry, T, StaticGroup, StaticDim>(group, head_dim, &neon::load_rows<T>);
#endif
      default:
        return {&attend_tile_portable<T, StaticGroup, StaticDim>, nullptr};
    }
  });
}

/// Bandwidth probe: sums n floats on the active path (a streaming read; benchmarks' floor), with
/// or without software prefetches (the faster of the two depends on the CPU).
inline float stream_sum(const float* x, std::int64_t n, isa path = active_isa(), bool software_prefetch = true) {
  switch (path) {
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx512: return software_prefetch ? avx512::stream_sum<true>(x, n) : avx512::stream_sum<false>(x, n);
    case isa::avx2: return software_prefetch ? avx2::stream_sum<true>(x, n) : avx2::stream_sum<false>(x, n);
#endif
#if defined(KVATTN_ARCH_AARCH64)
    case isa::neon: return software_prefetch ? neon::stream_sum<true>(x, n) : neon::stream_sum<false>(x, n);
#endif
    default: {
      float a[8] = {};
      std::int64_t i = 0;
      for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) a[k] += x[i + k];
      for (; i < n; ++i) a[0] += x[i];
      return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
    }
  }
}

/// Overlap probe: stream_sum's read with `fmas` FMAs (1 to 16) on every loaded vector (see
/// stream_fma_fixed); benchmarks compare it with the same work in L2. Returns fmas * 0.999999 *
/// sum(x) up to rounding.
inline float stream_fma(const float* x, std::int64_t n, int fmas, isa path = active_isa()) {
  if (fmas < 1 || fmas > 16) kvattn::detail::fail<config_error>("stream_fma: FMAs per vector must be in [1, 16], got ", fmas);
  switch (path) {
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx512: return avx512::stream_fma(x, n, fmas);
    case isa::avx2: return avx2::stream_fma(x, n, fmas);
#endif
#if defined(KVATTN_ARCH_AARCH64)
    case isa::neon: return neon::stream_fma(x, n, fmas);
#endif
    default: {
      float a[8] = {};
      for (std::int64_t i = 0; i < n; ++i)
        for (int f = 0; f < fmas; ++f) a[(i + f) % 8] += x[i] * 0.999999f;
      return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
    }
  }
}

/// y = 2^x with the vectorized exp of a path (the scalar path uses std::exp2).
inline void exp2_array(const float* x, float* y, std::int64_t n, isa path = active_isa()) {
  switch (path) {
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx512: return avx512::exp2_array(x, y, n);
    case isa::avx2: return avx2::exp2_array(x, y, n);
#endif
#if defined(KVATTN_ARCH_AARCH64)
    case isa::neon: return neon::exp2_array(x, y, n);
#endif
    default:
      for (std::int64_t i = 0; i < n; ++i) y[i] = std::exp2(x[i]);
  }
}

/// Compute probe: iterations x (registers / 2) independent FMA vectors on the active path. Returns
/// the FLOPs done (2 x lanes x chains x iterations); `sink` receives a value depending on the work.
inline double fma_peak_flops(std::int64_t iterations, float& sink, isa path = active_isa()) {
  switch (path) {
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx512: sink = avx512::fma_peak_loop(iterations, sink); return 2.0 * 16 * avx512::fma_peak_chains * double(iterations);
    case isa::avx2: sink = avx2::fma_peak_loop(iterations, sink); return 2.0 * 8 * avx2::fma_peak_chains * double(iterations);
#endif
#if defined(KVATTN_ARCH_AARCH64)
    case isa::neon: sink = neon::fma_peak_loop(iterations, sink); return 2.0 * 4 * neon::fma_peak_chains * double(iterations);
#endif
    default: {
      float acc[16];
      for (int k = 0; k < 16; ++k) acc[k] = sink + float(k);
      for (std::int64_t i = 0; i < iterations; ++i)
        for (int k = 0; k < 16; ++k) acc[k] = acc[k] * 0.999999f + 1e-7f;  // as the scalar kernel computes
      for (int k = 0; k < 16; ++k) sink += acc[k];
      return 2.0 * 16 * double(iterations);
    }
  }
}

}  // namespace kvattn::kernels
