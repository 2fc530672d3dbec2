// Decode attention over the compressed cache (docs/FORMATS.md, section 4). One CTA = one KV head of one
// sequence, up to 8 query rows (its query heads x q_len tokens, so the KV head is read once for all of
// them) and one split of the sequence's tiles; each of its warps owns every kWarps-th tile of the split,
// with its own online-softmax state and its own cp.async ring of three half-pages (a page's K half
// and V half travel separately, so the next K is in flight during P V and the next V during S).
//
// The packed codes are never expanded to INT8. With k = zero + code * scale per channel and
// v = zero + code * scale per token (3.3):
//   S_j  = sum_c q_c k_jc = sum_c q_c zero_c + sum_c (q_c scale_c) code_jc,  q_c scale_c = 128 hi + lo,
//   PV_c = sum_j p_j v_jc = sum_j p_j zero_j + sum_j (p_j scale_j) code_jc,  p_j scale_j = 128 hi + lo,
// exact integer identities, so S^T = K Q'^T and O^T = V^T P'^T run on the raw codes as u8 x s8 and
// u8 x u8 tensor-core products (keys and channels in the M dimension, the query rows in N = 8), with
// the codes unpacked straight into the A fragments by a shift and a mask. The tensor-core K dimension
// walks each row in the order of code_order.cuh (each lane loads its own run of words), and Q' and P
// are laid out to match; N holds the query rows' hi and lo parts side by side (WarpState). 8-bit pages
// take s8 codes as they are, and so does the sequence's first block (8 bits in its own region, read
// straight from global memory). The buffer's partial tile, whose scales are per token, takes the
// reference's token-by-token P V. Partial states go to a workspace that cache_merge_kernel combines (1.7).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda/cache/code_order.cuh"
#include "cuda/cache/codes.cuh"
#include "cuda/cache/device_cache.hpp"  // kDecodeMaxSeqs
#include "cuda/common/griddepcontrol.cuh"
#include "cuda/common/int8.cuh"
#include "cuda/common/mma.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/common/sas.cuh"
#include "format/cache_layout.h"
#include "format/skip_rule.h"
#include "turboattn/format.h"

namespace turboattn::cuda {

static_assert(TA_DECODE_Q_TOKENS == 8, "a launch's query tokens per head fill at most the 8 rows of a CTA");

// Warps per CTA: 4, but 2 at head dim 256, where four warps' rings of 8-bit pages would not fit.
__host__ __device__ constexpr int decode_warps(int head_dim) { return head_dim == 256 ? 2 : 4; }

template <int kHeadDim>
struct DecodeTraits {
  static constexpr int kWarps = decode_warps(kHeadDim);
  static constexpr int kThreads = 32 * kWarps;
  // CTAs per SM the registers are budgeted for: 3 (1 at D = 256). "Packed" layers (every head 4- or
  // 2-bit) whose CTAs have one row group leave an H100's or H200's shared memory room for 4 CTAs up to
  // D = 128, and at D = 96 and 128 that group needs more than 128 registers unbudgeted: there they get
  // an instance budgeted for 4 (at D = 64 it fits 128 anyway). With 8-bit heads shared memory allows 2
  // at D = 128.
  static constexpr int kMinBlocksPerSm = kHeadDim <= 128 ? 3 : 1;
  static constexpr int kMinBlocksPerSmPacked = kHeadDim == 96 || kHeadDim == 128 ? 4 : kMinBlocksPerSm;
  // Layers whose heads are all 4-bit get an instance with the 4-bit path alone (cache_decode_kernel's
  // kLayerBits) at D = 128, where it was measured: 7.7% faster at batch 1 x 32k (16 tiles per CTA leave
  // the instruction fetches of a kernel holding every width's path exposed), 6-9% with two row groups
  // (which spill with all three paths), the same elsewhere (docs/BENCHMARKS.md). A 2-bit one measured
  // 0-1.6%, so none.
  static constexpr bool kFourBitInstance = kHeadDim == 128;
  static constexpr int kRows = 8;                 // query rows per CTA: two groups of 4 (WarpState)
  static constexpr int kKeys = TA_BLOCK_TOKENS;   // keys per tile: one page
  static constexpr int kOTiles = kHeadDim / 16;   // m16 tiles of O^T (channels)
  static constexpr int kBRowBytes = kHeadDim + 16;  // B operand rows; the padding spreads 8 rows over banks
  static constexpr int kPRowBytes = kKeys + 16;
  // Staged halves: K code rows and K stage-2 metadata; V code rows and V metadata. A slot is whole
  // 128-byte lines, as a page's regions are (cache_layout.h), so that source and destination of every
  // 16-byte copy are equally aligned (4.6 against 3.4-3.6 TB/s streamed on an H200); the K half's two
  // block scales go to the warp's scale words instead (kScaleBytes), which keeps three halves per warp
  // within room for four CTAs per SM at 4 bits, D = 128, one row group.
  __host__ __device__ static constexpr int k_row_bytes(int bits) { return kHeadDim * bits / 8; }
  __host__ __device__ static constexpr int v_row_bytes(int bits) { return kKeys * bits / 8; }
  __host__ __device__ static constexpr int k_meta_bytes(int bits) { return int(block_k_meta_bytes(bits, kHeadDim)); }
  __host__ __device__ static constexpr int v_meta_bytes(int bits) { return int(block_v_meta_bytes(bits)); }
  __host__ __device__ static constexpr int half_meta(int bits) { return kKeys * k_row_bytes(bits); }  // == D rows of V
  // A V half's metadata (per token) is never larger than K's.
  __host__ __device__ static constexpr int half_bytes(int bits) { return int(page_aligned(half_meta(bits) + k_meta_bytes(bits))); }
  static_assert(kHeadDim >= kKeys, "V's per-token metadata fits where K's per-channel metadata goes");
  static constexpr int kRingHalves = 3;
  static constexpr int kScaleBytes = 32;  // per warp: the K and V block scales of each ring slot
  static_assert(kScaleBytes >= 8 * kRingHalves, "two fp32 scales per slot");
  // Q' (the B operand of S) goes through shared memory, as rows of its 4 query rows' hi and lo parts per
  // group (build_q_prime), except with one group at 4 bits: there lanes build their fragments in registers
  // (q_prime_fragments), which leaves shared memory for 4 CTAs per SM (at 2 bits the rows measured faster).
  __host__ __device__ static constexpr bool q_prime_in_registers(int groups, int bits) { return groups == 1 && bits == TA_BITS_4; }
  static constexpr int kBRowsBytes = 2 * 4 * kBRowBytes;  // per group
  // Per warp: the B rows, then P rows, then the ring sized for the layer's widest head. With one group the
  // B rows of a 2-bit head in a layer of wider heads take the unused tail of ring slot 0 (b_rows_in_ring),
  // so only layers of 2-bit heads reserve them.
  __host__ __device__ static constexpr bool b_rows_in_ring(int groups, int max_bits) { return groups == 1 && max_bits > TA_BITS_2; }
  static_assert(q_prime_in_registers(1, TA_BITS_4), "with one group only 2-bit heads have B rows (in the ring's tail)");
  __host__ __device__ static constexpr int b_rows_bytes(int groups, int max_bits) {
    return groups > 1 ? 2 * kBRowsBytes : b_rows_in_ring(groups, max_bits) ? 0 : kBRowsBytes;
  }
  __host__ __device__ static constexpr int warp_fixed_bytes(int groups, int max_bits) { return b_rows_bytes(groups, max_bits) + kRows * kPRowBytes; }
  __host__ __device__ static constexpr int warp_bytes(int groups, int max_bits) {
    return warp_fixed_bytes(groups, max_bits) + kRingHalves * half_bytes(max_bits);
  }
  static_assert(half_bytes(TA_BITS_4) - half_bytes(TA_BITS_2) >= kBRowsBytes, "a 2-bit half leaves room for the B rows in a wider slot");
  // Per CTA: INT8 Q in channel order (for the buffer and q . zero) and in the K order of the head's width.
  static constexpr int kQBytes = 2 * kRows * kHeadDim;
  // Then the warps' scale words, after every warp's area.
  __host__ __device__ static constexpr int scales_offset(int groups, int max_bits) { return kQBytes + kWarps * warp_bytes(groups, max_bits); }
  // Then the query rows' scales. Nothing is static __shared__: static shared memory comes first, so the
  // dynamic area, and every ring slot's alignment with it, would start past it (32 bytes of it measured
  // 1-4% slower, and 48 bytes 20%).
  __host__ __device__ static constexpr int q_scales_offset(int groups, int max_bits) { return scales_offset(groups, max_bits) + kWarps * kScaleBytes; }
  __host__ __device__ static constexpr int smem_bytes(int groups, int max_bits) { return q_scales_offset(groups, max_bits) + 4 * kRows; }
  static_assert(kQBytes % kPageAlign == 0 && kRows * kPRowBytes % kPageAlign == 0 && kBRowsBytes % kPageAlign == 0,
                "the rings start on 128-byte lines");
  static_assert(kHeadDim % 32 == 0, "head dims are multiples of 32");
  // At the end a warp's area holds its state: m and l of 8 rows, then o of 8 rows.
  static_assert(warp_bytes(1, TA_BITS_2) >= 4 * (2 * kRows + kRows * kHeadDim), "a warp's area holds its state");
};

struct DecodeParams {
  const uint8_t* pool;       // the layer's pages
  const uint8_t* buffers;    // the layer's INT8 buffers [slot][head]
  const uint8_t* first_blocks;  // the layer's first blocks [slot][head]
  PageLayout layout;         // the layer's (by value: read from the constant bank, not through a load
                             // that the first copies would wait for)
  const int32_t* tables;     // [slot][table_width]
  int table_width;
  const int64_t* lengths;    // the layer's [slot]
  const void* q;
  int64_t q_b, q_n, q_h;
  void* out;       // [seq][q_len][hq][D] through the strides below (elements)
  int64_t o_b, o_n, o_h;
  float* partial;  // with several splits: [seq][hq][q_len][split] x (m, l, o[D])
  int hq, hkv, q_len, heads_per_cta, num_splits, max_bits;
  int split_tiles;  // tiles per split, the same for every sequence (a short one's last splits are empty)
  int q_behind;  // the call's query tokens after this launch's q_len (a long q_len runs in chunks)
  float scale_log2;
  int32_t slots[kDecodeMaxSeqs];
};
static_assert(sizeof(DecodeParams) <= 32764, "kernel parameters are limited to 32764 bytes (CUDA 12.1 and later)");

// Copies kBytes (a multiple of 16) with one warp; dst and src are the lane's first chunk (16 lane bytes
// in), and every further copy is one instruction at an immediate offset from them.
template <int kBytes, int kChunk = 0>
__device__ __forceinline__ void stage_bytes_async(uint32_t dst, const uint8_t* src, int lane) {
  static_assert(kBytes % 16 == 0, "whole 16-byte chunks");
  constexpr int kChunks = kBytes / 16;
  if constexpr (kChunk + 32 <= kChunks) {
    cp_async_16_at<16 * kChunk>(dst, src);
    stage_bytes_async<kBytes, kChunk + 32>(dst, src, lane);
  } else if constexpr (kChunk < kChunks) {
    if (lane < kChunks - kChunk) cp_async_16_at<16 * kChunk>(dst, src);
  }
}

// Query rows: a CTA takes up to 8 (kRows) in groups of 4. In each group's 4- and 2-bit tensor-core
// products the 8 N columns are its 4 rows' hi and lo parts (column 2 j: row j's hi part, 2 j + 1: its
// lo part), so the accumulators of lane (g, t) hold both parts of row 4 grp + t for M rows g and g + 8:
// every lane ends with whole scores and outputs of a live row, none of padding (with GQA groups of 4,
// the common case, an 8-row layout would leave half the lanes' work on padding). 8-bit products have no
// parts and take both groups at once (s8_scores).
template <int kHeadDim, int kGroups>
struct WarpState {
  float m[kGroups], l[kGroups];
  float o[kGroups][kHeadDim / 16][2];  // channels 16 ot + g + 8 i of row 4 grp + t
  // The 4- and 2-bit pages' V zeros' term sum_j p_j zero_j, common to every channel of row 4 grp + t:
  // kept as one sum, rescaled with o, and added to o after the pages (fold_zero_term) instead of to
  // each of a lane's int32 products per tile.
  float zero_term[kGroups];
  __device__ WarpState() {
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) {
      m[grp] = -INFINITY, l[grp] = 0.0f, zero_term[grp] = 0.0f;
#pragma unroll
      for (int ot = 0; ot < kHeadDim / 16; ++ot) o[grp][ot][0] = o[grp][ot][1] = 0.0f;
    }
  }
  __device__ __forceinline__ void fold_zero_term() {
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) {
#pragma unroll
      for (int ot = 0; ot < kHeadDim / 16; ++ot) o[grp][ot][0] += zero_term[grp], o[grp][ot][1] += zero_term[grp];
      zero_term[grp] = 0.0f;
    }
  }
};

