// One 64-key tile of FlashQ + SAS prefill for one warp's 16 query rows, in the order and with the fp32
// operations of docs/FORMATS.md, section 1.5: from the int32 scores (m16n8 accumulator layout) to the
// P codes, packed as the A fragments of P V, and the weights of the tile's contribution; then the O
// update and the epilogue. Every prefill kernel runs these, so all give the same bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda/common/mma.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/common/sas.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

struct PrefillParams {
  const int8_t* q;   // [B, Hq, Nq, D]
  const int8_t* k;   // [B, Hkv, Nk, D]
  const int8_t* vt;  // [B, Hkv, D, nk_padded], keys permuted by vt_position
  const float* q_scale;  // [B, Hq, q_blocks]
  const float* k_scale;  // [B, Hkv, k_blocks]
  const float* v_scale;  // [B, Hkv, k_blocks]
  const float* lse_offset;  // [B, Hq, Nq] (K smoothing) or null
  void* out;
  int64_t out_b, out_n, out_h;  // element strides of out [B, Nq, Hq, D]
  float* lse;                   // [B, Hq, Nq] with strides (lse_b, lse_h, 1), or null
  int64_t lse_b, lse_h;
  int hq, hkv, nq, nk, nk_padded;
  float scale_log2;  // softmax_scale * log2(e)
  bool causal;
};

// Tiles of 64 keys a 64-row Q block sees: with causal masking its last row sees keys up to
// m0 + 63 + nk - nq.
__device__ __forceinline__ int visible_tiles(const PrefillParams& p, int q_block) {
  const int k_blocks = TA_BLOCK_COUNT(p.nk);
  if (!p.causal) return k_blocks;
  const int64_t last_key = int64_t(q_block) * TA_BLOCK_TOKENS + TA_BLOCK_TOKENS - 1 + p.nk - p.nq;
  return last_key < 0 ? 0 : int(min(int64_t(k_blocks), last_key / TA_BLOCK_TOKENS + 1));
}

// Only tiles at the sequence's end, on the causal diagonal, or past the last row need masks.
// warp_row: the first of the warp's 16 rows. (Computing once per warp the first tile that needs masks
// takes fewer instructions but measured 3-5% slower in the mma.sync kernel at D = 64 on an H200, and
// no faster in the Hopper kernel.)
__device__ __forceinline__ bool tile_needs_mask(const PrefillParams& p, int tile, int warp_row) {
  return (tile + 1) * TA_BLOCK_TOKENS > p.nk || warp_row + 16 > p.nq ||
         (p.causal && int64_t(tile + 1) * TA_BLOCK_TOKENS - 1 > int64_t(warp_row) + p.nk - p.nq);
}

// A thread's running maximum and sum of its two rows (g and g + 8 of its warp's 16).
struct RowState {
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
};

// One tile's P codes and what its P V adds to O, for a thread's two rows.
struct TileP {
  uint32_t pa[2][4];  // P V's A fragments: pa[kp] holds keys 32 kp.. in stored (vt_position) order
  float alpha[2];     // O's scale before the tile's contribution
  float svb[2];       // sv * beta; 0 for a row that skips the tile (even when sv is NaN)
  bool warp_uses;     // some row of the warp uses the tile
  bool rescale;       // some row of the warp has alpha != 1
};

// Scores, masking, the skip rule, alpha and beta, P codes and l for tile `tile` (keys 64 tile..).
// s_acc[4 nt + i]: row g + 8 (i / 2), key 8 nt + 2 t + i % 2 of the tile. st = q_scale * k_scale.
// row0: the thread's first row (warp_row + g).
template <bool kSas>
__device__ __forceinline__ TileP softmax_tile(const int32_t (&s_acc)[32], float st, float sv_scale, bool need_mask,
                                              const PrefillParams& p, int tile, int row0, int t, float skip_x, RowState& rs) {
  constexpr int kSTiles = TA_BLOCK_TOKENS / 8;
  float a[2][kSTiles][2];  // the int32 scores as fp32; the scores are a * st (1.5)
  float amax[2], tile_max[2];  // the largest a (-inf: every key masked), and the tile maximum
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) a[r][nt][e] = small_int_to_float(s_acc[4 * nt + 2 * r + e]);
  if (need_mask) {  // apart from the scores, so that the common tile's scores compile without branches
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      const int64_t max_key = p.causal ? int64_t(row) + p.nk - p.nq : int64_t(p.nk) - 1;
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = tile * TA_BLOCK_TOKENS + 8 * nt + 2 * t + e;
          if (!(row < p.nq && key < p.nk && key <= max_key)) a[r][nt][e] = -INFINITY;
        }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    amax[r] = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) amax[r] = fmaxf(amax[r], a[r][nt][e]);
    amax[r] = fmaxf(amax[r], __shfl_xor_sync(0xffffffffu, amax[r], 1));
    amax[r] = fmaxf(amax[r], __shfl_xor_sync(0xffffffffu, amax[r], 2));
    tile_max[r] = tile_bound(amax[r], st);
  }

  TileP tp;
  float beta[2];
  bool skip[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = nan_max(rs.m[r], tile_max[r]);
    skip[r] = amax[r] == -INFINITY || (tile_max[r] - m_new < skip_x && !isnan(sv_scale));
    tp.alpha[r] = skip[r] ? 1.0f : ex2_approx(rs.m[r] - m_new);
    beta[r] = skip[r] ? 0.0f : ex2_approx(tile_max[r] - m_new);
    if (!skip[r]) rs.m[r] = m_new;
  }

  // P codes, packed straight into the A fragments of P V (the keys' order matches vt_position).
  uint32_t p_sum[2] = {0u, 0u};
  const POffset offset[2] = {POffset(st, tile_max[0]), POffset(st, tile_max[1])};
