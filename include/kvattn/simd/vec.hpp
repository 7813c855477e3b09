// The SIMD layer: one small vector interface `V` per instruction set, each compiled with a function
// target attribute so that every path exists in every x86-64 build regardless of -m flags.
//
// V provides (all static, always inline, usable only from functions with the same target):
//   vec, lanes, registers      vector type, floats per vector, vector registers of the ISA
//   pv_regs                    accumulator vectors for P·V passes
//   qkt_keys                   keys per register block when lanes run over query rows (twice
//                              that for a lone row vector where registers < 32)
//   zero set1 load store add sub mul min max fma(a, b, c) = a * b + c
//   fma_acc(a, b, acc)         fma(a, b, acc) written into acc's own register (a may come from
//                              memory): for accumulators carried around a loop
//   reduce_add reduce_max      horizontal reductions
//   round                      nearest integer
//   ldexp(x, n)                x * 2^n for integral n in [-126, 127] (AVX-512: one vscalefps)
//   select_less(x, b, t, f)    lane-wise x < b ? t : f
//   hsum(acc, out)             out[j] = sum of the lanes of acc[j], j < lanes (a transposed reduction)
//   swap_adjacent<W>(v)        exchanges neighbouring groups of W lanes (W a power of two < lanes)
//   convert(src, dst, n)       n stored elements (f32, f16, bf16) to f32
//   load_once(p)               load(p) kept in a register: never folded into, and so repeated by,
//                              each instruction using it
//   load_stored(src)           one vector of stored elements, converted to f32
//   load_stored2(src, a, b)    2 x lanes stored elements as two f32 vectors: elements [0, L) and
//                              [L, 2L), or, where evens_odds<T>, the even and the odd elements
//   evens_odds<T>              whether load_stored2 splits T into even and odd elements (bf16 on
//                              x86: a shift and a mask of one load instead of two widenings)
//   deinterleave(src, e, o)    2 x lanes floats as their even and their odd elements
//   interleave(e, o, dst)      the inverse: stores 2 x lanes floats, e's at even positions
//   bf16_dot                   whether the bf16 pair products below exist (AVX-512 only; usable
//                              only where cpu_supports_bf16_dot(): AVX512_BF16)
//   pairs                      a vector of lanes pairs of bf16 values (one pair per f32 lane)
//   load_pairs(src)            2 x lanes stored bf16 values
//   broadcast_pair(src)        the two bf16 values at src in every lane
//   zip_pairs(a, b, lo, hi)    the pairs (a_i, b_i) of two vectors of 2 x lanes values: lo and hi
//                              hold dims 8t + u and 8t + 4 + u at lane 4t + u (u < 4), within
//                              each 32-value vector
//   dot_pairs(acc, a, b)       acc + a_even * b_even + a_odd * b_odd per lane (products exact,
//                              sums in f32; bf16 denormals read as 0)
//   round_bf16(x, dst)         x rounded to bf16 (nearest even), stored to dst (lanes values) and
//                              returned widened back to f32
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvattn/simd/cpu.hpp"

#define KVATTN_ALWAYS_INLINE inline __attribute__((always_inline))
// Fully unrolls a short loop over register accumulators (GCC and Clang both read this pragma).
#define KVATTN_PRAGMA(x) _Pragma(#x)
#define KVATTN_UNROLL(n) KVATTN_PRAGMA(GCC unroll n)

