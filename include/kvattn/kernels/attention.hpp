// Batched attention over cached K/V: plan the work split from the data, run tile kernels in
// parallel, merge split-K partials in a fixed order. Decode, prefill/append and cross-attention are
// all this one routine; only the queries and the mask differ.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <span>
#include <vector>

#include "kvattn/cache/kv_view.hpp"
#include "kvattn/kernels/attend_portable.hpp"
#include "kvattn/kernels/dispatch.hpp"
#include "kvattn/kernels/parallel.hpp"
#include "kvattn/kernels/softmax_state.hpp"

namespace kvattn::kernels {

/// A batch of attention problems on one cache slot. Sequence b has query tokens
/// [q_offsets[b], q_offsets[b+1]) (CSR, like FlashInfer's indptr); with `causal`, those are the last
/// tokens of the sequence and token i of n sees keys [0, length - n + i]; otherwise every query sees
/// all `length` keys (cross-attention). Query and output rows are [token][Hq][d], token stride given.
/// Kernels trust this struct: the ops layer validates it.
struct AttentionProblem {
  KvSlotView slot;
  int q_heads = 0;
  std::span<const KvSequenceView> seqs;
  std::span<const std::int64_t> q_offsets;
  const float* q = nullptr;
  std::int64_t q_stride = 0;
  float* out = nullptr;
  std::int64_t out_stride = 0;
  float scale = 1.f;
  bool causal = true;
};

/// Work split rules. They depend only on the data (lengths, chunk sizes), never on the thread count,
/// so every thread count computes the same sums in the same order: bitwise-identical results.
struct SplitRules {
  int query_tile_tokens = 16;          ///< query tokens per work item
  int split_max_query_tokens = 4;      ///< sequences with at most this many queries are split along keys
  std::int64_t min_chunk_keys = 256;   ///< split-K chunks: about an eighth of the sequence,
  std::int64_t max_chunk_keys = 1024;  ///< a power of two clamped to [min, max] keys

