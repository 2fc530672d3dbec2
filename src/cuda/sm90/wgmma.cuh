// Inline-PTX wrappers for Hopper's warpgroup matrix instructions (sm_90a), one per instruction, named
// after it, and the shared-memory matrix descriptor they read B (and optionally A) through.
//
// Layout used here: K-major operands without swizzle. A "core matrix" is 8 rows (M or N) of 16
// contiguous bytes (16 K positions at 8 bits); the descriptor gives the byte distance between core
// matrices adjacent along K (leading byte offset) and along M/N (stride byte offset).
#pragma once

#include <stdint.h>

#include "cuda/sm90/sm90a.cuh"

namespace turboattn::cuda::sm90 {

// Byte offset of element (row, k) of a K-major, unswizzled operand whose core matrices are laid out
// K-fastest: rows of `k_bytes` bytes, so LBO = 128 and SBO = 8 * k_bytes.
__host__ __device__ constexpr int kmajor_offset(int row, int k, int k_bytes) {
  return (row / 8) * (8 * k_bytes) + (k / 16) * 128 + (row % 8) * 16 + (k % 16);
}

// The 64-bit shared-memory matrix descriptor: start address, LBO and SBO in 16-byte units (bits 0-13,
// 16-29, 32-45), base offset 0 and swizzle mode 0 (none).
__device__ __forceinline__ uint64_t smem_descriptor(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32);
}

// The descriptor of the operand `bytes` further on in shared memory (same LBO and SBO). The start
// address field (bits 0-13, 16-byte units) cannot carry into the other fields for addresses in
// shared memory, so only the low word changes.
__device__ __forceinline__ uint64_t descriptor_advance(uint64_t desc, uint32_t bytes) {
  return (desc & 0xFFFFFFFF00000000ull) | uint32_t(uint32_t(desc) + (bytes >> 4));
}

// wgmma.fence.sync.aligned: orders register accesses to the accumulators before the next wgmma.
__device__ __forceinline__ void wgmma_fence() { TA_SM90A_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// wgmma.commit_group.sync.aligned / wgmma.wait_group.sync.aligned N.
__device__ __forceinline__ void wgmma_commit_group() { TA_SM90A_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
  TA_SM90A_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Marks registers as rewritten here, so that the compiler neither reads an accumulator of an
// asynchronous wgmma before the wait that completes it nor moves earlier writes past this point.
template <int N>
__device__ __forceinline__ void fence_operands(int32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
// fence.proxy.async.shared::cta: shared-memory stores by threads become visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async_shared() { TA_SM90A_ASM("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// wgmma.mma_async.sync.aligned.m64nNk32.s32.{s8,u8}.s8: d (64 x N s32, N / 2 registers a thread) +=
// a (64 x 32, from registers: each warp's 16 rows in the m16n8k32 A-fragment layout) * b (32 x N from
// shared memory through its descriptor, K-major). Register 4 j + i of d holds row 16 warp + g + 8 (i / 2),
// column 8 j + 2 t + i % 2. scale_d = 0 overwrites d instead of adding.
#define TA_WGMMA_M64N64K32(NAME, ATYPE)                                                                              \
  __device__ __forceinline__ void NAME(int32_t (&d)[32], const uint32_t (&a)[4], uint64_t b_desc, int scale_d) {   \
    TA_SM90A_ASM(                                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                               \
        "wgmma.mma_async.sync.aligned.m64n64k32.s32." ATYPE ".s8 "                                                  \
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"   \
        "%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p;\n}\n"                                                         \
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]),   \
          "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]),       \
          "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]),      \
          "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])                   \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(scale_d));                                      \
  }
TA_WGMMA_M64N64K32(wgmma_m64n64k32_s8s8, "s8")
TA_WGMMA_M64N64K32(wgmma_m64n64k32_u8s8, "u8")
#undef TA_WGMMA_M64N64K32

// The same instruction with A (64 x 32, K-major) from shared memory through its descriptor too.
__device__ __forceinline__ void wgmma_m64n64k32_s8s8(int32_t (&d)[32], uint64_t a_desc, uint64_t b_desc, int scale_d) {
  TA_SM90A_ASM(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"
      "%28,%29,%30,%31}, %32, %33, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]),
        "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]),
        "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]),
        "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "l"(a_desc), "l"(b_desc), "r"(scale_d));
}

}  // namespace turboattn::cuda::sm90