// Bytes (x_b >> shift) & 0xFF, b = 0..3, of four int32 with |x_b| < 2^15, as one word (shift 0 or 7):
// the lo (then masked to 7 bits) or hi part of 128 hi + lo splits.
__device__ __forceinline__ uint32_t pack_bytes(const int32_t (&x)[4], int shift) {
  const uint32_t x01 = __byte_perm(x[0], x[1], 0x5410), x23 = __byte_perm(x[2], x[3], 0x5410);
  return __byte_perm(x01 >> shift, x23 >> shift, 0x6420);
}

// Scores of a tile: a[grp][mt][i] is the int32 score (as fp32) of key 16 mt + g + 8 i of row 4 grp + t,
// and st(grp, mt, i) its scale (docs/FORMATS.md 1.5): one per row for a page (kKeyScales false), one per
// key for the buffer's tile, whose K scales are per token. Masks keys past each row's last visible one,
// finds each row's tile maximum, applies the skip rule, and updates m and l (with the P codes' row sums).
// codes[grp][mt] holds keys 16 mt + g and 16 mt + g + 8 in its bytes 0 and 2.
template <bool kSas, int kGroups>
struct TileSoftmax {
  float alpha[kGroups], beta[kGroups], sv = 0.0f;
  bool skip[kGroups];
  uint32_t codes[kGroups][TA_BLOCK_TOKENS / 16];

  template <bool kKeyScales, class St>
  __device__ __forceinline__ void run(float (&a)[kGroups][TA_BLOCK_TOKENS / 16][2], St st, const int (&visible)[kGroups],
                                      bool v_nan, float skip_x, float (&m)[kGroups], float (&l)[kGroups], int g) {
    constexpr int kMTiles = TA_BLOCK_TOKENS / 16;
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) {
      float bound = -INFINITY;  // the largest a, or with per-key scales the largest rd(a st)
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const bool masked = 16 * mt + g + 8 * i >= visible[grp];
          if (masked) a[grp][mt][i] = -INFINITY;
          bound = kKeyScales ? nan_max(bound, masked ? -INFINITY : __fmul_rd(a[grp][mt][i], st(grp, mt, i)))
                             : fmaxf(bound, a[grp][mt][i]);
        }
#pragma unroll
      for (int x = 4; x < 32; x <<= 1) bound = nan_max(bound, __shfl_xor_sync(0xffffffffu, bound, x));
      const float tile_max = kKeyScales ? bound : tile_bound(bound, st(grp, 0, 0));
      const float m_new = nan_max(m[grp], tile_max);
      skip[grp] = visible[grp] <= 0 || (tile_max - m_new < skip_x && !v_nan);  // all masked: tile_max may be NaN
      alpha[grp] = skip[grp] ? 1.0f : ex2_approx(m[grp] - m_new);
      beta[grp] = skip[grp] ? 0.0f : ex2_approx(tile_max - m_new);
      if (!skip[grp]) m[grp] = m_new;
      int32_t sum = 0;
      const POffset row_offset(kKeyScales ? 0.0f : st(grp, 0, 0), tile_max);  // unused with per-key scales
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        auto ys = [&](int i) { return (kKeyScales ? POffset(st(grp, mt, i), tile_max) : row_offset)(a[grp][mt][i]); };
        const uint32_t y = kSas ? sas_codes_x2(ys(0), ys(1)) : exp2_codes_x2(ys(0), ys(1));
        codes[grp][mt] = skip[grp] ? 0u : (y & 0x00FF00FFu);
        sum += int32_t(codes[grp][mt] & 0xFFu) + int32_t(codes[grp][mt] >> 16);
      }
