// Cross-Layer Attention (CLA): adjacent layers share one set of K/V, shrinking the KV cache.
//
// Two 20-layer multi-query attention (MQA) stacks with the same weights:
//   MQA       every layer computes and caches its own K/V            (LayerSharingMap::none(20))
//   MQA-CLA2  even layers compute K/V; each odd layer reads the K/V  (LayerSharingMap::cla(20, 2))
//             of the layer below instead of computing its own
// Both get the same tokens: a 16-token prompt, then 8 decode steps. The CLA2 cache holds half the
// bytes, and the outputs differ, because the consumer layers attend over different keys/values.

#include <kvattn/kvattn.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

namespace {

constexpr int n_layers = 20;
constexpr int d_model = 256;
constexpr int q_heads = 4;  // MQA: all 4 query heads read the single KV head
constexpr int kv_heads = 1;
constexpr int head_dim = 64;
constexpr int prompt_tokens = 16;
constexpr int decode_steps = 8;

std::vector<float> random_values(std::mt19937& rng, std::size_t n, float stddev) {
  std::normal_distribution<float> normal(0.f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

/// ||a - b|| / ||b||: 0 when equal, about 1.4 for unrelated vectors of equal norm.
double relative_l2(std::span<const float> a, std::span<const float> b) {
  double diff = 0, ref = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    ref += double{b[i]} * b[i];
  }
  return std::sqrt(diff / ref);
}

void print_cache(const char* name, const kvattn::KvCache<kvattn::PagedLayout>& cache) {
  std::printf("  %-8s %2d KV layers  %5lld B/token  live %6lld B  reserved %6lld B\n", name,
              cache.config().n_kv_layers(), static_cast<long long>(cache.bytes_per_token()),
              static_cast<long long>(cache.live_bytes()), static_cast<long long>(cache.reserved_bytes()));
}

}  // namespace

int main() {
  using namespace kvattn;
  std::mt19937 rng(7);
  bool ok = true;

  // One set of weights per layer, shared by both stacks: layer l of either stack uses the same Wq
  // and Wo, and a CLA producer layer l uses the same Wk/Wv as MQA layer l. So the only difference
  // between the stacks is which K/V the consumer layers read.
  // GPT-2-style initialization: 1/sqrt(d_model) for the input projections, and the output
  // projection scaled down by a further sqrt(2 x layers) so that 20 residual additions (with no
  // norms in between: those are the engine's) keep the hidden state at a sensible scale.
  const float w_scale = 1.f / std::sqrt(static_cast<float>(d_model));
  const float wo_scale = w_scale / std::sqrt(2.f * n_layers);
  const std::size_t q_size = std::size_t{q_heads} * head_dim * d_model;
  const std::size_t kv_size = std::size_t{kv_heads} * head_dim * d_model;
  std::vector<std::vector<float>> wq, wk, wv, wo;
  for (int l = 0; l < n_layers; ++l) {
    wq.push_back(random_values(rng, q_size, w_scale));
    wk.push_back(random_values(rng, kv_size, w_scale));
    wv.push_back(random_values(rng, kv_size, w_scale));
    wo.push_back(random_values(rng, q_size, wo_scale));
  }

  const HeadShape heads(q_heads, kv_heads, head_dim);
  const ModelConfig mqa_config(heads, LayerSharingMap::none(n_layers));
  const ModelConfig cla_config(heads, LayerSharingMap::cla(n_layers, 2));

  std::printf("CLA2 map, the layer whose K/V each layer reads:");
  for (int src : cla_config.layers().sources()) std::printf(" %d", src);
  std::printf("\n\n");

  std::vector<LayerWeights> mqa_weights, cla_weights;
  for (int l = 0; l < n_layers; ++l) {
    const auto i = static_cast<std::size_t>(l);
    mqa_weights.push_back({wq[i].data(), wk[i].data(), wv[i].data(), wo[i].data()});
    // A consumer layer has no K/V projections at all: that is where CLA also saves parameters.
    const bool producer = cla_config.layers().is_producer(l);
    cla_weights.push_back({wq[i].data(), producer ? wk[i].data() : nullptr, producer ? wv[i].data() : nullptr,
                           wo[i].data()});
  }
  AttentionStack mqa(mqa_config, d_model, mqa_weights);
  AttentionStack cla(cla_config, d_model, cla_weights);

  // One cache per model: each is sized by its own config (KV layers = producer layers).
  KvCache<PagedLayout> mqa_cache(mqa_config);
  KvCache<PagedLayout> cla_cache(cla_config);
  const seq_id seq = 0;
  mqa_cache.add_sequence(seq);
  cla_cache.add_sequence(seq);
  const std::span<const seq_id> seqs(&seq, 1);

  // The same input for both: the prompt's rows, then one row per decode step.
  const std::vector<float> inputs =
      random_values(rng, std::size_t{prompt_tokens + decode_steps} * d_model, 1.f);

  // Prefill the prompt.
  const std::int64_t prompt_count = prompt_tokens;
  std::vector<float> y_mqa(std::size_t{prompt_tokens} * d_model), y_cla(y_mqa.size());
  mqa.forward(mqa_cache, seqs, std::span(&prompt_count, 1), inputs.data(), y_mqa.data());
  cla.forward(cla_cache, seqs, std::span(&prompt_count, 1), inputs.data(), y_cla.data());
  std::printf("after prefill of %d tokens:\n", prompt_tokens);
  print_cache("MQA", mqa_cache);
  print_cache("MQA-CLA2", cla_cache);
  std::printf("  prompt outputs differ by %.4f (relative L2)\n\n", relative_l2(y_cla, y_mqa));

  // Decode: one token per step, the same token for both stacks. Next to the distance we print how
  // much the 20 attention blocks changed the hidden state at all (|y - x|, MQA stack), for scale.
  std::printf("step  length  |y_cla - y_mqa| / |y_mqa|   attention share |y_mqa - x| / |y_mqa|\n");
  const std::int64_t one = 1;
  y_mqa.resize(d_model);
  y_cla.resize(d_model);
  for (int step = 0; step < decode_steps; ++step) {
    const std::span<const float> x(inputs.data() + static_cast<std::size_t>(prompt_tokens + step) * d_model, d_model);
    mqa.forward(mqa_cache, seqs, std::span(&one, 1), x.data(), y_mqa.data());
    cla.forward(cla_cache, seqs, std::span(&one, 1), x.data(), y_cla.data());
    const double dist = relative_l2(y_cla, y_mqa);
    std::printf("  %d    %3lld     %.4f                      %.4f\n", step + 1,
                static_cast<long long>(mqa_cache.length(seq)), dist, relative_l2(x, y_mqa));
    ok &= std::isfinite(dist) && dist > 0;
  }

  std::printf("\nafter %d decode steps:\n", decode_steps);
  print_cache("MQA", mqa_cache);
  print_cache("MQA-CLA2", cla_cache);

  // Why the outputs differ: layer 0 is a producer in both stacks with the same weights, so its
  // output is identical. But each odd layer of the CLA2 stack attends with its own queries over the
  // K/V that the layer below computed from *its* input with *its* Wk/Wv, not over K/V computed from
  // its own input with its own Wk/Wv. Different keys and values give a different output, and the
  // difference carries up the residual stream. With random weights nothing relates the two, so the
  // distance is about as large as the attention blocks' whole contribution. That is not an error:
  // a CLA model is a different model, trained with the sharing in place, whose consumer layers learn
  // queries and output projections for the K/V they are given.
  std::printf("\nWhy they differ: each odd CLA2 layer reads the K/V of the layer below (computed from that\n"
              "layer's input with that layer's Wk/Wv) instead of computing its own. With random, untrained\n"
              "weights the two are unrelated, so the distance is about the size of the attention share;\n"
              "a trained CLA model learns its consumer layers' Wq/Wo for the shared K/V.\n");

  // The point of CLA: the cache is exactly half, per token and in total.
  ok &= 2 * cla_cache.bytes_per_token() == mqa_cache.bytes_per_token();
  ok &= 2 * cla_cache.live_bytes() == mqa_cache.live_bytes();
  ok &= 2 * cla_cache.reserved_bytes() == mqa_cache.reserved_bytes();
  std::printf("%s\n", ok ? "all checks passed (CLA2 cache is half of MQA's)" : "CHECK FAILED");
  return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
