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

/// 2^x, vectorized: 2^round(x) (V::ldexp) times a degree-6 Taylor polynomial of
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
  return V::select_less(x, V::set1(-126.f), V::zero(), V::ldexp(p, n));
}

/// V::load_once(p) if Once, else V::load(p), which the compiler may fold into the instructions
/// that use it (once per use): for loops whose best choice differs by path.
template <bool Once>
KVATTN_ALWAYS_INLINE KVATTN_TARGET vec load_kept_if(const float* p) {
  if constexpr (Once) return V::load_once(p);
  else return V::load(p);
}

/// The TileLoader of a storage type: f32 rows of whole vectors are read where they are stored (a
/// copy only adds loads and stores: MQA 32/1 d=128 T=4096 f32 decode, 2 threads, medians of 5
/// interleaved runs, 297 -> 269 us), other rows are converted into `buffer`.
template <kv_dtype Dtype>
KVATTN_TARGET void load_rows(const AttendTile& t, std::int64_t k0, int n, bool values, float* buffer, std::int64_t dp,
                             const float** rows) {
  using T = typename storage<Dtype>::type;
  const int d = t.slot->head_dim;
  KvRowCursor cursor(*t.slot, t.seq, t.kv_head, k0, values);
  if constexpr (Dtype == kv_dtype::f32) {
    if (d == dp) return cursor.take(n, rows);
  }
  for (int j = 0; j < n; ++j, cursor.next()) {
    V::convert(reinterpret_cast<const T*>(cursor.row()), buffer + j * dp, d);
    rows[j] = buffer + j * dp;
  }
}

/// rows[j] moved by `bytes` (a K row to its V row: both sit at the same place of their block part).
template <class T>
KVATTN_ALWAYS_INLINE const T* byte_offset(const T* row, std::ptrdiff_t bytes) {
  return reinterpret_cast<const T*>(reinterpret_cast<const char*>(row) + bytes);
}

/// Asks for the cache line at p, into L1 and every level below (hint T0; PLDL1KEEP on aarch64): the
/// bandwidth probes' L1 read (read_prefetch::l1), and until 2026-12-03 the direct kernel's. On an
/// AMD EPYC family 26 (Zen 5), decode with T1 against T0 (scripts/ab-decode, d=128, 2 threads, f16,
/// median b/a of 5 runs) took 1.079x as long for GQA 32/8 at T=4096 (runs 1.00-1.29), 1.023x at
/// T=2048 and 0.985x for MHA 32/32 at T=4096 (runs 0.90-1.01), and 1.028x for MHA f32. On the Xeon
/// model 207 T0 and T1 ran alike, and NTA three times slower.
KVATTN_ALWAYS_INLINE void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 3); }

/// Asks for the cache line at p into L2 and below (hint T1; PLDL2KEEP on aarch64): the direct
/// kernel's prefetch of its rows ahead, and the probes' L2 read (read_prefetch::l2). T1 rather than
/// T0 since a Zen 4 (AMD EPYC family 25 model 17): decode with T1 against T0 (scripts/ab-decode,
/// d=128, 2 threads, median b/a) took, for f32, 0.790x the time for MHA 32/32 T=4096 (5 runs,
/// 0.78-0.82), 0.909x for GQA 32/8 T=32768 (3 runs), 0.932x for T=1024 B=16 (5 runs), 0.909-0.959x
/// for T=4096; for 16-bit rows, MHA f16 0.903x, GQA T=1024 B=16 f16 0.837x, T=32768 bf16 0.883x (3
/// runs each) and GQA T=4096 f16 1.015x (3 runs). That gain outweighs the Zen 5's losses above.
KVATTN_ALWAYS_INLINE void prefetch_row_line(const void* p) { __builtin_prefetch(p, 0, 2); }

/// How far ahead of its read the probes' L1 read asks for lines (prefetch_line), as the direct
/// kernel did until 2026-12-03. On the Zen 5, with T0, f32 d=128 rows in 16-key tiles asked 4 KiB
/// ahead rather than a whole tile (8 KiB) took (scripts/ab-decode, 2 threads, median b/a) 0.913x the
/// time for MHA 32/32 T=4096 (5 runs, 0.89-0.97), 0.937x for GQA 32/8 T=32768 (3 runs, 0.91-0.94),
/// 0.955x for B=16 T=1024 (5 runs, 0.92-0.96), 0.996x for T=4096 (7 runs, 0.97-1.01); 16-bit rows
/// asked 2 KiB ahead lost (MHA f16 1.134x, GQA 1.059x), and 8 KiB ahead lost too (MHA f16 1.217x,
/// GQA 1.049x).
inline constexpr int prefetch_ahead_bytes = 4096;

/// How far ahead the direct kernel asks for the rows past each one it reads (prefetch_row_line,
/// at most a tile: a whole tile of f32 d=128 rows, of 16-bit rows up to d=128), and the probes' L2
/// read for its lines. On the Zen 4, with T1, f32 d=128 rows 8 KiB against 4 KiB ahead took 0.877x
/// the time for GQA 32/8 T=4096 (scripts/ab-decode, 2 threads, median b/a of 5 runs), 0.874x for
/// T=1024 B=16 and 0.992x for MHA 32/32 T=4096 (3 runs each); with T0 the same change had taken
/// 1.044x (B=16) and 0.978x (MHA). (16-bit rows of d=256: not measured.)
inline constexpr int prefetch_ahead_bytes_l2 = 8192;

/// Asks for 64-byte lines of the rows rows[0 ..), `offset` bytes past each row, to be brought into
/// the caches (prefetch_row_line), so that the memory latency of the direct kernel's next tile overlaps
/// this tile's arithmetic. Lines are numbered in address order, row after row (line g is line g %
/// row_lines of row g / row_lines), so the caller's loop asks for the tile front to back whatever
/// order it computes in: asking for the same lines column-wise (the lines of the current P·V pass in
/// every row, or one line of each of a block's rows per dot-product step) made the stream from L3
/// slower (Xeon model 207, GQA 32/8 d=128 T=4096, 2 threads, medians of 11 interleaved runs: bf16
/// 442 -> 409 us, f16 466 -> 431 us; groups of 8, f16, medians of 5: 363 -> 322 us).
/// RowLines is row_lines when the head dim is a compile-time constant: a line's row is then a
/// division by a constant. Otherwise (`dynamic`) a cursor walks the lines, since a run-time division
/// per line cost more than the order gains (GQA 32/8 d=112 f16: 417 -> 476 us); the caller then asks
/// for consecutive ranges, from `first` on. A walking cursor for constant dims cost as much (d=128
/// f16: 416 -> 441 us): its wrap-around branches and range checks.
template <int RowLines, class T>
class TileLinePrefetcher {
 public:
  TileLinePrefetcher(const T* const* rows, std::ptrdiff_t offset, int row_lines, int first)
      : rows_(rows), offset_(offset), row_lines_(row_lines) {
    if constexpr (RowLines == dynamic) row_ = first / row_lines, line_ = first % row_lines;
  }
  /// Lines g0 .. g1.
  KVATTN_ALWAYS_INLINE void lines(int g0, int g1) {
    if constexpr (RowLines != dynamic) {
      // Line numbers are never negative. GCC infers it (its code is the same with this line);
      // Clang 14 did not, and its code for the signed divisions' rounding spilled the P·V
      // accumulators: GQA 4/1 d=128, one thread, 512 keys in L2, medians of 4000 calls, 0.77x
      // the time with this for f16 and bf16, 0.69x for f32 (then 0.94x GCC's time, f32 0.85x).
      if (g0 < 0) __builtin_unreachable();
      for (int g = g0; g < g1; ++g) fetch(g / RowLines, g % RowLines);
    } else {
      for (int g = g0; g < g1; ++g) {
        fetch(row_, line_);
        if (++line_ == row_lines_) line_ = 0, ++row_;
      }
    }
  }

 private:
  KVATTN_ALWAYS_INLINE void fetch(int row, int line) const {
    prefetch_row_line(reinterpret_cast<const char*>(byte_offset(rows_[row], offset_)) + line * 64);
  }
  const T* const* rows_;
  std::ptrdiff_t offset_;
  int row_lines_, row_ = 0, line_ = 0;
};

/// TileLinePrefetcher's RowLines for head dim SD (or `dynamic`) and storage type T.
template <int SD, class T>
inline constexpr int static_row_lines = SD != dynamic ? (SD * static_cast<int>(sizeof(T)) + 63) / 64 : dynamic;

/// s[j] = q . k_j for the key_tile_simd keys of the tile (rows kr), L keys per register block.
template <int SD>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void qk_tile(const float* q, const float* const* kr, int dp_runtime, float* s) {
  const int dp = SD != dynamic ? SD : dp_runtime;
  for (int jb = 0; jb < key_tile_simd; jb += L) {
    vec acc[L];  // one accumulator per key: must live in registers, hence the unroll pragmas
    KVATTN_UNROLL(16)
    for (int j = 0; j < L; ++j) acc[j] = V::zero();
    for (int c = 0; c < dp; c += L) {
      const vec qv = V::load(q + c);
      KVATTN_UNROLL(16)
      for (int j = 0; j < L; ++j) acc[j] = V::fma(qv, V::load(kr[jb + j] + c), acc[j]);
    }
    V::hsum(acc, s + jb);
  }
}

/// sT[j * rp + r] = q_r . k_j for the rows rb .. rb + L (Two: rb .. rb + 2L) and the tile's keys
/// (rows kr; lanes over query rows: no horizontal sums). qt is the transposed query block [dp][rp];
/// row vectors x V::qkt_keys keys of accumulators at a time (2 x qkt_keys for a lone row vector
/// with 16 registers).
template <bool Two>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void qk_rows_block(const float* qt, int rp, int rb, const float* const* kr, int dp, float* sT) {
  // A lone row vector with 16 registers (AVX2's 8-row blocks) takes twice the keys: more
  // independent FMA chains (see attend_tile).
  constexpr int KB = Two || V::registers >= 32 ? V::qkt_keys : 2 * V::qkt_keys;
  for (int jb = 0; jb < key_tile_simd; jb += KB) {
    vec a0[KB], a1[KB];
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; ++j) a0[j] = a1[j] = V::zero();
    for (int c = 0; c < dp; ++c) {
      const vec q0 = V::load(qt + c * rp + rb);
      const vec q1 = Two ? V::load(qt + c * rp + rb + L) : V::zero();
      KVATTN_UNROLL(16)
      for (int j = 0; j < KB; ++j) {
        const vec kj = V::set1(kr[jb + j][c]);
        a0[j] = V::fma(q0, kj, a0[j]);
        if constexpr (Two) a1[j] = V::fma(q1, kj, a1[j]);
      }
    }
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; ++j) {
      V::store(sT + (jb + j) * rp + rb, a0[j]);
      if constexpr (Two) V::store(sT + (jb + j) * rp + rb + L, a1[j]);
    }
  }
}

