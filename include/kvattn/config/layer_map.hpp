// Layer-sharing map for Cross-Layer Attention: for every layer, the layer whose K/V it reads.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvattn/config/errors.hpp"

namespace kvattn {

/// src[l] is the layer whose K/V layer l reads. A producer reads itself (src[l] == l) and owns a
/// cache slot; a consumer reads an earlier producer, computes no K/V and writes nothing.
/// Rules, checked on construction: layer 0 produces; src[l] <= l; a consumer's source is a producer
/// (chains are not collapsed silently: write the producer's index).
class LayerSharingMap {
 public:
  /// Every layer produces its own K/V (plain MHA/GQA/MQA stacks).
  static LayerSharingMap none(int n_layers) {
    check_layer_count(n_layers);
    std::vector<int> src(static_cast<std::size_t>(n_layers));
    for (int l = 0; l < n_layers; ++l) src[static_cast<std::size_t>(l)] = l;
    return LayerSharingMap(std::move(src));
  }

  /// CLA with sharing factor `factor`: runs of `factor` consecutive layers read the K/V of the
  /// run's first layer. When factor does not divide n_layers, the n_layers % factor leftover
  /// layers form a shorter leading run, as in the CLA paper's CLA3 over 10 layers:
  /// {0}, {1,2,3}, {4,5,6}, {7,8,9}.
  static LayerSharingMap cla(int n_layers, int factor) {
    check_layer_count(n_layers);
    if (factor < 1 || factor > n_layers)
      detail::fail<config_error>("CLA factor must be in [1, ", n_layers, "], got ", factor);
    std::vector<int> src(static_cast<std::size_t>(n_layers));
    const int lead = n_layers % factor;
    for (int l = 0; l < n_layers; ++l) {
      int producer = l < lead ? 0 : lead + ((l - lead) / factor) * factor;
      src[static_cast<std::size_t>(l)] = producer;
    }
    return LayerSharingMap(std::move(src));
  }

  /// An explicit map, e.g. the CLA paper's KeepEnds or DenseFront patterns.
  static LayerSharingMap from_sources(std::vector<int> sources) { return LayerSharingMap(std::move(sources)); }

  int n_layers() const { return static_cast<int>(src_.size()); }
  /// Layers that own K/V (= cache slots).
  int n_kv_layers() const { return n_slots_; }
  int source_of(int layer) const { return src_[checked(layer)]; }
  bool is_producer(int layer) const { return source_of(layer) == layer; }
  /// Cache slot that layer reads (its producer's slot).
  int slot_of(int layer) const { return slot_[checked(layer)]; }
  /// The producer layer that owns a slot.
  int producer_of_slot(int slot) const {
    if (slot < 0 || slot >= n_slots_) detail::fail<config_error>("slot ", slot, " out of range [0, ", n_slots_, ")");
    return producers_[static_cast<std::size_t>(slot)];
  }
  std::span<const int> sources() const { return src_; }

  bool operator==(const LayerSharingMap& o) const { return src_ == o.src_; }

 private:
  explicit LayerSharingMap(std::vector<int> src) : src_(std::move(src)) {
    check_layer_count(n_layers());
    slot_.resize(src_.size());
    for (int l = 0; l < n_layers(); ++l) {
      const int s = src_[static_cast<std::size_t>(l)];
      if (s < 0 || s > l)
        detail::fail<config_error>("layer ", l, " reads layer ", s, ": the source must be in [0, ", l, "]");
      if (s == l) {
        slot_[static_cast<std::size_t>(l)] = n_slots_++;
        producers_.push_back(l);
      } else if (src_[static_cast<std::size_t>(s)] != s) {
        detail::fail<config_error>("layer ", l, " reads layer ", s, ", which is itself a consumer (of layer ",
                                   src_[static_cast<std::size_t>(s)], "); name the producer instead");
      } else {
        slot_[static_cast<std::size_t>(l)] = slot_[static_cast<std::size_t>(s)];
      }
    }
  }

  static void check_layer_count(int n) {
    if (n < 1) detail::fail<config_error>("a model needs at least one layer, got ", n);
  }

  std::size_t checked(int layer) const {
    if (layer < 0 || layer >= n_layers())
      detail::fail<config_error>("layer ", layer, " out of range [0, ", n_layers(), ")");
    return static_cast<std::size_t>(layer);
  }

  std::vector<int> src_;
  std::vector<int> slot_;
  std::vector<int> producers_;
  int n_slots_ = 0;
};

}  // namespace kvattn
