// Attention kernels against the double-precision reference over thousands of random shapes:
// MHA/GQA/MQA, head dims {16, 46, 64, 80, 90, 128, 256}, ragged lengths from 1, every storage type,
// paged and contiguous caches, 1 and 2 threads, split-K and unsplit, plus extreme logits and long
// contexts. Tolerance: per output row, the error f32 arithmetic may make in it (reference.hpp,
// Reference: ~1.5e-5 for unit-scale inputs, more for large logits); outputs start as NaN, so a row
// a kernel never writes fails.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string_view>

#include "reference.hpp"

using namespace kvattn;
using kvattn::testing::append_random;
using kvattn::testing::max_abs_diff;
using kvattn::testing::max_error_ratio;
using kvattn::testing::random_floats;
using kvattn::testing::reference_attention;

namespace {

enum class mode { decode, prefill, cross };

struct Case {
  int hq, hkv, d;
  kv_dtype dtype;
  int threads;
  bool paged;
  int block;                      // paged block tokens
  int layers, factor;             // sharing map: cla(layers, factor)
  int layer;                      // layer attended
  std::vector<std::int64_t> prefix;  // cached tokens before the new chunk
  std::vector<std::int64_t> chunk;   // new (query) tokens
  mode m;
  float q_scale = 1.f;            // scales q, to reach extreme logits
  float scale = 0.f;              // AttentionOptions::scale (0: 1/sqrt(d))
  std::int64_t run_keys = 0;      // SplitRules::run_keys (0: the default), small to reach runs and short chunks

  std::string describe() const {
    std::ostringstream s;
    s << (m == mode::decode ? "decode" : m == mode::prefill ? "prefill" : "cross") << " Hq=" << hq << " Hkv=" << hkv
      << " d=" << d << " " << dtype_name(dtype) << " threads=" << threads << (paged ? " paged/" : " contiguous/")
      << block << " layer " << layer << " of cla(" << layers << "," << factor << ") q_scale=" << q_scale << " scale=" << scale
      << " run_keys=" << run_keys << " prefix,chunk=";
    for (std::size_t b = 0; b < prefix.size(); ++b) s << " " << prefix[b] << "+" << chunk[b];
    return s.str();
  }
};

Case random_case(std::mt19937_64& rng, mode m) {
  auto pick = [&](std::initializer_list<int> v) { return *(v.begin() + rng() % v.size()); };
  Case c{};
  c.m = m;
  c.d = pick({16, 46, 64, 80, 90, 96, 128, 256});
  c.hkv = pick({1, 1, 2, 3, 4});
  c.hq = c.hkv * pick({1, 2, 3, 4, 6, 8, 16});  // 3 and 6: groups the kernel table does not specialize
  while (c.hq > 32) c.hq /= 2, c.hkv = std::min(c.hkv, c.hq);
  if (c.hq % c.hkv) c.hkv = 1;
  c.dtype = static_cast<kv_dtype>(rng() % 3);
  c.threads = 1 + static_cast<int>(rng() % 2);
  c.paged = rng() % 2;
  c.block = pick({1, 3, 16, 64});
  c.layers = pick({1, 2, 3});
  c.factor = 1 + static_cast<int>(rng() % c.layers);
  c.layer = static_cast<int>(rng() % c.layers);
  if (rng() % 4 == 0) c.scale = 0.02f + 0.5f * static_cast<float>(rng() % 1000) / 1000.f;
  if (rng() % 3 == 0) c.run_keys = pick({16, 40, 100});  // runs and chunks that cut key tiles and blocks
  const int batch = 1 + static_cast<int>(rng() % 4);
  for (int b = 0; b < batch; ++b) {
    std::int64_t len = rng() % 4 == 0 ? 0 : 1 + static_cast<std::int64_t>(rng() % 150);
    if (rng() % 25 == 0) len = 1000 + static_cast<std::int64_t>(rng() % 2500);  // crosses split-K chunks
    std::int64_t n = m == mode::decode ? 1 : 1 + static_cast<std::int64_t>(rng() % 40);
    if (len >= 1000) n = std::min<std::int64_t>(n, 4);  // long prefix: few queries (the split-K path), keeps the reference cheap
    if (m == mode::cross && len == 0) len = 1;
    c.prefix.push_back(len);
    c.chunk.push_back(n);
  }
  return c;
}

/// Runs one case and returns the largest ratio of an output row's error to its tolerance (<= 1
/// passes); the outputs into *outputs if given.
template <KvLayoutPolicy L>
double run_case(const Case& c, L layout, std::uint64_t seed, std::vector<float>* outputs = nullptr) {
  std::mt19937_64 rng(seed);
  const ModelConfig cfg(HeadShape(c.hq, c.hkv, c.d), LayerSharingMap::cla(c.layers, c.factor), c.dtype);
  KvCache<L> cache(cfg, layout);
  std::vector<seq_id> ids;
  std::int64_t total = 0;
  for (std::size_t b = 0; b < c.prefix.size(); ++b) {
    const seq_id id = 100 + static_cast<seq_id>(b) * 7;
    ids.push_back(id);
    cache.add_sequence(id);
    // Cross-attention attends to the cached tokens only; the others append the chunk as well.
    append_random(cache, id, c.prefix[b] + (c.m == mode::cross ? 0 : c.chunk[b]), rng);
    total += c.chunk[b];
  }
  const std::int64_t row = std::int64_t{c.hq} * c.d;
  const std::vector<float> q = random_floats(rng, static_cast<std::size_t>(total * row), -c.q_scale, c.q_scale);
  std::vector<float> out(q.size(), std::nanf(""));
  AttentionOptions opt;
  opt.threads = c.threads;
  opt.min_pairs_per_thread = 0;  // the threads asked for run, however small the case
  opt.scale = c.scale;
  if (c.run_keys > 0) {  // the public calls' body, with a small SplitRules::run_keys
    kernels::SplitRules rules;
    rules.run_keys = c.run_keys;
    const std::vector<std::int64_t> ones(ids.size(), 1);
    detail::attend<HeadShape>(cache, c.layer, ids, c.m == mode::decode ? ones : c.chunk, q.data(), out.data(), opt,
                              c.m != mode::cross, "test", rules);
  } else if (c.m == mode::decode) {
    decode(cache, c.layer, ids, q.data(), out.data(), opt);
  } else if (c.m == mode::prefill) {
    prefill(cache, c.layer, ids, c.chunk, q.data(), out.data(), opt);
  } else {
    cross_attention(cache, c.layer, ids, c.chunk, q.data(), out.data(), opt);
  }
  double err = 0;
  std::int64_t offset = 0;
  for (std::size_t b = 0; b < ids.size(); ++b) {
    const auto ref = reference_attention(cache, c.layer, ids[b], q.data() + offset * row, c.chunk[b], c.m != mode::cross, c.scale);
    err = std::max(err, max_error_ratio(out.data() + offset * row, ref));
    offset += c.chunk[b];
  }
  if (outputs != nullptr) *outputs = std::move(out);
  return err;
}

/// A contiguous layout with room for the case's longest sequence.
ContiguousLayout contiguous_for(const Case& c) {
  std::int64_t longest = 1;
  for (std::size_t b = 0; b < c.prefix.size(); ++b) longest = std::max(longest, c.prefix[b] + c.chunk[b]);
  return ContiguousLayout{longest};
}

double run_case(const Case& c, std::uint64_t seed) {
  return c.paged ? run_case(c, PagedLayout{c.block}, seed) : run_case(c, contiguous_for(c), seed);
}

void run_random_cases(mode m, int n_cases, std::uint64_t fixed_seed) {
  const std::uint64_t seed0 = kvattn::testing::test_seed(fixed_seed);
  std::mt19937_64 rng(seed0);
  n_cases = kvattn::testing::scaled_cases(n_cases);
  for (int i = 0; i < n_cases; ++i) {
    const Case c = random_case(rng, m);
    const double err = run_case(c, seed0 * 1000003 + static_cast<std::uint64_t>(i));
    ASSERT_LE(err, 1.0) << "case " << i << ": " << c.describe();
  }
}

}  // namespace

