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

// int32 -> fp32, exact for |x| < 2^24 (every INT8 product sum here). One conversion instruction: on an
// H200 it sustains more conversions per clock than the two-instruction form 1.5 * 2^23 + x (integer add
// into the mantissa, fp32 subtract), which costs two issue slots (docs/BENCHMARKS.md).
__device__ __forceinline__ float small_int_to_float(int32_t x) { return __int2float_rn(x); }

// dp4a.u32.s32: c + the sum of the four products of a's unsigned bytes and b's signed bytes (the CUDA
// intrinsics take both signed or both unsigned).
__device__ __forceinline__ int32_t dp4a_u8s8(uint32_t a, uint32_t b, int32_t c) {
  int32_t d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

}  // namespace turboattn::cuda
