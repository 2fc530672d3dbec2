// Byte layout of a compressed cache page, of the INT8 buffer and of a sequence's first block: the
// single definition used by the CPU reference and the CUDA kernels. docs/FORMATS.md ("KV cache format")
// describes it in words.
#pragma once

#include <stdint.h>

#include "turboattn/format.h"

#if defined(__CUDACC__)
#define TA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TA_HOST_DEVICE inline
#endif

namespace turboattn {

// Bytes of one head's K (or V) codes in a block of TA_BLOCK_TOKENS tokens.
TA_HOST_DEVICE int64_t block_code_bytes(int bits, int head_dim) {
  return int64_t(TA_BLOCK_TOKENS) * head_dim * bits / 8;
}
// K's stage-2 grids are per channel and per group of consecutive tokens: the whole block at 4 bits, four
// groups of 16 at 2 bits (docs/FORMATS.md 3.3).
TA_HOST_DEVICE constexpr int k_group_tokens(int bits) { return bits == TA_BITS_2 ? TA_K_GROUP_TOKENS_2BIT : TA_BLOCK_TOKENS; }
TA_HOST_DEVICE constexpr int k_groups(int bits) { return TA_BLOCK_TOKENS / k_group_tokens(bits); }
// Stage-2 metadata of one head's block, none at 8 bits: K's u8 scale[groups][D] then s8 zero[groups][D],
// V's per token (u8 scale[64] then s8 zero[64]).
TA_HOST_DEVICE constexpr int64_t block_k_meta_bytes(int bits, int head_dim) {
  return bits == 8 ? 0 : 2 * int64_t(k_groups(bits)) * head_dim;
}
TA_HOST_DEVICE constexpr int64_t block_v_meta_bytes(int bits) { return bits == 8 ? 0 : 2 * TA_BLOCK_TOKENS; }
TA_HOST_DEVICE int64_t block_k_region_bytes(int bits, int head_dim) {
  return block_code_bytes(bits, head_dim) + block_k_meta_bytes(bits, head_dim);
}
TA_HOST_DEVICE int64_t block_v_region_bytes(int bits, int head_dim) {
  return block_code_bytes(bits, head_dim) + block_v_meta_bytes(bits);
}
// The header and every region start on a 128-byte line, and pages are whole lines: on an H200, 16-byte
// async copies into 128-byte-aligned shared memory streamed 4.6 TB/s from aligned pages and 3.4-3.6
// TB/s from pages 32 or 64 bytes off (docs/FORMATS.md 3.5).
constexpr int64_t kPageAlign = 128;
TA_HOST_DEVICE constexpr int64_t page_aligned(int64_t bytes) { return (bytes + kPageAlign - 1) / kPageAlign * kPageAlign; }
// Page header: fp32 stage-1 scale of K for each head, then of V, padded to a line.
TA_HOST_DEVICE int64_t page_header_bytes(int kv_heads) { return page_aligned(8 * int64_t(kv_heads)); }

// Offsets within one layer's page, given that layer's bit widths (one per KV head).
struct PageLayout {
  int kv_heads = 0, head_dim = 0;
  int64_t page_bytes = 0;
  int64_t k_offset[TA_MAX_KV_HEADS] = {}, v_offset[TA_MAX_KV_HEADS] = {};  // region offsets
  int bits[TA_MAX_KV_HEADS] = {};
};

TA_HOST_DEVICE PageLayout make_page_layout(const int* bits, int kv_heads, int head_dim) {
  PageLayout p;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  int64_t off = page_header_bytes(kv_heads);
  for (int h = 0; h < kv_heads; ++h) {
    p.bits[h] = bits[h];
    p.k_offset[h] = off;
    off += page_aligned(block_k_region_bytes(bits[h], head_dim));
    p.v_offset[h] = off;
    off += page_aligned(block_v_region_bytes(bits[h], head_dim));
  }
  p.page_bytes = off;
  return p;
}
TA_HOST_DEVICE int64_t page_k_scale_offset(int head) { return 4 * int64_t(head); }
TA_HOST_DEVICE int64_t page_v_scale_offset(int kv_heads, int head) { return 4 * (int64_t(kv_heads) + head); }

// The INT8 buffer of one (sequence, layer, KV head): K codes [64][D], V codes [64][D] (token-major),
// fp32 K scales [64], fp32 V scales [64].
TA_HOST_DEVICE int64_t buffer_head_bytes(int head_dim) {
  return 2 * int64_t(TA_BLOCK_TOKENS) * head_dim + 2 * 4 * int64_t(TA_BLOCK_TOKENS);
}
TA_HOST_DEVICE int64_t buffer_k_offset(int) { return 0; }
TA_HOST_DEVICE int64_t buffer_v_offset(int head_dim) { return int64_t(TA_BLOCK_TOKENS) * head_dim; }
TA_HOST_DEVICE int64_t buffer_k_scale_offset(int head_dim) { return 2 * int64_t(TA_BLOCK_TOKENS) * head_dim; }
TA_HOST_DEVICE int64_t buffer_v_scale_offset(int head_dim) {
  return 2 * int64_t(TA_BLOCK_TOKENS) * head_dim + 4 * int64_t(TA_BLOCK_TOKENS);
}

// A sequence's page table lists the pages of its blocks after the first, which is in no page (below):
// block b >= 1 is in the page of table entry b - 1.
TA_HOST_DEVICE constexpr int64_t page_table_index(int64_t block) { return block - 1; }

// A sequence's first block of one (layer, KV head), kept at 8 bits in its own region, not in a page
// (docs/FORMATS.md 3.2): an 8-bit block as an 8-bit head's page regions hold it, K codes [64][D]
// (token-major), V codes [D][64] (channel-major), then its fp32 K and V block scales; whole lines.
TA_HOST_DEVICE int64_t first_block_k_offset(int) { return 0; }
TA_HOST_DEVICE int64_t first_block_v_offset(int head_dim) { return block_code_bytes(TA_BITS_8, head_dim); }
TA_HOST_DEVICE int64_t first_block_scale_offset(int head_dim) { return 2 * block_code_bytes(TA_BITS_8, head_dim); }
TA_HOST_DEVICE int64_t first_block_bytes(int head_dim) { return page_aligned(first_block_scale_offset(head_dim) + 8); }

}  // namespace turboattn
