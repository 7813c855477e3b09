// Decode latency: one new query token per sequence against T cached tokens, for MHA, GQA and MQA
// with 32 query heads of dim 128, next to a roofline floor and a naive Eigen baseline.
//
//   Decode/<design>/T<tokens>/B<batch>/threads:<n>            kvattn::decode with the static head layout
//   DecodeEigenNaive/<design>/T<tokens>/B<batch>/threads:<n>  per (sequence, query head): f32 K·q,
//                                                             softmax, Vᵀ·p with Eigen
// Times and counters are wall time (the work runs on <n> OpenMP threads). Every iteration times one
// decode step (the reported manual time), then four streaming reads of the very K/V bytes it reads
// (stream_sum: a tight SIMD read, with software prefetches 4 KiB ahead into L1, 4 or 8 KiB ahead
// into L2 as the direct kernel's, and without), then the step's FLOPs as
// register-resident FMAs (fma_seconds), so all of them see the same moments of a noisy machine.
// Counters: kv_bytes (K/V bytes read per step), median_us (median step), GB_per_s, floor_ratio =
// median step / max(stream time, median FMA time), where the stream time is the smallest of the
// four reads' medians, fma_over_stream = median FMA time / stream time (above 1: compute-bound on this
// machine), stream_GB_per_s (from the stream time), stream_prefetch (the fastest read's prefetches:
// 0 none, 1 into L1, 2 into L2 4 KiB ahead, 3 8 KiB ahead), peak_gflops (FLOPs / median FMA time),
// attn_threads (threads of the attention; not named `threads`, which would duplicate Google
// Benchmark's own "threads" key in the JSON).
// Label: storage type and the kernels' ISA path (kvattn::active_isa(); KVATTN_ISA=scalar|avx2|avx512
// forces one). Extra flags: --kv_dtype=f16|bf16|f32, the kvattn cache's storage type for the Decode
// grid (default f16); --huge_pages, the kvattn caches on kvattn::HugePageResource (2 MiB pages).
// The Eigen baseline is built with the default flags (SSE2 on x86-64), as a user's code would be.
//   Roofline/<D1..D5>/<dtype>/<isa>[/cold]/threads:<n>          the decode shapes, runtime dispatch
//   Roofline/<D2,D4,D5>/bf16/avx512/fpmath_bf16[/cold]/threads:<n> the same with fpmath_mode::bf16
//                                                             (bf16 pair products; CPUs with
//                                                             AVX512_BF16 only). Its floor_ratio keeps the f32
//                                                             FMA peak: a pair product does twice
//                                                             the multiplies of an FMA
//   RooflineEigenNaive/<D1..D5>/threads:<n>                     the Eigen baseline on those shapes
//   InCache/<design>/T512/B1/<dtype>/<isa>[/fpmath_bf16]/threads:1  one sequence whose K/V stay in
//                                                             L2, for query groups 1, 4 and 32: the
//                                                             kernels' arithmetic without memory
//   Overlap/<dtype>/fmas_per_vector:<F>/threads:<n>           streaming with F FMAs per converted vector
//                                                             against the same work in L2 (how far memory
//                                                             and compute overlap) and the FMA peak
// Cold runs flush the step's K/V bytes from every cache level before the step and before each read
// (evict_caches).
// Quick subset (~30 s): --benchmark_filter='^Decode(EigenNaive)?/[^/]+/(T4096/B1|T1024/B16)/threads:2/'

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <memory_resource>
#include <numeric>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#else
#include <unistd.h>
#endif

#include "common.hpp"
#include "kvattn/kvattn.hpp"
#include "roofline.hpp"
#include "summary_reporter.hpp"

namespace {

using kvattn_bench::GiB;
using Cache = kvattn::KvCache<kvattn::ContiguousLayout>;
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr int grid_q_heads = 32;  // query heads of the Decode grid and the shapes
constexpr int head_dim = 128;
// Memory guards (the machine has 24 GiB). Shapes over a limit are registered but skipped with
// SkipWithError, so the output says what was left out and why. At f16 no kvattn shape exceeds
// its limit (the largest, MHA T32768 B16, is 8 GiB); the Eigen baseline skips MHA T16384/T32768 B16.
constexpr std::int64_t kvattn_limit = 10 * GiB;
constexpr std::int64_t eigen_limit = 4 * GiB;

kvattn::kv_dtype storage_dtype = kvattn::kv_dtype::f16;  // --kv_dtype
bool huge_pages = false;                                  // --huge_pages: kvattn caches on HugePageResource

struct Shape {
  std::string design;  // e.g. "GQA-32x8"
  int kv_heads;
  std::int64_t tokens;
  int batch;
  int q_heads = grid_q_heads;

