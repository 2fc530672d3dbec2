// The decode kernel's copy stream without its arithmetic: is the order in which a decode step reads the
// cache what holds it under the card's bandwidth? Each CTA is one (sequence, KV head, split) as in
// cache_decode_kernel, 4 warps, each warp taking every 4th tile of the split and staging its K half and
// then its V half (4-bit, D = 128: 4352 and 4224 bytes) through a three-slot cp.async ring, with the
// kernel's wait/commit order and shared-memory size (so the same 4 CTAs per SM). Layouts:
//   pages: the cache format (docs/FORMATS.md 3): a page holds a block of every head, 68,736 bytes at 8 heads;
//   heads: one pool per head (a head's K and V regions of a block, 8576 bytes, are that pool's page);
//   sweep: the same bytes read in address order, all warps of the grid together (copy_alignment.cu's
//          variant 0: the ceiling).
// Page tables: in order (as bench/decode.py's bulk write leaves them) or shuffled (a long-running server).
// `spin` adds that many clock cycles of busy waiting per half, standing in for the kernel's arithmetic
// (arguments: the spins to run, 0 and 1500 by default). H200s, 2026-11-27, three runs: 4.2-4.4 TB/s at
// every shape of B x context = 256k in every layout and table order; 3.2-3.4 TB/s, the kernel's, with 2000-3000
// cycles of spin per half (docs/BENCHMARKS.md, "Where the decode time goes at 5670718").
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o page_stream bench/page_stream.cu && ./page_stream [spin ...]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

