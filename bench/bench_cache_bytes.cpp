// KV cache bytes per token of the designs in the CLA paper (Brandon et al., 2024, "Reducing
// Transformer Key-Value Cache Size with Cross-Layer Attention"), measured from a real cache: the
// bytes it took from its memory resource for 256 tokens (16 full blocks), divided by 256, checked
// against a count by hand and the library's formula. The timed part is the cost of writing one
// token's K/V into every KV layer.
//
//   CacheBytes/<design>   counters: bytes_per_token, reserved_bytes_per_token, kv_layers, q_heads,
//                         kv_heads, head_dim, tokens_in_16GiB, GB_per_s (one-token write throughput)
#include <cmath>
#include <memory_resource>
#include <string>
#include <vector>

#include "common.hpp"
#include "kvattn/kvattn.hpp"
#include "summary_reporter.hpp"

namespace {

using kvattn::LayerSharingMap;

/// The heap, counting the bytes it has handed out and not taken back.
class ByteCounter final : public std::pmr::memory_resource {
 public:
  std::int64_t outstanding = 0;

 private:
  void* do_allocate(std::size_t n, std::size_t align) override {
    void* p = std::pmr::new_delete_resource()->allocate(n, align);
    outstanding += static_cast<std::int64_t>(n);
    return p;
  }
  void do_deallocate(void* p, std::size_t n, std::size_t align) override {
    std::pmr::new_delete_resource()->deallocate(p, n, align);
    outstanding -= static_cast<std::int64_t>(n);
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }
};

struct Design {
  std::string name;
  int q_heads, kv_heads, head_dim;
  LayerSharingMap layers;
  int expected_kv_layers;  // counted by hand, to check the library's map and byte accounting
};

/// n layers, runs of `factor` layers share one K/V (factor 1: every layer owns its K/V).
Design cla(std::string name, int q_heads, int kv_heads, int head_dim, int n_layers, int factor) {
  return {std::move(name), q_heads, kv_heads, head_dim,
          factor == 1 ? LayerSharingMap::none(n_layers) : LayerSharingMap::cla(n_layers, factor),
          (n_layers + factor - 1) / factor};
}

/// The 20-layer non-uniform patterns, each with 11 KV layers like CLA2 plus one layer.
Design pattern(std::string name, std::vector<int> sources) {
  return {std::move(name), 16, 1, 128, LayerSharingMap::from_sources(std::move(sources)), 11};
}

std::vector<Design> designs() {
  std::vector<int> keep_ends{0}, dense_front, dense_back{0, 1};
  for (int l = 1; l <= 17; l += 2) keep_ends.insert(keep_ends.end(), {l, l});  // (1,2) ... (17,18)
  keep_ends.push_back(19);
  for (int l = 0; l < 20; ++l) dense_front.push_back(l < 10 || l == 19 ? l : 9);  // 10-18 read 9
  // DenseBack is DenseFront mirrored (layer l -> 19 - l): layer 0 alone, one shared run 1-10
  // (2-10 read layer 1, since a run's producer must be its first layer), then 11-19 dense.
  for (int l = 2; l < 20; ++l) dense_back.push_back(l <= 10 ? 1 : l);

  // 1B scale: d_model 2048, 20 layers; 3B scale: d_model 3072, 32 layers. Query heads are
  // d_model / head dim, as in the paper (45 heads of 46 and 22 of 90 at 1B).
  return {
      cla("1B-H128-MHA", 16, 16, 128, 20, 1),
      cla("1B-H128-GQA4", 16, 4, 128, 20, 1),
      cla("1B-H128-GQA2", 16, 2, 128, 20, 1),
      cla("1B-H128-MQA", 16, 1, 128, 20, 1),
      cla("1B-H64-MQA", 32, 1, 64, 20, 1),
      cla("1B-H46-MQA", 45, 1, 46, 20, 1),
      cla("1B-H32-MQA", 64, 1, 32, 20, 1),
      cla("1B-H512-MQA-CLA2", 4, 1, 512, 20, 2),
      cla("1B-H256-MQA-CLA2", 8, 1, 256, 20, 2),
      cla("1B-H128-MQA-CLA2", 16, 1, 128, 20, 2),
      cla("1B-H90-MQA-CLA2", 22, 1, 90, 20, 2),
      cla("1B-H64-MQA-CLA2", 32, 1, 64, 20, 2),
      cla("1B-H256-GQA4-CLA2", 8, 4, 256, 20, 2),
      cla("1B-H128-GQA4-CLA2", 16, 4, 128, 20, 2),
      cla("1B-H128-GQA2-CLA2", 16, 2, 128, 20, 2),
      cla("1B-H128-MQA-CLA3", 16, 1, 128, 20, 3),
      cla("1B-H128-MQA-CLA4", 16, 1, 128, 20, 4),
      pattern("1B-H128-MQA-KeepEnds", keep_ends),
      pattern("1B-H128-MQA-DenseFront", dense_front),
      pattern("1B-H128-MQA-DenseBack", dense_back),
      cla("3B-H128-MQA", 24, 1, 128, 32, 1),
      cla("3B-H128-MQA-CLA2", 24, 1, 128, 32, 2),
      cla("3B-H64-MQA", 48, 1, 64, 32, 1),
      cla("3B-H64-MQA-CLA2", 48, 1, 64, 32, 2),
      cla("3B-H32-MQA", 96, 1, 32, 32, 1),
  };
}

void BM_CacheBytes(benchmark::State& state, const Design& design) {
  constexpr std::int64_t tokens = 256;
  constexpr auto dtype = kvattn::kv_dtype::bf16;  // 16-bit storage, as in the paper's accounting
  const kvattn::ModelConfig config(kvattn::HeadShape(design.q_heads, design.kv_heads, design.head_dim),
                                   design.layers, dtype);
  ByteCounter heap;
  kvattn::KvCache<kvattn::PagedLayout> cache(config, kvattn::PagedLayout{.block_size = 16}, &heap);
  const kvattn::seq_id id = 0;
  cache.add_sequence(id);
  // append() takes K and V as [kv_layers][tokens][Hkv][d].
  const auto floats = static_cast<std::size_t>(config.n_kv_layers() * tokens * design.kv_heads * design.head_dim);
  const std::vector<float> k = kvattn_bench::random_floats(floats, 1), v = kvattn_bench::random_floats(floats, 2);
  cache.append(id, tokens, k.data(), v.data());

  const std::int64_t measured = heap.outstanding / tokens;  // 256 tokens fill 16 blocks exactly
  const std::int64_t expected = std::int64_t{2} * design.kv_heads * design.head_dim * design.expected_kv_layers *
                                kvattn::dtype_bytes(dtype);
  if (heap.outstanding % tokens != 0 || measured != expected || config.kv_bytes_per_token() != expected ||
      cache.reserved_bytes() != heap.outstanding || cache.live_bytes() != heap.outstanding) {
    const std::string msg = "bytes per token: taken from the heap " + std::to_string(measured) + ", counted by hand " +
                            std::to_string(expected) + ", library formula " + std::to_string(config.kv_bytes_per_token()) +
                            "; cache reports " + std::to_string(cache.reserved_bytes()) + " reserved, " +
                            std::to_string(cache.live_bytes()) + " live";
    state.SkipWithError(msg.c_str());
    return;
  }

  // Timed: write the K/V of token 255 into every KV layer, then drop it. Starting from 255 tokens
  // keeps the write inside an existing block, so this times the write, not block allocation.
  cache.truncate(id, tokens - 1);
  const double seconds = kvattn_bench::timed_loop(state, [&] {
    cache.append(id, 1, k.data(), v.data());
    cache.truncate(id, tokens - 1);
  });

  const auto bpt = static_cast<double>(measured);
  state.counters["bytes_per_token"] = bpt;
  state.counters["reserved_bytes_per_token"] = static_cast<double>(cache.reserved_bytes()) / tokens;
  state.counters["kv_layers"] = config.n_kv_layers();
  state.counters["q_heads"] = design.q_heads;
  state.counters["kv_heads"] = design.kv_heads;
  state.counters["head_dim"] = design.head_dim;
  state.counters["tokens_in_16GiB"] = std::floor(16.0 * kvattn_bench::GiB / bpt);
  state.counters["GB_per_s"] = bpt * 1e-9 / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  for (const Design& d : designs())
    benchmark::RegisterBenchmark(("CacheBytes/" + d.name).c_str(), BM_CacheBytes, d);
  return kvattn_bench::run_main(argc, argv);
}
