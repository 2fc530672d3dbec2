// Quantization formats: INT8 blocks, token-to-block requantization, stage-2 codes, bit packing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "reference/quant.hpp"
#include "test_util.hpp"
#include "turboattn/format.h"

using namespace turboattn;
using namespace turboattn::ref;

TEST(Int8Block, RoundTripWithinHalfStep) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int dim : {64, 96, 128, 256})
    for (int rows : {1, 7, 64}) {
      std::vector<float> x(size_t(rows) * dim);
      std::normal_distribution<float> n(0.0f, 3.0f);
      for (float& v : x) v = n(rng);
      std::vector<int8_t> q(x.size(), 99);
      const float scale = quantize_block_int8(x.data(), rows, dim, dim, q.data(), dim);
      float amax = 0;
      for (float v : x) amax = std::max(amax, std::fabs(v));
      EXPECT_EQ(scale, amax / 127.0f);
      int hits_max = 0;
      // Codes are rn(x * rn(127 / amax)) and the scale rn(amax / 127) (FORMATS.md 1.2): three fp32
      // roundings of values up to 127 steps, so a code may land about 3 * 127 * 2^-24 steps past the
      // half step (one in 181 runs of the suite did); the bound allows 4. Checked in double.
      const double bound = (0.5 + 4 * 127 * 0x1p-24) * double(scale);
      for (size_t i = 0; i < x.size(); ++i) {
        EXPECT_LE(std::fabs(double(q[i]) * scale - double(x[i])), bound) << i;
        hits_max += std::abs(q[i]) == 127;
      }
      EXPECT_GE(hits_max, 1);  // the largest element maps to +-127
    }
}

TEST(Int8Block, RoundsHalfToEven) {
  // amax 127 gives scale 1 and inv 1: codes are x rounded half to even.
  const float x[6] = {127.0f, 2.5f, 3.5f, -2.5f, 0.5f, -1.5f};
  int8_t q[6];
  EXPECT_EQ(quantize_block_int8(x, 1, 6, 6, q, 6), 1.0f);
  const int8_t want[6] = {127, 2, 4, -2, 0, -2};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(q[i], want[i]) << i;
}

TEST(Int8Block, ZeroTinyAndNonFiniteBlocks) {
  std::vector<float> x(64, 0.0f);
  std::vector<int8_t> q(64, 5);
  EXPECT_EQ(quantize_block_int8(x.data(), 1, 64, 64, q.data(), 64), 0.0f);
  for (int8_t v : q) EXPECT_EQ(v, 0);
  x[3] = 1e-35f;  // below TA_ZERO_BLOCK_AMAX: treated as all zero, never a denormal scale
  EXPECT_EQ(quantize_block_int8(x.data(), 1, 64, 64, q.data(), 64), 0.0f);
  auto scale_bits = [&] {
    const float scale = quantize_block_int8(x.data(), 1, 64, 64, q.data(), 64);
    uint32_t bits;
    std::memcpy(&bits, &scale, 4);
    return bits;
  };
  x[3] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(scale_bits(), TA_NAN_BITS);  // one NaN pattern, whatever the input's
  x[3] = -std::numeric_limits<float>::infinity();
  EXPECT_EQ(scale_bits(), TA_NAN_BITS);
  const uint32_t payload_nan = 0xFFC01234u;
  std::memcpy(&x[3], &payload_nan, 4);
  EXPECT_EQ(scale_bits(), TA_NAN_BITS);
  for (int8_t v : q) EXPECT_EQ(v, 0);
  x[3] = 65504.0f;  // fp16 max: a normal scale
  EXPECT_EQ(quantize_block_int8(x.data(), 1, 64, 64, q.data(), 64), 65504.0f / 127.0f);
  EXPECT_EQ(q[3], 127);
}

