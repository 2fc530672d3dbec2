// The sm_90a warpgroup INT8 matrix instruction against an integer matmul on the host: checks the
// descriptor, the K-major unswizzled shared-memory layout, the A register fragments and the
// accumulator layout that a Hopper prefill kernel would build on (src/cuda/sm90/wgmma.cuh).
// SKIPPED without a compute capability 9.0 device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "cuda/sm90/wgmma.cuh"

namespace {

using namespace turboattn::cuda::sm90;

constexpr int kM = 64, kN = 64, kK = 128;

// C[m][n] = sum_k A[m][k] * B[n][k]: one warpgroup, A from registers, B from shared memory.
template <bool kUnsignedA>
__global__ void wgmma_probe_kernel(const uint8_t* a, const int8_t* b, int32_t* c) {
  __shared__ __align__(128) int8_t s_b[kN * kK];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  for (int i = tid; i < kN * kK / 16; i += 128) {  // 16-byte chunks of B rows into core matrices
    const int n = i / (kK / 16), k = (i % (kK / 16)) * 16;
    *reinterpret_cast<int4*>(s_b + kmajor_offset(n, k, kK)) = *reinterpret_cast<const int4*>(b + n * kK + k);
  }
  fence_proxy_async_shared();
  __syncthreads();
  int32_t d[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) d[i] = 0;
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kK / 32; ++ks) {
    const uint8_t* r0 = a + (16 * warp + g) * kK + 32 * ks + 4 * t;
    const uint8_t* r1 = r0 + 8 * kK;
    const uint32_t frag[4] = {*reinterpret_cast<const uint32_t*>(r0), *reinterpret_cast<const uint32_t*>(r1),
                              *reinterpret_cast<const uint32_t*>(r0 + 16), *reinterpret_cast<const uint32_t*>(r1 + 16)};
    // A k-step of 32 bytes is two core matrices along K.
    const uint64_t desc = smem_descriptor(s_b + ks * 2 * 128, 128, 8 * kK);
    if constexpr (kUnsignedA) wgmma_m64n64k32_u8s8(d, frag, desc, 1);
    else wgmma_m64n64k32_s8s8(d, frag, desc, 1);
  }
  wgmma_commit_group();
  wgmma_wait_group<0>();
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) c[(16 * warp + g + 8 * (i / 2)) * kN + 8 * j + 2 * t + i % 2] = d[4 * j + i];
}

bool have_sm90() {
  int n = 0, major = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return false;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess && major == 9;
}

template <bool kUnsignedA>
void run_probe() {
  std::mt19937 rng(std::random_device{}());
  std::vector<uint8_t> a(kM * kK);
  std::vector<int8_t> b(kN * kK);
  for (auto& x : a) x = uint8_t(kUnsignedA ? rng() % 256 : int8_t(int(rng() % 255) - 127));
  for (auto& x : b) x = int8_t(int(rng() % 255) - 127);
  uint8_t* da;
  int8_t* db;
  int32_t* dc;
  ASSERT_EQ(cudaMalloc(&da, a.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&db, b.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dc, kM * kN * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(da, a.data(), a.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(db, b.data(), b.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dc, 0xFF, kM * kN * 4), cudaSuccess);
  wgmma_probe_kernel<kUnsignedA><<<1, 128>>>(da, db, dc);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<int32_t> c(kM * kN);
  ASSERT_EQ(cudaMemcpy(c.data(), dc, c.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  int wrong = 0;
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) {
      int32_t want = 0;
      for (int k = 0; k < kK; ++k) want += (kUnsignedA ? int(a[m * kK + k]) : int(int8_t(a[m * kK + k]))) * int(b[n * kK + k]);
      if (c[m * kN + n] != want && wrong++ < 5) ADD_FAILURE() << "C[" << m << "][" << n << "] = " << c[m * kN + n] << ", expected " << want;
    }
  EXPECT_EQ(wrong, 0);
  cudaFree(da), cudaFree(db), cudaFree(dc);
}

TEST(GpuWgmma, S8TimesS8MatchesTheHost) {
  if (!have_sm90()) GTEST_SKIP() << "needs a compute capability 9.0 device";
  run_probe<false>();
}

TEST(GpuWgmma, U8TimesS8MatchesTheHost) {
  if (!have_sm90()) GTEST_SKIP() << "needs a compute capability 9.0 device";
  run_probe<true>();
}

}  // namespace
