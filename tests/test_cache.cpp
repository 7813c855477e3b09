// KV cache: exact byte accounting, layouts (contiguous, paged, user-written), sequence lifecycle,
// fork with copy-on-write, pluggable memory resources, and errors that leave the cache unchanged.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <memory_resource>
#include <tuple>

#include "reference.hpp"

using namespace kvattn;
using kvattn::testing::append_random;
using kvattn::testing::expect_error;
using kvattn::testing::snapshot;

namespace {

ModelConfig small_config(kv_dtype dt = kv_dtype::f16, int layers = 4, int factor = 2) {
  return ModelConfig(HeadShape(8, 2, 16), LayerSharingMap::cla(layers, factor), dt);
}

/// Counts bytes handed out; can be told to fail after a number of allocations.
class CountingResource : public std::pmr::memory_resource {
 public:
  std::int64_t bytes = 0, allocations = 0;
  std::int64_t fail_after = -1;  // allocations allowed before bad_alloc (-1: never fail)
 private:
  void* do_allocate(std::size_t n, std::size_t align) override {
    if (fail_after >= 0 && allocations >= fail_after) throw std::bad_alloc();
    ++allocations;
    bytes += static_cast<std::int64_t>(n);
    EXPECT_EQ(align, block_alignment);
    return std::pmr::new_delete_resource()->allocate(n, align);
  }
  void do_deallocate(void* p, std::size_t n, std::size_t align) override {
    bytes -= static_cast<std::int64_t>(n);
    std::pmr::new_delete_resource()->deallocate(p, n, align);
  }
  bool do_is_equal(const std::pmr::memory_resource& o) const noexcept override { return this == &o; }
};

/// A user-written layout: blocks of 8 tokens, two reserved when a sequence is added, at most 4 per
/// sequence, 10 in the pool, recycled.
struct ReservedPagedLayout {
  static constexpr std::string_view name = "reserved-paged";
  std::int64_t block_tokens() const { return 8; }
  std::int64_t blocks_on_add() const { return 2; }
  std::int64_t max_blocks_per_sequence() const { return 4; }
  std::int64_t max_blocks() const { return 10; }
  bool keeps_free_blocks() const { return true; }
};
static_assert(KvLayoutPolicy<ReservedPagedLayout>);
static_assert(KvLayoutPolicy<PagedLayout> && KvLayoutPolicy<ContiguousLayout>);
struct NotALayout {};
static_assert(!KvLayoutPolicy<NotALayout>);

}  // namespace

TEST(KvCache, AccountingIsExact) {
  std::mt19937_64 rng(1);
  for (kv_dtype dt : {kv_dtype::f32, kv_dtype::f16, kv_dtype::bf16}) {
    const ModelConfig cfg = small_config(dt, 6, 2);
    const std::int64_t per_token = 2 * 2 * 16 * 3 * dtype_bytes(dt);
    ASSERT_EQ(cfg.kv_bytes_per_token(), per_token);
    CountingResource res;
    {
      KvCache<PagedLayout> cache(cfg, PagedLayout{16}, &res);
      EXPECT_EQ(cache.block_bytes(), 16 * per_token);
      cache.add_sequence(1);
      cache.add_sequence(2);
      EXPECT_EQ(cache.reserved_bytes(), 0);
      append_random(cache, 1, 37, rng);
      append_random(cache, 2, 16, rng);
      EXPECT_EQ(cache.live_bytes(), (37 + 16) * per_token);
      EXPECT_EQ(cache.reserved_bytes(), (3 + 1) * 16 * per_token);
      EXPECT_EQ(cache.reserved_bytes(), res.bytes);
      cache.truncate(1, 10);
      EXPECT_EQ(cache.live_bytes(), (10 + 16) * per_token);
      EXPECT_EQ(cache.blocks_in_use(), 2);
      EXPECT_EQ(cache.free_blocks(), 2);
      EXPECT_EQ(cache.reserved_bytes(), res.bytes);
      cache.release_free_blocks();
      EXPECT_EQ(cache.reserved_bytes(), 2 * 16 * per_token);
      EXPECT_EQ(cache.reserved_bytes(), res.bytes);
    }
    EXPECT_EQ(res.bytes, 0);  // everything returned
  }
}

TEST(KvCache, ClaHalvesTheCache) {
  const ModelConfig mqa(HeadShape(16, 1, 128), LayerSharingMap::none(20), kv_dtype::bf16);
  const ModelConfig cla(HeadShape(16, 1, 128), LayerSharingMap::cla(20, 2), kv_dtype::bf16);
  std::mt19937_64 rng(2);
  KvCache<PagedLayout> a(mqa), b(cla);
  a.add_sequence(0);
  b.add_sequence(0);
  append_random(a, 0, 40, rng);
  append_random(b, 0, 40, rng);
  EXPECT_EQ(a.live_bytes(), 2 * b.live_bytes());
  EXPECT_EQ(a.reserved_bytes(), 2 * b.reserved_bytes());
  EXPECT_EQ(b.live_bytes(), 40 * 2 * 128 * 10 * 2);
}

TEST(KvCache, PagedBlocksAreReusedAfterRemove) {
  std::mt19937_64 rng(3);
  CountingResource res;
  KvCache<PagedLayout> cache(small_config(), PagedLayout{4, 8}, &res);
  cache.add_sequence(1);
  append_random(cache, 1, 16, rng);  // 4 blocks
  const std::int64_t reserved = cache.reserved_bytes();
  const std::int64_t allocations = res.allocations;
  cache.remove_sequence(1);
  EXPECT_EQ(cache.blocks_in_use(), 0);
  EXPECT_EQ(cache.free_blocks(), 4);
  cache.add_sequence(2);
  append_random(cache, 2, 16, rng);
  EXPECT_EQ(res.allocations, allocations);  // no new memory: the free list served all 4 blocks
  EXPECT_EQ(cache.reserved_bytes(), reserved);
  EXPECT_EQ(cache.free_blocks(), 0);
}

TEST(KvCache, ContiguousReservesUpFront) {
  std::mt19937_64 rng(4);
  CountingResource res;
  const ModelConfig cfg = small_config(kv_dtype::bf16);
  KvCache<ContiguousLayout> cache(cfg, ContiguousLayout{100, 2}, &res);
  cache.add_sequence(5);
  EXPECT_EQ(cache.reserved_bytes(), 100 * cfg.kv_bytes_per_token());
  EXPECT_EQ(cache.live_bytes(), 0);
  append_random(cache, 5, 100, rng);
  EXPECT_EQ(cache.capacity_tokens(), 100);
  EXPECT_THROW(cache.extend(5, 1), capacity_error);
  cache.truncate(5, 0);
  EXPECT_EQ(cache.reserved_bytes(), 100 * cfg.kv_bytes_per_token());  // still reserved
  cache.remove_sequence(5);
  EXPECT_EQ(cache.reserved_bytes(), 0);  // returned to the resource
  EXPECT_EQ(res.bytes, 0);
}

