// Rotary position embedding (RoPE) on query/key rows, in either pairing convention.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvattn/config/errors.hpp"

namespace kvattn {

/// Which dimensions RoPE rotates together.
enum class rope_style {
  half,         ///< pairs (i, i + r/2): Hugging Face Llama / GPT-NeoX
  interleaved,  ///< pairs (2i, 2i + 1): GPT-J, Meta's original Llama
};

struct RopeConfig {
  bool enabled = true;
  double base = 10000.0;
  int rotary_dims = 0;  ///< leading dims rotated; 0 means all of d. Must be even and <= d.
  rope_style style = rope_style::half;

  /// Rotary dims for head dim d (validated).
  int dims_for(int d) const {
    const int r = rotary_dims == 0 ? d : rotary_dims;
    if (r < 2 || r > d || r % 2 != 0)
      detail::fail<config_error>("RoPE rotary dims must be even and in [2, ", d, "], got ", r);
    if (!(base > 1.0)) detail::fail<config_error>("RoPE base must be > 1, got ", base);
    return r;
  }
};

/// Rotates x [n_tokens][heads][d] (token stride in floats) in place; token t is at positions[t].
/// Angles are computed in double: positions reach 1e5+, where f32 angles lose several digits.
inline void apply_rope(const RopeConfig& cfg, float* x, std::int64_t n_tokens, int heads, int d,
                       std::int64_t token_stride, const std::int64_t* positions) {
  if (!cfg.enabled) return;
  const int r = cfg.dims_for(d);
  const int half = r / 2;
  for (std::int64_t t = 0; t < n_tokens; ++t) {
    for (int i = 0; i < half; ++i) {
      const double angle = static_cast<double>(positions[t]) * std::pow(cfg.base, -2.0 * i / r);
      const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
      const int a = cfg.style == rope_style::half ? i : 2 * i;
      const int b = cfg.style == rope_style::half ? i + half : 2 * i + 1;
      for (int h = 0; h < heads; ++h) {
        float* row = x + t * token_stride + std::int64_t{h} * d;
        const float x0 = row[a], x1 = row[b];
        row[a] = x0 * c - x1 * s;
        row[b] = x0 * s + x1 * c;
      }
    }
  }
}

}  // namespace kvattn
