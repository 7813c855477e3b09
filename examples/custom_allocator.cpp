// A KV cache on memory you control, through std::pmr.
//
// KvCache takes its K/V blocks from any std::pmr::memory_resource (its small bookkeeping uses the
// ordinary heap). Here the blocks come from a fixed arena, a monotonic_buffer_resource over a
// static buffer with null_memory_resource() upstream so that it can never fall back to the heap,
// seen through a small counting resource that prints every call. We show that:
//   1. reserved_bytes() is exactly what the resource handed out and has not taken back, for a
//      ContiguousLayout (capacity reserved up front) and a PagedLayout (blocks on demand);
//   2. hitting a limit, whether the layout's pool size or the arena's bytes, throws
//      kvattn::pool_exhausted and leaves the cache as it was: same lengths, same bytes;
//   3. kvattn::HugePageResource, for large caches, puts blocks of 2 MiB or more on huge pages.

#include <kvattn/kvattn.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory_resource>
#include <new>
#include <random>
#include <vector>

namespace {

/// Forwards to an upstream resource, printing every call and keeping a running total.
class CountingResource final : public std::pmr::memory_resource {
 public:
  explicit CountingResource(std::pmr::memory_resource* upstream) : upstream_(upstream) {}

  /// Bytes handed out and not yet returned.
  std::int64_t outstanding() const { return outstanding_; }

 private:
  void* do_allocate(std::size_t bytes, std::size_t align) override {
    void* p = nullptr;
    try {
      p = upstream_->allocate(bytes, align);
    } catch (const std::bad_alloc&) {
      std::printf("      resource: allocate   %6zu B  FAILED (arena full)\n", bytes);
      throw;  // the cache turns this into kvattn::pool_exhausted
    }
    outstanding_ += static_cast<std::int64_t>(bytes);
    std::printf("      resource: allocate   %6zu B  -> %6lld B outstanding\n", bytes,
                static_cast<long long>(outstanding_));
    return p;
  }