/// qk_rows_block over all rows r < rp: two row vectors at a time, the last one alone if rp is odd
/// in vectors. (With a run-time flag for the second vector the compiler issued its FMAs on zeros:
/// MQA 48/1 d=128 decode, one thread, 1024 keys in L2: f16 216 -> 189 us, f32 200 -> 178 us.)
template <int SD>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void qk_rows(const float* qt, int rp, const float* const* kr, int dp_runtime, float* sT) {
  const int dp = SD != dynamic ? SD : dp_runtime;
  int rb = 0;
  for (; rb + 2 * L <= rp; rb += 2 * L) qk_rows_block<true>(qt, rp, rb, kr, dp, sT);
  if (rb < rp) qk_rows_block<false>(qt, rp, rb, kr, dp, sT);
}

/// acc[r][k] = o[r * stride + k * L] * alpha[r * alpha_step]: the R x NV output accumulators of a
/// P·V pass, rescaled for the tile's new running max.
template <int R, int NV>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void load_scaled(vec (&acc)[R][NV], const float* o, int stride, const float* alpha, int alpha_step) {
  KVATTN_UNROLL(16)
  for (int r = 0; r < R; ++r) {
    const vec a = V::set1(alpha[r * alpha_step]);
    KVATTN_UNROLL(16)
    for (int k = 0; k < NV; ++k) acc[r][k] = V::mul(V::load(o + r * stride + k * L), a);
  }
}

/// o[r * stride + k * L] = acc[r][k].
template <int R, int NV>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void store_rows(const vec (&acc)[R][NV], float* o, int stride) {
  KVATTN_UNROLL(16)
  for (int r = 0; r < R; ++r) {
    KVATTN_UNROLL(16)
    for (int k = 0; k < NV; ++k) V::store(o + r * stride + k * L, acc[r][k]);
  }
}

/// Rows of the buffered kernel's P·V that share each loaded V vector: 4 x 4 accumulators where
/// there are 32 vector registers, 2 x 4 with 16 (AVX2), so no accumulator spills.
inline constexpr int pv_block_rows = V::registers >= 32 ? 4 : 2;

/// For the RB rows r of a block and the NV vectors from dim c0 on (V rows vr[j] + c0):
/// o_r[c0 ..] = o_r * alpha[r] + sum_{j < n} p[r * prs + j * pks] v_j[c0 ..]. Each V vector is
/// loaded once for all RB rows (one row at a time reloads V once per row: load-bound); with 16
/// registers (AVX2) through load_once, since GCC folded the load into every row's FMA there, RB
/// loads per vector (AMD EPYC family 23, Zen 1, MQA 32/1 d=128, scripts/ab-decode, median b/a of 3
/// runs: one thread, 512 keys in L2, bf16 0.920, f32 0.907; T=4096, 2 threads, bf16 0.927, f32
/// 0.930). With 32 registers GCC loaded once by itself (AVX-512); those paths keep plain loads.
template <int RB, int NV>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void pv_block(float* o, int dp, const float* p, int prs, int pks, const float* alpha,
                                                 const float* const* vr, int c0, int n) {
  vec acc[RB][NV];
  load_scaled(acc, o, dp, alpha, 1);
  for (int j = 0; j < n; ++j) {
    vec pj[RB];
    KVATTN_UNROLL(4)
    for (int r = 0; r < RB; ++r) pj[r] = V::set1(p[r * prs + j * pks]);
    KVATTN_UNROLL(4)
    for (int k = 0; k < NV; ++k) {
      const vec v = load_kept_if<(RB > 1 && V::registers < 32)>(vr[j] + c0 + k * L);
      KVATTN_UNROLL(4)
      for (int r = 0; r < RB; ++r) acc[r][k] = V::fma(pj[r], v, acc[r][k]);
    }
  }
  store_rows(acc, o, dp);
}

/// pv_block over whole rows (dp floats): passes of 4 vectors, then single vectors.
template <int RB, int SD>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void pv_rows(float* o, int dp_runtime, const float* p, int prs, int pks, const float* alpha,
                                                const float* const* vr, int n) {
  if constexpr (SD != dynamic) {
    constexpr int nv = SD / L;
    for (int k = 0; k + 4 <= nv; k += 4) pv_block<RB, 4>(o + k * L, SD, p, prs, pks, alpha, vr, k * L, n);
    if constexpr (nv % 4 != 0) pv_block<RB, nv % 4>(o + nv / 4 * 4 * L, SD, p, prs, pks, alpha, vr, nv / 4 * 4 * L, n);
  } else {
    const int nv = dp_runtime / L;
    int k = 0;
    for (; k + 4 <= nv; k += 4) pv_block<RB, 4>(o + k * L, dp_runtime, p, prs, pks, alpha, vr, k * L, n);
    for (; k < nv; ++k) pv_block<RB, 1>(o + k * L, dp_runtime, p, prs, pks, alpha, vr, k * L, n);
  }
}

/// One row's online-softmax step over a tile: masks scores s[limit..KT) to -inf, updates the running
/// max m and sum l (base 2), writes exp2(s - max) to p (may equal s) and returns the rescale of the
/// row's earlier output. limit must be >= 1.
KVATTN_ALWAYS_INLINE KVATTN_TARGET float softmax_row(float* s, int limit, float* p, float& m, float& l) {
  for (int j = limit; j < key_tile_simd; ++j) s[j] = -std::numeric_limits<float>::infinity();
  vec mv = V::load(s);
  for (int j = L; j < key_tile_simd; j += L) mv = V::max(mv, V::load(s + j));
  const float m_new = std::fmax(m, V::reduce_max(mv));
  const float alpha = m_new == m ? 1.f : std::exp2(m - m_new);
  const vec mb = V::set1(m_new);
  vec sum = V::zero();
  for (int j = 0; j < key_tile_simd; j += L) {
    const vec e = exp2v(V::sub(V::load(s + j), mb));
    V::store(p + j, e);
    sum = V::add(sum, e);
  }
  l = l * alpha + V::reduce_add(sum);
  m = m_new;
  return alpha;
}

/// Hands the rows' softmax states to the caller in natural-log units (as SoftmaxState::merge
/// expects; a row that saw nothing stays empty).
KVATTN_ALWAYS_INLINE void finish_states(SoftmaxState* states, int rows, const float* m, const float* l) {
  constexpr float ln2 = 0.69314718055994530942f;
  for (int r = 0; r < rows; ++r) {
    states[r].sum = l[r];
    states[r].max = l[r] > 0.f ? m[r] * ln2 : -std::numeric_limits<float>::infinity();
  }
}

/// Hands the rows' results to the caller: states (finish_states) and unnormalized outputs, o_stride
/// floats apart.
KVATTN_ALWAYS_INLINE void finish_rows(const AttendTile& t, int rows, const float* m, const float* l, const float* o,
                                      int o_stride, int d) {
  finish_states(t.states, rows, m, l);
  for (int r = 0; r < rows; ++r) std::copy_n(o + std::int64_t{r} * o_stride, d, t.acc + std::int64_t{r} * d);
}

