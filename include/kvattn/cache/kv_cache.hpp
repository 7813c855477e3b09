// The KV cache: blocks of K/V from a std::pmr::memory_resource, laid out by a policy, with exact
// byte accounting. Only producer layers own a slot; consumer layers read their producer's slot.
#pragma once

#include <algorithm>
#include <cstring>
#include <memory_resource>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "kvattn/cache/kv_view.hpp"
#include "kvattn/cache/layout.hpp"
#include "kvattn/config/model_config.hpp"

namespace kvattn {

using seq_id = std::int64_t;

namespace detail {

/// The ids of one batch, each listed at most once: check(id) throws shape_error ("<what>: sequence
/// <id> listed twice") at an id's second listing. A batch of one keeps no set (no allocation).
class ListedOnce {
 public:
  ListedOnce(std::size_t batch, const char* what) : many_(batch > 1), what_(what) {}
  void check(seq_id id) {
    if (many_ && !seen_.insert(id).second) fail<shape_error>(what_, ": sequence ", id, " listed twice");
  }

 private:
  bool many_;
  const char* what_;
  std::unordered_set<seq_id> seen_;
};

}  // namespace detail

/// Alignment of every block the cache requests from its memory resource.
inline constexpr std::size_t block_alignment = 64;

/// KV cache for one model.
///
/// Memory: K/V live in blocks of `layout.block_tokens()` tokens; a block holds those tokens for every
/// producer slot (K and V, all KV heads), and each sequence has one block table shared by all slots.
/// Blocks come from `resource` (default: new/delete, 64-byte aligned); bookkeeping uses the default heap.
///
/// Errors: every mutating call validates first and either completes or throws leaving the cache
/// exactly as it was (strong guarantee).
///
/// Concurrency: const calls (length, views, attention over the cache) may run concurrently with each
/// other. Mutating calls (add/remove/fork/truncate/extend/write/append/release) need exclusive access.
/// Views returned by sequence_view() stay valid until the next mutating call.
template <KvLayoutPolicy Layout = PagedLayout>
class KvCache {
 public:
  using layout_type = Layout;

  explicit KvCache(ModelConfig config, Layout layout = {},
                   std::pmr::memory_resource* resource = std::pmr::new_delete_resource())
      : config_(std::move(config)), layout_(layout), resource_(resource) {
    detail::validate_layout(layout_);
    if (resource_ == nullptr) detail::fail<config_error>("KV cache: memory resource is null");
    block_bytes_ = checked_mul(layout_.block_tokens(), config_.kv_bytes_per_token(), "KV block bytes");
    // Capacity in tokens must also fit in 64 bits.
    if (layout_.max_blocks_per_sequence() != unlimited)
      (void)checked_mul(layout_.max_blocks_per_sequence(), layout_.block_tokens(), "sequence capacity");
  }

  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  ~KvCache() {
    for (auto& [block, refs] : refcount_) resource_->deallocate(block, static_cast<std::size_t>(block_bytes_), block_alignment);
    for (std::byte* block : free_) resource_->deallocate(block, static_cast<std::size_t>(block_bytes_), block_alignment);
  }

  const ModelConfig& config() const { return config_; }
  const Layout& layout() const { return layout_; }
  std::pmr::memory_resource* resource() const { return resource_; }

  // ---- sequence lifecycle -------------------------------------------------------------------

  /// Adds an empty sequence (reserving the layout's up-front blocks).
  void add_sequence(seq_id id) {
    if (seqs_.contains(id)) detail::fail<sequence_error>("sequence ", id, " already exists");
    const std::string what = detail::message("sequence ", id);
    check_room_for_sequence(what);
    const std::int64_t n = layout_.blocks_on_add();
    Acquired acquired = acquire_blocks(n, what);
    try {
      seqs_.try_emplace(id).first->second.blocks = std::move(acquired.blocks);
    } catch (...) {
      undo_acquire(acquired);  // try_emplace threw before the move: the blocks are still there
      throw;
    }
  }

  /// Removes a sequence; its blocks return to the free list (or the resource).
  void remove_sequence(seq_id id) {
    auto it = find(id);
    for (std::byte* b : it->second.blocks) release_block(b);
    live_tokens_ -= it->second.length;
    seqs_.erase(it);
  }

  /// New sequence `dst` with the same tokens as `src`, sharing its blocks (copy on write). Where
  /// every sequence reserves blocks (blocks_on_add() > 0, e.g. ContiguousLayout's max_sequences),
  /// a fork counts as one: it is refused when the pool could not give each sequence its own.
  void fork_sequence(seq_id src, seq_id dst) {
    const Sequence& s = find(src)->second;
    if (seqs_.contains(dst)) detail::fail<sequence_error>("fork: sequence ", dst, " already exists");
    check_room_for_sequence(detail::message("fork of sequence ", src, " into ", dst));
    const std::int64_t live = checked_live_tokens(checked_add(live_tokens_, s.length, "live tokens"));
    Sequence copy = s;  // may throw: nothing changed yet
    seqs_.emplace(dst, std::move(copy));
    for (std::byte* b : s.blocks) ++refcount_.find(b)->second;
    live_tokens_ = live;
  }

