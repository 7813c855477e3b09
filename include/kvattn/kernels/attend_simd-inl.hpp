// The vectorized tile kernel, written once against the SIMD interface `V` (simd/vec.hpp).
// dispatch.hpp includes this file once per instruction set, inside namespace
// kvattn::kernels::<isa>, with `V` and `KVATTN_TARGET` defined for that set. No include guard.
//
// Per tile of key_tile_simd keys: K rows are converted to f32 once into an L1 buffer; every query
// row of the block (tokens x GQA group) takes its 16 dot products against it (keys in registers,
// one transposed horizontal sum); the online softmax runs in base 2 on vectors of 16 scores; V rows
// are converted once and accumulated into every row's output. K/V bytes leave memory once per step.

using vec = typename V::vec;
inline constexpr int L = V::lanes;

/// 2^x, vectorized: 2^round(x) from the exponent bits times a degree-6 Taylor polynomial of
/// e^(f ln 2) on f in [-0.5, 0.5]. Max relative error 2.5e-7 (tested); x < -126 gives exactly 0.
KVATTN_ALWAYS_INLINE KVATTN_TARGET vec exp2v(vec x) {
  const vec xc = V::min(V::max(x, V::set1(-126.f)), V::set1(127.f));
  const vec n = V::round(xc);
  const vec f = V::sub(xc, n);
  vec p = V::set1(1.5403530393381606e-4f);  // ln2^6 / 720
  p = V::fma(p, f, V::set1(1.3333558146428443e-3f));  // ln2^5 / 120
  p = V::fma(p, f, V::set1(9.6181291076284772e-3f));  // ln2^4 / 24
  p = V::fma(p, f, V::set1(5.5504108664821580e-2f));  // ln2^3 / 6
  p = V::fma(p, f, V::set1(2.4022650695910071e-1f));  // ln2^2 / 2
  p = V::fma(p, f, V::set1(6.9314718055994531e-1f));  // ln2
  p = V::fma(p, f, V::set1(1.f));
  return V::select_less(x, V::set1(-126.f), V::zero(), V::mul(p, V::pow2i(n)));
}

/// Converts n K (or V) rows of the tile's KV head, starting at key k0, to f32 rows dp floats apart.
template <kv_dtype Dtype>
KVATTN_TARGET void load_rows(const AttendTile& t, std::int64_t k0, int n, bool values, float* dst, std::int64_t dp) {
  using T = typename storage<Dtype>::type;
  const int d = t.slot->head_dim;
  KvRowCursor rows(*t.slot, t.seq, t.kv_head, k0, values);
  for (int j = 0; j < n; ++j, rows.next()) V::convert(reinterpret_cast<const T*>(rows.row()), dst + j * dp, d);
}

/// Asks for the K and V rows [k0, k0 + n) of the tile's KV head, so the next tile's memory latency
/// overlaps this tile's arithmetic (the hardware prefetcher alone stalls at every tile start).
KVATTN_ALWAYS_INLINE void prefetch_rows(const AttendTile& t, std::int64_t k0, int n) {
  const std::int64_t bytes = t.slot->row_bytes;
  KvRowCursor k(*t.slot, t.seq, t.kv_head, k0, false), v(*t.slot, t.seq, t.kv_head, k0, true);
  for (int j = 0; j < n; ++j, k.next(), v.next())
    for (std::int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(k.row() + b, 0, 2);
      __builtin_prefetch(v.row() + b, 0, 2);
    }
}

/// s[j] = q . k_j for the key_tile_simd keys of the tile, L keys per register block.
template <int SD>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void qk_tile(const float* q, const float* kb, int dp_runtime, float* s) {
  const int dp = SD != dynamic ? SD : dp_runtime;
  for (int jb = 0; jb < key_tile_simd; jb += L) {
    vec acc[L];  // one accumulator per key: must live in registers, hence the unroll pragmas
    KVATTN_UNROLL(16)
    for (int j = 0; j < L; ++j) acc[j] = V::zero();
    for (int c = 0; c < dp; c += L) {
      const vec qv = V::load(q + c);
      KVATTN_UNROLL(16)
      for (int j = 0; j < L; ++j) acc[j] = V::fma(qv, V::load(kb + (jb + j) * dp + c), acc[j]);
    }
    V::hsum(acc, s + jb);
  }
}