#pragma unroll
      for (int x = 4; x < 32; x <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
      l[grp] = __fmaf_rn(small_int_to_float(sum), beta[grp], __fmul_rn(l[grp], alpha[grp]));
    }
  }
};

// Q' of one tile: q (K order) times the stage-2 scale of each position's channel, split into
// hi = qp >> 7 (s8) and lo = qp & 127, four positions (one word) per lane and step, written to the rows
// of the B operand: row r's hi to row 8 (r / 4) + 2 (r % 4), its lo to the next. Stage-2 scales are at
// most 255 / 3 (docs/FORMATS.md 3.3), so they are valid s8 and one masked dp4a is one product. Every
// row of the kGroups groups is built, padding rows too (their q codes are 0, so are their parts): a
// count known at compile time leaves no loop to run.
template <int kHeadDim, int kBits, int kGroups>
__device__ __forceinline__ void build_q_prime(const uint8_t* s_qk, const uint8_t* k_meta, uint8_t* s_b, int lane) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int kWords = kHeadDim / 4, kRows = 4 * kGroups;
  auto row_word = [&](int r, int w, int32_t s4) {
    const int32_t q4 = reinterpret_cast<const int32_t*>(s_qk + r * kHeadDim)[w];
    int32_t qp[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) qp[b] = __dp4a(q4, s4 & (0xFF << (8 * b)), 0);
    uint32_t* hi_row = reinterpret_cast<uint32_t*>(s_b + (8 * (r / 4) + 2 * (r % 4)) * Tr::kBRowBytes);
    hi_row[w] = pack_bytes(qp, 7);
    hi_row[Tr::kBRowBytes / 4 + w] = pack_bytes(qp, 0) & 0x7F7F7F7Fu;
  };
  if constexpr (kWords % 32 == 0) {  // each lane keeps the same words for every row: their scales once
    constexpr int kPerLane = kWords / 32;
    int32_t s4[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) s4[k] = int32_t(CodeOrder<kBits, kHeadDim>::gather(k_meta, lane + 32 * k));
    // Unrolled whole up to 8 row words; at D = 256 with two groups (16) that made the 2-bit loop 15%
    // longer and a 4/2 layer 7.5% slower (docs/BENCHMARKS.md), so there by 4 rows.
    constexpr int kUnrollRows = kRows * kPerLane <= 8 ? kRows : 4;
#pragma unroll(kUnrollRows)
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) row_word(r, lane + 32 * k, s4[k]);
  } else {
#pragma unroll
    for (int idx = lane; idx < kRows * kWords; idx += 32) {
      const int w = idx % kWords;
      row_word(idx / kWords, w, int32_t(CodeOrder<kBits, kHeadDim>::gather(k_meta, w)));
    }
  }
}

// Q' of one row group as B fragments in registers (DecodeTraits::q_prime_in_registers): lane (g, t)'s
// column g is row g / 2's hi part (g even) or lo part (g odd) at K positions 32 ks + 16 h + 4 t .. + 3.
// (Gathering each scale word once and sharing it by shuffles spilled at 128 registers.)
template <int kHeadDim, int kBits>
__device__ __forceinline__ void q_prime_fragments(uint32_t (&bq)[kHeadDim / 32][2], const uint8_t* s_qk, const uint8_t* k_meta, int lane) {
  const int g = lane / 4, t = lane % 4;
  const int32_t* q_words = reinterpret_cast<const int32_t*>(s_qk + (g / 2) * kHeadDim);
  const int shift = g & 1 ? 0 : 7;
  const uint32_t mask = g & 1 ? 0x7F7F7F7Fu : 0xFFFFFFFFu;
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 32; ++ks)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int w = 8 * ks + 4 * h + t;
      const int32_t s4 = int32_t(CodeOrder<kBits, kHeadDim>::gather(k_meta, w)), q4 = q_words[w];
      int32_t qp[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) qp[b] = __dp4a(q4, s4 & (0xFF << (8 * b)), 0);
      bq[ks][h] = pack_bytes(qp, shift) & mask;
    }
}

// S^T of INT8 key rows (an 8-bit page's, or the buffer's): no hi and lo parts, so one product takes both
// row groups, column 2 j + grp holding row 4 grp + j: acc[mt][2 i + grp] is key 16 mt + g + 8 i of row
// 4 grp + t.
template <int D>
__device__ __forceinline__ void s8_scores(int32_t (&acc)[TA_BLOCK_TOKENS / 16][4], const uint8_t* k_rows, const uint8_t* s_q8,
                                          int lane) {
  using Order = CodeOrder<8, D>;
  const int g = lane / 4, t = lane % 4;
  const uint8_t* q_row = s_q8 + (4 * (g % 2) + g / 2) * D;
#pragma unroll
  for (int ks = 0; ks < Order::kSteps; ++ks) {  // a k-step at a time: the buffer's tile runs with the state live
    uint32_t b[2];
    Order::load_step(b, q_row, t, ks);
#pragma unroll
    for (int mt = 0; mt < TA_BLOCK_TOKENS / 16; ++mt) {
      uint32_t top[2], bottom[2];
      Order::load_step(top, k_rows + (16 * mt + g) * D, t, ks);
      Order::load_step(bottom, k_rows + (16 * mt + g + 8) * D, t, ks);
      const uint32_t a[4] = {top[0], bottom[0], top[1], bottom[1]};
      mma_m16n8k32_s8s8(acc[mt], a, b);
    }
  }
}

