// SAS: exhaustive over every fp16 input, the fp16 emulation itself, and the skip threshold.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "format/sas_scaled.h"
#include "reference/attention.hpp"
#include "reference/half.hpp"
#include "reference/sas.hpp"
#include "turboattn/format.h"

using namespace turboattn::ref;

namespace {
// Every fp16 value in [TA_SAS_MIN_X, 0], most negative last.
std::vector<uint16_t> all_inputs() {
  std::vector<uint16_t> v;
  const uint16_t lo = float_to_half(float(TA_SAS_MIN_X));
  for (uint32_t m = 0; m <= uint32_t(lo & 0x7FFF); ++m) v.push_back(uint16_t(0x8000 | m));
  return v;
}
}  // namespace

TEST(Half, ConversionsRoundToNearestEven) {
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);             // the midpoint to 2^16 rounds to inf
  EXPECT_EQ(float_to_half(1.0f + 1.0f / 2048), 0x3C00);   // tie to even (down)
  EXPECT_EQ(float_to_half(1.0f + 3.0f / 2048), 0x3C02);   // tie to even (up)
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);  // tie to even: zero
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  for (uint32_t h = 0; h < 0x7C00; ++h) ASSERT_EQ(float_to_half(half_to_float(uint16_t(h))), h);
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(bf16_to_float(0x3F80), 1.0f);
}

// float_to_half works on the bits; round_to_half(double) is the plain definition of the same rounding.
// Exhaustive over all 2^32 floats when run once by hand (2026-11-26: no mismatch); here every float
// whose low 16 bits are a fresh random value, and each fp16 midpoint with its two neighbours.
TEST(Half, BitwiseConversionEqualsTheDefinition) {
  std::mt19937_64 rng(std::random_device{}());
  for (uint32_t high = 0; high < 0x10000; ++high) {
    const float f = bits_float((high << 16) | uint32_t(rng() & 0xFFFF));
    ASSERT_EQ(float_to_half(f), round_to_half(double(f))) << std::hex << float_bits(f);
  }
  for (uint32_t h = 0; h < 0x7C00; ++h)
    for (uint32_t sign : {0u, 0x8000u}) {
      const float mid = float((double(half_to_float(uint16_t(h))) + double(half_to_float(uint16_t(h + 1)))) / 2);
      for (int step : {-1, 0, 1}) {
        const float f = bits_float(uint32_t(int64_t(float_bits(mid)) + step) | (sign << 16));
        ASSERT_EQ(float_to_half(f), round_to_half(double(f))) << std::hex << float_bits(f);
      }
    }
}

TEST(Half, FmaRoundsOnce) {
  // Against an independent exact sum in long double (64-bit significand holds every fp16 a*b + c).
  std::mt19937_64 rng(std::random_device{}());
  for (int i = 0; i < 200000; ++i) {
    uint16_t a, b, c;
    do a = uint16_t(rng()), b = uint16_t(rng()), c = uint16_t(rng());
    while (!std::isfinite(half_to_float(a)) || !std::isfinite(half_to_float(b)) || !std::isfinite(half_to_float(c)));
    const long double exact = (long double)half_to_float(a) * half_to_float(b) + half_to_float(c);
    const double r = double(exact);
    ASSERT_EQ(half_fma(a, b, c), round_to_half(r, double(exact - r))) << a << " " << b << " " << c;
  }
  EXPECT_EQ(half_add(float_to_half(1024.0f), float_to_half(0.5f)), float_to_half(1024.0f));  // tie to even
  EXPECT_EQ(half_add(float_to_half(1025.0f), float_to_half(0.5f)), float_to_half(1026.0f));
  EXPECT_EQ(half_fma(float_to_half(3.0f), float_to_half(5.0f), float_to_half(-15.0f)), 0x0000);
}

TEST(Sas, CodesWithinOneOfExactOverEveryInput) {
  const SasCoefficients k = sas_default_coefficients();
  int mismatches = 0;
  for (uint16_t x : all_inputs()) {
    const int want = int(std::nearbyint(255.0 * std::exp2(double(half_to_float(x)))));
    const int got = sas_code_half(x, k);
    ASSERT_LE(std::abs(got - want), 1) << "x = " << half_to_float(x);
    mismatches += got != want;
  }
  // docs/FORMATS.md states 690 of 19329 inputs (3.6%) off by one.
  EXPECT_EQ(mismatches, 690);
}

TEST(Sas, ValueErrorBoundsAsStated) {
  const SasCoefficients k = sas_default_coefficients();
  double max_rel = 0, max_abs = 0;
  for (uint16_t x : all_inputs()) {
    const double xv = half_to_float(x);
    if (xv < TA_SAS_SKIP_X) continue;
    const double exact = std::exp2(xv), v = sas_value_half(x, k) / 255.0;
    max_rel = std::max(max_rel, std::fabs(v - exact) / exact);
    max_abs = std::max(max_abs, std::fabs(v - exact));
  }
  EXPECT_LT(max_rel, 5.8e-4);  // FORMATS.md: 5.79e-4
  EXPECT_LT(max_abs, 4.1e-4);  // FORMATS.md: 4.06e-4
}

