// Cache codes on the GPU (docs/FORMATS.md, 3.1-3.4): per-token INT8 quantization, the flush's
// requantization and stage-2 encoding (bit-exact with src/reference/quant.cpp), and the decode-side
// expansion of packed codes back to INT8 with integer and exact fp16 operations only.
//
// Expanded codes are stored "excess-128": the byte is value + 128 (u8), so unsigned tensor-core
// products can use them; the kernels subtract 128 x (sum of the other operand) to get the exact
// signed product.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "turboattn/format.h"

namespace turboattn::cuda {

// clamp(rint(v), -127, 127), ties to even (ref::round_int8).
__device__ __forceinline__ int8_t round_int8(float v) {
  return int8_t(max(-TA_INT8_MAX, min(TA_INT8_MAX, __float2int_rn(v))));
}

// ref::stage2_encode of one channel's `count` INT8 values q[i * stride]: codes (unpacked) and params.
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

// ---- Expansion (decode) ----

// fp16 bits of 1024 + 128 + zero: the bias that leaves value + 128 in the low byte of an fp16 in
// [1024, 2048), where every integer is exact.
__device__ __forceinline__ uint16_t k_bias_bits(int8_t zero) {
  return __half_as_ushort(__int2half_rn(1152 + int(zero)));
}

// One 32-bit word of K codes (token-major: 32 / kBits consecutive channels of one token, LSB first)
// to excess-128 bytes. Pair j of the word's codes is (j, j + n/2); scale2[j] and bias2[j] hold those
// channels' stage-2 scale and k_bias_bits(zero) as fp16 pairs. out: n bytes in channel order.
template <int kBits>
__device__ __forceinline__ void expand_k_word(uint32_t w, const uint32_t* scale2, const uint32_t* bias2,
                                              uint32_t (&out)[8 / kBits]) {
  constexpr int n = 32 / kBits;
  constexpr uint32_t mask2 = ((1u << kBits) - 1u) * 0x00010001u;
  uint32_t r[n / 2];
#pragma unroll
  for (int j = 0; j < n / 2; ++j) {
    // 1024 + code in each half, minus 1024 (exact), times the scale plus the bias (one rounding of an
    // integer below 2048: exact).
    uint32_t h = ((w >> (kBits * j)) & mask2) | 0x64006400u;
    __half2 hv = __hsub2(*reinterpret_cast<__half2*>(&h), __floats2half2_rn(1024.0f, 1024.0f));
    __half2 v = __hfma2(hv, *reinterpret_cast<const __half2*>(&scale2[j]), *reinterpret_cast<const __half2*>(&bias2[j]));
    r[j] = *reinterpret_cast<uint32_t*>(&v);
  }
  uint32_t t[n / 4];  // t[j/2] = bytes of channels [j, j + 1, j + n/2, j + n/2 + 1]
#pragma unroll
  for (int j = 0; j < n / 2; j += 2) t[j / 2] = __byte_perm(r[j], r[j + 1], 0x6240);
#pragma unroll
  for (int m = 0; m < n / 8; ++m) {
    out[m] = __byte_perm(t[2 * m], t[2 * m + 1], 0x5410);          // channels 4m .. 4m + 3
    out[n / 8 + m] = __byte_perm(t[2 * m], t[2 * m + 1], 0x7632);  // channels n/2 + 4m ..
  }
}

// 16 keys of one V channel (channel-major codes, LSB first) to excess-128 bytes in the key order of
// the P fragments (vt_position): out[0] holds keys 0, 1, 8, 9; out[1] 2, 3, 10, 11; out[2] 4, 5, 12,
// 13; out[3] 6, 7, 14, 15. `in` is the group's 2 * kBits bytes; scale and bias (zero + 128) are the
// channel's. code * scale + zero + 128 is in [0, 255], so byte lanes never carry into each other.
template <int kBits>
__device__ __forceinline__ void expand_v_group(const uint32_t* in, uint32_t scale, uint32_t bias, uint32_t (&out)[4]) {
  const uint32_t bias4 = bias * 0x01010101u;
  if constexpr (kBits == 8) {
    const uint32_t w0 = in[0] ^ 0x80808080u, w1 = in[1] ^ 0x80808080u, w2 = in[2] ^ 0x80808080u, w3 = in[3] ^ 0x80808080u;
    out[0] = __byte_perm(w0, w2, 0x5410), out[1] = __byte_perm(w0, w2, 0x7632);
    out[2] = __byte_perm(w1, w3, 0x5410), out[3] = __byte_perm(w1, w3, 0x7632);
  } else if constexpr (kBits == 4) {
    const uint32_t lo0 = (in[0] & 0x0F0F0F0Fu) * scale + bias4, hi0 = ((in[0] >> 4) & 0x0F0F0F0Fu) * scale + bias4;
    const uint32_t lo1 = (in[1] & 0x0F0F0F0Fu) * scale + bias4, hi1 = ((in[1] >> 4) & 0x0F0F0F0Fu) * scale + bias4;
    const uint32_t a = __byte_perm(lo0, hi0, 0x5140), b = __byte_perm(lo0, hi0, 0x7362);  // keys 0-3, 4-7
    const uint32_t c = __byte_perm(lo1, hi1, 0x5140), d = __byte_perm(lo1, hi1, 0x7362);  // keys 8-11, 12-15
    out[0] = __byte_perm(a, c, 0x5410), out[1] = __byte_perm(a, c, 0x7632);
    out[2] = __byte_perm(b, d, 0x5410), out[3] = __byte_perm(b, d, 0x7632);
  } else {
    static_assert(kBits == 2, "8, 4 or 2 bits");
    uint32_t u[4];  // u[j] byte i = key 4i + j
#pragma unroll
    for (int j = 0; j < 4; ++j) u[j] = ((in[0] >> (2 * j)) & 0x03030303u) * scale + bias4;
    const uint32_t a = __byte_perm(u[0], u[1], 0x5140), b = __byte_perm(u[2], u[3], 0x5140);  // keys 0,1,4,5 / 2,3,6,7
    const uint32_t c = __byte_perm(u[0], u[1], 0x7362), d = __byte_perm(u[2], u[3], 0x7362);  // 8,9,12,13 / 10,11,14,15
    out[0] = __byte_perm(a, c, 0x5410), out[1] = __byte_perm(b, d, 0x5410);
    out[2] = __byte_perm(a, c, 0x7632), out[3] = __byte_perm(b, d, 0x7632);
  }
}

}  // namespace turboattn::cuda
