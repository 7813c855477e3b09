// Plain double-precision reference attention and test helpers. It reads the same stored (rounded)
// K/V the kernels read, through KvCache::read, so the comparison isolates kernel arithmetic.
#pragma once

#include <gtest/gtest.h>
#include <kvattn/kvattn.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string_view>
#include <vector>

namespace kvattn::testing {

/// The double-precision result of attention and, per output row, the error f32 arithmetic may put
/// into it. A logit's f32 dot product and scaling carry up to ~B x 2^-24 x (2 + sqrt(d)/2), B the
/// row's largest scale x sum_c |q_c k_c| over its visible keys (2: the scaling and the transposed
/// sums; sqrt(d)/2: the sum's growing rounding, on average for random signs), and an output row moves
/// by at most twice its logits' error times vmax, its visible V rows' largest |element|; vmax x 1e-5
/// covers the softmax's sums and the vectorized exp. Up to 4x that model: tolerance(row) = vmax x
/// (1e-5 + 4 B 2^-24 (2 + sqrt(d)/2)). For unit-scale data ~1.5e-5, so it still sees a dropped key
/// or a 1% wrong scale over 40k keys (~3e-5); a fixed 1e-4 did not.
struct Reference {
  std::vector<double> out;        ///< [n][Hq][d]
  std::vector<double> tolerance;  ///< [n][Hq]
  int head_dim = 0;
};

/// Attention in double (Reference) of the n query tokens q[i][hq][d] over len K and V rows
/// k[t][hkv][d], v[t][hkv][d] (the values the cache stores); causal: token i sees the first
/// len - n + i + 1 rows. scale 0: 1 / sqrt(d).
inline Reference reference_attention(const HeadShape& h, const float* q, std::int64_t n, const float* k, const float* v, std::int64_t len,
                                     bool causal, double scale = 0.0) {
  const int hq = h.q_heads(), hkv = h.kv_heads(), d = h.head_dim();
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(d));
  Reference ref;
  ref.head_dim = d;
  ref.out.assign(static_cast<std::size_t>(n) * hq * d, 0.0);
  ref.tolerance.assign(static_cast<std::size_t>(n) * hq, 0.0);
  std::vector<double> logits(static_cast<std::size_t>(len));
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t visible = causal ? len - n + i + 1 : len;
    for (int head = 0; head < hq; ++head) {
      const int kvh = head / (hq / hkv);  // contiguous groups
      const float* qr = q + (i * hq + head) * d;
      double mx = -INFINITY, bound = 0, vmax = 0;
      for (std::int64_t t = 0; t < visible; ++t) {
        double s = 0, magnitude = 0;
        for (int c = 0; c < d; ++c) {
          const double product = double(qr[c]) * double(k[(t * hkv + kvh) * d + c]);
          s += product, magnitude += std::fabs(product);
          vmax = std::max(vmax, std::fabs(double(v[(t * hkv + kvh) * d + c])));
        }
        logits[static_cast<std::size_t>(t)] = s * scale;
        bound = std::max(bound, magnitude * std::fabs(scale));
        mx = std::max(mx, logits[static_cast<std::size_t>(t)]);
      }
      ref.tolerance[static_cast<std::size_t>(i * hq + head)] =
          vmax * (1e-5 + 4 * bound * std::ldexp(1.0, -24) * (2 + std::sqrt(static_cast<double>(d)) / 2));
      double sum = 0;
      for (std::int64_t t = 0; t < visible; ++t) sum += std::exp(logits[static_cast<std::size_t>(t)] - mx);
      double* o = &ref.out[static_cast<std::size_t>((i * hq + head) * d)];
      for (std::int64_t t = 0; t < visible; ++t) {
        const double p = std::exp(logits[static_cast<std::size_t>(t)] - mx) / sum;
        for (int c = 0; c < d; ++c) o[c] += p * double(v[(t * hkv + kvh) * d + c]);
      }
    }
  }
  return ref;
}

/// Attention of the n query tokens q[i][hq][d] of sequence id over its cached K/V (read back through
/// KvCache::read), in double (Reference).
template <KvLayoutPolicy L>
Reference reference_attention(const KvCache<L>& cache, int layer, seq_id id, const float* q, std::int64_t n, bool causal,
                              double scale = 0.0) {
  const HeadShape& h = cache.config().heads();
  const int hkv = h.kv_heads(), d = h.head_dim();
  const std::int64_t len = cache.length(id);
  std::vector<float> k(static_cast<std::size_t>(len) * hkv * d), v(k.size());
  for (std::int64_t t = 0; t < len; ++t) cache.read(id, layer, t, &k[t * hkv * d], &v[t * hkv * d]);
  return reference_attention(h, q, n, k.data(), v.data(), len, causal, scale);
}