/// Runs a test body once per ISA path this CPU supports, forcing the path (KVATTN_ISA's C++ twin).
class PerIsa : public ::testing::TestWithParam<isa> {
 protected:
  void SetUp() override { set_isa(GetParam()); }
  void TearDown() override { reset_isa(); }
};

INSTANTIATE_TEST_SUITE_P(Isa, PerIsa, ::testing::ValuesIn(supported_isas()),
                         [](const ::testing::TestParamInfo<isa>& info) { return std::string(isa_name(info.param)); });

TEST_P(PerIsa, RandomDecode) { run_random_cases(mode::decode, 500, 11); }
TEST_P(PerIsa, RandomPrefillAndAppend) { run_random_cases(mode::prefill, 400, 12); }
TEST_P(PerIsa, RandomCrossAttention) { run_random_cases(mode::cross, 150, 13); }

TEST_P(PerIsa, ExtremeLogits) {
  // q in [-40, 40], K in [-1, 1]: logits with a standard deviation of ~13 at the default scale
  // 1/sqrt(d) (peaks ~50), ~13 x scale x sqrt(d) (peaks in the hundreds) with the custom scales of
  // a quarter of the cases. Online softmax must neither overflow nor lose the winner; the
  // tolerance grows with the logits' size (Reference).
  std::mt19937_64 rng(kvattn::testing::test_seed(21));
  for (int i = 0; i < kvattn::testing::scaled_cases(60); ++i) {
    Case c = random_case(rng, i % 2 ? mode::decode : mode::prefill);
    c.q_scale = 40.f;
    const double err = run_case(c, kvattn::testing::test_seed(500 + static_cast<std::uint64_t>(i)));
    ASSERT_LE(err, 1.0) << c.describe();
  }
}

TEST_P(PerIsa, LongContext) {
  // 40k keys: split-K chunks merged by log-sum-exp, paged and contiguous.
  for (bool paged : {true, false}) {
    Case c{};
    c.hq = 8, c.hkv = 2, c.d = 64, c.dtype = kv_dtype::bf16, c.threads = 2, c.paged = paged, c.block = 256;
    c.layers = 1, c.factor = 1, c.layer = 0, c.m = mode::decode;
    c.prefix = {40000, 3}, c.chunk = {1, 1};
    EXPECT_LE(run_case(c, 31), 1.0) << c.describe();
  }
}

TEST_P(PerIsa, ManyTokensOverManyKeysKeepF32SumsShort) {
  // 17 query tokens over 262144 keys, nearly uniform weights (K in [-0.1, 0.1], d=16) and V in
  // [0.9, 1]: one running f32 sum over all keys erred by 2.1x the tolerance; runs of
  // SplitRules::run_keys keys, merged, stay within it.
  const int d = 16;
  const std::int64_t len = 262144, n = 17;
  const ModelConfig cfg(HeadShape(1, 1, d), LayerSharingMap::none(1), kv_dtype::f32);
  KvCache<ContiguousLayout> cache(cfg, ContiguousLayout{len});
  cache.add_sequence(1);
  std::mt19937_64 rng(41);
  const auto k = random_floats(rng, len * d, -0.1f, 0.1f), v = random_floats(rng, len * d, 0.9f, 1.f);
  cache.append(1, len, k.data(), v.data());
  const auto q = random_floats(rng, n * d);
  std::vector<float> out(q.size(), std::nanf(""));
  const seq_id ids[] = {1};
  const std::int64_t counts[] = {n};
  AttentionOptions opt;
  opt.threads = 2;
  for (bool causal : {true, false}) {
    if (causal)
      prefill(cache, 0, ids, counts, q.data(), out.data(), opt);
    else
      cross_attention(cache, 0, ids, counts, q.data(), out.data(), opt);
    EXPECT_LE(max_error_ratio(out.data(), reference_attention(cache, 0, 1, q.data(), n, causal)), 1.0) << (causal ? "prefill" : "cross");
  }
}

TEST_P(PerIsa, ANonFiniteKOrVRowReachesOnlyTheRowsThatSeeIt) {
  // A causal chunk whose cache holds an inf or NaN in the K or V row of one of its own keys: the
  // chunk's earlier tokens do not see that key, so their outputs stay finite and correct (masked
  // probabilities are zeros, and 0 x inf would be NaN). Groups for every kernel: direct (2, 4, 8
  // and 16 rows per tile) and buffered (3, 32 and 17-token tiles' rows), every storage type.
  std::mt19937_64 rng(kvattn::testing::test_seed(43));
  for (kv_dtype dtype : {kv_dtype::f32, kv_dtype::f16, kv_dtype::bf16})
    for (const auto& [hq, hkv] : std::initializer_list<std::pair<int, int>>{{1, 1}, {2, 1}, {4, 1}, {8, 1}, {16, 1}, {3, 1}, {32, 1}, {8, 2}})
      for (const std::int64_t n : {2, 4, 20})
        for (const int d : {64, 80}) {  // 80: a last vector outside the 2L-dim pairs of bf16 rows
          const std::int64_t len = 5 + n;
          const ModelConfig cfg(HeadShape(hq, hkv, d), LayerSharingMap::none(1), dtype);
          KvCache<PagedLayout> cache(cfg, PagedLayout{16});
          cache.add_sequence(1);
          auto k = random_floats(rng, static_cast<std::size_t>(len * hkv * d)), v = random_floats(rng, k.size());
          const std::int64_t bad_key = len - 1 - static_cast<std::int64_t>(rng() % 2);  // seen by the last 1 or 2 tokens
          auto& poisoned = rng() % 3 ? v : k;  // mostly V (0 x inf in P·V), K too (masked scores)
          poisoned[static_cast<std::size_t>((bad_key * hkv + hkv - 1) * d + 7)] = rng() % 2 ? std::numeric_limits<float>::infinity() : std::nanf("");
          cache.append(1, len, k.data(), v.data());
          const auto q = random_floats(rng, static_cast<std::size_t>(n * hq * d));
          std::vector<float> out(q.size(), std::nanf(""));
          const seq_id ids[] = {1};
          const std::int64_t counts[] = {n};
          prefill(cache, 0, ids, counts, q.data(), out.data());
          const auto ref = reference_attention(cache, 0, 1, q.data(), n, true);
          int finite_rows = 0;
          for (std::size_t row = 0; row < ref.tolerance.size(); ++row) {
            const double* expected = ref.out.data() + row * d;
            if (!std::all_of(expected, expected + d, [](double x) { return std::isfinite(x); })) continue;
            ++finite_rows;
            ASSERT_LE(max_abs_diff(out.data() + row * d, expected, d), ref.tolerance[row])
                << dtype_name(dtype) << " Hq=" << hq << " Hkv=" << hkv << " n=" << n << " d=" << d << " bad key " << bad_key << ": row " << row;
          }
          EXPECT_GE(finite_rows, (n - 2) * hq);
        }
}

