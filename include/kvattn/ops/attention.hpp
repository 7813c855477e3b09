// Attention over a KV cache: decode, prefill/append and cross-attention. These are the API boundary:
// every argument is validated here, then kernels run on views without further checks.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "kvattn/cache/kv_cache.hpp"
#include "kvattn/kernels/attention.hpp"

namespace kvattn {

/// Options shared by the attention calls.
struct AttentionOptions {
  float scale = 0.f;             ///< logit scale; 0 means 1/sqrt(d)
  int threads = 0;               ///< 0: the global default (set_num_threads), else this many (<= max_thread_count)
  std::int64_t q_stride = 0;     ///< floats between query tokens; 0 means Hq x d (dense)
  std::int64_t out_stride = 0;   ///< floats between output tokens; 0 means Hq x d (dense)
  fpmath_mode fpmath = fpmath_mode::strict;  ///< arithmetic allowed on stored K/V (see fpmath_mode)
  /// Work each thread must get for a call to start it, in (query row, key) pairs (see
  /// kernels::ThreadRules): small calls run on fewer threads than asked, as they run faster so.
  /// 0: every thread asked for runs (up to one per work item). Results never depend on it.
  std::int64_t min_pairs_per_thread = kernels::ThreadRules{}.min_pairs;
};

namespace detail {

/// Token strides in floats, 0 resolved to dense.
struct TokenStrides {
  std::int64_t q, out;
};

/// Validates options for calls whose query and output tokens are `row` = Hq x d floats wide, and
/// returns their token strides.
inline TokenStrides check_options(const AttentionOptions& opt, std::int64_t row, const char* what) {
  check_thread_count(opt.threads, what);
  if (opt.min_pairs_per_thread < 0) fail<config_error>(what, ": min_pairs_per_thread must be >= 0, got ", opt.min_pairs_per_thread);
  const TokenStrides s{opt.q_stride == 0 ? row : opt.q_stride, opt.out_stride == 0 ? row : opt.out_stride};
  if (s.q < row || s.out < row)
    fail<shape_error>(what, ": token strides (q ", s.q, ", out ", s.out, ") must be >= Hq x d = ", row);
  if (!(opt.scale >= 0.f) || !std::isfinite(opt.scale)) fail<shape_error>(what, ": scale must be finite and >= 0, got ", opt.scale);
  if (opt.fpmath != fpmath_mode::strict && opt.fpmath != fpmath_mode::bf16)
    fail<config_error>(what, ": unknown fpmath_mode value ", static_cast<int>(opt.fpmath));
  return s;
}

/// Validates a batch against the cache and runs it. counts[b] query tokens per sequence; with
/// `causal` they are the sequence's last counts[b] tokens. `rules`: the work split (tests shrink it
/// to reach split-K chunks and runs with few keys).
template <class Heads, KvLayoutPolicy L>
void attend(const KvCache<L>& cache, int layer, std::span<const seq_id> seqs, std::span<const std::int64_t> counts,
            const float* q, float* out, const AttentionOptions& opt, bool causal, const char* what,
            const kernels::SplitRules& rules = {}) {
  const Heads heads(cache.config().heads());  // throws if a static layout disagrees with the cache
  const int hq = heads.q_heads(), d = heads.head_dim();
  const KvSlotView slot = cache.slot_view(layer);  // throws on a bad layer
  if (seqs.size() != counts.size())
    fail<shape_error>(what, ": ", seqs.size(), " sequences but ", counts.size(), " token counts");
  const TokenStrides strides = check_options(opt, std::int64_t{hq} * d, what);
  std::vector<KvSequenceView> views;
  std::vector<std::int64_t> offsets{0};
  views.reserve(seqs.size());
  offsets.reserve(seqs.size() + 1);
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    const KvSequenceView v = cache.sequence_view(seqs[b]);  // throws on an unknown id
    if (counts[b] < 0) fail<shape_error>(what, ": sequence ", seqs[b], " has ", counts[b], " query tokens");
    if (causal && counts[b] > v.length)
      fail<shape_error>(what, ": sequence ", seqs[b], " has ", counts[b], " query tokens but only ", v.length,
                        " cached tokens; extend the cache and write the new K/V first");
    views.push_back(v);
    offsets.push_back(checked_add(offsets.back(), counts[b], "query tokens"));
  }
  if (offsets.back() > 0) {
    if (q == nullptr || out == nullptr) fail<shape_error>(what, ": null q or out");
    // The last token's q and output rows must be addressable without overflow.
    const std::int64_t row = std::int64_t{hq} * d;
    check_extent(offsets.back(), strides.q, row, sizeof(float), "q extent");
    check_extent(offsets.back(), strides.out, row, sizeof(float), "output extent");
  }
  kernels::AttentionProblem pb;
  pb.slot = slot;
  pb.q_heads = hq;
  pb.seqs = views;
  pb.q_offsets = offsets;
  pb.q = q;
  pb.q_stride = strides.q;
  pb.out = out;
  pb.out_stride = strides.out;
  pb.scale = opt.scale == 0.f ? 1.f / std::sqrt(static_cast<float>(d)) : opt.scale;
  pb.causal = causal;
  const kernels::AttentionPlan plan = kernels::plan_attention(pb, rules);
  // bf16 products only in calls of one query token per sequence (decode steps, one-token cross-
  // attention), so that a call's rows never mix the two arithmetics (a chunk's tiles differ in rows).
  const bool one_token = std::all_of(counts.begin(), counts.end(), [](std::int64_t n) { return n == 1; });
  const kernels::TileKernel kernel = kernels::select_tile_kernel<Heads::static_group_size, Heads::static_head_dim>(
      cache.config().dtype(), heads.group_size(), d, active_isa(), one_token ? opt.fpmath : fpmath_mode::strict);
  kernels::run_attention(pb, plan, kernel, resolve_threads(opt.threads), kernels::ThreadRules{.min_pairs = opt.min_pairs_per_thread});
}

}  // namespace detail

