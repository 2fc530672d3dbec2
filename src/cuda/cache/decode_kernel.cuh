// Decode attention over the compressed cache (docs/FORMATS.md, section 4). One CTA = one KV head of one
// sequence, up to 16 query rows (its query heads x q_len tokens, so the KV head is read once for all
// of them), one split of the sequence's tiles. Per tile: the packed page is copied to shared memory
// (cp.async, double-buffered), expanded to excess-128 INT8 with integer and exact fp16 operations,
// S = Q K^T on s8 x u8 tensor cores, SAS P codes, P V on u8 x u8 tensor cores. Every warp computes
// the whole S (cheap) and P V for a quarter of the channels. The buffer's partial tile, whose scales
// are per token, takes the reference's token-by-token P V path. Partial states go to a workspace that
// cache_merge_kernel combines (1.7).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda/cache/codes.cuh"
#include "cuda/common/mma.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/common/sas.cuh"
#include "cuda/sm80/prefill_kernel.cuh"  // pack2
#include "format/cache_layout.h"
#include "format/skip_rule.h"
#include "turboattn/format.h"

namespace turboattn::cuda {

constexpr int kDecodeMaxSeqs = 256;  // sequences per launch (their slots travel in the parameters)

template <int kHeadDim>
struct DecodeTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16;                 // query rows per CTA: one m16 tile
  static constexpr int kKeys = TA_BLOCK_TOKENS;    // keys per tile: one page
  static constexpr int kWarpChannels = kHeadDim / kWarps;  // P V channels per warp
  static constexpr int kRowBytes = kHeadDim + (((kHeadDim / 16) % 2 == 0) ? 16 : 0);  // conflict-free ldmatrix
  static constexpr int kVtRowBytes = kKeys + 16;
  // A staged tile: a page's K and V regions at up to 8 bits, or a buffer, then the two block scales.
  static constexpr int kStageBytes = 2 * kKeys * kHeadDim + 8 * kKeys + 16;  // the buffer is the largest
  static constexpr int kStageOffset = 0;
  static constexpr int kKOffset = 2 * kStageBytes;
  static constexpr int kVtOffset = kKOffset + kKeys * kRowBytes;
  static constexpr int kQOffset = kVtOffset + kHeadDim * kVtRowBytes;
  static constexpr int kParamOffset = kQOffset + kRows * kRowBytes;         // K stage-2 fp16 pairs: 8 bytes a pair
  static constexpr int kPOffset = kParamOffset + 4 * kHeadDim;              // buffer-tile P codes per warp
  static constexpr int kSmemBytes = kPOffset + kWarps * kRows * kKeys;
  static_assert(kHeadDim % 32 == 0 && kWarpChannels % 8 == 0, "head dims are multiples of 32");
};

struct DecodeParams {
  const uint8_t* pool;       // the layer's pages
  const uint8_t* buffers;    // the layer's INT8 buffers [slot][head]
  const PageLayout* layout;  // the layer's
  const int32_t* tables;     // [slot][table_width]
  int table_width;
  const int64_t* lengths;    // the layer's [slot]
  const void* q;
  int64_t q_b, q_n, q_h;
  void* out;
  int64_t o_b, o_n, o_h;
  float* partial;  // [seq][hq][q_len][split] x (m, l, o[D])
  int hq, hkv, q_len, heads_per_cta, num_splits;
  float scale_log2;
  int32_t slots[kDecodeMaxSeqs];
};