#if defined(KVATTN_ARCH_X86_64)
// GCC 12 reports its own _mm512_undefined_* placeholders as (maybe-)uninitialized once inlined.
#if defined(__clang__)
#include <immintrin.h>
#else
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#if !defined(__clang__)  // GCC bug 105593, see kernels/dispatch.hpp
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define KVATTN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KVATTN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace kvattn::simd::avx512 {
#define KVATTN_V KVATTN_ALWAYS_INLINE static KVATTN_TARGET_AVX512
struct V {
  using vec = __m512;
  static constexpr int lanes = 16;
  static constexpr int registers = 32;
  static constexpr int pv_regs = 16;
  static constexpr int qkt_keys = 8;
  KVATTN_V vec zero() { return _mm512_setzero_ps(); }
  KVATTN_V vec set1(float x) { return _mm512_set1_ps(x); }
  KVATTN_V vec load(const float* p) { return _mm512_loadu_ps(p); }
  KVATTN_V vec load_once(const float* p) {
    vec v = _mm512_loadu_ps(p);
    __asm__("" : "+v"(v));  // an empty asm the compiler cannot see through
    return v;
  }
  KVATTN_V void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  KVATTN_V vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  KVATTN_V vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  KVATTN_V vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  KVATTN_V vec min(vec a, vec b) { return _mm512_min_ps(a, b); }
  KVATTN_V vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  KVATTN_V vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  KVATTN_V vec fma_acc(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  KVATTN_V float reduce_add(vec v) { return _mm512_reduce_add_ps(v); }
  KVATTN_V float reduce_max(vec v) { return _mm512_reduce_max_ps(v); }
  KVATTN_V vec round(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  KVATTN_V vec ldexp(vec x, vec n) { return _mm512_scalef_ps(x, n); }
  KVATTN_V vec select_less(vec x, vec b, vec t, vec f) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, b, _CMP_LT_OQ), f, t); }
  KVATTN_V void hsum(const vec* a, float* out) {
    // 16 vectors -> one: pairwise lane sums (unpack), then 128-bit quarters (shuffle_f32x4).
    vec t[8], u[4];
    KVATTN_UNROLL(8)
    for (int k = 0; k < 8; ++k)
      t[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    KVATTN_UNROLL(4)
    for (int m = 0; m < 4; ++m)
      u[m] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const vec t01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const vec t23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_f32x4(t01, t23, _MM_SHUFFLE(3, 1, 3, 1))));
  }
  template <int W>
  KVATTN_V vec swap_adjacent(vec v) {
    if constexpr (W == 1) return _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1));
    else if constexpr (W == 2) return _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2));
    else if constexpr (W == 4) return _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1));
    else return _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2));
  }
  KVATTN_V vec load_stored(const float* p) { return _mm512_loadu_ps(p); }
  KVATTN_V vec load_stored(const Eigen::half* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
#if defined(__clang__)
    // Clang 14 turns the plain conversion into a generic half-to-float extension and, in the direct
    // kernel's unrolled loops, rebuilds the loaded vectors word by word (vpinsrw): GQA 4/1 d=128 f16
    // decode, one thread, 2048 keys in L2, 84.4 us. The exception-suppressing form stays one
    // instruction: 46.4 us (GCC: 45.8 us). GCC keeps the plain form, which folds the load.
    return _mm512_cvt_roundph_ps(h, _MM_FROUND_NO_EXC);
#else
    return _mm512_cvtph_ps(h);
#endif
  }
  KVATTN_V vec load_stored(const Eigen::bfloat16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  KVATTN_V void load_stored2(const float* p, vec& a, vec& b) { a = load(p), b = load(p + 16); }
  KVATTN_V void load_stored2(const Eigen::half* p, vec& a, vec& b) { a = load_stored(p), b = load_stored(p + 16); }
  KVATTN_V void load_stored2(const Eigen::bfloat16* p, vec& a, vec& b) {
    const __m512i w = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  template <class T>
  static constexpr bool evens_odds = std::is_same_v<T, Eigen::bfloat16>;
  KVATTN_V void deinterleave(const float* p, vec& e, vec& o) {
    const vec a = load(p), b = load(p + 16);
    e = _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
    o = _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
  }
  KVATTN_V void interleave(vec e, vec o, float* p) {
    store(p, _mm512_permutex2var_ps(e, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), o));
    store(p + 16, _mm512_permutex2var_ps(e, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), o));
  }
  KVATTN_V void convert(const float* s, float* d, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_loadu_ps(s + i));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(d + i, m, _mm512_maskz_loadu_ps(m, s + i));
    }
  }
  KVATTN_V void convert(const Eigen::half* s, float* d, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, load_stored(s + i));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(d + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + i)));
    }
  }
  static constexpr bool bf16_dot = true;
  using pairs = __m512i;
  KVATTN_V pairs load_pairs(const Eigen::bfloat16* p) { return _mm512_loadu_si512(p); }
  KVATTN_V pairs broadcast_pair(const Eigen::bfloat16* p) {
    std::int32_t w;
    std::memcpy(&w, p, sizeof w);
    return _mm512_set1_epi32(w);
  }
  KVATTN_V void zip_pairs(pairs a, pairs b, pairs& lo, pairs& hi) { lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b); }
  // vdpbf16ps and vcvtneps2bf16 as inline assembly: their intrinsics require the avx512bf16 target
  // in every function they are inlined into, which would split this path in two (AVX-512 CPUs
  // without BF16 exist); the kernels that use them are only selected on CPUs that have it.
  KVATTN_V vec dot_pairs(vec acc, pairs a, pairs b) {
    __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
  }
  KVATTN_V vec round_bf16(vec x, Eigen::bfloat16* dst) {
    __m256i h;
    __asm__("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(x));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  KVATTN_V void convert(const Eigen::bfloat16* s, float* d, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))), 16)));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(d + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + i)), 16)));
    }
  }
};
#undef KVATTN_V
}  // namespace kvattn::simd::avx512