  /// Shortens a sequence to new_length tokens, releasing blocks no longer needed.
  void truncate(seq_id id, std::int64_t new_length) {
    Sequence& s = find(id)->second;
    if (new_length < 0 || new_length > s.length)
      detail::fail<shape_error>("truncate sequence ", id, " to ", new_length, ": must be in [0, ", s.length, "]");
    const std::int64_t keep = std::max(layout_.blocks_on_add(), ceil_div(new_length, layout_.block_tokens()));
    while (static_cast<std::int64_t>(s.blocks.size()) > keep) {
      release_block(s.blocks.back());
      s.blocks.pop_back();
    }
    live_tokens_ -= s.length - new_length;
    s.length = new_length;
  }

  /// Grows a sequence by n tokens whose K/V the producer layers then write(). Contents of the new
  /// rows are unspecified until written.
  void extend(seq_id id, std::int64_t n) { extend(std::span<const seq_id>(&id, 1), std::span<const std::int64_t>(&n, 1)); }

  /// Grows every ids[i] by counts[i] tokens: all or nothing. (extend_guarded, at the end of the
  /// class: an extend that can be taken back exactly.)
  void extend(std::span<const seq_id> ids, std::span<const std::int64_t> counts) { extend_impl(ids, counts, nullptr); }

 private:
  struct ChangeRecord;

  /// extend(), also recording what it did in *record if record is not null (reserved before the
  /// commit, which does not allocate).
  void extend_impl(std::span<const seq_id> ids, std::span<const std::int64_t> counts, ChangeRecord* record) {
    if (ids.size() != counts.size())
      detail::fail<shape_error>("extend: ", ids.size(), " sequence ids but ", counts.size(), " token counts");
    struct Plan {
      Sequence* seq;
      std::int64_t new_length;
      std::int64_t first_cow, last_cow;  // block range to copy before writing [first, last)
      std::int64_t new_blocks;
    };
    std::vector<Plan> plans;
    detail::ListedOnce listed(ids.size(), "extend");
    SharedWrites shared;
    std::int64_t needed = 0;
    try {  // the plan's own bookkeeping failing is reported as pool_exhausted too
      plans.reserve(ids.size());
      for (std::size_t i = 0; i < ids.size(); ++i) {
        Sequence& s = find(ids[i])->second;
        listed.check(ids[i]);
        if (counts[i] < 0) detail::fail<shape_error>("extend sequence ", ids[i], " by ", counts[i], " tokens: must be >= 0");
        const std::int64_t new_length = checked_add(s.length, counts[i], "sequence length");
        const std::int64_t cap = capacity_tokens();
        if (new_length > cap)
          detail::fail<capacity_error>("sequence ", ids[i], " of length ", s.length, " cannot grow by ", counts[i],
                                       " tokens: capacity is ", cap, " tokens");
        const std::int64_t have = static_cast<std::int64_t>(s.blocks.size());
        const std::int64_t want = ceil_div(new_length, layout_.block_tokens());
        Plan p{&s, new_length, 0, 0, std::max<std::int64_t>(0, want - have)};
        if (counts[i] > 0) {  // blocks that will be written and are shared with a fork get copied
          p.first_cow = s.length / layout_.block_tokens();
          p.last_cow = std::min(have, want);
          shared.add(*this, s, p.first_cow, p.last_cow);
        }
        needed = checked_add(needed, p.new_blocks, "blocks to add");
        plans.push_back(p);
      }
    } catch (...) {
      rethrow_out_of_memory(needed, "planning an extend");
    }
    const std::int64_t copies = shared.copies();
    needed = checked_add(needed, copies, "blocks to add");
    Acquired acquired = acquire_blocks(
        needed, ids.size() == 1 ? detail::message("sequence ", ids[0]) : detail::message("a batch of ", ids.size(), " sequences"));
    const std::vector<std::byte*>& fresh = acquired.blocks;
    try {
      // After the pool's checks, so that a size beyond any pool is reported as one.
      std::int64_t live = live_tokens_;
      for (const Plan& p : plans) live = checked_add(live, p.new_length - p.seq->length, "live tokens");
      (void)checked_live_tokens(live);
      for (const Plan& p : plans) p.seq->blocks.reserve(static_cast<std::size_t>(p.new_length / layout_.block_tokens() + 1));
      if (record) {
        record->grown.reserve(plans.size());
        record->copied.reserve(static_cast<std::size_t>(copies));
      }
    } catch (...) {
      undo_acquire(acquired);
      rethrow_out_of_memory(needed, "a sequence's block table");
    }
    // Commit: nothing below throws.
    std::size_t next = 0;
    for (const Plan& p : plans) next = unshare(shared, *p.seq, p.first_cow, p.last_cow, fresh, next, record);
    for (const Plan& p : plans) {
      if (record) record->grown.push_back({p.seq, p.seq->length, p.seq->blocks.size()});
      for (std::int64_t b = 0; b < p.new_blocks; ++b) p.seq->blocks.push_back(fresh[next++]);
      live_tokens_ += p.new_length - p.seq->length;
      p.seq->length = p.new_length;
    }
    if (record) record->acquired = std::move(acquired);
  }

