// FlashQ + SAS prefill on Hopper (sm_90a), warp-specialized: a producer warpgroup streams K and V^T
// tiles into a ring of shared-memory stages (cp.async, completion tracked by mbarriers), up to four
// tiles ahead, and consumer warpgroups (four at head dim 64, three at 128), each with its own 64-row Q
// block of the same head, run both matmuls on wgmma (Q, K and V^T from shared memory, P from
// registers). Consumers wait for the producer and, at head dim 128, take turns issuing Q K^T; the
// CTA's Q blocks read each K/V tile once. The softmax, SAS, masking and skip rule are tile_softmax.cuh's, so the
// bytes equal the mma.sync kernel's.
//
// Measured on an H200 (docs/HOPPER_PLAN.md, docs/BENCHMARKS.md): 1.11-1.25x the mma.sync kernel at
// head dim 128 and 1.06-1.13x at 64 for N >= 4k, 0.95-1.04x at 1k. The consumers are close to
// issue-bound at 64 (76% of issue slots) and leave a quarter of them idle at 128 with no pipe
// saturated (each tile one dependency chain); more consumers helped (three instead of two at 128,
// four instead of three at 64); overlapping one tile's P V with the next tile's softmax in a
// warpgroup, which costs registers or warps, did not.
#pragma once

#include <stdint.h>

#include "cuda/common/mma.cuh"
#include "cuda/prefill/tile_softmax.cuh"
#include "cuda/sm90/barrier.cuh"
#include "cuda/sm90/wgmma.cuh"
#include "format/skip_rule.h"
#include "turboattn/format.h"

namespace turboattn::cuda::sm90 {

// Kernel traits: the tile shapes and resources of the kernel for one head dim.
template <int kHeadDim_>
struct PrefillTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the warp-specialized kernel covers head dims 64 and 128");
  static constexpr int kBlockM = TA_BLOCK_TOKENS;  // rows of a consumer: one Q block
  static constexpr int kBlockN = TA_BLOCK_TOKENS;  // keys per tile: one K/V block
  // Consumer warpgroups (Q blocks per CTA): as many as the registers allow (O takes half as many at 64).
  static constexpr int kConsumers = kHeadDim == 64 ? 4 : 3;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kStages = 4;                // K / V^T tiles in the ring
  // Consumers issue their tiles' Q K^T in turn (consumer c after c - 1, through named barriers): on an
  // H200 +1-3% at head dim 128 and up to 4.5% slower at 64 (docs/BENCHMARKS.md).
  static constexpr bool kTakeTurns = kHeadDim == 128;
  // Registers per thread after setmaxnreg (the producer needs few; the consumers take the rest).
  static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 4 ? 112 : 160;
  // setmaxnreg.inc waits until the CTA's pool has the registers, so asking for more than the launch
  // allocated (kThreads x what __launch_bounds__ gives each thread, a multiple of 8) hangs the kernel.
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= kThreads * ((65536 / kThreads) / 8 * 8),
                "the register split must fit the registers the launch allocates");
  static constexpr int kKSteps = kHeadDim / 32;    // wgmma k-steps of Q K^T
  static constexpr int kPvChunks = kHeadDim / 64;  // m64n64 products of P V per k-step
  static constexpr int kOTiles = kHeadDim / 8;
  // Operands in shared memory as K-major core matrices without swizzle (wgmma.cuh, kmajor_offset).
  static constexpr int kQBytes = kBlockM * kHeadDim;
  static constexpr int kKBytes = kBlockN * kHeadDim;
  static constexpr int kVtBytes = kHeadDim * kBlockN;
  static constexpr int kStageBytes = kKBytes + kVtBytes;
  static constexpr int kSmemBytes = kConsumers * kQBytes + kStages * kStageBytes + 2 * kStages * 8;
  static_assert((kConsumers * kQBytes + kStages * kStageBytes) % 16 == 0, "the mbarriers after the stages are aligned");
  static constexpr int kKChunks = kHeadDim / 16, kVtChunks = kBlockN / 16;  // 16-byte chunks of a row
};

// Copy index -> (row, 16-byte chunk) of a K-major operand: 8 consecutive indices fill one core matrix
// (128 contiguous bytes), and index i + 8 n chunks is 8 n rows below index i.
__device__ __forceinline__ int2 kmajor_copy_coords(int idx, int chunks_per_row) {
  return {idx % 8 + 8 * (idx / (8 * chunks_per_row)), (idx / 8) % chunks_per_row};
}

