#include "sas.hpp"

#include <cmath>
#include <vector>

#include "half.hpp"
#include "turboattn/format.h"

namespace turboattn::ref {

SasCoefficients sas_default_coefficients() {
  return {{TA_SAS_C0_BITS, TA_SAS_C1_BITS, TA_SAS_C2_BITS, TA_SAS_C3_BITS}};
}

namespace {
const uint16_t kMinX = float_to_half(float(TA_SAS_MIN_X));
const uint16_t kRoundMagic = float_to_half(TA_SAS_ROUND_MAGIC);
const uint16_t kCodeMagic = float_to_half(TA_SAS_CODE_MAGIC);

// Splits x into n = round(x) and f = x - n, and builds 2^n in the fp16 exponent bits.
struct Split {
  uint16_t f, two_n;
};
Split split(uint16_t x_half) {
  const uint16_t h = half_max(x_half, kMinX);
  const uint16_t r = half_add(h, kRoundMagic);  // low mantissa bits: n + 15
  const uint16_t n = half_sub(r, kRoundMagic);  // exact
  const uint16_t f = half_sub(h, n);            // exact, in [-0.5, 0.5]
  const uint16_t two_n = uint16_t((r << 10) & 0x7C00);  // exponent field n + 15: 2^n (0 at n = -15)
  return {f, two_n};
}
uint16_t poly(uint16_t f, const SasCoefficients& k) {
  uint16_t p = half_fma(k.c[3], f, k.c[2]);
  p = half_fma(p, f, k.c[1]);
  return half_fma(p, f, k.c[0]);
}
}  // namespace

uint8_t sas_code_half(uint16_t x_half, const SasCoefficients& coef) {
  const Split s = split(x_half);
  const uint16_t y = half_fma(poly(s.f, coef), s.two_n, kCodeMagic);  // 1024 + round(p * 2^n)
  return uint8_t(y & 0xFF);
}

double sas_value_half(uint16_t x_half, const SasCoefficients& coef) {
  const Split s = split(x_half);
  return double(half_to_float(poly(s.f, coef))) * double(half_to_float(s.two_n));
}

namespace {
// Codes for every non-positive fp16 input above TA_SAS_MIN_X, indexed by the magnitude bits.
const std::vector<uint8_t>& sas_table() {
  static const std::vector<uint8_t> table = [] {
    const SasCoefficients coef = sas_default_coefficients();
    std::vector<uint8_t> t(size_t(kMinX & 0x7FFF) + 1);
    for (size_t m = 0; m < t.size(); ++m) t[m] = sas_code_half(uint16_t(0x8000 | m), coef);
    return t;
  }();
  return table;
}
}  // namespace

uint8_t sas_code(float x) {
  if (std::isnan(x)) return 0;  // NaN scores poison the row through the max instead (FORMATS.md)
  const uint16_t h = float_to_half(x);
  const std::vector<uint8_t>& t = sas_table();
  const size_t m = h & 0x7FFF;
  return m < t.size() ? t[m] : 0;  // below TA_SAS_MIN_X the clamp makes 2^n zero
}

uint8_t exp2_code(float x) {
  if (std::isnan(x)) return 0;
  return uint8_t(std::nearbyint(double(TA_P_CODE_MAX) * std::exp2(double(x))));
}

}  // namespace turboattn::ref
