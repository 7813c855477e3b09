// Batched attention over cached K/V: plan the work split from the data, run tile kernels in
// parallel, merge split-K partials in a fixed order. Decode, prefill/append and cross-attention are
// all this one routine; only the queries and the mask differ.
#pragma once

#include <algorithm>
#include <atomic>
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

/// Work split rules. A sequence's split depends only on its own data (length, chunk sizes), never
/// on the thread count or the rest of the batch, so it computes the same sums in the same order
/// whatever runs it: bitwise-identical results.
struct SplitRules {
  int query_tile_tokens = 16;          ///< query tokens per work item
  int split_max_query_tokens = 4;      ///< sequences with at most this many queries are split along keys
  /// Split-K aims at about this many work items per sequence: enough to keep many threads busy,
  /// and no more, since every chunk costs a start-up and a merge (Zen 4, MHA 32 heads d=128 T=4096
  /// f16 decode, 2 threads, medians of 7 A/B runs: 2.16 ms with 256 chunks of 512 keys, 1.90 ms
  /// with 64 of 2048).
  std::int64_t target_items = 64;
  /// Never smaller chunks than this: a chunk costs a start-up and a merge, ~1 us on 2 threads (Xeon
  /// model 207, f16, medians of 5 interleaved runs, 512 -> 1024 keys: GQA 32/8 T=4096 decode 483 ->
  /// 470 us, MQA 32/1 T=4096 281 -> 268 us).
  std::int64_t min_chunk_keys = 1024;
  /// Short contexts may go below min_chunk_keys, down to short_chunk_keys, so that the batch still
  /// makes about min_split_items items: an MQA decode of 1024 keys (one unit) is otherwise one item
  /// that one thread runs while the others wait. On an AMD EPYC family 26 (MQA 32/1 d=128 f16, B=1,
  /// T=1024, scripts/ab-decode, median b/a of 3 runs), 4 chunks of 256 against one item took 0.691x
  /// the time on 2 threads and 1.086x on one (chunk start-ups and a merge); 2 chunks of 512 against
  /// 4 of 256 took 0.870x on 2 threads, 0.953x on one (T=512, 2 chunks of 256 either way: 1.002x);
  /// 2 chunks against one item, 0.571x on 2 threads, 1.032x on one.
  int min_split_items = 2;
  std::int64_t short_chunk_keys = 256;
  /// No running softmax sum or output accumulates more keys than this in f32: longer key ranges are
  /// computed in runs of this many keys, each starting afresh, merged in key order (split-K chunks
  /// are never longer; run_attention cuts the unsplit items of many-token chunks). One running sum
  /// over all keys lost accuracy with length: a 5-token chunk over 2M keys (d=16, nearly uniform
  /// weights, V in [0.9, 1]) erred by 2.9e-3, 282x the f32 error model of tests/reference.hpp.
  std::int64_t run_keys = 8192;

  /// Keys per split-K chunk of a sequence whose KV heads attend to total_keys keys in all (KV heads
  /// x length): a power of two, about total / target_items, at least min_chunk_keys unless that
  /// leaves fewer than min_split_items chunks (then at least short_chunk_keys), at most run_keys. A function of the
  /// sequence alone, never of the thread count or of the rest of the batch.
  std::int64_t chunk_keys(std::int64_t total_keys) const {
    const auto per = [&](std::int64_t items) {
      return static_cast<std::int64_t>(std::bit_ceil(static_cast<std::uint64_t>(ceil_div(total_keys, items))));
    };
    const std::int64_t least = std::clamp(per(min_split_items), short_chunk_keys, min_chunk_keys);
    return std::min(run_keys, std::max(least, per(target_items)));
  }
};

struct WorkItem {
  std::int64_t seq;
  int kv_head;
  std::int64_t token0;    ///< first query token (sequence-local)
  int n_tokens;
  std::int64_t key_begin, key_end;
  std::int64_t partial;   ///< index of its partial result, or -1 to finalize straight into out
  std::int64_t merge;     ///< index of the merge its partial result takes part in, or -1
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
  int group = 1;              ///< query rows per token of an item (Hq / Hkv)
  std::int64_t run_keys = SplitRules{}.run_keys;  ///< unsplit items longer than this run in runs of this many keys
};

