// Quickstart: one grouped-query attention (GQA) layer over a paged KV cache.
//
// Two sequences of different lengths are prefilled in one batch, then decoded one token per step.
// One sequence finishes early, the other keeps going: the usual shape of continuous batching.
// After every step we print what the cache holds:
//   live bytes     = tokens held x bytes per token  (what the tokens need)
//   reserved bytes = whole blocks taken from memory (what they cost: the last block of a sequence
//                    is partly empty, and freed blocks are kept for reuse)
// A real model wraps this in embeddings, norms, MLPs and a sampler; random hidden states stand in
// for them here, so the numbers are about memory and plumbing, not about language.

#include <kvattn/kvattn.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

namespace {

// 8 query heads share 2 KV heads (groups of 4 query heads per KV head), head dim 64.
constexpr int d_model = 512;
constexpr int q_heads = 8;
constexpr int kv_heads = 2;
constexpr int head_dim = 64;

std::vector<float> random_values(std::mt19937& rng, std::size_t n, float stddev) {
  std::normal_distribution<float> normal(0.f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

}  // namespace

int main() {
  using namespace kvattn;
  std::mt19937 rng(2024);
  bool ok = true;

  // Weights are row-major [out][in], like PyTorch's nn.Linear. 1/sqrt(d_model) keeps activations
  // at unit scale. The layer maps these buffers without copying: they must outlive it.
  const float w_scale = 1.f / std::sqrt(static_cast<float>(d_model));
  const std::vector<float> wq = random_values(rng, std::size_t{q_heads} * head_dim * d_model, w_scale);
  const std::vector<float> wk = random_values(rng, std::size_t{kv_heads} * head_dim * d_model, w_scale);
  const std::vector<float> wv = random_values(rng, std::size_t{kv_heads} * head_dim * d_model, w_scale);
  const std::vector<float> wo = random_values(rng, std::size_t{d_model} * q_heads * head_dim, w_scale);
  const LayerWeights weights{wq.data(), wk.data(), wv.data(), wo.data()};

  // The model as the cache sees it: head layout, which layers own K/V (one layer, no sharing), and
  // the storage type. f16 storage halves the cache; activations and accumulation stay f32.
  const ModelConfig config(HeadShape(q_heads, kv_heads, head_dim), LayerSharingMap::none(1), kv_dtype::f16);

  // Paged cache: memory comes in blocks of 4 tokens, on demand. Engines use 16 or more; small
  // blocks make the growth visible in a short run.
  constexpr std::int64_t block_size = 4;
  KvCache<PagedLayout> cache(config, PagedLayout{.block_size = block_size});

  // AttentionStack runs the layers in order with a residual connection, and extends the cache by
  // the new tokens itself. (With AttentionLayer directly, call cache.extend(seqs, counts) first.)
  AttentionStack model(config, d_model, std::span(&weights, 1));

  // What one token should cost: K and V, for every KV head, every dim, every layer that owns K/V.
  const std::int64_t formula =
      2 * std::int64_t{kv_heads} * head_dim * config.n_kv_layers() * dtype_bytes(config.dtype());
  std::printf("GQA: %d query heads, %d KV heads, head dim %d, %s cache, blocks of %lld tokens (%lld B)\n", q_heads,
              kv_heads, head_dim, dtype_name(config.dtype()).data(), static_cast<long long>(cache.layout().block_size),
              static_cast<long long>(cache.block_bytes()));
  std::printf("bytes per token: cache says %lld;"
              " 2 x Hkv x d x KV layers x bytes/elem = 2 x %d x %d x %d x %lld = %lld\n\n",
              static_cast<long long>(cache.bytes_per_token()), kv_heads, head_dim, config.n_kv_layers(),
              static_cast<long long>(dtype_bytes(config.dtype())), static_cast<long long>(formula));
  ok &= cache.bytes_per_token() == formula;

  auto report = [&](const char* label, std::span<const seq_id> ids) {
    std::printf("%-9s live %5lld B  reserved %5lld B (%lld blocks in use + %lld free)  live B/token %lld  lengths:",
                label, static_cast<long long>(cache.live_bytes()), static_cast<long long>(cache.reserved_bytes()),
                static_cast<long long>(cache.blocks_in_use()), static_cast<long long>(cache.free_blocks()),
                static_cast<long long>(cache.live_bytes() / cache.live_tokens()));
    std::int64_t tokens = 0, blocks = 0;
    for (seq_id id : ids) {
      std::printf(" [seq %lld: %lld]", static_cast<long long>(id), static_cast<long long>(cache.length(id)));
      tokens += cache.length(id);
      blocks += ceil_div(cache.length(id), block_size);  // whole blocks, the last partly used
    }
    std::printf("\n");
    ok &= cache.live_bytes() == tokens * formula;        // accounting is exact
    ok &= cache.blocks_in_use() == blocks;               // no block more than needed
    ok &= cache.block_bytes() == block_size * formula;   // a block is block_size tokens
  };

  // Prefill: both prompts in one batch. Rows of x are the tokens of sequence 1, then of sequence 2.
  std::vector<seq_id> seqs{1, 2};
  const std::vector<std::int64_t> prompt{5, 3};
  for (seq_id id : seqs) cache.add_sequence(id);
  std::vector<float> x = random_values(rng, static_cast<std::size_t>(prompt[0] + prompt[1]) * d_model, 1.f);
  std::vector<float> y(x.size());
  model.forward(cache, seqs, prompt, x.data(), y.data());
  ok &= all_finite(y);
  report("prefill", seqs);

  // Decode: one new token per live sequence per step. Sequence 2 stops after two tokens (as if it
  // produced end-of-sequence): removing it sends its blocks to the free list, and sequence 1 reuses
  // them as it grows, so reserved memory stays flat while live memory drops.
  for (int step = 1; step <= 5; ++step) {
    const std::vector<std::int64_t> one_each(seqs.size(), 1);
    x = random_values(rng, seqs.size() * d_model, 1.f);  // stands in for the sampled tokens' embeddings
    y.resize(x.size());
    model.forward(cache, seqs, one_each, x.data(), y.data());
    ok &= all_finite(y);
    char label[32];
    std::snprintf(label, sizeof label, "decode %d", step);
    report(label, seqs);
    if (step == 2) {
      cache.remove_sequence(2);
      seqs = {1};
      std::printf("          sequence 2 finished and was removed\n");
    }
  }

  // Free-list blocks stay reserved until handed back explicitly (e.g. under memory pressure).
  cache.release_free_blocks();
  std::printf("\nafter release_free_blocks: reserved %lld B = %lld blocks in use x %lld B\n",
              static_cast<long long>(cache.reserved_bytes()), static_cast<long long>(cache.blocks_in_use()),
              static_cast<long long>(cache.block_bytes()));
  ok &= cache.reserved_bytes() == ceil_div(cache.length(1), block_size) * block_size * formula;

  std::printf("%s\n", ok ? "all checks passed" : "CHECK FAILED");
  return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