#pragma unroll
  for (int kp = 0; kp < 2; ++kp)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int nt = 4 * kp + 2 * half;
        const POffset& ys = offset[r];
        const auto codes_x2 = [](float a, float b) { return kSas ? sas_codes_x2(a, b) : exp2_codes_x2(a, b); };
        const uint32_t y0 = codes_x2(ys(a[r][nt][0]), ys(a[r][nt][1]));
        const uint32_t y1 = codes_x2(ys(a[r][nt + 1][0]), ys(a[r][nt + 1][1]));
        const uint32_t codes = __byte_perm(y0, y1, 0x6420);
        tp.pa[kp][2 * half + r] = codes;
        p_sum[r] = __dp4a(codes, 0x01010101u, p_sum[r]);  // sum of the 4 codes
      }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rs.l[r] = __fmaf_rn(small_int_to_float(int32_t(p_sum[r])), beta[r], __fmul_rn(rs.l[r], tp.alpha[r]));
    tp.svb[r] = skip[r] ? 0.0f : __fmul_rn(sv_scale, beta[r]);
  }
  tp.warp_uses = __any_sync(0xffffffffu, !(skip[0] && skip[1]));
  tp.rescale = !__all_sync(0xffffffffu, tp.alpha[0] == 1.0f && tp.alpha[1] == 1.0f);
  return tp;
}

// O's n-tiles [first, first + kTiles) = fma(acc, sv beta, o alpha), acc[4 nt + i] being row g + 8 (i / 2),
// channel 8 (first + nt) + 2 t + i % 2. o alpha is o itself when no row of the warp rescales.
template <int kTiles, int kOTiles>
__device__ __forceinline__ void accumulate_o(float (&o)[kOTiles][4], int first, const int32_t (&acc)[4 * kTiles], const TileP& tp) {
  if (tp.rescale) {
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[first + nt][i] = __fmul_rn(o[first + nt][i], tp.alpha[i / 2]);
  }
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[first + nt][i] = __fmaf_rn(small_int_to_float(acc[4 * nt + i]), tp.svb[i / 2], o[first + nt][i]);
}

template <typename Out>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Epilogue of a thread's two rows: row sums across the quad, normalize, store out and lse.
template <typename Out, int kOTiles>
__device__ __forceinline__ void store_rows(const float (&o)[kOTiles][4], RowState rs, const PrefillParams& p, int b, int h,
                                           int row0, int t) {
  const float ln2 = 0.6931471805599453f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rs.l[r] += __shfl_xor_sync(0xffffffffu, rs.l[r], 1);
    rs.l[r] += __shfl_xor_sync(0xffffffffu, rs.l[r], 2);
    const int row = row0 + 8 * r;
    if (row >= p.nq) continue;
    const bool empty = rs.m[r] == -INFINITY;
    const float inv_l = empty ? 0.0f : __fdiv_rn(1.0f, rs.l[r]);
    Out* dst = static_cast<Out*>(p.out) + int64_t(b) * p.out_b + int64_t(row) * p.out_n + int64_t(h) * p.out_h;
#pragma unroll
    for (int nt = 0; nt < kOTiles; ++nt) {
      const float a0 = empty ? 0.0f : __fmul_rn(o[nt][2 * r], inv_l);
      const float a1 = empty ? 0.0f : __fmul_rn(o[nt][2 * r + 1], inv_l);
      *reinterpret_cast<uint32_t*>(dst + 8 * nt + 2 * t) = pack2<Out>(a0, a1);
    }
    if (p.lse && t == 0) {
      float v = empty ? -INFINITY : (rs.m[r] + log2f(rs.l[r] / float(TA_P_CODE_MAX))) * ln2;
      if (!empty && p.lse_offset) v += p.lse_offset[(int64_t(b) * p.hq + h) * p.nq + row];
      p.lse[int64_t(b) * p.lse_b + int64_t(h) * p.lse_h + row] = v;
    }
  }
}

}  // namespace turboattn::cuda