TEST(HugePageResource, MapsLargeBlocksOnWholeHugePagesAndSendsSmallOnesUpstream) {
  std::mt19937_64 rng(11);
  CountingResource upstream;
  HugePageResource res(&upstream);
  const ModelConfig cfg = small_config();
  // A contiguous sequence of 10000 tokens is 2.5 MiB: one large block.
  KvCache<ContiguousLayout> big(cfg, ContiguousLayout{10000, 2}, &res);
  big.add_sequence(1);
  append_random(big, 1, 9999, rng);
  const auto k = kvattn::testing::random_floats(rng, 2 * 32), v = kvattn::testing::random_floats(rng, 2 * 32);
  big.append(1, 1, k.data(), v.data());  // the last token, read back below
  EXPECT_EQ(big.reserved_bytes(), 10000 * cfg.kv_bytes_per_token());  // the bytes asked for, not the rounding
  EXPECT_EQ(upstream.allocations, HugePageResource::maps_huge(static_cast<std::size_t>(big.block_bytes()), block_alignment) ? 0 : 1);
  // Paged blocks of 4 tokens are 1 KiB: upstream.
  KvCache<PagedLayout> paged(cfg, PagedLayout{4}, &res);
  paged.add_sequence(2);
  const std::int64_t before = upstream.allocations;
  append_random(paged, 2, 16, rng);
  EXPECT_EQ(upstream.allocations, before + 4);
  std::vector<float> kr(32), vr(32);
  big.read(1, 0, 9999, kr.data(), vr.data());
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(kr[i], round_to_dtype(k[i], kv_dtype::f16));
    EXPECT_EQ(vr[i], round_to_dtype(v[i], kv_dtype::f16));
  }
  big.remove_sequence(1);
  paged.remove_sequence(2);
  paged.release_free_blocks();  // every upstream byte returned
  EXPECT_EQ(upstream.bytes, 0);
#if defined(__linux__)
  EXPECT_TRUE(HugePageResource::maps_huge(HugePageResource::huge_page_bytes, 64));
  void* p = res.allocate(HugePageResource::huge_page_bytes + 1, 64);  // rounded up to two huge pages
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % HugePageResource::huge_page_bytes, 0u);
  std::memset(p, 1, HugePageResource::huge_page_bytes + 1);  // the bytes asked for, on both pages
  res.deallocate(p, HugePageResource::huge_page_bytes + 1, 64);
  // A size whose rounding up to whole huge pages would wrap around is refused, not served small.
  EXPECT_THROW((void)res.allocate(SIZE_MAX - 100, 64), std::bad_alloc);
#endif
  EXPECT_FALSE(HugePageResource::maps_huge(HugePageResource::huge_page_bytes - 1, 64));
  EXPECT_THROW(HugePageResource(nullptr), config_error);  // as KvCache refuses a null resource
}

TEST(KvCache, UserWrittenLayoutPlugsIn) {
  std::mt19937_64 rng(5);
  KvCache<ReservedPagedLayout> cache(small_config());
  cache.add_sequence(1);
  EXPECT_EQ(cache.blocks_in_use(), 2);
  append_random(cache, 1, 20, rng);
  EXPECT_EQ(cache.blocks_in_use(), 3);
  EXPECT_EQ(cache.capacity_tokens(), 32);
  EXPECT_THROW(append_random(cache, 1, 13, rng), capacity_error);
  cache.truncate(1, 3);
  EXPECT_EQ(cache.blocks_in_use(), 2);  // never below the reserved two
  for (seq_id id = 2; id <= 5; ++id) cache.add_sequence(id);  // 10 blocks in use
  EXPECT_THROW(cache.add_sequence(6), pool_exhausted);
}

TEST(KvCache, StoredValuesRoundTrip) {
  std::mt19937_64 rng(6);
  for (kv_dtype dt : {kv_dtype::f32, kv_dtype::f16, kv_dtype::bf16}) {
    const ModelConfig cfg = small_config(dt, 4, 2);
    KvCache<PagedLayout> cache(cfg, PagedLayout{3});
    cache.add_sequence(9);
    const std::size_t per_slot = 5 * 2 * 16;
    const auto k = kvattn::testing::random_floats(rng, 2 * per_slot), v = kvattn::testing::random_floats(rng, 2 * per_slot);
    cache.append(9, 5, k.data(), v.data());
    std::vector<float> kr(32), vr(32);
    for (int layer = 0; layer < 4; ++layer) {
      const int slot = cfg.layers().slot_of(layer);
      for (int t = 0; t < 5; ++t) {
        cache.read(9, layer, t, kr.data(), vr.data());
        for (int i = 0; i < 32; ++i) {
          EXPECT_EQ(kr[i], round_to_dtype(k[slot * per_slot + t * 32 + i], dt));
          EXPECT_EQ(vr[i], round_to_dtype(v[slot * per_slot + t * 32 + i], dt));
        }
      }
    }
  }
}