  void do_deallocate(void* p, std::size_t bytes, std::size_t align) override {
    upstream_->deallocate(p, bytes, align);
    outstanding_ -= static_cast<std::int64_t>(bytes);
    std::printf("      resource: deallocate %6zu B  -> %6lld B outstanding\n", bytes,
                static_cast<long long>(outstanding_));
  }

  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  std::pmr::memory_resource* upstream_;
  std::int64_t outstanding_ = 0;
};

// 8 query heads, 2 KV heads of dim 64, 2 layers, f16: 2 x 2 x 64 x 2 x 2 = 1024 bytes per token.
const kvattn::ModelConfig config(kvattn::HeadShape(8, 2, 64), kvattn::LayerSharingMap::none(2), kvattn::kv_dtype::f16);

std::mt19937 rng(1);

/// Appends n tokens of random K/V: append() takes [KV layers][n][Hkv][d] floats for K and for V.
template <class Layout>
void append_tokens(kvattn::KvCache<Layout>& cache, kvattn::seq_id id, std::int64_t n) {
  const auto floats = static_cast<std::size_t>(config.n_kv_layers() * n * config.heads().kv_heads() *
                                               config.heads().head_dim());
  std::normal_distribution<float> normal;
  std::vector<float> k(floats), v(floats);
  for (std::size_t i = 0; i < floats; ++i) k[i] = normal(rng), v[i] = normal(rng);
  cache.append(id, n, k.data(), v.data());
}

/// Prints the cache's state and checks its reserved bytes against what the resource handed out.
template <class Layout>
bool show(const char* what, const kvattn::KvCache<Layout>& cache, const CountingResource& counter) {
  const bool match = cache.reserved_bytes() == counter.outstanding();
  std::printf("    %-40s sequences %zu, tokens %3lld, live %6lld B, reserved %6lld B %s resource %6lld B\n", what,
              cache.num_sequences(), static_cast<long long>(cache.live_tokens()),
              static_cast<long long>(cache.live_bytes()), static_cast<long long>(cache.reserved_bytes()),
              match ? "==" : "!=", static_cast<long long>(counter.outstanding()));
  return match;
}

/// Runs a call expected to throw pool_exhausted; checks that the cache is unchanged afterwards.
template <class Layout, class Call>
bool expect_pool_exhausted(const kvattn::KvCache<Layout>& cache, kvattn::seq_id id, Call call) {
  const std::size_t sequences = cache.num_sequences();
  const std::int64_t length = cache.length(id), live = cache.live_bytes(), reserved = cache.reserved_bytes();
  try {
    call();
  } catch (const kvattn::pool_exhausted& e) {
    const bool same = cache.num_sequences() == sequences && cache.length(id) == length &&
                      cache.live_bytes() == live && cache.reserved_bytes() == reserved;
    std::printf("    -> kvattn::pool_exhausted: %s\n", e.what());
    std::printf("    -> cache %s: %zu sequences, sequence %lld length %lld, live %lld B, reserved %lld B\n",
                same ? "unchanged" : "CHANGED", cache.num_sequences(), static_cast<long long>(id),
                static_cast<long long>(cache.length(id)), static_cast<long long>(cache.live_bytes()),
                static_cast<long long>(cache.reserved_bytes()));
    return same;
  }
  std::printf("    -> no exception: CHECK FAILED\n");
  return false;
}

// Arena storage. Static, not on the stack, so the size is not limited by the thread's stack; 64-byte
// aligned like the blocks the cache asks for, so no bytes are lost to padding.
alignas(64) std::byte contiguous_arena[160 * 1024];
alignas(64) std::byte paged_arena[64 * 1024];
alignas(64) std::byte small_arena[40 * 1024];

/// ContiguousLayout: every sequence takes its whole capacity (max_tokens) when it is added, and
/// gives it back to the resource when removed. Simple and fragmentation-free at a fixed max length.
bool contiguous_demo() {
  std::printf("\n1. ContiguousLayout: 64 tokens per sequence (64 KiB), at most 2 sequences\n");
  // Declared before the cache, so destroyed after it: the cache returns its blocks on destruction.
  std::pmr::monotonic_buffer_resource arena(contiguous_arena, sizeof contiguous_arena,
                                            std::pmr::null_memory_resource());
  CountingResource counter(&arena);
  const kvattn::ContiguousLayout layout{.max_tokens = 64, .max_sequences = 2};
  kvattn::KvCache<kvattn::ContiguousLayout> cache(config, layout, &counter);
  bool ok = true;
  cache.add_sequence(1);
  ok &= show("add sequence 1 (reserves 64 tokens):", cache, counter);
  append_tokens(cache, 1, 10);
  ok &= show("append 10 tokens (no allocation):", cache, counter);
  cache.add_sequence(2);
  ok &= show("add sequence 2:", cache, counter);
  std::printf("    add sequence 3, over max_sequences:\n");
  ok &= expect_pool_exhausted(cache, 1, [&] { cache.add_sequence(3); });
  ok &= !cache.contains(3);
  cache.remove_sequence(2);
  ok &= show("remove sequence 2 (memory returned):", cache, counter);
  // Note: a monotonic arena never reuses returned bytes (until release()). Adding and removing
  // contiguous sequences would eventually exhaust it; pair it with a PagedLayout, whose free list
  // recycles blocks inside the cache, or use an unsynchronized_pool_resource instead.
  std::printf("    destroying the cache returns the rest:\n");
  return ok;
}

/// PagedLayout: blocks of 16 tokens (16 KiB) on demand, at most 4 in the pool. The pool limit is
/// checked before the resource is asked for anything, so an arena sized for the pool never runs out.
bool paged_demo() {
  std::printf("\n2. PagedLayout: blocks of 16 tokens (16 KiB), pool of 4 blocks, over a 64 KiB arena\n");
  std::pmr::monotonic_buffer_resource arena(paged_arena, sizeof paged_arena, std::pmr::null_memory_resource());
  CountingResource counter(&arena);
  kvattn::KvCache<kvattn::PagedLayout> cache(config, kvattn::PagedLayout{.block_size = 16, .pool_blocks = 4}, &counter);
  bool ok = true;
  cache.add_sequence(1);
  cache.add_sequence(2);
  ok &= show("add sequences 1 and 2 (nothing yet):", cache, counter);
  append_tokens(cache, 1, 20);
  ok &= show("append 20 tokens to 1 (2 blocks):", cache, counter);
  append_tokens(cache, 2, 20);
  ok &= show("append 20 tokens to 2 (2 blocks):", cache, counter);
  append_tokens(cache, 1, 12);
  ok &= show("append 12 to 1 (fits its 2nd block):", cache, counter);
  std::printf("    append 13 tokens to 2, needing a 5th block:\n");
  ok &= expect_pool_exhausted(cache, 2, [&] { append_tokens(cache, 2, 13); });
  ok &= show("after the failed append:", cache, counter);
  cache.remove_sequence(1);
  ok &= show("remove 1 (blocks kept on the free list):", cache, counter);
  append_tokens(cache, 2, 13);
  ok &= show("append 13 to 2 (reuses a free block):", cache, counter);
  std::printf("    destroying the cache returns everything:\n");
  return ok;
}

/// The same failure when the arena, not the pool, runs out: the resource throws std::bad_alloc,
/// the cache hands back the blocks it got during the call and throws pool_exhausted.
bool arena_exhaustion_demo() {
  std::printf("\n3. PagedLayout with no pool limit over a 40 KiB arena (room for 2 blocks)\n");
  std::pmr::monotonic_buffer_resource arena(small_arena, sizeof small_arena, std::pmr::null_memory_resource());
  CountingResource counter(&arena);
  kvattn::KvCache<kvattn::PagedLayout> cache(config, kvattn::PagedLayout{.block_size = 16}, &counter);
  bool ok = true;
  cache.add_sequence(7);
  append_tokens(cache, 7, 5);
  ok &= show("append 5 tokens (1 block):", cache, counter);
  std::printf("    append 40 tokens, needing 2 more blocks:\n");
  ok &= expect_pool_exhausted(cache, 7, [&] { append_tokens(cache, 7, 40); });
  ok &= show("after the failed append:", cache, counter);
  // The block handed back during the failed call is lost to this monotonic arena: it does not reuse
  // freed bytes. Size arenas for the layout's pool_blocks so that the pool limit trips first.
  std::printf("    destroying the cache:\n");
  return ok;
}

/// Large caches: kvattn::HugePageResource puts blocks of 2 MiB or more on transparent huge pages
/// (Linux), so a decode step streaming the cache walks 512 times fewer pages; smaller blocks go to
/// its upstream resource. The counter sits in front of it and sees every block either way.
bool huge_pages_demo() {
  std::printf("\n4. HugePageResource: one 2 MiB contiguous block, 16 KiB paged blocks\n");
  kvattn::HugePageResource huge;  // upstream: new/delete
  CountingResource counter(&huge);
  const std::int64_t tokens = static_cast<std::int64_t>(kvattn::HugePageResource::huge_page_bytes) / config.kv_bytes_per_token();
  kvattn::KvCache<kvattn::ContiguousLayout> big(config, kvattn::ContiguousLayout{.max_tokens = tokens}, &counter);
  kvattn::KvCache<kvattn::PagedLayout> paged(config, kvattn::PagedLayout{.block_size = 16}, &counter);
  const auto placed = [](std::int64_t block_bytes) {
    return kvattn::HugePageResource::maps_huge(static_cast<std::size_t>(block_bytes), kvattn::block_alignment) ? "huge pages"
                                                                                                                : "upstream";
  };
  std::printf("    contiguous block %lld B -> %s; paged block %lld B -> %s\n", static_cast<long long>(big.block_bytes()),
              placed(big.block_bytes()), static_cast<long long>(paged.block_bytes()), placed(paged.block_bytes()));
  big.add_sequence(1);
  append_tokens(big, 1, 100);
  paged.add_sequence(1);
  append_tokens(paged, 1, 20);
  const std::int64_t reserved = big.reserved_bytes() + paged.reserved_bytes();
  const bool ok = reserved == counter.outstanding();
  std::printf("    100 tokens in the contiguous cache, 20 in the paged one: reserved %lld B %s resource %lld B\n",
              static_cast<long long>(reserved), ok ? "==" : "!=", static_cast<long long>(counter.outstanding()));
  std::printf("    destroying the caches returns everything:\n");
  return ok;
}

}  // namespace

int main() {
  std::printf("model: %d layers, %d KV heads of dim %d, %s: %lld bytes of K/V per token\n", config.n_layers(),
              config.heads().kv_heads(), config.heads().head_dim(), kvattn::dtype_name(config.dtype()).data(),
              static_cast<long long>(config.kv_bytes_per_token()));
  bool ok = contiguous_demo();
  ok &= paged_demo();
  ok &= arena_exhaustion_demo();
  ok &= huge_pages_demo();
  std::printf("\n%s\n", ok ? "all checks passed" : "CHECK FAILED");
  return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
