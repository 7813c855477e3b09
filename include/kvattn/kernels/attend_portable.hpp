// Portable attention tile kernel: one KV head, a block of query rows (query tokens x the heads of
// its GQA group), a range of keys. Each K and V row is loaded and converted once and applied to every
// query row of the block: this is where GQA/MQA turn fewer bytes into less time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvattn/cache/kv_view.hpp"
#include "kvattn/config/dtype.hpp"
#include "kvattn/config/head_layout.hpp"
#include "kvattn/kernels/softmax_state.hpp"

namespace kvattn::kernels {

/// Keys per tile: one tile of converted K (and V) rows stays in L1 while all query rows use it.
inline constexpr int key_tile = 32;

/// The software prefetches of the bandwidth probes' read (stream_sum): none, each line 4 KiB ahead
/// into L1, 4 KiB ahead into L2, or 8 KiB ahead into L2 (the direct kernel asks for its rows ahead
/// into L2, a tile ahead: 4 KiB of 16-bit d=128 rows, 8 KiB of f32 ones).
enum class read_prefetch { none, l1, l2, l2_far };

struct AttendTile;
/// Points rows[0 .. n) at the K (values=false) or V rows of a tile's KV head from key k0 on, as f32
/// rows of dp floats (zero-padded past the head dim): the stored rows themselves where they already
/// are (f32, head dim a multiple of the vector width), else copies converted into `buffer` (rows dp
/// floats apart). The per-storage-type half of a vectorized kernel.
using TileLoader = void (*)(const AttendTile&, std::int64_t k0, int n, bool values, float* buffer, std::int64_t dp,
                            const float** rows);

/// Keys per tile of the vectorized kernels.
inline constexpr int key_tile_simd = 16;

/// One unit of work for a tile kernel. Row r = i x group + g is query token i, head g of the group.
struct AttendTile {
  const KvSlotView* slot;
  KvSequenceView seq;
  int kv_head;
  int group;                 ///< query heads per KV head
  int n_tokens;              ///< query tokens in this tile
  const float* q;            ///< query token 0, first head of the group; heads of a group are d apart
  std::int64_t q_stride;     ///< floats between query tokens
  float scale;
  std::int64_t key_begin, key_end;  ///< keys [key_begin, key_end) of the sequence
  std::int64_t visible_end0;        ///< token i sees keys < visible_end0 + i x visible_step
  std::int64_t visible_step;        ///< 1 for causal, 0 for full (cross) attention
  SoftmaxState* states;             ///< n_tokens x group states
  float* acc;                       ///< n_tokens x group x d unnormalized outputs
  TileLoader load = nullptr;        ///< row converter of vectorized kernels
  /// The tile this thread computes next, if known (outputs unset): a kernel may prefetch its first
  /// keys while it finishes this one, so a split-K chunk does not start waiting on memory.
  const AttendTile* next = nullptr;
  /// > 0: the keys are split-K chunks of this many keys from key_begin on, each with a result of its
  /// own, exactly as if each chunk were a tile: chunk c's states at states + c x chunk_states, its
  /// outputs at acc + c x chunk_acc. One thread running a whole unit's chunks thus keeps its
  /// kernel's pipeline and prefetches going across them (for_each_chunk runs them one at a time).
  std::int64_t chunk_keys = 0;
  std::int64_t chunk_states = 0, chunk_acc = 0;

