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
// (arguments: the spins to run, 0 and 1500 by default); `reads=a,b,..` also reads each staged half
// from shared memory that many times first (16-byte loads, each lane its own chunks), standing in for
// the kernel's shared-memory loads. H200s, 2026-11-27, four runs: 4.2-4.4 TB/s at
// every shape of B x context = 256k in every layout and table order; 3.2-3.4 TB/s, the kernel's, with 2000-3000
// cycles of spin per half (docs/BENCHMARKS.md, "Where the decode time goes at 5670718"); with spin 2000,
// reads=4 costs at most 6% (3.76-3.96 TB/s at 8 x 32k, 64 x 4k, 128 x 2k; "What holds 4-bit decode").
//
// The layout, the ring, the shared-memory size and the split count are the library's own (cache_layout.h,
// DecodeTraits, automatic_decode_splits).
//
//   nvcc -O3 -std=c++17 -Iinclude -Isrc -gencode=arch=compute_90a,code=sm_90a -o page_stream bench/page_stream.cu
//   ./page_stream [spin ...] [reads=n,...]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/cache/decode_kernel.cuh"
#include "cuda/cache/device_cache.hpp"
#include "format/cache_layout.h"

namespace {

using namespace turboattn;
using namespace turboattn::cuda;
constexpr int kDim = 128, kHeads = 8, kBits = TA_BITS_4, kGroups = 1;
using Tr = DecodeTraits<kDim>;
constexpr int kK = HalfCopies<kDim, kBits>::kRegion[0], kV = HalfCopies<kDim, kBits>::kRegion[1];
constexpr int64_t kHead = page_aligned(kK) + page_aligned(kV);  // a head's regions of one block

struct Params {
  const uint8_t* pool;
  const int32_t* tables;
  PageLayout layout;
  int width, tiles, splits, kind, spin, reads;
  int64_t pool_pages;
  uint32_t* sink;
};

// kind 0: pages of all heads; 1: a pool per head; 2: address order (every head's block of every page, the
// grid's warps together).
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksPerSmPacked) stream(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int split = blockIdx.x, hk = blockIdx.y, seq = blockIdx.z;
  const int per = (p.tiles + p.splits - 1) / p.splits;
  int begin = min(p.tiles, split * per), end = min(p.tiles, begin + per), step = Tr::kWarps;
  uint8_t* ring = smem + Tr::kQBytes + warp * Tr::warp_bytes(kGroups, kBits) + Tr::warp_fixed_bytes(kGroups, kBits);
  float* scales = reinterpret_cast<float*>(smem + Tr::scales_offset(kGroups, kBits) + warp * Tr::kScaleBytes);
  const int64_t cta = (int64_t(seq) * gridDim.y + hk) * gridDim.x + split;
  if (p.kind == 2) {
    const int64_t warps = int64_t(gridDim.x) * gridDim.y * gridDim.z * Tr::kWarps;
    begin = int(cta * Tr::kWarps), end = int(p.pool_pages * kHeads), step = int(warps);
  }
  auto page_of = [&](int j) { return p.pool + p.tables[int64_t(seq) * p.width + j] * p.layout.page_bytes; };
  auto source = [&](int j, bool v) -> const uint8_t* {
    if (p.kind == 2) return p.pool + j * kHead + (v ? kK : 0);
    if (p.kind == 1) return p.pool + (hk * p.pool_pages + p.tables[int64_t(seq) * p.width + j]) * kHead + (v ? kK : 0);
    return page_of(j) + (v ? p.layout.v_offset[hk] : p.layout.k_offset[hk]);
  };
  auto stage = [&](bool v, int slot, int j) {
    if (j >= end) return;
    const uint32_t dst = uint32_t(__cvta_generic_to_shared(ring + slot * Tr::half_bytes(kBits))) + 16 * lane;
    const uint8_t* src = source(j, v) + 16 * lane;
    if (!v) {
      stage_bytes_async<kK>(dst, src, lane);
      if (p.kind == 0) {  // the head's two block scales from the page header, as the kernel's K half
        if (lane == 0) cp_async_4(scales + 2 * slot, page_of(j) + page_k_scale_offset(hk));
        if (lane == 1) cp_async_4(scales + 2 * slot + 1, page_of(j) + page_v_scale_offset(kHeads, hk));
      }
    } else {
      stage_bytes_async<kV>(dst, src, lane);
    }
  };
  auto work = [&](int slot) {
    uint32_t x = reinterpret_cast<const uint32_t*>(ring + slot * Tr::half_bytes(kBits))[lane];
    const uint32_t half = uint32_t(__cvta_generic_to_shared(ring + slot * Tr::half_bytes(kBits)));
    for (int r = 0; r < p.reads; ++r)  // volatile: every pass is a load
#pragma unroll
      for (int i = 0; i < kV / 512; ++i) {
        uint32_t a, b, c, d;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "r"(half + 16 * (lane + 32 * i)));
        x ^= (a + b) ^ (c + d) ^ uint32_t(r);
      }
    if (p.spin > 0) {
      const long long t0 = clock64();
      while (clock64() - t0 < p.spin) x = x * 1664525u + 1013904223u;
    }
    return x;
  };
  uint32_t acc = 0;
  const int first = begin + warp;
  stage(false, 0, first), cp_async_commit();
  stage(true, 1, first), cp_async_commit();
  int k_slot = 0;
  for (int j = first; j < end; j += step) {
    const int v_slot = HalfCopies<kDim, kBits>::next_slot(k_slot), free_slot = HalfCopies<kDim, kBits>::next_slot(v_slot);
    cp_async_wait<1>();
    __syncwarp();
    stage(false, free_slot, j + step), cp_async_commit();
    acc ^= work(k_slot);
    cp_async_wait<1>();
    __syncwarp();
    stage(true, k_slot, j + step), cp_async_commit();
    acc ^= work(v_slot);
    __syncwarp();
    k_slot = free_slot;
  }
  cp_async_wait<0>();
  p.sink[cta * Tr::kThreads + threadIdx.x] = acc;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> spins, reads_list = {0};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("reads=", 0) == 0) {
      reads_list.clear();
      std::istringstream list(arg.substr(6));
      for (std::string n; std::getline(list, n, ',');) reads_list.push_back(std::atoi(n.c_str()));
    } else {
      spins.push_back(std::atoi(argv[i]));
    }
  }
  if (spins.empty()) spins = {0, 1500};
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  constexpr int kSmem = Tr::smem_bytes(kGroups, kBits);  // the decode kernel's (so as many CTAs per SM)
  cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  int ctas_per_sm;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, stream, Tr::kThreads, kSmem);
  int bits[kHeads];
  std::fill(bits, bits + kHeads, kBits);
  const PageLayout layout = make_page_layout(bits, kHeads, kDim);
  const int shapes[][2] = {{1, 32768}, {8, 32768}, {32, 8192}, {64, 4096}, {128, 2048}};
  const int64_t max_pages = 8 * 32768 / Tr::kKeys;  // 256k tokens
  uint8_t* pool;
  cudaMalloc(&pool, max_pages * layout.page_bytes);
  cudaMemset(pool, 1, max_pages * layout.page_bytes);
  uint32_t* sink;
  cudaMalloc(&sink, sizeof(uint32_t) * Tr::kThreads * 1024 * 16);
  int32_t* tables;
  cudaMalloc(&tables, sizeof(int32_t) * max_pages);
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  const char* layouts[3] = {"pages", "heads", "sweep"};
  printf("batch x context, table, spin, layout: us, GB/s of region bytes\n");
  for (auto [batch, context] : shapes) {
    const int tiles = context / Tr::kKeys;
    const int64_t pages = int64_t(batch) * tiles;
    const int splits =
        automatic_decode_splits(int64_t(batch) * kHeads, int64_t(ctas_per_sm) * sms, int64_t(kDecodeFillCtasPerSm) * sms, tiles);
    for (int shuffled = 0; shuffled < 2; ++shuffled) {
      std::vector<int32_t> ids(pages);
      std::iota(ids.begin(), ids.end(), 0);
      if (shuffled) std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
      cudaMemcpy(tables, ids.data(), sizeof(int32_t) * pages, cudaMemcpyHostToDevice);
      for (int spin : spins)
        for (int reads : reads_list)
          for (int kind = 0; kind < 3; ++kind) {
            if (shuffled && kind == 2) continue;
            const Params p{pool, tables, layout, tiles, tiles, splits, kind, spin, reads, pages, sink};
            const dim3 grid(splits, kHeads, batch);
            float best = 1e30f;
            for (int round = 0; round < 3; ++round) {
              stream<<<grid, Tr::kThreads, kSmem>>>(p);
              cudaEventRecord(a);
              for (int r = 0; r < 20; ++r) stream<<<grid, Tr::kThreads, kSmem>>>(p);
              cudaEventRecord(b);
              cudaEventSynchronize(b);
              float ms;
              cudaEventElapsedTime(&ms, a, b);
              best = std::min(best, ms / 20);
            }
            const double bytes = double(pages) * kHeads * kHead;
            printf("%d x %d (%d splits), %s, spin %d, reads %d, %s: %.1f us, %.0f GB/s\n", batch, context, splits,
                   shuffled ? "shuffled" : "in order", spin, reads, layouts[kind], best * 1e3, bytes / (best * 1e6));
          }
    }
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
