// The prefill kernel's two matmuls on Hopper's warpgroup instruction (sm_90a): the CTA's 4 warps issue
// each wgmma together over the 64-row Q block. K and V^T tiles sit in shared memory as K-major core
// matrices without swizzle (wgmma.cuh's kmajor_offset), read by wgmma through descriptors; Q's and P's
// fragments come from registers in the same layout as for mma.sync.
#pragma once

#include <stdint.h>

#include "cuda/common/mma.cuh"
#include "cuda/prefill/prefill_kernel.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace turboattn::cuda::sm90 {

template <int kHeadDim_>
struct PrefillMma {
  static constexpr int kHeadDim = kHeadDim_;
  using Shape = PrefillShape<kHeadDim>;
  static constexpr int kKBytes = Shape::kBlockN * kHeadDim;  // [64 keys] x [D channels], K-major
  static constexpr int kVtBytes = kHeadDim * Shape::kBlockN;  // [D channels] x [64 keys], K-major
  static constexpr int kPvChannels = kHeadDim % 64 == 0 ? 64 : 32;  // O channels per P V pass
  static constexpr bool kPvWarpgroupWide = true;  // P V runs for all 4 warps together

  // Rows r and r + 8 k of a tile are 8 k pitches apart in shared memory (k core-matrix rows).
  static constexpr int kKRowPitch = kHeadDim, kVtRowPitch = Shape::kBlockN;

  // Copy index -> (row, 16-byte chunk): 8 consecutive threads fill one core matrix (8 rows of one
  // chunk: 128 contiguous bytes), so a warp's 16-byte stores are 512 contiguous bytes. Index
  // idx + 8 n * chunks_per_row is 8 n rows below idx.
  __device__ static int2 copy_coords(int idx, int chunks_per_row) {
    return {idx % 8 + 8 * (idx / (8 * chunks_per_row)), (idx / 8) % chunks_per_row};
  }
  __device__ static int k_offset(int key, int chunk) { return kmajor_offset(key, 16 * chunk, kHeadDim); }
  __device__ static int vt_offset(int channel, int chunk) { return kmajor_offset(channel, 16 * chunk, Shape::kBlockN); }
  // cp.async writes through the generic proxy, wgmma reads through the async proxy.
  __device__ static void copies_landed() { fence_proxy_async_shared(); }

  // S (the CTA's 64 rows x 64 keys; each warp holds its 16 rows) = Q K^T; q_frag: this lane's
  // ldmatrix row address of Q.
  __device__ static void scores(int32_t (&s)[32], const uint8_t* q_frag, const uint8_t* sk, int) {
    uint32_t qf[Shape::kKSteps][4];
#pragma unroll
    for (int ks = 0; ks < Shape::kKSteps; ++ks) ldmatrix_x4(qf[ks], q_frag + 32 * ks);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < Shape::kKSteps; ++ks)  // a k-step of 32 channels is two core matrices along K
      wgmma_m64n64k32_s8s8(s, qf[ks], smem_descriptor(sk + 256 * ks, 128, 8 * kHeadDim), ks > 0);
    wgmma_commit_group();
    wgmma_wait_group<0>();
    fence_operands(s);
  }

  // acc = P V for channels [kPvChannels chunk, + kPvChannels); pa[kp]: P's A fragments of keys 32 kp..
  // (stored order, as the V^T rows hold them).
  __device__ static void pv(int32_t (&acc)[kPvChannels / 2], const uint32_t (&pa)[2][4], const uint8_t* sv, int chunk, int) {
    const uint8_t* rows = sv + kPvChannels * chunk * Shape::kBlockN;  // the chunk's first channel row
    wgmma_fence();
#pragma unroll
    for (int kp = 0; kp < 2; ++kp) {
      const uint64_t desc = smem_descriptor(rows + 256 * kp, 128, 8 * Shape::kBlockN);
      if constexpr (kPvChannels == 64) wgmma_m64n64k32_u8s8(acc, pa[kp], desc, kp > 0);
      else wgmma_m64n32k32_u8s8(acc, pa[kp], desc, kp > 0);
    }
    wgmma_commit_group();
    wgmma_wait_group<0>();
    fence_operands(acc);
  }
};

}  // namespace turboattn::cuda::sm90