/// How many of the threads a call asks for it starts: a thread costs a start-up and each work item
/// a claim between threads (on AMD EPYC family 26 an OpenMP region of 2 threads takes 2.9 us, a
/// cache line moves between the cores in 0.2 us), so a small call runs faster on fewer. Work is
/// counted in (query row, key) pairs over each item's key range (for a causal chunk, its last
/// token's), plus item_pairs per work item; each thread started gets at least min_pairs (0: every
/// thread asked for runs, up to one per item). Measured there before this rule (d=128 f16 decode,
/// B=1, medians of 4000 alternating calls, 1 thread / 2 threads): GQA 32/8 T=16 4.6 / 7.0 us, T=64
/// 9.7 / 9.1 us, T=128 15.7 / 12.0 us; MHA 32/32 T=16 8.4 / 15.0 us, T=64 22.0 / 21.0 us. Results
/// never depend on it: the plan does not.
struct ThreadRules {
  std::int64_t min_pairs = 2048;
  std::int64_t item_pairs = 64;

  int threads_for(const AttentionPlan& plan, int asked) const {
    const auto items = static_cast<std::int64_t>(plan.items.size());
    std::int64_t limit = std::max<std::int64_t>(1, items);
    if (min_pairs > 0) {
      std::int64_t pairs = 0;
      for (const WorkItem& w : plan.items) pairs += (w.key_end - w.key_begin) * w.n_tokens * plan.group;
      limit = std::min(limit, std::max<std::int64_t>(1, (pairs + items * item_pairs) / min_pairs));
    }
    return static_cast<int>(std::clamp<std::int64_t>(asked, 1, limit));
  }
};

inline AttentionPlan plan_attention(const AttentionProblem& pb, const SplitRules& rules = {}) {
  AttentionPlan plan;
  const int group = pb.q_heads / pb.slot.kv_heads;
  plan.group = group;
  plan.run_keys = rules.run_keys;
  // A sequence with few queries is split into chunks by its own length, whatever else the batch
  // holds: its result is then the same alone or in any batch (batch invariance), and on any number
  // of threads. Where the batch has enough units to keep the threads busy without splitting,
  // claim_order hands each split unit to one thread as one kernel pass, which costs little more
  // than an unsplit item.
  for (std::size_t b = 0; b < pb.seqs.size(); ++b) {
    const std::int64_t n = pb.q_offsets[b + 1] - pb.q_offsets[b];
    const std::int64_t length = pb.seqs[b].length;
    const std::int64_t chunk_keys = rules.chunk_keys(pb.slot.kv_heads * length);
    const bool split = n <= rules.split_max_query_tokens && length > chunk_keys;
    for (int h = 0; h < pb.slot.kv_heads; ++h)
      for (std::int64_t t0 = 0; t0 < n; t0 += rules.query_tile_tokens) {
        const int nt = static_cast<int>(std::min<std::int64_t>(rules.query_tile_tokens, n - t0));
        plan.max_rows = std::max(plan.max_rows, nt * group);
        const std::int64_t keys = pb.causal ? length - n + t0 + nt : length;
        if (!split) {
          plan.items.push_back({static_cast<std::int64_t>(b), h, t0, nt, 0, keys, -1, -1});
          continue;
        }
        const std::int64_t chunks = ceil_div(keys, chunk_keys);
        const auto merge = static_cast<std::int64_t>(plan.merges.size());
        plan.merges.push_back({static_cast<std::int64_t>(b), h, t0, nt, plan.partials, chunks});
        for (std::int64_t c = 0; c < chunks; ++c)
          plan.items.push_back({static_cast<std::int64_t>(b), h, t0, nt, c * chunk_keys,
                                std::min(keys, (c + 1) * chunk_keys), plan.partials++, merge});
      }
  }
  // Longest key ranges first, so ragged batches balance under dynamic scheduling; equal ones chunk
  // by chunk across KV heads (first chunks of every head, then the second ones), so that threads
  // running at the same time read different heads' rows: reading neighbouring chunks of one head
  // was slower (GQA 32/8 d=128 T=4096 f16 decode, 2 threads, 32 chunks of 1024 keys, medians of 11
  // interleaved runs: 415 -> 410 us).
  std::stable_sort(plan.items.begin(), plan.items.end(), [](const WorkItem& a, const WorkItem& b) {
    const std::int64_t wa = (a.key_end - a.key_begin) * a.n_tokens, wb = (b.key_end - b.key_begin) * b.n_tokens;
    return wa != wb ? wa > wb : a.key_begin < b.key_begin;
  });
  return plan;
}