namespace kvattn::simd::avx2 {
#define KVATTN_V KVATTN_ALWAYS_INLINE static KVATTN_TARGET_AVX2
struct V {
  using vec = __m256;
  static constexpr int lanes = 8;
  static constexpr bool bf16_dot = false;
  static constexpr int registers = 16;
  static constexpr int pv_regs = 8;
  static constexpr int qkt_keys = 4;
  KVATTN_V vec zero() { return _mm256_setzero_ps(); }
  KVATTN_V vec set1(float x) { return _mm256_set1_ps(x); }
  KVATTN_V vec load(const float* p) { return _mm256_loadu_ps(p); }
  KVATTN_V vec load_once(const float* p) {
    vec v = _mm256_loadu_ps(p);
    __asm__("" : "+x"(v));  // an empty asm the compiler cannot see through
    return v;
  }
  KVATTN_V void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  KVATTN_V vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  KVATTN_V vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  KVATTN_V vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  KVATTN_V vec min(vec a, vec b) { return _mm256_min_ps(a, b); }
  KVATTN_V vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  KVATTN_V vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  // GCC 12 may write an accumulating FMA into the register of a multiplicand that dies there and
  // copy it back to the accumulator's register on every pass of the loop: 5 copies per 16 FMAs in
  // the GQA-4 bf16 dot products, whose loop is issue-bound on a Zen 1 (scripts/ab-decode, GQA 4/1
  // bf16 d=128, 512 keys in L2, one thread: 0.956x the time with the copies gone). vfmadd231ps
  // writes the accumulator in place. Clang allocates these loops without copies.
  KVATTN_V vec fma_acc(vec a, vec b, vec c) {
#if defined(__clang__)
    return _mm256_fmadd_ps(a, b, c);
#else
    __asm__("vfmadd231ps %1, %2, %0" : "+x"(c) : "xm"(a), "x"(b));
    return c;
#endif
  }
  KVATTN_V float reduce_add(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  KVATTN_V float reduce_max(vec v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  KVATTN_V vec round(vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  KVATTN_V vec ldexp(vec x, vec n) {  // 2^n from the exponent bits
    return mul(x, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
  }
  KVATTN_V vec select_less(vec x, vec b, vec t, vec f) { return _mm256_blendv_ps(f, t, _mm256_cmp_ps(x, b, _CMP_LT_OQ)); }
  KVATTN_V void hsum(const vec* a, float* out) {
    // 8 vectors -> one: pairwise lane sums, then the two 128-bit halves.
    vec t[4];
    KVATTN_UNROLL(4)
    for (int k = 0; k < 4; ++k)
      t[k] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm256_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    const vec u0 = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const vec u1 = _mm256_add_ps(_mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
    // [u0.lo + u0.hi, u1.hi + u1.lo]: a blend and [u0.hi, u1.lo] from an extract and an insert,
    // not two permute2f128, which a Zen 1 runs as 8 micro-ops each (an insert: 2, an extract: 1).
    // (GCC 12 keeps this; Clang 14 makes the extract and insert one permute2f128 again.)
    const vec cross = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_extractf128_ps(u0, 1)), _mm256_castps256_ps128(u1), 1);
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_blend_ps(u0, u1, 0xF0), cross));
  }
  template <int W>
  KVATTN_V vec swap_adjacent(vec v) {
    if constexpr (W == 1) return _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1));
    else if constexpr (W == 2) return _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2));
    else return _mm256_permute2f128_ps(v, v, 1);
  }
  KVATTN_V vec load_stored(const float* p) { return _mm256_loadu_ps(p); }
  KVATTN_V vec load_stored(const Eigen::half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  KVATTN_V vec load_stored(const Eigen::bfloat16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  KVATTN_V void load_stored2(const float* p, vec& a, vec& b) { a = load(p), b = load(p + 8); }
  KVATTN_V void load_stored2(const Eigen::half* p, vec& a, vec& b) { a = load_stored(p), b = load_stored(p + 8); }
  KVATTN_V void load_stored2(const Eigen::bfloat16* p, vec& a, vec& b) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m256i high_halves = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
#if defined(__clang__)
    // Clang 14 turns an AND with this constant into vpblendw with a zero register. Kept an AND:
    // Clang-built GQA 4/1 bf16 d=128, 512 keys in L2, one thread, 1.150x -> 1.056x GCC's time;
    // D2 1.126x -> 1.085x, D5 1.156x -> 1.065x (Zen 1, medians of 3-5 A/B runs). GCC's code is
    // the same either way.
    __asm__("" : "+x"(high_halves));
#endif
    a = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(w, high_halves));
  }
  template <class T>
  static constexpr bool evens_odds = std::is_same_v<T, Eigen::bfloat16>;
  KVATTN_V void deinterleave(const float* p, vec& e, vec& o) {
    const vec a = load(p), b = load(p + 8);  // shuffle_ps pairs within 128-bit halves; permute4x64 orders them
    e = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
    o = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  KVATTN_V void interleave(vec e, vec o, float* p) {
    const vec lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);
    store(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    store(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  KVATTN_V void convert(const float* s, float* d, int n) { std::memcpy(d, s, sizeof(float) * static_cast<std::size_t>(n)); }
  KVATTN_V void convert(const Eigen::half* s, float* d, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load_stored(s + i));
    for (; i < n; ++i) d[i] = _cvtsh_ss(Eigen::numext::bit_cast<std::uint16_t>(s[i]));
  }
  KVATTN_V void convert(const Eigen::bfloat16* s, float* d, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                  _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))), 16)));
    for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
};
#undef KVATTN_V
}  // namespace kvattn::simd::avx2
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // KVATTN_ARCH_X86_64