/// The tile kernel (kernels::TileKernel::run). StaticGroup / StaticDim: compile-time shape or `dynamic`.
/// Few query rows (decode with a small group): each row takes its dot products with the keys in
/// lanes and one transposed horizontal sum. Many rows (MQA, large groups, prefill): lanes run over
/// rows instead, so the scores of 16 rows come out of plain FMAs and the softmax is vectorized
/// across rows. Both keep the online-softmax state in base 2 (queries are pre-scaled by log2 e).
/// "Many" is two vectors of rows, or one with 16 registers (AVX2): there the per-row dot products
/// load a whole K vector per FMA where lanes over rows broadcast one float, and need transposed
/// sums and a row-by-row softmax. On an AMD EPYC family 23 (Zen 1), GQA 8/1 d=128, one thread, 512 keys
/// in L2 (scripts/ab-decode, median b/a of 3 runs), lanes over rows took 0.918x the time for bf16,
/// 0.900x for f32, 0.917x for f16, and with 8 keys per block for a lone row vector (qk_rows_block)
/// 0.983 / 0.968 / 0.975x of that; both together, GQA 32/4 T=4096 on 2 threads: 0.943 / 0.950 /
/// 0.914x (bf16 / f32 / f16).
template <int StaticGroup, int StaticDim>
__attribute__((noinline)) KVATTN_TARGET void attend_tile(const AttendTile& t, float* scratch) {
  if (t.chunk_keys > 0) return for_each_chunk(t, [&](const AttendTile& c) { attend_tile<StaticGroup, StaticDim>(c, scratch); });
  constexpr int KT = key_tile_simd;
  constexpr int SD = StaticDim == dynamic ? dynamic : (StaticDim + L - 1) / L * L;
  const int group = StaticGroup != dynamic ? StaticGroup : t.group;
  const int d = StaticDim != dynamic ? StaticDim : t.slot->head_dim;
  const int dp = SD != dynamic ? SD : (d + L - 1) / L * L;  // rows padded to whole vectors with zeros
  const int rows = t.n_tokens * group;
  const int rp = (rows + L - 1) / L * L;
  const bool by_rows = rows >= (V::registers >= 32 ? 2 * L : L);
  constexpr float log2e = 1.44269504088896340736f;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();

  float* qs = scratch;           // rows x dp, or transposed dp x rp: q * scale * log2(e)
  float* o = qs + rp * dp;       // rows x dp: unnormalized outputs
  float* kb = o + rows * dp;     // KT x dp
  float* vb = kb + KT * dp;      // KT x dp
  float* p = vb + KT * dp;       // probabilities of the current tile: rows x KT, or KT x rp
  float* alpha = p + KT * rp;    // rp: rescale of the current tile
  float* mrow = alpha + rp;      // rp: running max (base 2)
  float* lrow = mrow + rp;       // rp: running sum
  float* lim = lrow + rp;        // rp: keys of the tile each row sees

  const float qscale = t.scale * log2e;
  for (int i = 0; i < t.n_tokens; ++i)
    for (int g = 0; g < group; ++g) {
      const int r = i * group + g;
      const float* src = t.q + i * t.q_stride + std::int64_t{g} * d;
      if (by_rows)
        for (int c = 0; c < d; ++c) qs[c * rp + r] = src[c] * qscale;
      else
        for (int c = 0; c < d; ++c) qs[r * dp + c] = src[c] * qscale;
    }
  if (by_rows) {  // zero padding: rows beyond `rows`, dims beyond d
    for (int c = 0; c < dp; ++c)
      for (int r = (c < d ? rows : 0); r < rp; ++r) qs[c * rp + r] = 0.f;
  } else {
    for (int r = 0; r < rows; ++r)
      for (int c = d; c < dp; ++c) qs[r * dp + c] = 0.f;
  }
  std::fill_n(o, rows * dp, 0.f);
  for (int j = 0; j < 2 * KT; ++j)
    for (int c = d; c < dp; ++c) kb[j * dp + c] = 0.f;  // padding columns stay zero
  std::fill_n(mrow, rp, neg_inf);
  std::fill_n(lrow, rp, 0.f);
  std::fill_n(lim, rp, 0.f);

  const std::int64_t key_end = t.keys_end();
  const float* kr[KT];  // the tile's K rows as f32, dp floats each; past its keys, a valid row again
  const float* vr[KT];  // its V rows
  for (std::int64_t k0 = t.key_begin; k0 < key_end; k0 += KT) {
    const int n = static_cast<int>(std::min<std::int64_t>(KT, key_end - k0));
    t.load(t, k0, n, false, kb, dp, kr);
    std::fill(kr + n, kr + KT, kr[n - 1]);
    // Keys of this tile row r sees; rows of one token share it. Row 0 sees the fewest.
    for (int i = 0; i < t.n_tokens; ++i) std::fill_n(lim + i * group, group, static_cast<float>(t.visible_keys(i, k0, n)));
    const bool full = lim[0] == static_cast<float>(KT);
    if (by_rows) {
      qk_rows<SD>(qs, rp, kr, dp, p);
      for (int rb = 0; rb < rp; rb += L) {
        const vec lv = V::load(lim + rb);
        vec mt = V::set1(neg_inf);
        for (int j = 0; j < KT; ++j) {
          vec sj = V::load(p + j * rp + rb);
          if (!full) {
            sj = V::select_less(V::set1(static_cast<float>(j)), lv, sj, V::set1(neg_inf));
            V::store(p + j * rp + rb, sj);
          }
          mt = V::max(mt, sj);
        }
        const vec m_old = V::load(mrow + rb);
        const vec m_new = V::max(m_old, mt);
        // A row with no key so far keeps max -inf: subtract 0 instead, so exp2 sees -inf, not NaN.
        const vec m_safe = V::select_less(m_new, V::set1(std::numeric_limits<float>::lowest()), V::zero(), m_new);
        const vec a = exp2v(V::sub(m_old, m_safe));
        vec sum = V::zero();
        for (int j = 0; j < KT; ++j) {
          const vec e = exp2v(V::sub(V::load(p + j * rp + rb), m_safe));
          V::store(p + j * rp + rb, e);
          sum = V::add(sum, e);
        }
        V::store(lrow + rb, V::add(V::mul(V::load(lrow + rb), a), sum));
        V::store(mrow + rb, m_new);
        V::store(alpha + rb, a);
      }
    } else {
      alignas(64) float s[KT];
      for (int r = 0; r < rows; ++r) {
        const int limit = static_cast<int>(lim[r]);
        if (limit == 0) {  // no key of this tile: probabilities 0, output unchanged
          std::fill_n(p + r * KT, KT, 0.f);
          alpha[r] = 1.f;
          continue;
        }
        qk_tile<SD>(qs + r * dp, kr, dp, s);
        alpha[r] = softmax_row(s, limit, p + r * KT, mrow[r], lrow[r]);
      }
    }
    if (lim[rows - 1] == 0.f) continue;  // the last row sees the most: no row saw a key
    t.load(t, k0, n, true, vb, dp, vr);
    // Rows in blocks sharing each V vector, over the keys they see. A block whose rows see
    // different keys (a causal chunk's diagonal) goes row by row: a masked key's probability is 0,
    // but 0 x a non-finite V is NaN, which must not reach rows that do not see it.
    constexpr int RB = pv_block_rows;
    const int prs = by_rows ? 1 : KT, pks = by_rows ? rp : 1;
    int r = 0;
    for (; r + RB <= rows; r += RB) {
      if (lim[r] == lim[r + RB - 1]) {
        pv_rows<RB, SD>(o + r * dp, dp, p + r * prs, prs, pks, alpha + r, vr, static_cast<int>(lim[r]));
      } else {
        for (int b = r; b < r + RB; ++b) pv_rows<1, SD>(o + b * dp, dp, p + b * prs, prs, pks, alpha + b, vr, static_cast<int>(lim[b]));
      }
    }
    for (; r < rows; ++r) pv_rows<1, SD>(o + r * dp, dp, p + r * prs, prs, pks, alpha + r, vr, static_cast<int>(lim[r]));
  }
  finish_rows(t, rows, mrow, lrow, o, dp, d);
}

/// Keys per tile of the direct kernel. Its per-tile costs (row pointers, the softmax's reductions,
/// reloading and rescaling the output accumulators) are spread over this many keys, and the tile
/// being read and the next one (asked for ahead by prefetch_row_line: into L2 since 2026-12-03,
/// into L1 when the sizes below were measured) should sit in L1 together with room to spare: the
/// tiles of one KV head's K and V rows lie a multiple of 4 KiB apart, so they share L1 sets (f32
/// d=128 at 32 keys: 16 lines per set of a 12-way L1 for the two tiles' K and V).
/// Fewer keys cost more per key while K/V sit in L2 and less as soon as they stream. Measured on an
/// AMD EPYC family 26 (Zen 5) with scripts/ab-decode (d=128, 2 threads, median b/a of 5 runs),
/// 32 -> 16 keys: f32 GQA 32/8 T=4096 0.908 (runs 0.85-0.97), MHA 32/32 T=4096 0.796 (0.78-0.80),
/// B=16 T=1024 0.876 (0.87-0.89); f16 GQA 32/8 T=4096 0.919 (0.90-1.02), MHA 0.906 (0.80-0.95),
/// T=32768 0.879 (0.86-0.90); bf16 GQA T=4096 0.956 (0.95-0.98), MHA 0.862 (0.84-0.87), B=16
/// T=1024 0.897 (0.89-0.95); GQA 4/1 f16 with K/V in L2, one thread: 1.086 (1.08-1.09). 8 keys
/// (rows >= 2) lost: GQA 32/8 T=4096 f16 1.161, in L2 1.299. Earlier, 64 -> 32 keys: MHA f16 0.927,
/// GQA T=32768 f16 0.919 (same machine); on a Zen 4 with K/V in L2, 91 cycles per key for 4 rows at
/// 64 keys, 97-128 at 32 and 16. Measured on AVX-512 only: on AVX2, forced on the same Zen 5, whose
/// direct kernel does twice the instructions per key, 16 keys with the 4 KiB prefetch distance and
/// q loaded once took 1.275x the time for GQA 32/8 T=4096 f32 (the distance alone 1.119x), 1.038x
/// for f16, 0.929x for MHA f16; so AVX2 and NEON (not measured: qemu only) keep 32 keys and their
/// prefetches the next tile.
inline constexpr int direct_key_tile = L >= 16 ? 16 : 32;

/// How many keys past each row the direct kernel's prefetches ask for, for rows of row_bytes:
/// prefetch_ahead_bytes_l2 of them, within one tile, on AVX-512; the next tile's on AVX2 and NEON
/// (see direct_key_tile).
inline int direct_prefetch_keys(int row_bytes) {
  return L >= 16 ? std::clamp(prefetch_ahead_bytes_l2 / row_bytes, 1, direct_key_tile) : direct_key_tile;
}

/// Reduces every aligned group of W lanes (max or sum); each lane gets its group's result.
template <int W, bool Max>
KVATTN_ALWAYS_INLINE KVATTN_TARGET vec group_reduce(vec x) {
  if constexpr (W > 1) {
    x = group_reduce<W / 2, Max>(x);
    const vec y = V::template swap_adjacent<W / 2>(x);
    x = Max ? V::max(x, y) : V::add(x, y);
  }
  return x;
}

/// dst = src * scale for a row of d floats (d a multiple of L), kept in the order load_stored2
/// delivers a split type's elements if Paired: within every whole block of 2L dims the even dims,
/// then the odd ones; a last partial block stays in order.
template <bool Paired>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void scale_row(const float* src, float scale, int d, float* dst) {
  const vec s = V::set1(scale);
  int c = 0;
  if constexpr (Paired)
    for (; c + 2 * L <= d; c += 2 * L) {
      vec e, o;
      V::deinterleave(src + c, e, o);
      V::store(dst + c, V::mul(e, s));
      V::store(dst + c + L, V::mul(o, s));
    }
  for (; c < d; c += L) V::store(dst + c, V::mul(V::load(src + c), s));
}

/// The inverse order of scale_row<true>: a row of d floats kept in load_stored2's order of a split
/// type back in dim order.
KVATTN_ALWAYS_INLINE KVATTN_TARGET void unpair_row(const float* src, int d, float* dst) {
  int c = 0;
  for (; c + 2 * L <= d; c += 2 * L) V::interleave(V::load(src + c), V::load(src + c + L), dst + c);
  for (; c < d; c += L) V::store(dst + c, V::load(src + c));
}

/// Whether the direct kernel for R rows takes a split type's rows (V::evens_odds) as their even and
/// odd elements. One row on AVX-512 widens them in order instead: the split saves a shift per two
/// FMAs that several rows share, and one row has none to share. Measured with scripts/ab-decode on
/// an AMD EPYC family 26, MHA 32/32 d=128 T=4096 bf16, 2 threads, split -> widened: AVX-512 0.929
/// and 0.912x the time (medians of two sets of 5 runs, every run 0.88-0.95), no change with K/V in
/// L2 (one row, 512 keys, one thread: 0.994x); AVX2 1.018x (3 runs, 1.00-1.02: within the noise).
/// On AVX2 one row keeps the split: its in-order widening is a shuffle-unit `vpmovzxwd` and a shift
/// per 8 values (Zen 1, Overlap bf16 at one FMA per vector: 0.30 of the FMA peak widened, 0.56
/// split); widened -> split there (scripts/ab-decode, median b/a): MHA 1/1 bf16, one thread, 512
/// keys 0.744 (5 runs), 2048 keys 0.774 (5); MHA 32/32 T=4096, 2 threads, 0.932 (3 runs).
template <int R, class T>
inline constexpr bool direct_pairs = V::template evens_odds<T> && (R > 1 || V::registers < 32);