// A page's first half: S^T on the K codes, the softmax, and P in shared memory in V's K order.
// block_scale: the page's K and V block scales for this head.
// Returns whether any row of the warp uses the tile (else P V is skipped).
template <int kHeadDim, int kBits, bool kSas, int kGroups>
__device__ __forceinline__ bool page_scores(const uint8_t* k_half, const float* block_scale, const uint8_t* s_q8, const uint8_t* s_qk, uint8_t* s_b,
                                            uint8_t* s_p, const float (&q_scale)[kGroups], const int (&visible)[kGroups],
                                            float skip_x, WarpState<kHeadDim, kGroups>& ws, TileSoftmax<kSas, kGroups>& sm,
                                            int lane) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int D = kHeadDim, kMTiles = Tr::kKeys / 16;
  const int g = lane / 4, t = lane % 4;
  const uint8_t* k_codes = k_half;
  const uint8_t* k_meta = k_half + Tr::half_meta(kBits);
  constexpr int kKStride = Tr::k_row_bytes(kBits);

  // S^T = K Q'^T: keys in M, (row, part) columns in N, the tensor-core K dimension in KOrder.
  using KOrder = CodeOrder<kBits, D>;
  constexpr int kSteps = KOrder::kSteps;
  float a[kGroups][kMTiles][2];  // the int32 scores as fp32
  if constexpr (kBits == 8) {
    int32_t acc[kMTiles][4] = {};
    s8_scores<D>(acc, k_codes, s_q8, lane);
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp)
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) a[grp][mt][i] = small_int_to_float(acc[mt][2 * i + grp]);
  } else {
    // K's token groups (k_groups: 1 at 4 bits, 4 at 2 bits) take the tile's M tiles in turn, each with
    // its own scales and zeros: Q' = q * scale split into hi (s8) and lo (0..127) in K's K order (in B
    // rows, or in registers below), and zq = q . zero of row 4 grp + t, which starts the accumulators of
    // the row's lo columns (128 hi + lo is then the whole integer score).
    constexpr int kKGroups = k_groups(kBits), kGroupMTiles = kMTiles / kKGroups;
    static_assert(kGroupMTiles * kKGroups == kMTiles, "K groups are whole M tiles");
    constexpr bool kQPrimeInRegisters = Tr::q_prime_in_registers(kGroups, kBits);
    int32_t acc[kGroups][kMTiles][4];
    auto b_word = [&](int grp, int ks, int h) {
      return *reinterpret_cast<const uint32_t*>(s_b + (8 * grp + g) * Tr::kBRowBytes + 32 * ks + 16 * h + 4 * t);
    };
    // zq of each live row and K group over kLanes lanes (lanes kLanes r.. take row r: 4 per row for two
    // groups' 8 rows, 8 per row for one group's 4), each lane every kLanes-th word, rotated by row against
    // bank conflicts (none at D = 128, 256). Every group's dot products are taken with the first group's,
    // so that each q word is loaded once per tile. (Taken before the loop instead, ptxas kept more
    // registers: 8 more moves per 4-bit tile, and a spill in the D = 128 instance of every width.)
    constexpr int kLanes = 8 / kGroups;
    int32_t dot[kKGroups] = {};
#pragma unroll
    for (int kg = 0; kg < kKGroups; ++kg) {
      const uint8_t* scales = k_meta + kg * D;
      if (kg == 0) {
        constexpr int kWords = D / 4;
        const int row = lane / kLanes, sub = lane % kLanes;
        const int32_t* q_words = reinterpret_cast<const int32_t*>(s_q8 + row * D);
        const int32_t* zero_words = reinterpret_cast<const int32_t*>(k_meta + kKGroups * D);  // group k's at k * D
        const int base = (sub + kLanes * row) % kWords;
#pragma unroll
        for (int j = 0; j < kWords / kLanes; ++j) {
          const int w = base + kLanes * j < kWords ? base + kLanes * j : base + kLanes * j - kWords;
          const int32_t q4 = q_words[w];
#pragma unroll
          for (int k = 0; k < kKGroups; ++k) dot[k] = __dp4a(q4, zero_words[k * kWords + w], dot[k]);
        }
      }
#pragma unroll
      for (int x = 1; x < kLanes; x <<= 1) dot[kg] += __shfl_xor_sync(0xffffffffu, dot[kg], x);
#pragma unroll
      for (int grp = 0; grp < kGroups; ++grp) {
        const int32_t zq = __shfl_sync(0xffffffffu, dot[kg], kLanes * (4 * grp + t));
#pragma unroll
        for (int mt = kg * kGroupMTiles; mt < (kg + 1) * kGroupMTiles; ++mt)
          acc[grp][mt][0] = 0, acc[grp][mt][1] = zq, acc[grp][mt][2] = 0, acc[grp][mt][3] = zq;
      }
      if constexpr (!kQPrimeInRegisters) {
        if (kg > 0) __syncwarp();  // the previous group's Q' rows read
        build_q_prime<kHeadDim, kBits, kGroups>(s_qk, scales, s_b, lane);
        __syncwarp();  // Q' rows written
      }

      if constexpr (kGroups == 1) {  // B held for the group, each code row loaded whole
        uint32_t bq[kSteps][2];
        if constexpr (kQPrimeInRegisters) {
          q_prime_fragments<kHeadDim, kBits>(bq, s_qk, scales, lane);
        } else {
#pragma unroll
          for (int ks = 0; ks < kSteps; ++ks) bq[ks][0] = b_word(0, ks, 0), bq[ks][1] = b_word(0, ks, 1);
        }
#pragma unroll
        for (int mt = kg * kGroupMTiles; mt < (kg + 1) * kGroupMTiles; ++mt) {
          uint32_t top[kSteps][2], bottom[kSteps][2];  // keys 16 mt + g and 16 mt + g + 8
          KOrder::load(top, k_codes + (16 * mt + g) * kKStride, t);
          KOrder::load(bottom, k_codes + (16 * mt + g + 8) * kKStride, t);
#pragma unroll
          for (int ks = 0; ks < kSteps; ++ks) {
            const uint32_t a[4] = {top[ks][0], bottom[ks][0], top[ks][1], bottom[ks][1]};
            mma_m16n8k32_u8s8(acc[0][mt], a, bq[ks]);
          }
        }
      } else {  // two row groups' B and accumulators: a k-step at a time, so that registers hold
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) {
          uint32_t bq[kGroups][2];
#pragma unroll
          for (int grp = 0; grp < kGroups; ++grp) bq[grp][0] = b_word(grp, ks, 0), bq[grp][1] = b_word(grp, ks, 1);
#pragma unroll
          for (int mt = kg * kGroupMTiles; mt < (kg + 1) * kGroupMTiles; ++mt) {
            uint32_t top[2], bottom[2];
            KOrder::load_step(top, k_codes + (16 * mt + g) * kKStride, t, ks);
            KOrder::load_step(bottom, k_codes + (16 * mt + g + 8) * kKStride, t, ks);
            const uint32_t a[4] = {top[0], bottom[0], top[1], bottom[1]};
#pragma unroll
            for (int grp = 0; grp < kGroups; ++grp) mma_m16n8k32_u8s8(acc[grp][mt], a, bq[grp]);
          }
        }
      }
    }
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp)
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int32_t* c = acc[grp][mt] + 2 * i;
          a[grp][mt][i] = small_int_to_float(128 * c[0] + c[1]);
        }
  }
  float st[kGroups];
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) st[grp] = __fmul_rn(q_scale[grp], block_scale[0]);
  sm.sv = block_scale[1];
  sm.template run<false>(a, [&](int grp, int, int) { return st[grp]; }, visible, isnan(sm.sv), skip_x, ws.m, ws.l, g);
  bool all_skip = true;
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) all_skip = all_skip && sm.skip[grp];
  if (__all_sync(0xffffffffu, all_skip)) return false;

  // P^T in V's K order: row r of s_p holds row r's codes at VOrder::position_of(key). Keys 16 apart
  // are a fixed number of positions apart, so each thread's positions are two offsets and a stride.
  using VOrder = CodeOrder<kBits, Tr::kKeys>;
  constexpr int kMStride = VOrder::position_of(16);
  const int pos[2] = {VOrder::position_of(g), VOrder::position_of(g + 8)};
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      uint8_t* row = s_p + (4 * grp + t) * Tr::kPRowBytes + kMStride * mt;
      row[pos[0]] = uint8_t(sm.codes[grp][mt]);
      row[pos[1]] = uint8_t(sm.codes[grp][mt] >> 16);
    }
  return true;
}

