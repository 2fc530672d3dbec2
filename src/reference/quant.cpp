#include "quant.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "turboattn/format.h"

namespace turboattn::ref {

float int8_scale(float amax) {
  if (!std::isfinite(amax)) return std::numeric_limits<float>::quiet_NaN();
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

namespace {

// The code of INT8 value v on the grid (zero, scale): (v - zero) / scale rounded half to even
// (unbiased), at most `levels`.
int stage2_code(int v, int zero, int scale, int levels) {
  const int d = v - zero, quot = d / scale, twice_rem = 2 * (d % scale);
  return std::min(levels, quot + (twice_rem > scale || (twice_rem == scale && (quot & 1))));
}

int64_t stage2_squared_error(const int8_t* q, int count, int64_t stride, int zero, int scale, int levels) {
  int64_t sum = 0;
  for (int i = 0; i < count; ++i) {
    const int v = q[i * stride], e = v - (zero + stage2_code(v, zero, scale, levels) * scale);
    sum += int64_t(e) * e;
  }
  return sum;
}

}  // namespace

Stage2Params stage2_encode(const int8_t* q, int count, int64_t stride, int bits, uint8_t* codes) {
  int lo = TA_INT8_MAX, hi = -TA_INT8_MAX;
  for (int i = 0; i < count; ++i) lo = std::min(lo, int(q[i * stride])), hi = std::max(hi, int(q[i * stride]));
  const int levels = (1 << bits) - 1;
  const int scale = std::max(1, (hi - lo + levels - 1) / levels);  // ceil(range / levels)
  // Every zero in [lowest, highest] puts [lo, hi] on a grid inside [-128, 127]; of those, the one with
  // the least squared error over the group (ties: the centred zero, then the higher one).
  const int highest = std::min(lo, TA_INT8_MAX - levels * scale), lowest = std::max(-128, hi - levels * scale);
  const int slack = levels * scale - (hi - lo);
  int zero = std::max(lowest, std::min(lo - slack / 2, highest));
  int64_t best = stage2_squared_error(q, count, stride, zero, scale, levels);
  for (int z = highest; z >= lowest; --z) {
    const int64_t e = stage2_squared_error(q, count, stride, z, scale, levels);
    if (e < best) best = e, zero = z;
  }
  for (int i = 0; i < count; ++i) codes[i] = uint8_t(stage2_code(q[i * stride], zero, scale, levels));
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
