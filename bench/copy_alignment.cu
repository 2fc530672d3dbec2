// Copy-stream microbenchmark behind docs/FORMATS.md 3.5's alignment decision: warps streaming 4352-byte
// chunks (a 4-bit K half at D = 128) from global into shared memory with 16-byte cp.async (512 bytes per
// warp instruction, the last 256 by half a warp), each warp with a three-slot ring, 4 warps per CTA and 4
// CTAs per SM, as the decode kernel stages its pages. Variants: 0, copies outside any branch; 1, inside a
// warp-uniform branch (as the decode kernel's stage()); 2 and 3, variant 0 with every chunk 64 or 32
// bytes past a 128-byte line (the shared-memory slots stay line-aligned). Prints GB/s per variant.
// H200, 2026-11-27: 4.61, 4.61, 3.49-3.56 and 3.44-3.48 TB/s.
//
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o copy_alignment bench/copy_alignment.cu && ./copy_alignment
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp16_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp16_if(uint32_t dst, const void* src, bool on) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %2, 0; @p cp.async.cg.shared.global [%0], [%1], 16; }\n" ::"r"(dst), "l"(src), "r"(int(on)) : "memory");
}
template <int N> __device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
constexpr int kChunk = 4096 + 256;  // a 4-bit K half at D = 128: codes and metadata
template <int kVariant>
__global__ void __launch_bounds__(128) stream(const uint8_t* src, int64_t chunks, uint32_t* sink, int offset) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint8_t* ring = smem + warp * 3 * kChunk;
  const int64_t gw = int64_t(blockIdx.x) * 4 + warp, nw = int64_t(gridDim.x) * 4;
  uint32_t acc = 0;
  // Variant 0: every copy issued, out-of-range ones reading 0 bytes (zero fill) from a valid address;
  // variant 1: the copies inside a branch, as the decode kernel's stage().
  auto stage = [&](int64_t c, int slot) {
    const bool live = c < chunks;
    if (kVariant == 1 && !live) return;
    const uint8_t* s = src + offset + (live ? c : 0) * kChunk + 16 * lane;
    const uint32_t d = uint32_t(__cvta_generic_to_shared(ring + slot * kChunk)) + 16 * lane;
    const int bytes = live ? 16 : 0;
#pragma unroll
    for (int i = 0; i < kChunk / 512; ++i) cp16_zfill(d + 512 * i, s + 512 * i, bytes);
    // The last 256 bytes: a half-warp copy, predicated (as the decode kernel's compiles), zero-filled past the end.
    cp16_if(d + kChunk / 512 * 512, s + kChunk / 512 * 512, lane < (kChunk % 512) / 16 && live);
  };
  int64_t c = gw;
  stage(c, 0), commit();
  stage(c + nw, 1), commit();
  int slot = 0;
  for (; c < chunks; c += nw) {
    wait<1>();
    __syncwarp();
    acc ^= reinterpret_cast<const uint32_t*>(ring + slot * kChunk)[lane];
    __syncwarp();
    const int next = slot == 0 ? 2 : slot - 1;  // (slot + 2) % 3
    stage(c + 2 * nw, next);
    commit();
    slot = slot == 2 ? 0 : slot + 1;
  }
  wait<0>();
  sink[blockIdx.x * 128 + threadIdx.x] = acc;
}
int main() {
  const int64_t chunks = (int64_t(1) << 30) / kChunk;
  uint8_t* src; uint32_t* sink;
  cudaMalloc(&src, chunks * kChunk + 256); cudaMemset(src, 1, chunks * kChunk + 256);
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaMalloc(&sink, sizeof(uint32_t) * sms * 4 * 128);
  const int smem = 4 * 3 * kChunk;
  cudaFuncSetAttribute(stream<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(stream<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  const int offsets[3] = {0, 64, 32};  // chunk starts at 0, 64 or 32 bytes past a 128-byte line
  for (int round = 0; round < 2; ++round)
    for (int v = 0; v < 4; ++v) {
      auto k = v == 1 ? stream<1> : stream<0>;
      const int off = v < 2 ? 0 : offsets[v - 1];
      k<<<sms * 4, 128, smem>>>(src, chunks, sink, off);
      cudaEventRecord(a);
      for (int r = 0; r < 10; ++r) k<<<sms * 4, 128, smem>>>(src, chunks, sink, off);
      cudaEventRecord(b); cudaEventSynchronize(b);
      float ms; cudaEventElapsedTime(&ms, a, b);
      printf("variant %d (offset %d): %.1f GB/s\n", v, off, chunks * kChunk * 10 / (ms * 1e6));
    }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