TEST(KvCache, WriteStoredCopiesTheStoredElements) {
  // Engines that convert K/V themselves hand over the storage type's elements (here with a token
  // stride wider than a row): read back, they are exactly what write() stores for the same values.
  std::mt19937_64 rng(16);
  for (kv_dtype dt : {kv_dtype::f32, kv_dtype::f16, kv_dtype::bf16}) {
    const ModelConfig cfg = small_config(dt, 2, 1);
    KvCache<PagedLayout> cache(cfg, PagedLayout{3});
    const int row = 2 * 16, stride = row + 8, tokens = 5;
    const auto k = kvattn::testing::random_floats(rng, tokens * row), v = kvattn::testing::random_floats(rng, tokens * row);
    const std::size_t size = dtype_bytes(dt);
    std::vector<std::byte> ks(tokens * stride * size), vs(ks.size());
    const auto store = [&](float x, std::byte* dst) {
      const Eigen::half h(x);
      const Eigen::bfloat16 b(x);
      if (dt == kv_dtype::f32) std::memcpy(dst, &x, 4);
      if (dt == kv_dtype::f16) std::memcpy(dst, &h, 2);
      if (dt == kv_dtype::bf16) std::memcpy(dst, &b, 2);
    };
    for (int t = 0; t < tokens; ++t)
      for (int i = 0; i < row; ++i) {
        store(k[t * row + i], &ks[(t * stride + i) * size]);
        store(v[t * row + i], &vs[(t * stride + i) * size]);
      }
    for (seq_id id : {1, 2}) {
      cache.add_sequence(id);
      cache.extend(id, tokens);
    }
    cache.write(1, 1, 0, tokens, k.data(), v.data());
    cache.write_stored(2, 1, 0, tokens, ks.data(), vs.data(), stride);
    std::vector<float> k1(row), v1(row), k2(row), v2(row);
    for (int t = 0; t < tokens; ++t) {
      cache.read(1, 1, t, k1.data(), v1.data());
      cache.read(2, 1, t, k2.data(), v2.data());
      for (int i = 0; i < row; ++i) {
        EXPECT_EQ(k2[i], round_to_dtype(k[t * row + i], dt)) << dtype_name(dt);
        EXPECT_EQ(v2[i], round_to_dtype(v[t * row + i], dt)) << dtype_name(dt);
      }
      EXPECT_EQ(0, std::memcmp(k1.data(), k2.data(), row * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(v1.data(), v2.data(), row * sizeof(float)));
    }
  }
}

TEST(KvCache, ForkSharesBlocksAndCopiesOnWrite) {
  std::mt19937_64 rng(7);
  KvCache<PagedLayout> cache(small_config(kv_dtype::f32), PagedLayout{4});
  cache.add_sequence(1);
  append_random(cache, 1, 10, rng);  // blocks: 4 + 4 + 2
  const std::vector<seq_id> one{1};
  const auto before = snapshot(cache, one);
  cache.fork_sequence(1, 2);
  EXPECT_EQ(cache.blocks_in_use(), 3);  // shared
  EXPECT_EQ(cache.length(2), 10);
  EXPECT_EQ(cache.live_bytes(), 20 * cache.bytes_per_token());
  append_random(cache, 2, 3, rng);  // writes into the shared partial block: copied first
  EXPECT_EQ(cache.blocks_in_use(), 5);
  EXPECT_EQ(snapshot(cache, one).contents, before.contents);  // the source is untouched
  std::vector<float> a(32), b(32), c(32), d(32);
  for (int t = 0; t < 10; ++t) {
    cache.read(1, 0, t, a.data(), b.data());
    cache.read(2, 0, t, c.data(), d.data());
    EXPECT_EQ(a, c);
    EXPECT_EQ(b, d);
  }
  // Overwriting shared history copies the block too: the fork's token 0 changes, the source's not.
  std::vector<float> row(32, 0.25f);
  cache.write(2, 0, 0, 1, row.data(), row.data());
  EXPECT_EQ(cache.blocks_in_use(), 6);
  EXPECT_EQ(snapshot(cache, one).contents, before.contents);
  cache.read(2, 0, 0, c.data(), d.data());
  EXPECT_EQ(c, row);
  EXPECT_EQ(d, row);
  cache.remove_sequence(1);
  EXPECT_EQ(cache.blocks_in_use(), 4);  // the one block still shared until now + 3 of seq 2's own
  cache.remove_sequence(2);
  EXPECT_EQ(cache.blocks_in_use(), 0);
}

TEST(KvCache, WriteAfterExtendThenForkCopiesTheSharedBlock) {
  // The order extend, fork, write (each beam then writes its own new token): the write copies the
  // block the two sequences share, and the other sequence keeps what it held.
  std::mt19937_64 rng(10);
  KvCache<PagedLayout> cache(small_config(kv_dtype::f16), PagedLayout{4});
  cache.add_sequence(1);
  append_random(cache, 1, 3, rng);
  cache.extend(1, 1);
  cache.fork_sequence(1, 2);
  const std::vector<seq_id> two{2};
  const auto before = snapshot(cache, two);
  std::vector<float> row(32, 0.5f), k(32), v(32);
  cache.write(1, 0, 3, 1, row.data(), row.data());
  EXPECT_EQ(cache.blocks_in_use(), 2);
  EXPECT_EQ(snapshot(cache, two).contents, before.contents);  // token 3 was never written: bits compared
  cache.read(1, 0, 3, k.data(), v.data());
  EXPECT_EQ(k, row);
}

TEST(KvCache, BatchExtendOfForksCopiesSharedBlocksOnce) {
  // Two sequences share one partial block; extending both in one batch copies it for the first and
  // lets the second write in place: 2 blocks in use, not 3, and a pool of 2 suffices.
  std::mt19937_64 rng(9);
  KvCache<PagedLayout> cache(small_config(kv_dtype::f32), PagedLayout{16, 2});
  cache.add_sequence(1);
  append_random(cache, 1, 1, rng);
  cache.fork_sequence(1, 2);
  const std::vector<seq_id> ids{1, 2};
  cache.extend(ids, std::vector<std::int64_t>{1, 1});
  EXPECT_EQ(cache.blocks_in_use(), 2);
  cache.remove_sequence(1);
  cache.remove_sequence(2);
  EXPECT_EQ(cache.blocks_in_use(), 0);
  EXPECT_EQ(cache.free_blocks(), 2);
}

TEST(KvCache, ExtendGuardTakesTheExtendBackExactlyUnlessCommitted) {
  // A batch of forks (1, 2 and 3 share a partial block, 5 and 6 another; 4 is empty) on a paged
  // pool that has free blocks, and on a contiguous cache whose blocks go back to the resource: a
  // guard destroyed without commit() gives back the copies of shared blocks, the new blocks (to the
  // free list or the resource they came from), the lengths and the contents; a committed one keeps
  // what extend does, with the same blocks taken.
  auto run = [](auto layout) {
    std::mt19937_64 rng(10);
    CountingResource res, res_plain;
    using Cache = KvCache<decltype(layout)>;
    Cache cache(small_config(kv_dtype::bf16), layout, &res), plain(small_config(kv_dtype::bf16), layout, &res_plain);
    for (Cache* c : {&cache, &plain}) {
      std::mt19937_64 same(11);
      c->add_sequence(9);
      append_random(*c, 9, 12, same);
      c->remove_sequence(9);  // the paged pool keeps its blocks free
      c->add_sequence(1);
      append_random(*c, 1, 5, same);
      c->fork_sequence(1, 2);
      c->fork_sequence(1, 3);
      c->add_sequence(4);
      c->add_sequence(5);
      append_random(*c, 5, 2, same);
      c->fork_sequence(5, 6);  // 5 and 6 share a block only with each other
    }
    // 2 and 1 copy the block they share with 3 (listed, growing by 0); 5 copies, 6 (as long, listed
    // later) keeps it.
    const std::vector<seq_id> all{1, 2, 3, 4, 5, 6}, batch{2, 1, 4, 3, 5, 6};
    const std::vector<std::int64_t> counts{3, 1, 6, 0, 1, 1};
    const auto before = snapshot(cache, all);
    const std::int64_t bytes_before = res.bytes;
    {
      auto grown = cache.extend_guarded(batch, counts);
      EXPECT_EQ(cache.length(2), 8);
      EXPECT_EQ(cache.length(4), 6);
      EXPECT_GT(cache.blocks_in_use(), before.in_use);
      const std::vector<float> kv = kvattn::testing::random_floats(rng, 6 * 2 * 16);  // the new positions' rows
      cache.write(2, 0, 5, 3, kv.data(), kv.data());
      cache.write(1, 2, 5, 1, kv.data(), kv.data());
      cache.write(4, 0, 0, 6, kv.data(), kv.data());
    }
    EXPECT_EQ(snapshot(cache, all), before);
    EXPECT_EQ(res.bytes, bytes_before);
    {
      auto grown = cache.extend_guarded(batch, counts);
      grown.commit();
    }
    plain.extend(batch, counts);
    const auto kept = snapshot(cache, all);
    EXPECT_EQ(kept.lengths, snapshot(plain, all).lengths);
    EXPECT_EQ(kept.in_use, plain.blocks_in_use());
    EXPECT_EQ(kept.free, plain.free_blocks());
    EXPECT_EQ(res.bytes, res_plain.bytes);
  };
  run(PagedLayout{4, 32});
  run(ContiguousLayout{.max_tokens = 16, .max_sequences = 8});
}

TEST(KvCache, GuardedCallsTakeNoMoreBlocksThanPlainOnes) {
  // A contiguous cache of two sequences, full once a fork of sequence 1 gets its own block: a guarded
  // extend or write of the pair needs one copy, as a plain one does (the longer sequence, or the
  // last listed of equals, keeps the shared block), and taking it back restores every row (a
  // write's overwritten rows in the kept block come back from the guard's own copy of them).
  std::mt19937_64 rng(12);
  using Cache = KvCache<ContiguousLayout>;
  const std::vector<seq_id> both{1, 2}, reversed{2, 1};
  auto prepare = [&](Cache& cache, std::int64_t fork_length) {
    cache.add_sequence(1);
    append_random(cache, 1, 3, rng);
    cache.fork_sequence(1, 2);
    cache.truncate(2, fork_length);
  };
  for (const std::vector<seq_id>* batch : {&both, &reversed})
    for (std::int64_t fork_length : {3, 2}) {
      SCOPED_TRACE(::testing::Message() << "batch from " << batch->front() << ", fork of length " << fork_length);
      Cache cache(small_config(kv_dtype::f32), ContiguousLayout{8, 2});
      prepare(cache, fork_length);
      const auto before = snapshot(cache, both);
      const std::vector<float> kv = kvattn::testing::random_floats(rng, 2 * 2 * 32);
      {
        auto grown = cache.extend_guarded(*batch, std::vector<std::int64_t>{1, 1});
        EXPECT_EQ(cache.blocks_in_use(), 2);
        const std::vector<std::int64_t> positions{cache.length((*batch)[0]) - 1, cache.length((*batch)[1]) - 1}, ones{1, 1};
        cache.write_guarded(*batch, 0, positions, ones, kv.data(), kv.data()).commit();
      }
      EXPECT_EQ(snapshot(cache, both), before);
      {
        const std::vector<std::int64_t> starts{0, 0}, counts{2, 2};
        auto written = cache.write_guarded(*batch, 2, starts, counts, kv.data(), kv.data());
        EXPECT_EQ(cache.blocks_in_use(), 2);
      }
      EXPECT_EQ(snapshot(cache, both), before);
      cache.extend_guarded(*batch, std::vector<std::int64_t>{1, 1}).commit();
      EXPECT_EQ(cache.length(1), 4);
      EXPECT_EQ(cache.length(2), fork_length + 1);
    }
}

TEST(KvCache, ConsumerLayersWriteNothing) {
  KvCache<PagedLayout> cache(small_config());
  cache.add_sequence(1);
  cache.extend(1, 1);
  std::vector<float> row(32, 1.f);
  EXPECT_THROW(cache.write(1, 1, 0, 1, row.data(), row.data()), config_error);  // layer 1 reads layer 0
  EXPECT_NO_THROW(cache.write(1, 2, 0, 1, row.data(), row.data()));
  EXPECT_EQ(cache.slot_view(1).k_offset, cache.slot_view(0).k_offset);
  EXPECT_NE(cache.slot_view(2).k_offset, cache.slot_view(0).k_offset);
}

TEST(KvCache, BatchWriteCopiesSharedBlocksForTheWholeBatchFirst) {
  // Sequences 1 and 2 (6 tokens, 2 blocks of 4 each) are forked into 3 and 4. Writing the last two
  // tokens of 1 and 2 in one batch needs two copies: with one free block it fails and nothing
  // changes (two single writes would have written sequence 1); with two it equals those writes.
  std::mt19937_64 rng(11);
  const std::vector<seq_id> ids{1, 2}, all{1, 2, 3, 4};
  const std::vector<std::int64_t> positions{4, 4}, counts{2, 2};
  std::vector<float> k(4 * 2 * 16), v(k.size());
  for (float& x : k) x = std::uniform_real_distribution<float>(-1, 1)(rng);
  for (float& x : v) x = std::uniform_real_distribution<float>(-1, 1)(rng);
  auto forked = [&](std::int64_t pool) {
    auto c = std::make_unique<KvCache<PagedLayout>>(small_config(kv_dtype::f32), PagedLayout{4, pool});
    std::mt19937_64 fill(12);
    for (seq_id id : ids) {
      c->add_sequence(id);
      append_random(*c, id, 6, fill);
      c->fork_sequence(id, id + 2);
    }
    return c;
  };
  auto tight = forked(5);
  const auto before = snapshot(*tight, all);
  EXPECT_THROW(tight->write(ids, 0, positions, counts, k.data(), v.data()), pool_exhausted);
  EXPECT_EQ(snapshot(*tight, all), before);

  auto batch = forked(6), single = forked(6);
  batch->write(ids, 0, positions, counts, k.data(), v.data());
  single->write(1, 0, 4, 2, k.data(), v.data());
  single->write(2, 0, 4, 2, k.data() + 2 * 32, v.data() + 2 * 32);
  EXPECT_EQ(batch->blocks_in_use(), 6);
  EXPECT_EQ(snapshot(*batch, all), snapshot(*single, all));

  // A block shared only by sequences of the batch is copied for all but the last of them.
  auto within = forked(5);
  const std::vector<seq_id> source_and_fork{1, 3};
  within->write(source_and_fork, 0, positions, counts, k.data(), v.data());
  EXPECT_EQ(within->blocks_in_use(), 5);
  const std::vector<seq_id> twice{1, 1};
  EXPECT_THROW(within->write(twice, 0, positions, counts, k.data(), v.data()), shape_error);
}

// ---- errors: each names the bad value and leaves the cache exactly as it was -------------------

namespace {
template <class Error, class L, class Call>
void expect_unchanged_after(KvCache<L>& cache, const std::vector<seq_id>& ids, Call&& call, const std::string& needle) {
  const auto before = snapshot(cache, ids);
  kvattn::testing::expect_error<Error>(call, needle);
  EXPECT_EQ(snapshot(cache, ids), before);
}
}  // namespace

TEST(KvCacheErrors, FailedCallsLeaveTheCacheUnchanged) {
  std::mt19937_64 rng(8);
  CountingResource res;
  KvCache<PagedLayout> cache(small_config(kv_dtype::bf16), PagedLayout{4, 6}, &res);
  cache.add_sequence(1);
  cache.add_sequence(2);
  append_random(cache, 1, 9, rng);  // 3 blocks
  append_random(cache, 2, 4, rng);  // 1 block
  const std::vector<seq_id> ids{1, 2, 3, 77};
  std::vector<float> kv(4 * 2 * 2 * 16, 0.5f);

  expect_unchanged_after<sequence_error>(cache, ids, [&] { cache.extend(77, 1); }, "77");
  expect_unchanged_after<sequence_error>(cache, ids, [&] { cache.remove_sequence(77); }, "77");
  expect_unchanged_after<sequence_error>(cache, ids, [&] { cache.truncate(77, 0); }, "77");
  expect_unchanged_after<sequence_error>(cache, ids, [&] { (void)cache.length(77); }, "77");
  expect_unchanged_after<sequence_error>(cache, ids, [&] { cache.add_sequence(1); }, "sequence 1 already exists");
  expect_unchanged_after<sequence_error>(cache, ids, [&] { cache.fork_sequence(1, 2); }, "sequence 2 already exists");
  expect_unchanged_after<sequence_error>(cache, ids, [&] { cache.fork_sequence(77, 3); }, "77");
  // Pool of 6 blocks, 4 in use: 12 more tokens for sequence 1 need 3 blocks.
  expect_unchanged_after<pool_exhausted>(cache, ids, [&] { cache.extend(1, 12); }, "sequence 1 needs 3 more block(s)");
  // Batch extend: the second sequence's failure undoes nothing because nothing was done.
  const std::vector<seq_id> batch{2, 1};
  const std::vector<std::int64_t> counts{4, 12};
  expect_unchanged_after<pool_exhausted>(cache, ids, [&] { cache.extend(batch, counts); }, "batch of 2");
  const std::vector<seq_id> dup{1, 1};
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.extend(dup, std::vector<std::int64_t>{1, 1}); }, "twice");
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.extend(1, -2); }, "-2");
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.truncate(1, 10); }, "sequence 1 to 10");
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.write(1, 0, 8, 2, kv.data(), kv.data()); },
                                      "2 tokens from position 8 of sequence 1 of length 9");
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.write(1, 0, 0, 1, kv.data(), kv.data(), 5); }, "stride");
  expect_unchanged_after<config_error>(cache, ids, [&] { cache.write(1, 3, 0, 1, kv.data(), kv.data()); }, "layer 3");
  expect_unchanged_after<config_error>(cache, ids, [&] { cache.write(1, 9, 0, 1, kv.data(), kv.data()); }, "9");
  expect_unchanged_after<pool_exhausted>(cache, ids, [&] { cache.append(2, 12, kv.data(), kv.data()); }, "sequence 2 needs");
  // The byte source itself failing is reported as pool exhaustion, also without a trace.
  res.fail_after = res.allocations;
  expect_unchanged_after<pool_exhausted>(cache, ids, [&] { cache.extend(2, 4); }, "out of memory");
  res.fail_after = -1;

  KvCache<ContiguousLayout> contiguous(small_config(), ContiguousLayout{8, 1});
  contiguous.add_sequence(1);
  append_random(contiguous, 1, 5, rng);
  expect_unchanged_after<capacity_error>(contiguous, ids, [&] { contiguous.extend(1, 4); }, "capacity is 8");
  expect_unchanged_after<pool_exhausted>(contiguous, ids, [&] { contiguous.add_sequence(2); }, "sequence 2: 1 sequences");
  // A fork counts against max_sequences: it would need a block of its own at its first write.
  expect_unchanged_after<pool_exhausted>(contiguous, ids, [&] { contiguous.fork_sequence(1, 2); }, "fork of sequence 1");
  // ... and so does a sequence added after a fork (the fork takes no block until it writes).
  KvCache<ContiguousLayout> two(small_config(), ContiguousLayout{8, 2});
  two.add_sequence(1);
  append_random(two, 1, 3, rng);
  two.fork_sequence(1, 2);
  expect_unchanged_after<pool_exhausted>(two, ids, [&] { two.add_sequence(3); }, "sequence 3");
  append_random(two, 2, 1, rng);  // the fork still gets its block

  // A write into a block shared with a fork copies it first; with no block left it fails cleanly.
  KvCache<PagedLayout> full(small_config(), PagedLayout{4, 1});
  full.add_sequence(1);
  append_random(full, 1, 2, rng);
  full.fork_sequence(1, 2);
  expect_unchanged_after<pool_exhausted>(full, ids, [&] { full.write(2, 0, 0, 1, kv.data(), kv.data()); }, "fork");

  // Sizes near 2^63 fail as errors, not as overflow or a raw std::bad_alloc.
  expect_unchanged_after<pool_exhausted>(cache, ids, [&] { cache.extend(1, INT64_MAX - 9); }, "sequence 1 needs");
  KvCache<PagedLayout> unlimited_pool(small_config());
  unlimited_pool.add_sequence(1);
  const std::vector<seq_id> one{1};
  expect_unchanged_after<pool_exhausted>(unlimited_pool, one, [&] { unlimited_pool.extend(1, INT64_MAX - 3); }, "64-bit");
  // Strides are checked in the caller's units (elements), and in bytes without wrapping.
  const std::vector<std::uint16_t> stored(64);
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.write_stored(1, 0, 0, 1, stored.data(), stored.data(), 20); },
                                      "token stride 20 is less than Hkv x d = 32");
  expect_unchanged_after<overflow_error>(
      cache, ids, [&] { cache.write_stored(1, 0, 0, 1, stored.data(), stored.data(), std::int64_t{1} << 62); }, "token stride");
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.write(1, 0, INT64_MAX, 2, kv.data(), kv.data()); },
                                      "position 9223372036854775807");
  expect_unchanged_after<shape_error>(cache, ids, [&] { cache.write(1, 0, INT64_MIN, -1, kv.data(), kv.data()); }, "-1 tokens");
  // The last source row's offset, (tokens - 1) x stride, must not wrap: 3 tokens 2^62 floats apart.
  expect_unchanged_after<overflow_error>(
      cache, ids, [&] { cache.write(1, 0, 0, 3, kv.data(), kv.data(), std::int64_t{1} << 62); }, "K/V source extent");
  // ... nor in bytes: 2 tokens 2^62 floats apart fit in 64 bits counted in floats, not in bytes
  // (the second row's pointer would wrap around to the first row).
  expect_unchanged_after<overflow_error>(
      cache, ids, [&] { cache.write(1, 0, 0, 2, kv.data(), kv.data(), std::int64_t{1} << 62); }, "K/V source extent");
  // The layer and the sequence are checked before the stride, as they always were.
  expect_unchanged_after<sequence_error>(cache, ids, [&] { cache.write(77, 0, 0, 1, kv.data(), kv.data(), 5); }, "77");
  expect_unchanged_after<config_error>(cache, ids, [&] { cache.write(1, 1, 0, 1, kv.data(), kv.data(), 5); }, "layer 1");
  // A batch's block count summed past 2^63.
  KvCache<PagedLayout> token_blocks(small_config(), PagedLayout{1});
  token_blocks.add_sequence(1);
  token_blocks.add_sequence(2);
  const std::vector<seq_id> pair{1, 2};
  expect_unchanged_after<overflow_error>(
      token_blocks, pair, [&] { token_blocks.extend(pair, std::vector<std::int64_t>{std::int64_t{1} << 62, std::int64_t{1} << 62}); },
      "blocks to add");
}

