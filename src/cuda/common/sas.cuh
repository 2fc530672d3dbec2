// SAS on the GPU: two P codes per 32-bit register in packed fp16, bit-exact with ref::sas_code_half
// (docs/FORMATS.md, section 2).
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "format/sas_scaled.h"
#include "turboattn/format.h"

namespace turboattn::cuda {

__device__ __forceinline__ __half2 half2_bits(uint32_t bits) {
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = bits;
  return h;
}
__device__ __forceinline__ uint32_t bits_of(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ uint32_t splat_half_bits(uint16_t b) { return uint32_t(b) * 0x10001u; }

// A tile's P code inputs (docs/FORMATS.md 1.5) enter the pipelines below as ys = clamp(y, 0, 16) / 16,
// y = tile_max - acc * st, which one saturating fma gives (POffset); x = -16 ys.
constexpr float kPOffsetScale = 1.0f / TA_P_OFFSET_MAX;

// The tile's maximum from the largest int32 score (as fp32) and st: rd(amax * st). For a finite
// st >= 0 (scales are >= 0 or NaN) rounding the maximum is the maximum of the rounded scores; at
// st = +inf they differ only in rows that are NaN either way. A tile whose keys are all masked
// (amax = -inf) may get NaN here (st = 0): callers skip it on amax or the visible count, not on this.
__device__ __forceinline__ float tile_bound(float amax, float st) { return __fmul_rd(amax, st); }

// Per row and tile (or per key, with per-token K scales): the operands of the saturating fma that gives
// ys. A zero st is raised to kMinScale so that masked keys (acc = -inf) still give ys = 1, code 0, rather
// than NaN; an unmasked key's y then moves by at most 2^22 * kMinScale = 4e-24, far below the 2.8e-3
// that would move its code (docs/FORMATS.md 1.5).
constexpr float kMinScale = 1e-30f;
struct POffset {
  float neg_st, tile_max;  // both scaled by 1 / 16
  __device__ __forceinline__ POffset(float st, float tile_max_)
      : neg_st(-fmaxf(st, kMinScale) * kPOffsetScale), tile_max(tile_max_ * kPOffsetScale) {}
  __device__ __forceinline__ float operator()(float acc) const {
    float ys;
    asm("fma.rn.sat.f32 %0, %1, %2, %3;" : "=f"(ys) : "f"(acc), "f"(neg_st), "f"(tile_max));
    return ys;  // a NaN y gives 0
  }
};

// SAS (docs/FORMATS.md 2) on two inputs ys0, ys1 in [0, 1]: a register whose two fp16 halves are
// 1024 + code(-16 ys0) and 1024 + code(-16 ys1); the codes are the low bytes of each half. The steps of
// section 2 on h = -16 ys, rearranged to the same codes bit for bit (tests/test_sas.cpp emulates this):
// - everything before the cubic runs 16 times smaller, where an fp16 ulp is 1/16 (so r / 16 rounds to the
//   same n, and holds the same mantissa bits), which needs no multiply by 16: r / 16 = 1583 / 16 - ys;
// - the magic is section 2's plus 32: the same ties and the same low bits n + 15 (mod 32);
// - no clamp at -15: at n = -16 the exponent field built is 31, fp16 infinity, whose low byte (the code)
//   is 0;
// - the cubic in g / 16, g = -f, with coefficients (-16^3 c3, 16^2 c2, -16 c1, c0): exact rescalings.
__device__ __forceinline__ uint32_t sas_codes_x2(float ys0, float ys1) {
  const __half2 c0 = half2_bits(splat_half_bits(scaled_sas_coefficient(TA_SAS_C0_BITS, 0)));
  const __half2 c1 = half2_bits(splat_half_bits(scaled_sas_coefficient(TA_SAS_C1_BITS, 1)));
  const __half2 c2 = half2_bits(splat_half_bits(scaled_sas_coefficient(TA_SAS_C2_BITS, 2)));
  const __half2 c3 = half2_bits(splat_half_bits(scaled_sas_coefficient(TA_SAS_C3_BITS, 3)));
  const __half2 round_magic = __float2half2_rn(kScaledRoundMagic);
  const __half2 code_magic = __float2half2_rn(TA_SAS_CODE_MAGIC);
  const __half2 ys = __floats2half2_rn(ys0, ys1);
  const __half2 r = __hsub2(round_magic, ys);  // (1583 + n) / 16, n = rn(h)
  const __half2 n = __hsub2(r, round_magic);   // n / 16, exact
  const __half2 g = __hadd2(ys, n);            // -f / 16, exact
  const __half2 two_n = half2_bits((bits_of(r) << 10) & 0x7C007C00u);  // 2^n; +inf at n = -16
  __half2 p = __hfma2(c3, g, c2);
  p = __hfma2(p, g, c1);
  p = __hfma2(p, g, c0);
  return bits_of(__hfma2(p, two_n, code_magic));
}

// Exact-exponential variant (SAS off): same packing, round(255 * 2^x) from the fp32 exponential.
__device__ __forceinline__ uint32_t exp2_codes_x2(float ys0, float ys1) {
  float e0, e1;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e0) : "f"(ys0 * -TA_P_OFFSET_MAX));
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e1) : "f"(ys1 * -TA_P_OFFSET_MAX));
  return bits_of(__floats2half2_rn(__fmaf_rn(e0, float(TA_P_CODE_MAX), TA_SAS_CODE_MAGIC),
                                   __fmaf_rn(e1, float(TA_P_CODE_MAX), TA_SAS_CODE_MAGIC)));
}

}  // namespace turboattn::cuda
