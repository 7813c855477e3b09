// Non-owning views of cached K/V: what kernels see. Contiguous and paged caches (and an engine's
// own page tables) all reduce to these, so one kernel serves every layout.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvattn/config/dtype.hpp"

namespace kvattn {

/// Geometry of one cache slot (one producer layer's K/V) inside a block.
/// A block holds, for every slot, K then V, each as [Hkv][block_tokens][d] elements, so the rows of
/// one KV head are contiguous within a block (the "HND" layout: streaming-friendly for decode).
struct KvSlotView {
  kv_dtype dtype = kv_dtype::f32;
  int kv_heads = 0;
  int head_dim = 0;
  std::int64_t block_tokens = 0;
  std::int64_t row_bytes = 0;         ///< d x element size
  std::int64_t head_stride = 0;       ///< bytes between KV heads in a block (block_tokens x row_bytes)
  std::int64_t k_offset = 0;          ///< byte offset of this slot's K in a block
  std::int64_t v_offset = 0;          ///< byte offset of this slot's V in a block

  /// Byte offset of the K (or V) row of token t (block-local index) of KV head h.
  std::int64_t row_offset(int h, std::int64_t t_in_block) const { return h * head_stride + t_in_block * row_bytes; }
};

/// One sequence's K/V: its block table and length. Blocks are shared by all slots.
struct KvSequenceView {
  const std::byte* const* blocks = nullptr;
  std::int64_t length = 0;
  /// Entries of `blocks` (KvCache's views: at least ceil(length / block_tokens); a layout may hold
  /// more, reserved ahead of the length). Kernels do not read it: they use the blocks the length covers.
  std::int64_t block_count = 0;
};

/// Pointer to the K row of token t, KV head h. No checks: views are validated at the API boundary.
inline const std::byte* k_row(const KvSlotView& s, const KvSequenceView& q, int h, std::int64_t t) {
  return q.blocks[t / s.block_tokens] + s.k_offset + s.row_offset(h, t % s.block_tokens);
}
inline const std::byte* v_row(const KvSlotView& s, const KvSequenceView& q, int h, std::int64_t t) {
  return q.blocks[t / s.block_tokens] + s.v_offset + s.row_offset(h, t % s.block_tokens);
}

/// Walks consecutive K (or V) rows of one KV head from token t < the sequence's length: one division
/// to start, then a pointer step per row and a table lookup per block.
class KvRowCursor {
 public:
  KvRowCursor(const KvSlotView& s, const KvSequenceView& q, int h, std::int64_t t, bool values)
      : blocks_(q.blocks), block_(t / s.block_tokens), left_in_block_(s.block_tokens - t % s.block_tokens),
        block_tokens_(s.block_tokens), row_bytes_(s.row_bytes),
        head_offset_((values ? s.v_offset : s.k_offset) + h * s.head_stride),
        blocks_end_((q.length + s.block_tokens - 1) / s.block_tokens),
        row_(blocks_[block_] + head_offset_ + (t % s.block_tokens) * row_bytes_) {}
  const std::byte* row() const { return row_; }
  /// out[0 .. n) = the next n rows (as const T*), then moves past them: a block's rows at a time,
  /// a multiply-add each and no per-row branch (a decode tile's 64 row pointers: 2.5% of its time
  /// row by row with next(); GQA 4/1 d=128, one thread, 2048 keys in L2).
  template <class T>
  void take(int n, const T** out) {
    while (n > 0) {
      const int m = static_cast<int>(n < left_in_block_ ? n : left_in_block_);
      for (int i = 0; i < m; ++i) out[i] = reinterpret_cast<const T*>(row_ + i * row_bytes_);
      out += m;
      n -= m;
      skip(m);
    }
  }
  void next() { skip(1); }

 private:
  /// Moves past m <= left_in_block_ rows.
  void skip(std::int64_t m) {
    if (m == left_in_block_) {
      left_in_block_ = block_tokens_;
      if (++block_ < blocks_end_) row_ = blocks_[block_] + head_offset_;  // past the end: stays, unread
    } else {
      left_in_block_ -= m;
      row_ += m * row_bytes_;
    }
  }

  const std::byte* const* blocks_;
  std::int64_t block_, left_in_block_, block_tokens_, row_bytes_, head_offset_, blocks_end_;
  const std::byte* row_;
};

}  // namespace kvattn
