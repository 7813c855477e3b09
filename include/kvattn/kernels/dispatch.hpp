// Runtime-to-template dispatch: (ISA path, storage type, group size, head dim) -> tile kernel.
// Every ISA's kernels are instantiated here, each under its own target attribute; the CPU check in
// simd/cpu.hpp picks one at run time.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>

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

using TileFn = decltype(TileKernel::run);

constexpr int index_of(const std::array<int, 5>& values, int v) {
  for (std::size_t i = 0; i < values.size(); ++i)
    if (values[i] == v) return static_cast<int>(i);
  return -1;
}

/// A SIMD path's kernel for a compile-time shape (G, D: values or `dynamic`); nullptr on the
/// scalar path, which select_tile_kernel handles itself.
template <kv_dtype T, int G, int D>
TileFn simd_path_kernel(isa path, [[maybe_unused]] bool bf16_dot) {
  switch (path) {
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx512:
      if constexpr (T == kv_dtype::bf16)
        if (bf16_dot) return &avx512::attend_tile_typed<G, D, T, true>;
      return &avx512::attend_tile_typed<G, D, T>;
    case isa::avx2: return &avx2::attend_tile_typed<G, D, T>;
#endif
#if defined(KVATTN_ARCH_AARCH64)
    case isa::neon: return &neon::attend_tile_typed<G, D, T>;
#endif
    default: return nullptr;
  }
}

/// A SIMD path's row converter for storage type T; nullptr on the scalar path.
template <kv_dtype T>
TileLoader simd_path_loader(isa path) {
  switch (path) {
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx512: return &avx512::load_rows<T>;
    case isa::avx2: return &avx2::load_rows<T>;
#endif
#if defined(KVATTN_ARCH_AARCH64)
    case isa::neon: return &neon::load_rows<T>;
#endif
    default: return nullptr;
  }
}

/// The table is compiled in parts, one per head dim (every storage type, group size and path), so
/// that a build with KVATTN_SEPARATE_KERNELS can compile them in parallel (src/kernels.cpp). By head
/// dim because kernels of different head dims share no code; storage types and group sizes share
/// their buffered and row-block kernels, which parts of their own would each compile again.
inline constexpr int table_parts = 6;  // specialized_head_dims, then `dynamic`

/// One part of the table: the kernel of head-dim index Part, storage type `dtype`, group index g
/// (into specialized_groups, 5 meaning `dynamic`) for a path.
template <int Part>
TileFn table_part(kv_dtype dtype, isa path, bool bf16_dot, int g) {
  constexpr auto value_at = [](const std::array<int, 5>& values, std::size_t i) { return i < 5 ? values[i] : dynamic; };
  return visit_dtype(dtype, [&](auto tag) {
    return [&]<std::size_t... G>(std::index_sequence<G...>) {
      TileFn fn = nullptr;
      ((std::size_t(g) == G ? void(fn = simd_path_kernel<decltype(tag)::value, value_at(specialized_groups, G),
                                                         value_at(specialized_head_dims, Part)>(path, bf16_dot))
                            : void()),
       ...);
      return fn;
    }(std::make_index_sequence<6>{});
  });
}

/// The SIMD kernel for a runtime shape, from the table of every specialized group and head dim
/// (plus the generic kernel) of a storage type's paths. A template, so that only translation units
/// that select kernels compile it.
template <kv_dtype T>
TileFn table_kernel(isa path, bool bf16_dot, int group, int head_dim) {
  int g = index_of(specialized_groups, group), d = index_of(specialized_head_dims, head_dim);
  if (g < 0) g = 5;
  if (d < 0) d = 5;
  return [&]<int... P>(std::integer_sequence<int, P...>) {
    TileFn fn = nullptr;
    ((d == P ? void(fn = table_part<P>(T, path, bf16_dot, g)) : void()), ...);
    return fn;
  }(std::make_integer_sequence<int, table_parts>{});
}

}  // namespace detail

/// Every part of the kernel table, as X(part index).
#define KVATTN_KERNEL_TABLE_PARTS(X) X(0) X(1) X(2) X(3) X(4) X(5)
static_assert(detail::table_parts == 6, "KVATTN_KERNEL_TABLE_PARTS lists 6 parts");