TEST(KvCacheErrors, ByteCountsCannotOverflow) {
  // Blocks of 2^62 bytes from a resource that hands out address space it never touches (as an
  // mmap reservation would): the byte counts, not the memory, reach 64 bits.
  class ReservingResource : public std::pmr::memory_resource {
    std::uintptr_t next_ = std::uintptr_t{1} << 20;
    void* do_allocate(std::size_t, std::size_t) override { return reinterpret_cast<void*>(next_ += 4096); }
    void do_deallocate(void*, std::size_t, std::size_t) override {}
    bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }
  } reserving;
  const ModelConfig cfg(HeadShape(1, 1, 16), LayerSharingMap::none(1), kv_dtype::f16);  // 64 bytes per token
  KvCache<ContiguousLayout> cache(cfg, ContiguousLayout{std::int64_t{1} << 56}, &reserving);
  cache.add_sequence(1);
  cache.extend(1, std::int64_t{1} << 56);  // 2^62 live bytes in one 2^62-byte block
  const auto counters = [&] {
    return std::tuple{cache.live_tokens(), cache.live_bytes(), cache.reserved_bytes(), cache.blocks_in_use(), cache.contains(2),
                      cache.contains(3)};
  };
  const auto before = counters();
  // A fork counts the 2^56 tokens again: 2^63 live bytes.
  kvattn::testing::expect_error<overflow_error>([&] { cache.fork_sequence(1, 2); }, "live bytes");
  EXPECT_EQ(counters(), before);
  // A second sequence's block: 2^63 reserved bytes.
  kvattn::testing::expect_error<pool_exhausted>([&] { cache.add_sequence(3); }, "64-bit");
  EXPECT_EQ(counters(), before);
  EXPECT_EQ(cache.live_bytes(), std::int64_t{1} << 62);
  // An extend to 2^63 live bytes: five sequences (four forks) share a block 3/4 full, and the
  // first then fills it (the block it would copy fits; the count does not).
  KvCache<ContiguousLayout> forked(cfg, ContiguousLayout{std::int64_t{1} << 55}, &reserving);
  forked.add_sequence(0);
  forked.extend(0, (std::int64_t{1} << 55) - (std::int64_t{1} << 53));
  for (seq_id f = 1; f < 5; ++f) forked.fork_sequence(0, f);
  const auto forked_counters = [&] { return std::tuple{forked.live_tokens(), forked.reserved_bytes(), forked.blocks_in_use(), forked.length(0)}; };
  const auto forked_before = forked_counters();
  kvattn::testing::expect_error<overflow_error>([&] { forked.extend(0, std::int64_t{1} << 53); }, "live bytes");
  EXPECT_EQ(forked_counters(), forked_before);
}

