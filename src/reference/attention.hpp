// Attention on the CPU: the FlashQ + SAS reference (integer arithmetic emulated exactly, the online
// softmax over 64-key tiles exactly as docs/FORMATS.md orders it) and exact float64 attention.
#pragma once

#include <cstdint>
#include <vector>

namespace turboattn::ref {

// One sequence's tokens x heads x dim floats; the last dimension is contiguous.
struct HeadsView {
  const float* data = nullptr;
  int tokens = 0, heads = 0, dim = 0;
  int64_t token_stride = 0, head_stride = 0;
  const float* row(int t, int h) const { return data + t * token_stride + h * head_stride; }
};

struct AttentionOptions {
  float softmax_scale = 0.0f;  // 0 means 1/sqrt(dim)
  bool causal = false;         // bottom-right aligned when q_len != kv_len
  bool sas = true;             // SAS exponential; false: exact exponential, same P quantization
  bool smooth_k = true;        // subtract the per-head mean of K over the sequence's tokens
};

float resolve_softmax_scale(float softmax_scale, int dim);
// softmax_scale * log2(e), rounded once to fp32: the factor folded into every Q scale.
float scale_log2(float softmax_scale);

// A softmax tile in the compute format: up to 64 keys, INT8 K and V rows with their scales.
struct Int8Tile {
  int tokens = 0;
  int64_t first_pos = 0;        // KV position of the tile's first token
  const int8_t* k = nullptr;    // [tokens][dim]
  const int8_t* v = nullptr;    // [tokens][dim]
  const float* k_scale = nullptr;  // per token
  const float* v_scale = nullptr;  // per token, or v_scale[0] for all when shared_v_scale
  bool shared_v_scale = true;
};

// Online-softmax state of one query row: running max m (base 2), running sum l of P codes, and the
// unnormalized output o.
struct RowState {
  float m, l;
  std::vector<float> o;
  explicit RowState(int dim);
};

// A tile's maximum as P codes take it (docs/FORMATS.md 1.5): each visible key contributes rd(acc * st),
// the score rounded down, so that no key's y below is negative beyond rounding.
float score_bound(float acc, float st);

// The input x <= 0 of key's P code: -clamp(rn(tile_max - acc * st), 0, TA_P_OFFSET_MAX) in one fma
// (a NaN gives 0; such a row is NaN through its maximum).
float p_code_input(float acc, float st, float tile_max);

// Adds one tile to a row. q8 is the row's INT8 codes, q_scale its block scale times scale_log2.
// Keys at positions > max_pos are masked; skip_x is the skip rule's threshold (format/skip_rule.h).
void accumulate_tile(const int8_t* q8, float q_scale, const Int8Tile& tile, int64_t max_pos, bool sas,
                     float skip_x, int dim, RowState& row);

// Merges split-KV partial states in order (docs/FORMATS.md, "Split-KV merge").
RowState merge_states(const std::vector<RowState>& parts, int dim);

// out = o / l; lse (natural log) = (m + log2(l / 255)) * ln 2. A row that saw no key gets out = 0 and
// lse = -inf.
void finish_row(const RowState& row, int dim, float* out, float* lse);

// K smoothing shifts every score of a row by -softmax_scale * (q . mean); the log-sum-exp adds it back.
float smoothing_lse_offset(const float* q_row, const float* k_mean, int dim, float softmax_scale);

// One sequence's K and V in the compute format: per KV head, INT8 rows [heads][tokens][dim] with
// per-token scales (each 64-token block's scale repeated), and the smoothing mean subtracted from K
// (zeros without smoothing).
struct Int8KV {
  int tokens = 0, heads = 0, dim = 0;
  std::vector<int8_t> k, v;
  std::vector<float> k_scale, v_scale;  // [heads][tokens]
  std::vector<float> k_mean;            // [heads][dim]
};
Int8KV quantize_kv(const HeadsView& k, const HeadsView& v, bool smooth_k);

// FlashQ + SAS attention of one sequence. q: [nq][hq][d], k, v: [nk][hkv][d]; out: [nq][hq][d]
// contiguous; lse: [hq][nq] or null.
void flashq_attention(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                      const AttentionOptions& opt, float* out, float* lse);
// The same over K and V already quantized (opt.smooth_k is not used: kv carries its mean).
void flashq_attention_int8(const HeadsView& q, const Int8KV& kv, const AttentionOptions& opt, float* out, float* lse);

// Exact attention in float64, same shapes and masking.
void exact_attention(const HeadsView& q, const HeadsView& k, const HeadsView& v, float softmax_scale,
                     bool causal, double* out, double* lse);

// Per-channel mean of one head's K over the sequence: mean[c] = fp32(sum_t k[t][c] / tokens), summed
// in float64.
void head_mean(const HeadsView& k, int head, float* mean);

// Quantizes one head's rows [t0, t0 + rows) of x, minus `shift` (per channel, may be null), as one
// INT8 block: codes [rows][dim], returns the scale.
float quantize_head_block(const HeadsView& x, int head, int t0, int rows, const float* shift, int8_t* codes);

}  // namespace turboattn::ref
