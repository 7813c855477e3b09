// kvattn: CPU attention kernels for LLM inference with GQA, MQA and cross-layer KV sharing.
// The umbrella header; the parts can also be included one by one.
#pragma once

#include "kvattn/config/dtype.hpp"
#include "kvattn/config/errors.hpp"
#include "kvattn/config/head_layout.hpp"
#include "kvattn/config/layer_map.hpp"
#include "kvattn/config/model_config.hpp"
#include "kvattn/cache/huge_page_resource.hpp"
#include "kvattn/cache/kv_cache.hpp"
#include "kvattn/cache/kv_view.hpp"
#include "kvattn/cache/layout.hpp"
#include "kvattn/kernels/attention.hpp"
#include "kvattn/kernels/parallel.hpp"
#include "kvattn/kernels/softmax_state.hpp"
#include "kvattn/ops/attention.hpp"
#include "kvattn/ops/layer.hpp"
#include "kvattn/ops/rope.hpp"
