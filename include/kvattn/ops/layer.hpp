// One attention layer over a KV cache: projections (Eigen GEMMs over caller-owned weights), RoPE,
// K/V write (producer layers only), attention, output projection. And a stack that follows the
// layer-sharing map.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <span>
#include <vector>

#include "kvattn/ops/attention.hpp"
#include "kvattn/ops/rope.hpp"

namespace kvattn {

/// Caller-owned f32 weights of one layer, row-major like PyTorch's nn.Linear ([out][in]):
///   wq [Hq*d][d_model], wk and wv [Hkv*d][d_model] (producer layers only; ignored otherwise),
///   wo [d_model][Hq*d]. They are mapped, never copied, and must outlive the layer.
struct LayerWeights {
  const float* wq = nullptr;
  const float* wk = nullptr;
  const float* wv = nullptr;
  const float* wo = nullptr;
};

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Attention block of layer `layer` of a model: y = Wo · attention(RoPE(Wq x), cache).
/// A producer layer also computes K = RoPE(Wk x), V = Wv x and writes them to its cache slot;
/// a consumer layer reads its producer's slot and writes nothing.
class AttentionLayer {
 public:
  AttentionLayer(const ModelConfig& config, int layer, int d_model, LayerWeights weights, RopeConfig rope = {})
      : heads_(config.heads()), layers_(config.layers()), layer_(layer), producer_(config.layers().is_producer(layer)), d_model_(d_model),
        w_(weights), rope_(rope) {
    if (d_model < 1) detail::fail<config_error>("d_model must be >= 1, got ", d_model);
    if (w_.wq == nullptr || w_.wo == nullptr) detail::fail<config_error>("layer ", layer, ": wq and wo are required");
    if (producer_ && (w_.wk == nullptr || w_.wv == nullptr))
      detail::fail<config_error>("layer ", layer, " produces K/V: wk and wv are required");
    (void)rope_.dims_for(heads_.head_dim());
  }

  int layer() const { return layer_; }
  bool is_producer() const { return producer_; }
  int d_model() const { return d_model_; }

  /// Throws unless opt suits forward (checked before anything is written): strides 0, valid
  /// scale and thread count.
  void check_options(const AttentionOptions& opt, const char* what) const {
    if (opt.q_stride != 0 || opt.out_stride != 0)
      detail::fail<shape_error>(what, ": token strides (q ", opt.q_stride, ", out ", opt.out_stride,
                                ") must be 0: they describe attention calls' q and out, and a layer's are its own");
    detail::check_options(opt, std::int64_t{heads_.q_heads()} * heads_.head_dim(), what);
  }

  /// x and y are [sum(counts)][d_model] (sequences in order). The cache must already hold the new
  /// tokens' positions: call cache.extend(seqs, counts) once per step before the first layer
  /// (AttentionStack does it). Token i of a sequence of length L after extend gets position L - n + i.
  /// Each sequence appears at most once.
  /// Of the options, scale, threads, min_pairs_per_thread and fpmath apply; the token strides must
  /// be 0 (the layer's own queries and outputs are dense).
  template <KvLayoutPolicy L>
  void forward(KvCache<L>& cache, std::span<const seq_id> seqs, std::span<const std::int64_t> counts, const float* x,
               float* y, const AttentionOptions& opt = {}) {
    check_options(opt, "layer forward");
    if (cache.config().heads() != heads_ || !(cache.config().layers() == layers_))
      detail::fail<shape_error>("layer ", layer_, ": the cache was built for another model (head layout or sharing map differs)");
    if (seqs.size() != counts.size())
      detail::fail<shape_error>("layer forward: ", seqs.size(), " sequences but ", counts.size(), " token counts");
    detail::ListedOnce listed(seqs.size(), "layer forward");  // producers and consumers alike
    std::int64_t tokens = 0;
    positions_.clear();
    for (std::size_t b = 0; b < seqs.size(); ++b) {
      const std::int64_t len = cache.length(seqs[b]);
      listed.check(seqs[b]);
      if (counts[b] < 0 || counts[b] > len)
        detail::fail<shape_error>("layer forward: sequence ", seqs[b], " has ", counts[b], " new tokens but length ",
                                  len, "; extend the cache first");
      for (std::int64_t i = 0; i < counts[b]; ++i) positions_.push_back(len - counts[b] + i);
      tokens += counts[b];
    }
    if (tokens == 0) return;
    if (x == nullptr || y == nullptr) detail::fail<shape_error>("layer forward: null x or y");
    const int hq = heads_.q_heads(), hkv = heads_.kv_heads(), d = heads_.head_dim();
    const Eigen::Map<const RowMatrix> X(x, tokens, d_model_);
    q_.noalias() = X * Eigen::Map<const RowMatrix>(w_.wq, std::int64_t{hq} * d, d_model_).transpose();
    apply_rope(rope_, q_.data(), tokens, hq, d, q_.cols(), positions_.data());
    attn_.resize(tokens, std::int64_t{hq} * d);
    const auto attend_and_project = [&] {
      prefill(cache, layer_, seqs, counts, q_.data(), attn_.data(), opt);
      Eigen::Map<RowMatrix> Y(y, tokens, d_model_);
      Y.noalias() = attn_ * Eigen::Map<const RowMatrix>(w_.wo, d_model_, std::int64_t{hq} * d).transpose();
    };
    if (!producer_) return attend_and_project();
    k_.noalias() = X * Eigen::Map<const RowMatrix>(w_.wk, std::int64_t{hkv} * d, d_model_).transpose();
    v_.noalias() = X * Eigen::Map<const RowMatrix>(w_.wv, std::int64_t{hkv} * d, d_model_).transpose();
    apply_rope(rope_, k_.data(), tokens, hkv, d, k_.cols(), positions_.data());
    // One write for the batch: all or nothing, also where it copies blocks shared with forks; and
    // taken back (those copies) if the attention or the output projection then fails.
    starts_.resize(seqs.size());
    for (std::size_t b = 0; b < seqs.size(); ++b) starts_[b] = cache.length(seqs[b]) - counts[b];
    auto written = cache.write_guarded(seqs, layer_, starts_, counts, k_.data(), v_.data());
    attend_and_project();
    written.commit();
  }

