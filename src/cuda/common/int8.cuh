// Blockwise symmetric INT8 on the GPU (docs/FORMATS.md 1.2): the one device-side statement of the
// scale rule, used by the quantization pre-pass, the cache writes and the decode prologue, bit-exact
// with ref::block_scale and ref::quantize_block_int8.
#pragma once

#include <stdint.h>

#include "turboattn/format.h"

namespace turboattn::cuda {

// clamp(rint(v), -127, 127), ties to even (ref::round_int8).
__device__ __forceinline__ int8_t round_int8(float v) {
  return int8_t(max(-TA_INT8_MAX, min(TA_INT8_MAX, __float2int_rn(v))));
}

// The NaN the format stores (TA_NAN_BITS; ref::stored_nan).
__device__ __forceinline__ float stored_nan() { return __uint_as_float(TA_NAN_BITS); }

// A block's scale and the inverse its codes are computed with, from the block's max |x| and whether
// every value is finite: NaN (stored_nan) for a non-finite block (it poisons what reads it), 0 for a
// block below TA_ZERO_BLOCK_AMAX (codes 0, never a subnormal scale), else amax / 127 and 127 / amax,
// each rounded once. inv is 0 whenever the codes must be 0.
struct Int8Scale {
  float scale, inv;
};

__device__ __forceinline__ Int8Scale int8_block_scale(float amax, bool finite) {
  if (!finite) return {stored_nan(), 0.0f};
  if (amax < TA_ZERO_BLOCK_AMAX) return {0.0f, 0.0f};
  return {__fdiv_rn(amax, float(TA_INT8_MAX)), __fdiv_rn(float(TA_INT8_MAX), amax)};
}

// The code of x in a block with inverse scale inv.
__device__ __forceinline__ int8_t int8_code(float x, float inv) {
  return inv == 0.0f ? int8_t(0) : round_int8(__fmul_rn(x, inv));
}

}  // namespace turboattn::cuda