// A page's second half: O^T = V^T P'^T on the V codes, into the warp's state. At 4 and 2 bits the
// B operand is P' = p_j scale_j (u8 x u8 < 2^15), split into 128 hi + lo like Q' (lane (g, t) builds
// column g: row 4 grp + g / 2's hi or lo part), and each row's sum_j p_j zero_j (u8 x s8 dot products)
// goes to its WarpState::zero_term. At 8 bits the B operand is P itself, both row groups in one product
// as in s8_scores.
template <int kHeadDim, int kBits, bool kSas, int kGroups>
__device__ __forceinline__ void page_values(const uint8_t* v_half, const uint8_t* s_p, const TileSoftmax<kSas, kGroups>& sm,
                                            WarpState<kHeadDim, kGroups>& ws, int lane) {
  using Tr = DecodeTraits<kHeadDim>;
  const int g = lane / 4, t = lane % 4;
  const uint8_t* v_codes = v_half;
  const uint8_t* v_meta = v_half + Tr::half_meta(kBits);  // u8 scale[64], then s8 zero[64], by key
  constexpr int kVStride = Tr::v_row_bytes(kBits);
  using VOrder = CodeOrder<kBits, Tr::kKeys>;
  constexpr int kBGroups = kBits == 8 ? 1 : kGroups;  // B operands
  // Column g's P row: 4 grp + g / 2 (hi or lo part), or at 8 bits 4 (g % 2) + g / 2.
  const int p_row0 = kBits == 8 ? 4 * (g % 2) + g / 2 : g / 2;
  const bool lo_column = g & 1;
  uint32_t bp[kBGroups][2][2];
  int32_t zero_row[kGroups] = {};
#pragma unroll
  for (int grp = 0; grp < kBGroups; ++grp) {
    // The row's P codes at K positions 32 ks + 16 h + 4 t .. + 3 (word w = 8 ks + 4 h + t).
    const uint8_t* p_row = s_p + (4 * grp + p_row0) * Tr::kPRowBytes;
    int32_t zp = 0;  // that row, this lane's 16 keys: sum_j p_j zero_j
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int w = 8 * ks + 4 * h + t;
        const uint32_t p4 = *reinterpret_cast<const uint32_t*>(p_row + 4 * w);
        if constexpr (kBits == 8) {
          bp[grp][ks][h] = p4;
        } else {
          const uint32_t s4 = VOrder::gather(v_meta, w);
          zp = dp4a_u8s8(p4, VOrder::gather(v_meta + Tr::kKeys, w), zp);
          int32_t pp[4];
#pragma unroll
          for (int b = 0; b < 4; ++b) pp[b] = int32_t(__dp4a(p4, s4 & (0xFFu << (8 * b)), 0u));
          bp[grp][ks][h] = pack_bytes(pp, lo_column ? 0 : 7) & (lo_column ? 0x7F7F7F7Fu : 0xFFFFFFFFu);
        }
      }
    if constexpr (kBits < 8) {
      zp += __shfl_xor_sync(0xffffffffu, zp, 1);
      zp += __shfl_xor_sync(0xffffffffu, zp, 2);
      // Row 4 grp + t's sum sits in the lanes of g = 2 t.
      zero_row[grp] = __shfl_sync(0xffffffffu, zp, 8 * t);
    }
  }
  float svb[kGroups];
  bool same_max = true;
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) svb[grp] = __fmul_rn(sm.sv, sm.beta[grp]), same_max = same_max && sm.alpha[grp] == 1.0f;
  const bool rescale = !__all_sync(0xffffffffu, same_max);
  auto accumulate = [&](int grp, int ot, int i, int32_t pv) {
    float& o = ws.o[grp][ot][i];
    o = __fmaf_rn(small_int_to_float(pv), svb[grp], rescale ? __fmul_rn(o, sm.alpha[grp]) : o);
  };
  if constexpr (kBits < 8) {
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) {
      float& z = ws.zero_term[grp];
      z = __fmaf_rn(small_int_to_float(zero_row[grp]), svb[grp], rescale ? __fmul_rn(z, sm.alpha[grp]) : z);
    }
  }
#pragma unroll
  for (int ot = 0; ot < Tr::kOTiles; ++ot) {
    uint32_t top[2][2], bottom[2][2];  // channels 16 ot + g and 16 ot + g + 8
    VOrder::load(top, v_codes + (16 * ot + g) * kVStride, t);
    VOrder::load(bottom, v_codes + (16 * ot + g + 8) * kVStride, t);
#pragma unroll
    for (int grp = 0; grp < kBGroups; ++grp) {
      int32_t acc[4] = {0, 0, 0, 0};
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        const uint32_t a[4] = {top[ks][0], bottom[ks][0], top[ks][1], bottom[ks][1]};
        if constexpr (kBits == 8)
          mma_m16n8k32_s8u8(acc, a, bp[grp][ks]);
        else
          mma_m16n8k32_u8u8(acc, a, bp[grp][ks]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if constexpr (kBits == 8) {
#pragma unroll
          for (int og = 0; og < kGroups; ++og) accumulate(og, ot, i, acc[2 * i + og]);
        } else {
          accumulate(grp, ot, i, 128 * acc[2 * i] + acc[2 * i + 1]);
        }
      }
    }
  }
}

// The buffer's tile: per-token scales; K rows read from global memory, P V token by token.
template <int kHeadDim, bool kSas, int kGroups>
__device__ __forceinline__ void buffer_tile(const uint8_t* buffer, const uint8_t* s_q8, uint8_t* s_p, const float (&q_scale)[kGroups],
                                            const int (&visible)[kGroups], float skip_x, WarpState<kHeadDim, kGroups>& ws,
                                            int lane) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int D = kHeadDim, kMTiles = Tr::kKeys / 16;
  const int g = lane / 4, t = lane % 4;
  const uint8_t* k_rows = buffer + buffer_k_offset(D);
  const int8_t* v_rows = reinterpret_cast<const int8_t*>(buffer + buffer_v_offset(D));
  const float* k_scale = reinterpret_cast<const float*>(buffer + buffer_k_scale_offset(D));
  const float* v_scale = reinterpret_cast<const float*>(buffer + buffer_v_scale_offset(D));
  int32_t acc[kMTiles][4] = {};
  s8_scores<D>(acc, k_rows, s_q8, lane);
  float a[kGroups][kMTiles][2];  // the int32 scores as fp32; their scales are per key
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 2; ++i) a[grp][mt][i] = small_int_to_float(acc[mt][2 * i + grp]);
  const auto st = [&](int grp, int mt, int i) { return __fmul_rn(q_scale[grp], k_scale[16 * mt + g + 8 * i]); };
  int most_visible = 0;
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) most_visible = max(most_visible, visible[grp]);
  bool v_nan = false;
  for (int key = 0; key < most_visible; ++key) v_nan = v_nan || isnan(v_scale[key]);
  TileSoftmax<kSas, kGroups> sm;
  sm.template run<true>(a, st, visible, v_nan, skip_x, ws.m, ws.l, g);
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      uint8_t* row = s_p + (4 * grp + t) * Tr::kPRowBytes;
      row[16 * mt + g] = uint8_t(sm.codes[grp][mt]);
      row[16 * mt + g + 8] = uint8_t(sm.codes[grp][mt] >> 16);
    }
  __syncwarp();
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) {
    if (sm.skip[grp]) continue;
    const uint8_t* p = s_p + (4 * grp + t) * Tr::kPRowBytes;
#pragma unroll
    for (int ot = 0; ot < Tr::kOTiles; ++ot)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int c = 16 * ot + g + 8 * i;
        float o = __fmul_rn(ws.o[grp][ot][i], sm.alpha[grp]);
        for (int key = 0; key < visible[grp]; ++key)
          o = __fmaf_rn(float(int32_t(p[key]) * int32_t(v_rows[key * D + c])), __fmul_rn(v_scale[key], sm.beta[grp]), o);
        ws.o[grp][ot][i] = o;
      }
  }
  __syncwarp();
}

// The copies of a warp's halves: half h of the warp's sequence of halves (K of its it-th tile is h = 2 it,
// V is 2 it + 1; tile j = begin + warp + it * kWarps) goes to ring slot h % 3, so while one half is used
// the next two are in flight. The warps read a tile's page table entry (page_id) a tile ahead of its
// copies: read just before them, it stalled the warp on every tile (9% of the decode kernel's stall
// samples at 64 x 4k, 4 bits, on an H200).
template <int kHeadDim, int kBits>
struct HalfCopies {
  using Tr = DecodeTraits<kHeadDim>;
  // K, V regions of a page: codes, then metadata.
  static constexpr int kRegion[2] = {Tr::half_meta(kBits) + Tr::k_meta_bytes(kBits), Tr::half_meta(kBits) + Tr::v_meta_bytes(kBits)};
  const uint8_t* pool;
  const int32_t* table;
  int64_t page_bytes, region_offset[2];
  int64_t k_scale_offset, v_scale_offset;
  uint8_t* ring;
  float* scales;  // the warp's scale words: K and V block scales of each slot
  int table_width, half_stride, first, page_end, lane;

  __device__ HalfCopies(const DecodeParams& p, uint8_t* ring_, float* scales_, int half_stride_, int slot, int hk, int first_, int page_end_,
                        int lane_)
      : pool(p.pool), table(p.tables + int64_t(slot) * p.table_width), page_bytes(p.layout.page_bytes),
        region_offset{p.layout.k_offset[hk], p.layout.v_offset[hk]}, k_scale_offset(page_k_scale_offset(hk)),
        v_scale_offset(page_v_scale_offset(p.hkv, hk)), ring(ring_), scales(scales_), table_width(p.table_width),
        half_stride(half_stride_), first(first_), page_end(page_end_), lane(lane_) {}

  __device__ uint8_t* slot_of(int ring_slot) const { return ring + ring_slot * half_stride; }
  __device__ const float* scales_of(int ring_slot) const { return scales + 2 * ring_slot; }
  // The slot after `ring_slot` (tracked by the loop rather than computed as h % 3 per copy).
  static __device__ __forceinline__ int next_slot(int ring_slot) { return ring_slot + 1 == Tr::kRingHalves ? 0 : ring_slot + 1; }