/// Decode: one new query token per sequence against everything cached for it (including the new
/// token's own K/V, which the producer layer wrote first). q and out are [B][Hq][d].
/// Heads may be a static HeadLayout<Hq, Hkv, d> matching the cache, for specialized kernels.
template <class Heads = HeadShape, KvLayoutPolicy L>
void decode(const KvCache<L>& cache, int layer, std::span<const seq_id> seqs, const float* q, float* out,
            const AttentionOptions& opt = {}) {
  const std::vector<std::int64_t> ones(seqs.size(), 1);
  detail::attend<Heads>(cache, layer, seqs, ones, q, out, opt, /*causal=*/true, "decode");
}

/// Prefill and append: the last counts[b] cached tokens of sequence b are new; each attends
/// causally to the cached prefix and to the chunk up to itself. Prefill is the case of an empty
/// prefix. q and out are [sum(counts)][Hq][d], sequences in order.
template <class Heads = HeadShape, KvLayoutPolicy L>
void prefill(const KvCache<L>& cache, int layer, std::span<const seq_id> seqs, std::span<const std::int64_t> counts,
             const float* q, float* out, const AttentionOptions& opt = {}) {
  detail::attend<Heads>(cache, layer, seqs, counts, q, out, opt, /*causal=*/true, "prefill");
}

/// Cross-attention: counts[b] query tokens of sequence b each see all of its cached tokens (e.g. an
/// encoder's K/V held in a cache of its own). q and out are [sum(counts)][Hq][d].
template <class Heads = HeadShape, KvLayoutPolicy L>
void cross_attention(const KvCache<L>& cache, int layer, std::span<const seq_id> seqs,
                     std::span<const std::int64_t> counts, const float* q, float* out, const AttentionOptions& opt = {}) {
  detail::attend<Heads>(cache, layer, seqs, counts, q, out, opt, /*causal=*/false, "cross_attention");
}

}  // namespace kvattn
