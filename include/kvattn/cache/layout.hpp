// Layout policies: how a KV cache carves sequences into blocks. A policy only describes; the cache
// (kv_cache.hpp) does the bookkeeping, so a user-written policy is a few lines.
#pragma once

#include <concepts>
#include <cstdint>
#include <limits>
#include <string_view>

#include "kvattn/config/errors.hpp"

namespace kvattn {

inline constexpr std::int64_t unlimited = std::numeric_limits<std::int64_t>::max();

/// What the cache asks of a layout policy:
///  - block_tokens(): tokens per block (a block holds them for every slot, K and V, every KV head);
///  - blocks_on_add(): blocks a sequence takes when added and keeps until removed (reserve up front);
///  - max_blocks_per_sequence(): per-sequence capacity, in blocks (`unlimited` allowed);
///  - max_blocks(): the pool's size in blocks across all sequences (`unlimited` allowed);
///  - keeps_free_blocks(): whether released blocks go to a free list for reuse (true) or back to
///    the memory resource at once (false).
template <class L>
concept KvLayoutPolicy = std::copy_constructible<L> && requires(const L& l) {
  { l.block_tokens() } -> std::convertible_to<std::int64_t>;
  { l.blocks_on_add() } -> std::convertible_to<std::int64_t>;
  { l.max_blocks_per_sequence() } -> std::convertible_to<std::int64_t>;
  { l.max_blocks() } -> std::convertible_to<std::int64_t>;
  { l.keeps_free_blocks() } -> std::convertible_to<bool>;
  { L::name } -> std::convertible_to<std::string_view>;
};

/// Each sequence reserves max_tokens up front, in one block; memory returns to the resource on remove.
struct ContiguousLayout {
  static constexpr std::string_view name = "contiguous";
  std::int64_t max_tokens = 4096;       ///< capacity of every sequence
  std::int64_t max_sequences = unlimited;  ///< live sequences at most (each holds one block)

  std::int64_t block_tokens() const { return max_tokens; }
  std::int64_t blocks_on_add() const { return 1; }
  std::int64_t max_blocks_per_sequence() const { return 1; }
  std::int64_t max_blocks() const { return max_sequences; }
  bool keeps_free_blocks() const { return false; }
};

/// Fixed-size blocks of block_size tokens from a pool of at most pool_blocks blocks, allocated on
/// demand and recycled through a free list (vLLM / FlashInfer style paging).
struct PagedLayout {
  static constexpr std::string_view name = "paged";
  std::int64_t block_size = 16;
  std::int64_t pool_blocks = unlimited;
  std::int64_t max_sequence_blocks = unlimited;

  std::int64_t block_tokens() const { return block_size; }
  std::int64_t blocks_on_add() const { return 0; }
  std::int64_t max_blocks_per_sequence() const { return max_sequence_blocks; }
  std::int64_t max_blocks() const { return pool_blocks; }
  bool keeps_free_blocks() const { return true; }
};

namespace detail {
template <KvLayoutPolicy L>
void validate_layout(const L& l) {
  // Named by the policy's functions and the built-in layouts' fields behind them.
  if (l.block_tokens() < 1)
    fail<config_error>(L::name, " layout: block_tokens() (ContiguousLayout::max_tokens, PagedLayout::block_size) must be >= 1, got ",
                       l.block_tokens());
  if (l.blocks_on_add() < 0) fail<config_error>(L::name, " layout: blocks_on_add() must be >= 0, got ", l.blocks_on_add());
  if (l.max_blocks_per_sequence() < 1 || l.max_blocks_per_sequence() < l.blocks_on_add())
    fail<config_error>(L::name, " layout: max_blocks_per_sequence() (PagedLayout::max_sequence_blocks) is ",
                       l.max_blocks_per_sequence(), ": must be >= 1 and >= blocks_on_add() (", l.blocks_on_add(), ")");
  if (l.max_blocks() < 1 || l.max_blocks() < l.blocks_on_add())
    fail<config_error>(L::name, " layout: max_blocks() (ContiguousLayout::max_sequences, PagedLayout::pool_blocks) is ",
                       l.max_blocks(), ": must be >= 1 and >= blocks_on_add() (", l.blocks_on_add(), "), or no sequence fits");
}
}  // namespace detail

}  // namespace kvattn