template <int kHeadDim, typename T, bool kSas>
__global__ void __launch_bounds__(DecodeTraits<kHeadDim>::kThreads) cache_decode_kernel(const __grid_constant__ DecodeParams p) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int D = kHeadDim, kKeys = Tr::kKeys;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* s_k = smem + Tr::kKOffset;
  uint8_t* s_vt = smem + Tr::kVtOffset;
  uint8_t* s_q = smem + Tr::kQOffset;
  uint32_t* s_scale2 = reinterpret_cast<uint32_t*>(smem + Tr::kParamOffset);  // D / 2 fp16 pairs
  uint32_t* s_bias2 = s_scale2 + D / 2;
  __shared__ float s_q_scale[Tr::kRows];
  __shared__ int32_t s_q_sum[Tr::kRows];

  const int split = blockIdx.x, seq = blockIdx.z;
  const int group = p.hq / p.hkv, chunks = (group + p.heads_per_cta - 1) / p.heads_per_cta;
  const int hk = blockIdx.y / chunks, h0 = hk * group + (blockIdx.y % chunks) * p.heads_per_cta;
  const int heads = min(p.heads_per_cta, hk * group + group - h0), rows = heads * p.q_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int slot = p.slots[seq];
  const int64_t len = p.lengths[slot];
  const int blocks = int(len / kKeys), buffered = int(len % kKeys), tiles = blocks + (buffered > 0);
  const int per_split = (tiles + p.num_splits - 1) / p.num_splits;
  const int begin = min(tiles, split * per_split), end = min(tiles, begin + per_split);
  const float skip_x = skip_threshold(len);
  const PageLayout& lay = *p.layout;
  const int bits = lay.bits[hk];

  // Q rows r = head * q_len + i: one INT8 block per query head (ref::quantize_head_block), codes in
  // shared memory, scale times softmax_scale * log2(e), and each row's code sum (for excess-128 K).
  for (int hl = warp; hl < Tr::kRows; hl += Tr::kWarps) {
    const bool live = hl < heads;
    const T* src = static_cast<const T*>(p.q) + int64_t(seq) * p.q_b + int64_t(h0 + hl) * p.q_h;
    float amax = 0.0f;
    bool finite = true;
    for (int i = 0; live && i < p.q_len; ++i)
      for (int c = lane; c < D; c += 32) {
        const float x = to_float(src[int64_t(i) * p.q_n + c]);
        finite = finite && isfinite(x);
        amax = fmaxf(amax, fabsf(x));
      }
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    finite = __all_sync(0xffffffffu, finite);
    float scale = 0.0f, inv = 0.0f;
    if (!finite) scale = __int_as_float(0x7fffffff);
    else if (amax >= TA_ZERO_BLOCK_AMAX) scale = __fdiv_rn(amax, float(TA_INT8_MAX)), inv = __fdiv_rn(float(TA_INT8_MAX), amax);
    for (int i = 0; i < (live ? p.q_len : 0); ++i) {
      const int r = hl * p.q_len + i;
      int sum = 0;
      for (int c = lane; c < D; c += 32) {
        const int8_t code = inv == 0.0f ? int8_t(0) : round_int8(__fmul_rn(to_float(src[int64_t(i) * p.q_n + c]), inv));
        s_q[r * Tr::kRowBytes + c] = uint8_t(code);
        sum += code;
      }
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) s_q_scale[r] = __fmul_rn(scale, p.scale_log2), s_q_sum[r] = sum;
    }
  }
  for (int r = rows + warp; r < Tr::kRows; r += Tr::kWarps) {  // padding rows: zero codes
    for (int c = lane; c < D; c += 32) s_q[r * Tr::kRowBytes + c] = 0;
    if (lane == 0) s_q_scale[r] = 0.0f, s_q_sum[r] = 0;
  }

  // Copies tile j (a page's K and V regions and block scales, or the buffer) into stage `stage`.
  const uint8_t* buffer = p.buffers + (int64_t(slot) * p.hkv + hk) * buffer_head_bytes(D);
  const int region = int(block_region_bytes(bits, D));
  auto stage_tile = [&](int j, int stage) {
    uint8_t* dst = smem + Tr::kStageOffset + stage * Tr::kStageBytes;
    if (j < blocks) {
      const uint8_t* page = p.pool + int64_t(p.tables[int64_t(slot) * p.table_width + j]) * lay.page_bytes;
      const uint8_t* src = page + lay.k_offset[hk];  // the V region follows the K region
      for (int i = threadIdx.x; i < 2 * region / 16; i += Tr::kThreads) cp_async_16(dst + 16 * i, src + 16 * i, true);
      if (threadIdx.x == 0) cp_async_4(dst + Tr::kStageBytes - 16, page + page_k_scale_offset(hk));
      if (threadIdx.x == 1) cp_async_4(dst + Tr::kStageBytes - 12, page + page_v_scale_offset(p.hkv, hk));
    } else {
      for (int i = threadIdx.x; i < int(buffer_head_bytes(D)) / 16; i += Tr::kThreads)
        cp_async_16(dst + 16 * i, buffer + 16 * i, true);
    }
  };
  if (begin < end) stage_tile(begin, 0);
  cp_async_commit();
  __syncthreads();

  // Q fragments (A operand of S), kept in registers.
  uint32_t qf[D / 32][4];
