// Device-side numeric helpers shared by the kernels: exactly rounded conversions and the NaN
// propagating max the formats require (docs/FORMATS.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace turboattn::cuda {

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// max.NaN.f32: a NaN operand gives NaN, so a NaN score or scale poisons its row instead of vanishing.
__device__ __forceinline__ float nan_max(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// int32 -> fp32, exact for |x| < 2^22 (every INT8 product sum here), on the full-rate integer and
// fp32 pipes instead of the quarter-rate I2F: 1.5 * 2^23 + x has x in its mantissa bits.
__device__ __forceinline__ float small_int_to_float(int32_t x) {
  return __fsub_rn(__int_as_float(x + 0x4B400000), 12582912.0f);
}

}  // namespace turboattn::cuda
