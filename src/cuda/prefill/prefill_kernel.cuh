// FlashQ + SAS prefill attention on integer tensor cores, for every architecture from sm_80. One CTA
// (one warpgroup: 4 warps x 16 rows) computes one 64-row Q block of one head against all its visible
// 64-key tiles: S = Q8 K8^T (s8 x s8 -> s32), P codes by SAS relative to each tile's maximum,
// O += P V (u8 x s8 -> s32), in the order and with the fp32 operations of docs/FORMATS.md, section 1.5.
// The two matmuls and the shared-memory layout of the K and V^T tiles come from `Mma`
// (sm80::PrefillMma: mma.sync and ldmatrix); the softmax, SAS, masking and the skip rule from
// tile_softmax.cuh, which the Hopper kernel (sm90/prefill_kernel.cuh) shares, so both give the same
// bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda/common/mma.cuh"
#include "cuda/prefill/tile_softmax.cuh"
#include "format/skip_rule.h"
#include "turboattn/format.h"

namespace turboattn::cuda {

// Tile shapes of the kernel for one head dim.
template <int kHeadDim>
struct PrefillShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;  // one warpgroup
#ifndef TURBOATTN_PREFILL_MIN_BLOCKS
#define TURBOATTN_PREFILL_MIN_BLOCKS 3  // measured on an H200: 209 vs 175 TFLOP/s at D = 128 over 2
#endif
  static constexpr int kMinBlocksPerSm = kHeadDim <= 128 ? TURBOATTN_PREFILL_MIN_BLOCKS : 1;  // register budget
  static constexpr int kBlockM = 16 * kWarps;  // query rows per CTA: one Q block
  static constexpr int kBlockN = TA_BLOCK_TOKENS;  // keys per tile: one K/V block
  static_assert(kBlockM == TA_BLOCK_TOKENS, "a CTA's rows must be exactly one Q block");
  static constexpr int kKSteps = kHeadDim / 32;  // k-steps of Q K^T (32 channels each)
  static constexpr int kSTiles = kBlockN / 8;    // n-tiles of S (8 keys each)
  static constexpr int kOTiles = kHeadDim / 8;   // n-tiles of O (8 channels each)
  // Q rows in shared memory hold an odd number of 16-byte chunks, so ldmatrix's 8 rows hit 8 bank groups.
  static constexpr int kQRowBytes = kHeadDim + (((kHeadDim / 16) % 2 == 0) ? 16 : 0);
  static constexpr int kQBytes = kBlockM * kQRowBytes;
  static constexpr int kChunksPerRow = kHeadDim / 16;  // 16-byte chunks of a K row
  static constexpr int kVtChunksPerRow = kBlockN / 16;  // of a V^T row (one channel's 64 keys)
};

// Dynamic shared memory of the kernel over Mma: the Q block, then K and V^T tiles in two stages.
template <class Mma>
constexpr int prefill_smem_bytes() {
  return PrefillShape<Mma::kHeadDim>::kQBytes + 2 * (Mma::kKBytes + Mma::kVtBytes);
}

