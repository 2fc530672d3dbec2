// Quantization formats on the CPU: blockwise symmetric INT8 (FlashQ compute format and cache stage 1),
// stage-2 INT4/INT2 codes with an integer scale and zero per group (a K channel, a V token), and bit packing.
#pragma once

#include <cstdint>

namespace turboattn::ref {

// The NaN the format stores (TA_NAN_BITS), whatever NaN or infinities produced it.
float stored_nan();

// Scale of a symmetric INT8 block with largest magnitude amax: amax / 127, 0 for an all-zero block
// (amax < TA_ZERO_BLOCK_AMAX), NaN when amax is not finite.
float int8_scale(float amax);

// Quantizes rows x[r * x_stride + c] (r < rows, c < dim) as one block; returns its scale.
// codes[r * code_stride + c] = clamp(rint(x * (127 / amax)), -127, 127).
float quantize_block_int8(const float* x, int rows, int dim, int64_t x_stride, int8_t* codes,
                          int64_t code_stride);

// Re-quantizes per-token INT8 rows (token t has scale token_scale[t]) to one block scale, the largest
// token scale: codes[t][c] = rint(codes[t][c] * (token_scale[t] / block_scale)). Returns block_scale.
float requantize_tokens_to_block(int8_t* codes, const float* token_scale, int tokens, int dim);

// Stage 2: one channel's INT8 values q[i * stride], i < count, to `bits`-bit unsigned codes with an
// integer scale and zero: value = zero + code * scale. The grid of 2^bits values is centred on the
// channel's [min, max] and kept inside [-128, 127], so every value is within scale / 2 of its input.
struct Stage2Params {
  uint8_t scale;
  int8_t zero;
};
Stage2Params stage2_encode(const int8_t* q, int count, int64_t stride, int bits, uint8_t* codes);
inline int8_t stage2_decode(uint8_t code, Stage2Params p) { return int8_t(p.zero + int(code) * p.scale); }

// Bit packing: value i goes to byte (i * bits) / 8 at bit (i * bits) % 8 (least significant first).
void pack_codes(const uint8_t* codes, int count, int bits, uint8_t* packed);
void unpack_codes(const uint8_t* packed, int count, int bits, uint8_t* codes);

}  // namespace turboattn::ref