 public:
  /// Writes K/V rows for tokens [pos, pos + n) of a producer layer, converting f32 to the storage
  /// type (round to nearest even). k and v are [n][Hkv][d] with `token_stride` floats between tokens
  /// (0 means Hkv x d). The positions must exist (extend first).
  void write(seq_id id, int layer, std::int64_t pos, std::int64_t n, const float* k, const float* v,
             std::int64_t token_stride = 0) {
    write(std::span<const seq_id>(&id, 1), layer, std::span<const std::int64_t>(&pos, 1), std::span<const std::int64_t>(&n, 1), k, v,
          token_stride);
  }

  /// write() for a batch, all or nothing: sequence ids[b] gets counts[b] tokens from positions[b] on,
  /// its rows right after the previous sequence's in k and v ([sum of counts][Hkv][d], token_stride
  /// floats apart). The blocks it writes that are shared with forks are copied, for the whole batch,
  /// before any row is written, so a failure (an exhausted pool) changes nothing; a block that only
  /// the batch's sequences share and all of them write stays with one of them (SharedWrites).
  void write(std::span<const seq_id> ids, int layer, std::span<const std::int64_t> positions, std::span<const std::int64_t> counts,
             const float* k, const float* v, std::int64_t token_stride = 0) {
    write_rows(ids, layer, positions, counts, k, v, token_stride, 1, "write", nullptr, float_row_writer());
  }

  class ChangeGuard;

  /// write() for a batch, which the returned guard takes back unless committed: the copies of
  /// blocks shared with forks go back to their sharing, the rows written into a shared block kept
  /// (one that only the batch's sequences share) get their old bytes back, and the blocks taken go
  /// to where they came from. (Rows written into blocks no other sequence shares keep their new
  /// contents: positions whose contents were unspecified since extend, or rewritten with the same
  /// K/V.) For callers whose work after the write may fail (AttentionLayer::forward).
  [[nodiscard]] ChangeGuard write_guarded(std::span<const seq_id> ids, int layer, std::span<const std::int64_t> positions,
                                          std::span<const std::int64_t> counts, const float* k, const float* v,
                                          std::int64_t token_stride = 0) {
    ChangeRecord record;
    write_rows(ids, layer, positions, counts, k, v, token_stride, 1, "write", &record, float_row_writer());
    return ChangeGuard(this, std::move(record));
  }

 private:
  /// write()'s row copy: f32 values rounded to the storage type (nearest even).
  auto float_row_writer() const {
    return [this](auto tag, std::byte* dst, const float* src) {
      using S = storage<decltype(tag)::value>;
      auto* d = reinterpret_cast<typename S::type*>(dst);
      for (int i = 0; i < config_.heads().head_dim(); ++i) d[i] = S::store(src[i]);
    };
  }

 public:
  /// Like write(), but k and v already hold the storage type's elements (f32, or the raw 16 bits of
  /// f16/bf16), [n][Hkv][d] with `token_stride` elements between tokens: for engines that convert
  /// or quantize K/V themselves. Bytes are copied as they are.
  void write_stored(seq_id id, int layer, std::int64_t pos, std::int64_t n, const void* k, const void* v,
                    std::int64_t token_stride = 0) {
    write_rows(std::span<const seq_id>(&id, 1), layer, std::span<const std::int64_t>(&pos, 1), std::span<const std::int64_t>(&n, 1),
               static_cast<const std::byte*>(k), static_cast<const std::byte*>(v), token_stride, dtype_bytes(config_.dtype()),
               "write_stored", nullptr,
               [&](auto, std::byte* dst, const std::byte* src) {
                 std::memcpy(dst, src, static_cast<std::size_t>(config_.row_bytes()));
               });
  }

