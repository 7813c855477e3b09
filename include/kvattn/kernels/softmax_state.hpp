// The online-softmax state of one query row: running max, running sum and (in a caller's buffer)
// the unnormalized output. Mergeable, so split-K chunks, chunked prefill and shared prefixes all
// combine partial results the same way.
#pragma once

#include <cmath>
#include <limits>

namespace kvattn::kernels {

struct SoftmaxState {
  float max = -std::numeric_limits<float>::infinity();  ///< largest logit seen (-inf: nothing seen)
  float sum = 0.f;                                      ///< sum of exp(logit - max)

  bool empty() const { return sum == 0.f; }

  /// Folds `other` (with unnormalized output other_acc) into this state (with acc). Either may be empty.
  void merge(float* acc, const SoftmaxState& other, const float* other_acc, int d) {
    if (other.empty()) return;
    if (empty()) {
      *this = other;
      for (int i = 0; i < d; ++i) acc[i] = other_acc[i];
      return;
    }
    const float m = std::fmax(max, other.max);
    const float a = std::exp(max - m), b = std::exp(other.max - m);
    for (int i = 0; i < d; ++i) acc[i] = acc[i] * a + other_acc[i] * b;
    sum = sum * a + other.sum * b;
    max = m;
  }

  /// Writes the normalized output. A row that saw no key (all masked or empty) outputs zeros.
  void finalize(const float* acc, float* out, int d) const {
    const float inv = empty() ? 0.f : 1.f / sum;
    for (int i = 0; i < d; ++i) out[i] = acc[i] * inv;
  }

  /// Log-sum-exp of the logits seen (-inf when empty): what engines exchange to merge partial outputs.
  float lse() const { return empty() ? -std::numeric_limits<float>::infinity() : max + std::log(sum); }
};

}  // namespace kvattn::kernels