 private:
  HeadShape heads_;
  LayerSharingMap layers_;
  int layer_;
  bool producer_;
  int d_model_;
  LayerWeights w_;
  RopeConfig rope_;
  RowMatrix q_, k_, v_, attn_;  // reused between calls
  std::vector<std::int64_t> positions_;  // of every new token (RoPE)
  std::vector<std::int64_t> starts_;     // of every sequence's new tokens (the K/V write)
};

/// The attention blocks of a whole model, following its layer-sharing map, with a residual
/// connection per layer: h <- h + attention_l(h). (Norms and MLPs are the engine's.)
class AttentionStack {
 public:
  AttentionStack(const ModelConfig& config, int d_model, std::span<const LayerWeights> weights, RopeConfig rope = {}) {
    if (static_cast<int>(weights.size()) != config.n_layers())
      detail::fail<shape_error>("stack: ", weights.size(), " layer weights for ", config.n_layers(), " layers");
    layers_.reserve(weights.size());
    for (int l = 0; l < config.n_layers(); ++l) layers_.emplace_back(config, l, d_model, weights[static_cast<std::size_t>(l)], rope);
  }

  std::size_t size() const { return layers_.size(); }
  const AttentionLayer& layer(int l) const {
    if (l < 0 || static_cast<std::size_t>(l) >= layers_.size())
      detail::fail<config_error>("layer ", l, " out of range [0, ", layers_.size(), ")");
    return layers_[static_cast<std::size_t>(l)];
  }

  /// Runs counts[b] new tokens of every sequence through all layers: extends the cache, then each
  /// layer in order. x and y are [sum(counts)][d_model]; y may alias x. On an exception the cache
  /// is as it was before the call (KvCache::extend_guarded): lengths, blocks, bytes.
  template <KvLayoutPolicy L>
  void forward(KvCache<L>& cache, std::span<const seq_id> seqs, std::span<const std::int64_t> counts, const float* x,
               float* y, const AttentionOptions& opt = {}) {
    std::int64_t tokens = 0;
    for (std::int64_t c : counts) tokens = checked_add(tokens, std::max<std::int64_t>(c, 0), "tokens");
    if (tokens > 0 && (x == nullptr || y == nullptr)) detail::fail<shape_error>("stack forward: null x or y");
    layers_.front().check_options(opt, "stack forward");
    auto extended = cache.extend_guarded(seqs, counts);  // taken back if anything below throws
    const std::int64_t dm = layers_.front().d_model();
    h_ = Eigen::Map<const RowMatrix>(x, tokens, dm);
    delta_.resize(tokens, dm);
    for (AttentionLayer& layer : layers_) {
      layer.forward(cache, seqs, counts, h_.data(), delta_.data(), opt);
      h_ += delta_;
    }
    Eigen::Map<RowMatrix>(y, tokens, dm) = h_;
    extended.commit();
  }

 private:
  std::vector<AttentionLayer> layers_;
  RowMatrix h_, delta_;
};

}  // namespace kvattn