  // Tile j's page id (j >= 1, the first block being in no page; read only for tiles in the split's
  // pages: page_end is the split's end capped at the sequence's full blocks), and the page's address,
  // formed where the copies need it (formed at the read, it waited for the read there).
  __device__ __forceinline__ int32_t page_id(int j) const { return j < page_end ? table[page_table_index(j)] : 0; }
  // The same for the warp's first tile, read whether or not it is in the split's pages (the index kept in
  // the table's row; stage() copies nothing for tiles past page_end), so that the read does not wait for
  // the sequence's length: it and the page table would otherwise be two DRAM latencies in a row before
  // the first copies.
  __device__ __forceinline__ int32_t first_page_id(int j) const { return table[min(page_table_index(j), int64_t(table_width - 1))]; }
  __device__ __forceinline__ const uint8_t* page(int32_t id) const { return pool + int64_t(id) * page_bytes; }

  // Issues the copies of tile j's K half (v false) or V half into ring slot `ring_slot` (nothing past the
  // split's pages).
  __device__ __forceinline__ void stage(bool v, int ring_slot, int j, const uint8_t* page) const {
    if (j >= page_end) return;
    uint8_t* dst = slot_of(ring_slot);
    const uint32_t lane_dst = static_cast<uint32_t>(__cvta_generic_to_shared(dst)) + 16 * lane;
    if (!v) {
      stage_bytes_async<kRegion[0]>(lane_dst, page + region_offset[0] + 16 * lane, lane);
      if (lane == 0) cp_async_4(scales + 2 * ring_slot, page + k_scale_offset);
      if (lane == 1) cp_async_4(scales + 2 * ring_slot + 1, page + v_scale_offset);
    } else {
      stage_bytes_async<kRegion[1]>(lane_dst, page + region_offset[1] + 16 * lane, lane);
    }
  }
};

// The first block (docs/FORMATS.md 3.2) of a sequence slot's KV head.
__device__ __forceinline__ const uint8_t* first_block_of(const DecodeParams& p, int slot, int hk, int head_dim) {
  return p.first_blocks + (int64_t(slot) * p.hkv + hk) * first_block_bytes(head_dim);
}

// Whether the warp with tile `own` reads the sequence's first block (tile 0, when the sequence has one).
__device__ __forceinline__ bool reads_first_block(int own, int64_t len) { return own == 0 && len >= TA_BLOCK_TOKENS; }

// A warp's tiles of the split after its first two halves were issued: the sequence's first block if it
// is this warp's (tile 0: the first warp of the first split; an 8-bit tile read from global memory while
// the ring's first copies are in flight), the pages, then (last in the sequence's order, so after the
// loop, where the loop's registers are free for it) the buffer's tile if it is this warp's.
template <int kHeadDim, int kBits, bool kSas, int kGroups>
__device__ __forceinline__ void warp_tiles(const DecodeParams& p, const HalfCopies<kHeadDim, kBits>& copies, const uint8_t* s_q8,
                                           const uint8_t* s_qk, uint8_t* s_b, uint8_t* s_p, const float (&q_scale)[kGroups],
                                           const int64_t (&max_pos)[kGroups], const int (&row_off)[kGroups], int slot, int hk,
                                           int64_t len, int own, int end, WarpState<kHeadDim, kGroups>& ws, int lane) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int D = kHeadDim;
  const int blocks = int(len / Tr::kKeys);
  const float skip_x = skip_threshold(len);
  const int first = copies.first;
  if (reads_first_block(own, len)) {
    const uint8_t* block = first_block_of(p, slot, hk, D);
    int visible[kGroups];
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp) visible[grp] = int(min(int64_t(Tr::kKeys), max(int64_t(0), max_pos[grp] + 1)));
    TileSoftmax<kSas, kGroups> sm;
    const bool values = page_scores<kHeadDim, 8, kSas, kGroups>(block + first_block_k_offset(D),
                                                                reinterpret_cast<const float*>(block + first_block_scale_offset(D)), s_q8,
                                                                s_qk, s_b, s_p, q_scale, visible, skip_x, ws, sm, lane);
    __syncwarp();  // P rows written
    if (values) page_values<kHeadDim, 8, kSas, kGroups>(block + first_block_v_offset(D), s_p, sm, ws, lane);
    __syncwarp();  // s_p is rewritten next
  }
  int32_t next_id = copies.page_id(first + Tr::kWarps);  // of the tile staged in the first iteration
  int k_slot = 0;  // the ring slot of this tile's K; its V is in the next one, the next tile's K goes to the one
                   // after that (the previous V's) and its V to this K's
  for (int j = first; j < copies.page_end; j += Tr::kWarps) {
    const int v_slot = copies.next_slot(k_slot), free_slot = copies.next_slot(v_slot);
    int visible[kGroups];
    if constexpr (kGroups == 1) {
      visible[0] = int(min(int64_t(Tr::kKeys), max(int64_t(0), max_pos[0] - int64_t(j) * Tr::kKeys + 1)));
    } else {  // from len, live anyway, and row_off: two registers fewer than max_pos, which ptxas spilled in the loop
      const int64_t ahead = len - p.q_behind - p.q_len - int64_t(j) * Tr::kKeys + 1;
      const int ahead32 = int(min(int64_t(Tr::kKeys), max(int64_t(-Tr::kKeys), ahead)));
#pragma unroll
      for (int grp = 0; grp < kGroups; ++grp) visible[grp] = min(Tr::kKeys, max(0, ahead32 + row_off[grp]));
    }
    cp_async_wait<1>();  // K of this tile has landed (its V may still be in flight)
    __syncwarp();
    const uint8_t* next_page = copies.page(next_id);
    copies.stage(false, free_slot, j + Tr::kWarps, next_page), cp_async_commit();  // the next K, into the slot of the previous V
    const int32_t id_after = copies.page_id(j + 2 * Tr::kWarps);
    TileSoftmax<kSas, kGroups> sm;
    const bool values = page_scores<kHeadDim, kBits, kSas, kGroups>(copies.slot_of(k_slot), copies.scales_of(k_slot), s_q8, s_qk, s_b,
                                                                    s_p, q_scale, visible, skip_x, ws, sm, lane);
    cp_async_wait<1>();  // V of this tile has landed
    __syncwarp();
    copies.stage(true, k_slot, j + Tr::kWarps, next_page), cp_async_commit();  // the next V, into the slot of this K
    next_id = id_after;
    if (values) page_values<kHeadDim, kBits, kSas, kGroups>(copies.slot_of(v_slot), s_p, sm, ws, lane);
    __syncwarp();  // s_p and the ring's slots are rewritten next
    k_slot = free_slot;
  }
  cp_async_wait<0>();
  if constexpr (kBits < 8) ws.fold_zero_term();
  if (blocks >= own && blocks < end && (blocks - own) % Tr::kWarps == 0 && len % Tr::kKeys != 0) {
    const int64_t first_pos = int64_t(blocks) * Tr::kKeys;
    int visible[kGroups];
#pragma unroll
    for (int grp = 0; grp < kGroups; ++grp)
      visible[grp] = int(min(int64_t(len % Tr::kKeys), max(int64_t(0), max_pos[grp] - first_pos + 1)));
    buffer_tile<kHeadDim, kSas, kGroups>(p.buffers + (int64_t(slot) * p.hkv + hk) * buffer_head_bytes(D), s_q8, s_p, q_scale, visible,
                                         skip_x, ws, lane);
  }
}

// One element of a row merged from n states in order (docs/FORMATS.md 1.7): M = max m_s, then
// l = sum fma(l_s, 2^(m_s - M), .) and o likewise; states that saw no key (m_s = -inf) add nothing.
struct MergedState {
  float m = -INFINITY, l = 0.0f, o = 0.0f;
  __device__ __forceinline__ float normalized() const { return m == -INFINITY ? 0.0f : __fmul_rn(o, __fdiv_rn(1.0f, l)); }
};