template <int kHeadDim, typename Out, bool kSas>
__global__ void __launch_bounds__(PrefillTraits<kHeadDim>::kThreads, 1) flashq_prefill_ws_kernel(const PrefillParams p) {
  using Tr = PrefillTraits<kHeadDim>;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* const s_q = smem;                                 // kConsumers Q blocks
  uint8_t* const s_stages = smem + Tr::kConsumers * Tr::kQBytes;  // kStages x (K tile, V^T tile)
  uint64_t* const full = reinterpret_cast<uint64_t*>(s_stages + Tr::kStages * Tr::kStageBytes);
  uint64_t* const empty = full + Tr::kStages;

  const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.hq / p.hkv);
  const int first_block = Tr::kConsumers * (gridDim.x - 1 - blockIdx.x);  // the longest causal CTAs start first
  const int cta_tiles = visible_tiles(p, min(first_block + Tr::kConsumers, TA_BLOCK_COUNT(p.nq)) - 1);

  if (threadIdx.x == 0) {
    for (int s = 0; s < Tr::kStages; ++s) {
      mbarrier_init(full + s, 128);                  // every producer thread's copies landed
      mbarrier_init(empty + s, 4 * Tr::kConsumers);  // every consumer warp is done with the stage
    }
  }
  __syncthreads();

  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  if (wg == 0) {  // producer: K and V^T tiles into the ring, in order
    setmaxnreg_dec<Tr::kProducerRegs>();
    const int8_t* k_src = p.k + (int64_t(b) * p.hkv + hk) * p.nk * kHeadDim;
    const int8_t* vt_src = p.vt + (int64_t(b) * p.hkv + hk) * kHeadDim * p.nk_padded;
    // Each thread copies the same chunks of every tile, kRowStep rows apart (addresses computed once).
    constexpr int kKRowStep = 128 / Tr::kKChunks, kVtRowStep = 128 / Tr::kVtChunks;
    const int2 k_rc = kmajor_copy_coords(tid, Tr::kKChunks), v_rc = kmajor_copy_coords(tid, Tr::kVtChunks);
    const int k_smem = kmajor_offset(k_rc.x, 16 * k_rc.y, kHeadDim);
    const int v_smem = Tr::kKBytes + kmajor_offset(v_rc.x, 16 * v_rc.y, Tr::kBlockN);
    const int8_t* k_first = k_src + int64_t(k_rc.x) * kHeadDim + 16 * k_rc.y;
    const int8_t* v_first = vt_src + int64_t(v_rc.x) * p.nk_padded + 16 * v_rc.y;
    const int64_t v_step = int64_t(kVtRowStep) * p.nk_padded;
    for (int j = 0; j < cta_tiles; ++j) {
      const int stage = j % Tr::kStages;
      if (j >= Tr::kStages) mbarrier_wait_parity(empty + stage, (j / Tr::kStages + 1) & 1);
      uint8_t* dst = s_stages + stage * Tr::kStageBytes;
      const int n0 = j * Tr::kBlockN;
#pragma unroll
      for (int i = 0; i < Tr::kBlockN / kKRowStep; ++i) {  // rows past the sequence are zero-filled
        const bool valid = n0 + k_rc.x + i * kKRowStep < p.nk;
        cp_async_16(dst + k_smem + i * kKRowStep * kHeadDim, valid ? k_first + int64_t(n0 + i * kKRowStep) * kHeadDim : k_src, valid);
      }
#pragma unroll
      for (int i = 0; i < kHeadDim / kVtRowStep; ++i)
        cp_async_16(dst + v_smem + i * kVtRowStep * Tr::kBlockN, v_first + n0 + i * v_step, true);
      cp_async_mbarrier_arrive_noinc(full + stage);
    }
    cp_async_wait_all();
    return;
  }

  // Consumer `wg - 1`: Q block q_block, 64 rows, 4 warps of 16.
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int q_block = first_block + wg - 1;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int m0 = q_block * Tr::kBlockM, warp_row = m0 + 16 * warp, row0 = warp_row + g;
  const int tiles = q_block < TA_BLOCK_COUNT(p.nq) ? visible_tiles(p, q_block) : 0;
  // Turns (kTakeTurns): tile j's Q K^T waits until the previous consumer issued its own (the first
  // consumer's waits for the last one's tile j - 1). Every consumer takes a turn for each of the CTA's
  // tiles, read or not, so no chain breaks; consumer c's turn is named barrier kConsumers + c (1..kConsumers
  // load Q).
  const auto turn_barrier = [](int consumer) { return Tr::kConsumers + consumer; };
  const auto take_turn = [&](int j) {
    if (Tr::kTakeTurns && !(wg == 1 && j == 0)) bar_sync(turn_barrier(wg), 256);
  };
  const auto pass_turn = [&](int j) {
    if (Tr::kTakeTurns && !(wg == Tr::kConsumers && j == cta_tiles - 1)) bar_arrive(turn_barrier(wg % Tr::kConsumers + 1), 256);
  };

  RowState rs;
  float o[Tr::kOTiles][4];