  /// Appends n tokens to a sequence for every producer slot at once: k and v are
  /// [n_kv_layers][n][Hkv][d], contiguous. All or nothing.
  void append(seq_id id, std::int64_t n, const float* k, const float* v) {
    const Sequence& s = find(id)->second;
    if (n < 0) detail::fail<shape_error>("append ", n, " tokens to sequence ", id, ": must be >= 0");
    if (n > 0 && (k == nullptr || v == nullptr)) detail::fail<shape_error>("append: null K or V pointer");
    const std::int64_t pos = s.length;
    const std::int64_t slot_floats = checked_product("append size", n, config_.heads().kv_heads(), config_.heads().head_dim());
    extend(id, n);
    for (int slot = 0; slot < config_.n_kv_layers(); ++slot)
      write(id, config_.layers().producer_of_slot(slot), pos, n, k + slot * slot_floats, v + slot * slot_floats);
  }

  /// Reads back token pos of a layer's K/V as f32, [Hkv][d] each (for tests and debugging).
  void read(seq_id id, int layer, std::int64_t pos, float* k_out, float* v_out) const {
    const KvSequenceView qv = sequence_view(id);
    if (pos < 0 || pos >= qv.length) detail::fail<shape_error>("read token ", pos, " of sequence ", id, " of length ", qv.length);
    const KvSlotView sv = slot_view(layer);
    visit_dtype(config_.dtype(), [&](auto tag) {
      using S = storage<decltype(tag)::value>;
      using T = typename S::type;
      for (int h = 0; h < sv.kv_heads; ++h)
        for (int i = 0; i < sv.head_dim; ++i) {
          k_out[h * sv.head_dim + i] = S::load(reinterpret_cast<const T*>(k_row(sv, qv, h, pos))[i]);
          v_out[h * sv.head_dim + i] = S::load(reinterpret_cast<const T*>(v_row(sv, qv, h, pos))[i]);
        }
    });
  }

  // ---- queries ------------------------------------------------------------------------------

  bool contains(seq_id id) const { return seqs_.contains(id); }
  std::int64_t length(seq_id id) const { return find(id)->second.length; }
  std::size_t num_sequences() const { return seqs_.size(); }
  /// Tokens one sequence can hold.
  std::int64_t capacity_tokens() const {
    const std::int64_t m = layout_.max_blocks_per_sequence();
    return m == unlimited ? unlimited : m * layout_.block_tokens();
  }

  // ---- byte accounting (exact) --------------------------------------------------------------

  /// Cache bytes one token costs (= config().kv_bytes_per_token()).
  std::int64_t bytes_per_token() const { return config_.kv_bytes_per_token(); }
  /// Bytes of one block (block_tokens x bytes_per_token).
  std::int64_t block_bytes() const { return block_bytes_; }
  /// Bytes currently held from the memory resource: blocks in use plus the free list.
  std::int64_t reserved_bytes() const { return (blocks_in_use() + free_blocks()) * block_bytes_; }
  /// Bytes holding live tokens: the sum of sequence lengths x bytes_per_token (a forked prefix
  /// counts once per sequence that reads it).
  std::int64_t live_bytes() const { return live_tokens_ * bytes_per_token(); }
  std::int64_t live_tokens() const { return live_tokens_; }
  std::int64_t blocks_in_use() const { return static_cast<std::int64_t>(refcount_.size()); }
  std::int64_t free_blocks() const { return static_cast<std::int64_t>(free_.size()); }
  /// Returns the free list's blocks to the memory resource.
  void release_free_blocks() {
    for (std::byte* b : free_) resource_->deallocate(b, static_cast<std::size_t>(block_bytes_), block_alignment);
    free_.clear();
  }

  // ---- views for kernels --------------------------------------------------------------------

  /// Where layer `layer` finds its K/V inside a block (a consumer gets its producer's slot).
  KvSlotView slot_view(int layer) const { return slot_view_of(config_.layers().slot_of(layer)); }
  KvSequenceView sequence_view(seq_id id) const {
    const Sequence& s = find(id)->second;
    return {s.blocks.data(), s.length, static_cast<std::int64_t>(s.blocks.size())};
  }

 private:
  struct Sequence {
    std::vector<std::byte*> blocks;
    std::int64_t length = 0;
  };