/// The kernel table of every path and storage type (about 250 kernels) is the bulk of kvattn's
/// compile time: ~90-140 s per translation unit that runs attention, with GCC 12 -O3. Header-only
/// (the default), each such translation unit compiles it. With KVATTN_SEPARATE_KERNELS defined for
/// the whole program, the declarations below keep them from it, and src/kernels.cpp compiles the
/// parts (CMake: link `kvattn::kernels`, which compiles each part as its own object).
#if defined(KVATTN_SEPARATE_KERNELS)
inline constexpr bool separate_kernels = true;
#define KVATTN_DECLARE_TABLE_PART(part) extern template detail::TileFn detail::table_part<part>(kv_dtype, isa, bool, int);
KVATTN_KERNEL_TABLE_PARTS(KVATTN_DECLARE_TABLE_PART)
#undef KVATTN_DECLARE_TABLE_PART
#else
inline constexpr bool separate_kernels = false;
#endif

/// Picks the tile kernel for an ISA path (by default the active one) and the arithmetic allowed
/// (fpmath_mode: bf16 products only for bf16 storage on the AVX-512 path of a CPU with AVX512_BF16).
/// StaticGroup/StaticDim (from a static HeadLayout) compile just that shape here, unless the
/// separately compiled table holds it; otherwise the runtime shape picks a table entry. A path this
/// CPU cannot run throws config_error here, as it does in the probes below, rather than fault later.
template <int StaticGroup = dynamic, int StaticDim = dynamic>
TileKernel select_tile_kernel(kv_dtype dtype, int group, int head_dim, isa path = active_isa(),
                              fpmath_mode fpmath = fpmath_mode::strict) {
  kvattn::detail::require_supported(path, "select_tile_kernel: ");
  const bool bf16_dot = dtype == kv_dtype::bf16 && path == isa::avx512 && fpmath == fpmath_mode::bf16 && cpu_supports_bf16_dot();
  return visit_dtype(dtype, [&](auto tag) -> TileKernel {
    constexpr kv_dtype T = decltype(tag)::value;
    const TileLoader load = detail::simd_path_loader<T>(path);
    if (!load) return {&attend_tile_portable<T, StaticGroup, StaticDim>, nullptr};
    constexpr bool in_table = detail::index_of(specialized_groups, StaticGroup) >= 0 &&
                              detail::index_of(specialized_head_dims, StaticDim) >= 0;
    constexpr bool compile_here = StaticGroup != dynamic && StaticDim != dynamic && !(separate_kernels && in_table);
    if constexpr (compile_here)
      return {detail::simd_path_kernel<T, StaticGroup, StaticDim>(path, bf16_dot), load};
    else
      return {detail::table_kernel<T>(path, bf16_dot, group, head_dim), load};
  });
}

/// Bandwidth probe: sums n floats on the active path (a streaming read; benchmarks' floor), with
/// software prefetches (read_prefetch) or none (which read is fastest depends on the CPU and the
/// hour).
inline float stream_sum(const float* x, std::int64_t n, isa path = active_isa(), read_prefetch prefetch = read_prefetch::l1) {
  kvattn::detail::require_supported(path, "stream_sum: ");
  switch (path) {
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx512: return avx512::stream_sum(x, n, prefetch);
    case isa::avx2: return avx2::stream_sum(x, n, prefetch);
#endif
#if defined(KVATTN_ARCH_AARCH64)
    case isa::neon: return neon::stream_sum(x, n, prefetch);
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

/// Overlap probe: stream_sum's read of n stored elements (f32, or f16 / bf16 converted as the
/// direct kernel converts them for `fmas` rows) with `fmas` FMAs (1 to 16) on every converted vector (see
/// stream_fma_fixed); benchmarks compare it with the same work in L2. Returns fmas * 0.999999 *
/// sum(x) up to rounding.
template <class T>
float stream_fma(const T* x, std::int64_t n, int fmas, isa path = active_isa()) {
  if (fmas < 1 || fmas > 16) kvattn::detail::fail<config_error>("stream_fma: FMAs per vector must be in [1, 16], got ", fmas);
  kvattn::detail::require_supported(path, "stream_fma: ");
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
        for (int f = 0; f < fmas; ++f) a[(i + f) % 8] += static_cast<float>(x[i]) * 0.999999f;
      return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
    }
  }
}

/// y = 2^x with the vectorized exp of a path (the scalar path uses std::exp2).
inline void exp2_array(const float* x, float* y, std::int64_t n, isa path = active_isa()) {
  kvattn::detail::require_supported(path, "exp2_array: ");
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
  kvattn::detail::require_supported(path, "fma_peak_flops: ");
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
