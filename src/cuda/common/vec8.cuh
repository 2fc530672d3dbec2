// Eight consecutive fp16 or bf16 values (16 bytes): loaded as one vector where the address allows,
// and widened to fp32. Shared by the quantization kernels and the prefill kernels' Q blocks.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/common/numeric.cuh"

namespace turboattn::cuda {

// p[0..7] as raw bits: one 16-byte load when kVector (p 16-byte aligned), else element by element.
template <typename T, bool kVector>
__device__ __forceinline__ uint4 load8(const T* p) {
  static_assert(sizeof(T) == 2, "fp16 or bf16");
  if constexpr (kVector) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    uint4 r;
    uint16_t* h = reinterpret_cast<uint16_t*>(&r);
#pragma unroll
    for (int e = 0; e < 8; ++e) h[e] = __ldg(reinterpret_cast<const unsigned short*>(p) + e);
    return r;
  }
}

// The eight values of `raw` (as load8 returns them) in fp32.
template <typename T>
__device__ __forceinline__ void to_floats8(const uint4& raw, float (&f)[8]) {
  const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e] = to_float(x[e]);
}

}  // namespace turboattn::cuda