/// Two vectors of stored elements from p: as even and odd elements (load_stored2) if Pairs, else
/// elements [0, L) and [L, 2L).
template <bool Pairs, class T>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void load_two(const T* p, vec& a, vec& b) {
  if constexpr (Pairs) {
    V::load_stored2(p, a, b);
  } else {
    a = V::load_stored(p), b = V::load_stored(p + L);
  }
}

/// acc[r * KB + j] = q_r . k_j for the R rows and the KB = L / R keys kr[0 .. KB), K vectors
/// converted in registers, each serving all rows. The same keys of the rows ahead (next_k: the keys
/// direct_prefetch_keys on) are prefetched a cache line at a time, spread evenly over the dims: a
/// burst up front stalls on the core's miss buffers (Zen 4, GQA d=128 f32, 2 threads, medians of 5
/// interleaved runs: T=32768 15.6 -> 10.9 ms, T=4096 1.36 -> 0.65 ms). Up to 4 rows take dims two
/// vectors at a time (load_two; q in the order it delivers, see scale_row), with the rows' q in
/// registers; so do 8 rows of a split type, the block's K vectors in registers and q from memory
/// (bf16: one shift or mask per 16 values instead of a widening and a shift; GQA 8/1 d=128, one
/// thread, 2048 keys in L2, minima of 9 interleaved runs, 80.6 -> 73.7 us; f16 and f32 gain
/// nothing: 81.3 -> 81.4 us, 35.8 -> 36.3 us), and so do 4 rows of a split type with 16 registers
/// (AVX2), q loaded once per row, where q in registers did not fit and GCC folded each q vector
/// into its FMAs, 18 loads per 16 FMAs (Zen 1, GQA 4/1 bf16, one thread, 512 keys in L2,
/// scripts/ab-decode, median b/a of 3 runs: 0.965; GQA 32/8 T=4096, 2 threads: 0.934 and 0.962;
/// T=1024 B=16: 0.967; the same for f16 took 1.032 in L2 and 1.068 at T=4096, f32 0.959 in L2 but
/// 1.031 at T=4096, so they keep q folded); other 8 and 16 rows one vector at a time, q from
/// memory; one row of a static head dim keys outer. (16 rows of 16-bit K on AVX-512 take
/// direct_qk_lanes instead.)
template <int R, int SD, class T>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_qk(const float* qs, int d_runtime, const T* const* kr, const T* const* next_k,
                                                  vec* acc) {
  constexpr int KB = L / R;
  constexpr bool pairs = direct_pairs<R, T>;
  constexpr int W = R <= 4 || (R <= 8 && pairs) ? 2 * L : L;  // dims per step
  const int d = SD != dynamic ? SD : d_runtime;
  const int row_lines = (d * static_cast<int>(sizeof(T)) + 63) / 64;  // constants for static d
  const int steps = (d + W - 1) / W;
  KVATTN_UNROLL(16)
  for (int a = 0; a < L; ++a) acc[a] = V::zero();
  if constexpr (R == 1 && SD != dynamic) {
    // One row: keys outer, so each K row is read front to back, with the next tile's K row of the
    // same key prefetched beside it (Zen 4, MHA d=128 T=4096 f16, 2 threads: 3.9-6.4 ms with dims
    // outer and the block's prefetches up front, 2.9-3.0 ms like this; best of 10, 3 interleaved runs).
    TileLinePrefetcher<static_row_lines<SD, T>, T> next_lines(next_k, 0, row_lines, 0);
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; ++j) {
      next_lines.lines(j * row_lines, (j + 1) * row_lines);
      KVATTN_UNROLL(16)
      for (int k = 0; k + 2 * L <= SD; k += 2 * L) {
        vec k0, k1;
        load_two<pairs>(kr[j] + k, k0, k1);
        acc[j] = V::fma_acc(V::load(qs + k + L), k1, V::fma_acc(V::load(qs + k), k0, acc[j]));
      }
      if constexpr (SD % (2 * L) != 0) acc[j] = V::fma(V::load(qs + SD - L), V::load_stored(kr[j] + SD - L), acc[j]);
    }
    return;
  }
  TileLinePrefetcher<static_row_lines<SD, T>, T> next_lines(next_k, 0, row_lines, 0);
  int c = 0;
  for (int i = 0; i < steps; ++i, c += W) {
    next_lines.lines(i * KB * row_lines / steps, (i + 1) * KB * row_lines / steps);
    if (W == L || c + L == d) {  // one vector of dims
      vec qv[R];
      KVATTN_UNROLL(16)
      for (int r = 0; r < R; ++r) qv[r] = V::load(qs + r * d + c);
      KVATTN_UNROLL(16)
      for (int j = 0; j < KB; ++j) {
        const vec kv = V::load_stored(kr[j] + c);
        KVATTN_UNROLL(16)
        for (int r = 0; r < R; ++r) acc[r * KB + j] = V::fma_acc(qv[r], kv, acc[r * KB + j]);
      }
    } else if constexpr (R <= 2 || (R <= 4 && (V::registers >= 32 || !pairs))) {
      // With 32 registers, load_once: with -march=native GCC hoisted all steps' q out of the key loop,
      // spilled them and folded each into its FMAs, 40 loads per 32 FMAs (GQA 4/1 f16 in L2, one
      // thread: 0.907x the time like this; GQA 32/8 T=4096 f16 0.927x, bf16 0.853x; default flags:
      // unchanged). With 16 (AVX2) the 2R q vectors do not fit beside the accumulators: folded loads
      // (load_once there: GQA 32/8 T=4096 1.03x for f16 and f32).
      vec q0[R], q1[R];
      KVATTN_UNROLL(4)
      for (int r = 0; r < R; ++r)
        q0[r] = load_kept_if<(V::registers >= 32)>(qs + r * d + c), q1[r] = load_kept_if<(V::registers >= 32)>(qs + r * d + c + L);
      KVATTN_UNROLL(16)
      for (int j = 0; j < KB; ++j) {
        vec k0, k1;
        load_two<pairs>(kr[j] + c, k0, k1);
        KVATTN_UNROLL(4)
        for (int r = 0; r < R; ++r) acc[r * KB + j] = V::fma_acc(q1[r], k1, V::fma_acc(q0[r], k0, acc[r * KB + j]));
      }
    } else {
      vec k0[KB], k1[KB];
      KVATTN_UNROLL(4)
      for (int j = 0; j < KB; ++j) load_two<pairs>(kr[j] + c, k0[j], k1[j]);
      KVATTN_UNROLL(16)
      for (int r = 0; r < R; ++r) {
        // (AVX-512, 8 rows: folded, as measured above; AVX2, 4 rows: loaded once)
        const vec q0 = load_kept_if<(V::registers < 32)>(qs + r * d + c), q1 = load_kept_if<(V::registers < 32)>(qs + r * d + c + L);
        KVATTN_UNROLL(4)
        for (int j = 0; j < KB; ++j) acc[r * KB + j] = V::fma_acc(q1, k1[j], V::fma_acc(q0, k0[j], acc[r * KB + j]));
      }
    }
  }
}

/// Score vectors of L rows (one key each: 16 rows on AVX-512) without horizontal sums: lane r of
/// score vector j is q_r . k_j, summed one dim at a time as ql[c] (q_r[c] in lane r) times k_j[c]
/// broadcast. The 16-bit K rows of 16 keys at a time are converted into kb first, and the same keys
/// of the rows ahead (next_k) are prefetched a part of a row at a time, spread over the dims as
/// direct_qk does. The transposed horizontal sums this replaces cost 45 shuffles and adds per key (GQA 32/2
/// d=128 decode, 2 threads, medians of 3 interleaved runs: T=4096 f16 321 -> 290 us, bf16 321 ->
/// 295 us; T=32768 f16 2.67 -> 2.46 ms). Not for f32 rows, broadcast where they are stored: 293 ->
/// 307 us. Not for 8 rows with pairs of keys interleaved for a 64-bit broadcast: one thread, 1024
/// keys in L2, f16 40.5 -> 41.9 us. All kt keys' scores are written (rows past a tile's end repeat
/// a valid row).
template <int SD, class T>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_qk_lanes(const float* ql, int d_runtime, const T* const* kr, const T* const* next_k,
                                                        int kt, float* kb, float* p) {
  constexpr int KB = 16;  // keys per block: independent FMA chains (8: T=4096 f16 296 -> 284 us)
  const int d = SD != dynamic ? SD : d_runtime;
  const int row_lines = (d * static_cast<int>(sizeof(T)) + 63) / 64;
  const int steps = d / L;
  for (int j0 = 0; j0 < kt; j0 += KB) {
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; ++j) V::convert(kr[j0 + j], kb + j * d, d);
    vec acc[KB];
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; ++j) acc[j] = V::zero();
    TileLinePrefetcher<static_row_lines<SD, T>, T> next_lines(next_k + j0, 0, row_lines, 0);
    for (int i = 0; i < steps; ++i) {
      next_lines.lines(i * KB * row_lines / steps, (i + 1) * KB * row_lines / steps);
      for (int c = i * L; c < (i + 1) * L; ++c) {
        const vec qv = V::load(ql + c * L);
        KVATTN_UNROLL(16)
        for (int j = 0; j < KB; ++j) acc[j] = V::fma(qv, V::set1(kb[j * d + c]), acc[j]);
      }
    }
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; ++j) V::store(p + (j0 + j) * L, acc[j]);
  }
}

/// Whether the direct kernel for R rows of storage type T takes its scores from direct_qk_lanes
/// (16 rows of 16-bit K on AVX-512) rather than from direct_qk and transposed horizontal sums.
template <int R, class T>
inline constexpr bool direct_lanes_qk = R == L && L >= 16 && !std::is_same_v<T, float>;

/// The direct kernel's scores of a tile of n keys (rows kr; next_k: the rows its prefetches ask
/// for) in score layout: R rows x KB = L / R keys per vector (lane r * KB + j), one transposed
/// horizontal sum each, or direct_qk_lanes' (kb: its buffer) if direct_lanes_qk.
template <int R, int SD, class T>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_scores(const float* qs, int d, const T* const* kr, const T* const* next_k, int n,
                                                      float* kb, float* s) {
  constexpr int KB = L / R;
  if constexpr (direct_lanes_qk<R, T>) {
    direct_qk_lanes<SD, T>(qs, d, kr, next_k, direct_key_tile, kb, s);
  } else {
    for (int b = 0; b < (n + KB - 1) / KB; ++b) {
      vec acc[L];
      direct_qk<R, SD, T>(qs, d, kr + b * KB, next_k + b * KB, acc);
      V::hsum(acc, s + b * L);
    }
  }
}

