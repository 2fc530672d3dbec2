#include "attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "format/skip_rule.h"
#include "parallel.hpp"
#include "quant.hpp"
#include "sas.hpp"
#include "turboattn/format.h"

namespace turboattn::ref {

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kTile = TA_BLOCK_TOKENS;

// max that propagates NaN (the GPU uses max.NaN.f32): a NaN score poisons its row.
float nan_max(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return std::max(a, b);
}
}  // namespace

float resolve_softmax_scale(float softmax_scale, int dim) {
  return softmax_scale > 0.0f ? softmax_scale : float(1.0 / std::sqrt(double(dim)));
}

float scale_log2(float softmax_scale) { return float(double(softmax_scale) * 1.4426950408889634); }

// rd(acc * st): the exact product (24 x 24 bits fit a double) rounded toward -inf.
float score_bound(float acc, float st) {
  const double exact = double(acc) * double(st);
  float r = float(exact);
  if (double(r) > exact) r = std::nextafter(r, -kInf);
  return r;
}

float p_code_input(float acc, float st, float tile_max) {
  const float y = std::fma(acc, -st, tile_max);  // >= 0 up to rounding: tile_max was rounded down
  return y > 0.0f ? -std::min(y, TA_P_OFFSET_MAX) : -0.0f;  // a NaN y gives 0 (the row is NaN through m)
}

RowState::RowState(int dim) : m(-kInf), l(0.0f), o(size_t(dim), 0.0f) {}

void accumulate_tile(const int8_t* q8, float q_scale, const Int8Tile& tile, int64_t max_pos, bool sas,
                     float skip_x, int dim, RowState& row) {
  const int visible = int(std::clamp<int64_t>(max_pos - tile.first_pos + 1, 0, tile.tokens));
  if (visible == 0) return;
  float acc[kTile], st[kTile];
  float tile_max = -kInf;
  for (int j = 0; j < visible; ++j) {
    const int8_t* kj = tile.k + int64_t(j) * dim;
    int32_t dot = 0;
    for (int c = 0; c < dim; ++c) dot += int32_t(q8[c]) * int32_t(kj[c]);
    acc[j] = float(dot);
    st[j] = q_scale * tile.k_scale[j];
    tile_max = nan_max(tile_max, score_bound(acc[j], st[j]));
  }
  const float m_new = nan_max(row.m, tile_max);
  bool v_nan = false;  // a NaN V scale must reach the output even where every code is 0
  for (int j = 0; j < (tile.shared_v_scale ? 1 : visible); ++j) v_nan = v_nan || std::isnan(tile.v_scale[j]);
  if (tile_max - m_new < skip_x && !v_nan) return;  // the whole tile weighs too little to count
  // P codes are relative to the tile's own maximum (full 8-bit resolution in every tile); the tile is
  // weighted by beta = 2^(tile_max - m_new) and the history rescaled by alpha = 2^(m - m_new).
  const float alpha = std::exp2(row.m - m_new);  // 0 for the first tile (m = -inf)
  const float beta = std::exp2(tile_max - m_new);
  uint8_t p[kTile];
  int32_t p_sum = 0;
  for (int j = 0; j < visible; ++j) {
    const float x = p_code_input(acc[j], st[j], tile_max);
    p[j] = sas ? sas_code(x) : exp2_code(x);
    p_sum += p[j];
  }
  // History scaled first (exact when alpha is 1, so kernels may skip it), then the tile added with
  // one rounding per product.
  row.l = std::fma(float(p_sum), beta, row.l * alpha);
  // Keys outer, channels inner (contiguous V rows); each channel still sees its keys in order.
  for (int c = 0; c < dim; ++c) row.o[c] *= alpha;
  if (tile.shared_v_scale) {
    thread_local std::vector<int32_t> acc;
    acc.assign(size_t(dim), 0);
    for (int j = 0; j < visible; ++j) {
      const int32_t pj = p[j];
      const int8_t* vj = tile.v + int64_t(j) * dim;
      for (int c = 0; c < dim; ++c) acc[c] += pj * int32_t(vj[c]);
    }
    const float w = tile.v_scale[0] * beta;
    for (int c = 0; c < dim; ++c) row.o[c] = std::fma(float(acc[c]), w, row.o[c]);
  } else {
    for (int j = 0; j < visible; ++j) {
      const int32_t pj = p[j];
      const int8_t* vj = tile.v + int64_t(j) * dim;
      const float w = tile.v_scale[j] * beta;
      for (int c = 0; c < dim; ++c) row.o[c] = std::fma(float(pj * int32_t(vj[c])), w, row.o[c]);
    }
  }
  row.m = m_new;
}