  std::string key() const { return design + "/T" + std::to_string(tokens) + "/B" + std::to_string(batch); }
  double flops() const { return 4.0 * q_heads * head_dim * static_cast<double>(tokens) * batch; }
  std::int64_t kv_bytes(std::int64_t elem_bytes) const { return std::int64_t{batch} * tokens * 2 * kv_heads * head_dim * elem_bytes; }
};

/// K/V contents: random values in [-1, 1], rounded to the storage type. A sequence's K/V, in the
/// contiguous block order K[Hkv][T][d] then V[Hkv][T][d], holds element e = pattern[e % size]; the
/// Eigen baseline gets exactly the same values in f32.
std::vector<float> pattern_f32(kvattn::kv_dtype dtype) {
  std::vector<float> p = kvattn_bench::random_floats(std::size_t{1} << 16, 7);
  for (float& x : p) x = kvattn::round_to_dtype(x, dtype);
  return p;
}

/// dst[i] = pattern[(start + i) % pattern.size()] for i < n, by memcpy.
template <class T>
void tile(T* dst, std::int64_t n, std::span<const T> pattern, std::int64_t start) {
  const auto size = static_cast<std::int64_t>(pattern.size());
  for (std::int64_t i = 0, from = start % size; i < n; from = 0) {
    const std::int64_t len = std::min(n - i, size - from);
    std::memcpy(dst + i, pattern.data() + from, static_cast<std::size_t>(len) * sizeof(T));
    i += len;
  }
}

/// The data of the one shape in memory. Big shapes take seconds to build, so a shape is built once
/// and kept for consecutive benchmarks (its thread counts); the next shape frees it first, so at
/// most one shape's data is resident.
struct Resident {
  std::string key;
  std::unique_ptr<Cache> cache;           // kvattn: B sequences of T tokens
  std::vector<RowMatrix> k, v;            // Eigen: [B][Hkv] matrices of [T][d]
};

Resident& resident(const std::string& key) {
  static Resident r;
  if (r.key != key) {
    r = Resident{};
    r.key = key;
  }
  return r;
}

std::unique_ptr<Cache> build_cache(const Shape& s, kvattn::kv_dtype dtype) {
  const kvattn::ModelConfig config(kvattn::HeadShape(s.q_heads, s.kv_heads, head_dim), kvattn::LayerSharingMap::none(1), dtype);
  static kvattn::HugePageResource huge_page_resource;
  auto cache = std::make_unique<Cache>(config, kvattn::ContiguousLayout{.max_tokens = s.tokens, .max_sequences = s.batch},
                                       huge_pages ? &huge_page_resource : std::pmr::new_delete_resource());
  // Storage bytes of the pattern, written with write_stored: converting GBs from f32 would take minutes.
  const std::vector<float> p = pattern_f32(dtype);
  const std::size_t elem = static_cast<std::size_t>(kvattn::dtype_bytes(dtype));
  std::vector<std::byte> bytes(p.size() * elem);
  kvattn::visit_dtype(dtype, [&](auto tag) {
    using S = kvattn::storage<decltype(tag)::value>;
    auto* out = reinterpret_cast<typename S::type*>(bytes.data());
    for (std::size_t i = 0; i < p.size(); ++i) out[i] = S::store(p[i]);
  });
  // Token t of KV head h holds K = pattern[h*T*d + t*d ...], V = pattern[(Hkv + h)*T*d + t*d ...]:
  // the element order of the Eigen baseline's per-head [T][d] matrices. d divides the pattern size.
  constexpr std::int64_t chunk = 256;
  const std::int64_t row = head_dim * static_cast<std::int64_t>(elem), size = static_cast<std::int64_t>(bytes.size());
  std::vector<std::byte> k(static_cast<std::size_t>(chunk * s.kv_heads * row)), v(k.size());
  for (kvattn::seq_id id = 0; id < s.batch; ++id) {
    cache->add_sequence(id);
    cache->extend(id, s.tokens);
    for (std::int64_t t0 = 0; t0 < s.tokens; t0 += chunk) {
      const std::int64_t n = std::min(chunk, s.tokens - t0);
      for (std::int64_t t = 0; t < n; ++t)
        for (int h = 0; h < s.kv_heads; ++h) {
          const std::int64_t kfrom = (std::int64_t{h} * s.tokens + t0 + t) * row % size;
          const std::int64_t vfrom = (std::int64_t{s.kv_heads + h} * s.tokens + t0 + t) * row % size;
          std::memcpy(&k[static_cast<std::size_t>((t * s.kv_heads + h) * row)], &bytes[static_cast<std::size_t>(kfrom)], static_cast<std::size_t>(row));
          std::memcpy(&v[static_cast<std::size_t>((t * s.kv_heads + h) * row)], &bytes[static_cast<std::size_t>(vfrom)], static_cast<std::size_t>(row));
        }
      cache->write_stored(id, 0, t0, n, k.data(), v.data());
    }
  }
  return cache;
}

void build_eigen(Resident& r, const Shape& s) {
  const std::vector<float> p = pattern_f32(storage_dtype);
  const std::int64_t head = s.tokens * head_dim;  // elements of one head's K (or V)
  for (int b = 0; b < s.batch; ++b)
    for (int h = 0; h < s.kv_heads; ++h) {
      r.k.emplace_back(s.tokens, head_dim);
      r.v.emplace_back(s.tokens, head_dim);
      tile<float>(r.k.back().data(), head, p, h * head);
      tile<float>(r.v.back().data(), head, p, (s.kv_heads + h) * head);
    }
}

/// One decode step's arguments: sequences 0..B-1, random queries, the thread count.
struct DecodeInputs {
  std::vector<kvattn::seq_id> ids;
  std::vector<float> q, out;
  kvattn::AttentionOptions opt;
  DecodeInputs(const Shape& s, int threads)
      : ids(static_cast<std::size_t>(s.batch)),
        q(kvattn_bench::random_floats(static_cast<std::size_t>(s.batch) * s.q_heads * head_dim, 3)),
        out(q.size()) {
    std::iota(ids.begin(), ids.end(), 0);
    opt.threads = threads;
  }
};

/// The K/V bytes one decode step reads, as float ranges: each sequence's block of the cache.
std::vector<std::span<const float>> kv_ranges(const Cache& cache, const Shape& s, std::int64_t kv_bytes) {
  std::vector<std::span<const float>> parts;
  const std::int64_t per_sequence = kv_bytes / s.batch;
  if (cache.block_bytes() != per_sequence) throw std::logic_error("bench: a cache block is not one sequence's K/V bytes");
  for (kvattn::seq_id id = 0; id < s.batch; ++id)
    parts.emplace_back(reinterpret_cast<const float*>(cache.sequence_view(id).blocks[0]), static_cast<std::size_t>(per_sequence / 4));
  return parts;
}

/// Evicts the bytes `parts` from every cache level. On x86 each of their lines is flushed (clflush
/// reaches every core's caches, whatever the last-level cache's size); elsewhere a buffer twice the
/// last-level cache the system reports (at least 256 MiB) is swept through.
void evict_caches(std::span<const std::span<const float>> parts) {
#if defined(__x86_64__) || defined(__i386__)
  for (const std::span<const float> part : parts) {
    const auto first = reinterpret_cast<std::uintptr_t>(part.data()) & ~std::uintptr_t{63};
    const auto end = reinterpret_cast<std::uintptr_t>(part.data() + part.size());
    for (std::uintptr_t line = first; line < end; line += 64) _mm_clflush(reinterpret_cast<const void*>(line));
  }
  _mm_mfence();
#else
  (void)parts;
  static std::vector<float> junk = [] {
    const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE) > 0 ? sysconf(_SC_LEVEL3_CACHE_SIZE) : sysconf(_SC_LEVEL2_CACHE_SIZE);
    return std::vector<float>(std::max<std::size_t>(std::size_t{256} << 20, 2 * static_cast<std::size_t>(std::max(llc, 0L))) / 4);
  }();
  for (std::size_t i = 0; i < junk.size(); i += 16) junk[i] += 1.f;
  benchmark::DoNotOptimize(junk.data());
  benchmark::ClobberMemory();
#endif
}