namespace {
/// A layout whose every sequence reserves more blocks on add than its pool has.
struct ReservesTooMuch : PagedLayout {
  static constexpr std::string_view name = "reserves-too-much";
  std::int64_t blocks_on_add() const { return 4; }
};
}  // namespace

TEST(KvCacheErrors, InvalidLayouts) {
  expect_error<config_error>([] { KvCache<PagedLayout>(small_config(), PagedLayout{0}); }, "PagedLayout::block_size) must be >= 1, got 0");
  expect_error<config_error>([] { KvCache<PagedLayout>(small_config(), PagedLayout{16, 0}); }, "PagedLayout::pool_blocks) is 0");
  expect_error<config_error>([] { KvCache<PagedLayout>(small_config(), PagedLayout{16, 8, 0}); }, "max_sequence_blocks) is 0");
  expect_error<config_error>([] { KvCache<ContiguousLayout>(small_config(), ContiguousLayout{0}); }, "ContiguousLayout::max_tokens");
  expect_error<config_error>([] { KvCache<ContiguousLayout>(small_config(), ContiguousLayout{.max_sequences = 0}); },
                             "ContiguousLayout::max_sequences, PagedLayout::pool_blocks) is 0");
  // A policy whose every sequence takes more blocks on add than the pool has: no sequence fits.
  expect_error<config_error>([] { KvCache<ReservesTooMuch>(small_config(), ReservesTooMuch{{16, 3}}); },
                             "reserves-too-much layout: max_blocks() (ContiguousLayout::max_sequences, PagedLayout::pool_blocks) is 3");
  EXPECT_THROW(KvCache<PagedLayout>(small_config(), PagedLayout{16}, nullptr), config_error);
  // Block bytes that overflow 64 bits.
  EXPECT_THROW(KvCache<ContiguousLayout>(small_config(), ContiguousLayout{std::int64_t{1} << 60}), overflow_error);
}

