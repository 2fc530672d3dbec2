// Cache codes on the GPU (docs/FORMATS.md, 3.1-3.3): INT8 rounding and stage-2 encoding, bit-exact
// with src/reference/quant.cpp.
#pragma once

#include <stdint.h>

#include "cuda/common/int8.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

// ref::stage2_encode of `count` INT8 values q[i * stride] (a K channel's tokens or a V token's channels):
// codes (unpacked) and params.
__device__ __forceinline__ void stage2_encode(const int8_t* q, int count, int stride, int bits, uint8_t* codes,
                                              int code_stride, uint8_t* scale_out, int8_t* zero_out) {
  int lo = TA_INT8_MAX, hi = -TA_INT8_MAX;
  for (int i = 0; i < count; ++i) lo = min(lo, int(q[i * stride])), hi = max(hi, int(q[i * stride]));
  const int levels = (1 << bits) - 1;
  const int scale = max(1, (hi - lo + levels - 1) / levels);
  const int slack = levels * scale - (hi - lo);
  const int zero = max(-128, min(lo - slack / 2, TA_INT8_MAX - levels * scale));
  for (int i = 0; i < count; ++i) {
    const int d = int(q[i * stride]) - zero, quot = d / scale, twice_rem = 2 * (d % scale);
    const int code = quot + (twice_rem > scale || (twice_rem == scale && (quot & 1)));
    codes[i * code_stride] = uint8_t(min(levels, code));
  }
  *scale_out = uint8_t(scale);
  *zero_out = int8_t(zero);
}

}  // namespace turboattn::cuda