/// Medians of a decode step's time, of a streaming read of the very bytes it reads (the fastest of
/// the reads with each kind of software prefetches and without) and of an FMA loop doing its FLOPs.
struct Paired {
  double step_s, stream_s, fma_s;
  kvattn::kernels::read_prefetch stream_prefetch;  ///< the fastest read's prefetches
};

/// The median of a benchmark's per-iteration times (0 when there are none); sorts v.
double median(std::vector<double>& v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0. : v[v.size() / 2];
}

/// The four streaming reads of the same bytes whose fastest median is the stream floor: with
/// software prefetches 4 KiB ahead into L1, 4 and 8 KiB ahead into L2 (the direct kernel's), and
/// without (which is fastest depends on the CPU and the hour); each after evicting the bytes when
/// `cold`.
struct FloorReads {
  using kind = kvattn::kernels::read_prefetch;
  static constexpr std::array<kind, 4> kinds{kind::l1, kind::none, kind::l2, kind::l2_far};
  std::array<std::vector<double>, kinds.size()> seconds;  // per kind

  void time(std::span<const std::span<const float>> bytes, int threads, bool cold) {
    for (std::size_t k = 0; k < kinds.size(); ++k) {
      if (cold) evict_caches(bytes);
      seconds[k].push_back(kvattn_bench::stream_read_seconds(bytes, threads, 0, kinds[k]));
    }
  }
  /// The stream floor: the fastest kind's median and its prefetches.
  struct Floor {
    double seconds;
    kind prefetch;
  };
  Floor floor() {
    Floor best{median(seconds[0]), kinds[0]};
    for (std::size_t k = 1; k < kinds.size(); ++k)
      if (const double s = median(seconds[k]); s < best.seconds) best = {s, kinds[k]};
    return best;
  }
};

