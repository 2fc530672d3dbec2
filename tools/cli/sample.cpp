#include "sample.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "reference/attention.hpp"
#include "reference/half.hpp"
#include "turboattn/turboattn.hpp"

namespace turboattn::cli {

namespace {

// LLM-like activations: N(0, 1) with four channels per head 10-50x larger; K's carry an offset.
std::vector<uint16_t> sample_tensor(std::mt19937_64& rng, int tokens, int heads, int dim, char role) {
  std::normal_distribution<float> n01;
  std::uniform_real_distribution<float> mag(10.0f, 50.0f);
  std::vector<float> x(size_t(tokens) * heads * dim);
  for (float& v : x) v = n01(rng);
  std::mt19937_64 channels(uint64_t(heads) * 7919 + uint64_t(dim));
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < 4; ++i) {
      const int c = int(channels() % uint64_t(dim));
      const float sign = (channels() & 1) ? 1.0f : -1.0f, m = mag(rng);
      for (int t = 0; t < tokens; ++t) {
        float& v = x[(size_t(t) * heads + h) * dim + c];
        v = role == 'k' ? sign * m + 0.1f * m * v : (role == 'q' ? 0.1f : 0.3f) * m * v;
      }
    }
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = ref::float_to_half(x[i]);
  return h;
}

struct Errors {
  double rel_l2, cosine;
};
Errors compare(const std::vector<uint16_t>& got, const std::vector<float>& want) {
  double num = 0, den = 0, dot = 0, g2 = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = ref::half_to_float(got[i]), w = want[i];
    num += (g - w) * (g - w), den += w * w, dot += g * w, g2 += g * g;
  }
  return {std::sqrt(num / den), dot / std::sqrt(den * g2)};
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int run_reference_sample(const SampleOptions& opt) {
  const int n = opt.seqlen, d = opt.head_dim, hq = 8, hkv = 2;
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint16_t> q = sample_tensor(rng, n, hq, d, 'q'), k = sample_tensor(rng, n, hkv, d, 'k'),
                        v = sample_tensor(rng, n, hkv, d, 'v');
  ta_tensor tq = tensor(q.data(), TA_DTYPE_F16, {1, n, hq, d}), tk = tensor(k.data(), TA_DTYPE_F16, {1, n, hkv, d}),
            tv = tensor(v.data(), TA_DTYPE_F16, {1, n, hkv, d});
  std::printf("turboattn %s: CPU reference on a sample problem\n", ta_version());
  std::printf("  causal self-attention, %d tokens, %d query heads over %d KV heads, head dim %d, fp16 inputs\n", n, hq, hkv, d);
  std::printf("  inputs: N(0,1) with 4 outlier channels per head (10-50x, K with a per-channel offset)\n\n");

  std::vector<float> exact(q.size());
  // Exact attention through the C API (rounded to fp16, the best an fp16 output can be) and, for the
  // comparisons, the unrounded float64 result through the reference.
  std::vector<uint16_t> exact16(q.size());
  ta_tensor te16 = tensor(exact16.data(), TA_DTYPE_F16, {1, n, hq, d});
  check(ta_attention_exact(&tq, &tk, &tv, nullptr, nullptr, 0.0f, 1, &te16, nullptr));
  {
    std::vector<float> qf(q.size()), kf(k.size()), vf(v.size());
    for (size_t i = 0; i < q.size(); ++i) qf[i] = ref::half_to_float(q[i]);
    for (size_t i = 0; i < k.size(); ++i) kf[i] = ref::half_to_float(k[i]), vf[i] = ref::half_to_float(v[i]);
    auto view = [&](const std::vector<float>& x, int heads) {
      ref::HeadsView h;
      h.data = x.data(), h.tokens = n, h.heads = heads, h.dim = d, h.token_stride = int64_t(heads) * d, h.head_stride = d;
      return h;
    };
    std::vector<double> o(q.size());
    ref::exact_attention(view(qf, hq), view(kf, hkv), view(vf, hkv), 0.0f, true, o.data(), nullptr);
    for (size_t i = 0; i < o.size(); ++i) exact[i] = float(o[i]);
  }

  std::printf("Prefill attention against float64 (rel. L2 error, cosine similarity):\n");
  std::printf("  %-34s %10s %10s %8s\n", "configuration", "rel_l2", "cosine", "time");
  struct Config {
    const char* name;
    int sas, smooth;
  };
  for (const Config& c : {Config{"FlashQ INT8 + SAS (default)", 1, 1}, Config{"FlashQ INT8, exact exponential", 0, 1},
                          Config{"FlashQ INT8 + SAS, no K smoothing", 1, 0}}) {
    std::vector<uint16_t> out(q.size(), 0x7E00);
    ta_tensor to = tensor(out.data(), TA_DTYPE_F16, {1, n, hq, d});
    ta_attention_options o = ta_attention_default_options();
    o.causal = 1, o.use_sas = c.sas, o.smooth_k = c.smooth;
    const auto t0 = std::chrono::steady_clock::now();
    check(ta_attention(&tq, &tk, &tv, nullptr, nullptr, &o, &to, nullptr, nullptr));
    const Errors e = compare(out, exact);
    std::printf("  %-34s %10.5f %10.6f %7.2fs\n", c.name, e.rel_l2, e.cosine, seconds_since(t0));
  }
  {
    const Errors e = compare(exact16, exact);
    std::printf("  %-34s %10.5f %10.6f\n", "float64 rounded to fp16 (floor)", e.rel_l2, e.cosine);
  }

  std::printf("\nDecode over the compressed cache (last token's query, all %d tokens cached):\n", n);
  std::printf("  %-22s %10s %10s %14s %10s\n", "KV heads stored at", "rel_l2", "cosine", "bytes/token", "vs fp16");
  struct Bits {
    const char* name;
    std::vector<int32_t> bits;
  };
  for (const Bits& b : {Bits{"8 bits", {8, 8}}, Bits{"4 bits", {4, 4}}, Bits{"2/4 bits, 50/50", {4, 2}}, Bits{"2 bits", {2, 2}}}) {
    ta_cache_config cfg = ta_cache_default_config();
    cfg.num_kv_heads = hkv, cfg.head_dim = d, cfg.num_pages = TA_BLOCK_COUNT(n), cfg.max_seqs = 1, cfg.max_seq_len = n;
    cfg.head_bits = b.bits.data();
    KvCache cache(cfg);
    const int32_t s = cache.add_sequence();
    int32_t cu[2] = {0, n};
    ta_tensor k3 = tensor(k.data(), TA_DTYPE_F16, {n, hkv, d}), v3 = tensor(v.data(), TA_DTYPE_F16, {n, hkv, d}),
              tcu = tensor(cu, TA_DTYPE_I32, {2});
    cache.write(0, {s}, k3, v3, tcu);
    std::vector<uint16_t> out(size_t(hq) * d, 0x7E00);
    ta_tensor ql = tensor(q.data() + size_t(n - 1) * hq * d, TA_DTYPE_F16, {1, 1, hq, d});
    ta_tensor to = tensor(out.data(), TA_DTYPE_F16, {1, 1, hq, d});
    cache.decode(0, {s}, ql, to);
    const Errors e = compare(out, std::vector<float>(exact.end() - hq * d, exact.end()));
    const ta_cache_memory m = cache.memory();
    std::printf("  %-22s %10.5f %10.6f %14.1f %9.2fx\n", b.name, e.rel_l2, e.cosine, m.bytes_per_token,
                m.fp16_bytes_per_token / m.bytes_per_token);
  }
  std::printf("\n(bytes/token: compressed pages of K and V over all KV heads, metadata included; the INT8 buffer of\n"
              " up to 63 recent tokens per sequence adds a fixed %lld bytes per KV head.)\n",
              (long long)(2 * 64 * d + 2 * 4 * 64));
  return 0;
}

}  // namespace turboattn::cli
