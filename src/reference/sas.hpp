// SAS: the sparsity-based softmax approximation, on the CPU, bit-exact with the GPU's fp16 pipeline.
// Input x <= 0 is a score minus its tile's maximum, in base 2 (log2(e) is folded into the scores;
// docs/FORMATS.md 1.5 gives how x is formed). Output is the 8-bit probability code round(255 * 2^x) as
// docs/FORMATS.md defines it.
#pragma once

#include <array>
#include <cstdint>

namespace turboattn::ref {

// fp16 coefficients of the SAS polynomial p(f) ~= 255 * 2^f, c0 first.
struct SasCoefficients {
  std::array<uint16_t, 4> c;
};
SasCoefficients sas_default_coefficients();

// The SAS pipeline on one fp16 input, step by step as the GPU runs it (exact fp16 emulation).
uint8_t sas_code_half(uint16_t x_half, const SasCoefficients& coef);

// The value before the final rounding to an integer code: p(f) * 2^n (exact), for error analysis.
double sas_value_half(uint16_t x_half, const SasCoefficients& coef);

// P code of x (fp32, x <= 0) with SAS, through a table of sas_code_half over every fp16 input.
uint8_t sas_code(float x);

// P code of x with the exact exponential: round-half-even(255 * 2^x) (SAS off).
uint8_t exp2_code(float x);

}  // namespace turboattn::ref