#if defined(KVATTN_ARCH_AARCH64)
#include <arm_neon.h>

namespace kvattn::simd::neon {
#define KVATTN_V KVATTN_ALWAYS_INLINE static
struct V {
  using vec = float32x4_t;
  static constexpr int lanes = 4;
  static constexpr bool bf16_dot = false;  // (BFDOT of Armv8.6 is not used yet)
  static constexpr int registers = 32;
  static constexpr int pv_regs = 16;
  static constexpr int qkt_keys = 8;
  KVATTN_V vec zero() { return vdupq_n_f32(0.f); }
  KVATTN_V vec set1(float x) { return vdupq_n_f32(x); }
  KVATTN_V vec load(const float* p) { return vld1q_f32(p); }
  KVATTN_V vec load_once(const float* p) {
    vec v = vld1q_f32(p);
    __asm__("" : "+w"(v));  // an empty asm the compiler cannot see through
    return v;
  }
  KVATTN_V void store(float* p, vec v) { vst1q_f32(p, v); }
  KVATTN_V vec add(vec a, vec b) { return vaddq_f32(a, b); }
  KVATTN_V vec sub(vec a, vec b) { return vsubq_f32(a, b); }
  KVATTN_V vec mul(vec a, vec b) { return vmulq_f32(a, b); }
  KVATTN_V vec min(vec a, vec b) { return vminq_f32(a, b); }
  KVATTN_V vec max(vec a, vec b) { return vmaxq_f32(a, b); }
  KVATTN_V vec fma(vec a, vec b, vec c) { return vfmaq_f32(c, a, b); }
  KVATTN_V vec fma_acc(vec a, vec b, vec c) { return vfmaq_f32(c, a, b); }
  KVATTN_V float reduce_add(vec v) { return vaddvq_f32(v); }
  KVATTN_V float reduce_max(vec v) { return vmaxvq_f32(v); }
  KVATTN_V vec round(vec v) { return vrndnq_f32(v); }
  KVATTN_V vec ldexp(vec x, vec n) {  // 2^n from the exponent bits
    return vmulq_f32(x, vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23)));
  }
  KVATTN_V vec select_less(vec x, vec b, vec t, vec f) { return vbslq_f32(vcltq_f32(x, b), t, f); }
  KVATTN_V void hsum(const vec* a, float* out) { vst1q_f32(out, vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]))); }
  template <int W>
  KVATTN_V vec swap_adjacent(vec v) {
    if constexpr (W == 1) return vrev64q_f32(v);
    else return vextq_f32(v, v, 2);
  }
  KVATTN_V vec load_stored(const float* p) { return vld1q_f32(p); }
  KVATTN_V vec load_stored(const Eigen::half* p) { return vcvt_f32_f16(vld1_f16(reinterpret_cast<const __fp16*>(p))); }
  KVATTN_V vec load_stored(const Eigen::bfloat16* p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const std::uint16_t*>(p)), 16));
  }
  template <class T>
  KVATTN_V void load_stored2(const T* p, vec& a, vec& b) { a = load_stored(p), b = load_stored(p + 4); }
  template <class T>
  static constexpr bool evens_odds = false;  // vshll widens bf16 in one instruction already
  KVATTN_V void deinterleave(const float* p, vec& e, vec& o) {
    const float32x4x2_t v = vld2q_f32(p);
    e = v.val[0], o = v.val[1];
  }
  KVATTN_V void interleave(vec e, vec o, float* p) { vst2q_f32(p, float32x4x2_t{{e, o}}); }
  KVATTN_V void convert(const float* s, float* d, int n) { std::memcpy(d, s, sizeof(float) * static_cast<std::size_t>(n)); }
  KVATTN_V void convert(const Eigen::half* s, float* d, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(d + i, vcvt_f32_f16(vld1_f16(reinterpret_cast<const __fp16*>(s + i))));
    for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
  KVATTN_V void convert(const Eigen::bfloat16* s, float* d, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4)
      vst1q_f32(d + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const std::uint16_t*>(s + i)), 16)));
    for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
};
#undef KVATTN_V
}  // namespace kvattn::simd::neon
#endif  // KVATTN_ARCH_AARCH64