TEST(Sas, MaximumIs255AndCodesNeverIncreaseAsXFalls) {
  const SasCoefficients k = sas_default_coefficients();
  EXPECT_EQ(sas_code_half(0x0000, k), 255);
  EXPECT_EQ(sas_code_half(0x8000, k), 255);
  int prev = 255;
  for (uint16_t x : all_inputs()) {  // ordered from 0 down to -15
    const int c = sas_code_half(x, k);
    ASSERT_LE(c, prev) << "x = " << half_to_float(x);
    prev = c;
  }
}

TEST(Sas, EveryInputBelowSkipThresholdGivesZero) {
  const SasCoefficients k = sas_default_coefficients();
  for (uint16_t x : all_inputs())
    if (half_to_float(x) < TA_SAS_SKIP_X) ASSERT_EQ(sas_code_half(x, k), 0) << half_to_float(x);
  for (float x : {-9.0f, -9.5f, -16.0f, -1e30f, -INFINITY}) {
    EXPECT_EQ(sas_code(x), 0) << x;
    EXPECT_EQ(exp2_code(x), 0) << x;
  }
}

TEST(Sas, TableMatchesTheStepByStepPipeline) {
  const SasCoefficients k = sas_default_coefficients();
  for (uint16_t x : all_inputs()) ASSERT_EQ(sas_code(half_to_float(x)), sas_code_half(x, k));
}

// The kernels (src/cuda/common/sas.cuh) take each P code's input as ys = clamp(y, 0, 16) / 16, packed to
// fp16, and run section 2's steps rearranged: 16 times smaller up to the cubic, no clamp at -15, the round
// magic plus 32, the cubic in g / 16 = -f / 16 with rescaled coefficients. Emulated here step by step: the
// same code as sas_code(-16 ys) for every fp16 ys, and as sas_code(-y) for fp32 y whose ys is subnormal
// in fp16 or clamped.
namespace {
uint8_t kernel_sas_code(uint16_t ys) {
  using turboattn::scaled_sas_coefficient;
  const SasCoefficients k = sas_default_coefficients();
  const uint16_t magic = float_to_half(turboattn::kScaledRoundMagic);
  const uint16_t r = half_sub(magic, ys);
  const uint16_t n = half_sub(r, magic);
  const uint16_t g = half_add(ys, n);
  const uint16_t two_n = uint16_t((r << 10) & 0x7C00);
  uint16_t p = half_fma(scaled_sas_coefficient(k.c[3], 3), g, scaled_sas_coefficient(k.c[2], 2));
  p = half_fma(p, g, scaled_sas_coefficient(k.c[1], 1));
  p = half_fma(p, g, scaled_sas_coefficient(k.c[0], 0));
  return uint8_t(half_fma(p, two_n, float_to_half(TA_SAS_CODE_MAGIC)) & 0xFF);
}
uint8_t kernel_code_of_y(float y) {  // the kernels' saturating fma, in fp32, then the fp16 pipeline
  const float ys = y > 0.0f ? std::min(y / TA_P_OFFSET_MAX, 1.0f) : 0.0f;
  return kernel_sas_code(float_to_half(ys));
}
}  // namespace

TEST(Sas, KernelPipelineGivesTheSameCodes) {
  const uint16_t one = float_to_half(1.0f);
  for (uint16_t ys = 0; ys <= one; ++ys) {
    const float x = -TA_P_OFFSET_MAX * half_to_float(ys);  // exact
    ASSERT_EQ(kernel_sas_code(ys), sas_code(x)) << "ys = " << half_to_float(ys);
  }
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> small(0.0f, 1.0f / 512), any(0.0f, 20.0f);
  for (int i = 0; i < 200000; ++i) {
    const float y = i % 2 ? small(rng) : any(rng);
    ASSERT_EQ(kernel_code_of_y(y), sas_code(p_code_input(0.0f, 1.0f, y))) << "y = " << y;
  }
  for (float y : {0.0f, 1e-30f, 15.0f, 15.5f, 15.75f, 16.0f, 17.0f, 1e30f, INFINITY}) EXPECT_EQ(kernel_code_of_y(y), sas_code(-std::min(y, 16.0f))) << y;
}

// Each P code's input (docs/FORMATS.md 1.5): the tile's maximum is each score rounded down, so the
// largest key's y is never above 0 and its code is 255 whatever the magnitude; NaN gives 0.
TEST(Sas, TheLargestScoreOfATileGetsTheFullCode) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> acc_dist(-(1 << 22), 1 << 22);
  std::uniform_real_distribution<float> log_st(-30.0f, 30.0f);
  for (int i = 0; i < 100000; ++i) {
    const float acc = float(acc_dist(rng)), st = std::exp2(log_st(rng));
    const float tile_max = score_bound(acc, st);
    ASSERT_LE(tile_max, double(acc) * double(st));
    ASSERT_EQ(sas_code(p_code_input(acc, st, tile_max)), 255) << acc << " " << st;
    ASSERT_EQ(exp2_code(p_code_input(acc, st, tile_max)), 255) << acc << " " << st;
  }
  EXPECT_EQ(p_code_input(1.0f, NAN, 0.0f), 0.0f);
  EXPECT_EQ(p_code_input(-1e6f, 1e6f, 1e6f), -TA_P_OFFSET_MAX);
  EXPECT_EQ(score_bound(3.0f, 0.1f), std::nextafter(0.3f, 0.0f));  // 0.1f * 3 rounds up to 0.3f to nearest
  EXPECT_EQ(score_bound(-INFINITY, 2.0f), -INFINITY);
}