/// n elements of a grow-only buffer of the calling thread, reused by its every call (contents
/// unspecified): a call allocates only when it needs more than any call before it on this thread.
/// Fresh pages on every call cost page faults and, once freed, TLB shootdowns on all workers (Zen 4,
/// MQA 32 heads d=128 T=4096 f16 decode in 16 chunks, 2 threads, medians of 5: 0.78 ms with per-call
/// vectors, 0.53 ms reused).
template <class T>
T* reused_buffer(std::size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) {
    buffer = std::vector<T>();  // free first: never hold both sizes
    buffer.resize(n);
  }
  return buffer.data();
}

/// The order in which threads claim a plan's items: run r is items order[begin[r] .. begin[r + 1]),
/// which one thread runs in turn. Each item is its own run, unless every split unit (the chunks of
/// one merge) is at most a quarter of a thread's share of the work: then each unit's chunks form one
/// run, in key order, which the thread runs as one kernel pass (AttendTile::chunk_keys), so it
/// claims once, starts the kernel once, merges partials from its own cache and streams the unit's
/// rows front to back across chunk boundaries. Who runs a chunk never changes what it computes:
/// results stay the same for every thread count. Split-K chunks exist for machines with many
/// threads (SplitRules); claimed one by one on two threads they cost more than their start-ups. AMD
/// EPYC family 26, GQA 32/8 d=128 T=4096 f16 decode (32 chunks of 1024 keys), scripts/ab-decode,
/// median b/a of 3 runs: the same work as 8 unsplit items took 0.929x the time on 2 threads and
/// 0.974x on one; whole units claimed, 0.968x (f32 0.944x; T=32768, 64 chunks of 4096, 0.961x),
/// and run as one kernel pass, 0.960x of that (f32 0.984x, T=32768 0.979x).
struct ClaimOrder {
  const std::int64_t* order = nullptr;
  const std::int64_t* begin = nullptr;
  std::int64_t runs = 0;
};

inline ClaimOrder claim_order(const AttentionPlan& plan, int threads) {
  const auto n = static_cast<std::int64_t>(plan.items.size());
  const auto merges = plan.merges.size();
  // order, begin (n + 1), then per merge its work and per partial its item
  std::int64_t* const order = reused_buffer<std::int64_t>(static_cast<std::size_t>(2 * n + 1) + merges + static_cast<std::size_t>(plan.partials));
  std::int64_t* const begin = order + n;
  std::int64_t* const merge_work = begin + n + 1;
  std::int64_t* const item_of_partial = merge_work + merges;
  std::fill_n(merge_work, merges, 0);
  std::int64_t total = 0, largest_run = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const WorkItem& w = plan.items[static_cast<std::size_t>(i)];
    const std::int64_t work = (w.key_end - w.key_begin) * w.n_tokens;
    total += work;
    if (w.merge < 0) {
      largest_run = std::max(largest_run, work);
    } else {
      largest_run = std::max(largest_run, merge_work[w.merge] += work);
      item_of_partial[w.partial] = i;
    }
  }
  if (merges == 0 || largest_run * 4 * threads > total) {
    for (std::int64_t i = 0; i <= n; ++i) begin[i] = i;
    std::copy_n(begin, n, order);
    return {order, begin, n};
  }
  // A run where the plan has its unit's first chunk (so longest first, as the plan orders items);
  // the unit's chunks in key order.
  std::int64_t runs = 0, k = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const WorkItem& w = plan.items[static_cast<std::size_t>(i)];
    if (w.merge < 0) {
      begin[runs++] = k, order[k++] = i;
      continue;
    }
    const MergeItem& m = plan.merges[static_cast<std::size_t>(w.merge)];
    if (w.partial == m.first_partial) {  // the unit's first chunk
      begin[runs++] = k;
      for (std::int64_t c = 0; c < m.chunks; ++c) order[k++] = item_of_partial[m.first_partial + c];
    }
  }
  begin[runs] = k;
  return {order, begin, runs};
}