/// o[r][c0 .. c0 + NV*L) = o * alpha_r + sum_j p[r][j] v_j for the R rows, over nb score vectors of
/// keys: the probabilities are in the direct kernel's score layout (vector b, lane r * KB + j is row
/// r, key b * KB + j), the V rows (the K rows kr moved by v_bytes) are converted in registers and
/// each serves all R rows; an even NV takes them two vectors at a time (load_two's order). The
/// pass's share of the V rows ahead (K rows next_k moved by v_bytes), as many lines as it reads
/// of each row, is prefetched front to back over the pass's keys (the pass from line c of the rows
/// on asks for lines c x the tile's keys on, in TileLinePrefetcher's numbering; passes that share
/// a line split them). SD: the head dim if it is a compile-time constant (= d), else `dynamic`.
template <int R, int NV, int SD, class T>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_pv_pass(float* o, int d, const float* alpha, const float* p, const T* const* kr,
                                                       std::ptrdiff_t v_bytes, int c0, int nb, const T* const* next_k) {
  constexpr int KB = L / R;
  constexpr int pass_bytes = NV * L * static_cast<int>(sizeof(T));
  constexpr int lines = (pass_bytes + 63) / 64;  // of each row, in this pass
  // Passes narrower than a line (AVX2, 4 rows of 16-bit values: 32 bytes) split the lines ahead
  // of the line they share, one every `sharing` keys, where a static head dim's rows are whole lines
  // and whole passes of this width (as the 4-row passes of d = 64, 96, 128, 256 are) and a score
  // vector's keys divide evenly; otherwise each asks for a line per key, as wide passes do, and
  // some lines twice. (Prefetches only: a line missed costs time, never a wrong result.)
  constexpr bool whole_lines = SD != dynamic && SD * static_cast<int>(sizeof(T)) % 64 == 0 && SD % (NV * L) == 0;
  constexpr int sharing = whole_lines && pass_bytes < 64 && 64 % pass_bytes == 0 && KB % (64 / pass_bytes) == 0 ? 64 / pass_bytes : 1;
  const int row_lines = (d * static_cast<int>(sizeof(T)) + 63) / 64;
  const int share = sharing > 1 ? c0 * static_cast<int>(sizeof(T)) % 64 / pass_bytes : 0;  // this pass's part of its line
  const int g_begin = c0 * static_cast<int>(sizeof(T)) / 64 * direct_key_tile + share * (direct_key_tile / sharing);
  TileLinePrefetcher<static_row_lines<SD, T>, T> next_lines(next_k, v_bytes, row_lines, g_begin);
  vec acc[R][NV];
  load_scaled(acc, o, d, alpha, KB);
  for (int b = 0; b < nb; ++b) {
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; ++j) {
      if constexpr (sharing == 1) {
        const int g = g_begin + (b * KB + j) * lines;
        next_lines.lines(g, g + lines);
      } else if (j % sharing == 0) {
        const int g = g_begin + b * (KB / sharing) + j / sharing;
        next_lines.lines(g, g + 1);
      }
      vec pj[R];
      KVATTN_UNROLL(16)
      for (int r = 0; r < R; ++r) pj[r] = V::set1(p[b * L + r * KB + j]);
      const T* v = byte_offset(kr[b * KB + j], v_bytes) + c0;
      if constexpr (NV % 2 == 0) {
        KVATTN_UNROLL(8)
        for (int k = 0; k < NV; k += 2) {
          vec v0, v1;
          load_two<direct_pairs<R, T>>(v + k * L, v0, v1);
          KVATTN_UNROLL(16)
          for (int r = 0; r < R; ++r) acc[r][k] = V::fma(pj[r], v0, acc[r][k]), acc[r][k + 1] = V::fma(pj[r], v1, acc[r][k + 1]);
        }
      } else {
        KVATTN_UNROLL(16)
        for (int k = 0; k < NV; ++k) {
          const vec vk = V::load_stored(v + k * L);
          KVATTN_UNROLL(16)
          for (int r = 0; r < R; ++r) acc[r][k] = V::fma(pj[r], vk, acc[r][k]);
        }
      }
    }
  }
  store_rows(acc, o, d);
}

/// Whether the direct kernel for R rows of storage type T takes bf16 pair products when
/// fpmath_mode::bf16 allows them (Bf16Dot): bf16 K/V, a path that has them (V::bf16_dot), 2 to 8
/// rows. One row reads memory, not the multipliers, at its limit, and its f32 kernel is faster there
/// (AMD EPYC family 26, one row, 2048 keys in L2, one thread: 18.7 -> 23.8 us with pair products);
/// 16 rows take direct_qk_lanes.
template <bool Bf16Dot, int R, class T>
inline constexpr bool direct_bf16_dot = Bf16Dot && V::bf16_dot && std::is_same_v<T, Eigen::bfloat16> && R >= 2 && R <= 8;

/// direct_scores with bf16 pair products (direct_bf16_dot): the R rows' queries qb (R x d bf16) and
/// the K rows as stored, 32 dims a step, each K vector serving all rows; scores in the same layout,
/// the rows ahead prefetched as direct_qk asks for them. d must be a multiple of 2L (attend_tile_typed
/// takes pair products only then): a remainder would be dropped. (W: the SIMD interface, a template
/// parameter so that paths without pair products never look them up.)
template <int R, int SD, class W = V>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_scores_bf16(const Eigen::bfloat16* qb, int d_runtime, const Eigen::bfloat16* const* kr,
                                                           const Eigen::bfloat16* const* next_k, int n, float* s) {
  using T = Eigen::bfloat16;
  constexpr int KB = L / R;
  const int d = SD != dynamic ? SD : d_runtime;
  const int row_lines = d * 2 / 64;
  const int steps = d / (2 * L);
  for (int b = 0; b < (n + KB - 1) / KB; ++b) {
    vec acc[L];
    KVATTN_UNROLL(16)
    for (int a = 0; a < L; ++a) acc[a] = W::zero();
    TileLinePrefetcher<static_row_lines<SD, T>, T> next_lines(next_k + b * KB, 0, row_lines, 0);
    for (int i = 0; i < steps; ++i) {
      next_lines.lines(i * KB * row_lines / steps, (i + 1) * KB * row_lines / steps);
      typename W::pairs qv[R];
      KVATTN_UNROLL(8)
      for (int r = 0; r < R; ++r) qv[r] = W::load_pairs(qb + r * d + i * 2 * L);
      KVATTN_UNROLL(16)
      for (int j = 0; j < KB; ++j) {
        const typename W::pairs kv = W::load_pairs(kr[b * KB + j] + i * 2 * L);
        KVATTN_UNROLL(8)
        for (int r = 0; r < R; ++r) acc[r * KB + j] = W::dot_pairs(acc[r * KB + j], qv[r], kv);
      }
    }
    W::hsum(acc, s + b * L);
  }
}

/// The probabilities e of a score vector rounded to bf16, stored to pb and returned as f32, so the
/// softmax sums exactly the weights the pair products use.
template <class W = V>
KVATTN_ALWAYS_INLINE KVATTN_TARGET vec bf16_probabilities(vec e, Eigen::bfloat16* pb) {
  return W::round_bf16(e, pb);
}

/// direct_pv_pass with bf16 pair products: the probabilities pb (bf16, score layout) of two keys
/// j, j + 1 of a row as one broadcast pair, their V rows zipped into pairs (W::zip_pairs), so each
/// product serves two keys. The NV (even) accumulators of a row hold its dims in zip order (the
/// pairs' order, see W::zip_pairs); unzip_rows restores dim order. KB even: keys pair up within a
/// score vector.
template <int R, int NV, int SD, class W = V>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_pv_pass_bf16(float* o, int d, const float* alpha, const Eigen::bfloat16* pb,
                                                            const Eigen::bfloat16* const* kr, std::ptrdiff_t v_bytes, int c0, int nb,
                                                            const Eigen::bfloat16* const* next_k) {
  using T = Eigen::bfloat16;
  constexpr int KB = L / R;
  static_assert(NV % 2 == 0 && KB % 2 == 0);
  constexpr int lines = NV * L * 2 / 64;  // of each row, in this pass
  const int row_lines = d * 2 / 64;
  const int g_begin = c0 * 2 / 64 * direct_key_tile;
  TileLinePrefetcher<static_row_lines<SD, T>, T> next_lines(next_k, v_bytes, row_lines, g_begin);
  vec acc[R][NV];
  load_scaled(acc, o, d, alpha, KB);
  for (int b = 0; b < nb; ++b) {
    KVATTN_UNROLL(16)
    for (int j = 0; j < KB; j += 2) {
      const int g = g_begin + (b * KB + j) * lines;
      next_lines.lines(g, g + 2 * lines);
      typename W::pairs pj[R];
      KVATTN_UNROLL(8)
      for (int r = 0; r < R; ++r) pj[r] = W::broadcast_pair(pb + b * L + r * KB + j);
      const T* v0 = byte_offset(kr[b * KB + j], v_bytes) + c0;
      const T* v1 = byte_offset(kr[b * KB + j + 1], v_bytes) + c0;
      KVATTN_UNROLL(8)
      for (int k = 0; k < NV; k += 2) {
        typename W::pairs lo, hi;
        W::zip_pairs(W::load_pairs(v0 + k * L), W::load_pairs(v1 + k * L), lo, hi);
        KVATTN_UNROLL(8)
        for (int r = 0; r < R; ++r) acc[r][k] = W::dot_pairs(acc[r][k], lo, pj[r]), acc[r][k + 1] = W::dot_pairs(acc[r][k + 1], hi, pj[r]);
      }
    }
  }
  store_rows(acc, o, d);
}

/// Rows of d floats (d a multiple of 2L) from the zip order of direct_pv_pass_bf16 back to dim
/// order: within each 2L dims, lane 4t + u of the first vector is dim 8t + u, of the second 8t + 4 + u.
inline void unzip_rows(const float* src, int rows, int d, float* dst) {
  for (int r = 0; r < rows; ++r)
    for (int c = r * d; c < (r + 1) * d; c += 2 * L)
      for (int t = 0; t < L / 4; ++t)
        for (int u = 0; u < 4; ++u) dst[c + 8 * t + u] = src[c + 4 * t + u], dst[c + 8 * t + 4 + u] = src[c + L + 4 * t + u];
}

/// Vectors per P·V pass of the direct kernel for R rows: its accumulators fill pv_regs registers.
template <int R>
inline constexpr int direct_pv_vectors = V::pv_regs / R;