// ---- random operations against a model ----------------------------------------------------------

namespace {

/// What each sequence should hold: per token and producer slot, the tag its K/V rows were written
/// with (every K element = tag, every V element = -tag), 0 where the contents are unspecified.
using ModelTokens = std::vector<std::array<float, 2>>;

/// Random calls (add, fork, remove, truncate, batch extend and write, their guarded forms committed
/// or taken back, the resource failing now and then) on a cache of small_config (f32: tags are
/// exact; producers 0 and 2), each checked against the model: a call that succeeds does what the
/// model says, one that fails (pool_exhausted, capacity_error) leaves the cache exactly as it was,
/// and the bytes held always equal what the memory resource handed out.
template <KvLayoutPolicy Layout>
void run_random_operations(Layout layout, std::uint64_t seed, int steps) {
  std::mt19937_64 rng(seed);
  CountingResource res;
  KvCache<Layout> cache(small_config(kv_dtype::f32), layout, &res);
  constexpr int producers[2] = {0, 2}, row = 2 * 16;
  std::map<seq_id, ModelTokens> model;
  float next_tag = 1;
  seq_id next_id = 1;
  auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
  auto ids = [&] {
    std::vector<seq_id> out;
    for (const auto& [id, tokens] : model) out.push_back(id);
    return out;
  };
  auto some_ids = [&] {  // 1 to 3 distinct sequences, in random order
    std::vector<seq_id> all = ids();
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(static_cast<std::size_t>(uniform(1, std::min<std::int64_t>(3, std::ssize(all)))));
    return all;
  };
  // Rows for counts[b] tokens of each listed sequence, each token a fresh tag.
  struct Rows {
    std::vector<float> k, v, tags;
  };
  auto rows_for = [&](const std::vector<std::int64_t>& counts) {
    Rows r;
    for (std::int64_t n : counts)
      for (std::int64_t t = 0; t < n; ++t) {
        r.tags.push_back(next_tag);
        r.k.insert(r.k.end(), row, next_tag);
        r.v.insert(r.v.end(), row, -next_tag);
        ++next_tag;
      }
    return r;
  };
  // The model after writing `rows` at positions[b] of ids[b] into slot `slot`.
  auto written = [&](std::map<seq_id, ModelTokens> m, const std::vector<seq_id>& batch, int slot,
                     const std::vector<std::int64_t>& positions, const std::vector<std::int64_t>& counts, const Rows& rows) {
    std::size_t next = 0;
    for (std::size_t b = 0; b < batch.size(); ++b)
      for (std::int64_t t = 0; t < counts[b]; ++t) m[batch[b]][static_cast<std::size_t>(positions[b] + t)][slot] = rows.tags[next++];
    return m;
  };
  // Per listed row: whether its block is held by another sequence too (in its table, past its
  // length included), as the cache is now.
  auto in_shared_blocks = [&](const std::vector<seq_id>& batch, const std::vector<std::int64_t>& positions,
                              const std::vector<std::int64_t>& counts) {
    const std::int64_t block_tokens = cache.slot_view(0).block_tokens;
    std::map<const std::byte*, int> holders;
    for (const auto& [id, tokens] : model) {
      const KvSequenceView view = cache.sequence_view(id);
      EXPECT_GE(view.block_count, ceil_div(view.length, block_tokens));
      for (std::int64_t i = 0; i < view.block_count; ++i) ++holders[view.blocks[i]];
    }
    std::vector<bool> shared;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      const KvSequenceView view = cache.sequence_view(batch[b]);
      for (std::int64_t t = 0; t < counts[b]; ++t) shared.push_back(holders[view.blocks[(positions[b] + t) / block_tokens]] > 1);
    }
    return shared;
  };
  // The model after a guarded write of `rows` is taken back (README, "Errors"): rows in blocks
  // another sequence held too (`shared`, from in_shared_blocks before the write) are as they were;
  // rows in blocks the writer alone held keep the new contents.
  auto taken_back = [&](std::map<seq_id, ModelTokens> m, const std::vector<seq_id>& batch, int slot,
                        const std::vector<std::int64_t>& positions, const std::vector<std::int64_t>& counts, const Rows& rows,
                        const std::vector<bool>& shared) {
    std::size_t next = 0;
    for (std::size_t b = 0; b < batch.size(); ++b)
      for (std::int64_t t = 0; t < counts[b]; ++t, ++next)
        if (!shared[next]) m[batch[b]][static_cast<std::size_t>(positions[b] + t)][slot] = rows.tags[next];
    return m;
  };
  auto check = [&](const char* after) {
    SCOPED_TRACE(after);
    ASSERT_EQ(cache.num_sequences(), model.size());
    std::int64_t live = 0;
    std::vector<float> k(row), v(row);
    for (const auto& [id, tokens] : model) {
      ASSERT_EQ(cache.length(id), std::ssize(tokens)) << "sequence " << id;
      live += std::ssize(tokens);
      for (std::size_t t = 0; t < tokens.size(); ++t)
        for (int slot = 0; slot < 2; ++slot) {
          if (tokens[t][slot] == 0) continue;
          cache.read(id, producers[slot] + 1, static_cast<std::int64_t>(t), k.data(), v.data());  // the consumer reads it
          for (int i = 0; i < row; ++i)
            ASSERT_TRUE(k[i] == tokens[t][slot] && v[i] == -tokens[t][slot])
                << "sequence " << id << " token " << t << " slot " << slot << ": " << k[i] << " for " << tokens[t][slot];
        }
    }
    EXPECT_EQ(cache.live_tokens(), live);
    EXPECT_EQ(cache.reserved_bytes(), res.bytes);
  };

