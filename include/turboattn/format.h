/* turboattn format constants: the one place every format number is defined.
 * docs/FORMATS.md explains each of them; the CPU reference and the CUDA kernels both include this. */
#ifndef TURBOATTN_FORMAT_H
#define TURBOATTN_FORMAT_H

/* Tokens per quantization block of Q, K and V, per compressed cache block (one page), per softmax
 * tile, and the capacity of the INT8 buffer of recent tokens (flushed when it holds this many). */
#define TA_BLOCK_TOKENS 64
/* Blocks covering n tokens (the last one partial). */
#define TA_BLOCK_COUNT(n) (((n) + TA_BLOCK_TOKENS - 1) / TA_BLOCK_TOKENS)

/* Symmetric INT8: codes in [-TA_INT8_MAX, TA_INT8_MAX], scale = amax / TA_INT8_MAX. */
#define TA_INT8_MAX 127

/* A block whose amax is below this (2^-100) is an all-zero block: scale 0, codes 0. */
#define TA_ZERO_BLOCK_AMAX 7.888609052210118e-31f
/* The fp32 bits of every NaN the format stores (a non-finite block's scale, a K mean over non-finite
 * values): the positive quiet NaN without payload, one pattern on every device, so that caches holding
 * poisoned tokens compare equal byte for byte. */
#define TA_NAN_BITS 0x7FC00000u

/* Softmax probabilities P are unsigned 8-bit codes with the fixed scale 1 / TA_P_CODE_MAX. */
#define TA_P_CODE_MAX 255

/* SAS: base-2 exponent arguments are clamped below at TA_SAS_MIN_X (where 2^n builds to zero), as
 * docs/FORMATS.md 2 defines it; the kernels reach the same codes without the clamp (their inputs stop
 * at -TA_P_OFFSET_MAX). */
#define TA_SAS_MIN_X (-15)
/* Every x < TA_SAS_SKIP_X yields code 0. The tile skip rule lowers it by ceil(log2(keys))
 * (src/format/skip_rule.h) so that all skipped keys of a row together stay below half a code. */
#define TA_SAS_SKIP_X (-9.0f)
/* A P code's input is x = -clamp(y, 0, TA_P_OFFSET_MAX), y = rn(tile_max - acc * st) (docs/FORMATS.md 1.5):
 * a power of two at or above -TA_SAS_MIN_X, so kernels can clamp y / TA_P_OFFSET_MAX to [0, 1] for free. */
#define TA_P_OFFSET_MAX 16.0f
/* fp16 magic constant: h + 1551 rounds h to an integer n and leaves n + 15 in the low mantissa bits. */
#define TA_SAS_ROUND_MAGIC 1551.0f
/* fp16 1024: adding it puts round(v) for v in [0, 1024) into the low mantissa bits. */
#define TA_SAS_CODE_MAGIC 1024.0f

/* SAS polynomial p(f) ~= 255 * 2^f on f in [-0.5, 0.5], evaluated in fp16 by Horner's rule.
 * Stored as fp16 bit patterns (tools/fit_sas.cpp fits them; docs/FORMATS.md gives the errors). */
#define TA_SAS_C0_BITS 0x5BF8 /* 255.0 */
#define TA_SAS_C1_BITS 0x5986 /* 176.75 */
#define TA_SAS_C2_BITS 0x53B5 /* 61.65625 */
#define TA_SAS_C3_BITS 0x4AF7 /* 13.9296875 */

/* Stage-2 cache codes: bit widths a KV head may be stored at. */
#define TA_BITS_8 8
#define TA_BITS_4 4
#define TA_BITS_2 2
/* Tokens per K stage-2 group (one channel's grid) at 2 bits: four per block. At 4 bits a K group is
 * the whole block (TA_BLOCK_TOKENS tokens). */
#define TA_K_GROUP_TOKENS_2BIT 16

/* Decode quantizes each query head's q_len tokens in INT8 blocks of up to this many consecutive tokens
   (the N of the decode kernel's m16n8k32 tile). */
#define TA_DECODE_Q_TOKENS 8

/* Most KV heads per layer that a cache accepts. */
#define TA_MAX_KV_HEADS 64

#endif /* TURBOATTN_FORMAT_H */
