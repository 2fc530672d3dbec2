// SAS on the GPU: two P codes per 32-bit register in packed fp16, bit-exact with ref::sas_code_half
// (docs/FORMATS.md, section 2).
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "turboattn/format.h"

namespace turboattn::cuda {

__device__ __forceinline__ __half2 half2_bits(uint32_t bits) {
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = bits;
  return h;
}
__device__ __forceinline__ uint32_t bits_of(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ uint32_t splat_half_bits(uint16_t b) { return uint32_t(b) * 0x10001u; }

// For x0, x1 <= 0 (base-2 score minus the tile maximum), returns a register whose two fp16 halves are
// 1024 + code(x0) and 1024 + code(x1): the codes are the low bytes of each half.
__device__ __forceinline__ uint32_t sas_codes_x2(float x0, float x1) {
  const __half2 c0 = half2_bits(splat_half_bits(TA_SAS_C0_BITS));
  const __half2 c1 = half2_bits(splat_half_bits(TA_SAS_C1_BITS));
  const __half2 c2 = half2_bits(splat_half_bits(TA_SAS_C2_BITS));
  const __half2 c3 = half2_bits(splat_half_bits(TA_SAS_C3_BITS));
  const __half2 min_x = __float2half2_rn(float(TA_SAS_MIN_X));
  const __half2 round_magic = __float2half2_rn(TA_SAS_ROUND_MAGIC);
  const __half2 code_magic = __float2half2_rn(TA_SAS_CODE_MAGIC);
  const __half2 h = __hmax2(__floats2half2_rn(x0, x1), min_x);
  const __half2 r = __hadd2(h, round_magic);      // low bits: n + 15
  const __half2 n = __hsub2(r, round_magic);      // exact
  const __half2 f = __hsub2(h, n);                // exact, in [-0.5, 0.5]
  const __half2 two_n = half2_bits((bits_of(r) << 10) & 0x7C007C00u);  // 2^n in the exponent field
  __half2 p = __hfma2(c3, f, c2);
  p = __hfma2(p, f, c1);
  p = __hfma2(p, f, c0);
  return bits_of(__hfma2(p, two_n, code_magic));
}

// Exact-exponential variant (SAS off): same packing, round(255 * 2^x) from the fp32 exponential.
__device__ __forceinline__ uint32_t exp2_codes_x2(float x0, float x1) {
  float e0, e1;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e0) : "f"(x0));
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e1) : "f"(x1));
  return bits_of(__floats2half2_rn(__fmaf_rn(e0, float(TA_P_CODE_MAX), TA_SAS_CODE_MAGIC),
                                   __fmaf_rn(e1, float(TA_P_CODE_MAX), TA_SAS_CODE_MAGIC)));
}

}  // namespace turboattn::cuda
