// Model configuration: layer count, head layout, layer-sharing map and KV storage type.
#pragma once

#include <cstdint>

#include "kvattn/config/dtype.hpp"
#include "kvattn/config/head_layout.hpp"
#include "kvattn/config/layer_map.hpp"

namespace kvattn {

/// What a KV cache needs to know about a model. Validated on construction.
class ModelConfig {
 public:
  ModelConfig(HeadShape heads, LayerSharingMap layers, kv_dtype dtype = kv_dtype::f16)
      : heads_(heads), layers_(std::move(layers)), dtype_(dtype) {
    visit_dtype(dtype, [](auto) {});  // throws config_error for a value that is no kv_dtype
    kv_bytes_per_token();               // throws if it overflows
  }

  const HeadShape& heads() const { return heads_; }
  const LayerSharingMap& layers() const { return layers_; }
  kv_dtype dtype() const { return dtype_; }
  int n_layers() const { return layers_.n_layers(); }
  int n_kv_layers() const { return layers_.n_kv_layers(); }

  /// Bytes of one K or V row of one KV head: d x element size.
  std::int64_t row_bytes() const { return checked_mul(heads_.head_dim(), dtype_bytes(dtype_), "row bytes"); }

  /// Exact cache bytes one token costs: 2 (K and V) x Hkv x d x KV layers x bytes per element.
  std::int64_t kv_bytes_per_token() const {
    return checked_product("KV bytes per token", 2, heads_.kv_heads(), heads_.head_dim(), n_kv_layers(),
                           dtype_bytes(dtype_));
  }

 private:
  HeadShape heads_;
  LayerSharingMap layers_;
  kv_dtype dtype_;
};

}  // namespace kvattn