  for (int step = 0; step < steps; ++step) {
    const std::vector<seq_id> all = ids();
    const auto before = snapshot(cache, all);
    std::map<seq_id, ModelTokens> next = model;
    const int op = model.empty() ? 0 : static_cast<int>(uniform(0, 10));
    const bool inject = uniform(0, 9) == 0;
    if (inject) res.fail_after = res.allocations + uniform(0, 1);
    std::function<void()> plain_twin;  // a guarded call's plain form: refused whenever it is
    try {
      if (op == 0 && model.size() < 8) {
        cache.add_sequence(next_id);
        next[next_id++];
      } else if ((op == 1 || op == 10) && model.size() < 8) {  // a fork, or one truncated back a little
        const seq_id src = all[static_cast<std::size_t>(uniform(0, std::ssize(all) - 1))];
        cache.fork_sequence(src, next_id);
        ModelTokens tokens = model[src];
        if (op == 10) {
          tokens.resize(static_cast<std::size_t>(std::max<std::int64_t>(0, std::ssize(tokens) - uniform(1, 3))));
          cache.truncate(next_id, std::ssize(tokens));  // throws nothing
        }
        next[next_id++] = std::move(tokens);
      } else if (op == 2) {
        const seq_id id = all[static_cast<std::size_t>(uniform(0, std::ssize(all) - 1))];
        cache.remove_sequence(id);
        next.erase(id);
      } else if (op == 3) {
        const seq_id id = all[static_cast<std::size_t>(uniform(0, std::ssize(all) - 1))];
        const std::int64_t n = uniform(0, std::ssize(model[id]));
        cache.truncate(id, n);
        next[id].resize(static_cast<std::size_t>(n));
      } else if (op == 4 || op == 5) {  // extend, or a guarded extend whose new positions are written
        const std::vector<seq_id> batch = some_ids();
        std::vector<std::int64_t> counts, positions;
        for (seq_id id : batch) counts.push_back(uniform(0, 6)), positions.push_back(std::ssize(model[id]));
        for (std::size_t b = 0; b < batch.size(); ++b) next[batch[b]].resize(static_cast<std::size_t>(positions[b] + counts[b]));
        if (op == 4) {
          cache.extend(batch, counts);
        } else {
          plain_twin = [&cache, batch, counts] { cache.extend(batch, counts); };
          auto guard = cache.extend_guarded(batch, counts);
          for (int slot = 0; slot < 2; ++slot) {  // as AttentionStack::forward: each layer's write guarded too
            const Rows rows = rows_for(counts);
            const std::vector<bool> shared = in_shared_blocks(batch, positions, counts);
            auto write = cache.write_guarded(batch, producers[slot], positions, counts, rows.k.data(), rows.v.data());
            if (uniform(0, 3) > 0) {
              write.commit();
              next = written(next, batch, slot, positions, counts, rows);
            } else {  // the new positions in shared blocks stay unspecified
              next = taken_back(next, batch, slot, positions, counts, rows, shared);
            }
          }
          if (uniform(0, 1) == 0) {
            guard.commit();
          } else {
            next = model;
          }
        }
      } else if (op >= 6) {  // a write over existing positions, plain or guarded (committed or not)
        const std::vector<seq_id> batch = some_ids();
        std::vector<std::int64_t> counts, positions;
        for (seq_id id : batch) {
          const std::int64_t length = std::ssize(model[id]), pos = uniform(0, length);
          positions.push_back(pos);
          counts.push_back(uniform(0, std::min<std::int64_t>(6, length - pos)));
        }
        const int slot = static_cast<int>(uniform(0, 1));
        const Rows rows = rows_for(counts);
        if (op == 6) {
          cache.write(batch, producers[slot], positions, counts, rows.k.data(), rows.v.data());
          next = written(next, batch, slot, positions, counts, rows);
        } else {
          plain_twin = [&cache, batch, positions, counts, rows, layer = producers[slot]] {
            cache.write(batch, layer, positions, counts, rows.k.data(), rows.v.data());
          };
          const std::vector<bool> shared = in_shared_blocks(batch, positions, counts);
          auto guard = cache.write_guarded(batch, producers[slot], positions, counts, rows.k.data(), rows.v.data());
          if (op == 7) {
            guard.commit();
            next = written(next, batch, slot, positions, counts, rows);
          } else {
            next = taken_back(next, batch, slot, positions, counts, rows, shared);
          }
        }
      }
      res.fail_after = -1;
      if (op == 5 && next == model) {  // an extend taken back: everything as it was
        ASSERT_EQ(snapshot(cache, all), before) << "step " << step;
      } else if (op == 9) {  // a write taken back: the blocks and bytes as they were
        const auto now = snapshot(cache, all);
        ASSERT_EQ(std::tie(now.reserved, now.live, now.in_use, now.free), std::tie(before.reserved, before.live, before.in_use, before.free))
            << "step " << step;
      }
    } catch (const pool_exhausted&) {
      res.fail_after = -1;
      ASSERT_EQ(snapshot(cache, all), before) << "step " << step << ", operation " << op;
      // A guarded call takes no more blocks than its plain form, so the pool refuses that too.
      if (plain_twin && !inject) {
        ASSERT_THROW(plain_twin(), pool_exhausted) << "step " << step << ", operation " << op;
      }
      continue;
    } catch (const capacity_error&) {
      res.fail_after = -1;
      ASSERT_EQ(snapshot(cache, all), before) << "step " << step << ", operation " << op;
      continue;
    }
    model = std::move(next);
    check(("step " + std::to_string(step) + ", operation " + std::to_string(op)).c_str());
    if (::testing::Test::HasFatalFailure()) return;
    if (uniform(0, 49) == 0) {
      cache.release_free_blocks();
      EXPECT_EQ(cache.free_blocks(), 0);
    }
  }
  for (seq_id id : ids()) cache.remove_sequence(id);
  EXPECT_EQ(cache.blocks_in_use(), 0);
  cache.release_free_blocks();
  EXPECT_EQ(res.bytes, 0);
}

}  // namespace

TEST(KvCache, RandomOperationsMatchAModel) {
  for (std::uint64_t fixed = 1; fixed <= 3; ++fixed) {
    const std::uint64_t seed = kvattn::testing::test_seed(fixed);
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    run_random_operations(PagedLayout{4, 14}, seed, 1500);
    run_random_operations(ContiguousLayout{.max_tokens = 16, .max_sequences = 5}, seed, 1500);
    run_random_operations(ReservedPagedLayout{}, seed, 1500);
  }
}