/// The timed loop of every decode benchmark (registered with UseManualTime): each iteration times
/// one step (the iteration's time), then four streaming reads of the same K/V bytes (FloorReads:
/// which is fastest depends on the CPU and the hour, and the floor is the fastest read this
/// machine does), then the step's FLOPs as register-resident FMAs, with `threads`
/// threads; the step and each read after evicting the caches when `cold`. Alternating them exposes
/// all of them to the same moments of a shared machine, whose memory bandwidth swings by tens of
/// percent from minute to minute and whose clock moves with its neighbours' load, so the ratios are
/// stable where floors measured once before the loop were not.
template <class Step>
Paired paired_loop(benchmark::State& state, Step&& step, std::span<const std::span<const float>> bytes, double flops,
                   int threads, bool cold) {
  std::vector<double> steps, fmas;
  FloorReads reads;
  for (auto _ : state) {
    if (cold) evict_caches(bytes);
    const auto t0 = std::chrono::steady_clock::now();
    step();
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(t);
    steps.push_back(t);
    reads.time(bytes, threads, cold);
    fmas.push_back(kvattn_bench::fma_seconds(flops, threads));
  }
  const FloorReads::Floor floor = reads.floor();
  return {median(steps), floor.seconds, median(fmas), floor.prefetch};
}

/// Counters shared by all decode benchmarks, from the medians of a paired loop: floor = max(stream
/// time of the same bytes, time of the same FLOPs as register-resident FMAs).
void set_counters(benchmark::State& state, const Shape& s, std::int64_t kv_bytes, int threads, const Paired& p) {
  state.counters["kv_bytes"] = static_cast<double>(kv_bytes);
  state.counters["median_us"] = p.step_s * 1e6;
  state.counters["GB_per_s"] = kv_bytes * 1e-9 / p.step_s;
  state.counters["floor_ratio"] = p.step_s / std::max(p.stream_s, p.fma_s);
  state.counters["fma_over_stream"] = p.fma_s / p.stream_s;  // > 1: the FMA peak, not memory, is the floor
  state.counters["stream_GB_per_s"] = kv_bytes * 1e-9 / p.stream_s;
  state.counters["stream_prefetch"] = static_cast<int>(p.stream_prefetch);  // read_prefetch: 0 none, 1 L1, 2 L2, 3 L2 far
  state.counters["peak_gflops"] = s.flops() * 1e-9 / p.fma_s;
  state.counters["attn_threads"] = threads;
}