  /// Keys per split-K chunk of a sequence of `length` keys: a function of the length only.
  std::int64_t chunk_keys(std::int64_t length) const {
    return std::clamp<std::int64_t>(static_cast<std::int64_t>(std::bit_ceil(static_cast<std::uint64_t>(ceil_div(length, 8)))),
                                    min_chunk_keys, max_chunk_keys);
  }
  /// Split only when the batch has fewer (sequence, KV head, query tile) units than this, i.e. too
  /// few to keep many threads busy: a data property, never the thread count.
  std::int64_t split_below_units = 64;
};

struct WorkItem {
  std::int64_t seq;
  int kv_head;
  std::int64_t token0;    ///< first query token (sequence-local)
  int n_tokens;
  std::int64_t key_begin, key_end;
  std::int64_t partial;   ///< index of its partial result, or -1 to finalize straight into out
};

struct MergeItem {
  std::int64_t seq;
  int kv_head;
  std::int64_t token0;
  int n_tokens;
  std::int64_t first_partial;
  std::int64_t chunks;
};

struct AttentionPlan {
  std::vector<WorkItem> items;
  std::vector<MergeItem> merges;
  std::int64_t partials = 0;  ///< partial results (each rows_per_item rows)
  int max_rows = 0;           ///< query rows of the largest item
};

inline AttentionPlan plan_attention(const AttentionProblem& pb, const SplitRules& rules = {}) {
  AttentionPlan plan;
  const int group = pb.q_heads / pb.slot.kv_heads;
  std::int64_t units = 0;
  for (std::size_t b = 0; b < pb.seqs.size(); ++b)
    units += pb.slot.kv_heads * ceil_div(pb.q_offsets[b + 1] - pb.q_offsets[b], rules.query_tile_tokens);
  const bool few_units = units < rules.split_below_units;
  for (std::size_t b = 0; b < pb.seqs.size(); ++b) {
    const std::int64_t n = pb.q_offsets[b + 1] - pb.q_offsets[b];
    const std::int64_t length = pb.seqs[b].length;
    const std::int64_t chunk_keys = rules.chunk_keys(length);
    const bool split = few_units && n <= rules.split_max_query_tokens && length > chunk_keys;
    for (int h = 0; h < pb.slot.kv_heads; ++h)
      for (std::int64_t t0 = 0; t0 < n; t0 += rules.query_tile_tokens) {
        const int nt = static_cast<int>(std::min<std::int64_t>(rules.query_tile_tokens, n - t0));
        plan.max_rows = std::max(plan.max_rows, nt * group);
        const std::int64_t keys = pb.causal ? length - n + t0 + nt : length;
        if (!split) {
          plan.items.push_back({static_cast<std::int64_t>(b), h, t0, nt, 0, keys, -1});
          continue;
        }
        const std::int64_t chunks = ceil_div(keys, chunk_keys);
        plan.merges.push_back({static_cast<std::int64_t>(b), h, t0, nt, plan.partials, chunks});
        for (std::int64_t c = 0; c < chunks; ++c)
          plan.items.push_back({static_cast<std::int64_t>(b), h, t0, nt, c * chunk_keys,
                                std::min(keys, (c + 1) * chunk_keys), plan.partials++});
      }
  }
  // Longest key ranges first, so ragged batches balance under dynamic scheduling.
  std::stable_sort(plan.items.begin(), plan.items.end(), [](const WorkItem& a, const WorkItem& b) {
    return (a.key_end - a.key_begin) * a.n_tokens > (b.key_end - b.key_begin) * b.n_tokens;
  });
  return plan;
}

/// Runs a planned problem with the given tile kernel on `threads` threads.
inline void run_attention(const AttentionProblem& pb, const AttentionPlan& plan, TileKernel kernel, int threads) {
  const int d = pb.slot.head_dim;
  const int group = pb.q_heads / pb.slot.kv_heads;
  const std::int64_t rows = plan.max_rows;
  // Per-thread scratch: tile scratch plus the item's outputs, in whole 64-byte lines.
  const std::int64_t per_thread = (tile_scratch_floats(plan.max_rows, d) + rows * d + 15) / 16 * 16;
  threads = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, std::int64_t(plan.items.size()))));
  // All allocation happens here, once per call; the loops below only index into it.
  std::vector<float> scratch_storage(static_cast<std::size_t>(per_thread * threads + 16));
  float* const scratch = scratch_storage.data() + (16 - reinterpret_cast<std::uintptr_t>(scratch_storage.data()) / 4 % 16) % 16;
  std::vector<SoftmaxState> thread_states(static_cast<std::size_t>(rows * threads));
  std::vector<float> partial_acc(static_cast<std::size_t>(plan.partials * rows * d));
  std::vector<SoftmaxState> partial_states(static_cast<std::size_t>(plan.partials * rows));

  auto out_row = [&](std::int64_t seq, int h, std::int64_t token, int g) {
    return pb.out + (pb.q_offsets[static_cast<std::size_t>(seq)] + token) * pb.out_stride + (std::int64_t{h} * group + g) * d;
  };

  parallel_for(static_cast<std::int64_t>(plan.items.size()), threads, [&](std::int64_t idx, int thread) {
    const WorkItem& w = plan.items[static_cast<std::size_t>(idx)];
    const KvSequenceView& seq = pb.seqs[static_cast<std::size_t>(w.seq)];
    const std::int64_t n = pb.q_offsets[static_cast<std::size_t>(w.seq) + 1] - pb.q_offsets[static_cast<std::size_t>(w.seq)];
    float* tscratch = scratch + per_thread * thread;
    AttendTile tile;
    tile.slot = &pb.slot;
    tile.seq = seq;
    tile.kv_head = w.kv_head;
    tile.group = group;
    tile.n_tokens = w.n_tokens;
    tile.q = pb.q + (pb.q_offsets[static_cast<std::size_t>(w.seq)] + w.token0) * pb.q_stride + std::int64_t{w.kv_head} * group * d;
    tile.q_stride = pb.q_stride;
    tile.scale = pb.scale;
    tile.key_begin = w.key_begin;
    tile.key_end = w.key_end;
    tile.visible_end0 = pb.causal ? seq.length - n + w.token0 + 1 : seq.length;
    tile.visible_step = pb.causal ? 1 : 0;
    tile.load = kernel.load;
    if (w.partial >= 0) {
      tile.states = partial_states.data() + w.partial * rows;
      tile.acc = partial_acc.data() + w.partial * rows * d;
      kernel.run(tile, tscratch);
      return;
    }
    tile.states = thread_states.data() + rows * thread;
    tile.acc = tscratch + tile_scratch_floats(plan.max_rows, d);
    kernel.run(tile, tscratch);
    for (int r = 0; r < w.n_tokens * group; ++r)
      tile.states[r].finalize(tile.acc + std::int64_t{r} * d, out_row(w.seq, w.kv_head, w.token0 + r / group, r % group), d);
  });

  // Merge split-K partials chunk by chunk, in key order.
  parallel_for(static_cast<std::int64_t>(plan.merges.size()), threads, [&](std::int64_t idx, int) {
    const MergeItem& m = plan.merges[static_cast<std::size_t>(idx)];
    for (int r = 0; r < m.n_tokens * group; ++r) {
      SoftmaxState& st = partial_states[static_cast<std::size_t>(m.first_partial * rows + r)];
      float* acc = partial_acc.data() + (m.first_partial * rows + r) * d;
      for (std::int64_t c = 1; c < m.chunks; ++c) {
        const std::int64_t p = (m.first_partial + c) * rows + r;
        st.merge(acc, partial_states[static_cast<std::size_t>(p)], partial_acc.data() + p * d, d);
      }
      st.finalize(acc, out_row(m.seq, m.kv_head, m.token0 + r / group, r % group), d);
    }
  });
}

}  // namespace kvattn::kernels