TEST_P(PerIsa, LayoutsGiveTheSameBits) {
  // Kernels read every layout through the same views: paged blocks of any size and a contiguous
  // cache holding the same K/V give the same bits.
  std::mt19937_64 rng(kvattn::testing::test_seed(71));
  for (int i = 0; i < kvattn::testing::scaled_cases(40); ++i) {
    const Case c = random_case(rng, static_cast<mode>(i % 3));
    const std::uint64_t seed = kvattn::testing::test_seed(7000 + static_cast<std::uint64_t>(i));
    std::vector<float> contiguous, paged;
    ASSERT_LE(run_case(c, contiguous_for(c), seed, &contiguous), 1.0) << c.describe();
    for (std::int64_t block : {1, 3, 16, 64}) {
      (void)run_case(c, PagedLayout{block}, seed, &paged);
      ASSERT_EQ(0, std::memcmp(contiguous.data(), paged.data(), paged.size() * sizeof(float))) << "block " << block << ": " << c.describe();
    }
  }
}

TEST_P(PerIsa, ResultsDoNotDependOnThreads) {
  // Bitwise: the plan depends only on the data, and every sum runs in the same order.
  std::mt19937_64 rng(kvattn::testing::test_seed(41));
  auto check = [&](const Case& c, fpmath_mode fpmath = fpmath_mode::strict) {
    const mode m = c.m;
    const ModelConfig cfg(HeadShape(c.hq, c.hkv, c.d), LayerSharingMap::none(1), c.dtype);
    KvCache<PagedLayout> cache(cfg, PagedLayout{16});
    std::vector<seq_id> ids;
    std::int64_t total = 0;
    for (std::size_t b = 0; b < c.prefix.size(); ++b) {
      ids.push_back(static_cast<seq_id>(b));
      cache.add_sequence(static_cast<seq_id>(b));
      append_random(cache, static_cast<seq_id>(b), c.prefix[b] + c.chunk[b], rng);
      total += c.chunk[b];
    }
    const auto q = random_floats(rng, static_cast<std::size_t>(total * c.hq * c.d));
    std::vector<std::vector<float>> outs;
    for (int threads : {1, 2, 3, 4}) {
      std::vector<float> out(q.size());
      AttentionOptions opt;
      opt.threads = threads;
      opt.min_pairs_per_thread = 0;
      opt.fpmath = fpmath;
      if (m == mode::decode)
        decode(cache, 0, ids, q.data(), out.data(), opt);
      else
        prefill(cache, 0, ids, c.chunk, q.data(), out.data(), opt);
      outs.push_back(std::move(out));
    }
    for (std::size_t t = 1; t < outs.size(); ++t)
      ASSERT_EQ(0, std::memcmp(outs[0].data(), outs[t].data(), outs[0].size() * sizeof(float))) << c.describe();
  };
  for (int i = 0; i < kvattn::testing::scaled_cases(30); ++i) {
    Case c = random_case(rng, i % 2 ? mode::decode : mode::prefill);
    c.prefix[0] = 2000 + i * 37;  // split-K in play
    check(c);
  }
  // Contexts long enough that the split's chunks grow past their minimum, where a plan sized by
  // the thread count would differ: a 40k-key decode beside a short one, and a prefill chunk over 6k.
  Case c{};
  c.hq = 8, c.hkv = 2, c.d = 64, c.dtype = kv_dtype::bf16, c.layers = 1, c.factor = 1, c.m = mode::decode;
  c.prefix = {40000, 3}, c.chunk = {1, 1};
  check(c);
  c.m = mode::prefill, c.dtype = kv_dtype::f16, c.prefix = {6000}, c.chunk = {5};
  check(c);
  // 8 KV heads x 3001 keys: 8 units of 3 chunks, which 1 and 2 threads claim unit by unit, each
  // in one kernel pass (AttendTile::chunk_keys), and 3 and 4 chunk by chunk (kernels::claim_order):
  // every direct-kernel row count and storage type, bf16 pair products, a buffered group (3).
  c.m = mode::decode, c.d = 64, c.prefix = {3000}, c.chunk = {1}, c.hkv = 8;
  for (kv_dtype dtype : {kv_dtype::f16, kv_dtype::bf16, kv_dtype::f32})
    for (int group : {1, 2, 3, 4, 8, 16}) {
      c.dtype = dtype, c.hq = 8 * group;
      check(c);
      if (dtype == kv_dtype::bf16) check(c, fpmath_mode::bf16);
    }
}

TEST_P(PerIsa, ASequencesResultDoesNotDependOnItsBatch) {
  // Bitwise: a decode sequence is split by its own length only (kernels::plan_attention), so it
  // gives the same output alone, beside a much longer sequence (whose length would have set a
  // batch-wide chunk size), and among 40 short ones (82 units, enough work for any thread count
  // without splitting). A group of 4 and of 3 (direct and buffered kernels), every storage type.
  std::mt19937_64 rng(kvattn::testing::test_seed(43));
  for (kv_dtype dtype : {kv_dtype::f16, kv_dtype::bf16, kv_dtype::f32})
    for (int group : {4, 3}) {
      const int hkv = 2, d = 64, hq = hkv * group;
      const ModelConfig cfg(HeadShape(hq, hkv, d), LayerSharingMap::none(1), dtype);
      KvCache<PagedLayout> cache(cfg, PagedLayout{64});
      std::vector<seq_id> all;
      for (seq_id id = 0; id < 42; ++id) {
        cache.add_sequence(id);
        append_random(cache, id, id == 0 ? 4096 : id == 1 ? 60000 : 200, rng);
        all.push_back(id);
      }
      const auto q = random_floats(rng, all.size() * static_cast<std::size_t>(hq * d));
      const auto first_row = [&](std::span<const seq_id> ids) {  // sequence 0's output, first in ids
        std::vector<float> out(ids.size() * static_cast<std::size_t>(hq * d));
        decode(cache, 0, ids, q.data(), out.data());
        out.resize(static_cast<std::size_t>(hq * d));
        return out;
      };
      const std::vector<float> alone = first_row(std::span(all).first(1));
      const std::vector<seq_id> with_long{0, 1}, with_short{all.begin() + 2, all.end()};
      std::vector<seq_id> short_batch{0};
      short_batch.insert(short_batch.end(), with_short.begin(), with_short.end());
      const std::string what = std::string(dtype_name(dtype)) + " group " + std::to_string(group);
      EXPECT_EQ(0, std::memcmp(alone.data(), first_row(with_long).data(), alone.size() * sizeof(float))) << what << ", beside a long sequence";
      EXPECT_EQ(0, std::memcmp(alone.data(), first_row(short_batch).data(), alone.size() * sizeof(float))) << what << ", among short ones";
    }
}

