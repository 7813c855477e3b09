// KV storage types: the element type of the cache, separate from the f32 compute type.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvattn/config/errors.hpp"

namespace kvattn {

/// Element type of cached K/V. Activations and accumulation are always f32.
enum class kv_dtype : std::uint8_t { f32, f16, bf16 };

/// What arithmetic attention may use on stored K/V (as oneDNN's fpmath_mode: a permission, not a
/// requirement). `strict`: f32 products and sums. `bf16`: in calls with one query token per sequence
/// (decode) with bf16 storage, GQA groups of 2, 4 or 8 and head dims a multiple of 32, on CPUs with
/// AVX512_BF16, the kernel rounds the scaled queries and the softmax weights to bf16 (nearest even,
/// relative error up to 2^-8) and multiplies them with K and V as bf16 pairs (vdpbf16ps: exact
/// products, f32 sums), as GPU flash attention rounds P and ggml rounds Q to the cache's type: twice
/// the multiply rate, but each logit moves by up to 2^-8 x scale x sum_c |q_c k_c|, and the output by
/// up to 2^-8 / (1 - 2^-8) x max|v - c| (any c) from the mean those logits give. Every other case
/// computes as `strict` does, bit for bit.
enum class fpmath_mode : std::uint8_t { strict, bf16 };

/// Bytes per stored element.
constexpr std::int64_t dtype_bytes(kv_dtype t) { return t == kv_dtype::f32 ? 4 : 2; }

constexpr std::string_view dtype_name(kv_dtype t) {
  switch (t) {
    case kv_dtype::f32: return "f32";
    case kv_dtype::f16: return "f16";
    case kv_dtype::bf16: return "bf16";
  }
  return "?";
}

/// Maps a dtype to its C++ element type. Eigen's half and bfloat16 round to nearest even on store.
template <kv_dtype T>
struct storage;

template <>
struct storage<kv_dtype::f32> {
  using type = float;
  static float load(type x) { return x; }
  static type store(float x) { return x; }
};

template <>
struct storage<kv_dtype::f16> {
  using type = Eigen::half;
  static float load(type x) { return static_cast<float>(x); }
  static type store(float x) { return type(x); }
};

template <>
struct storage<kv_dtype::bf16> {
  using type = Eigen::bfloat16;
  static float load(type x) { return static_cast<float>(x); }
  static type store(float x) { return type(x); }
};

/// Calls fn(std::integral_constant<kv_dtype, T>{}) for the runtime dtype t: the one place
/// that turns the runtime storage type into a template argument.
template <class Fn>
decltype(auto) visit_dtype(kv_dtype t, Fn&& fn) {
  switch (t) {
    case kv_dtype::f32: return fn(std::integral_constant<kv_dtype, kv_dtype::f32>{});
    case kv_dtype::f16: return fn(std::integral_constant<kv_dtype, kv_dtype::f16>{});
    case kv_dtype::bf16: return fn(std::integral_constant<kv_dtype, kv_dtype::bf16>{});
  }
  detail::fail<config_error>("unknown kv_dtype value ", static_cast<int>(t));
}

/// Rounds f32 to the stored type and back: what the cache will return for x.
inline float round_to_dtype(float x, kv_dtype t) {
  return visit_dtype(t, [x](auto tag) {
    using S = storage<decltype(tag)::value>;
    return S::load(S::store(x));
  });
}

}  // namespace kvattn