// The states are read kBatch at a time, all loads of a batch issued before their arithmetic: from global
// memory (cache_merge_kernel) one state's loads would otherwise wait for the previous state's. Up to
// kBatch states are read once, into registers (one round of loads); more take two passes of batches.
// From shared memory (the warps of one CTA) a batch of all the warps is enough. cache_merge_kernel has
// an instance for batches of 8 and one for batches of 32, for more splits (batch 1 at 32k tokens has
// 32): the one instance of 32 (128 registers) measured 2-3% slower with a few splits.
constexpr int kMergeBatchSmall = 8, kMergeBatchLarge = 32;

template <int kBatch, class M, class L, class O>
__device__ __forceinline__ MergedState merge_in_order(int n, M m_of, L l_of, O o_of) {
  MergedState r;
  auto add = [&](float m, float l, float o) {  // in order; states that saw no key add nothing
    if (m == -INFINITY) return;
    const float w = exp2f(m - r.m);
    r.l = __fmaf_rn(l, w, r.l);
    r.o = __fmaf_rn(o, w, r.o);
  };
  if (n <= kBatch) {
    float ms[kBatch], ls[kBatch], os[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const bool in = k < n;
      ms[k] = in ? m_of(k) : -INFINITY;
      ls[k] = in ? l_of(k) : 0.0f;
      os[k] = in ? o_of(k) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) r.m = nan_max(r.m, ms[k]);
    if (r.m == -INFINITY) return r;
#pragma unroll
    for (int k = 0; k < kBatch; ++k) add(ms[k], ls[k], os[k]);
    return r;
  }
  for (int s0 = 0; s0 < n; s0 += kBatch) {
    float ms[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) ms[k] = s0 + k < n ? m_of(s0 + k) : -INFINITY;
#pragma unroll
    for (int k = 0; k < kBatch; ++k) r.m = nan_max(r.m, ms[k]);
  }
  if (r.m == -INFINITY) return r;
  for (int s0 = 0; s0 < n; s0 += kBatch) {
    float ms[kBatch], ls[kBatch], os[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const bool in = s0 + k < n;
      ms[k] = in ? m_of(s0 + k) : -INFINITY;
      ls[k] = in ? l_of(s0 + k) : 0.0f;
      os[k] = in ? o_of(s0 + k) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) add(ms[k], ls[k], os[k]);
  }
  return r;
}

// Query token 0 of query head h of sequence seq (further tokens are p.q_n elements apart).
template <typename T>
__device__ __forceinline__ const T* q_head_row(const DecodeParams& p, int seq, int h) {
  return static_cast<const T*>(p.q) + int64_t(seq) * p.q_b + int64_t(h) * p.q_h;
}

// Query token 0 of each of a warp's query heads (hl = warp + k kWarps), as loaded: read before the
// page table, so that the two latencies overlap (a decode step has one token per head; further tokens
// are read where they are quantized).
template <int kHeadDim, typename T>
struct FirstQueryTokens {
  using Tr = DecodeTraits<kHeadDim>;
  static constexpr int kHeads = Tr::kRows / Tr::kWarps, kPerLane = kHeadDim / 32;
  T x[kHeads][kPerLane];  // channel lane + 32 m of head warp + k kWarps

  __device__ __forceinline__ FirstQueryTokens(const DecodeParams& p, int seq, int h0, int heads, int warp, int lane) {
#pragma unroll
    for (int k = 0; k < kHeads; ++k) {
      const int hl = warp + k * Tr::kWarps;
      const T* src = q_head_row<T>(p, seq, h0 + (hl < heads ? hl : 0));
#pragma unroll
      for (int m = 0; m < kPerLane; ++m) x[k][m] = src[lane + 32 * m];
    }
  }
};

// Q rows r = head * q_len + i of the CTA: one INT8 block per query head (ref::quantize_head_block), scale
// times softmax_scale * log2(e), into s_q8 (channel order) and, below 8 bits, s_qk (the K order of the
// head's width, which every tile's Q' reads); padding rows get zero codes. Token 0 comes from `first`.
template <int kHeadDim, typename T, int kBits>
__device__ __forceinline__ void quantize_q_rows(const DecodeParams& p, const FirstQueryTokens<kHeadDim, T>& first, int seq, int h0,
                                                int heads, int rows, uint8_t* s_q8, uint8_t* s_qk, float* s_q_scale, int warp, int lane) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int D = kHeadDim;
  auto put = [&](int r, int c, uint8_t code) {
    s_q8[r * D + c] = code;
    if constexpr (kBits < 8) s_qk[r * D + CodeOrder<kBits, D>::position_of(c)] = code;
  };
#pragma unroll
  for (int k = 0; k < FirstQueryTokens<kHeadDim, T>::kHeads; ++k) {
    const int hl = warp + k * Tr::kWarps;
    if (hl >= heads) break;  // warp-uniform
    const T* src = q_head_row<T>(p, seq, h0 + hl);
    auto value = [&](int i, int m) { return to_float(i == 0 ? first.x[k][m] : src[int64_t(i) * p.q_n + lane + 32 * m]); };
    float amax = 0.0f;
    bool finite = true;
    for (int i = 0; i < p.q_len; ++i)
#pragma unroll
      for (int m = 0; m < D / 32; ++m) {
        const float x = value(i, m);
        finite = finite && isfinite(x);
        amax = fmaxf(amax, fabsf(x));
      }
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    finite = __all_sync(0xffffffffu, finite);
    const Int8Scale s = int8_block_scale(amax, finite);
    for (int i = 0; i < p.q_len; ++i) {
      const int r = hl * p.q_len + i;
#pragma unroll
      for (int m = 0; m < D / 32; ++m) put(r, lane + 32 * m, uint8_t(int8_code(value(i, m), s.inv)));
      if (lane == 0) s_q_scale[r] = __fmul_rn(s.scale, p.scale_log2);
    }
  }
  for (int r = rows + warp; r < Tr::kRows; r += Tr::kWarps) {
    for (int c = lane; c < D; c += 32) put(r, c, 0);
    if (lane == 0) s_q_scale[r] = 0.0f;
  }
}

// A CTA's work at one bit width: Q's first token is read, then the warps' first copies go out, so that
// the two latencies (and the page table's) overlap each other and Q's quantization; then the warps' tiles.
template <int kHeadDim, typename T, int kBits, bool kSas, int kGroups>
__device__ __forceinline__ void decode_split(const DecodeParams& p, uint8_t* smem, float* s_q_scale, int seq, int h0, int heads, int rows,
                                             int slot, int hk, int64_t len, int begin, int end, WarpState<kHeadDim, kGroups>& ws) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int D = kHeadDim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  uint8_t* s_q8 = smem;                  // [kRows][D] INT8 Q, channel order
  uint8_t* s_qk = smem + Tr::kRows * D;  // [kRows][D] the same in the K order of this head's width
  // Per warp (DecodeTraits): the B rows of Q' parts (every row rebuilt for each K group), P rows, and the ring.
  uint8_t* wbase = smem + Tr::kQBytes + warp * Tr::warp_bytes(kGroups, p.max_bits);
  uint8_t* ring = wbase + Tr::warp_fixed_bytes(kGroups, p.max_bits);
  uint8_t* s_b = Tr::b_rows_in_ring(kGroups, p.max_bits) ? ring + Tr::half_bytes(TA_BITS_2) : wbase;
  uint8_t* s_p = wbase + Tr::b_rows_bytes(kGroups, p.max_bits);
  float* scales = reinterpret_cast<float*>(smem + Tr::scales_offset(kGroups, p.max_bits) + warp * Tr::kScaleBytes);
  // The warp's tiles are own, own + kWarps, ...; tile 0 (the first block) is in no page.
  const int own = begin + warp, first_paged = own == 0 ? Tr::kWarps : own;
  const HalfCopies<kHeadDim, kBits> copies(p, ring, scales, Tr::half_bytes(p.max_bits), slot, hk, first_paged,
                                           min(end, int(len / Tr::kKeys)), lane);
  const FirstQueryTokens<kHeadDim, T> first_tokens(p, seq, h0, heads, warp, lane);
  const uint8_t* first_page = copies.page(copies.first_page_id(first_paged));
  copies.stage(false, 0, first_paged, first_page), cp_async_commit();
  copies.stage(true, 1, first_paged, first_page), cp_async_commit();
  // The first block's tile is read from global memory, not through the ring (warp_tiles): its lines are
  // asked into L2 now, so that its loads after Q's quantization wait for L2 rather than DRAM.
  if (reads_first_block(own, len)) {
    const uint8_t* block = first_block_of(p, slot, hk, D);
    for (int at = kPageAlign * lane; at < first_block_bytes(D); at += 32 * kPageAlign) prefetch_global_l2(block + at);
  }

  quantize_q_rows<kHeadDim, T, kBits>(p, first_tokens, seq, h0, heads, rows, s_q8, s_qk, s_q_scale, warp, lane);
  auto zero = [&](uint8_t* area, int bytes) {
    for (int i = lane; i < bytes / 4; i += 32) reinterpret_cast<uint32_t*>(area)[i] = 0u;
  };
  zero(s_p, Tr::kRows * Tr::kPRowBytes);
  __syncthreads();

  int64_t max_pos[kGroups];  // of row 4 grp + t: its last visible key's position, -1 for a padding row
  int row_off[kGroups];      // max_pos - (len - q_behind - q_len), far below -64 for a padding row
  float q_scale[kGroups];
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) {
    const int row = 4 * grp + t;
    max_pos[grp] = row < rows ? len - p.q_behind - p.q_len + row % p.q_len : -1;
    row_off[grp] = row < rows ? row % p.q_len : -2 * Tr::kKeys;
    q_scale[grp] = s_q_scale[row];
  }
  warp_tiles<kHeadDim, kBits, kSas, kGroups>(p, copies, s_q8, s_qk, s_b, s_p, q_scale, max_pos, row_off, slot, hk, len, own, end, ws, lane);
}

