// Measures the CPU reference's error against float64 attention over many fresh random inputs and
// prints the tables of docs/FORMATS.md ("Measured error"). Run: build/bench/reference_errors
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "reference/attention.hpp"
#include "reference/kv_cache.hpp"
#include "../tests/test_util.hpp"

using namespace turboattn;
using test::InputKind;

namespace {

struct Stat {
  double sum = 0, max = 0, cos_min = 1;
  int n = 0;
  void add(const test::ErrorStats& e) {
    sum += e.rel_l2, max = std::max(max, e.rel_l2), cos_min = std::min(cos_min, e.cosine), ++n;
  }
};

test::ErrorStats prefill(std::mt19937_64& rng, int d, int n, InputKind kind, bool sas, bool smooth) {
  const int hq = 4, hkv = 2;
  auto q = test::make_input(rng, n, hq, d, kind, 'q'), k = test::make_input(rng, n, hkv, d, kind, 'k'),
       v = test::make_input(rng, n, hkv, d, kind, 'v');
  test::to_half(q), test::to_half(k), test::to_half(v);
  std::vector<float> out(q.size());
  std::vector<double> want(q.size());
  ref::AttentionOptions opt;
  opt.causal = true, opt.sas = sas, opt.smooth_k = smooth;
  ref::flashq_attention(test::view_of(q, n, hq, d), test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d), opt, out.data(), nullptr);
  ref::exact_attention(test::view_of(q, n, hq, d), test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d), 0.0f, true, want.data(),
                       nullptr);
  return test::compare(out, want);
}

test::ErrorStats decode(std::mt19937_64& rng, int d, int n, InputKind kind, const std::vector<int>& bits) {
  const int hq = 8, hkv = 2;
  auto k = test::make_input(rng, n, hkv, d, kind, 'k'), v = test::make_input(rng, n, hkv, d, kind, 'v'),
       q = test::make_input(rng, 1, hq, d, kind, 'q');
  test::to_half(q), test::to_half(k), test::to_half(v);
  ref::CacheConfig c;
  c.kv_heads = hkv, c.head_dim = d, c.num_pages = n / 64 + 1, c.max_seqs = 1, c.max_seq_len = n, c.bits = bits;
  ref::KvCache cache(c);
  const int s = cache.add_sequence();
  cache.write(0, s, test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d));
  std::vector<float> out(q.size());
  cache.decode(0, s, test::view_of(q, 1, hq, d), 0.0f, true, 0, out.data());
  std::vector<double> want(q.size());
  ref::exact_attention(test::view_of(q, 1, hq, d), test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d), 0.0f, true, want.data(),
                       nullptr);
  return test::compare(out, want);
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 20;
  std::mt19937_64 rng(std::random_device{}());
  std::printf("Prefill (causal, 4 query heads over 2 KV heads, fp16 inputs), rel. L2 vs float64 over %d draws:\n\n", trials);
  std::printf("| head dim | tokens | inputs | SAS | K smoothing | mean rel L2 | max rel L2 | min cosine |\n|---|---|---|---|---|---|---|---|\n");
  for (int d : {64, 128, 256})
    for (int n : {257, 1000})
      for (InputKind kind : {InputKind::Normal, InputKind::Outliers})
        for (auto [sas, smooth] : {std::pair{true, true}, {false, true}, {true, false}}) {
          if (n != 1000 && (!sas || !smooth)) continue;
          Stat s;
          for (int t = 0; t < trials; ++t) s.add(prefill(rng, d, n, kind, sas, smooth));
          std::printf("| %d | %d | %s | %s | %s | %.4f | %.4f | %.5f |\n", d, n, test::kind_name(kind), sas ? "on" : "off",
                      smooth ? "on" : "off", s.sum / s.n, s.max, s.cos_min);
        }
  std::printf("\nDecode over the compressed cache (1 query token, 8 query heads over 2 KV heads, SAS), rel. L2 vs float64:\n\n");
  std::printf("| head dim | tokens | inputs | KV bits | mean rel L2 | max rel L2 | min cosine |\n|---|---|---|---|---|---|---|\n");
  for (int d : {64, 128})
    for (int n : {1000, 4000})
      for (InputKind kind : {InputKind::Normal, InputKind::Outliers})
        for (const auto& [name, bits] : {std::pair<std::string, std::vector<int>>{"8", {8, 8}}, {"4", {4, 4}}, {"4/2 mix", {4, 2}}, {"2", {2, 2}}}) {
          Stat s;
          for (int t = 0; t < trials; ++t) s.add(decode(rng, d, n, kind, bits));
          std::printf("| %d | %d | %s | %s | %.4f | %.4f | %.5f |\n", d, n, test::kind_name(kind), name.c_str(), s.sum / s.n, s.max,
                      s.cos_min);
        }
  return 0;
}