/// Runs a planned problem with the given tile kernel on the threads `rules` grants of those asked.
inline void run_attention(const AttentionProblem& pb, const AttentionPlan& plan, TileKernel kernel, int asked_threads,
                          const ThreadRules& rules = {}) {
  const int d = pb.slot.head_dim;
  const int group = plan.group;
  const std::int64_t rows = plan.max_rows;
  // Per-thread scratch: tile scratch plus the item's outputs and one run's (run_kernel), in whole
  // 64-byte lines.
  const std::int64_t per_thread = (tile_scratch_floats(plan.max_rows, d) + 2 * rows * d + 15) / 16 * 16;
  const int threads = rules.threads_for(plan, asked_threads);
  // All memory comes from here, the calling thread's reused buffers; the loops below only index into it.
  // Each thread's and each split item's states and partial outputs start on a 64-byte line of their
  // own: packed, the states of 8 one-row items share a line, which two cores writing them at once
  // pass back and forth. AMD EPYC family 26, d=128 f16 decode, 2 threads, scripts/ab-decode, median
  // b/a of 3 runs: GQA 32/8 T=1024 B=16 (D5) 0.971x (runs 0.966-0.979), T=4096 B=1 0.981x, MHA
  // 32/32 T=4096 1.001x.
  const std::int64_t state_stride = (rows + 7) / 8 * 8;  // SoftmaxStates (8 bytes) per thread or item
  const std::int64_t acc_stride = (rows * d + 15) / 16 * 16;  // floats per split item's outputs
  const std::int64_t scratch_floats = per_thread * threads + 16;
  float* const floats = reused_buffer<float>(static_cast<std::size_t>(scratch_floats + plan.partials * acc_stride));
  float* const scratch = floats + (16 - reinterpret_cast<std::uintptr_t>(floats) / 4 % 16) % 16;  // 64-byte aligned
  float* const partial_acc = scratch + per_thread * threads;
  // Per thread: the item's states, then one run's.
  SoftmaxState* const states = reused_buffer<SoftmaxState>(static_cast<std::size_t>(state_stride * (2 * threads + plan.partials) + 8));
  SoftmaxState* const thread_states = states + (8 - reinterpret_cast<std::uintptr_t>(states) / 8 % 8) % 8;
  SoftmaxState* const partial_states = thread_states + 2 * state_stride * threads;

  auto out_row = [&](std::int64_t seq, int h, std::int64_t token, int g) {
    return pb.out + (pb.q_offsets[static_cast<std::size_t>(seq)] + token) * pb.out_stride + (std::int64_t{h} * group + g) * d;
  };

  // The tile of work item idx, without its outputs (states, acc).
  auto item_tile = [&](std::int64_t idx) {
    const WorkItem& w = plan.items[static_cast<std::size_t>(idx)];
    const KvSequenceView& seq = pb.seqs[static_cast<std::size_t>(w.seq)];
    const std::int64_t n = pb.q_offsets[static_cast<std::size_t>(w.seq) + 1] - pb.q_offsets[static_cast<std::size_t>(w.seq)];
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
    return tile;
  };

  // Merges a split item's partials chunk by chunk, in key order, whichever thread finishes its
  // last chunk: no second parallel loop and barrier (GQA 32/8 d=128 T=4096 f16 decode, 2 threads,
  // medians of 11 interleaved runs: 416.5 -> 412.0 us in one run, 416.7 -> 415.4 us in another).
  auto merge_partials = [&](const MergeItem& m) {
    for (int r = 0; r < m.n_tokens * group; ++r) {
      SoftmaxState& st = partial_states[static_cast<std::size_t>(m.first_partial * state_stride + r)];
      float* acc = partial_acc + m.first_partial * acc_stride + r * d;
      for (std::int64_t c = 1; c < m.chunks; ++c) {
        const std::int64_t p = m.first_partial + c;
        st.merge(acc, partial_states[static_cast<std::size_t>(p * state_stride + r)], partial_acc + p * acc_stride + r * d, d);
      }
      st.finalize(acc, out_row(m.seq, m.kv_head, m.token0 + r / group, r % group), d);
    }
  };
  int* const chunks_done = reused_buffer<int>(plan.merges.size());
  std::fill_n(chunks_done, plan.merges.size(), 0);

  // The kernel on `tile`, told of the item the thread runs next (`next`, -1 for none) so that its
  // last tiles prefetch that item's first rows. A tile of more than plan.run_keys keys (an unsplit
  // item: split-K chunks never are) runs in runs of that many keys, cut and chained for prefetch by
  // for_each_chunk, the first into the tile's own outputs, each later one into the thread's run
  // outputs and merged in, in key order: no f32 running sum spans more keys than a run.
  auto run_kernel = [&](AttendTile& tile, std::int64_t next, int thread) {
    AttendTile next_tile;
    if (next >= 0) {
      next_tile = item_tile(next);
      tile.next = &next_tile;
    }
    float* const tile_scratch = scratch + per_thread * thread;
    if (tile.chunk_keys > 0 || tile.keys_end() - tile.key_begin <= plan.run_keys) return kernel.run(tile, tile_scratch);
    SoftmaxState* const run_states = thread_states + state_stride * (2 * thread + 1);
    float* const run_acc = tile_scratch + tile_scratch_floats(plan.max_rows, d) + rows * d;
    AttendTile runs = tile;
    runs.key_end = tile.keys_end();
    runs.chunk_keys = plan.run_keys;
    for_each_chunk(runs, [&](const AttendTile& run) {
      if (run.key_begin == tile.key_begin) return kernel.run(run, tile_scratch);
      AttendTile later = run;
      later.states = run_states;
      later.acc = run_acc;
      kernel.run(later, tile_scratch);
      for (int r = 0; r < tile.n_tokens * group; ++r)
        tile.states[r].merge(tile.acc + std::int64_t{r} * d, run_states[r], run_acc + std::int64_t{r} * d, d);
    });
  };
  auto run_item = [&](std::int64_t idx, std::int64_t next, int thread) {
    const WorkItem& w = plan.items[static_cast<std::size_t>(idx)];
    AttendTile tile = item_tile(idx);
    if (w.partial >= 0) {
      tile.states = partial_states + w.partial * state_stride;
      tile.acc = partial_acc + w.partial * acc_stride;
      run_kernel(tile, next, thread);
      const MergeItem& m = plan.merges[static_cast<std::size_t>(w.merge)];
      // acq_rel: the last chunk's thread sees every other chunk's partial result.
      if (std::atomic_ref<int>(chunks_done[w.merge]).fetch_add(1, std::memory_order_acq_rel) + 1 == m.chunks) merge_partials(m);
      return;
    }
    tile.states = thread_states + state_stride * 2 * thread;
    tile.acc = scratch + per_thread * thread + tile_scratch_floats(plan.max_rows, d);
    run_kernel(tile, next, thread);
    for (int r = 0; r < w.n_tokens * group; ++r)
      tile.states[r].finalize(tile.acc + std::int64_t{r} * d, out_row(w.seq, w.kv_head, w.token0 + r / group, r % group), d);
  };
  // A whole split unit (a run of several chunks): one kernel pass over all its keys, each chunk's
  // result in its partial (AttendTile::chunk_keys), then the merge.
  auto run_unit = [&](std::int64_t first, std::int64_t last, std::int64_t next, int thread) {
    const WorkItem& w = plan.items[static_cast<std::size_t>(first)];
    AttendTile tile = item_tile(first);
    tile.key_end = plan.items[static_cast<std::size_t>(last)].key_end;
    tile.chunk_keys = w.key_end - w.key_begin;  // every chunk but the last is whole
    tile.states = partial_states + w.partial * state_stride;
    tile.acc = partial_acc + w.partial * acc_stride;
    tile.chunk_states = state_stride;
    tile.chunk_acc = acc_stride;
    run_kernel(tile, next, thread);
    merge_partials(plan.merges[static_cast<std::size_t>(w.merge)]);
  };
  const ClaimOrder claims = claim_order(plan, threads);
  parallel_for_lookahead(claims.runs, threads, [&](std::int64_t run, std::int64_t next_run, int thread) {
    const std::int64_t first = claims.begin[run], end = claims.begin[run + 1];
    const std::int64_t next = next_run >= 0 ? claims.order[claims.begin[next_run]] : -1;
    if (end - first > 1) return run_unit(claims.order[first], claims.order[end - 1], next, thread);
    run_item(claims.order[first], next, thread);
  });
}

}  // namespace kvattn::kernels