// kGroups: groups of 4 query rows (1 when the CTA's rows are at most 4, else 2); kMinBlocks: the
// register budget (DecodeTraits); kLayerBits: 0 (the head's width read from the layout), or the width
// of every head of the layers it serves, whose path alone it then holds (DecodeTraits::kFourBitInstance).
template <int kHeadDim, typename T, bool kSas, int kGroups, int kMinBlocks, int kLayerBits>
__global__ void __launch_bounds__(DecodeTraits<kHeadDim>::kThreads, kMinBlocks)
    cache_decode_kernel(const __grid_constant__ DecodeParams p) {
  using Tr = DecodeTraits<kHeadDim>;
  constexpr int D = kHeadDim;
  extern __shared__ __align__(128) uint8_t smem[];  // 128: the rings' slots start on lines (DecodeTraits)
  float* s_q_scale = reinterpret_cast<float*>(smem + Tr::q_scales_offset(kGroups, p.max_bits));

  const int split = blockIdx.x, seq = blockIdx.z;
  const int group = p.hq / p.hkv, chunks = (group + p.heads_per_cta - 1) / p.heads_per_cta;
  const int hk = blockIdx.y / chunks, h0 = hk * group + (blockIdx.y % chunks) * p.heads_per_cta;
  const int heads = min(p.heads_per_cta, hk * group + group - h0), rows = heads * p.q_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int slot = p.slots[seq];
  const int64_t len = p.lengths[slot];
  const int tiles = TA_BLOCK_COUNT(len);
  // begin does not depend on len (see HalfCopies::first_page_id); begin >= end: the split has no tiles.
  // The last split takes every tile left: a replayed graph's sequences may have outgrown the splits
  // sized when it was captured (without a reservation, DeviceCache::decode).
  const int begin = split * p.split_tiles, end = split == p.num_splits - 1 ? tiles : min(tiles, begin + p.split_tiles);

  WarpState<kHeadDim, kGroups> ws;
  if constexpr (kLayerBits != 0) {
    decode_split<kHeadDim, T, kLayerBits, kSas, kGroups>(p, smem, s_q_scale, seq, h0, heads, rows, slot, hk, len, begin, end, ws);
  } else {
    const int bits = p.layout.bits[hk];
    if (bits == 8)
      decode_split<kHeadDim, T, 8, kSas, kGroups>(p, smem, s_q_scale, seq, h0, heads, rows, slot, hk, len, begin, end, ws);
    else if (bits == 4)
      decode_split<kHeadDim, T, 4, kSas, kGroups>(p, smem, s_q_scale, seq, h0, heads, rows, slot, hk, len, begin, end, ws);
    else
      decode_split<kHeadDim, T, 2, kSas, kGroups>(p, smem, s_q_scale, seq, h0, heads, rows, slot, hk, len, begin, end, ws);
  }

  // The merge kernel (several splits) may start launching now: it waits for this grid's end.
  griddepcontrol_launch_dependents();
  // The warps' states, merged per row in shared memory (each warp's own area, now free); then the
  // output (one split) or the split's part for cache_merge_kernel.
  __syncwarp();  // warp_tiles waited for its last copies
  float* st = reinterpret_cast<float*>(smem + Tr::kQBytes + warp * Tr::warp_bytes(kGroups, p.max_bits));  // m[8], l[8], o[8][D]
  const int g = lane / 4;
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) {
    const int row = 4 * grp + t;
    if (g == 0) st[row] = ws.m[grp], st[Tr::kRows + row] = ws.l[grp];
#pragma unroll
    for (int ot = 0; ot < Tr::kOTiles; ++ot)
#pragma unroll
      for (int i = 0; i < 2; ++i) st[2 * Tr::kRows + row * D + 16 * ot + g + 8 * i] = ws.o[grp][ot][i];
  }
  __syncthreads();
  const bool one_split = p.num_splits == 1;
  for (int idx = threadIdx.x; idx < rows * D; idx += Tr::kThreads) {
    const int row = idx / D, c = idx % D, h = h0 + row / p.q_len, i = row % p.q_len;
    auto warp_state = [&](int w) {
      return reinterpret_cast<const float*>(smem + Tr::kQBytes + w * Tr::warp_bytes(kGroups, p.max_bits));
    };
    const MergedState m = merge_in_order<Tr::kWarps>(
        Tr::kWarps, [&](int w) { return warp_state(w)[row]; }, [&](int w) { return warp_state(w)[Tr::kRows + row]; },
        [&](int w) { return warp_state(w)[2 * Tr::kRows + row * D + c]; });
    if (one_split) {
      static_cast<T*>(p.out)[seq * p.o_b + i * p.o_n + h * p.o_h + c] = T(m.normalized());
      continue;
    }
    float* part = p.partial + (((int64_t(seq) * p.hq + h) * p.q_len + i) * p.num_splits + split) * (D + 2);
    if (c == 0) part[0] = m.m, part[1] = m.l;
    part[2 + c] = m.o;
  }
}

// With several splits: merges the splits' parts of each row (a CTA per row) and normalizes. Launched as
// a programmatic dependent of the decode kernel where the GPU has it (sm_90 on), so that its launch
// overlaps the decode kernel's last CTAs. (Merging them in the last CTA of each row group instead,
// through arrival counters, saved this launch but was slower on every shape measured, by up to 35% at
// batch 1: docs/BENCHMARKS.md.)
template <typename T, int kBatch>
__global__ void cache_merge_kernel(const float* partial, int num_splits, int hq, int q_len, int dim, void* out, int64_t o_b,
                                   int64_t o_n, int64_t o_h) {
  griddepcontrol_wait();  // launched as a dependent of the decode kernel: its parts are complete
  const int64_t row = blockIdx.x;  // (seq * hq + h) * q_len + i
  const int i = int(row % q_len), h = int((row / q_len) % hq), seq = int(row / (int64_t(q_len) * hq));
  const float* parts = partial + row * num_splits * (dim + 2);
  T* dst = static_cast<T*>(out) + seq * o_b + i * o_n + h * o_h;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const MergedState m = merge_in_order<kBatch>(
        num_splits, [&](int s) { return parts[s * (dim + 2)]; }, [&](int s) { return parts[s * (dim + 2) + 1]; },
        [&](int s) { return parts[s * (dim + 2) + 2 + c]; });
    dst[c] = T(m.normalized());
  }
}

}  // namespace turboattn::cuda
