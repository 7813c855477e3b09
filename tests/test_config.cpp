// Head layouts, layer-sharing maps and model configs: validation, queries and exact byte formulas.
#include <gtest/gtest.h>

#include <vector>

#include "reference.hpp"

using namespace kvattn;
using kvattn::testing::expect_error;

TEST(HeadLayout, KindsAndGroups) {
  EXPECT_EQ(HeadShape(32, 32, 128).kind(), attention_kind::mha);
  EXPECT_EQ(HeadShape(32, 8, 128).kind(), attention_kind::gqa);
  EXPECT_EQ(HeadShape(32, 1, 128).kind(), attention_kind::mqa);
  EXPECT_EQ(HeadShape(1, 1, 64).kind(), attention_kind::mha);
  const HeadShape g(32, 8, 128);
  EXPECT_EQ(g.group_size(), 4);
  // Contiguous groups: query heads 0-3 read KV head 0, 4-7 read KV head 1, ...
  EXPECT_EQ(g.kv_head_of(0), 0);
  EXPECT_EQ(g.kv_head_of(3), 0);
  EXPECT_EQ(g.kv_head_of(4), 1);
  EXPECT_EQ(g.kv_head_of(31), 7);
}

TEST(HeadLayout, StaticValuesAreCompileTimeConstants) {
  using L = HeadLayout<32, 8, 128>;
  static_assert(L::static_group_size == 4);
  static_assert(L::static_head_dim == 128);
  static_assert(HeadLayout<dynamic, 8, 64>::static_group_size == dynamic);
  constexpr L l;
  static_assert(l.kind() == attention_kind::gqa);
  EXPECT_EQ(HeadShape(l), HeadShape(32, 8, 128));
  expect_error<config_error>([&] { HeadLayout<32, 8, 128>(HeadShape(32, 4, 128)); }, "KV heads fixed at compile time to 8 but given 4");  // static mismatch
  EXPECT_NO_THROW((HeadLayout<dynamic, dynamic, 90>(22, 1, 90)));
}

TEST(HeadLayout, RejectsInvalid) {
  expect_error<config_error>([&] { HeadShape(0, 1, 64); }, "query heads must be >= 1, got 0");
  expect_error<config_error>([&] { HeadShape(8, 0, 64); }, "KV heads must be >= 1, got 0");
  expect_error<config_error>([&] { HeadShape(8, 3, 64); }, "KV heads (3) must divide query heads (8)");   // 3 does not divide 8
  expect_error<config_error>([&] { HeadShape(8, 2, 15); }, "head dim must be in [16, 512], got 15");   // below min head dim
  expect_error<config_error>([&] { HeadShape(8, 2, 513); }, "head dim must be in [16, 512], got 513");  // above max head dim
  for (int d : {16, 46, 90, 512}) EXPECT_NO_THROW(HeadShape(8, 2, d));
}

static std::vector<int> sources(const LayerSharingMap& m) { return {m.sources().begin(), m.sources().end()}; }

TEST(LayerSharingMap, NoSharing) {
  const auto m = LayerSharingMap::none(4);
  EXPECT_EQ(m.n_kv_layers(), 4);
  for (int l = 0; l < 4; ++l) {
    EXPECT_TRUE(m.is_producer(l));
    EXPECT_EQ(m.slot_of(l), l);
  }
}

TEST(LayerSharingMap, Cla2Over10) {
  const auto m = LayerSharingMap::cla(10, 2);
  EXPECT_EQ(sources(m), (std::vector<int>{0, 0, 2, 2, 4, 4, 6, 6, 8, 8}));
  EXPECT_EQ(m.n_kv_layers(), 5);
  EXPECT_EQ(m.slot_of(3), 1);
  EXPECT_EQ(m.producer_of_slot(4), 8);
  EXPECT_FALSE(m.is_producer(9));
}

TEST(LayerSharingMap, Cla3Over10LeadingShortRun) {
  // As in the CLA paper: {0}, {1,2,3}, {4,5,6}, {7,8,9}.
  const auto m = LayerSharingMap::cla(10, 3);
  EXPECT_EQ(sources(m), (std::vector<int>{0, 1, 1, 1, 4, 4, 4, 7, 7, 7}));
  EXPECT_EQ(m.n_kv_layers(), 4);
  EXPECT_EQ(LayerSharingMap::cla(11, 3).n_kv_layers(), 4);  // {0,1}, then three runs of 3
  EXPECT_EQ(sources(LayerSharingMap::cla(11, 3)), (std::vector<int>{0, 0, 2, 2, 2, 5, 5, 5, 8, 8, 8}));
  EXPECT_EQ(LayerSharingMap::cla(20, 4).n_kv_layers(), 5);
  EXPECT_EQ(LayerSharingMap::cla(5, 5).n_kv_layers(), 1);
  EXPECT_EQ(LayerSharingMap::cla(5, 1), LayerSharingMap::none(5));
}

