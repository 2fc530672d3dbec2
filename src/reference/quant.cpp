#include "quant.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "turboattn/format.h"

namespace turboattn::ref {

float stored_nan() {
  const uint32_t bits = TA_NAN_BITS;
  float nan;
  std::memcpy(&nan, &bits, sizeof nan);
  return nan;
}

float int8_scale(float amax) {
  if (!std::isfinite(amax)) return stored_nan();
  if (amax < TA_ZERO_BLOCK_AMAX) return 0.0f;
  return amax / float(TA_INT8_MAX);
}

namespace {
int8_t round_int8(float v) {
  const float r = std::nearbyint(v);  // default rounding mode: half to even
  return int8_t(std::clamp(r, -float(TA_INT8_MAX), float(TA_INT8_MAX)));
}
}  // namespace

float quantize_block_int8(const float* x, int rows, int dim, int64_t x_stride, int8_t* codes,
                          int64_t code_stride) {
  float amax = 0.0f;
  bool finite = true;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < dim; ++c) {
      const float v = x[r * x_stride + c];
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
  const float scale = int8_scale(finite ? amax : std::numeric_limits<float>::infinity());
  const bool zero_codes = !(scale > 0.0f);  // all-zero block, or NaN scale
  const float inv = zero_codes ? 0.0f : float(TA_INT8_MAX) / amax;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < dim; ++c)
      codes[r * code_stride + c] = zero_codes ? int8_t(0) : round_int8(x[r * x_stride + c] * inv);
  return scale;
}

float requantize_tokens_to_block(int8_t* codes, const float* token_scale, int tokens, int dim) {
  float block = 0.0f;
  for (int t = 0; t < tokens; ++t) {
    if (std::isnan(token_scale[t])) block = token_scale[t];
    if (!std::isnan(block)) block = std::max(block, token_scale[t]);
  }
  for (int t = 0; t < tokens; ++t) {
    const bool zero_codes = !(block > 0.0f);
    const float ratio = zero_codes ? 0.0f : token_scale[t] / block;
    for (int c = 0; c < dim; ++c) {
      int8_t& q = codes[int64_t(t) * dim + c];
      q = zero_codes ? int8_t(0) : round_int8(float(q) * ratio);
    }
  }
  return block;
}

Stage2Params stage2_encode(const int8_t* q, int count, int64_t stride, int bits, uint8_t* codes) {
  int lo = TA_INT8_MAX, hi = -TA_INT8_MAX;
  for (int i = 0; i < count; ++i) lo = std::min(lo, int(q[i * stride])), hi = std::max(hi, int(q[i * stride]));
  const int levels = (1 << bits) - 1;
  const int scale = std::max(1, (hi - lo + levels - 1) / levels);  // ceil(range / levels)
  // Centre the grid [zero, zero + levels * scale] on [lo, hi], kept inside [-128, 127].
  const int slack = levels * scale - (hi - lo);
  const int zero = std::max(-128, std::min(lo - slack / 2, TA_INT8_MAX - levels * scale));
  for (int i = 0; i < count; ++i) {  // code = (value - zero) / scale, rounded half to even (unbiased)
    const int d = int(q[i * stride]) - zero, quot = d / scale, twice_rem = 2 * (d % scale);
    const int code = quot + (twice_rem > scale || (twice_rem == scale && (quot & 1)));
    codes[i] = uint8_t(std::min(levels, code));
  }
  return {uint8_t(scale), int8_t(zero)};
}

void pack_codes(const uint8_t* codes, int count, int bits, uint8_t* packed) {
  const int bytes = (count * bits + 7) / 8;
  std::fill(packed, packed + bytes, uint8_t(0));
  const int mask = (1 << bits) - 1;
  for (int i = 0; i < count; ++i)
    packed[(i * bits) / 8] |= uint8_t((codes[i] & mask) << ((i * bits) % 8));
}

void unpack_codes(const uint8_t* packed, int count, int bits, uint8_t* codes) {
  const int mask = (1 << bits) - 1;
  for (int i = 0; i < count; ++i) codes[i] = uint8_t((packed[(i * bits) / 8] >> ((i * bits) % 8)) & mask);
}

}  // namespace turboattn::ref