TEST_P(PerIsa, Bf16ProductsWhereAllowedAndAvailable) {
  // fpmath_mode::bf16 with bf16 storage. Where the pair-product kernel runs (one query token per
  // sequence, AVX-512 with AVX512_BF16, groups 2, 4, 8, head dims a multiple of 32) the kernel
  // rounds q * scale * log2(e) to bf16; the reference gets that rounded q back, so what remains is
  // the rounding of each softmax weight w_k to bf16 (relative error e_k, |e_k| <= u = 2^-8) with the
  // sum taken over the rounded weights: the output moves by sum_k (w'_k - w_k)(v_k - c) for any c,
  // and sum_k |w'_k - w_k| <= u / (1 - u), so |error| <= u / (1 - u) for V in [-1, 1] (c = 0), on
  // top of the error of f32 arithmetic (Reference's tolerance), at any logit size. Everywhere else,
  // including calls with more than one token per sequence, the call must give strict's bits. Pair products must also
  // differ from strict in most cases (they did run), not depend on the thread count, and give
  // one-token cross-attention the same bits as decode.
  std::mt19937_64 rng(61);
  int dot_cases = 0, dot_differs = 0;
  for (int i = 0; i < kvattn::testing::scaled_cases(160); ++i) {
    Case c = random_case(rng, mode::decode);
    c.dtype = kv_dtype::bf16;
    c.layers = 1, c.factor = 1, c.layer = 0;
    if (i % 3 == 0) c.d = 32 * (2 + static_cast<int>(rng() % 5));  // also dynamic dims 96 and 160
    if (i % 5 == 0) c.q_scale = 40.f;  // logits in the hundreds
    const int group = c.hq / c.hkv;
    const bool dot = GetParam() == isa::avx512 && cpu_supports_bf16_dot() && (group == 2 || group == 4 || group == 8) && c.d % 32 == 0;
    dot_cases += dot;
    const ModelConfig cfg(HeadShape(c.hq, c.hkv, c.d), LayerSharingMap::none(1), c.dtype);
    KvCache<PagedLayout> cache(cfg, PagedLayout{c.block});
    std::vector<seq_id> ids;
    for (std::size_t b = 0; b < c.prefix.size(); ++b) {
      ids.push_back(static_cast<seq_id>(b));
      cache.add_sequence(ids.back());
      append_random(cache, ids.back(), c.prefix[b] + 1, rng);
    }
    const std::int64_t row = std::int64_t{c.hq} * c.d;
    const auto q = random_floats(rng, ids.size() * static_cast<std::size_t>(row), -c.q_scale, c.q_scale);
    const auto run = [&](fpmath_mode fpmath, int threads) {
      std::vector<float> out(q.size());
      AttentionOptions opt;
      opt.threads = threads;
      opt.min_pairs_per_thread = 0;
      opt.fpmath = fpmath;
      decode(cache, 0, ids, q.data(), out.data(), opt);
      return out;
    };
    const std::vector<float> out = run(fpmath_mode::bf16, 1), strict = run(fpmath_mode::strict, 1);
    const bool same_as_strict = std::memcmp(out.data(), strict.data(), out.size() * sizeof(float)) == 0;
    {  // Two query tokens where a sequence has them: strict's bits whatever the group.
      std::vector<std::int64_t> counts;
      std::int64_t tokens = 0;
      for (std::size_t b = 0; b < ids.size(); ++b) tokens += counts.emplace_back(std::min<std::int64_t>(2, c.prefix[b] + 1));
      if (tokens > static_cast<std::int64_t>(ids.size())) {
        const auto q2 = random_floats(rng, static_cast<std::size_t>(tokens * row));
        std::vector<float> out2(q2.size()), strict2(q2.size());
        AttentionOptions opt;
        prefill(cache, 0, ids, counts, q2.data(), strict2.data(), opt);
        opt.fpmath = fpmath_mode::bf16;
        prefill(cache, 0, ids, counts, q2.data(), out2.data(), opt);
        ASSERT_EQ(0, std::memcmp(out2.data(), strict2.data(), out2.size() * sizeof(float))) << "prefill " << c.describe();
      }
    }
    if (!dot) {
      ASSERT_TRUE(same_as_strict) << c.describe();
      continue;
    }
    dot_differs += !same_as_strict;  // (one key, or one-hot weights, give v exactly either way)
    const std::vector<float> two_threads = run(fpmath_mode::bf16, 2);
    ASSERT_EQ(0, std::memcmp(out.data(), two_threads.data(), out.size() * sizeof(float))) << c.describe();
    std::vector<float> cross(q.size());
    AttentionOptions opt;
    opt.fpmath = fpmath_mode::bf16;
    cross_attention(cache, 0, ids, std::vector<std::int64_t>(ids.size(), 1), q.data(), cross.data(), opt);
    ASSERT_EQ(0, std::memcmp(out.data(), cross.data(), out.size() * sizeof(float))) << "cross " << c.describe();
    // The kernel's q: bf16(q x s) with s = scale x log2(e) in float, as the kernel computes it.
    const float s = 1.f / std::sqrt(static_cast<float>(c.d)) * 1.44269504088896340736f;
    std::vector<float> q_rounded(q.size());
    for (std::size_t j = 0; j < q.size(); ++j) q_rounded[j] = static_cast<float>(double(Eigen::bfloat16(q[j] * s)) / s);
    for (std::size_t b = 0; b < ids.size(); ++b) {
      const auto ref = reference_attention(cache, 0, ids[b], q_rounded.data() + b * row, 1, true);
      constexpr double u = 1.0 / 256;
      for (int head = 0; head < c.hq; ++head) {
        const std::size_t at = static_cast<std::size_t>(head) * static_cast<std::size_t>(c.d);
        const double err = max_abs_diff(out.data() + b * row + at, ref.out.data() + at, static_cast<std::size_t>(c.d));
        ASSERT_LE(err, u / (1 - u) + ref.tolerance[static_cast<std::size_t>(head)]) << c.describe();
      }
    }
  }
  if (GetParam() == isa::avx512 && cpu_supports_bf16_dot()) {
    EXPECT_GT(dot_cases, 20);
    EXPECT_GE(dot_differs, dot_cases * 3 / 4);
  }
}