/// One P·V pass of NV vectors from dim c0 on: bf16 pair products with the probabilities pb if Dot,
/// else f32 ones with p.
template <int R, int NV, int SD, class T, bool Dot>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_pv_pass_of(float* o, int d, const float* alpha, const float* p, const Eigen::bfloat16* pb,
                                                          const T* const* kr, std::ptrdiff_t v_bytes, int c0, int nb, const T* const* next_k) {
  if constexpr (Dot) {
    direct_pv_pass_bf16<R, NV, SD>(o, d, alpha, pb, kr, v_bytes, c0, nb, next_k);
  } else {
    direct_pv_pass<R, NV, SD, T>(o, d, alpha, p, kr, v_bytes, c0, nb, next_k);
  }
}

/// o = o * alpha + P·V for the R rows of a direct-kernel tile (nb score vectors of probabilities
/// p, rows kr; next_k: the rows its prefetches ask for), in passes of NVP = direct_pv_vectors<R>,
/// then of 8, 4 and 2 (even counts keep load_two's pairs whole), then one. One row on AVX-512 thus
/// reads a d=128 V row in one pass, front to back, rather than in two column-wise half-row passes
/// (AMD EPYC family 26, one row, 512 keys in L2, one thread: f16 3.44 -> 3.29 us, bf16 3.41 -> 3.22
/// us, f32 4.95 -> 4.81 us; MHA 32/32 d=128 T=4096 f16 decode, 2 threads, medians of 7 and of 9
/// interleaved runs: 990 -> 935, 1014 -> 992 us).
/// With Dot (direct_bf16_dot), the passes take bf16 pair products with the probabilities pb
/// instead (d a multiple of 2L, and even pass sizes, so every pass has whole pairs).
template <int R, int SD, class T, bool Dot = false>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_pv(float* o, int d, const float* alpha, const float* p, const Eigen::bfloat16* pb,
                                                  const T* const* kr, std::ptrdiff_t v_bytes, int nb, const T* const* next_k) {
  constexpr int NVP = direct_pv_vectors<R>;
  static_assert(!Dot || NVP % 2 == 0, "pair products take whole pairs of vectors (32 dims) per pass");
  const int nv = d / L;
  int k = 0;
  for (; k + NVP <= nv; k += NVP) direct_pv_pass_of<R, NVP, SD, T, Dot>(o + k * L, d, alpha, p, pb, kr, v_bytes, k * L, nb, next_k);
  if constexpr (NVP > 8)
    for (; k + 8 <= nv; k += 8) direct_pv_pass_of<R, 8, SD, T, Dot>(o + k * L, d, alpha, p, pb, kr, v_bytes, k * L, nb, next_k);
  if constexpr (NVP > 4)
    for (; k + 4 <= nv; k += 4) direct_pv_pass_of<R, 4, SD, T, Dot>(o + k * L, d, alpha, p, pb, kr, v_bytes, k * L, nb, next_k);
  if constexpr (NVP > 2)
    for (; k + 2 <= nv; k += 2) direct_pv_pass_of<R, 2, SD, T, Dot>(o + k * L, d, alpha, p, pb, kr, v_bytes, k * L, nb, next_k);
  if constexpr (!Dot)  // (with Dot, d is a multiple of 2L: no single vector is left)
    if (k < nv) direct_pv_pass_of<R, 1, SD, T, Dot>(o + k * L, d, alpha, p, pb, kr, v_bytes, k * L, nb, next_k);
}

/// The direct kernel's result so far for its R rows (a split-K chunk's, or the tile's): the states
/// from the running max m and sum l (row r in lanes r * KB ..), and the outputs o in dim order,
/// their zip (Dot) or pair (Paired) order undone straight into acc.
template <int R, bool Dot, bool Paired>
KVATTN_ALWAYS_INLINE KVATTN_TARGET void direct_result(vec m, vec l, const float* o, int d, SoftmaxState* states, float* acc) {
  constexpr int KB = L / R;
  alignas(64) float lanes[2][L];
  V::store(lanes[0], m);
  V::store(lanes[1], l);
  float mrow[R], lrow[R];
  for (int r = 0; r < R; ++r) mrow[r] = lanes[0][r * KB], lrow[r] = lanes[1][r * KB];
  finish_states(states, R, mrow, lrow);
  if constexpr (Dot) {
    unzip_rows(o, R, d, acc);
  } else if constexpr (Paired) {
    for (int r = 0; r < R; ++r) unpair_row(o + r * d, d, acc + r * d);
  } else {
    std::copy_n(o, R * d, acc);
  }
}

/// Whether the V rows of the keys kr[0 .. n) (K rows moved by v_bytes) hold only finite values.
template <class T>
KVATTN_ALWAYS_INLINE bool v_rows_finite(const T* const* kr, int n, std::ptrdiff_t v_bytes, int d) {
  using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint16_t>;
  // A value is inf or NaN when its magnitude bits reach all-ones exponent bits: one max-reduction
  // per row (vectorized: the rows of a diagonal tile are scanned before every P·V of it).
  constexpr Bits exponent = std::is_same_v<T, float> ? 0x7f800000u : std::is_same_v<T, Eigen::half> ? 0x7c00u : 0x7f80u;
  constexpr Bits magnitude = static_cast<Bits>(~(Bits{1} << (8 * sizeof(T) - 1)));
  Bits largest = 0;
  for (int j = 0; j < n; ++j) {
    const T* v = byte_offset(kr[j], v_bytes);
    for (int c = 0; c < d; ++c) largest = std::max<Bits>(largest, std::bit_cast<Bits>(v[c]) & magnitude);
  }
  return largest < exponent;
}

/// direct_pv for a tile whose rows see different keys (row r: token r / group, which sees
/// t.visible_keys of the n keys from k0), each row over its own keys only, one value at a time:
/// the path for a causal chunk's diagonal tile with a non-finite V row, which the plain passes would
/// spread as 0 x inf = NaN to rows that do not see it. o in the order direct_pv keeps it (Paired:
/// scale_row's pair order, undone into row_buffer, d floats, and redone).
template <int R, bool Paired, class T>
KVATTN_TARGET void direct_pv_visible(float* o, int d, const float* alpha, const float* p, const T* const* kr, std::ptrdiff_t v_bytes,
                                     const AttendTile& t, std::int64_t k0, int n, float* row_buffer) {
  constexpr int KB = L / R;
  for (int r = 0; r < R; ++r) {
    float* const row = Paired ? row_buffer : o + r * d;
    if constexpr (Paired) unpair_row(o + r * d, d, row);
    for (int c = 0; c < d; ++c) row[c] *= alpha[r * KB];
    const int visible = t.visible_keys(r / t.group, k0, n);
    for (int j = 0; j < visible; ++j) {
      const float pj = p[j / KB * L + r * KB + j % KB];
      const T* v = byte_offset(kr[j], v_bytes);
      for (int c = 0; c < d; ++c) row[c] += pj * static_cast<float>(v[c]);
    }
    if constexpr (Paired) scale_row<true>(row, 1.f, d, o + r * d);
  }
}