  typename std::unordered_map<seq_id, Sequence>::iterator find(seq_id id) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) detail::fail<sequence_error>("unknown sequence ", id);
    return it;
  }
  typename std::unordered_map<seq_id, Sequence>::const_iterator find(seq_id id) const {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) detail::fail<sequence_error>("unknown sequence ", id);
    return it;
  }

  int producer_slot(int layer) const {
    const LayerSharingMap& m = config_.layers();
    if (!m.is_producer(layer))
      detail::fail<config_error>("layer ", layer, " reads the K/V of layer ", m.source_of(layer),
                                 " and writes none of its own");
    return m.slot_of(layer);
  }

  /// Validates a batch write to a producer layer (sequence ids[b]: counts[b] tokens from
  /// positions[b] on), copies the blocks shared with forks, then calls copy(dtype tag, destination
  /// row, source row) for every (token, KV head). Source: the sequences' tokens back to back,
  /// `token_stride` elements apart (0: Hkv x d), KV heads d elements apart; an element is `unit`
  /// Src values (1 float, or the storage type's bytes). Checks in the order of the single write:
  /// layer, sequences, stride, ranges.
  template <class Src, class Copy>
  void write_rows(std::span<const seq_id> ids, int layer, std::span<const std::int64_t> positions,
                  std::span<const std::int64_t> counts, const Src* k, const Src* v, std::int64_t token_stride,
                  std::int64_t unit, const char* what, ChangeRecord* record, Copy&& copy) {
    const int slot = producer_slot(layer);
    if (positions.size() != ids.size() || counts.size() != ids.size())
      detail::fail<shape_error>(what, ": ", ids.size(), " sequence ids, ", positions.size(), " positions and ", counts.size(),
                                " token counts");
    for (seq_id id : ids) (void)find(id);
    const std::int64_t row = std::int64_t{config_.heads().kv_heads()} * config_.heads().head_dim();
    const std::int64_t stride_units = checked_mul(resolved_token_stride(token_stride, row, what), unit, "token stride");
    // Check everything and plan the copies of blocks shared with a fork before changing anything.
    const bool batch = ids.size() > 1;
    detail::ListedOnce listed(ids.size(), what);
    SharedWrites shared;
    std::int64_t copies = 0, tokens = 0;
    try {  // the bookkeeping failing is reported as pool_exhausted too
      for (std::size_t b = 0; b < ids.size(); ++b) {
        const Sequence& s = find(ids[b])->second;
        listed.check(ids[b]);
        const std::int64_t pos = positions[b], n = counts[b];
        if (n < 0 || pos < 0 || pos > s.length || n > s.length - pos)  // in this order, nothing overflows
          detail::fail<shape_error>(what, ": ", n, " tokens from position ", pos, " of sequence ", ids[b], " of length ", s.length);
        if (n > 0 && (k == nullptr || v == nullptr)) detail::fail<shape_error>(what, ": null K or V pointer");
        tokens += n;  // no overflow: each n is within its own sequence, listed once
        const auto [first, last] = written_blocks(pos, n);
        shared.add(*this, s, first, last);
      }
      copies = shared.copies();
      if (record) {
        record->copied.reserve(static_cast<std::size_t>(copies));
        // The rows a sequence writes into a shared block it keeps, saved for the undo.
        std::int64_t saved = 0;
        for (std::size_t b = 0; b < ids.size(); ++b) {
          const Sequence& s = find(ids[b])->second;
          const auto [first, last] = written_blocks(positions[b], counts[b]);
          for (std::int64_t i = first; i < last; ++i)
            if (shared.keeps(s, s.blocks[static_cast<std::size_t>(i)]))
              saved += std::min(positions[b] + counts[b], (i + 1) * layout_.block_tokens()) -
                       std::max(positions[b], i * layout_.block_tokens());
        }
        const std::int64_t rows = checked_product("saved rows", saved, 2, config_.heads().kv_heads());
        record->saved_rows.reserve(static_cast<std::size_t>(rows));
        record->saved_bytes.reserve(static_cast<std::size_t>(checked_mul(rows, config_.row_bytes(), "saved rows")));
      }
    } catch (...) {
      rethrow_out_of_memory(copies, detail::message(what, " (copies of blocks shared with forks)"));
    }
    // The source rows read: the last token's row must be addressable without overflow.
    if (tokens > 0) check_extent(tokens, stride_units, row * unit, sizeof(Src), "K/V source extent");
    Acquired acquired;
    if (copies > 0)
      acquired = acquire_blocks(copies, batch ? detail::message("copying blocks shared with forks for a batch of ", ids.size(),
                                                                " sequences")
                                              : detail::message("copying sequence ", ids[0], "'s blocks shared with a fork"));
    // Commit: nothing below throws. Every copy is made, for the whole batch, before any row is
    // written, so no copy takes a row of this call.
    std::size_t next = 0;
    for (std::size_t b = 0; b < ids.size(); ++b) {
      const auto [first, last] = written_blocks(positions[b], counts[b]);
      next = unshare(shared, find(ids[b])->second, first, last, acquired.blocks, next, record);
    }
    const KvSlotView sv = slot_view_of(slot);
    const std::int64_t head_units = std::int64_t{sv.head_dim} * unit;
    const auto row_bytes = static_cast<std::size_t>(sv.row_bytes);
    std::int64_t t0 = 0;  // the sequence's first source token (a pointer moved past the last would wrap)
    for (std::size_t b = 0; b < ids.size(); ++b) {
      Sequence& s = find(ids[b])->second;
      const std::int64_t pos = positions[b], n = counts[b];
      visit_dtype(config_.dtype(), [&](auto tag) {
        for (std::int64_t t = 0; t < n; ++t) {
          const std::int64_t p = pos + t;
          std::byte* block = s.blocks[static_cast<std::size_t>(p / sv.block_tokens)];
          const bool save = record != nullptr && shared.keeps(s, block);
          for (int h = 0; h < sv.kv_heads; ++h) {
            const std::int64_t at = sv.row_offset(h, p % sv.block_tokens);
            if (save)
              for (std::byte* row : {block + sv.k_offset + at, block + sv.v_offset + at}) {  // reserved: no throw
                record->saved_rows.push_back(row);
                record->saved_bytes.insert(record->saved_bytes.end(), row, row + row_bytes);
              }
            copy(tag, block + sv.k_offset + at, k + (t0 + t) * stride_units + h * head_units);
            copy(tag, block + sv.v_offset + at, v + (t0 + t) * stride_units + h * head_units);
          }
        }
      });
      t0 += n;
    }
    if (record) record->acquired = std::move(acquired);
  }

  /// The blocks [first, last) of a sequence that tokens [pos, pos + n) lie in (none when n is 0).
  std::pair<std::int64_t, std::int64_t> written_blocks(std::int64_t pos, std::int64_t n) const {
    const std::int64_t first = pos / layout_.block_tokens();
    return {first, n > 0 ? (pos + n - 1) / layout_.block_tokens() + 1 : first};
  }

  /// The copy-on-write plan of one batch (extend or write): for each block that the batch's
  /// sequences write while it is shared, how many of them write it and which one keeps it. A block
  /// also shared with a sequence outside the batch (or not written by all its sharers) is copied by
  /// every writer; one whose sharers all write it stays with the longest of them (the last listed
  /// among equals), the others copy it. That keeps the copies as few as in sequence-by-sequence
  /// copy-on-write, and an extend's new rows in the kept block lie at or past every other sharer's
  /// length, so an undo that gives those sharers the block back shows them nothing new (ChangeGuard).
  class SharedWrites {
   public:
    /// Planning (may allocate): sequence s writes its blocks [first, last).
    void add(const KvCache& cache, const Sequence& s, std::int64_t first, std::int64_t last) {
      for (std::int64_t i = first; i < last; ++i) {
        std::byte* block = s.blocks[static_cast<std::size_t>(i)];
        const std::int64_t refs = cache.refcount_.find(block)->second;
        if (refs < 2) continue;
        Writers& w = blocks_.try_emplace(block, Writers{refs}).first->second;
        ++w.count;
        if (w.keeper == nullptr || s.length >= w.keeper->length) w.keeper = &s;
      }
    }
    /// Blocks to copy: every writer's, but one per block its writers alone share.
    std::int64_t copies() const {
      std::int64_t n = 0;
      for (const auto& [block, w] : blocks_) n += w.count - (w.all_write() ? 1 : 0);
      return n;
    }
    /// Whether s keeps `block` (planned, written by all its sharers, s the longest). Never throws.
    bool keeps(const Sequence& s, std::byte* block) const noexcept {
      const auto it = blocks_.find(block);
      return it != blocks_.end() && it->second.kept_by(s);
    }
    /// Whether s copies `block` before writing it (planned, and s does not keep it). Never throws.
    bool copied_by(const Sequence& s, std::byte* block) const noexcept {
      const auto it = blocks_.find(block);
      return it != blocks_.end() && !it->second.kept_by(s);
    }

   private:
    struct Writers {
      std::int64_t refs;       // references when planned
      std::int64_t count = 0;  // sequences of the batch writing it
      const Sequence* keeper = nullptr;  // the longest writer (lengths do not change while planning)
      bool all_write() const { return count == refs; }
      bool kept_by(const Sequence& s) const { return all_write() && keeper == &s; }
    };
    std::unordered_map<std::byte*, Writers> blocks_;
  };

  /// A call's token stride in elements (0: rows of `row` elements back to back), refused below `row`.
  static std::int64_t resolved_token_stride(std::int64_t token_stride, std::int64_t row, const char* what) {
    const std::int64_t stride = token_stride == 0 ? row : token_stride;
    if (stride < row) detail::fail<shape_error>(what, ": token stride ", token_stride, " is less than Hkv x d = ", row);
    return stride;
  }

  KvSlotView slot_view_of(int slot) const {
    KvSlotView v;
    v.dtype = config_.dtype();
    v.kv_heads = config_.heads().kv_heads();
    v.head_dim = config_.heads().head_dim();
    v.block_tokens = layout_.block_tokens();
    v.row_bytes = config_.row_bytes();
    v.head_stride = v.block_tokens * v.row_bytes;
    v.k_offset = std::int64_t{slot} * 2 * v.kv_heads * v.head_stride;
    v.v_offset = v.k_offset + v.kv_heads * v.head_stride;
    return v;
  }

  /// Makes the copies the plan gives sequence s among its blocks [first, last): each into the next
  /// of `fresh` (acquired, refcount 1), recorded for an undo if `record` is not null (reserved).
  /// Returns the next unused block of `fresh`. Never throws.
  std::size_t unshare(const SharedWrites& shared, Sequence& s, std::int64_t first, std::int64_t last,
                      const std::vector<std::byte*>& fresh, std::size_t next, ChangeRecord* record) noexcept {
    for (std::int64_t i = first; i < last; ++i) {
      std::byte*& block = s.blocks[static_cast<std::size_t>(i)];
      if (!shared.copied_by(s, block)) continue;
      if (record) record->copied.push_back({&s, static_cast<std::size_t>(i), block});
      std::memcpy(fresh[next], block, static_cast<std::size_t>(block_bytes_));
      --refcount_.find(block)->second;
      block = fresh[next++];
    }
    return next;
  }

  /// Blocks taken by acquire_blocks: the first `from_free` came from the free list.
  struct Acquired {
    std::vector<std::byte*> blocks;
    std::size_t from_free = 0;
  };

  /// Throws pool_exhausted (naming `what`) when one more sequence would not fit: where every
  /// sequence reserves blocks (blocks_on_add() > 0, e.g. ContiguousLayout's max_sequences), each
  /// one counts, forks included, though a fork takes no block of its own until it writes.
  void check_room_for_sequence(const std::string& what) const {
    const std::int64_t per_sequence = layout_.blocks_on_add();
    if (per_sequence > 0 && layout_.max_blocks() != unlimited &&
        static_cast<std::int64_t>(seqs_.size()) + 1 > layout_.max_blocks() / per_sequence)
      detail::fail<pool_exhausted>(what, ": ", seqs_.size(), " sequences of ", per_sequence,
                                   " block(s) each already fill the pool of ", layout_.max_blocks());
  }

  /// Takes n blocks (free list first, then the resource) with refcount 1, or throws pool_exhausted
  /// leaving everything as it was.
  Acquired acquire_blocks(std::int64_t n, const std::string& for_what) {
    if (n == 0) return {};
    const std::int64_t in_use = blocks_in_use();
    if (layout_.max_blocks() != unlimited && n > layout_.max_blocks() - in_use)
      detail::fail<pool_exhausted>("KV block pool exhausted: ", for_what, " needs ", n, " more block(s), ",
                                   in_use, " of ", layout_.max_blocks(), " are in use");
    // Held and new blocks together (so that reserved_bytes() cannot overflow either).
    if (std::int64_t bytes = 0;
        __builtin_add_overflow(in_use + free_blocks(), n, &bytes) || __builtin_mul_overflow(bytes, block_bytes_, &bytes))
      detail::fail<pool_exhausted>(for_what, " needs ", n, " block(s) of ", block_bytes_, " bytes: more than 64-bit memory holds");
    std::vector<std::byte*> out;
    std::size_t from_free = 0, counted = 0;
    try {
      out.reserve(static_cast<std::size_t>(n));
      while (static_cast<std::int64_t>(out.size()) < n && from_free < free_.size())
        out.push_back(free_[free_.size() - 1 - from_free++]);
      while (static_cast<std::int64_t>(out.size()) < n)
        out.push_back(static_cast<std::byte*>(resource_->allocate(static_cast<std::size_t>(block_bytes_), block_alignment)));
      // Room for every block to come back to the free list, so release_block never allocates.
      free_.reserve(static_cast<std::size_t>(in_use + free_blocks()) + out.size() - from_free);
      for (; counted < out.size(); ++counted) refcount_.emplace(out[counted], 1);
    } catch (...) {
      for (std::size_t i = 0; i < counted; ++i) refcount_.erase(out[i]);
      for (std::size_t i = from_free; i < out.size(); ++i)
        resource_->deallocate(out[i], static_cast<std::size_t>(block_bytes_), block_alignment);
      rethrow_out_of_memory(n, for_what);
    }
    free_.resize(free_.size() - from_free);
    return {std::move(out), from_free};
  }

  /// `live` (a live-token count a call would leave), checked so that live_bytes() cannot overflow.
  std::int64_t checked_live_tokens(std::int64_t live) const {
    (void)checked_mul(live, bytes_per_token(), "live bytes");
    return live;
  }

  /// Inside a catch block: rethrows the current exception, an allocation failure (std::bad_alloc,
  /// or std::length_error from a container asked for more than it can hold) as pool_exhausted.
  [[noreturn]] void rethrow_out_of_memory(std::int64_t n, const std::string& for_what) const {
    try {
      throw;
    } catch (const std::bad_alloc&) {
    } catch (const std::length_error&) {
    }
    detail::fail<pool_exhausted>("out of memory while taking ", n, " block(s) of ", block_bytes_, " bytes for ",
                                 for_what, " (memory resource or bookkeeping)");
  }

  /// Undoes acquire_blocks exactly: free-list blocks go back to the free list (capacity is reserved),
  /// the others back to the memory resource. Never throws.
  void undo_acquire(const Acquired& a) noexcept {
    for (std::size_t i = a.blocks.size(); i-- > 0;) {  // reverse: restores the free list's order
      refcount_.erase(a.blocks[i]);
      if (i < a.from_free)
        free_.push_back(a.blocks[i]);
      else
        resource_->deallocate(a.blocks[i], static_cast<std::size_t>(block_bytes_), block_alignment);
    }
  }

  /// Drops one reference; the last one sends the block to the free list or the resource. Never throws.
  void release_block(std::byte* block) noexcept {
    auto it = refcount_.find(block);
    if (--it->second > 0) return;
    refcount_.erase(it);
    if (layout_.keeps_free_blocks())
      free_.push_back(block);  // capacity reserved in acquire_blocks
    else
      resource_->deallocate(block, static_cast<std::size_t>(block_bytes_), block_alignment);
  }

  /// What undo_change needs: the sequences' lengths and block counts before, the shared blocks
  /// that were copied (with their originals), the rows a write overwrote in a shared block it kept
  /// (where, and their bytes, row_bytes each), and the blocks taken.
  struct ChangeRecord {
    struct Grown {
      Sequence* seq;
      std::int64_t old_length;
      std::size_t old_blocks;
    };
    struct Copied {
      Sequence* seq;
      std::size_t index;
      std::byte* original;
    };
    std::vector<Grown> grown;
    std::vector<Copied> copied;
    std::vector<std::byte*> saved_rows;
    std::vector<std::byte> saved_bytes;
    Acquired acquired;
  };

  /// Takes back a recorded extend or write exactly (a write's rows in blocks no other sequence
  /// shared excepted). Never throws.
  void undo_change(ChangeRecord& r) noexcept {
    const auto row_bytes = static_cast<std::size_t>(config_.row_bytes());
    for (std::size_t i = 0; i < r.saved_rows.size(); ++i) std::memcpy(r.saved_rows[i], r.saved_bytes.data() + i * row_bytes, row_bytes);
    for (auto c = r.copied.rbegin(); c != r.copied.rend(); ++c) {
      ++refcount_.find(c->original)->second;
      c->seq->blocks[c->index] = c->original;
    }
    for (const typename ChangeRecord::Grown& g : r.grown) {
      live_tokens_ -= g.seq->length - g.old_length;
      g.seq->length = g.old_length;
      g.seq->blocks.erase(g.seq->blocks.begin() + static_cast<std::ptrdiff_t>(g.old_blocks), g.seq->blocks.end());
    }
    undo_acquire(r.acquired);  // the copies and the new blocks, in reverse
  }

  ModelConfig config_;
  Layout layout_;
  std::pmr::memory_resource* resource_;
  std::int64_t block_bytes_ = 0;
  std::unordered_map<seq_id, Sequence> seqs_;
  std::unordered_map<std::byte*, std::int64_t> refcount_;  // 64 bits: no count of forks overflows it
  std::vector<std::byte*> free_;
  std::int64_t live_tokens_ = 0;

 public:
  /// The undo of an extend_guarded() or a write_guarded(): unless commit() is called, its destructor
  /// returns the sequences to their lengths and blocks, the blocks copied from forks to their
  /// sharing, and the blocks taken to the free list or the memory resource they came from, in
  /// order, as if the call had not been made: every sequence reads what it read before. (A write's
  /// rows in blocks no other sequence shared keep their new contents, at positions only the writer
  /// reads. An extend's block that only the batch's sequences share stays with the longest of them,
  /// so the rows written at its new positions lie past every other sharer's length.) While it is
  /// live, the cache may be read, and written at the new positions (under guards of their own,
  /// destroyed first); anything else that changes sequences or blocks is not allowed.
  class ChangeGuard {
   public:
    ChangeGuard(const ChangeGuard&) = delete;
    ChangeGuard& operator=(const ChangeGuard&) = delete;
    ~ChangeGuard() {
      if (cache_) cache_->undo_change(record_);
    }
    /// Keeps the change.
    void commit() noexcept { cache_ = nullptr; }

   private:
    friend class KvCache;
    ChangeGuard(KvCache* cache, ChangeRecord&& record) noexcept : cache_(cache), record_(std::move(record)) {}
    KvCache* cache_;
    ChangeRecord record_;
  };

  /// extend(ids, counts), which the returned guard takes back exactly unless committed: for callers
  /// whose work after the extend may fail (AttentionStack::forward).
  [[nodiscard]] ChangeGuard extend_guarded(std::span<const seq_id> ids, std::span<const std::int64_t> counts) {
    ChangeRecord record;
    extend_impl(ids, counts, &record);
    return ChangeGuard(this, std::move(record));
  }
};

}  // namespace kvattn