TEST_P(PerIsa, VectorizedExpError) {
  // exp2 over the whole range the softmax feeds it ([-126, 0] and a little above): max relative
  // error <= 4e-7 (a few ulp) against the double result, exactly 0 below -126 and for -inf.
  std::vector<float> x, y;
  for (float v = -130.f; v <= 4.f; v += 1.f / 1024) x.push_back(v);
  x.push_back(-std::numeric_limits<float>::infinity());
  y.resize(x.size());
  kernels::exp2_array(x.data(), y.data(), static_cast<std::int64_t>(x.size()), GetParam());
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (x[i] < -126.f) {
      if (GetParam() != isa::scalar) {
        EXPECT_EQ(y[i], 0.f) << x[i];
      }
      continue;
    }
    const double want = std::exp2(double(x[i]));
    const double err = std::fabs(y[i] - want) / want;
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  EXPECT_LE(worst, 4e-7);
}

TEST_P(PerIsa, BenchmarkProbesReadEveryByte) {
  // The floor's streaming read and the overlap probe (bench_decode) on a length with a tail: the
  // sum, and fmas * 0.999999 * the sum; out-of-range FMA counts are refused.
  std::vector<float> x(4099);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  double sum = 0, magnitude = 0;
  for (float& v : x) v = u(rng), sum += v, magnitude += std::fabs(v);
  const auto n = static_cast<std::int64_t>(x.size());
  for (kernels::read_prefetch prefetch :
       {kernels::read_prefetch::none, kernels::read_prefetch::l1, kernels::read_prefetch::l2, kernels::read_prefetch::l2_far})
    EXPECT_NEAR(kernels::stream_sum(x.data(), n, GetParam(), prefetch), sum, 1e-5 * magnitude) << static_cast<int>(prefetch);
  for (int fmas : {1, 7, 16})
    EXPECT_NEAR(kernels::stream_fma(x.data(), n, fmas, GetParam()), fmas * 0.999999 * sum, 1e-5 * fmas * magnitude) << fmas;
  EXPECT_THROW(kernels::stream_fma(x.data(), n, 0, GetParam()), config_error);
  EXPECT_THROW(kernels::stream_fma(x.data(), n, 17, GetParam()), config_error);
  // The probe over 16-bit storage converts every element (bf16 as even and odd halves on x86).
  const auto check_stored = [&](auto tag) {
    using S = storage<decltype(tag)::value>;
    std::vector<typename S::type> stored(x.size());
    double stored_sum = 0;
    for (std::size_t i = 0; i < x.size(); ++i) stored[i] = S::store(x[i]), stored_sum += S::load(stored[i]);
    for (int fmas : {1, 4, 16})
      EXPECT_NEAR(kernels::stream_fma(stored.data(), n, fmas, GetParam()), fmas * 0.999999 * stored_sum, 1e-5 * fmas * magnitude)
          << dtype_name(decltype(tag)::value) << " " << fmas;
  };
  check_stored(std::integral_constant<kv_dtype, kv_dtype::f16>{});
  check_stored(std::integral_constant<kv_dtype, kv_dtype::bf16>{});
}

TEST(Isa, ForcingAPathTheCpuLacksIsRefused) {
  for (isa i : {isa::scalar, isa::avx2, isa::avx512, isa::neon}) {
    if (cpu_supports(i)) continue;
    EXPECT_THROW(set_isa(i), config_error);
    // Nor do the kernels' own entry points hand out its code (which would fault when run).
    std::vector<float> x(64, 1.f), y(x.size());
    const auto n = static_cast<std::int64_t>(x.size());
    float sink = 0.f;
    EXPECT_THROW(kernels::select_tile_kernel(kv_dtype::f16, 4, 128, i), config_error) << isa_name(i);
    EXPECT_THROW(kernels::stream_sum(x.data(), n, i), config_error) << isa_name(i);
    EXPECT_THROW(kernels::stream_fma(x.data(), n, 2, i), config_error) << isa_name(i);
    EXPECT_THROW(kernels::exp2_array(x.data(), y.data(), n, i), config_error) << isa_name(i);
    EXPECT_THROW(kernels::fma_peak_flops(1, sink, i), config_error) << isa_name(i);
  }
  EXPECT_THROW(parse_isa("sse9"), config_error);
  EXPECT_EQ(parse_isa("avx512"), isa::avx512);
  EXPECT_EQ(parse_isa("AVX2"), isa::avx2);  // as people write it
  EXPECT_EQ(parse_isa("Scalar"), isa::scalar);
  try {
    set_isa(static_cast<isa>(7));
    ADD_FAILURE() << "an invalid path value was accepted";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("set_isa: invalid ISA path value 7"), std::string::npos) << e.what();
  }
}

TEST(Isa, EachPathRunsItsOwnKernels) {
  // A forced path must select its own code: any two supported paths pick different tile kernels
  // (and loaders, where they have one), for table shapes and generic ones, in every storage type.
  const std::vector<isa> paths = supported_isas();
  for (kv_dtype dt : {kv_dtype::f32, kv_dtype::f16, kv_dtype::bf16})
    for (const auto& [group, d] : {std::pair{4, 128}, std::pair{1, 64}, std::pair{3, 46}, std::pair{8, 96}})
      for (std::size_t a = 0; a < paths.size(); ++a)
        for (std::size_t b = a + 1; b < paths.size(); ++b) {
          const kernels::TileKernel ka = kernels::select_tile_kernel(dt, group, d, paths[a]);
          const kernels::TileKernel kb = kernels::select_tile_kernel(dt, group, d, paths[b]);
          EXPECT_NE(ka.run, kb.run) << isa_name(paths[a]) << " and " << isa_name(paths[b]) << ", group " << group << " d " << d;
          if (ka.load != nullptr || kb.load != nullptr) {
            EXPECT_NE(ka.load, kb.load) << isa_name(paths[a]) << " and " << isa_name(paths[b]);
          }
        }
}

TEST(Isa, ResetIsaGoesBackToTheDefaultPath) {
  const char* env = std::getenv("KVATTN_ISA");
  if (env != nullptr && *env != '\0') GTEST_SKIP() << "the default path is KVATTN_ISA's";
  const isa fastest = supported_isas().back();
  EXPECT_EQ(active_isa(), fastest);
  set_isa(isa::scalar);
  EXPECT_EQ(active_isa(), isa::scalar);
  reset_isa();
  EXPECT_EQ(active_isa(), fastest);
}