RowState merge_states(const std::vector<RowState>& parts, int dim) {
  RowState out(dim);
  for (const RowState& p : parts) out.m = nan_max(out.m, p.m);
  if (out.m == -kInf) return out;
  for (const RowState& p : parts) {
    if (p.m == -kInf) continue;
    const float w = std::exp2(p.m - out.m);
    out.l = std::fma(p.l, w, out.l);
    for (int c = 0; c < dim; ++c) out.o[c] = std::fma(p.o[c], w, out.o[c]);
  }
  return out;
}

void finish_row(const RowState& row, int dim, float* out, float* lse) {
  if (row.m == -kInf) {  // no visible key: defined as zero output
    std::fill(out, out + dim, 0.0f);
    if (lse) *lse = -kInf;
    return;
  }
  const float inv_l = 1.0f / row.l;
  for (int c = 0; c < dim; ++c) out[c] = row.o[c] * inv_l;
  if (lse) *lse = (row.m + std::log2(row.l / float(TA_P_CODE_MAX))) * 0.6931471805599453f;
}

float smoothing_lse_offset(const float* q_row, const float* k_mean, int dim, float softmax_scale) {
  double dot = 0.0;
  for (int c = 0; c < dim; ++c) dot += double(q_row[c]) * double(k_mean[c]);
  return float(double(softmax_scale) * dot);
}

void head_mean(const HeadsView& k, int head, float* mean) {
  for (int c = 0; c < k.dim; ++c) {
    double sum = 0.0;
    for (int t = 0; t < k.tokens; ++t) sum += k.row(t, head)[c];
    const float m = k.tokens ? float(sum / k.tokens) : 0.0f;
    mean[c] = std::isnan(m) ? stored_nan() : m;
  }
}

float quantize_head_block(const HeadsView& x, int head, int t0, int rows, const float* shift, int8_t* codes) {
  std::vector<float> block(size_t(rows) * x.dim);
  for (int r = 0; r < rows; ++r) {
    const float* src = x.row(t0 + r, head);
    for (int c = 0; c < x.dim; ++c) block[size_t(r) * x.dim + c] = shift ? src[c] - shift[c] : src[c];
  }
  return quantize_block_int8(block.data(), rows, x.dim, x.dim, codes, x.dim);
}

Int8KV quantize_kv(const HeadsView& k, const HeadsView& v, bool smooth_k) {
  Int8KV kv;
  kv.tokens = k.tokens, kv.heads = k.heads, kv.dim = k.dim;
  const size_t n = size_t(kv.heads) * kv.tokens * kv.dim;
  kv.k.resize(n), kv.v.resize(n);
  kv.k_scale.resize(size_t(kv.heads) * kv.tokens), kv.v_scale.resize(kv.k_scale.size());
  kv.k_mean.assign(size_t(kv.heads) * kv.dim, 0.0f);
  parallel_for(kv.heads, [&](int64_t h) {
    float* mean = kv.k_mean.data() + size_t(h) * kv.dim;
    if (smooth_k) head_mean(k, int(h), mean);
    for (int t0 = 0; t0 < kv.tokens; t0 += kTile) {
      const int rows = std::min(kTile, kv.tokens - t0);
      const size_t at = size_t(h) * kv.tokens + t0;
      const float ks = quantize_head_block(k, int(h), t0, rows, smooth_k ? mean : nullptr, kv.k.data() + at * kv.dim);
      const float vs = quantize_head_block(v, int(h), t0, rows, nullptr, kv.v.data() + at * kv.dim);
      std::fill(kv.k_scale.begin() + at, kv.k_scale.begin() + at + rows, ks);
      std::fill(kv.v_scale.begin() + at, kv.v_scale.begin() + at + rows, vs);
    }
  });
  return kv;
}