/// Direct kernel for 1, 2, 4 or (AVX-512) 8 and 16 query rows (decode with those group sizes): K
/// and V rows are converted in registers straight from the cache and each converted vector serves
/// every row, so nothing is stored and reloaded (but 16 rows' 16-bit K, see direct_qk_lanes). R
/// rows x KB = L / R keys of dot products fill one transposed horizontal sum (or none), whose
/// lanes (row r, key j at lane r * KB + j) the online softmax then works on as they are: all rows
/// at once, row reductions within groups of KB lanes, no scalar steps.
template <int R, int SD, kv_dtype Dtype, bool Bf16Dot = false>
__attribute__((noinline)) KVATTN_TARGET void attend_rows_direct(const AttendTile& t, float* scratch, int d_runtime) {
  if (t.chunk_keys > 0 && t.chunk_keys % direct_key_tile != 0)  // chunks that do not start on a tile
    return for_each_chunk(t, [&](const AttendTile& c) { attend_rows_direct<R, SD, Dtype, Bf16Dot>(c, scratch, d_runtime); });
  using T = typename storage<Dtype>::type;
  // bf16 pair products (fpmath_mode::bf16, direct_bf16_dot): q and the probabilities are rounded
  // to bf16, outputs accumulate in zip order.
  constexpr bool dot = direct_bf16_dot<Bf16Dot, R, T>;
  constexpr int KT = direct_key_tile;
  constexpr int KB = L / R;              // keys per score vector
  constexpr int NVP = direct_pv_vectors<R>;
  // Split types (bf16 on x86) come two vectors at a time as even and odd elements for more than one
  // row (direct_pairs): q is kept in that order where the dot products take pairs (up to 8 rows),
  // outputs where P·V passes do.
  constexpr bool q_paired = direct_pairs<R, T> && R <= 8 && !dot;  // as direct_qk takes K
  constexpr bool o_paired = direct_pairs<R, T> && NVP >= 2 && !dot;
  constexpr bool lanes_qk = direct_lanes_qk<R, T>;
  constexpr float log2e = 1.44269504088896340736f;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const int d = SD != dynamic ? SD : d_runtime;
  const int group = t.group;
  float* qs = scratch;     // R x d, or (lanes_qk) d x R, pre-scaled by scale * log2(e)
  float* o = qs + R * d;   // R x d
  float* kb = o + R * d;   // lanes_qk: 16 K rows, converted (dead during P·V: direct_pv_visible's row buffer)
  Eigen::bfloat16* qb = reinterpret_cast<Eigen::bfloat16*>(kb);  // dot: R x d, q as qs holds it, rounded to bf16
  alignas(64) Eigen::bfloat16 pb[dot ? R * KT : 1];  // dot: the current tile's probabilities, rounded
  alignas(64) float lanes[3][L];  // per lane: key within its group, visible keys, alpha
  float* key_of_lane = lanes[0];
  float* limit_of_lane = lanes[1];
  float* alpha = lanes[2];
  for (int r = 0; r < R; ++r) {
    const float* src = t.q + (r / group) * t.q_stride + std::int64_t{r % group} * d;
    if constexpr (lanes_qk) {
      for (int c = 0; c < d; ++c) qs[c * R + r] = src[c] * (t.scale * log2e);
    } else if constexpr (dot) {
      for (int c = 0; c < d; ++c) qb[r * d + c] = Eigen::bfloat16(src[c] * (t.scale * log2e));
    } else {
      scale_row<q_paired>(src, t.scale * log2e, d, qs + r * d);
    }
  }
  for (int a = 0; a < L; ++a) key_of_lane[a] = static_cast<float>(a % KB);
  std::fill_n(o, R * d, 0.f);
  vec m = V::set1(neg_inf), l = V::zero();  // running max (base 2) and sum; row r in lanes r * KB ..
  const std::int64_t key_end = t.keys_end();
  // Row pointers of three tiles: the one whose P·V runs, the next (whose dot products run in the
  // same iteration) and the one after. While they compute, the QK loop asks for the K rows and the
  // P·V passes for the V rows direct_prefetch_keys past those they read (the next tile's for d=128
  // rows): the hardware prefetcher alone leaves every tile start waiting on memory (Zen 4, 2
  // threads, GQA d=128 T=32768 f16 decode: 12.5 ms without, 8.3 ms with), and asking for K and V
  // both in the QK loop leaves the memory idle during P·V (5.3 ms with the V rows prefetched by the
  // P·V passes instead, 6.6 ms before; medians of 5 A/B runs). On the Xeon model 207 it matters
  // less (GQA 32/8 T=4096 f16: 485 us without, 463 us with; prefetching further ahead or into L1
  // was slower). Rows past a tile's end repeat a valid row, so neither loop needs a bounds check.
  // Software-pipelined: an iteration runs the softmax of tile i, then the dot products of tile
  // i + 1, then tile i's P·V. The softmax is a chain of dependent steps (horizontal sums, row
  // maxima, exp2) that leaves the FMA units idle in program order; with tile i + 1's independent
  // dot products behind it, the core fills that time with them. Measured with scripts/ab-decode on
  // an AMD EPYC family 26 (d=128, 2 threads, T=4096, median b/a of 5 runs) against the loop without
  // (dot products, softmax, P·V of each tile in turn): f16 GQA 32/8 0.954, MHA 32/32 0.961, 32/4
  // 0.965, bf16 GQA 32/8 0.961; no change at T=32768 (f16 1.003, bf16 1.009), B=16 T=1024 (0.983),
  // for 32/2 f16 (1.005, direct_qk_lanes) and 32/16 bf16 (1.004); f32 lost 1-5%: GQA 32/8 1.047
  // (1.013 over 7 runs), 32/4 1.024, AVX2 (forced) f32 1.044, f16 1.008. (The f32 loss is not the
  // order: with tile i + 1's dot products after tile i's P·V, the three-tile loop still took
  // 1.017-1.035 the time for f32 GQA 32/8, three sets of 5-11 runs, where the old loop against
  // itself gave 0.993 over 11; AVX2 f32 1.014.)
  const T* ring[3][KT];  // K rows of tiles i, i + 1, i + 2 (i % 3); a V row is its K row moved by v_bytes
  const T* ahead_rows[2][KT];         // tile i's rows ahead (i & 1), when not the next tile's
  const T* const* rows_ahead_of[2];   // what tile i's dot products and P·V passes prefetch (i & 1)
  alignas(64) float scores[2][R * KT];  // tile i's probabilities and tile i + 1's scores, in score layout
  const int ahead = direct_prefetch_keys(d * static_cast<int>(sizeof(T)));
  const std::ptrdiff_t v_bytes = t.slot->v_offset - t.slot->k_offset;
  const std::int64_t n_tiles = key_end > t.key_begin ? (key_end - t.key_begin + KT - 1) / KT : 0;
  const auto tile_keys = [&](std::int64_t i) { return static_cast<int>(std::min<std::int64_t>(KT, key_end - t.key_begin - i * KT)); };
  // Tile i's rows; past the last tile, the first of the item this thread runs next, else the last
  // tile again (cached: its prefetches cost next to nothing).
  const auto fill = [&](const T** dst, std::int64_t i) {
    const AttendTile* src = &t;
    std::int64_t k0 = t.key_begin + i * KT;
    int n;
    if (i < n_tiles) {
      n = tile_keys(i);
    } else if (t.next != nullptr && t.next->key_begin < t.next->keys_end()) {
      src = t.next, k0 = t.next->key_begin, n = static_cast<int>(std::min<std::int64_t>(KT, t.next->keys_end() - k0));
    } else {
      k0 = t.key_begin + (n_tiles - 1) * KT, n = tile_keys(n_tiles - 1);
    }
    KvRowCursor(*src->slot, src->seq, src->kv_head, k0, false).take(n, dst);
    for (int j = n; j < KT; ++j) dst[j] = dst[n - 1];
  };
  // Tile i's rows `ahead` keys on from each of its rows (rows_ahead_of[i & 1]), once tiles i and
  // i + 1 are filled: the next tile's, or the last ones of this tile and the first ones of the next.
  const auto set_rows_ahead = [&](std::int64_t i) {
    const T* const* rows = ring[i % 3];
    const T* const* next = ring[(i + 1) % 3];
    if (ahead >= KT) {
      rows_ahead_of[i & 1] = next;
      return;
    }
    std::copy(rows + ahead, rows + KT, ahead_rows[i & 1]);
    std::copy_n(next, ahead, ahead_rows[i & 1] + KT - ahead);
    rows_ahead_of[i & 1] = ahead_rows[i & 1];
  };
  if (n_tiles > 0) {
    fill(ring[0], 0);
    fill(ring[1], 1);
    set_rows_ahead(0);
    if constexpr (dot) {
      direct_scores_bf16<R, SD>(qb, d, ring[0], rows_ahead_of[0], tile_keys(0), scores[0]);
    } else {
      direct_scores<R, SD, T>(qs, d, ring[0], rows_ahead_of[0], tile_keys(0), kb, scores[0]);
    }
  }
  // Split-K chunks (t.chunk_keys): each starts on a tile, so at its first tile the previous chunk's
  // result goes out and the rows start afresh, exactly as a tile of that chunk alone would; the
  // pipeline (the next tile's dot products, the prefetches) runs on across the boundary.
  const std::int64_t chunk_tiles = t.chunk_keys / KT;
  std::int64_t chunk = 0, chunk_end = chunk_tiles > 0 ? chunk_tiles : n_tiles;  // the current chunk's end tile
  for (std::int64_t i = 0; i < n_tiles; ++i) {
    if (i == chunk_end) {
      direct_result<R, dot, o_paired>(m, l, o, d, t.states + chunk * t.chunk_states, t.acc + chunk * t.chunk_acc);
      ++chunk, chunk_end += chunk_tiles;
      std::fill_n(o, R * d, 0.f);
      m = V::set1(neg_inf), l = V::zero();
    }
    const std::int64_t k0 = t.key_begin + i * KT;
    const int n = tile_keys(i);
    const int nb = (n + KB - 1) / KB;
    float* p = scores[i & 1];
    // Keys each row sees (rows of one decode step see all n; earlier tokens of a chunk fewer).
    bool masked = false;
    for (int tok = 0; tok * group < R; ++tok) {
      const int limit = t.visible_keys(tok, k0, n);
      masked |= limit < nb * KB;
      std::fill_n(limit_of_lane + tok * group * KB, std::min(group, R - tok * group) * KB, static_cast<float>(limit));
    }
    vec mt = V::set1(neg_inf);
    for (int b = 0; b < nb; ++b) {
      vec sb = V::load(p + b * L);
      if (masked) {
        const vec key = V::add(V::load(key_of_lane), V::set1(static_cast<float>(b * KB)));
        sb = V::select_less(key, V::load(limit_of_lane), sb, V::set1(neg_inf));
        V::store(p + b * L, sb);
      }
      mt = V::max(mt, sb);
    }
    const vec m_new = V::max(m, group_reduce<KB, true>(mt));
    // A row with no key so far keeps max -inf: subtract 0 instead, so exp2 sees -inf, not NaN.
    const vec m_safe = V::select_less(m_new, V::set1(std::numeric_limits<float>::lowest()), V::zero(), m_new);
    const vec a = exp2v(V::sub(m, m_safe));
    vec sum = V::zero();
    for (int b = 0; b < nb; ++b) {
      vec e = exp2v(V::sub(V::load(p + b * L), m_safe));
      if constexpr (dot) e = bf16_probabilities(e, pb + b * L);
      V::store(p + b * L, e);
      sum = V::add(sum, e);
    }
    l = V::fma(l, a, group_reduce<KB, false>(sum));
    m = m_new;
    V::store(alpha, a);
    if (i + 1 < n_tiles) {
      fill(ring[(i + 2) % 3], i + 2);
      set_rows_ahead(i + 1);
      if constexpr (dot) {
        direct_scores_bf16<R, SD>(qb, d, ring[(i + 1) % 3], rows_ahead_of[(i + 1) & 1], tile_keys(i + 1), scores[(i + 1) & 1]);
      } else {
        direct_scores<R, SD, T>(qs, d, ring[(i + 1) % 3], rows_ahead_of[(i + 1) & 1], tile_keys(i + 1), kb, scores[(i + 1) & 1]);
      }
    }
    // A causal chunk's diagonal tile (its first token sees fewer of the keys than the last) whose
    // hidden keys hold a non-finite V value: each row over its own keys (bf16 pair products run in
    // one-token calls only, which have no such tile).
    const int first_limit = t.visible_keys(0, k0, n);
    if (!dot && first_limit < n && !v_rows_finite(ring[i % 3] + first_limit, n - first_limit, v_bytes, d))
      direct_pv_visible<R, o_paired>(o, d, alpha, p, ring[i % 3], v_bytes, t, k0, n, kb);
    else
      direct_pv<R, SD, T, dot>(o, d, alpha, p, pb, ring[i % 3], v_bytes, nb, rows_ahead_of[i & 1]);
  }
  direct_result<R, dot, o_paired>(m, l, o, d, t.states + chunk * t.chunk_states, t.acc + chunk * t.chunk_acc);
}