// Run by ctest as test_attention_bad_isa_environment, with KVATTN_ISA=SSE4 (an ISA kvattn has no path
// for): every call names the variable and its value, and set_isa still forces a path over it.
TEST(IsaEnvironment, AnUnusableValueIsNamedAndSetIsaOverridesIt) {
  const char* env = std::getenv("KVATTN_ISA");
  if (env == nullptr || std::string_view(env) != "SSE4") GTEST_SKIP() << "runs with KVATTN_ISA=SSE4 (ctest)";
  for (int call = 0; call < 2; ++call) {
    try {
      (void)active_isa();
      ADD_FAILURE() << "KVATTN_ISA=SSE4 was accepted";
    } catch (const config_error& e) {
      EXPECT_NE(std::string(e.what()).find("KVATTN_ISA: unknown ISA path 'SSE4'"), std::string::npos) << e.what();
    }
  }
  set_isa(isa::scalar);
  EXPECT_EQ(active_isa(), isa::scalar);
  reset_isa();  // the environment's path again: still unusable
  EXPECT_THROW((void)active_isa(), config_error);
}

TEST(Attention, StaticHeadLayoutMatchesDynamic) {
  std::mt19937_64 rng(51);
  const ModelConfig cfg(HeadShape(32, 8, 128), LayerSharingMap::none(1), kv_dtype::f16);
  KvCache<PagedLayout> cache(cfg);
  const std::vector<seq_id> ids{1, 2};
  for (seq_id id : ids) {
    cache.add_sequence(id);
    append_random(cache, id, 300 * id, rng);
  }
  const auto q = random_floats(rng, 2 * 32 * 128);
  std::vector<float> a(q.size()), b(q.size());
  decode(cache, 0, ids, q.data(), a.data());
  decode<HeadLayout<32, 8, 128>>(cache, 0, ids, q.data(), b.data());
  // Each against the reference: linked with kvattn::kernels both take the same table kernel, so
  // comparing them with each other alone could not fail there.
  for (std::size_t s = 0; s < ids.size(); ++s) {
    const auto ref = reference_attention(cache, 0, ids[s], q.data() + s * 32 * 128, 1, true);
    EXPECT_LE(max_error_ratio(a.data() + s * 32 * 128, ref), 1.0);
    EXPECT_LE(max_error_ratio(b.data() + s * 32 * 128, ref), 1.0);
  }
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-6);
  EXPECT_THROW((decode<HeadLayout<32, 4, 128>>(cache, 0, ids, q.data(), b.data())), config_error);
}

TEST(Attention, StridedQueriesAndOutputs) {
  std::mt19937_64 rng(61);
  const ModelConfig cfg(HeadShape(4, 2, 16), LayerSharingMap::none(1), kv_dtype::f32);
  KvCache<PagedLayout> cache(cfg);
  const std::vector<seq_id> ids{3, 4};
  for (seq_id id : ids) {
    cache.add_sequence(id);
    append_random(cache, id, 20 + id, rng);
  }
  const std::int64_t row = 4 * 16, stride = row + 10;
  const auto dense_q = random_floats(rng, 2 * row);
  std::vector<float> strided_q(2 * stride, 99.f), dense_out(2 * row), strided_out(2 * stride, -7.f);
  for (int b = 0; b < 2; ++b) std::copy_n(dense_q.data() + b * row, row, strided_q.data() + b * stride);
  decode(cache, 0, ids, dense_q.data(), dense_out.data());
  AttentionOptions opt;
  opt.q_stride = stride;
  opt.out_stride = stride;
  decode(cache, 0, ids, strided_q.data(), strided_out.data(), opt);
  for (int b = 0; b < 2; ++b) {
    for (int i = 0; i < row; ++i) EXPECT_EQ(dense_out[b * row + i], strided_out[b * stride + i]);
    for (int i = row; i < stride; ++i) EXPECT_EQ(strided_out[b * stride + i], -7.f);  // padding untouched
  }
}

TEST(Attention, EmptySequenceCrossAttentionGivesZeros) {
  const ModelConfig cfg(HeadShape(2, 1, 16), LayerSharingMap::none(1), kv_dtype::f32);
  KvCache<PagedLayout> cache(cfg);
  cache.add_sequence(1);
  const std::vector<seq_id> ids{1};
  const std::vector<std::int64_t> counts{2};
  std::vector<float> q(2 * 32, 1.f), out(2 * 32, 5.f);
  cross_attention(cache, 0, ids, counts, q.data(), out.data());
  for (float o : out) EXPECT_EQ(o, 0.f);
}

