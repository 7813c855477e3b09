// Layer and stack operators: projections + RoPE + cache + attention against a double reference,
// both RoPE conventions, decode continuing prefill positions, and CLA consumers writing nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <thread>

#include "reference.hpp"

using namespace kvattn;
using kvattn::testing::random_floats;
using kvattn::testing::reference_attention;

// Fault injection for the Failed... tests of the layer and the stack: when a thread sets it to
// n >= 0, its allocation through operator new (plain or aligned: the cache's K/V blocks come from
// std::pmr::new_delete_resource through the aligned form) after the next n throws std::bad_alloc,
// once (-1: none fail). Per thread: an allocation in another thread (an OpenMP worker) must not
// fail. Eigen's own temporaries (std::malloc) are not failed.
thread_local long allocations_until_failure = -1;

void* operator new(std::size_t n) {
  if (allocations_until_failure >= 0 && allocations_until_failure-- == 0) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t align) {
  if (allocations_until_failure >= 0 && allocations_until_failure-- == 0) throw std::bad_alloc();
  const auto a = static_cast<std::size_t>(align);
  if (void* p = std::aligned_alloc(a, (std::max<std::size_t>(n, 1) + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"  // GCC 12 takes free() here for a mismatch
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
// The nothrow pair too (std::stable_sort's buffer), so no block crosses between this file's
// functions and the defaults (ASan reports the mismatch).
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return std::malloc(n == 0 ? 1 : n); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace {

/// What a call did with the n-th allocation through operator new failing (FaultRun::of).
struct FaultRun {
  bool threw = false;        ///< std::bad_alloc, or a kvattn error reporting it (pool_exhausted)
  bool none_failed = false;  ///< the call made fewer than n + 1 allocations: every one was reached
  /// Runs call() on a fresh thread, whose reused scratch buffers start empty (so their allocations
  /// fail in turn too). A failure that an ostream swallows, in a message, lets the call succeed.
  template <class Call>
  static FaultRun of(long n, Call&& call) {
    FaultRun r;
    std::thread([&] {
      allocations_until_failure = n;
      try {
        call();
      } catch (const std::exception&) {
        r.threw = true;
      }
      r.none_failed = allocations_until_failure >= 0;
      allocations_until_failure = -1;
    }).join();
    return r;
  }
};

/// Fails each allocation of a forward in turn: attempt(n, y) builds fresh objects (cache, layer or
/// stack: so that every allocation is reached), runs the forward into y with allocation n failing
/// (FaultRun::of) and returns the run and the cache's snapshot. A forward that failed must leave
/// the cache as `before`; one that absorbed its failure, or made fewer allocations, must give
/// `after` and `want`.
template <class Attempt>
void expect_every_failure_undone(Attempt attempt, const kvattn::testing::CacheSnapshot& before,
                                 const kvattn::testing::CacheSnapshot& after, const std::vector<float>& want) {
  std::vector<float> y(want.size());
  int failures = 0;
  for (long n = 0;; ++n) {
    const auto [run, cache] = attempt(n, y);
    if (!run.threw) {
      EXPECT_EQ(cache, after);
      EXPECT_EQ(0, std::memcmp(y.data(), want.data(), y.size() * sizeof(float)));
      if (run.none_failed) break;
      continue;
    }
    ++failures;
    ASSERT_EQ(cache, before) << "allocation " << n << " failed";
  }
  EXPECT_GE(failures, 10);
}

/// Double reference of attention layers over a whole sequence processed at once (causal), with
/// RoPE: projections of the layer's input h ([tokens][d_model]), K and V as the cache stores them.
struct ReferenceLayer {
  int tokens, d_model;
  HeadShape heads;
  RopeConfig rope;

  std::vector<double> project(const std::vector<double>& h, const float* w, int out_dim) const {
    std::vector<double> y(static_cast<std::size_t>(tokens) * out_dim, 0.0);
    for (int t = 0; t < tokens; ++t)
      for (int o = 0; o < out_dim; ++o) {
        double s = 0;
        for (int i = 0; i < d_model; ++i) s += h[static_cast<std::size_t>(t) * d_model + i] * w[o * d_model + i];
        y[static_cast<std::size_t>(t) * out_dim + o] = s;
      }
    return y;
  }
  void rotate(std::vector<double>& y, int n_heads) const {
    const int d = heads.head_dim(), r = rope.rotary_dims == 0 ? d : rope.rotary_dims;
    for (int t = 0; t < tokens; ++t)
      for (int hh = 0; hh < n_heads; ++hh)
        for (int i = 0; i < r / 2; ++i) {
          const double ang = t * std::pow(rope.base, -2.0 * i / r);
          const int a = rope.style == rope_style::half ? i : 2 * i, b = rope.style == rope_style::half ? i + r / 2 : 2 * i + 1;
          double* row = &y[(static_cast<std::size_t>(t) * n_heads + hh) * d];
          const double x0 = row[a], x1 = row[b];
          row[a] = x0 * std::cos(ang) - x1 * std::sin(ang);
          row[b] = x0 * std::sin(ang) + x1 * std::cos(ang);
        }
  }
  /// A producer layer's K and V rows for input h, rounded to the storage type as the cache stores them.
  std::pair<std::vector<double>, std::vector<double>> kv(const std::vector<double>& h, const LayerWeights& w, kv_dtype dt) const {
    const int rows = heads.kv_heads() * heads.head_dim();
    std::vector<double> k = project(h, w.wk, rows), v = project(h, w.wv, rows);
    rotate(k, heads.kv_heads());
    for (double& e : k) e = round_to_dtype(static_cast<float>(e), dt);
    for (double& e : v) e = round_to_dtype(static_cast<float>(e), dt);
    return {std::move(k), std::move(v)};
  }
  /// The layer's output (Wo . attention) for input h over the K/V rows k, v (causal), the
  /// attention by reference_attention on q as the library holds it (f32).
  std::vector<double> attend(const std::vector<double>& h, const LayerWeights& w, const std::vector<double>& k,
                             const std::vector<double>& v) const {
    const int hq = heads.q_heads(), d = heads.head_dim();
    std::vector<double> q = project(h, w.wq, hq * d);
    rotate(q, hq);
    const std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end());
    const std::vector<double> attn = reference_attention(heads, qf.data(), tokens, kf.data(), vf.data(), tokens, true).out;
    std::vector<double> y(static_cast<std::size_t>(tokens) * d_model, 0.0);
    for (int t = 0; t < tokens; ++t)
      for (int o = 0; o < d_model; ++o) {
        double s = 0;
        for (int i = 0; i < hq * d; ++i) s += attn[static_cast<std::size_t>(t) * hq * d + i] * w.wo[o * hq * d + i];
        y[static_cast<std::size_t>(t) * d_model + o] = s;
      }
    return y;
  }
};

/// One producer layer's output for input x.
std::vector<double> reference_layer(const std::vector<float>& x, int tokens, int d_model, const HeadShape& h,
                                    const LayerWeights& w, const RopeConfig& rope, kv_dtype dt) {
  const ReferenceLayer ref{tokens, d_model, h, rope};
  const std::vector<double> input(x.begin(), x.end());
  const auto [k, v] = ref.kv(input, w, dt);
  return ref.attend(input, w, k, v);
}

/// A stack's output for input x: h <- h + layer_l(h), layer l attending to the K/V that layer
/// source_of(l) of the sharing map computed from its own input. The layers' inputs are rounded to f32, as the stack
/// keeps them.
std::vector<double> reference_stack(const std::vector<float>& x, int tokens, int d_model, const ModelConfig& config,
                                    std::span<const LayerWeights> w) {
  const ReferenceLayer ref{tokens, d_model, config.heads(), RopeConfig{}};
  std::vector<double> h(x.begin(), x.end());
  std::vector<std::pair<std::vector<double>, std::vector<double>>> kv(static_cast<std::size_t>(config.n_layers()));
  for (int l = 0; l < config.n_layers(); ++l) {
    if (config.layers().is_producer(l)) kv[static_cast<std::size_t>(l)] = ref.kv(h, w[static_cast<std::size_t>(l)], config.dtype());
    const auto& [k, v] = kv[static_cast<std::size_t>(config.layers().source_of(l))];
    const std::vector<double> y = ref.attend(h, w[static_cast<std::size_t>(l)], k, v);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>(h[i] + y[i]);
  }
  return h;
}

struct Weights {
  std::vector<float> wq, wk, wv, wo;
  LayerWeights view() const { return {wq.data(), wk.data(), wv.data(), wo.data()}; }
  Weights(std::mt19937_64& rng, int d_model, const HeadShape& h) {
    const float s = 1.f / std::sqrt(float(d_model));
    wq = random_floats(rng, std::size_t(h.q_heads()) * h.head_dim() * d_model, -s, s);
    wk = random_floats(rng, std::size_t(h.kv_heads()) * h.head_dim() * d_model, -s, s);
    wv = random_floats(rng, wk.size(), -s, s);
    wo = random_floats(rng, wq.size(), -s, s);
  }
};

}  // namespace

TEST(AttentionLayer, MatchesReferenceWithBothRopeStylesAndDecodeContinuesPositions) {
  std::mt19937_64 rng(5);
  const int d_model = 48, tokens = 12, prefill_tokens = 7;
  for (rope_style style : {rope_style::half, rope_style::interleaved})
    for (int rotary : {0, 8})
      for (kv_dtype dt : {kv_dtype::f32, kv_dtype::bf16}) {
        const HeadShape h(4, 2, 16);
        const ModelConfig cfg(h, LayerSharingMap::none(1), dt);
        const Weights w(rng, d_model, h);
        RopeConfig rope;
        rope.style = style;
        rope.rotary_dims = rotary;
        rope.base = 500.0;  // fast rotation, so a wrong position shows
        const auto x = random_floats(rng, std::size_t(tokens) * d_model);
        const auto ref = reference_layer(x, tokens, d_model, h, w.view(), rope, dt);
        // Prefill 7 tokens, then decode the remaining 5 one at a time.
        KvCache<PagedLayout> cache(cfg, PagedLayout{4});
        AttentionLayer layer(cfg, 0, d_model, w.view(), rope);
        cache.add_sequence(1);
        const std::vector<seq_id> ids{1};
        std::vector<float> y(std::size_t(tokens) * d_model);
        cache.extend(1, prefill_tokens);
        layer.forward(cache, ids, std::vector<std::int64_t>{prefill_tokens}, x.data(), y.data());
        for (int t = prefill_tokens; t < tokens; ++t) {
          cache.extend(1, 1);
          layer.forward(cache, ids, std::vector<std::int64_t>{1}, x.data() + t * d_model, y.data() + t * d_model);
        }
        const double err = kvattn::testing::max_abs_diff(y.data(), ref.data(), ref.size());
        EXPECT_LE(err, 2e-5) << "style " << int(style) << " rotary " << rotary << " " << dtype_name(dt);
      }
}

TEST(AttentionLayer, RejectsBadInputs) {
  std::mt19937_64 rng(6);
  const HeadShape h(4, 2, 16);
  const ModelConfig cfg(h, LayerSharingMap::cla(2, 2), kv_dtype::f32);
  const Weights w(rng, 32, h);
  EXPECT_THROW(AttentionLayer(cfg, 0, 32, LayerWeights{w.wq.data(), nullptr, nullptr, w.wo.data()}), config_error);
  EXPECT_NO_THROW(AttentionLayer(cfg, 1, 32, LayerWeights{w.wq.data(), nullptr, nullptr, w.wo.data()}));
  RopeConfig odd;
  odd.rotary_dims = 7;
  EXPECT_THROW(AttentionLayer(cfg, 0, 32, w.view(), odd), config_error);
  KvCache<PagedLayout> cache(cfg);
  cache.add_sequence(1);
  AttentionLayer layer(cfg, 0, 32, w.view());
  std::vector<float> x(32), y(32);
  const std::vector<seq_id> ids{1};
  EXPECT_THROW(layer.forward(cache, ids, std::vector<std::int64_t>{1}, x.data(), y.data()), shape_error);  // not extended
  // Options are checked before the layer writes K/V: the extended row keeps what it held.
  cache.extend(1, 1);
  std::vector<float> k_before(2 * 16), v_before(2 * 16), k_after(2 * 16), v_after(2 * 16);
  cache.read(1, 0, 0, k_before.data(), v_before.data());
  const std::vector<std::int64_t> one{1};
  AttentionOptions strided;
  strided.q_stride = 4096;
  EXPECT_THROW(layer.forward(cache, ids, one, x.data(), y.data(), strided), shape_error);
  AttentionOptions bad_scale;
  bad_scale.scale = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(layer.forward(cache, ids, one, x.data(), y.data(), bad_scale), shape_error);
  AttentionOptions bad_threads;
  bad_threads.threads = -1;
  EXPECT_THROW(layer.forward(cache, ids, one, x.data(), y.data(), bad_threads), config_error);
  // A sequence listed twice, refused by the producer and the consumer (which writes nothing) alike.
  const std::vector<seq_id> twice{1, 1};
  const std::vector<std::int64_t> ones{1, 1};
  std::vector<float> x2(2 * 32), y2(2 * 32);
  EXPECT_THROW(layer.forward(cache, twice, ones, x2.data(), y2.data()), shape_error);
  AttentionLayer consumer(cfg, 1, 32, LayerWeights{w.wq.data(), nullptr, nullptr, w.wo.data()});
  EXPECT_THROW(consumer.forward(cache, twice, ones, x2.data(), y2.data()), shape_error);
  cache.read(1, 0, 0, k_after.data(), v_after.data());
  EXPECT_EQ(std::memcmp(k_before.data(), k_after.data(), k_after.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(v_before.data(), v_after.data(), v_after.size() * sizeof(float)), 0);
}

TEST(AttentionLayer, FailedForwardOverForkedTokensLeavesTheCacheAsItWas) {
  // Sequences 1 and 2 (6 tokens each, in blocks of 4) are forked into 3 and 4; a forward that treats
  // the last 2 tokens of 1 and 2 as new writes into blocks shared with the forks: two copies, but
  // the pool has one free block. Nothing may change, sequence 1's copy and K/V write included.
  std::mt19937_64 rng(9);
  const HeadShape h(2, 1, 16);
  const ModelConfig cfg(h, LayerSharingMap::none(1), kv_dtype::f32);
  const Weights w(rng, 8, h);
  AttentionLayer layer(cfg, 0, 8, w.view());
  KvCache<PagedLayout> cache(cfg, PagedLayout{4, 5});
  for (seq_id id : {1, 2}) {
    cache.add_sequence(id);
    kvattn::testing::append_random(cache, id, 6, rng);
    cache.fork_sequence(id, id + 2);
  }
  const std::vector<seq_id> ids{1, 2}, all{1, 2, 3, 4};
  const std::vector<std::int64_t> counts{2, 2};
  const std::vector<float> x = random_floats(rng, 4 * 8, -1.f, 1.f);
  std::vector<float> y(x.size());
  const auto before = kvattn::testing::snapshot(cache, all);
  EXPECT_THROW(layer.forward(cache, ids, counts, x.data(), y.data()), pool_exhausted);
  EXPECT_EQ(kvattn::testing::snapshot(cache, all), before);
}

// The same forked tokens with room in the pool, while every allocation through operator new of
// the forward fails in turn, the attention's and the output projection's buffers after the K/V
// write included (each forward on a fresh thread, whose reused scratch starts empty): the write's
// copies of the shared blocks are taken back, so nothing changes. Batches: two sequences that
// share nothing (each shares with a fork outside the batch), then a sequence and its fork in one
// batch, in both orders, which write different rows into the block they share: both copy it, so
// the original the first gets back holds neither's new rows.
TEST(AttentionLayer, ForwardFailingAfterItsWriteLeavesTheCacheAsItWas) {
  std::mt19937_64 rng(9);
  const HeadShape h(2, 1, 16);
  const ModelConfig cfg(h, LayerSharingMap::none(1), kv_dtype::f32);
  const Weights w(rng, 8, h);
  const std::vector<seq_id> all{1, 2, 3, 4};
  const std::vector<std::int64_t> counts{2, 2};
  const std::vector<float> x = random_floats(rng, 4 * 8, -1.f, 1.f);
  auto prepare = [&](KvCache<PagedLayout>& cache) {
    std::mt19937_64 fill(10);
    for (seq_id id : {1, 2}) {
      cache.add_sequence(id);
      kvattn::testing::append_random(cache, id, 6, fill);
      cache.fork_sequence(id, id + 2);
    }
  };
  for (const std::vector<seq_id>& ids : {std::vector<seq_id>{1, 2}, std::vector<seq_id>{1, 3}, std::vector<seq_id>{3, 1}}) {
    SCOPED_TRACE(::testing::Message() << "batch " << ids[0] << ", " << ids[1]);
    KvCache<PagedLayout> reference(cfg, PagedLayout{4, 16});
    prepare(reference);
    const auto before = kvattn::testing::snapshot(reference, all);
    std::vector<float> want(x.size());
    AttentionLayer(cfg, 0, 8, w.view()).forward(reference, ids, counts, x.data(), want.data());
    const auto attempt = [&](long n, std::vector<float>& y) {
      AttentionLayer layer(cfg, 0, 8, w.view());
      KvCache<PagedLayout> cache(cfg, PagedLayout{4, 16});
      prepare(cache);
      const FaultRun run = FaultRun::of(n, [&] { layer.forward(cache, ids, counts, x.data(), y.data()); });
      return std::pair(run, kvattn::testing::snapshot(cache, all));
    };
    expect_every_failure_undone(attempt, before, kvattn::testing::snapshot(reference, all), want);
  }
}

TEST(AttentionStack, ClaConsumersReadTheProducersCacheAndWriteNothing) {
  std::mt19937_64 rng(7);
  const int d_model = 32, n_layers = 4;
  const HeadShape h(4, 1, 16);
  const ModelConfig cla(h, LayerSharingMap::cla(n_layers, 2), kv_dtype::f32);
  std::vector<Weights> ws;
  std::vector<LayerWeights> views;
  for (int l = 0; l < n_layers; ++l) ws.emplace_back(rng, d_model, h);
  for (int l = 0; l < n_layers; ++l) {
    LayerWeights v = ws[std::size_t(l)].view();
    if (!cla.layers().is_producer(l)) v.wk = v.wv = nullptr;  // consumers need no K/V weights
    views.push_back(v);
  }
  AttentionStack stack(cla, d_model, views);
  KvCache<PagedLayout> cache(cla, PagedLayout{8});
  cache.add_sequence(1);
  const std::vector<seq_id> ids{1};
  const auto x = random_floats(rng, 10 * std::size_t(d_model));
  std::vector<float> y(x.size());
  stack.forward(cache, ids, std::vector<std::int64_t>{10}, x.data(), y.data());
  EXPECT_EQ(cache.length(1), 10);
  EXPECT_EQ(cache.live_bytes(), 10 * 2 * 1 * 16 * 2 * 4);  // two KV layers
  // Against the double reference of the whole stack, whose consumers attend to their producer's K/V.
  const std::vector<double> want = reference_stack(x, 10, d_model, cla, views);
  EXPECT_LE(kvattn::testing::max_abs_diff(y.data(), want.data(), want.size()), 2e-5);

  // Same result token by token, and an equivalent explicit layer-by-layer computation.
  KvCache<PagedLayout> cache2(cla, PagedLayout{8});
  cache2.add_sequence(1);
  std::vector<float> y2(x.size());
  for (int t = 0; t < 10; ++t)
    stack.forward(cache2, ids, std::vector<std::int64_t>{1}, x.data() + t * d_model, y2.data() + t * d_model);
  for (std::size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], y2[i], 1e-5);

  // Layer 1 alone on the hidden state after layer 0 attends to layer 0's cached K/V (computed from
  // layer 0's input, not from its own) and writes nothing.
  KvCache<PagedLayout> c3(cla, PagedLayout{8});
  c3.add_sequence(1);
  c3.extend(1, 10);
  AttentionLayer l0(cla, 0, d_model, views[0]), l1(cla, 1, d_model, views[1]);
  std::vector<float> d0(x.size()), h1(x.size()), d1(x.size());
  l0.forward(c3, ids, std::vector<std::int64_t>{10}, x.data(), d0.data());
  for (std::size_t i = 0; i < x.size(); ++i) h1[i] = x[i] + d0[i];
  const auto snap = kvattn::testing::snapshot(c3, ids);
  l1.forward(c3, ids, std::vector<std::int64_t>{10}, h1.data(), d1.data());
  EXPECT_EQ(kvattn::testing::snapshot(c3, ids), snap);  // the consumer wrote nothing
  const ReferenceLayer ref{10, d_model, h, RopeConfig{}};
  const auto [k0, v0] = ref.kv(std::vector<double>(x.begin(), x.end()), views[0], kv_dtype::f32);
  const std::vector<double> want1 = ref.attend(std::vector<double>(h1.begin(), h1.end()), views[1], k0, v0);
  EXPECT_LE(kvattn::testing::max_abs_diff(d1.data(), want1.data(), want1.size()), 2e-5);
}

// Every allocation through operator new of a stack forward fails in turn (each on a fresh stack,
// cache and thread, so that every one is reached), while the sequence shares its last, partly filled block
// with a fork: the extend copies that block and takes a new one, and a failure in the layers after
// it must give both back (blocks, bytes, the fork's sharing), not only the lengths. Then with the
// fork truncated back by a token and both in the batch (in both orders): each writes the block
// they share at a position the other reads, so both must copy it for the undo to be exact. The
// K/V blocks (the default memory resource: aligned operator new) fail in turn too.
TEST(AttentionStack, FailedForwardLeavesTheCacheAsItWas) {
  std::mt19937_64 rng(9);
  const HeadShape h(4, 2, 16);
  const int d_model = 32;
  const ModelConfig cfg(h, LayerSharingMap::cla(4, 2), kv_dtype::f16);
  std::vector<Weights> w;
  std::vector<LayerWeights> views;
  for (int l = 0; l < 4; ++l) w.emplace_back(rng, d_model, h);
  for (const Weights& wl : w) views.push_back(wl.view());
  const std::vector<float> prompt = random_floats(rng, 6 * d_model, -1.f, 1.f), x = random_floats(rng, 6 * d_model, -1.f, 1.f);
  const std::vector<seq_id> one{1}, both{1, 2};
  const std::vector<std::int64_t> six{6};
  struct Batch {
    std::vector<seq_id> ids;
    std::vector<std::int64_t> counts;
    std::int64_t fork_length;  // the fork truncated to this many tokens
  };
  for (const Batch& batch : {Batch{one, {3}, 6}, Batch{both, {3, 3}, 5}, Batch{{2, 1}, {2, 1}, 5}}) {
    SCOPED_TRACE(::testing::Message() << batch.ids.size() << " sequence(s), fork of length " << batch.fork_length);
    auto prepare = [&](AttentionStack& stack, KvCache<PagedLayout>& cache) {
      cache.add_sequence(1);
      std::vector<float> y(prompt.size());
      stack.forward(cache, one, six, prompt.data(), y.data());  // blocks 0 and 1 (2 of its 4 tokens)
      cache.fork_sequence(1, 2);
      cache.truncate(2, batch.fork_length);
    };
    AttentionStack reference_stack(cfg, d_model, views);
    KvCache<PagedLayout> reference(cfg, PagedLayout{4, 16});
    prepare(reference_stack, reference);
    const auto before = kvattn::testing::snapshot(reference, both);
    std::vector<float> want(x.size());
    reference_stack.forward(reference, batch.ids, batch.counts, x.data(), want.data());
    const auto attempt = [&](long n, std::vector<float>& y) {
      AttentionStack stack(cfg, d_model, views);
      KvCache<PagedLayout> cache(cfg, PagedLayout{4, 16});
      prepare(stack, cache);
      const FaultRun run = FaultRun::of(n, [&] { stack.forward(cache, batch.ids, batch.counts, x.data(), y.data()); });
      return std::pair(run, kvattn::testing::snapshot(cache, both));
    };
    expect_every_failure_undone(attempt, before, kvattn::testing::snapshot(reference, both), want);
  }
}

TEST(AttentionStack, FailedForwardRestoresLengths) {
  std::mt19937_64 rng(8);
  const HeadShape h(2, 1, 16);
  const ModelConfig cfg(h, LayerSharingMap::none(2), kv_dtype::f32);
  const Weights w(rng, 16, h);
  const std::vector<LayerWeights> views{w.view(), w.view()};
  AttentionStack stack(cfg, 16, views);
  KvCache<PagedLayout> cache(cfg, PagedLayout{4, 2});
  cache.add_sequence(1);
  const std::vector<seq_id> ids{1};
  std::vector<float> x(16 * 16), y(x.size());
  EXPECT_THROW(stack.forward(cache, ids, std::vector<std::int64_t>{9}, x.data(), y.data()), pool_exhausted);
  EXPECT_EQ(cache.length(1), 0);
  EXPECT_THROW(stack.forward(cache, ids, std::vector<std::int64_t>{2}, nullptr, y.data()), shape_error);
  EXPECT_EQ(cache.length(1), 0);
  AttentionOptions strided;
  strided.out_stride = 64;
  EXPECT_THROW(stack.forward(cache, ids, std::vector<std::int64_t>{2}, x.data(), y.data(), strided), shape_error);
  EXPECT_EQ(cache.length(1), 0);
  EXPECT_THROW((void)stack.layer(2), config_error);
  EXPECT_THROW((void)stack.layer(-1), config_error);
  EXPECT_EQ(stack.layer(1).layer(), 1);
}