#pragma unroll
  for (int ks = 0; ks < D / 32; ++ks) ldmatrix_x4(qf[ks], s_q + (lane % 16) * Tr::kRowBytes + 16 * (lane / 16) + 32 * ks);

  // This thread's rows (g, g + 8): their head, token, last visible position, scale and code sum.
  int64_t max_pos[2];
  float q_scale[2];
  int32_t q_sum128[2];
  bool live[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    live[r] = row < rows;
    max_pos[r] = live[r] ? len - p.q_len + row % p.q_len : -1;
    q_scale[r] = s_q_scale[row];
    q_sum128[r] = 128 * s_q_sum[row];
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  constexpr int kOTiles = Tr::kWarpChannels / 8;
  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  const int c_warp = warp * Tr::kWarpChannels;

  for (int j = begin; j < end; ++j) {
    const int stage = (j - begin) & 1;
    if (j + 1 < end) stage_tile(j + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint8_t* st = smem + Tr::kStageOffset + stage * Tr::kStageBytes;
    const bool is_buffer = j >= blocks;
    const int tile_tokens = is_buffer ? buffered : kKeys;

    // Expand the tile to excess-128 INT8: K rows [key][channel], V^T rows [channel][key] (P order).
    if (is_buffer) {
      for (int i = threadIdx.x; i < kKeys * D / 16; i += Tr::kThreads) {
        const int key = i / (D / 16), c = 16 * (i % (D / 16));
        uint4 w = *reinterpret_cast<const uint4*>(st + buffer_k_offset(D) + key * D + c);
        w.x ^= 0x80808080u, w.y ^= 0x80808080u, w.z ^= 0x80808080u, w.w ^= 0x80808080u;
        *reinterpret_cast<uint4*>(s_k + key * Tr::kRowBytes + c) = w;
      }
    } else {
      const int code_bytes = int(block_code_bytes(bits, D));
      const uint8_t* k_meta = st + code_bytes;
      const uint8_t* v_codes = st + region;
      const uint8_t* v_meta = v_codes + code_bytes;
      if (bits < 8) {
        const int n = 32 / bits;  // codes per word; pair (c0 + j, c0 + j + n / 2)
        for (int i = threadIdx.x; i < D / 2; i += Tr::kThreads) {
          const int c0 = (i / (n / 2)) * n, jj = i % (n / 2), ca = c0 + jj, cb = ca + n / 2;
          s_scale2[i] = uint32_t(__half_as_ushort(__int2half_rn(k_meta[ca]))) |
                        (uint32_t(__half_as_ushort(__int2half_rn(k_meta[cb]))) << 16);
          s_bias2[i] = uint32_t(k_bias_bits(int8_t(k_meta[D + ca]))) | (uint32_t(k_bias_bits(int8_t(k_meta[D + cb]))) << 16);
        }
        __syncthreads();
      }
      const int words_per_row = D * bits / 32;
      for (int i = threadIdx.x; i < kKeys * words_per_row; i += Tr::kThreads) {
        const int key = i / words_per_row, col = i % words_per_row;
        const uint32_t w = reinterpret_cast<const uint32_t*>(st)[i];
        uint8_t* dst = s_k + key * Tr::kRowBytes + col * (32 / bits);
        if (bits == 8) {
          *reinterpret_cast<uint32_t*>(dst) = w ^ 0x80808080u;
        } else if (bits == 4) {
          uint32_t out[2];
          expand_k_word<4>(w, s_scale2 + 4 * col, s_bias2 + 4 * col, out);
          *reinterpret_cast<uint2*>(dst) = make_uint2(out[0], out[1]);
        } else {
          uint32_t out[4];
          expand_k_word<2>(w, s_scale2 + 8 * col, s_bias2 + 8 * col, out);
          *reinterpret_cast<uint4*>(dst) = make_uint4(out[0], out[1], out[2], out[3]);
        }
      }
      for (int i = threadIdx.x; i < D * (kKeys / 16); i += Tr::kThreads) {
        const int c = i / (kKeys / 16), grp = i % (kKeys / 16);
        const uint32_t* in = reinterpret_cast<const uint32_t*>(v_codes + c * (kKeys * bits / 8) + grp * 2 * bits);
        const uint32_t scale = bits == 8 ? 0u : v_meta[c], bias = bits == 8 ? 0u : uint32_t(int(int8_t(v_meta[D + c])) + 128);
        uint32_t out[4];
        if (bits == 8) expand_v_group<8>(in, scale, bias, out);
        else if (bits == 4) expand_v_group<4>(in, scale, bias, out);
        else expand_v_group<2>(in, scale, bias, out);
        *reinterpret_cast<uint4*>(s_vt + c * Tr::kVtRowBytes + 16 * grp) = make_uint4(out[0], out[1], out[2], out[3]);
      }
    }
    __syncthreads();

    // S = Q K^T (signed: minus 128 x the row's code sum), in base 2, masked; the tile maximum per row.
    int32_t s_acc[kKeys / 8][4];
#pragma unroll
    for (int i = 0; i < kKeys / 8; ++i) s_acc[i][0] = s_acc[i][1] = s_acc[i][2] = s_acc[i][3] = 0;
#pragma unroll
    for (int ks = 0; ks < D / 32; ++ks)
#pragma unroll
      for (int np = 0; np < kKeys / 16; ++np) {
        uint32_t kb[4];
        const int mi = lane / 8;
        ldmatrix_x4(kb, s_k + (16 * np + 8 * (mi >> 1) + lane % 8) * Tr::kRowBytes + 32 * ks + 16 * (mi & 1));
        mma_m16n8k32_s8u8(s_acc[2 * np], qf[ks], {kb[0], kb[1]});
        mma_m16n8k32_s8u8(s_acc[2 * np + 1], qf[ks], {kb[2], kb[3]});
      }
    const float* tile_scales = reinterpret_cast<const float*>(st + Tr::kStageBytes - 16);
    const float* buf_k_scale = reinterpret_cast<const float*>(st + buffer_k_scale_offset(D));
    const float* buf_v_scale = reinterpret_cast<const float*>(st + buffer_v_scale_offset(D));
    const float sv_tile = is_buffer ? 0.0f : tile_scales[1];
    const int64_t first_pos = int64_t(j) * kKeys;
    float s[2][kKeys / 8][2];
    float tile_max[2] = {-INFINITY, -INFINITY};
    int visible[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      visible[r] = int(min(int64_t(tile_tokens), max(int64_t(0), max_pos[r] - first_pos + 1)));
      const float st_tile = is_buffer ? 0.0f : __fmul_rn(q_scale[r], tile_scales[0]);
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = 8 * nt + 2 * t4 + e;
          const float sk = is_buffer ? __fmul_rn(q_scale[r], buf_k_scale[key]) : st_tile;
          s[r][nt][e] = key < visible[r] ? __fmul_rn(small_int_to_float(s_acc[nt][2 * r + e] - q_sum128[r]), sk) : -INFINITY;
          tile_max[r] = nan_max(tile_max[r], s[r][nt][e]);
        }
      tile_max[r] = nan_max(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = nan_max(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    }
    float alpha[2], beta[2];
    bool skip[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      bool v_nan = is_buffer ? false : isnan(sv_tile);  // a NaN V scale must reach the output
      for (int key = 0; is_buffer && key < visible[r]; ++key) v_nan = v_nan || isnan(buf_v_scale[key]);
      const float m_new = nan_max(m[r], tile_max[r]);
      skip[r] = tile_max[r] == -INFINITY || (tile_max[r] - m_new < skip_x && !v_nan);
      alpha[r] = skip[r] ? 1.0f : ex2_approx(m[r] - m_new);
      beta[r] = skip[r] ? 0.0f : ex2_approx(tile_max[r] - m_new);
      if (!skip[r]) m[r] = m_new;
    }

    // P codes in the A-fragment order of P V (keys permuted as vt_position), and each row's code sum.
    uint32_t pa[2][4];
    uint32_t p_sum[2] = {0u, 0u};
#pragma unroll
    for (int kp = 0; kp < 2; ++kp)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int nt = 4 * kp + 2 * half;
          const float tm = tile_max[r];
          const auto codes_x2 = [](float a, float b) { return kSas ? sas_codes_x2(a, b) : exp2_codes_x2(a, b); };
          const uint32_t y0 = codes_x2(s[r][nt][0] - tm, s[r][nt][1] - tm);
          const uint32_t y1 = codes_x2(s[r][nt + 1][0] - tm, s[r][nt + 1][1] - tm);
          const uint32_t codes = skip[r] ? 0u : __byte_perm(y0, y1, 0x6420);
          pa[kp][2 * half + r] = codes;
          p_sum[r] = __dp4a(codes, 0x01010101u, p_sum[r]);
        }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      p_sum[r] += __shfl_xor_sync(0xffffffffu, p_sum[r], 1);
      p_sum[r] += __shfl_xor_sync(0xffffffffu, p_sum[r], 2);
      l[r] = __fmaf_rn(small_int_to_float(int32_t(p_sum[r])), beta[r], __fmul_rn(l[r], alpha[r]));
    }

    if (!is_buffer) {
      // O = alpha O + (P V - 128 x sum P) sv beta, over this warp's channels.
      if (!__all_sync(0xffffffffu, skip[0] && skip[1])) {
        const float svb[2] = {skip[0] ? 0.0f : __fmul_rn(sv_tile, beta[0]), skip[1] ? 0.0f : __fmul_rn(sv_tile, beta[1])};
        const int32_t p_sum128[2] = {int32_t(128 * p_sum[0]), int32_t(128 * p_sum[1])};
#pragma unroll
        for (int nt = 0; nt < kOTiles; ++nt) {
          int32_t acc[4] = {0, 0, 0, 0};
#pragma unroll
          for (int kp = 0; kp < 2; ++kp) {
            uint32_t vb[2];
            ldmatrix_x2(vb, s_vt + (c_warp + 8 * nt + lane % 8) * Tr::kVtRowBytes + 32 * kp + 16 * ((lane / 8) & 1));
            mma_m16n8k32_u8u8(acc, pa[kp], vb);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = i / 2;
            o[nt][i] = __fmaf_rn(small_int_to_float(acc[i] - p_sum128[r]), svb[r], __fmul_rn(o[nt][i], alpha[r]));
          }
        }
      }
    } else {
      // The buffer's tokens one by one, in order, each with its own V scale (docs/FORMATS.md, section 4).
      uint8_t* s_p = smem + Tr::kPOffset + warp * Tr::kRows * kKeys;
#pragma unroll
      for (int kp = 0; kp < 2; ++kp)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint32_t codes = pa[kp][2 * half + r];  // keys 32kp + 16half + {2t, 2t+1, 8+2t, 9+2t}
            const int base = 32 * kp + 16 * half + 2 * t4, row = g + 8 * r;
            s_p[row * kKeys + base] = uint8_t(codes), s_p[row * kKeys + base + 1] = uint8_t(codes >> 8);
            s_p[row * kKeys + base + 8] = uint8_t(codes >> 16), s_p[row * kKeys + base + 9] = uint8_t(codes >> 24);
          }
      __syncwarp();
      const int8_t* v_rows = reinterpret_cast<const int8_t*>(st + buffer_v_offset(D));
#pragma unroll
      for (int nt = 0; nt < kOTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i / 2, row = g + 8 * r, c = c_warp + 8 * nt + 2 * t4 + (i & 1);
          if (skip[r]) continue;
          float acc_o = __fmul_rn(o[nt][i], alpha[r]);
          for (int key = 0; key < visible[r]; ++key)
            acc_o = __fmaf_rn(float(int32_t(s_p[row * kKeys + key]) * int32_t(v_rows[key * D + c])),
                              __fmul_rn(buf_v_scale[key], beta[r]), acc_o);
          o[nt][i] = acc_o;
        }
    }
    __syncthreads();
  }

  // This split's state of each row.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    if (!live[r]) continue;
    const int h = h0 + row / p.q_len, i = row % p.q_len;
    float* part = p.partial + ((((int64_t(seq) * p.hq + h) * p.q_len + i) * p.num_splits) + split) * (D + 2);
    if (warp == 0 && t4 == 0) part[0] = m[r], part[1] = l[r];