TEST(AttentionErrors, BadInputsAreRejected) {
  std::mt19937_64 rng(71);
  const ModelConfig cfg(HeadShape(4, 2, 16), LayerSharingMap::cla(2, 2), kv_dtype::f32);
  KvCache<PagedLayout> cache(cfg);
  cache.add_sequence(1);
  append_random(cache, 1, 3, rng);
  std::vector<float> q(8 * 64), out(8 * 64);
  const std::vector<seq_id> ids{1}, unknown{42};
  auto expect_error = [&](auto&& call, const std::string& needle) {
    const auto before = kvattn::testing::snapshot(cache, ids);
    try {
      call();
      ADD_FAILURE() << "no exception, expected one naming " << needle;
    } catch (const kvattn::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_EQ(kvattn::testing::snapshot(cache, ids), before);
  };
  expect_error([&] { decode(cache, 0, unknown, q.data(), out.data()); }, "42");
  expect_error([&] { decode(cache, 2, ids, q.data(), out.data()); }, "layer 2");
  expect_error([&] { prefill(cache, 0, ids, std::vector<std::int64_t>{4}, q.data(), out.data()); }, "4 query tokens");
  expect_error([&] { prefill(cache, 0, ids, std::vector<std::int64_t>{1, 1}, q.data(), out.data()); }, "2 token counts");
  expect_error([&] { prefill(cache, 0, ids, std::vector<std::int64_t>{-1}, q.data(), out.data()); }, "-1");
  AttentionOptions bad_stride;
  bad_stride.q_stride = 10;
  expect_error([&] { decode(cache, 0, ids, q.data(), out.data(), bad_stride); }, "10");
  AttentionOptions bad_scale;
  bad_scale.scale = -1.f;
  expect_error([&] { decode(cache, 0, ids, q.data(), out.data(), bad_scale); }, "-1");
  expect_error([&] { decode(cache, 0, ids, nullptr, out.data()); }, "null");
  AttentionOptions bad_threads;
  bad_threads.threads = -5;
  expect_error([&] { decode(cache, 0, ids, q.data(), out.data(), bad_threads); }, "-5");
  bad_threads.threads = max_thread_count + 1;  // each thread would take its own scratch
  expect_error([&] { decode(cache, 0, ids, q.data(), out.data(), bad_threads); }, "1025");
  AttentionOptions bad_grain;
  bad_grain.min_pairs_per_thread = -3;
  expect_error([&] { decode(cache, 0, ids, q.data(), out.data(), bad_grain); }, "-3");
  EXPECT_THROW(set_num_threads(max_thread_count + 1), config_error);
  // The last token's row, (tokens - 1) x stride, must not wrap, counted in bytes: 4 query tokens
  // 2^62 floats apart, and 2 (2^62 floats fit in 64 bits, their 2^64 bytes do not).
  for (const std::int64_t tokens : {4, 2}) {
    AttentionOptions huge_stride;
    huge_stride.q_stride = std::int64_t{1} << 62;
    expect_error([&] { cross_attention(cache, 0, ids, std::vector<std::int64_t>{tokens}, q.data(), out.data(), huge_stride); },
                 "q extent");
    huge_stride.q_stride = 0;
    huge_stride.out_stride = std::int64_t{1} << 62;
    expect_error([&] { cross_attention(cache, 0, ids, std::vector<std::int64_t>{tokens}, q.data(), out.data(), huge_stride); },
                 "output extent");
  }
}

namespace {
// The plan of a decode batch: one query token per sequence, of the given lengths.
kernels::AttentionPlan decode_plan(int kv_heads, const std::vector<std::int64_t>& lengths) {
  kernels::AttentionProblem pb;
  pb.slot.kv_heads = kv_heads;
  pb.slot.head_dim = 128;
  pb.q_heads = kv_heads;
  std::vector<KvSequenceView> seqs;
  for (std::int64_t length : lengths) seqs.push_back(KvSequenceView{nullptr, length});
  std::vector<std::int64_t> offsets(lengths.size() + 1);
  for (std::size_t b = 0; b < offsets.size(); ++b) offsets[b] = static_cast<std::int64_t>(b);
  pb.seqs = seqs;
  pb.q_offsets = offsets;
  return kernels::plan_attention(pb);
}
// Every sequence `length` keys long.
kernels::AttentionPlan decode_plan(int kv_heads, std::int64_t batch, std::int64_t length) {
  return decode_plan(kv_heads, std::vector<std::int64_t>(static_cast<std::size_t>(batch), length));
}
}  // namespace

TEST(Plan, SplitKAimsAtTargetItemsWithPowerOfTwoChunks) {
  // 32 heads x 4096 keys: 32 units < 64, chunks of 131072 / 64 = 2048 keys -> 64 items.
  auto plan = decode_plan(32, 1, 4096);
  EXPECT_EQ(plan.items.size(), 64u);
  EXPECT_EQ(plan.merges.size(), 32u);
  for (const auto& w : plan.items) EXPECT_EQ(w.key_end - w.key_begin, 2048);
  // 8 heads x 32768 keys: chunks of 4096.
  plan = decode_plan(8, 1, 32768);
  EXPECT_EQ(plan.items.size(), 64u);
  // 32 heads x 65536 keys: 2M / 64 = 32768 keys is more than one f32 run (run_keys, 8192): chunks
  // of 8192 -> 256 items.
  plan = decode_plan(32, 1, 65536);
  EXPECT_EQ(plan.items.size(), 256u);
  for (const auto& w : plan.items) EXPECT_EQ(w.key_end - w.key_begin, 8192);
  // One head x 4096 keys: 4096 / 64 = 64 keys is below the minimum chunk (1024): 4 items.
  plan = decode_plan(1, 1, 4096);
  EXPECT_EQ(plan.items.size(), 4u);
  // Short contexts of few units go below the minimum chunk to make about 2 items (min_split_items),
  // down to 256 keys: 1024 keys -> 2 chunks of 512, 512 -> 2 of 256, 300 -> 2 (256 and 44); 256
  // keys stay one item; 8 heads x 1024 keys already make 8 units of 1024: no split.
  plan = decode_plan(1, 1, 1024);
  EXPECT_EQ(plan.items.size(), 2u);
  for (const auto& w : plan.items) EXPECT_EQ(w.key_end - w.key_begin, 512);
  plan = decode_plan(1, 1, 512);
  EXPECT_EQ(plan.items.size(), 2u);
  EXPECT_EQ(plan.items[0].key_end - plan.items[0].key_begin, 256);
  EXPECT_EQ(decode_plan(1, 1, 300).items.size(), 2u);
  EXPECT_EQ(decode_plan(1, 1, 256).items.size(), 1u);
  plan = decode_plan(8, 1, 1024);
  EXPECT_EQ(plan.items.size(), 8u);
  EXPECT_TRUE(plan.merges.empty());
  // Ragged tail: 5000 keys in chunks of 1024 -> 5 chunks, the last one 904 keys.
  plan = decode_plan(1, 1, 5000);
  ASSERT_EQ(plan.items.size(), 5u);
  std::int64_t covered = 0, shortest = 5000;
  for (const auto& w : plan.items) covered += w.key_end - w.key_begin, shortest = std::min(shortest, w.key_end - w.key_begin);
  EXPECT_EQ(covered, 5000);
  EXPECT_EQ(shortest, 904);
  // 16 sequences x 8 heads = 128 units: enough items already, no split.
  plan = decode_plan(8, 16, 1024);
  EXPECT_EQ(plan.items.size(), 128u);
  EXPECT_TRUE(plan.merges.empty());
}

TEST(Plan, ASequenceIsSplitByItsOwnLengthWhateverTheBatch) {
  // 2 KV heads x 4096 keys: chunks of 1024 (8192 / 64 keys is below the minimum chunk) alone,
  // beside a 60000-key sequence (its own chunks 2048 keys; a chunk size for the whole batch would
  // be 2048 for both), and among 40 short sequences (82 units: no split needed to fill threads).
  const auto chunks_of_first = [](const kernels::AttentionPlan& plan) {
    std::vector<std::pair<std::int64_t, std::int64_t>> chunks;
    for (const auto& w : plan.items)
      if (w.seq == 0) chunks.emplace_back(w.key_begin, w.key_end);
    std::sort(chunks.begin(), chunks.end());
    return chunks;
  };
  const auto alone = chunks_of_first(decode_plan(2, {4096}));
  ASSERT_EQ(alone.size(), 8u);  // 2 heads x 4 chunks
  for (const auto& [begin, end] : alone) EXPECT_EQ(end - begin, 1024);
  const auto with_long = decode_plan(2, {4096, 60000});
  EXPECT_EQ(chunks_of_first(with_long), alone);
  for (const auto& w : with_long.items)
    if (w.seq == 1) {
      EXPECT_EQ(w.key_end - w.key_begin, w.key_begin < 58 * 1024 ? 2048 : 60000 - 29 * 2048);
    }
  std::vector<std::int64_t> lengths(41, 100);
  lengths[0] = 4096;
  EXPECT_EQ(chunks_of_first(decode_plan(2, lengths)), alone);
}

TEST(Plan, SplitItemsRunChunkByChunkAcrossHeadsAndNameTheirMerge) {
  // 8 heads x 4096 keys: 32 chunks of 1024, first chunks of every head first, then the second ones.
  const auto plan = decode_plan(8, 1, 4096);
  ASSERT_EQ(plan.items.size(), 32u);
  ASSERT_EQ(plan.merges.size(), 8u);
  std::vector<int> chunks_of_merge(plan.merges.size(), 0);
  for (std::size_t i = 0; i < plan.items.size(); ++i) {
    const auto& w = plan.items[i];
    EXPECT_EQ(w.key_begin, static_cast<std::int64_t>(i / 8) * 1024) << "item " << i;
    EXPECT_EQ(w.kv_head, static_cast<int>(i % 8)) << "item " << i;
    ASSERT_GE(w.merge, 0);
    const auto& m = plan.merges[static_cast<std::size_t>(w.merge)];
    EXPECT_EQ(m.kv_head, w.kv_head);
    EXPECT_EQ(w.partial, m.first_partial + w.key_begin / 1024);  // partials in key order
    ++chunks_of_merge[static_cast<std::size_t>(w.merge)];
  }
  for (std::size_t m = 0; m < plan.merges.size(); ++m) EXPECT_EQ(chunks_of_merge[m], plan.merges[m].chunks);
  // Unsplit items name no merge.
  for (const auto& w : decode_plan(8, 16, 1024).items) EXPECT_EQ(w.merge, -1);
}

TEST(Plan, ThreadsClaimWholeSplitUnitsWhenEachIsASmallShare) {
  // Every item once; run r = order[begin[r] .. begin[r + 1]).
  auto items_of = [](const kernels::AttentionPlan& plan, const kernels::ClaimOrder& claims) {
    std::vector<int> seen(plan.items.size(), 0);
    EXPECT_EQ(claims.begin[0], 0);
    EXPECT_EQ(claims.begin[claims.runs], static_cast<std::int64_t>(plan.items.size()));
    for (std::int64_t k = 0; k < claims.begin[claims.runs]; ++k) ++seen[static_cast<std::size_t>(claims.order[k])];
    for (std::size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], 1) << "item " << i;
  };
  // 8 heads x 4096 keys: 8 units of 4 chunks, each unit 1/8 of the work. Up to 2 threads (a unit
  // at most a quarter of a thread's share) claim whole units, each in key order; 3 claim chunks.
  const auto plan = decode_plan(8, 1, 4096);
  for (int threads : {1, 2}) {
    const kernels::ClaimOrder claims = kernels::claim_order(plan, threads);
    items_of(plan, claims);
    ASSERT_EQ(claims.runs, 8);
    for (std::int64_t r = 0; r < claims.runs; ++r) {
      ASSERT_EQ(claims.begin[r + 1] - claims.begin[r], 4);
      const auto& first = plan.items[static_cast<std::size_t>(claims.order[claims.begin[r]])];
      for (std::int64_t c = 0; c < 4; ++c) {
        const auto& w = plan.items[static_cast<std::size_t>(claims.order[claims.begin[r] + c])];
        EXPECT_EQ(w.merge, first.merge);
        EXPECT_EQ(w.key_begin, c * 1024);
      }
    }
  }
  kernels::ClaimOrder claims = kernels::claim_order(plan, 3);
  items_of(plan, claims);
  EXPECT_EQ(claims.runs, 32);
  for (std::int64_t r = 0; r < claims.runs; ++r) EXPECT_EQ(claims.order[r], r);  // the plan's order
  // One split unit (all the work) and unsplit plans: one item per run.
  const auto one_unit = decode_plan(1, 1, 4096);
  claims = kernels::claim_order(one_unit, 1);
  items_of(one_unit, claims);
  EXPECT_EQ(claims.runs, 4);
  const auto unsplit = decode_plan(8, 16, 1024);
  claims = kernels::claim_order(unsplit, 2);
  items_of(unsplit, claims);
  EXPECT_EQ(claims.runs, 128);
}

