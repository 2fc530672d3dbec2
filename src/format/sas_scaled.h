// The constants of the kernels' SAS pipeline, which runs docs/FORMATS.md section 2's steps 16 times smaller
// ("How the kernels run it"), shared by src/cuda/common/sas.cuh and its CPU emulation in tests/test_sas.cpp.
#pragma once

#include <stdint.h>

#include "turboattn/format.h"

namespace turboattn {

constexpr int kPOffsetLog2 = 4;  // TA_P_OFFSET_MAX = 2^4: the scale of the pipeline
static_assert(TA_P_OFFSET_MAX == float(1 << kPOffsetLog2), "the P offset's clamp is a power of two");
static_assert(-TA_SAS_MIN_X <= (1 << kPOffsetLog2), "the kernels' inputs reach below SAS's clamp");

// r / 16 = (1551 + 32) / 16 - ys: section 2's magic plus 32, which keeps its ties and its low mantissa
// bits (n + 15 mod 32), divided by 16, where an fp16 ulp is 1/16.
constexpr float kScaledRoundMagic = (TA_SAS_ROUND_MAGIC + 32.0f) / TA_P_OFFSET_MAX;

// fp16 bits of the cubic's coefficient c_k (bits: section 2's), for the cubic in g / 16 = -f / 16:
// c_k * (-16)^k, exact (the exponent field raised by 4 k, the sign flipped for odd k).
constexpr uint16_t scaled_sas_coefficient(uint16_t bits, int k) {
  return uint16_t((bits + ((k * kPOffsetLog2) << 10)) ^ (k % 2 ? 0x8000 : 0));
}

}  // namespace turboattn