TEST(Int8Block, TokenRequantizationKeepsLargestTokenExact) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int d = 128, tokens = TA_BLOCK_TOKENS;
  std::vector<float> x(size_t(tokens) * d), token_scale(static_cast<size_t>(tokens));
  std::vector<int8_t> q(x.size());
  std::uniform_real_distribution<float> mag(0.1f, 4.0f);
  std::normal_distribution<float> n;
  for (int t = 0; t < tokens; ++t) {
    const float m = mag(rng);
    for (int c = 0; c < d; ++c) x[size_t(t) * d + c] = m * n(rng);
    token_scale[size_t(t)] = quantize_block_int8(&x[size_t(t) * d], 1, d, d, &q[size_t(t) * d], d);
  }
  const std::vector<int8_t> before = q;
  const float block = requantize_tokens_to_block(q.data(), token_scale.data(), tokens, d);
  float want = 0;
  int largest = 0;
  for (int t = 0; t < tokens; ++t)
    if (token_scale[size_t(t)] > want) want = token_scale[size_t(t)], largest = t;
  EXPECT_EQ(block, want);
  for (int c = 0; c < d; ++c) EXPECT_EQ(q[size_t(largest) * d + c], before[size_t(largest) * d + c]);
  // Two roundings: at most half a token step plus half a block step from the input.
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < d; ++c)
      EXPECT_LE(std::fabs(q[size_t(t) * d + c] * block - x[size_t(t) * d + c]),
                0.5f * (block + token_scale[size_t(t)]) * (1 + 1e-5f));
}

class Stage2 : public testing::TestWithParam<int> {};

TEST_P(Stage2, CodesDecodeWithinHalfScaleAndStayInt8) {
  const int bits = GetParam(), levels = (1 << bits) - 1;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> lo_dist(-127, 127);
  for (int trial = 0; trial < 4000; ++trial) {
    const int a = lo_dist(rng), b = lo_dist(rng);
    std::uniform_int_distribution<int> v(std::min(a, b), std::max(a, b));
    int8_t q[TA_BLOCK_TOKENS];
    for (int8_t& x : q) x = int8_t(v(rng));
    if (trial % 7 == 0) q[0] = 127;  // the top of the INT8 range must stay reachable
    uint8_t codes[TA_BLOCK_TOKENS];
    const Stage2Params p = stage2_encode(q, TA_BLOCK_TOKENS, 1, bits, codes);
    int lo = 127, hi = -127;
    for (int8_t x : q) lo = std::min(lo, int(x)), hi = std::max(hi, int(x));
    EXPECT_EQ(p.scale, std::max(1, (hi - lo + levels - 1) / levels));
    EXPECT_LE(int(p.zero), lo);                           // the grid covers [lo, hi] ...
    EXPECT_GE(int(p.zero) + levels * p.scale, hi);
    EXPECT_LE(int(p.zero) + levels * p.scale, 127);       // ... inside INT8
    for (int i = 0; i < TA_BLOCK_TOKENS; ++i) {
      ASSERT_LE(codes[i], levels);
      const int back = int(p.zero) + int(codes[i]) * p.scale;
      EXPECT_EQ(stage2_decode(codes[i], p), back);
      EXPECT_LE(2 * std::abs(back - q[i]), p.scale) << "value " << int(q[i]);
    }
  }
}
INSTANTIATE_TEST_SUITE_P(Bits, Stage2, testing::Values(4, 2));

TEST(Stage2, ConstantChannelIsExact) {
  int8_t q[TA_BLOCK_TOKENS];
  for (int v : {-127, -3, 0, 126, 127}) {
    std::fill(q, q + TA_BLOCK_TOKENS, int8_t(v));
    uint8_t codes[TA_BLOCK_TOKENS];
    const Stage2Params p = stage2_encode(q, TA_BLOCK_TOKENS, 1, 2, codes);
    for (uint8_t c : codes) EXPECT_EQ(stage2_decode(c, p), v);
  }
}

class Packing : public testing::TestWithParam<int> {};

TEST_P(Packing, RoundTripsExactly) {
  const int bits = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  for (int count : {1, 3, 64, 129, 8192}) {
    std::vector<uint8_t> codes(static_cast<size_t>(count)), back(size_t(count), 0xAA), packed(size_t(count * bits + 7) / 8);
    for (uint8_t& c : codes) c = uint8_t(rng() & ((1u << bits) - 1));
    pack_codes(codes.data(), count, bits, packed.data());
    unpack_codes(packed.data(), count, bits, back.data());
    EXPECT_EQ(codes, back);
  }
}
INSTANTIATE_TEST_SUITE_P(Bits, Packing, testing::Values(2, 4, 8));

TEST(Packing, LeastSignificantBitsFirst) {
  const uint8_t codes4[4] = {0x1, 0x2, 0x3, 0xF};
  uint8_t p4[2];
  pack_codes(codes4, 4, 4, p4);
  EXPECT_EQ(p4[0], 0x21);
  EXPECT_EQ(p4[1], 0xF3);
  const uint8_t codes2[4] = {1, 2, 3, 0};
  uint8_t p2[1];
  pack_codes(codes2, 4, 2, p2);
  EXPECT_EQ(p2[0], 0b00111001);
}
