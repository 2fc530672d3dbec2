// The prefill kernel's two matmuls on mma.sync (sm_80 and later): K and V^T tiles in padded rows,
// operands through ldmatrix, one m16n8k32 instruction per 8 columns of a warp's 16 rows.
#pragma once

#include <stdint.h>

#include "cuda/common/mma.cuh"
#include "cuda/prefill/prefill_kernel.cuh"

namespace turboattn::cuda::sm80 {

template <int kHeadDim_>
struct PrefillMma {
  static constexpr int kHeadDim = kHeadDim_;
  using Shape = PrefillShape<kHeadDim>;
  // Rows padded to an odd number of 16-byte chunks, so ldmatrix's 8 rows hit 8 bank groups.
  static constexpr int kKRowBytes = Shape::kQRowBytes;
  static constexpr int kVtRowBytes = Shape::kBlockN + 16;
  static constexpr int kKBytes = Shape::kBlockN * kKRowBytes;
  static constexpr int kVtBytes = kHeadDim * kVtRowBytes;
  static constexpr int kPvChannels = 32;    // O channels per P V pass (its int32 accumulators: 16 registers)

  // Rows r and r + 8 k of a tile are 8 k pitches apart in shared memory.
  static constexpr int kKRowPitch = kKRowBytes, kVtRowPitch = kVtRowBytes;

  // Copy index -> (row, 16-byte chunk): consecutive threads take consecutive chunks of a row (so index
  // idx + n * chunks_per_row is n rows below idx).
  __device__ static int2 copy_coords(int idx, int chunks_per_row) { return {idx / chunks_per_row, idx % chunks_per_row}; }
  __device__ static int k_offset(int key, int chunk) { return key * kKRowBytes + 16 * chunk; }
  __device__ static int vt_offset(int channel, int chunk) { return channel * kVtRowBytes + 16 * chunk; }

  // S (16 rows x 64 keys of the warp) = Q K^T; q_frag: this lane's ldmatrix row address of Q.
  __device__ static void scores(int32_t (&s)[4 * Shape::kSTiles], const uint8_t* q_frag, const uint8_t* sk, int lane) {
#pragma unroll
    for (int i = 0; i < 4 * Shape::kSTiles; ++i) s[i] = 0;
#pragma unroll
    for (int ks = 0; ks < Shape::kKSteps; ++ks) {
      uint32_t qf[4];
      ldmatrix_x4(qf, q_frag + 32 * ks);
#pragma unroll
      for (int np = 0; np < Shape::kSTiles / 2; ++np) {
        uint32_t kb[4];
        const int mi = lane / 8;
        ldmatrix_x4(kb, sk + (16 * np + 8 * (mi >> 1) + lane % 8) * kKRowBytes + 32 * ks + 16 * (mi & 1));
        mma_m16n8k32_s8s8(*reinterpret_cast<int32_t(*)[4]>(s + 8 * np), qf, {kb[0], kb[1]});
        mma_m16n8k32_s8s8(*reinterpret_cast<int32_t(*)[4]>(s + 8 * np + 4), qf, {kb[2], kb[3]});
      }
    }
  }

  // acc = P V for channels [32 chunk, 32 chunk + 32); pa[kp]: P's A fragments of keys 32 kp.. (stored order).
  __device__ static void pv(int32_t (&acc)[16], const uint32_t (&pa)[2][4], const uint8_t* sv, int chunk, int lane) {
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0;
#pragma unroll
    for (int kp = 0; kp < 2; ++kp)
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t vb[4];
        const int mi = lane / 8;
        ldmatrix_x4(vb, sv + (32 * chunk + 16 * np + 8 * (mi >> 1) + lane % 8) * kVtRowBytes + 32 * kp + 16 * (mi & 1));
        mma_m16n8k32_u8s8(*reinterpret_cast<int32_t(*)[4]>(acc + 8 * np), pa[kp], {vb[0], vb[1]});
        mma_m16n8k32_u8s8(*reinterpret_cast<int32_t(*)[4]>(acc + 8 * np + 4), pa[kp], {vb[2], vb[3]});
      }
  }
};

}  // namespace turboattn::cuda::sm80