namespace {

constexpr int kHeads = 8, kKeys = 64, kWarps = 4;
constexpr int kK = 4352, kV = 4224, kHead = kK + kV;  // a head's regions of one block (128-byte lines)
constexpr int kHeader = 128, kPage = kHeader + kHeads * kHead;
constexpr int kSmem = 56960;  // cache_decode_kernel's at 4 bits, D = 128, one row group
constexpr int kSlot = kK;

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void cp16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
template <int kBytes>
__device__ __forceinline__ void copy(uint32_t dst, const uint8_t* src, int lane) {
#pragma unroll
  for (int c = lane; c < kBytes / 16; c += 32) cp16(dst + 16 * c, src + 16 * c);
}

struct Params {
  const uint8_t* pool;
  const int32_t* tables;
  int width, tiles, splits, layout, spin;
  int64_t pool_pages;
  uint32_t* sink;
};

// Layout 0: pages of all heads; 1: a pool per head; 2: address order (CTA c reads the c-th share of the bytes).
__global__ void __launch_bounds__(128, 4) stream(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int split = blockIdx.x, hk = blockIdx.y, seq = blockIdx.z;
  const int per = (p.tiles + p.splits - 1) / p.splits;
  int begin = min(p.tiles, split * per), end = min(p.tiles, begin + per), step = kWarps;
  uint8_t* ring = smem + 2048 + warp * 13696 + 640;
  float* scales = reinterpret_cast<float*>(smem + 2048 + kWarps * 13696) + 8 * warp;
  const int64_t cta = (int64_t(seq) * gridDim.y + hk) * gridDim.x + split;
  if (p.layout == 2) {  // tiles n = warp of the grid + k warps of the grid, every head's block of every page
    const int64_t warps = int64_t(gridDim.x) * gridDim.y * gridDim.z * kWarps;
    begin = int(cta * kWarps), end = int(p.pool_pages * kHeads), step = int(warps);
  }
  auto source = [&](int j, bool v) -> const uint8_t* {
    if (p.layout == 2) return p.pool + int64_t(j) * kHead + (v ? kK : 0);
    const int64_t id = p.tables[int64_t(seq) * p.width + j];
    if (p.layout == 1) return p.pool + (hk * p.pool_pages + id) * kHead + (v ? kK : 0);
    return p.pool + id * kPage + kHeader + hk * kHead + (v ? kK : 0);
  };
  auto stage = [&](bool v, int slot, int j) {
    if (j >= end) return;
    const uint32_t dst = uint32_t(__cvta_generic_to_shared(ring + slot * kSlot));
    const uint8_t* src = source(j, v);
    if (!v) {
      copy<kK>(dst, src, lane);
      if (lane < 2 && p.layout == 0) {  // the head's two block scales from the page header, as the kernel's K half
        const uint8_t* page = src - kHeader - hk * kHead;
        cp4(uint32_t(__cvta_generic_to_shared(scales + 2 * slot + lane)), page + 4 * (lane * kHeads + hk));
      }
    } else {
      copy<kV>(dst, src, lane);
    }
  };
  auto work = [&](int slot) {
    uint32_t x = reinterpret_cast<const uint32_t*>(ring + slot * kSlot)[lane];
    if (p.spin > 0) {
      const long long t0 = clock64();
      while (clock64() - t0 < p.spin) x = x * 1664525u + 1013904223u;
    }
    return x;
  };
  uint32_t acc = 0;
  const int first = begin + warp;
  stage(false, 0, first), commit();
  stage(true, 1, first), commit();
  int k_slot = 0;
  for (int j = first; j < end; j += step) {
    const int v_slot = k_slot == 2 ? 0 : k_slot + 1, free_slot = v_slot == 2 ? 0 : v_slot + 1;
    wait<1>();
    __syncwarp();
    stage(false, free_slot, j + step), commit();
    acc ^= work(k_slot);
    wait<1>();
    __syncwarp();
    stage(true, k_slot, j + step), commit();
    acc ^= work(v_slot);
    __syncwarp();
    k_slot = free_slot;
  }
  wait<0>();
  p.sink[cta * 128 + threadIdx.x] = acc;
}

// The library's split count for a 4-bit layer (src/cuda/cache/device_cache.hpp, 4 CTAs per SM, 3 to fill).
int splits_for(int64_t ctas, int sms, int64_t tiles) {
  const int64_t slots = 4 * sms, fill = 3 * sms, most = std::max<int64_t>(1, tiles / 16);
  if (ctas <= slots) return int(std::clamp<int64_t>(std::min(slots, fill) / ctas, 1, most));
  int64_t best = 1, best_cost = INT64_MAX;
  for (int64_t r = (ctas + slots - 1) / slots; r < 64; ++r) {
    const int64_t s = std::clamp<int64_t>(r * slots / ctas, 1, most);
    const int64_t cost = (ctas * s + slots - 1) / slots * ((tiles + s - 1) / s + 4);
    if (cost < best_cost) best = s, best_cost = cost;
    if (s == most) break;
  }
  return int(best);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> spins;
  for (int i = 1; i < argc; ++i) spins.push_back(std::atoi(argv[i]));
  if (spins.empty()) spins = {0, 1500};
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  const int shapes[][2] = {{1, 32768}, {8, 32768}, {32, 8192}, {64, 4096}, {128, 2048}};
  const int64_t max_pages = 8 * 32768 / kKeys;  // 256k tokens
  uint8_t* pool;
  cudaMalloc(&pool, max_pages * kPage);
  cudaMemset(pool, 1, max_pages * kPage);
  uint32_t* sink;
  cudaMalloc(&sink, sizeof(uint32_t) * 128 * 1024 * 16);
  int32_t* tables;
  cudaMalloc(&tables, sizeof(int32_t) * max_pages);
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  const char* layouts[3] = {"pages", "heads", "sweep"};
  printf("batch x context, table, spin, layout: us, GB/s of region bytes\n");
  for (auto [batch, context] : shapes) {
    const int tiles = context / kKeys;
    const int64_t pages = int64_t(batch) * tiles;
    const int splits = splits_for(int64_t(batch) * kHeads, sms, tiles);
    for (int shuffled = 0; shuffled < 2; ++shuffled) {
      std::vector<int32_t> ids(pages);
      std::iota(ids.begin(), ids.end(), 0);
      if (shuffled) std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
      cudaMemcpy(tables, ids.data(), sizeof(int32_t) * pages, cudaMemcpyHostToDevice);
      for (int spin : spins)
        for (int layout = 0; layout < 3; ++layout) {
          if (shuffled && layout == 2) continue;
          const Params p{pool, tables, tiles, tiles, splits, layout, spin, pages, sink};
          const dim3 grid(splits, kHeads, batch);
          float best = 1e30f;
          for (int round = 0; round < 3; ++round) {
            stream<<<grid, 128, kSmem>>>(p);
            cudaEventRecord(a);
            for (int r = 0; r < 20; ++r) stream<<<grid, 128, kSmem>>>(p);
            cudaEventRecord(b);
            cudaEventSynchronize(b);
            float ms;
            cudaEventElapsedTime(&ms, a, b);
            best = std::min(best, ms / 20);
          }
          const double bytes = double(pages) * kHeads * kHead;
          printf("%d x %d (%d splits), %s, spin %d, %s: %.1f us, %.0f GB/s\n", batch, context, splits, shuffled ? "shuffled" : "in order",
                 spin, layouts[layout], best * 1e3, bytes / (best * 1e6));
        }
    }
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