/// o[0 .. NV*L) = o * alpha + sum_{j < n} p[j] v_j[0 .. NV*L): NV independent register accumulators.
template <int NV>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void pv_pass(float* o, const float* p, vec alpha, const float* vb, int dp, int n) {
  vec acc[NV];
  KVATTN_UNROLL(16)
  for (int k = 0; k < NV; ++k) acc[k] = V::mul(V::load(o + k * L), alpha);
  for (int j = 0; j < n; ++j) {
    const vec pj = V::set1(p[j]);
    KVATTN_UNROLL(16)
    for (int k = 0; k < NV; ++k) acc[k] = V::fma(pj, V::load(vb + j * dp + k * L), acc[k]);
  }
  KVATTN_UNROLL(16)
  for (int k = 0; k < NV; ++k) V::store(o + k * L, acc[k]);
}

/// Runtime-width pass: picks pv_pass<nv> for nv in [1, V::pv_regs).
template <int... NV>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void pv_pass_n(std::integer_sequence<int, NV...>, int nv, float* o, const float* p,
                                                   vec alpha, const float* vb, int dp, int n) {
  ((nv == NV + 1 ? pv_pass<NV + 1>(o, p, alpha, vb, dp, n) : void()), ...);
}

/// o = o * alpha + sum_{j < n} p[j] v_j over a whole row, in passes of up to V::pv_regs vectors.
template <int SD>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void pv_row(float* o, const float* p, float alpha, const float* vb, int dp, int n) {
  constexpr int R = V::pv_regs;
  const vec a = V::set1(alpha);
  if constexpr (SD != dynamic) {
    constexpr int nv = SD / L;
    for (int k = 0; k + R <= nv; k += R) pv_pass<R>(o + k * L, p, a, vb + k * L, SD, n);
    if constexpr (nv % R != 0) pv_pass<nv % R>(o + nv / R * R * L, p, a, vb + nv / R * R * L, SD, n);
  } else {
    const int nv = dp / L;
    int k = 0;
    for (; k + R <= nv; k += R) pv_pass<R>(o + k * L, p, a, vb + k * L, dp, n);
    if (k < nv) pv_pass_n(std::make_integer_sequence<int, R - 1>{}, nv - k, o + k * L, p, a, vb + k * L, dp, n);
  }
}

