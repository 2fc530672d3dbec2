// A prefill kernel's Q block quantized where it is used (docs/FORMATS.md 1.2), instead of by a pass of
// its own over Q: the same operations as quantize_int8_kernel, so the same codes and scale as
// ta_quantize_int8 and the CPU reference.
#pragma once

#include <stdint.h>

#include "cuda/common/int8.cuh"
#include "cuda/common/vec8.cuh"
#include "cuda/prefill/tile_softmax.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

// Quantizes the 64-row Q block at row m0 of (b, h) with the 128 threads of one warpgroup (tid 0..127):
// each reads its rows once (16-byte loads when p.q_vector), max |q| is reduced through `partial` (8
// floats of shared memory) and `sync` (a barrier over the 128 threads), and the codes (0 for rows past
// the sequence) go to shared memory at q_smem + offset(row, byte), 8 bytes at a time. Returns the
// block's scale. The caller synchronizes the threads before the codes are read.
template <typename T, int kHeadDim, class Offset, class Sync>
__device__ __forceinline__ float quantize_q_block(const PrefillParams& p, int b, int h, int m0, int tid, uint8_t* q_smem,
                                                  Offset offset, float* partial, Sync sync) {
  constexpr int kOctets = kHeadDim / 8, kVecs = TA_BLOCK_TOKENS * kOctets / 128;
  static_assert(TA_BLOCK_TOKENS * kOctets % 128 == 0, "whole vectors per thread");
  const int rows = min(TA_BLOCK_TOKENS, p.nq - m0);
  const T* src = static_cast<const T*>(p.q) + b * p.q_b + h * p.q_h + int64_t(m0) * p.q_n;
  uint4 raw[kVecs];
  float amax = 0.0f;
  bool finite = true;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int i = tid + 128 * v, r = i / kOctets;
    if (r >= rows) continue;
    const T* x = src + int64_t(r) * p.q_n + 8 * (i % kOctets);
    raw[v] = p.q_vector ? load8<T, true>(x) : load8<T, false>(x);
    float f[8];
    to_floats8<T>(raw[v], f);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      finite = finite && isfinite(f[e]);
      amax = fmaxf(amax, fabsf(f[e]));
    }
  }
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  finite = __all_sync(0xffffffffu, finite);
  if (tid % 32 == 0) partial[tid / 32] = amax, partial[4 + tid / 32] = finite ? 1.0f : 0.0f;
  sync();
  amax = fmaxf(fmaxf(partial[0], partial[1]), fmaxf(partial[2], partial[3]));
  finite = partial[4] != 0.0f && partial[5] != 0.0f && partial[6] != 0.0f && partial[7] != 0.0f;
  const Int8Scale s = int8_block_scale(amax, finite);
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int i = tid + 128 * v, r = i / kOctets;
    uint2 codes = {0u, 0u};
    if (r < rows) {
      float f[8];
      to_floats8<T>(raw[v], f);
      int8_t* c = reinterpret_cast<int8_t*>(&codes);
#pragma unroll
      for (int e = 0; e < 8; ++e) c[e] = int8_code(f[e], s.inv);
    }
    *reinterpret_cast<uint2*>(q_smem + offset(r, 8 * (i % kOctets))) = codes;
  }
  return s.scale;
}

}  // namespace turboattn::cuda