TEST(LayerSharingMap, NonUniformPatternsFromThePaper) {
  // KeepEnds over 20 layers: 0 alone, pairs (1,2)...(17,18), 19 alone -> 11 KV layers.
  std::vector<int> keep_ends{0};
  for (int p = 1; p < 19; p += 2) keep_ends.insert(keep_ends.end(), {p, p});
  keep_ends.push_back(19);
  const auto ke = LayerSharingMap::from_sources(keep_ends);
  EXPECT_EQ(ke.n_kv_layers(), 11);
  EXPECT_EQ(ke.slot_of(2), ke.slot_of(1));
  EXPECT_EQ(ke.slot_of(19), 10);
  // DenseFront: 0-9 own, 10-18 reuse 9, 19 own -> 11 KV layers.
  std::vector<int> dense_front;
  for (int l = 0; l < 10; ++l) dense_front.push_back(l);
  for (int l = 10; l < 19; ++l) dense_front.push_back(9);
  dense_front.push_back(19);
  const auto df = LayerSharingMap::from_sources(dense_front);
  EXPECT_EQ(df.n_kv_layers(), 11);
  EXPECT_EQ(df.slot_of(18), 9);
  EXPECT_EQ(df.slot_of(19), 10);
  EXPECT_TRUE(df.is_producer(9));
  EXPECT_FALSE(df.is_producer(10));
}

TEST(LayerSharingMap, RejectsInvalidMaps) {
  expect_error<config_error>([&] { LayerSharingMap::from_sources({}); }, "a model needs at least one layer, got 0");
  expect_error<config_error>([&] { LayerSharingMap::from_sources({1, 1}); }, "layer 0 reads layer 1");     // layer 0 must produce
  expect_error<config_error>([&] { LayerSharingMap::from_sources({0, 2, 2}); }, "layer 1 reads layer 2");  // src > l
  expect_error<config_error>([&] { LayerSharingMap::from_sources({0, -1}); }, "layer 1 reads layer -1");    // negative
  expect_error<config_error>([&] { LayerSharingMap::from_sources({0, 0, 1}); }, "layer 2 reads layer 1, which is itself a consumer");  // reads a consumer
  expect_error<config_error>([&] { LayerSharingMap::cla(10, 0); }, "CLA factor must be in [1, 10], got 0");
  expect_error<config_error>([&] { LayerSharingMap::cla(10, 11); }, "CLA factor must be in [1, 10], got 11");
  expect_error<config_error>([&] { LayerSharingMap::none(0); }, "a model needs at least one layer, got 0");
  const auto m = LayerSharingMap::cla(4, 2);
  expect_error<config_error>([&] { (void)m.slot_of(4); }, "layer 4 out of range");
  expect_error<config_error>([&] { (void)m.is_producer(-1); }, "layer -1 out of range");
  expect_error<config_error>([&] { (void)m.producer_of_slot(2); }, "slot 2 out of range");
}

TEST(ModelConfig, BytesPerToken) {
  // 2 x Hkv x d x KV layers x bytes per element.
  EXPECT_EQ(ModelConfig(HeadShape(16, 1, 128), LayerSharingMap::none(20), kv_dtype::bf16).kv_bytes_per_token(),
            2 * 1 * 128 * 20 * 2);
  EXPECT_EQ(ModelConfig(HeadShape(16, 1, 128), LayerSharingMap::cla(20, 2), kv_dtype::f16).kv_bytes_per_token(),
            2 * 1 * 128 * 10 * 2);
  EXPECT_EQ(ModelConfig(HeadShape(32, 8, 128), LayerSharingMap::none(32), kv_dtype::f32).kv_bytes_per_token(),
            2 * 8 * 128 * 32 * 4);
  EXPECT_EQ(ModelConfig(HeadShape(45, 1, 46), LayerSharingMap::none(20), kv_dtype::f16).kv_bytes_per_token(),
            2 * 46 * 20 * 2);
}

TEST(ModelConfig, RejectsAValueThatIsNoDtype) {
  expect_error<config_error>([&] { ModelConfig(HeadShape(4, 2, 16), LayerSharingMap::none(2), static_cast<kv_dtype>(7)); }, "unknown kv_dtype value 7");
}

TEST(CheckedArithmetic, Overflow) {
  EXPECT_EQ(checked_mul(1 << 20, 1 << 20), std::int64_t{1} << 40);
  expect_error<overflow_error>([&] { checked_mul(std::int64_t{1} << 40, std::int64_t{1} << 30); }, "1099511627776 x 1073741824");
  expect_error<overflow_error>([&] { checked_add(INT64_MAX, 1); }, "9223372036854775807 + 1");
  expect_error<overflow_error>([&] { checked_mul(-1, 2); }, "-1 x 2");
  expect_error<overflow_error>([&] { checked_product("x", 1 << 30, 1 << 30, 1 << 30); }, "x overflows 64 bits");
  EXPECT_EQ(ceil_div(INT64_MAX, 16), INT64_MAX / 16 + 1);
  EXPECT_EQ(ceil_div(32, 16), 2);
  EXPECT_EQ(ceil_div(0, 16), 0);
}

TEST(Dtype, RoundToNearestEven) {
  // bf16 keeps 8 mantissa bits: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> even (1).
  EXPECT_EQ(round_to_dtype(1.f + 1.f / 256, kv_dtype::bf16), 1.f);
  EXPECT_EQ(round_to_dtype(1.f + 3.f / 256, kv_dtype::bf16), 1.f + 4.f / 256);
  // f16 keeps 10 bits: 1 + 2^-11 ties to 1, 1 + 3 x 2^-11 ties up to 1 + 2^-9.
  EXPECT_EQ(round_to_dtype(1.f + 1.f / 2048, kv_dtype::f16), 1.f);
  EXPECT_EQ(round_to_dtype(1.f + 3.f / 2048, kv_dtype::f16), 1.f + 4.f / 2048);
  EXPECT_EQ(round_to_dtype(0.1f, kv_dtype::f32), 0.1f);
  EXPECT_EQ(dtype_bytes(kv_dtype::f32), 4);
  EXPECT_EQ(dtype_bytes(kv_dtype::bf16), 2);
}
