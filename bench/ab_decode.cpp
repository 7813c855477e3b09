// A/B timing of two versions of kvattn's decode in one process (driven by scripts/ab-decode).
//
// On a shared machine the memory bandwidth and the core speed drift by tens of percent within
// minutes, so two binaries timed one after the other compare hours, not code. Here both versions
// live in one program and run alternate steps on the same shape: drift hits both alike. Each version
// is its own copy of the library (this file compiled with KVATTN_AB_SIDE=a or b, the top namespace
// renamed), so both are compiled exactly as users get them; a run-time switch inside one copy would
// not be (a prefetch hint chosen at run time cost one of its settings 10% in L2 that two builds did
// not show). Which version runs first alternates every step, since the second of a pair ran 0-4%
// slower or faster depending on the shape. Each version decodes its own copy of the cache.
//
// Built three times: -DKVATTN_AB_SIDE=a and =b (each with its version's include path) and
// -DKVATTN_AB_MAIN (the driver).
#include <cstdint>

struct AbShape {
  int q_heads, kv_heads, head_dim, dtype;  // dtype: 0 f16, 1 bf16, 2 f32
  std::int64_t tokens;
  int batch, threads;
};

#if defined(KVATTN_AB_SIDE)
#define KVATTN_AB_CAT2(x, y) x##y
#define KVATTN_AB_CAT(x, y) KVATTN_AB_CAT2(x, y)
#define KVATTN_AB_FN(name) KVATTN_AB_CAT(name, KVATTN_AB_CAT(_, KVATTN_AB_SIDE))
#define kvattn KVATTN_AB_CAT(kvattn_, KVATTN_AB_SIDE)  // this side's copy of the library
#include <kvattn/kvattn.hpp>

#include <memory>
#include <vector>

#include "common.hpp"  // random_floats

namespace {
struct Side {
  std::unique_ptr<kvattn::KvCache<kvattn::ContiguousLayout>> cache;
  std::vector<kvattn::seq_id> ids;
  std::vector<float> q, out;
  AbShape shape{};
};
Side side;

template <class Heads>
void decode_as() {
  kvattn::AttentionOptions opt;
  opt.threads = side.shape.threads;
  kvattn::decode<Heads>(*side.cache, 0, side.ids, side.q.data(), side.out.data(), opt);
}
}  // namespace

/// Fills a cache with the shape's K/V (the same values on both sides: one seed) and a query batch.
void KVATTN_AB_FN(ab_setup)(const AbShape& s) {
  using namespace kvattn;
  const kv_dtype dtypes[3] = {kv_dtype::f16, kv_dtype::bf16, kv_dtype::f32};
  side.shape = s;
  const ModelConfig cfg(HeadShape(s.q_heads, s.kv_heads, s.head_dim), LayerSharingMap::none(1), dtypes[s.dtype]);
  side.cache = std::make_unique<KvCache<ContiguousLayout>>(cfg, ContiguousLayout{.max_tokens = s.tokens, .max_sequences = s.batch});
  const std::size_t kv_floats = static_cast<std::size_t>(s.tokens) * s.kv_heads * s.head_dim;
  const std::vector<float> k = kvattn_bench::random_floats(kv_floats, 1), v = kvattn_bench::random_floats(kv_floats, 2);
  for (int b = 0; b < s.batch; ++b) {
    side.cache->add_sequence(b);
    side.cache->append(b, s.tokens, k.data(), v.data());
    side.ids.push_back(b);
  }
  side.q = kvattn_bench::random_floats(static_cast<std::size_t>(s.batch) * s.q_heads * s.head_dim, 3);
  side.out.resize(side.q.size());
}

/// One decode step; the D1-D5 head layouts take the static specializations, as engines would.
void KVATTN_AB_FN(ab_step)() {
  using kvattn::HeadLayout;
  const AbShape& s = side.shape;
  if (s.head_dim == 128 && s.q_heads == 32 && s.kv_heads == 32) return decode_as<HeadLayout<32, 32, 128>>();
  if (s.head_dim == 128 && s.q_heads == 32 && s.kv_heads == 8) return decode_as<HeadLayout<32, 8, 128>>();
  if (s.head_dim == 128 && s.q_heads == 32 && s.kv_heads == 1) return decode_as<HeadLayout<32, 1, 128>>();
  decode_as<kvattn::HeadShape>();
}

const float* KVATTN_AB_FN(ab_output)() { return side.out.data(); }

#elif defined(KVATTN_AB_MAIN)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

void ab_setup_a(const AbShape&);
void ab_setup_b(const AbShape&);
void ab_step_a();
void ab_step_b();
const float* ab_output_a();
const float* ab_output_b();

namespace {
double seconds(void (*step)()) {
  const auto t0 = std::chrono::steady_clock::now();
  step();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s Hq Hkv d f16|bf16|f32 T B threads steps warmup\n", argv[0]);
    return 2;
  }
  const std::string dtype = argv[4];
  AbShape s{std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), dtype == "f16" ? 0 : dtype == "bf16" ? 1 : dtype == "f32" ? 2 : -1,
            std::atoll(argv[5]), std::atoi(argv[6]), std::atoi(argv[7])};
  const int steps = std::atoi(argv[8]), warmup = std::atoi(argv[9]);
  if (s.dtype < 0 || steps < 1 || warmup < 0) {
    std::fprintf(stderr, "bad dtype '%s' or step counts\n", argv[4]);
    return 2;
  }
  try {
    ab_setup_a(s);
    ab_setup_b(s);
  } catch (const std::exception& e) {  // an invalid shape, named by the library
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  std::vector<double> ta, tb;
  for (int i = 0; i < warmup + steps; ++i) {
    double a, b;
    if (i % 2 == 0) {
      a = seconds(ab_step_a), b = seconds(ab_step_b);
    } else {
      b = seconds(ab_step_b), a = seconds(ab_step_a);
    }
    if (i >= warmup) ta.push_back(a), tb.push_back(b);
  }
  // Both sides decoded the same inputs: say whether their outputs agree to the bit.
  const std::size_t n = static_cast<std::size_t>(s.batch) * s.q_heads * s.head_dim;
  const float *oa = ab_output_a(), *ob = ab_output_b();
  double max_diff = 0;
  for (std::size_t i = 0; i < n; ++i) max_diff = std::max(max_diff, std::fabs(static_cast<double>(oa[i]) - ob[i]));
  const bool bitwise = std::memcmp(oa, ob, n * sizeof(float)) == 0;
  const double ma = median(ta) * 1e6, mb = median(tb) * 1e6;
  std::printf("a %.2f us  b %.2f us  b/a %.3f  outputs %s", ma, mb, mb / ma, bitwise ? "bitwise equal" : "differ");
  if (!bitwise) std::printf(" (max |a - b| %.3g)", max_diff);
  std::printf("\n");
  return 0;
}
#endif
