#include "head_bits.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "turboattn/format.h"

namespace turboattn::ref {

namespace {
// gap * std of one head of x, minus `shift` per channel (may be null).
double gap_times_std(const HeadsView& x, int head, const float* shift) {
  const int d = x.dim;
  double gap_sum = 0.0, sum = 0.0, sum_sq = 0.0;
  int64_t groups = 0;
  for (int t0 = 0; t0 < x.tokens; t0 += TA_BLOCK_TOKENS) {
    const int t1 = std::min(x.tokens, t0 + TA_BLOCK_TOKENS);
    for (int c = 0; c < d; ++c) {
      double lo = INFINITY, hi = -INFINITY;
      for (int t = t0; t < t1; ++t) {
        const double v = double(x.row(t, head)[c]) - (shift ? shift[c] : 0.0f);
        lo = std::min(lo, v), hi = std::max(hi, v);
        sum += v, sum_sq += v * v;
      }
      gap_sum += hi - lo;
      ++groups;
    }
  }
  const double n = double(x.tokens) * d;
  const double mean = sum / n;
  const double stdev = std::sqrt(std::max(0.0, sum_sq / n - mean * mean));
  return groups ? gap_sum / double(groups) * stdev : 0.0;
}
}  // namespace

std::vector<float> head_priority(const HeadsView& k, const HeadsView& v) {
  const int heads = k.heads;
  std::vector<double> raw_k(static_cast<size_t>(heads)), raw_v(static_cast<size_t>(heads));
  std::vector<float> mean(static_cast<size_t>(k.dim));
  for (int h = 0; h < heads; ++h) {
    head_mean(k, h, mean.data());
    raw_k[size_t(h)] = gap_times_std(k, h, mean.data());
    raw_v[size_t(h)] = gap_times_std(v, h, nullptr);
  }
  const double mk = std::accumulate(raw_k.begin(), raw_k.end(), 0.0) / heads;
  const double mv = std::accumulate(raw_v.begin(), raw_v.end(), 0.0) / heads;
  std::vector<float> out(static_cast<size_t>(heads));
  for (int h = 0; h < heads; ++h)
    out[size_t(h)] = float((mk > 0 ? raw_k[size_t(h)] / mk : 0.0) + (mv > 0 ? raw_v[size_t(h)] / mv : 0.0));
  return out;
}

namespace {
// 2 bits for the n lowest of priority[first, first + count) (ties: lower index first).
void lowest_get_2_bits(const std::vector<float>& priority, size_t first, size_t count, size_t n, std::vector<int>& bits) {
  std::vector<size_t> order(count);
  std::iota(order.begin(), order.end(), first);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return priority[a] < priority[b]; });
  for (size_t i = 0; i < n; ++i) bits[order[i]] = TA_BITS_2;
}
}  // namespace

std::vector<int> assign_head_bits(const std::vector<float>& priority, int layers, int kv_heads, float fraction_2bit) {
  std::vector<int> bits(size_t(layers) * kv_heads, TA_BITS_4);
  const size_t n2 = size_t(std::lround(double(fraction_2bit) * kv_heads));
  for (int l = 0; l < layers; ++l) lowest_get_2_bits(priority, size_t(l) * kv_heads, size_t(kv_heads), n2, bits);
  return bits;
}

std::vector<int> assign_head_bits_across_layers(const std::vector<float>& priority, int layers, int kv_heads,
                                                float fraction_2bit) {
  const size_t heads = size_t(layers) * kv_heads;
  std::vector<int> bits(heads, TA_BITS_4);
  lowest_get_2_bits(priority, 0, heads, size_t(std::lround(double(fraction_2bit) * double(heads))), bits);
  return bits;
}

}  // namespace turboattn::ref
