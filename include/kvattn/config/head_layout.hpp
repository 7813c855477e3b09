// Head layout (query heads, KV heads, head dim): one type for MHA, GQA and MQA, with each count
// either a runtime value or a compile-time constant, like Eigen's fixed vs Dynamic sizes.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvattn/config/errors.hpp"

namespace kvattn {

/// Marks a head count or head dim that is known only at run time.
inline constexpr int dynamic = -1;

/// Smallest and largest supported head dim. Any value in between works (e.g. 46 and 90 from the
/// CLA paper); the common ones get specialized kernels.
inline constexpr int min_head_dim = 16;
inline constexpr int max_head_dim = 512;

enum class attention_kind { mha, gqa, mqa };

constexpr std::string_view kind_name(attention_kind k) {
  switch (k) {
    case attention_kind::mha: return "MHA";
    case attention_kind::gqa: return "GQA";
    case attention_kind::mqa: return "MQA";
  }
  return "?";
}

/// Query heads Hq, KV heads Hkv and head dim d. Hkv divides Hq; query head h reads KV head
/// h / (Hq / Hkv), i.e. contiguous groups, the convention of Hugging Face checkpoints and ggml,
/// so real weights load without permutation.
///
/// Template arguments fix a value at compile time (`dynamic` leaves it to the constructor):
/// `HeadLayout<32, 8, 128>` gives kernels specialized on group size 4 and head dim 128;
/// `HeadLayout<>` (alias `HeadShape`) holds three runtime values.
template <int QHeads = dynamic, int KvHeads = dynamic, int HeadDim = dynamic>
class HeadLayout {
 public:
  static constexpr int static_q_heads = QHeads;
  static constexpr int static_kv_heads = KvHeads;
  static constexpr int static_head_dim = HeadDim;
  /// Group size known at compile time, or `dynamic`.
  static constexpr int static_group_size =
      (QHeads != dynamic && KvHeads != dynamic && KvHeads > 0) ? QHeads / KvHeads : dynamic;

  /// Only for fully static layouts.
  constexpr HeadLayout()
    requires(QHeads != dynamic && KvHeads != dynamic && HeadDim != dynamic)
      : HeadLayout(QHeads, KvHeads, HeadDim) {}

  /// Validates and stores the layout; static template values must agree with the arguments.
  constexpr HeadLayout(int q_heads, int kv_heads, int head_dim) : hq_(q_heads), hkv_(kv_heads), d_(head_dim) {
    check_static("query heads", QHeads, q_heads);
    check_static("KV heads", KvHeads, kv_heads);
    check_static("head dim", HeadDim, head_dim);
    if (q_heads < 1) detail::fail<config_error>("query heads must be >= 1, got ", q_heads);
    if (kv_heads < 1) detail::fail<config_error>("KV heads must be >= 1, got ", kv_heads);
    if (q_heads % kv_heads != 0)
      detail::fail<config_error>("KV heads (", kv_heads, ") must divide query heads (", q_heads, ")");
    if (head_dim < min_head_dim || head_dim > max_head_dim)
      detail::fail<config_error>("head dim must be in [", min_head_dim, ", ", max_head_dim, "], got ", head_dim);
  }

  /// Converts between static and dynamic layouts (checked when the target has static values).
  template <int Q, int K, int D>
  constexpr HeadLayout(const HeadLayout<Q, K, D>& other)  // NOLINT(google-explicit-constructor)
      : HeadLayout(other.q_heads(), other.kv_heads(), other.head_dim()) {}

  constexpr int q_heads() const { return QHeads != dynamic ? QHeads : hq_; }
  constexpr int kv_heads() const { return KvHeads != dynamic ? KvHeads : hkv_; }
  constexpr int head_dim() const { return HeadDim != dynamic ? HeadDim : d_; }
  /// Query heads per KV head (Hq / Hkv).
  constexpr int group_size() const { return static_group_size != dynamic ? static_group_size : q_heads() / kv_heads(); }
  /// The KV head that query head q reads.
  constexpr int kv_head_of(int q_head) const { return q_head / group_size(); }

  /// MHA when Hkv == Hq, MQA when Hkv == 1 < Hq, GQA otherwise.
  constexpr attention_kind kind() const {
    if (kv_heads() == q_heads()) return attention_kind::mha;
    if (kv_heads() == 1) return attention_kind::mqa;
    return attention_kind::gqa;
  }

  template <int Q, int K, int D>
  constexpr bool operator==(const HeadLayout<Q, K, D>& o) const {
    return q_heads() == o.q_heads() && kv_heads() == o.kv_heads() && head_dim() == o.head_dim();
  }

 private:
  static constexpr void check_static(const char* what, int fixed, int given) {
    if (fixed != dynamic && fixed != given)
      detail::fail<config_error>(what, " fixed at compile time to ", fixed, " but given ", given);
  }
  int hq_, hkv_, d_;
};

/// Runtime head layout: what configs and caches store.
using HeadShape = HeadLayout<>;

}  // namespace kvattn