/// Tile kernel with the storage type known at compile time: few rows take the direct kernel,
/// everything else the buffered attend_tile. Bf16Dot (fpmath_mode::bf16): the direct kernel may take
/// bf16 pair products (direct_bf16_dot) where the head dim is a multiple of 2L.
template <int StaticGroup, int StaticDim, kv_dtype Dtype, bool Bf16Dot = false>
KVATTN_TARGET void attend_tile_typed(const AttendTile& t, float* scratch) {
  const int group = StaticGroup != dynamic ? StaticGroup : t.group;
  const int d = StaticDim != dynamic ? StaticDim : t.slot->head_dim;
  const int rows = t.n_tokens * group;
  if (d % L == 0) {  // rows = tokens x group: only groups that divide a row count are instantiated
    constexpr int SD = StaticDim != dynamic && StaticDim % L == 0 ? StaticDim : dynamic;
    // Pair products need whole 2L-dim steps; a static dim that has none never instantiates them.
    constexpr bool dot_dims = Bf16Dot && (SD == dynamic || SD % (2 * L) == 0);
    const bool dot = dot_dims && d % (2 * L) == 0;
    if constexpr (StaticGroup == dynamic || StaticGroup == 1)
      if (rows == 1) return attend_rows_direct<1, SD, Dtype>(t, scratch, d);
    if constexpr (StaticGroup == dynamic || StaticGroup <= 2)
      if (rows == 2) return dot ? attend_rows_direct<2, SD, Dtype, dot_dims>(t, scratch, d) : attend_rows_direct<2, SD, Dtype>(t, scratch, d);
    if constexpr (StaticGroup == dynamic || StaticGroup <= 4)
      if (rows == 4) return dot ? attend_rows_direct<4, SD, Dtype, dot_dims>(t, scratch, d) : attend_rows_direct<4, SD, Dtype>(t, scratch, d);
    // 8 and 16 rows need 16 accumulators plus up to 16 query vectors and at least one key per score
    // vector: AVX-512 only (Zen 4, GQA d=128 T=32768 f16 decode, 2 threads: 64/8 heads 14.2 -> 7.3
    // ms, 128/8 heads 20.6 -> 13.0 ms against the buffered kernel). 16 rows in the buffered kernel's
    // lanes (no horizontal sums) are faster only while K/V sit in L2 (Xeon model 207, 32/2 heads
    // f16, 2 threads, medians of 3 interleaved runs: T=4096 320 -> 317 us, T=32768 2.67 -> 2.82 ms,
    // f32 T=4096 296 -> 345 us): the direct kernel's prefetches matter more.
    if constexpr (L >= 16 && V::registers >= 32) {
      if constexpr (StaticGroup == dynamic || StaticGroup <= 8)
        if (rows == 8) return dot ? attend_rows_direct<8, SD, Dtype, dot_dims>(t, scratch, d) : attend_rows_direct<8, SD, Dtype>(t, scratch, d);
      if constexpr (StaticGroup == dynamic || StaticGroup <= 16)
        if (rows == 16) return attend_rows_direct<16, SD, Dtype>(t, scratch, d);
    }
  }
  // The buffered kernel takes every other row count: MQA and other large groups, groups of 8 and 16
  // on paths with fewer than 16 lanes, groups like 3 or 6, and prefill chunks.
  constexpr int BufferedGroup = StaticGroup == 8 || StaticGroup == 16 ? StaticGroup : dynamic;
  attend_tile<BufferedGroup, StaticDim>(t, scratch);
}

/// The probes' software prefetch for a step that reads 4 vectors' worth of stored elements at x:
/// the lines prefetch_ahead_bytes further on into L1 (read_prefetch::l1) or into L2 (l2), or
/// prefetch_ahead_bytes_l2 further on into L2 (l2_far), as the direct kernel asks for the rows
/// ahead of those it reads.
template <read_prefetch Prefetch = read_prefetch::l1, class T = float>
KVATTN_ALWAYS_INLINE void prefetch_probe_step(const T* x) {
  const char* p = reinterpret_cast<const char*>(x);
  for (int line = 0; line < 4 * L * static_cast<int>(sizeof(T)); line += 64) {
    if constexpr (Prefetch == read_prefetch::l2_far) {
      prefetch_row_line(p + prefetch_ahead_bytes_l2 + line);
    } else if constexpr (Prefetch == read_prefetch::l2) {
      prefetch_row_line(p + prefetch_ahead_bytes + line);
    } else if constexpr (Prefetch == read_prefetch::l1) {
      prefetch_line(p + prefetch_ahead_bytes + line);
    }
  }
}

/// Sums n floats with several independent accumulators: a streaming read as fast as this path
/// reads memory. Benchmarks use it as the bandwidth floor, without software prefetches and with
/// each of prefetch_probe_step's three, and take the fastest: on the Zen 4 of prefetch_row_line, MHA
/// 32/32 decode with L2 prefetches took 0.91 (f32, 8 KiB ahead) of the faster of the plain and the
/// L1 read's time, and 0.95-0.97 (16-bit, 4 KiB ahead) of the fastest of those and the far L2 read
/// (D1, 2 threads); with the near L2 read as well, D1 bf16 still read 0.95 in one of two runs on a
/// busy host. Earlier, with the plain and the L1 read only:
/// on a Zen 4 the hardware prefetcher alone streamed 20-40% slower (2 threads, 67-134 MB: 26-31
/// GB/s without, 33-38 GB/s at 2-8 KiB ahead, less at 16); on a Zen 5 (AMD EPYC family 26) the
/// prefetching read was the faster from L3 and the plain one from DRAM (2 threads, medians of 40
/// alternating reads: 16 MiB 161 against 155 GB/s, 64 MiB 97 against 115 GB/s; with hint T1 the
/// plain read won both), though which one wins there also moves with the host's load. Loads go
/// through load_once, as in stream_fma, so both loops read alike.
template <read_prefetch Prefetch>
KVATTN_TARGET inline float stream_sum(const float* x, std::int64_t n) {
  vec a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  std::int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    prefetch_probe_step<Prefetch>(x + i);
    a0 = V::add(a0, V::load_once(x + i));
    a1 = V::add(a1, V::load_once(x + i + L));
    a2 = V::add(a2, V::load_once(x + i + 2 * L));
    a3 = V::add(a3, V::load_once(x + i + 3 * L));
  }
  float r = V::reduce_add(V::add(V::add(a0, a1), V::add(a2, a3)));
  for (; i < n; ++i) r += x[i];
  return r;
}

/// stream_sum<prefetch> for a run-time prefetch.
KVATTN_TARGET inline float stream_sum(const float* x, std::int64_t n, read_prefetch prefetch) {
  switch (prefetch) {
    case read_prefetch::none: return stream_sum<read_prefetch::none>(x, n);
    case read_prefetch::l2: return stream_sum<read_prefetch::l2>(x, n);
    case read_prefetch::l2_far: return stream_sum<read_prefetch::l2_far>(x, n);
    default: return stream_sum<read_prefetch::l1>(x, n);
  }
}

/// Number of independent FMA chains the peak probe runs: half the registers, so none spill.
inline constexpr int fma_peak_chains = V::registers / 2;

/// Runs `iterations` x fma_peak_chains independent register-resident FMA chains of one vector each
/// and returns a value depending on all of them. FLOPs = iterations x chains x 2 x lanes.
KVATTN_TARGET inline float fma_peak_loop(std::int64_t iterations, float seed) {
  constexpr int C = fma_peak_chains;
  vec acc[C];
  KVATTN_UNROLL(16)
  for (int k = 0; k < C; ++k) acc[k] = V::set1(seed + static_cast<float>(k));
  const vec m = V::set1(0.999999f), b = V::set1(1e-7f);
  for (std::int64_t i = 0; i < iterations; ++i) {
    KVATTN_UNROLL(16)
    for (int k = 0; k < C; ++k) acc[k] = V::fma(acc[k], m, b);
  }
  vec r = V::zero();
  for (int k = 0; k < C; ++k) r = V::add(r, acc[k]);
  return V::reduce_add(r);
}

/// Streams n stored elements as stream_sum does (16-bit ones converted as the direct kernel converts
/// them for F query rows: load_two in direct_pairs<F>' order) and spends F FMAs on every converted
/// vector, spread over fma_peak_chains independent chains: a kernel of that arithmetic density
/// (F = the query rows each K or V vector serves: the GQA group) with no dependencies, overheads or
/// irregular accesses. (Groups the buffered kernel takes, 8 and up where vectors have fewer than 16
/// lanes, convert once into L1 instead: for them the loop stands for the FMA density only.) Timed against the same work in L2, it shows how far streaming
/// and computing overlap on a machine, and what the conversion of a storage type costs beside its
/// FMAs (bench_decode's Overlap benchmarks). Returns the sum of the FMAs' products, F * 0.999999 *
/// sum(x) up to rounding (so tests can check what it read).
template <int F, class T>
KVATTN_TARGET inline float stream_fma_fixed(const T* x, std::int64_t n) {
  constexpr int C = fma_peak_chains;
  vec acc[C];
  KVATTN_UNROLL(16)
  for (int k = 0; k < C; ++k) acc[k] = V::set1(static_cast<float>(k));  // distinct, so no chains merge
  const vec m = V::set1(0.999999f);
  const std::int64_t whole = n / (4 * L) * (4 * L);  // (a bound GCC can follow when n is a constant)
  for (std::int64_t i = 0; i < whole; i += 4 * L) {
    prefetch_probe_step(x + i);
    KVATTN_UNROLL(2)
    for (int v = 0; v < 4; v += 2) {
      // f32 loaded once: for F = 2 and 3 GCC folded the load into each FMA, and those loops then
      // streamed from L3 at 1.69 and 2.14x the bare stream on an AMD EPYC family 26 (F = 1: 1.01,
      // F = 4: 1.11); loaded once, 1.00 and 1.03. (A conversion's result is a register anyway.)
      vec xv[2];
      if constexpr (std::is_same_v<T, float>) {
        xv[0] = V::load_once(x + i + v * L), xv[1] = V::load_once(x + i + (v + 1) * L);
      } else {
        load_two<direct_pairs<F, T>>(x + i + v * L, xv[0], xv[1]);
      }
      KVATTN_UNROLL(2)
      for (int h = 0; h < 2; ++h) {
        KVATTN_UNROLL(16)
        for (int f = 0; f < F; ++f) acc[((v + h) * F + f) % C] = V::fma(xv[h], m, acc[((v + h) * F + f) % C]);
      }
    }
  }
  vec r = V::zero();
  for (int k = 0; k < C; ++k) r = V::add(r, V::sub(acc[k], V::set1(static_cast<float>(k))));
  float tail = 0;
  for (std::int64_t i = whole; i < n; ++i) tail += static_cast<float>(x[i]);
  return V::reduce_add(r) + static_cast<float>(F) * 0.999999f * tail;
}

/// stream_fma_fixed<fmas> for a run-time fmas in [1, 16].
template <int F = 16, class T>
KVATTN_TARGET inline float stream_fma(const T* x, std::int64_t n, int fmas) {
  if constexpr (F > 1)
    if (fmas < F) return stream_fma<F - 1>(x, n, fmas);
  return stream_fma_fixed<F>(x, n);
}

/// y[i] = 2^x[i] with exp2v (whole vectors; the tail through std::exp2). For tests of its error.
KVATTN_TARGET inline void exp2_array(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + L <= n; i += L) V::store(y + i, exp2v(V::load(x + i)));
  for (; i < n; ++i) y[i] = std::exp2(x[i]);
}
