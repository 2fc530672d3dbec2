// Cache codes on the GPU (docs/FORMATS.md, 3.1-3.3): INT8 rounding and stage-2 encoding, bit-exact
// with src/reference/quant.cpp.
#pragma once

#include <stdint.h>

#include "cuda/common/int8.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

// floor(d / s) and d - s * floor(d / s) for 0 <= d < 512 and 1 <= s <= 85, inv = 1 / s: (d + 1/2) / s is at
// least 1 / 170 from an integer, far more than the float product's error, so truncating it is exact.
struct QuotRem {
  int quot, rem;
};
__device__ __forceinline__ QuotRem small_divmod(int d, int s, float inv) {
  const int quot = int(__fmul_rn(float(d) + 0.5f, inv));
  return {quot, d - quot * s};
}

// ref::stage2_encode of one group of `count` INT8 values q[i * stride] (a K channel's tokens or a V token's
// channels), shared by `lanes` (1 or 2) adjacent lanes of a warp, lane `part` taking values part, part +
// lanes, ...: codes (unpacked, codes[i * code_stride]) and params (written by part 0).
__device__ __forceinline__ void stage2_encode(const int8_t* q, int count, int stride, int bits, int lanes, int part,
                                              uint8_t* codes, int code_stride, uint8_t* scale_out, int8_t* zero_out) {
  const unsigned pair = lanes == 2 ? 3u << ((threadIdx.x % 32) & ~1u) : 0u;
  int lo = TA_INT8_MAX, hi = -TA_INT8_MAX;
  for (int i = part; i < count; i += lanes) lo = min(lo, int(q[i * stride])), hi = max(hi, int(q[i * stride]));
  if (lanes == 2) lo = min(lo, __shfl_xor_sync(pair, lo, 1)), hi = max(hi, __shfl_xor_sync(pair, hi, 1));
  const int levels = (1 << bits) - 1;
  const int scale = max(1, (hi - lo + levels - 1) / levels);
  const int slack = levels * scale - (hi - lo);
  const int zero = max(-128, min(lo - slack / 2, TA_INT8_MAX - levels * scale));
  const float inv = __frcp_rn(float(scale));
  for (int i = part; i < count; i += lanes) {  // (value - zero) / scale rounded half to even (unbiased)
    const QuotRem d = small_divmod(int(q[i * stride]) - zero, scale, inv);
    const int code = d.quot + (2 * d.rem > scale || (2 * d.rem == scale && (d.quot & 1)));
    codes[i * code_stride] = uint8_t(min(levels, code));
  }
  if (part == 0) *scale_out = uint8_t(scale), *zero_out = int8_t(zero);
}

}  // namespace turboattn::cuda
