// An outside project using an installed kvattn: one MQA decode step must match a hand computation.
#include <kvattn/kvattn.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  using namespace kvattn;
  ModelConfig config(HeadShape(4, 1, 16), LayerSharingMap::none(1), kv_dtype::f32);
  KvCache<PagedLayout> cache(config);
  cache.add_sequence(7);
  std::vector<float> k(2 * 16), v(2 * 16);
  for (int i = 0; i < 16; ++i) {
    k[i] = 1.f; k[16 + i] = 0.f;  // token 0 key: ones; token 1 key: zeros
    v[i] = 1.f; v[16 + i] = 3.f;
  }
  cache.append(7, 2, k.data(), v.data());
  std::vector<float> q(4 * 16, 0.25f), out(4 * 16);
  const seq_id ids[] = {7};
  decode(cache, 0, ids, q.data(), out.data());
  // logits: token 0: 16 * 0.25 / 4 = 1, token 1: 0 -> weights e/(e+1), 1/(e+1)
  const double e = std::exp(1.0), want = (e * 1.0 + 3.0) / (e + 1.0);
  for (float o : out)
    if (!(std::fabs(o - want) <= 1e-5)) {  // a NaN fails too
      std::printf("mismatch: %f vs %f\n", o, want);
      return 1;
    }
  std::printf("kvattn consumer OK: %f\n", out[0]);
  return 0;
}
