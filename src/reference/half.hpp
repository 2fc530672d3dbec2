// IEEE binary16 and bfloat16 on the CPU: conversions and exactly rounded fp16 arithmetic.
// The CPU reference uses these to reproduce, bit for bit, what the GPU's HADD2/HFMA2 compute.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace turboattn::ref {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp16 bits -> float (exact).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t mant = h & 0x3FF;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    const float v = std::ldexp(float(mant), -24);  // subnormal or zero: exact in float
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// Rounds the exact value r + residual to fp16, nearest-even. r is a double, |residual| is below half
// an ulp of r (as produced by an error-free transformation), and only breaks exact fp16 ties.
inline uint16_t round_to_half(double r, double residual = 0.0) {
  if (std::isnan(r)) return 0x7E00;
  uint16_t sign = 0;
  if (std::signbit(r)) {
    sign = 0x8000;
    r = -r;
    residual = -residual;
  }
  if (std::isinf(r)) return sign | 0x7C00;
  if (r == 0.0) return sign;
  int e = std::ilogb(r);
  if (e < -14) e = -14;  // subnormal range has the ulp of the smallest normal binade
  const double ulp = std::ldexp(1.0, e - 10);
  const double q = r / ulp;  // exact: scaling by a power of two
  double fl = std::floor(q);
  const double frac = q - fl;
  bool up = frac > 0.5;
  if (frac == 0.5) up = residual > 0 || (residual == 0 && std::fmod(fl, 2.0) != 0);
  if (up) fl += 1;
  const double v = fl * ulp;
  if (v >= 65536.0) return sign | 0x7C00;
  if (v < std::ldexp(1.0, -14)) return sign | uint16_t(v / std::ldexp(1.0, -24));
  const int ve = std::ilogb(v);
  const uint16_t mant = uint16_t(v / std::ldexp(1.0, ve - 10)) - 1024;
  return sign | uint16_t((ve + 15) << 10) | mant;
}

// float -> fp16, nearest-even, by integer operations on the bits: the same result as
// round_to_half(double(f)) (HalfConversion tests, every 2^16th input and all ties), about 20x faster.
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f) & 0x7FFFFFFFu;
  const uint16_t sign = uint16_t((float_bits(f) >> 16) & 0x8000u);
  if (u > 0x7F800000u) return 0x7E00;                  // NaN
  if (u >= 0x477FF000u) return sign | 0x7C00;          // >= 65520 rounds to infinity
  if (u >= 0x38800000u) {                              // normal fp16: rebias the exponent, round 13 bits
    const uint32_t h = (u - 0x38000000u) >> 13, rest = u & 0x1FFFu;
    return sign | uint16_t(h + (rest > 0x1000u || (rest == 0x1000u && (h & 1u))));
  }
  if (u <= 0x33000000u) return sign;                   // <= 2^-25 (a tie at 2^-25 goes to even 0)
  const uint32_t m = (u & 0x7FFFFFu) | 0x800000u, shift = 126u - (u >> 23);  // subnormal fp16
  const uint32_t h = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return sign | uint16_t(h + (rest > half || (rest == half && (h & 1u))));
}

// bfloat16: the top half of a float, rounded nearest-even.
inline float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  const uint32_t rounding = 0x7FFF + ((u >> 16) & 1);
  return uint16_t((u + rounding) >> 16);
}

// Exactly rounded fp16 operations (one rounding each, as the GPU's fp16 units do).
inline uint16_t half_add(uint16_t a, uint16_t b) {
  return round_to_half(double(half_to_float(a)) + double(half_to_float(b)));  // exact in double
}
inline uint16_t half_sub(uint16_t a, uint16_t b) {
  return round_to_half(double(half_to_float(a)) - double(half_to_float(b)));
}
inline uint16_t half_fma(uint16_t a, uint16_t b, uint16_t c) {
  const double p = double(half_to_float(a)) * double(half_to_float(b));  // exact: 22 bits
  const double cc = double(half_to_float(c));
  const double s = p + cc;  // TwoSum: s + err == p + cc exactly
  const double bb = s - p;
  const double err = (p - (s - bb)) + (cc - bb);
  return round_to_half(s, err);
}
inline uint16_t half_max(uint16_t a, uint16_t b) {
  return half_to_float(a) >= half_to_float(b) ? a : b;
}

}  // namespace turboattn::ref