void flashq_attention_int8(const HeadsView& q, const Int8KV& kv, const AttentionOptions& opt, float* out, float* lse) {
  const int d = q.dim, nq = q.tokens, nk = kv.tokens, hq = q.heads;
  const int group = hq / kv.heads;
  const float softmax_scale = resolve_softmax_scale(opt.softmax_scale, d), sl2 = scale_log2(softmax_scale);
  const int q_blocks = TA_BLOCK_COUNT(nq);
  const float skip_x = skip_threshold(nk);
  parallel_for(int64_t(hq) * q_blocks, [&](int64_t item) {
    const int h = int(item / q_blocks), qb = int(item % q_blocks), hk = h / group;
    const int t0 = qb * kTile, rows = std::min(kTile, nq - t0);
    std::vector<int8_t> q8(size_t(rows) * d);
    const float q_scale = quantize_head_block(q, h, t0, rows, nullptr, q8.data()) * sl2;
    const size_t head = size_t(hk) * nk;
    for (int r = 0; r < rows; ++r) {
      const int i = t0 + r;
      const int64_t max_pos = opt.causal ? int64_t(i) + nk - nq : int64_t(nk) - 1;
      RowState row(d);
      for (int j0 = 0; j0 < nk && j0 <= max_pos; j0 += kTile) {
        Int8Tile tile;
        tile.tokens = std::min(kTile, nk - j0);
        tile.first_pos = j0;
        tile.k = kv.k.data() + (head + j0) * d;
        tile.v = kv.v.data() + (head + j0) * d;
        tile.k_scale = kv.k_scale.data() + head + j0;
        tile.v_scale = kv.v_scale.data() + head + j0;
        accumulate_tile(q8.data() + size_t(r) * d, q_scale, tile, max_pos, opt.sas, skip_x, d, row);
      }
      float* row_lse = lse ? lse + size_t(h) * nq + i : nullptr;
      finish_row(row, d, out + (size_t(i) * hq + h) * d, row_lse);
      if (row_lse && row.m != -kInf) *row_lse += smoothing_lse_offset(q.row(i, h), kv.k_mean.data() + size_t(hk) * d, d, softmax_scale);
    }
  });
}

void flashq_attention(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                      const AttentionOptions& opt, float* out, float* lse) {
  flashq_attention_int8(q, quantize_kv(k, v, opt.smooth_k), opt, out, lse);
}

void exact_attention(const HeadsView& q, const HeadsView& k, const HeadsView& v, float softmax_scale,
                     bool causal, double* out, double* lse) {
  const int d = q.dim, nq = q.tokens, nk = k.tokens, hq = q.heads, group = q.heads / k.heads;
  const double scale = resolve_softmax_scale(softmax_scale, d);
  parallel_for(int64_t(hq) * nq, [&](int64_t item) {
    const int h = int(item / nq), i = int(item % nq), hk = h / group;
    const int64_t max_pos = causal ? int64_t(i) + nk - nq : int64_t(nk) - 1;
    const int visible = int(std::clamp<int64_t>(max_pos + 1, 0, nk));
    double* o = out + (size_t(i) * hq + h) * d;
    std::fill(o, o + d, 0.0);
    if (visible == 0) {
      if (lse) lse[size_t(h) * nq + i] = -std::numeric_limits<double>::infinity();
      return;
    }
    std::vector<double> s(static_cast<size_t>(visible));
    double m = -std::numeric_limits<double>::infinity();
    const float* qi = q.row(i, h);
    for (int j = 0; j < visible; ++j) {
      const float* kj = k.row(j, hk);
      double dot = 0.0;
      for (int c = 0; c < d; ++c) dot += double(qi[c]) * double(kj[c]);
      s[size_t(j)] = dot * scale;
      m = std::isnan(s[size_t(j)]) || std::isnan(m) ? std::nan("") : std::max(m, s[size_t(j)]);
    }
    double l = 0.0;
    for (int j = 0; j < visible; ++j) {
      const double p = std::exp(s[size_t(j)] - m);
      l += p;
      const float* vj = v.row(j, hk);
      for (int c = 0; c < d; ++c) o[c] += p * double(vj[c]);
    }
    for (int c = 0; c < d; ++c) o[c] /= l;
    if (lse) lse[size_t(h) * nq + i] = m + std::log(l);
  });
}

}  // namespace turboattn::ref