/// The tile kernel (kernels::TileKernel::run). StaticGroup / StaticDim: compile-time shape or `dynamic`.
template <int StaticGroup, int StaticDim>
KVATTN_TARGET void attend_tile(const AttendTile& t, float* scratch) {
  constexpr int KT = key_tile_simd;
  constexpr int SD = StaticDim == dynamic ? dynamic : (StaticDim + L - 1) / L * L;
  const int group = StaticGroup != dynamic ? StaticGroup : t.group;
  const int d = StaticDim != dynamic ? StaticDim : t.slot->head_dim;
  const int dp = SD != dynamic ? SD : (d + L - 1) / L * L;  // rows padded to whole vectors with zeros
  const int rows = t.n_tokens * group;
  constexpr float log2e = 1.44269504088896340736f, ln2 = 0.69314718055994530942f;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();

  float* qs = scratch;           // rows x dp: q * scale * log2(e), so the softmax runs in base 2
  float* o = qs + rows * dp;     // rows x dp: unnormalized outputs
  float* kb = o + rows * dp;     // KT x dp
  float* vb = kb + KT * dp;      // KT x dp
  float* p = vb + KT * dp;       // rows x KT: probabilities of the current tile
  float* alpha = p + rows * KT;  // rows: rescale of the current tile

  const float qscale = t.scale * log2e;
  for (int i = 0; i < t.n_tokens; ++i)
    for (int g = 0; g < group; ++g) {
      const float* src = t.q + i * t.q_stride + std::int64_t{g} * d;
      float* dst = qs + (i * group + g) * dp;
      for (int c = 0; c < d; ++c) dst[c] = src[c] * qscale;
      for (int c = d; c < dp; ++c) dst[c] = 0.f;
    }
  std::fill_n(o, rows * dp, 0.f);
  std::fill_n(kb, 2 * KT * dp, 0.f);  // padding columns stay zero; unused rows stay finite
  for (int r = 0; r < rows; ++r) t.states[r] = SoftmaxState{};  // max held in base 2 until the end

  const std::int64_t last_visible = t.visible_end0 + (t.n_tokens - 1) * t.visible_step;
  const std::int64_t key_end = std::min(t.key_end, last_visible);
  alignas(64) float s[KT];
  for (std::int64_t k0 = t.key_begin; k0 < key_end; k0 += KT) {
    const int n = static_cast<int>(std::min<std::int64_t>(KT, key_end - k0));
    constexpr int ahead = 4 * KT;
    if (k0 + ahead < key_end) prefetch_rows(t, k0 + ahead, static_cast<int>(std::min<std::int64_t>(KT, key_end - k0 - ahead)));
    t.load(t, k0, n, false, kb, dp);
    bool any = false;
    for (int r = 0; r < rows; ++r) {
      const std::int64_t visible = t.visible_end0 + (r / group) * t.visible_step;
      const int limit = static_cast<int>(std::clamp<std::int64_t>(visible - k0, 0, n));
      if (limit == 0) {
        alpha[r] = 1.f;
        continue;
      }
      any = true;
      qk_tile<SD>(qs + r * dp, kb, dp, s);
      for (int j = limit; j < KT; ++j) s[j] = neg_inf;
      vec m = V::load(s);
      for (int j = L; j < KT; j += L) m = V::max(m, V::load(s + j));
      SoftmaxState& st = t.states[r];
      const float m_new = std::fmax(st.max, V::reduce_max(m));
      const float a = m_new == st.max ? 1.f : std::exp2(st.max - m_new);
      const vec mv = V::set1(m_new);
      vec sum = V::zero();
      for (int j = 0; j < KT; j += L) {
        const vec e = exp2v(V::sub(V::load(s + j), mv));
        V::store(p + r * KT + j, e);
        sum = V::add(sum, e);
      }
      st.sum = st.sum * a + V::reduce_add(sum);
      st.max = m_new;
      alpha[r] = a;
    }
    if (!any) continue;
    t.load(t, k0, n, true, vb, dp);
    for (int r = 0; r < rows; ++r) {
      const std::int64_t visible = t.visible_end0 + (r / group) * t.visible_step;
      const int limit = static_cast<int>(std::clamp<std::int64_t>(visible - k0, 0, n));
      if (limit > 0) pv_row<SD>(o + r * dp, p + r * KT, alpha[r], vb, dp, limit);
    }
  }
  for (int r = 0; r < rows; ++r) {
    SoftmaxState& st = t.states[r];
    if (!st.empty()) st.max *= ln2;  // back to natural-log units, as SoftmaxState::merge expects
    std::copy_n(o + r * dp, d, t.acc + std::int64_t{r} * d);
  }
}

/// Sums n floats with several independent accumulators: a streaming read as fast as this path
/// reads memory. Benchmarks use it as the bandwidth floor.
KVATTN_TARGET inline float stream_sum(const float* x, std::int64_t n) {
  vec a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  std::int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 = V::add(a0, V::load(x + i));
    a1 = V::add(a1, V::load(x + i + L));
    a2 = V::add(a2, V::load(x + i + 2 * L));
    a3 = V::add(a3, V::load(x + i + 3 * L));
  }
  float r = V::reduce_add(V::add(V::add(a0, a1), V::add(a2, a3)));
  for (; i < n; ++i) r += x[i];
  return r;
}

/// Runs `iterations` x 16 independent register-resident FMA chains of one vector each and returns
/// a value depending on all of them. FLOPs = iterations x 16 x 2 x lanes: the peak FMA rate.
KVATTN_TARGET inline float fma_peak_loop(std::int64_t iterations, float seed) {
  vec acc[16];
  KVATTN_UNROLL(16)
  for (int k = 0; k < 16; ++k) acc[k] = V::set1(seed + static_cast<float>(k));
  const vec m = V::set1(0.999999f), b = V::set1(1e-7f);
  for (std::int64_t i = 0; i < iterations; ++i) {
    KVATTN_UNROLL(16)
    for (int k = 0; k < 16; ++k) acc[k] = V::fma(acc[k], m, b);
  }
  vec r = V::zero();
  for (int k = 0; k < 16; ++k) r = V::add(r, acc[k]);
  return V::reduce_add(r);
}

/// y[i] = 2^x[i] with exp2v (whole vectors; the tail through std::exp2). For tests of its error.
KVATTN_TARGET inline void exp2_array(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + L <= n; i += L) V::store(y + i, exp2v(V::load(x + i)));
  for (; i < n; ++i) y[i] = std::exp2(x[i]);
}