bool over_limit(benchmark::State& state, const char* what, std::int64_t bytes, std::int64_t limit) {
  if (bytes <= limit) return false;
  const std::string msg = std::string(what) + " K/V would take " + std::to_string(bytes / (1 << 20)) +
                          " MiB, over the " + std::to_string(limit / GiB) + " GiB limit";
  state.SkipWithError(msg.c_str());
  return true;
}

template <int KvHeads>
void BM_Decode(benchmark::State& state, const Shape& s) {
  const int threads = static_cast<int>(state.range(0));
  const std::int64_t kv_bytes = s.kv_bytes(kvattn::dtype_bytes(storage_dtype));
  if (over_limit(state, "kvattn", kv_bytes, kvattn_limit)) return;
  Resident& r = resident("kvattn/" + s.key());
  if (!r.cache) r.cache = build_cache(s, storage_dtype);
  DecodeInputs in(s, threads);
  const auto bytes = kv_ranges(*r.cache, s, kv_bytes);
  const Paired p = paired_loop(state, [&] {
    // Static layout: the kernel is specialized on group size and head dim, as a user would do.
    kvattn::decode<kvattn::HeadLayout<grid_q_heads, KvHeads, head_dim>>(*r.cache, 0, in.ids, in.q.data(), in.out.data(), in.opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }, bytes, s.flops(), threads, false);
  set_counters(state, s, kv_bytes, threads, p);
  state.SetLabel(std::string(kvattn::dtype_name(storage_dtype)) + "/" + std::string(kvattn::isa_name(kvattn::active_isa())));
}

void BM_DecodeEigenNaive(benchmark::State& state, const Shape& s) {
  const int threads = static_cast<int>(state.range(0));
  const std::int64_t kv_bytes = s.kv_bytes(sizeof(float));
  if (over_limit(state, "Eigen f32", kv_bytes, eigen_limit)) return;
  Resident& r = resident("eigen/" + s.key());
  if (r.k.empty()) build_eigen(r, s);
  const std::vector<float> q = kvattn_bench::random_floats(std::size_t(s.batch) * s.q_heads * head_dim, 3);
  std::vector<float> out(q.size());
  std::vector<Eigen::VectorXf> scores(static_cast<std::size_t>(threads), Eigen::VectorXf(s.tokens));
  const int group = s.q_heads / s.kv_heads;
  const float scale = 1.f / std::sqrt(float(head_dim));
  std::vector<std::span<const float>> bytes;  // its K and V matrices
  for (std::size_t i = 0; i < r.k.size(); ++i) {
    bytes.emplace_back(r.k[i].data(), static_cast<std::size_t>(r.k[i].size()));
    bytes.emplace_back(r.v[i].data(), static_cast<std::size_t>(r.v[i].size()));
  }
  const Paired p = paired_loop(state, [&] {
    // One independent item per (sequence, query head), on the same OpenMP loop as the kernels.
    kvattn::kernels::parallel_for(std::int64_t{s.batch} * s.q_heads, threads, [&](std::int64_t i, int t) {
      const std::size_t kv = static_cast<std::size_t>(i / s.q_heads * s.kv_heads + i % s.q_heads / group);
      Eigen::VectorXf& p = scores[static_cast<std::size_t>(t)];
      p.noalias() = r.k[kv] * Eigen::Map<const Eigen::VectorXf>(q.data() + i * head_dim, head_dim);
      p = ((p.array() - p.maxCoeff()) * scale).exp();
      p /= p.sum();
      Eigen::Map<Eigen::VectorXf>(out.data() + i * head_dim, head_dim).noalias() = r.v[kv].transpose() * p;
    });
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }, bytes, s.flops(), threads, false);
  set_counters(state, s, kv_bytes, threads, p);
  state.SetLabel("f32");
}

/// Forces an ISA path for one benchmark, then goes back to the default (KVATTN_ISA or the fastest).
struct ForcedIsa {
  explicit ForcedIsa(kvattn::isa i) { kvattn::set_isa(i); }
  ~ForcedIsa() { kvattn::reset_isa(); }
};

/// A kernel variant's name part and label: "<dtype>/<isa>", then "/fpmath_bf16" with bf16 products.
std::string variant_name(kvattn::kv_dtype dtype, kvattn::isa path, kvattn::fpmath_mode fpmath) {
  return std::string(kvattn::dtype_name(dtype)) + "/" + std::string(kvattn::isa_name(path)) +
         (fpmath == kvattn::fpmath_mode::bf16 ? "/fpmath_bf16" : "");
}

/// Calls f(dtype, path, fpmath) for every storage type and ISA path, strict, and with bf16 products
/// where a kernel takes them: bf16 storage, the AVX-512 path with AVX512_BF16, query groups of 2 to
/// 8 (other groups would run the strict kernels).
template <class F>
void for_each_variant(int group, F&& f) {
  for (kvattn::kv_dtype dtype : {kvattn::kv_dtype::f16, kvattn::kv_dtype::bf16, kvattn::kv_dtype::f32})
    for (kvattn::isa path : kvattn::supported_isas()) {
      f(dtype, path, kvattn::fpmath_mode::strict);
      if (dtype == kvattn::kv_dtype::bf16 && path == kvattn::isa::avx512 && kvattn::cpu_supports_bf16_dot() && group >= 2 && group <= 8)
        f(dtype, path, kvattn::fpmath_mode::bf16);
    }
}

/// Decode of shape s (the D1..D5, or an InCache shape) with one kernel variant, through the
/// runtime-dispatched API a default user calls (HeadShape, not a static layout). Cold runs evict
/// the caches before every step, as a real model's next layer would.
void BM_Roofline(benchmark::State& state, const Shape& s, kvattn::kv_dtype dtype, kvattn::isa path, kvattn::fpmath_mode fpmath,
                 bool cold) {
  const int threads = static_cast<int>(state.range(0));
  const ForcedIsa forced(path);
  const std::int64_t kv_bytes = s.kv_bytes(kvattn::dtype_bytes(dtype));
  Resident& r = resident("kvattn/" + s.key() + "/" + std::string(kvattn::dtype_name(dtype)));
  if (!r.cache) r.cache = build_cache(s, dtype);
  DecodeInputs in(s, threads);
  in.opt.fpmath = fpmath;
  auto step = [&] {
    kvattn::decode(*r.cache, 0, in.ids, in.q.data(), in.out.data(), in.opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  };
  set_counters(state, s, kv_bytes, threads, paired_loop(state, step, kv_ranges(*r.cache, s, kv_bytes), s.flops(), threads, cold));
  state.SetLabel(variant_name(dtype, path, fpmath));
}

void register_roofline() {
  struct Named {
    const char* id;
    Shape shape;
    bool cold;
  };
  const Named shapes[] = {{"D1", {"MHA-32x32", 32, 4096, 1}, true},  {"D2", {"GQA-32x8", 8, 4096, 1}, false},
                          {"D3", {"MQA-32x1", 1, 4096, 1}, false},   {"D4", {"GQA-32x8", 8, 32768, 1}, true},
                          {"D5", {"GQA-32x8", 8, 1024, 16}, false}};
  for (const Named& n : shapes) {
    for_each_variant(n.shape.q_heads / n.shape.kv_heads, [&](kvattn::kv_dtype dtype, kvattn::isa path, kvattn::fpmath_mode fpmath) {
      for (bool cold : {false, true}) {
        if (cold && !n.cold) continue;
        const std::string name = std::string("Roofline/") + n.id + "/" + variant_name(dtype, path, fpmath) + (cold ? "/cold" : "");
        auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_Roofline, n.shape, dtype, path, fpmath, cold);
        b->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseManualTime();
        if (cold) b->Iterations(20);
      }
    });
    benchmark::RegisterBenchmark((std::string("RooflineEigenNaive/") + n.id).c_str(), BM_DecodeEigenNaive, n.shape)
        ->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseManualTime();
  }
}

/// The kernels' own arithmetic, without memory: decode of one sequence whose K/V (T=512, 256 KiB
/// at 16 bits, 512 KiB at f32) stay in one core's L2 across steps, on one thread, for the query
/// groups of the shapes: 1 (D1), 4 (D2, D4, D5) and 32 (D3). Where the FMA peak is the
/// floor (fma_over_stream above 1: groups 4 and 32; group 1's is mostly the L2 stream), floor_ratio
/// says how far a kernel's instructions alone are from the peak; a decode whose floor is the FMA
/// peak in memory too (fma_over_stream near or above 1, as D2 and D3 are on a machine with a fast
/// L3) can expect little below it with the same kernel (only the per-call work weighs less over a
/// longer context).
void register_in_cache() {
  const Shape shapes[] = {{"MHA-1x1", 1, 512, 1, 1}, {"GQA-4x1", 1, 512, 1, 4}, {"MQA-32x1", 1, 512, 1, 32}};
  for (const Shape& s : shapes)
    for_each_variant(s.q_heads / s.kv_heads, [&](kvattn::kv_dtype dtype, kvattn::isa path, kvattn::fpmath_mode fpmath) {
      benchmark::RegisterBenchmark(("InCache/" + s.key() + "/" + variant_name(dtype, path, fpmath)).c_str(), BM_Roofline, s, dtype, path,
                                   fpmath, false)
          ->ArgName("threads")->Arg(1)->Unit(benchmark::kMicrosecond)->UseManualTime();
    });
}

/// How far streaming and computing overlap on this machine, and what converting a storage type
/// costs beside the FMAs: a streaming read of 16 MiB (D2's bf16 K/V) of stored elements doing F FMAs
/// on every converted vector (kvattn::kernels::stream_fma; F = the query rows a decode kernel's
/// K or V vector serves, the GQA group; groups that the buffered kernel takes, which converts
/// once into L1, only by their FMA density), timed beside the bare read of the same bytes (the floor)
/// and the same work on 256 KiB that stay in L2. compute_ratio = L2 time / floor is the work's own
/// time, floor_ratio = streamed time / floor what it costs when the bytes come from memory; a
/// decode kernel whose compute_ratio is the same cannot expect a lower floor_ratio than this loop,
/// which has no dependencies, overheads or irregular accesses. fma_fraction = the time of the
/// loop's FMAs at the peak FMA rate / its L2 time: the share of the FMA peak that F FMAs per vector
/// of this storage type leave after the loads and conversions.
template <kvattn::kv_dtype Dtype>
void BM_Overlap(benchmark::State& state, int fmas) {
  using T = typename kvattn::storage<Dtype>::type;
  const int threads = static_cast<int>(state.range(0));
  constexpr std::size_t bytes = std::size_t{16} << 20;
  // The floor reads these bytes as floats, the probe as T (16-bit values written into them).
  static const std::vector<float> data = [] {
    if constexpr (std::is_same_v<T, float>) {
      return kvattn_bench::random_floats(bytes / sizeof(float), 11);
    } else {
      std::vector<float> x(bytes / sizeof(float));
      const std::vector<float> values = kvattn_bench::random_floats(bytes / sizeof(T), 12);
      auto* out = reinterpret_cast<T*>(x.data());
      for (std::size_t i = 0; i < values.size(); ++i) out[i] = kvattn::storage<Dtype>::store(values[i]);
      return x;
    }
  }();
  const std::span<const T> all(reinterpret_cast<const T*>(data.data()), bytes / sizeof(T));
  const std::vector<std::span<const T>> memory{all};
  const std::vector<std::span<const float>> floor_bytes{std::span<const float>(data)};
  // The same reads and FMAs on one 256 KiB slice per thread, read over and over (a thread each, not
  // the stream's small pieces, whose scheduling would show at L2 speed).
  const std::int64_t slice = (std::int64_t{256} << 10) / static_cast<std::int64_t>(sizeof(T));
  const std::int64_t reps = static_cast<std::int64_t>(all.size()) / slice / threads;
  std::vector<float> sinks(static_cast<std::size_t>(threads));
  const auto in_l2 = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    kvattn::kernels::parallel_for(threads, threads, [&](std::int64_t i, int t) {
      for (std::int64_t r = 0; r < reps; ++r) sinks[static_cast<std::size_t>(t)] += kvattn::kernels::stream_fma(all.data() + i * slice, slice, fmas);
    });
    benchmark::DoNotOptimize(sinks.data());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // FLOPs of the loop: 2 per FMA lane, F per stored element.
  const double flops = 2.0 * fmas * static_cast<double>(all.size());
  std::vector<double> streamed, l2, peak;
  FloorReads reads;
  for (auto _ : state) {
    const double t = kvattn_bench::stream_read_seconds<T>(memory, threads, fmas);
    state.SetIterationTime(t);
    streamed.push_back(t);
    reads.time(floor_bytes, threads, false);
    l2.push_back(in_l2());
    peak.push_back(kvattn_bench::fma_seconds(flops, threads));
  }
  const double f = reads.floor().seconds;  // the floor the decode benchmarks use
  state.counters["median_us"] = median(streamed) * 1e6;
  state.counters["floor_ratio"] = median(streamed) / f;
  state.counters["compute_ratio"] = median(l2) / f;
  state.counters["fma_fraction"] = median(peak) / median(l2);
  state.counters["stream_GB_per_s"] = static_cast<double>(bytes) * 1e-9 / f;
  state.counters["attn_threads"] = threads;
  state.SetLabel(std::string(kvattn::dtype_name(Dtype)) + "/" + std::string(kvattn::isa_name(kvattn::active_isa())));
}

void register_overlap() {
  // f32 from 2 to 16 FMAs per vector, where streaming stops hiding them; 16-bit types at the
  // decode kernels' group sizes.
  const auto add = [](auto tag, std::initializer_list<int> counts) {
    constexpr kvattn::kv_dtype dtype = decltype(tag)::value;
    for (int fmas : counts)
      benchmark::RegisterBenchmark(("Overlap/" + std::string(kvattn::dtype_name(dtype)) + "/fmas_per_vector:" + std::to_string(fmas)).c_str(),
                                   BM_Overlap<dtype>, fmas)
          ->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseManualTime();
  };
  add(std::integral_constant<kvattn::kv_dtype, kvattn::kv_dtype::f32>{}, {2, 4, 6, 8, 10, 12, 14, 16});
  add(std::integral_constant<kvattn::kv_dtype, kvattn::kv_dtype::f16>{}, {1, 2, 4, 8, 16});
  add(std::integral_constant<kvattn::kv_dtype, kvattn::kv_dtype::bf16>{}, {1, 2, 4, 8, 16});
}

template <int KvHeads>
void register_design(const std::string& design) {
  for (std::int64_t tokens : {1024, 4096, 16384, 32768})
    for (int batch : {1, 16}) {
      const Shape s{design, KvHeads, tokens, batch};
      for (auto* b : {benchmark::RegisterBenchmark(("Decode/" + s.key()).c_str(), BM_Decode<KvHeads>, s),
                      benchmark::RegisterBenchmark(("DecodeEigenNaive/" + s.key()).c_str(), BM_DecodeEigenNaive, s)})
        b->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseManualTime();
    }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--huge_pages") {
      huge_pages = true;
      continue;
    }
    if (!a.starts_with("--kv_dtype=")) {
      args.push_back(argv[i]);
      continue;
    }
    const std::string_view v = a.substr(a.find('=') + 1);
    if (v == "f16") storage_dtype = kvattn::kv_dtype::f16;
    else if (v == "bf16") storage_dtype = kvattn::kv_dtype::bf16;
    else if (v == "f32") storage_dtype = kvattn::kv_dtype::f32;
    else {
      std::fprintf(stderr, "unknown --kv_dtype '%.*s' (use f16, bf16 or f32)\n", int(v.size()), v.data());
      return 1;
    }
  }
  register_design<32>("MHA-32x32");
  register_design<8>("GQA-32x8");
  register_design<4>("GQA-32x4");
  register_design<2>("GQA-32x2");
  register_design<1>("MQA-32x1");
  register_roofline();
  register_in_cache();
  register_overlap();
  return kvattn_bench::run_main(static_cast<int>(args.size()), args.data(),
                                "  --kv_dtype=f16|bf16|f32  storage type of the Decode grid's kvattn caches (default f16)\n"
                                "  --huge_pages             kvattn caches on kvattn::HugePageResource (2 MiB pages)\n");
}