#pragma unroll
  for (int i = 0; i < Tr::kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  if (tiles > 0) {
    uint8_t* const my_q = s_q + (wg - 1) * Tr::kQBytes;
    const int8_t* q_src = p.q + ((int64_t(b) * p.hq + h) * p.nq + m0) * kHeadDim;
    for (int i = tid; i < Tr::kBlockM * Tr::kKChunks; i += 128) {  // rows past the sequence are zero-filled
      const int2 rc = kmajor_copy_coords(i, Tr::kKChunks);
      const bool valid = m0 + rc.x < p.nq;
      cp_async_16(my_q + kmajor_offset(rc.x, 16 * rc.y, kHeadDim), valid ? q_src + int64_t(rc.x) * kHeadDim + 16 * rc.y : q_src, valid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async_shared();
    bar_sync(wg, 128);

    const int k_blocks = TA_BLOCK_COUNT(p.nk);
    const float q_scale = __fmul_rn(p.q_scale[(int64_t(b) * p.hq + h) * TA_BLOCK_COUNT(p.nq) + q_block], p.scale_log2);
    const float* k_scales = p.k_scale + (int64_t(b) * p.hkv + hk) * k_blocks;
    const float* v_scales = p.v_scale + (int64_t(b) * p.hkv + hk) * k_blocks;
    const float skip_x = skip_threshold(p.nk);

    int32_t s_acc[32];  // S of one tile (m16n8 layout per warp, as mma.sync's); then P V of channels 64..127
    int32_t acc[32];    // P V of one tile for 64 channels
    // Shared-memory descriptors, computed once: a tile's is the first stage's advanced by its stage.
    const uint64_t q_desc = smem_descriptor(my_q, 128, 8 * kHeadDim);
    const uint64_t k_desc = smem_descriptor(s_stages, 128, 8 * kHeadDim);
    const uint64_t vt_desc = smem_descriptor(s_stages + Tr::kKBytes, 128, 8 * Tr::kBlockN);
    // S = Q K^T of tile j, issued once its stage is full.
    auto issue_scores = [&](int j) {
      const int stage = j % Tr::kStages;
      mbarrier_wait_parity(full + stage, (j / Tr::kStages) & 1);
      fence_proxy_async_shared();  // the copies were generic-proxy writes; wgmma reads through the async proxy
      const uint64_t kd = descriptor_advance(k_desc, stage * Tr::kStageBytes);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < Tr::kKSteps; ++ks)  // a k-step of 32 channels is two core matrices along K
        wgmma_m64n64k32_s8s8(s_acc, descriptor_advance(q_desc, 256 * ks), descriptor_advance(kd, 256 * ks), ks > 0);
      wgmma_commit_group();
    };
    // dst = P V of tile j for channels [64 c, 64 c + 64).
    auto issue_pv = [&](int32_t (&dst)[32], const TileP& tp, int j, int c) {
      const uint64_t vd = descriptor_advance(vt_desc, (j % Tr::kStages) * Tr::kStageBytes + 64 * c * Tr::kBlockN);
#pragma unroll
      for (int kp = 0; kp < 2; ++kp) wgmma_m64n64k32_u8s8(dst, tp.pa[kp], descriptor_advance(vd, 256 * kp), kp > 0);
    };
    // O takes P V of tile j for channels [64 c, 64 c + 64) (complete).
    auto take_pv = [&](int32_t (&src)[32], const TileP& tp, int c) {
      fence_operands(src);
      if (tp.warp_uses) accumulate_o<8>(o, 8 * c, src, tp);
    };
    // Tile j's softmax, on scores already waited for.
    auto softmax = [&](int j, float k_scale, float v_scale) {
      fence_operands(s_acc);
      const float st = __fmul_rn(q_scale, k_scale);
      return softmax_tile<kSas>(s_acc, st, v_scale, tile_needs_mask(p, j, warp_row), p, j, row0, t, skip_x, rs);
    };

    // Each tile's K and V scales are loaded a tile ahead, so no global load waits on the softmax's path.
    float k_scale_next = k_scales[0], v_scale_next = v_scales[0];
    for (int j = 0; j < tiles; ++j) {
      const float k_scale = k_scale_next, v_scale = v_scale_next;
      if (j + 1 < tiles) k_scale_next = k_scales[j + 1], v_scale_next = v_scales[j + 1];
      take_turn(j);
      issue_scores(j);
      pass_turn(j);
      wgmma_wait_group<0>();
      const TileP tp = softmax(j, k_scale, v_scale);
      // P V in 64-channel chunks, the second (D = 128) into the scores' registers, free after the
      // softmax: O takes the first chunk while the second runs (+0-3% at D = 128 on an H200). At D = 64,
      // issuing the next tile's scores before O takes P V instead measured 2-13% slower.
      wgmma_fence();
      issue_pv(acc, tp, j, 0);
      wgmma_commit_group();
      if constexpr (Tr::kPvChunks == 2) {
        issue_pv(s_acc, tp, j, 1);
        wgmma_commit_group();
        wgmma_wait_group<1>();
        take_pv(acc, tp, 0);
        wgmma_wait_group<0>();
        take_pv(s_acc, tp, 1);
      } else {
        wgmma_wait_group<0>();
        take_pv(acc, tp, 0);
      }
      if (lane == 0) mbarrier_arrive(empty + j % Tr::kStages);  // the warp is done with the tile's stage
    }
  }
  // Tiles the CTA's other Q blocks see and this one does not: released unread.
  for (int j = tiles; j < cta_tiles; ++j) {
    take_turn(j);
    pass_turn(j);
    mbarrier_wait_parity(full + j % Tr::kStages, (j / Tr::kStages) & 1);
    if (lane == 0) mbarrier_arrive(empty + j % Tr::kStages);
  }
  store_rows<Out>(o, rs, p, b, h, row0, t);
}

}  // namespace turboattn::cuda::sm90