// kSas: SAS exponential (docs/FORMATS.md, section 2), else the exact-exponential variant.
template <class Mma, typename Out, bool kSas>
__global__ void __launch_bounds__(PrefillShape<Mma::kHeadDim>::kThreads, PrefillShape<Mma::kHeadDim>::kMinBlocksPerSm)
    flashq_prefill_kernel(const PrefillParams p) {
  constexpr int kHeadDim = Mma::kHeadDim;
  using Tr = PrefillShape<kHeadDim>;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* s_q = smem;
  uint8_t* s_k = smem + Tr::kQBytes;      // 2 stages
  uint8_t* s_vt = s_k + 2 * Mma::kKBytes;  // 2 stages

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.hq / p.hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int m0 = qb * Tr::kBlockM;
  const int q_blocks = TA_BLOCK_COUNT(p.nq);
  const int k_blocks = TA_BLOCK_COUNT(p.nk);
  const float skip_x = skip_threshold(p.nk);

  const int tiles = visible_tiles(p, qb);

  const int8_t* q_src = p.q + ((int64_t(b) * p.hq + h) * p.nq + m0) * kHeadDim;
  const int8_t* k_src = p.k + (int64_t(b) * p.hkv + hk) * p.nk * kHeadDim;
  const int8_t* vt_src = p.vt + (int64_t(b) * p.hkv + hk) * kHeadDim * p.nk_padded;

  // Async copies of the Q block and of K/V tile j (rows past the sequence are zero-filled).
  constexpr int kChunksPerRow = Tr::kChunksPerRow;
  for (int i = threadIdx.x; i < Tr::kBlockM * kChunksPerRow; i += Tr::kThreads) {
    const int r = i / kChunksPerRow, c = i % kChunksPerRow;
    const bool valid = m0 + r < p.nq;
    cp_async_16(s_q + r * Tr::kQRowBytes + 16 * c, valid ? q_src + int64_t(r) * kHeadDim + 16 * c : q_src, valid);
  }
  // Each thread copies the same 16-byte chunks of every K and V^T tile (kThreads apart), placed where
  // Mma's layout wants them. When kThreads spans whole groups of 8 rows (every case but K at D = 96),
  // a thread's i-th copy is i * kThreads / chunks rows below its first, at Mma's row pitch in shared
  // memory (Mma::copy_coords keeps that property), so the addresses are computed once, not per tile.
  constexpr int kKCopies = Tr::kBlockN * kChunksPerRow / Tr::kThreads;
  constexpr int kVtChunks = Tr::kVtChunksPerRow;
  constexpr int kVtCopies = kHeadDim * kVtChunks / Tr::kThreads;
  static_assert(kKCopies * Tr::kThreads == Tr::kBlockN * kChunksPerRow && kVtCopies * Tr::kThreads == kHeadDim * kVtChunks,
                "tiles split evenly over the threads");
  constexpr bool kKLinear = Tr::kThreads % (8 * kChunksPerRow) == 0;
  static_assert(Tr::kThreads % (8 * kVtChunks) == 0, "V^T copies step by whole groups of 8 rows");
  constexpr int kKRowStep = Tr::kThreads / kChunksPerRow, kVtRowStep = Tr::kThreads / kVtChunks;
  const int2 k_rc = Mma::copy_coords(threadIdx.x, kChunksPerRow), v_rc = Mma::copy_coords(threadIdx.x, kVtChunks);
  const int k_smem = Mma::k_offset(k_rc.x, k_rc.y), v_smem = Mma::vt_offset(v_rc.x, v_rc.y);
  const int8_t* k_first = k_src + int64_t(k_rc.x) * kHeadDim + 16 * k_rc.y;
  const int8_t* v_first = vt_src + int64_t(v_rc.x) * p.nk_padded + 16 * v_rc.y;
  const int64_t v_step = int64_t(kVtRowStep) * p.nk_padded;
  auto load_tile = [&](int j, int stage) {
    uint8_t* sk = s_k + stage * Mma::kKBytes;
    uint8_t* sv = s_vt + stage * Mma::kVtBytes + v_smem;
    const int n0 = j * Tr::kBlockN;
    const bool full = n0 + Tr::kBlockN <= p.nk;
#pragma unroll
    for (int i = 0; i < kKCopies; ++i) {
      if constexpr (kKLinear) {
        const bool valid = full || n0 + k_rc.x + i * kKRowStep < p.nk;
        cp_async_16(sk + k_smem + i * kKRowStep * Mma::kKRowPitch,
                    valid ? k_first + int64_t(n0 + i * kKRowStep) * kHeadDim : k_src, valid);
      } else {
        const int2 rc = Mma::copy_coords(threadIdx.x + i * Tr::kThreads, kChunksPerRow);
        const bool valid = full || n0 + rc.x < p.nk;
        cp_async_16(sk + Mma::k_offset(rc.x, rc.y), valid ? k_src + int64_t(n0 + rc.x) * kHeadDim + 16 * rc.y : k_src, valid);
      }
    }
    const int8_t* vg = v_first + n0;
#pragma unroll
    for (int i = 0; i < kVtCopies; ++i) cp_async_16(sv + i * kVtRowStep * Mma::kVtRowPitch, vg + i * v_step, true);
  };
  if (tiles > 0) load_tile(0, 0);
  cp_async_commit();

  const float q_scale = __fmul_rn(p.q_scale[(int64_t(b) * p.hq + h) * q_blocks + qb], p.scale_log2);
  const float* k_scales = p.k_scale + (int64_t(b) * p.hkv + hk) * k_blocks;
  const float* v_scales = p.v_scale + (int64_t(b) * p.hkv + hk) * k_blocks;

  // Per thread: rows g and g + 8 of this warp's 16.
  const int row0 = m0 + 16 * warp + g;
  RowState rs;
  float o[Tr::kOTiles][4];
#pragma unroll
  for (int i = 0; i < Tr::kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  // The Q block stays in shared memory; Mma reloads its fragments for each tile (registers are the
  // scarcer resource: O, S and P fragments hold most of them).
  const uint8_t* q_frag = s_q + (16 * warp + lane % 16) * Tr::kQRowBytes + 16 * (lane / 16);
  cp_async_wait<0>();
  __syncthreads();

  for (int j = 0; j < tiles; ++j) {
    const float k_scale = k_scales[j], v_scale = v_scales[j];  // loaded before S, used after it
    const int stage = j & 1;
    if (j + 1 < tiles) load_tile(j + 1, stage ^ 1);
    cp_async_commit();
    const uint8_t* sk = s_k + stage * Mma::kKBytes;
    const uint8_t* sv = s_vt + stage * Mma::kVtBytes;

    // S = Q K^T for the warp's 16 rows and the tile's 64 keys: s_acc[4 nt + i] is row g + 8 (i / 2),
    // key 8 nt + 2 t + i % 2 (the m16n8 accumulator layout, n-tile after n-tile).
    int32_t s_acc[4 * Tr::kSTiles];
    Mma::scores(s_acc, q_frag, sk, lane);

    const float st = __fmul_rn(q_scale, k_scale);
    const int warp_row = m0 + 16 * warp;
    const TileP tp = softmax_tile<kSas>(s_acc, st, v_scale, tile_needs_mask(p, j, warp_row), p, j, row0, t, skip_x, rs);

    // O = alpha O + (P V) sv beta, Mma::kPvChannels channels at a time; skipped when none of the warp's
    // rows use the tile.
    if (tp.warp_uses) {
      constexpr int kPvTiles = Mma::kPvChannels / 8;
#pragma unroll
      for (int chunk = 0; chunk < kHeadDim / Mma::kPvChannels; ++chunk) {
        int32_t acc[4 * kPvTiles];  // acc[4 nt + i]: row g + 8 (i / 2), channel 8 nt + 2 t + i % 2 of the chunk
        Mma::pv(acc, tp.pa, sv, chunk, lane);
        accumulate_o<kPvTiles>(o, kPvTiles * chunk, acc, tp);
      }
    }  // else every row skipped: alpha is 1 and O is unchanged
    cp_async_wait<0>();
    __syncthreads();
  }

  store_rows<Out>(o, rs, p, b, h, row0, t);
}

}  // namespace turboattn::cuda