/// Max |a - b| over a float result and a double reference; infinite if any difference is not a
/// number (a NaN in `a`: an output the kernel never wrote, when the test filled it with NaN).
inline double max_abs_diff(const float* a, const double* b, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double e = std::fabs(double(a[i]) - b[i]);
    if (std::isnan(e)) return INFINITY;
    m = std::max(m, e);
  }
  return m;
}

/// The largest ratio of a row's error to its tolerance (Reference): <= 1 passes; infinite for a NaN.
inline double max_error_ratio(const float* a, const Reference& ref) {
  const auto d = static_cast<std::size_t>(ref.head_dim);
  double m = 0;
  for (std::size_t row = 0; row < ref.tolerance.size(); ++row)
    m = std::max(m, max_abs_diff(a + row * d, ref.out.data() + row * d, d) / ref.tolerance[row]);
  return m;
}

/// Expects call() to throw Error with a message naming the bad value (containing needle).
template <class Error, class Call>
void expect_error(Call&& call, std::string_view needle) {
  try {
    call();
    ADD_FAILURE() << "expected an exception mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string_view(e.what()).find(needle), std::string_view::npos) << e.what();
  }
}

/// The seed of a randomized test: `fixed` in a plain run, so that CI and every re-run see the same
/// cases; mixed with GoogleTest's random seed when tests are shuffled, so that a soak run draws new
/// cases on every repetition (`--gtest_shuffle --gtest_repeat=100`; GoogleTest prints each
/// repetition's seed, and `--gtest_shuffle --gtest_random_seed=<seed>` runs that one again).
inline std::uint64_t test_seed(std::uint64_t fixed) {
  if (!GTEST_FLAG_GET(shuffle)) return fixed;
  const auto repetition_seed = static_cast<std::uint64_t>(::testing::UnitTest::GetInstance()->random_seed());
  return fixed ^ (repetition_seed * 0x9E3779B97F4A7C15ull);  // (a golden-ratio multiply spreads small seeds)
}

/// n scaled by KVATTN_TEST_CASE_SCALE (default 1; emulated runs use less), at least 1.
inline int scaled_cases(int n) {
  const char* env = std::getenv("KVATTN_TEST_CASE_SCALE");
  const double scale = env != nullptr ? std::atof(env) : 1.0;
  return std::max(1, static_cast<int>(n * scale));
}

inline std::vector<float> random_floats(std::mt19937_64& rng, std::size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> x(n);
  for (float& e : x) e = u(rng);
  return x;
}

/// Appends `n` random tokens (K/V for every producer slot) to a sequence.
template <KvLayoutPolicy L>
void append_random(KvCache<L>& cache, seq_id id, std::int64_t n, std::mt19937_64& rng) {
  const ModelConfig& c = cache.config();
  const std::size_t count = static_cast<std::size_t>(n) * c.n_kv_layers() * c.heads().kv_heads() * c.heads().head_dim();
  const std::vector<float> k = random_floats(rng, count), v = random_floats(rng, count);
  cache.append(id, n, k.data(), v.data());
}

/// Everything observable about a cache, to show that a failed call changed nothing. Contents are
/// the bits of every element read back: a row extended but never written holds whatever the memory
/// held, possibly a NaN, which as a float would not equal itself.
struct CacheSnapshot {
  std::vector<std::pair<seq_id, std::int64_t>> lengths;
  std::vector<std::uint32_t> contents;
  std::int64_t reserved = 0, live = 0, in_use = 0, free = 0;
  bool operator==(const CacheSnapshot&) const = default;
};

template <KvLayoutPolicy L>
CacheSnapshot snapshot(const KvCache<L>& cache, std::span<const seq_id> ids) {
  CacheSnapshot s;
  s.reserved = cache.reserved_bytes();
  s.live = cache.live_bytes();
  s.in_use = cache.blocks_in_use();
  s.free = cache.free_blocks();
  const HeadShape& h = cache.config().heads();
  std::vector<float> k(static_cast<std::size_t>(h.kv_heads()) * h.head_dim()), v(k.size());
  for (seq_id id : ids) {
    if (!cache.contains(id)) continue;
    s.lengths.emplace_back(id, cache.length(id));
    for (int layer = 0; layer < cache.config().n_layers(); ++layer)
      for (std::int64_t t = 0; t < cache.length(id); ++t) {
        cache.read(id, layer, t, k.data(), v.data());
        for (const std::vector<float>* row : {&k, &v})
          for (float x : *row) s.contents.push_back(std::bit_cast<std::uint32_t>(x));
      }
  }
  return s;
}

}  // namespace kvattn::testing