  /// End of the keys the tile attends to: its key range cut where its last token stops seeing.
  std::int64_t keys_end() const { return std::min(key_end, visible_end0 + (n_tokens - 1) * visible_step); }
  /// How many of the keys [k0, k0 + n) token i of the tile sees, in [0, n].
  int visible_keys(int token, std::int64_t k0, int n) const {
    return static_cast<int>(std::clamp<std::int64_t>(visible_end0 + token * visible_step - k0, 0, n));
  }
};

/// Runs run(chunk) on each split-K chunk of a tile with chunk_keys > 0, in key order, as tiles of
/// their own (with results where the tile says, each naming the next as its `next`): for kernels,
/// or shapes, that do not take chunks in one pass.
template <class Run>
void for_each_chunk(const AttendTile& t, Run&& run) {
  const auto chunk = [&](std::int64_t c) {
    AttendTile ct = t;
    ct.key_begin = t.key_begin + c * t.chunk_keys;
    ct.key_end = std::min(t.key_end, ct.key_begin + t.chunk_keys);
    ct.chunk_keys = 0;
    ct.states = t.states + c * t.chunk_states;
    ct.acc = t.acc + c * t.chunk_acc;
    return ct;
  };
  const std::int64_t chunks = (t.key_end - t.key_begin + t.chunk_keys - 1) / t.chunk_keys;
  AttendTile tiles[2] = {chunk(0), {}};
  for (std::int64_t c = 0; c < chunks; ++c) {
    AttendTile& cur = tiles[c & 1];
    if (c + 1 < chunks) {
      tiles[(c + 1) & 1] = chunk(c + 1);
      cur.next = &tiles[(c + 1) & 1];
    } else {
      cur.next = t.next;
    }
    run(static_cast<const AttendTile&>(cur));
  }
}

/// A tile kernel: `run` computes a tile's states and accumulators; `load` is its row converter.
struct TileKernel {
  void (*run)(const AttendTile&, float* scratch) = nullptr;
  TileLoader load = nullptr;
};

/// Scratch floats any tile kernel needs for `rows` query rows of head dim d: scaled queries and
/// outputs (padded to 16 rows and 16 dims), a converted K and V tile, probabilities, row states.
inline std::int64_t tile_scratch_floats(int rows, int d) {
  const std::int64_t dp = (d + 15) / 16 * 16, rp = (rows + 15) / 16 * 16;
  return rp * (2 * dp + key_tile + 4) + 2 * std::int64_t{key_tile} * dp;
}

/// Computes the tile's states and accumulators from scratch (any previous content is overwritten).
/// StaticGroup / StaticDim fix those values at compile time (`dynamic`: read from the tile).
template <kv_dtype Dtype, int StaticGroup = dynamic, int StaticDim = dynamic>
void attend_tile_portable(const AttendTile& t, float* scratch) {
  if (t.chunk_keys > 0) return for_each_chunk(t, [&](const AttendTile& c) { attend_tile_portable<Dtype, StaticGroup, StaticDim>(c, scratch); });
  using S = storage<Dtype>;
  using T = typename S::type;
  const int group = StaticGroup != dynamic ? StaticGroup : t.group;
  const int d = StaticDim != dynamic ? StaticDim : t.slot->head_dim;
  const int rows = t.n_tokens * group;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();

  float* qs = scratch;                                  // rows x d, pre-scaled queries
  float* kt = qs + std::int64_t{rows} * d;               // key_tile x d
  float* vt = kt + std::int64_t{key_tile} * d;           // key_tile x d
  float* p = vt + std::int64_t{key_tile} * d;            // rows x key_tile

  for (int i = 0; i < t.n_tokens; ++i)
    for (int g = 0; g < group; ++g) {
      const float* src = t.q + i * t.q_stride + std::int64_t{g} * d;
      float* dst = qs + (std::int64_t{i} * group + g) * d;
      for (int c = 0; c < d; ++c) dst[c] = src[c] * t.scale;
    }
  for (int r = 0; r < rows; ++r) {
    t.states[r] = SoftmaxState{};
    std::fill_n(t.acc + std::int64_t{r} * d, d, 0.f);
  }

  const std::int64_t key_end = t.keys_end();  // keys past what the last query token sees are skipped
  for (std::int64_t k0 = t.key_begin; k0 < key_end; k0 += key_tile) {
    const int n = static_cast<int>(std::min<std::int64_t>(key_tile, key_end - k0));
    for (int j = 0; j < n; ++j) {
      const T* kr = reinterpret_cast<const T*>(k_row(*t.slot, t.seq, t.kv_head, k0 + j));
      for (int c = 0; c < d; ++c) kt[j * d + c] = S::load(kr[c]);
    }
    bool any = false;
    for (int r = 0; r < rows; ++r) {
      const int i = r / group;
      const std::int64_t visible = t.visible_end0 + i * t.visible_step;
      const float* qr = qs + std::int64_t{r} * d;
      float* pr = p + std::int64_t{r} * key_tile;
      float tile_max = neg_inf;
      for (int j = 0; j < n; ++j) {
        float s = neg_inf;
        if (k0 + j < visible) {
          s = 0.f;
          for (int c = 0; c < d; ++c) s += qr[c] * kt[j * d + c];
        }
        pr[j] = s;
        tile_max = std::fmax(tile_max, s);
      }
      SoftmaxState& st = t.states[r];
      if (tile_max == neg_inf) {  // every key of this tile is masked for this row
        std::fill_n(pr, n, 0.f);
        continue;
      }
      any = true;
      const float m = std::fmax(st.max, tile_max);
      const float alpha = std::exp(st.max - m);
      float sum = 0.f;
      for (int j = 0; j < n; ++j) {
        pr[j] = std::exp(pr[j] - m);
        sum += pr[j];
      }
      st.sum = st.sum * alpha + sum;
      st.max = m;
      if (alpha != 1.f) {
        float* ar = t.acc + std::int64_t{r} * d;
        for (int c = 0; c < d; ++c) ar[c] *= alpha;
      }
    }
    if (!any) continue;
    for (int j = 0; j < n; ++j) {
      const T* vr = reinterpret_cast<const T*>(v_row(*t.slot, t.seq, t.kv_head, k0 + j));
      for (int c = 0; c < d; ++c) vt[j * d + c] = S::load(vr[c]);
    }
    for (int r = 0; r < rows; ++r) {
      const float* pr = p + std::int64_t{r} * key_tile;
      float* ar = t.acc + std::int64_t{r} * d;
      // Only the keys the row sees: a masked key's probability is 0, but 0 x a non-finite V is NaN.
      const int visible = t.visible_keys(r / group, k0, n);
      for (int j = 0; j < visible; ++j) {
        const float w = pr[j];
        const float* vj = vt + j * d;
        for (int c = 0; c < d; ++c) ar[c] += w * vj[c];
      }
    }
  }
}

}  // namespace kvattn::kernels