TEST(Plan, SmallCallsStartFewerThreadsThanAsked) {
  const kernels::ThreadRules rules;  // 2048 pairs per thread, 64 more per item
  // 1 head x 16 keys: 16 + 64 pairs, one thread whatever is asked.
  EXPECT_EQ(rules.threads_for(decode_plan(1, 1, 16), 4), 1);
  // 32 heads x 64 keys (one query row each): 32 x (64 + 64) = 4096 pairs, two threads.
  EXPECT_EQ(rules.threads_for(decode_plan(32, 1, 64), 4), 2);
  EXPECT_EQ(rules.threads_for(decode_plan(32, 1, 64), 1), 1);
  // A large call gets the threads asked for, up to its pairs / 2048: 8 heads x 4096 keys in 32
  // items of 1024 make 32768 + 32 x 64 pairs, so 3 threads of 3 asked, 17 of 64. 0 means one.
  EXPECT_EQ(rules.threads_for(decode_plan(8, 1, 4096), 3), 3);
  EXPECT_EQ(rules.threads_for(decode_plan(8, 1, 4096), 64), 17);
  EXPECT_EQ(rules.threads_for(decode_plan(8, 1, 4096), 0), 1);
  // min_pairs 0: every thread asked for, up to one per item.
  const kernels::ThreadRules all{.min_pairs = 0};
  EXPECT_EQ(all.threads_for(decode_plan(1, 1, 16), 4), 1);
  EXPECT_EQ(all.threads_for(decode_plan(4, 1, 16), 4), 4);
}

TEST(Parallel, LookaheadRunsEveryItemOnceAndNamesEachThreadsNextItem) {
  for (int threads : {1, 2, 3, 4})
    for (std::int64_t n : {0, 1, 2, 3, 7, 64, 1000}) {
      std::vector<int> runs(static_cast<std::size_t>(n), 0);
      std::vector<std::vector<std::pair<std::int64_t, std::int64_t>>> per_thread(static_cast<std::size_t>(threads));
      kernels::parallel_for_lookahead(n, threads, [&](std::int64_t item, std::int64_t next, int thread) {
        ++runs[static_cast<std::size_t>(item)];
        per_thread[static_cast<std::size_t>(thread)].emplace_back(item, next);
      });
      for (std::int64_t i = 0; i < n; ++i) EXPECT_EQ(runs[static_cast<std::size_t>(i)], 1) << "item " << i << " n " << n;
      // A named next item is the one the same thread runs right after.
      for (const auto& seq : per_thread)
        for (std::size_t k = 0; k < seq.size(); ++k)
          if (seq[k].second >= 0) {
            ASSERT_LT(k + 1, seq.size());
            EXPECT_EQ(seq[k + 1].first, seq[k].second);
          }
    }
}

TEST(Parallel, LookaheadRunsEveryItemWhenTheTeamIsSmallerThanAsked) {
  // Inside a parallel region (nesting off) OpenMP gives a team of one whatever is asked.
  std::vector<int> runs(100, 0);
#if defined(_OPENMP)
#pragma omp parallel num_threads(2)
  {
    if (omp_get_thread_num() == 0)
#endif
      kernels::parallel_for_lookahead(100, 4, [&](std::int64_t item, std::int64_t, int) { ++runs[static_cast<std::size_t>(item)]; });
#if defined(_OPENMP)
  }
#endif
  for (std::size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i], 1) << "item " << i;
}