#pragma unroll
    for (int nt = 0; nt < kOTiles; ++nt) {
      const int c = c_warp + 8 * nt + 2 * t4;
      part[2 + c] = o[nt][2 * r], part[3 + c] = o[nt][2 * r + 1];
    }
  }
}

// Merges the splits of each row in order (ref::merge_states) and normalizes (ref::finish_row).
template <typename T>
__global__ void cache_merge_kernel(const float* partial, int num_splits, int hq, int q_len, int dim, void* out, int64_t o_b,
                                   int64_t o_n, int64_t o_h) {
  const int64_t row = blockIdx.x;  // (seq * hq + h) * q_len + i
  const int i = int(row % q_len), h = int((row / q_len) % hq), seq = int(row / (int64_t(q_len) * hq));
  const float* parts = partial + row * num_splits * (dim + 2);
  float big = -INFINITY;
  for (int s = 0; s < num_splits; ++s) big = nan_max(big, parts[s * (dim + 2)]);
  T* dst = static_cast<T*>(out) + seq * o_b + i * o_n + h * o_h;
  float l = 0.0f;
  for (int s = 0; s < num_splits; ++s) {
    const float ms = parts[s * (dim + 2)];
    if (ms == -INFINITY) continue;
    l = __fmaf_rn(parts[s * (dim + 2) + 1], exp2f(ms - big), l);
  }
  const float inv_l = __fdiv_rn(1.0f, l);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < num_splits && big != -INFINITY; ++s) {
      const float ms = parts[s * (dim + 2)];
      if (ms == -INFINITY) continue;
      o = __fmaf_rn(parts[s * (dim + 2) + 2 + c], exp2f(ms - big), o);
    }
    const float v = big == -INFINITY ? 0.0f : __fmul_rn(o, inv_l);
    dst[c] = T(v);
  }
}

}  // namespace turboattn::cuda
