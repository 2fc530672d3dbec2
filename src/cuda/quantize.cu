#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "api/cuda_backend.hpp"
#include "api/errors.hpp"
#include "cuda/common/check.cuh"
#include "cuda/common/head_dim.cuh"
#include "cuda/common/int8.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/quantize.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

namespace {

constexpr int kThreads = 256;  // transpose_codes_kernel
// The quantization kernels: one CTA of 128 threads per 64-token block of one head, which holds the
// block in registers (read once, in 16-byte loads where the layout allows), reduces its max |x|, and
// writes the codes from the registers.
constexpr int kQuantThreads = 128;

// Eight consecutive elements (16 bytes), loaded as one vector when kVector (16-byte aligned), else
// element by element.
template <typename T, bool kVector>
__device__ __forceinline__ uint4 load8(const T* p) {
  static_assert(sizeof(T) == 2, "fp16 or bf16");
  if constexpr (kVector) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    uint4 r;
    uint16_t* h = reinterpret_cast<uint16_t*>(&r);
#pragma unroll
    for (int e = 0; e < 8; ++e) h[e] = __ldg(reinterpret_cast<const unsigned short*>(p) + e);
    return r;
  }
}

// The eight values of `raw` (channels c0..c0 + 7) minus the shift, when there is one.
template <typename T>
__device__ __forceinline__ void values8(const uint4& raw, const float* shift, int c0, float (&f)[8]) {
  const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e] = shift ? __fsub_rn(to_float(x[e]), __ldg(shift + c0 + e)) : to_float(x[e]);
}

template <typename T>
__device__ __forceinline__ void accumulate_amax(const uint4& raw, const float* shift, int c0, float& amax, bool& finite) {
  float f[8];
  values8<T>(raw, shift, c0, f);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    finite = finite && isfinite(f[e]);
    amax = fmaxf(amax, fabsf(f[e]));
  }
}

// The block's 127 / amax (0 when the codes are all 0) from every thread's partial max |x| and
// finiteness, per the rules of ref::int8_scale; thread 0 writes the scale to *scale_out.
__device__ float block_inverse_scale(float amax, bool finite, float* scale_out) {
  __shared__ float warp_max[kQuantThreads / 32];
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  finite = __syncthreads_and(finite);
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const Int8Scale s = int8_block_scale(amax, finite);
  if (threadIdx.x == 0) *scale_out = s.scale;
  return s.inv;
}

template <typename T>
__device__ const T* block_source(const QuantizeArgs<T>& a, int block, int h, int b) {
  return a.x + b * a.xs.b + h * a.xs.h + int64_t(block) * TA_BLOCK_TOKENS * a.xs.n;
}

template <typename T>
__device__ const float* block_shift(const QuantizeArgs<T>& a, int h, int b) {
  return a.shift ? a.shift + b * a.shift_b + h * a.shift_h : nullptr;
}

// Token-major codes. Thread i's vectors are i + 128 v: token (i + 128 v) / (D / 8), channels 8 x the
// remainder, so a warp reads whole rows. kVector: x in 16-byte and the codes in 8-byte units.
template <typename T, int kDim, bool kVector>
__global__ void __launch_bounds__(kQuantThreads) quantize_int8_kernel(QuantizeArgs<T> a) {
  constexpr int kOctets = kDim / 8, kVecs = TA_BLOCK_TOKENS * kOctets / kQuantThreads;
  static_assert(TA_BLOCK_TOKENS * kOctets % kQuantThreads == 0, "whole vectors per thread");
  const int block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int rows = min(TA_BLOCK_TOKENS, a.tokens - block * TA_BLOCK_TOKENS);
  const T* x = block_source(a, block, h, b);
  const float* shift = block_shift(a, h, b);
  uint4 raw[kVecs];
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int i = threadIdx.x + kQuantThreads * v, r = i / kOctets;
    if (r < rows) raw[v] = load8<T, kVector>(x + int64_t(r) * a.xs.n + 8 * (i % kOctets));
  }
  float amax = 0.0f;
  bool finite = true;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int i = threadIdx.x + kQuantThreads * v;
    if (i / kOctets < rows) accumulate_amax<T>(raw[v], shift, 8 * (i % kOctets), amax, finite);
  }
  const float inv = block_inverse_scale(amax, finite, a.scales + b * a.scale_b + h * a.scale_h + block);
  int8_t* out = a.codes + b * a.cs.b + h * a.cs.h + int64_t(block) * TA_BLOCK_TOKENS * a.cs.n;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int i = threadIdx.x + kQuantThreads * v, r = i / kOctets, c0 = 8 * (i % kOctets);
    if (r >= rows) continue;
    float f[8];
    values8<T>(raw[v], shift, c0, f);
    uint2 codes;
    int8_t* c = reinterpret_cast<int8_t*>(&codes);
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = int8_code(f[e], inv);
    int8_t* dst = out + int64_t(r) * a.cs.n + c0;
    if constexpr (kVector) {
      *reinterpret_cast<uint2*>(dst) = codes;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = c[e];
    }
  }
}

// Channel-major codes (launch_quantize_int8_transposed). A task is 8 channels x the 4 keys of one
// 4-byte group of stored positions (vt_key), so each thread writes whole words, and the 16 tasks of a
// half-warp write one channel's 64 positions together. kVector: x in 16-byte units.
template <typename T, int kDim, bool kVector>
__global__ void __launch_bounds__(kQuantThreads) quantize_int8_transposed_kernel(QuantizeArgs<T> a, int padded_tokens) {
  constexpr int kGroups = TA_BLOCK_TOKENS / 4;  // 4-byte groups of positions in a channel's row
  constexpr int kTasks = kGroups * kDim / 8, kTasksPerThread = (kTasks + kQuantThreads - 1) / kQuantThreads;
  const int block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int rows = min(TA_BLOCK_TOKENS, a.tokens - block * TA_BLOCK_TOKENS);
  const T* x = block_source(a, block, h, b);
  uint4 raw[kTasksPerThread][4];
  float amax = 0.0f;
  bool finite = true;
#pragma unroll
  for (int k = 0; k < kTasksPerThread; ++k) {
    const int task = threadIdx.x + kQuantThreads * k, group = task % kGroups, c0 = 8 * (task / kGroups);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = vt_key(4 * group + e);
      if (task < kTasks && r < rows) {
        raw[k][e] = load8<T, kVector>(x + int64_t(r) * a.xs.n + c0);
        accumulate_amax<T>(raw[k][e], nullptr, c0, amax, finite);
      }
    }
  }
  const float inv = block_inverse_scale(amax, finite, a.scales + b * a.scale_b + h * a.scale_h + block);
  int8_t* out = a.codes + (int64_t(b) * a.heads + h) * kDim * padded_tokens + int64_t(block) * TA_BLOCK_TOKENS;
#pragma unroll
  for (int k = 0; k < kTasksPerThread; ++k) {
    const int task = threadIdx.x + kQuantThreads * k, group = task % kGroups, c0 = 8 * (task / kGroups);
    if (task >= kTasks) continue;
    uint32_t words[8] = {};  // channel c0 + j: the codes of positions 4 group .. 4 group + 3
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (vt_key(4 * group + e) >= rows) continue;  // past the sequence: code 0
      float f[8];
      values8<T>(raw[k][e], nullptr, c0, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) words[j] |= uint32_t(uint8_t(int8_code(f[j], inv))) << (8 * e);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) *reinterpret_cast<uint32_t*>(out + int64_t(c0 + j) * padded_tokens + 4 * group) = words[j];
  }
}

// Partial sums for launch_channel_mean: partial[((b * heads + h) * runs + run) * dim + c], one thread
// per 8 channels of a run (a warp reads whole rows across heads).
template <typename T, bool kVector>
__global__ void channel_partial_sum_kernel(const T* x, TokenStrides xs, int batch, int tokens, int heads, int dim, float* partial) {
  const int octets = dim / 8, runs = (tokens + kMeanRunTokens - 1) / kMeanRunTokens;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(batch) * runs * heads * octets) return;
  const int o = int(i % octets), h = int(i / octets % heads), run = int(i / (int64_t(octets) * heads) % runs);
  const int b = int(i / (int64_t(octets) * heads * runs));
  const T* src = x + b * xs.b + h * xs.h + 8 * o;
  float sum[8] = {};
  const int t1 = min(tokens, (run + 1) * kMeanRunTokens);
#pragma unroll 8
  for (int t = run * kMeanRunTokens; t < t1; ++t) {
    float f[8];
    values8<T>(load8<T, kVector>(src + int64_t(t) * xs.n), nullptr, 0, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] += f[e];
  }
  float* dst = partial + ((int64_t(b) * heads + h) * runs + run) * dim + 8 * o;
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = sum[e];
}

// mean[b][h][c] = the partials summed in run order / tokens.
__global__ void channel_mean_kernel(const float* partial, int runs, int tokens, int heads, int dim, float* mean) {
  const int h = blockIdx.x, b = blockIdx.y;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < runs; ++s) sum += partial[((int64_t(b) * heads + h) * runs + s) * dim + c];
    mean[(int64_t(b) * heads + h) * dim + c] = sum / float(tokens);
  }
}

// Writes a block's channel-major tile [dim][64] to out[((b * heads + h) * dim + c) * padded_tokens +
// 64 * block + position] in whole 16-byte chunks.
__device__ void store_transposed_tile(const int8_t* tile, int8_t* out, int b, int h, int block, int heads, int dim,
                                      int padded_tokens) {
  int8_t* dst = out + (int64_t(b) * heads + h) * dim * padded_tokens + int64_t(block) * TA_BLOCK_TOKENS;
  constexpr int kChunks = TA_BLOCK_TOKENS / 16;  // 16-byte chunks per channel row
  for (int i = threadIdx.x; i < dim * kChunks; i += kThreads) {
    const int c = i / kChunks, k = i % kChunks;
    *reinterpret_cast<int4*>(dst + int64_t(c) * padded_tokens + 16 * k) = *reinterpret_cast<const int4*>(tile + c * TA_BLOCK_TOKENS + 16 * k);
  }
}

// INT8 codes [B, N, H, D] (strided) to the channel-major layout of launch_quantize_int8_transposed.
__global__ void __launch_bounds__(kThreads) transpose_codes_kernel(const int8_t* __restrict__ codes, TokenStrides cs, int tokens,
                                                                     int heads, int dim, int8_t* __restrict__ out, int padded_tokens) {
  extern __shared__ int8_t tile[];  // [dim][TA_BLOCK_TOKENS]
  const int block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int t0 = block * TA_BLOCK_TOKENS, rows = min(TA_BLOCK_TOKENS, tokens - t0);
  const int8_t* src = codes + b * cs.b + h * cs.h + int64_t(t0) * cs.n;
  for (int i = threadIdx.x; i < TA_BLOCK_TOKENS * dim; i += kThreads) {
    const int r = i / dim, c = i % dim;
    tile[c * TA_BLOCK_TOKENS + vt_position(r)] = r < rows ? src[int64_t(r) * cs.n + c] : int8_t(0);
  }
  __syncthreads();
  store_transposed_tile(tile, out, b, h, block, heads, dim, padded_tokens);
}

template <typename T>
dim3 grid_of(const QuantizeArgs<T>& a) {
  const int blocks = TA_BLOCK_COUNT(a.tokens);
  require(a.heads <= 65535 && a.batch <= 65535, TA_ERROR_UNSUPPORTED, "x: ", a.batch, " sequences x ", a.heads,
          " heads exceeds the launch grid");
  return dim3{unsigned(blocks), unsigned(a.heads), unsigned(a.batch)};
}

// 16-byte loads need x's pointer and strides in whole 16-byte units (every layout torch makes at these
// head dims); other layouts take the element-wise path of the same kernels.
template <typename T>
bool vector_loads(const T* x, TokenStrides xs) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && xs.b % 8 == 0 && xs.n % 8 == 0 && xs.h % 8 == 0;
}

}  // namespace

template <typename T>
void launch_quantize_int8(const QuantizeArgs<T>& a, cudaStream_t stream) {
  if (a.batch == 0 || a.tokens == 0 || a.heads == 0) return;
  const bool vector = vector_loads(a.x, a.xs) && reinterpret_cast<uintptr_t>(a.codes) % 8 == 0 && a.cs.b % 8 == 0 &&
                      a.cs.n % 8 == 0 && a.cs.h % 8 == 0;
  with_head_dim(a.dim, "quantization kernel", [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const auto kernel = vector ? quantize_int8_kernel<T, D, true> : quantize_int8_kernel<T, D, false>;
    kernel<<<grid_of(a), kQuantThreads, 0, stream>>>(a);
  });
  TA_CUDA_CHECK_LAUNCH("quantize_int8_kernel");
}

template <typename T>
void launch_quantize_int8_transposed(const QuantizeArgs<T>& a, int padded_tokens, cudaStream_t stream) {
  if (a.batch == 0 || a.tokens == 0 || a.heads == 0) return;
  const bool vector = vector_loads(a.x, a.xs);
  with_head_dim(a.dim, "quantization kernel", [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const auto kernel = vector ? quantize_int8_transposed_kernel<T, D, true> : quantize_int8_transposed_kernel<T, D, false>;
    kernel<<<grid_of(a), kQuantThreads, 0, stream>>>(a, padded_tokens);
  });
  TA_CUDA_CHECK_LAUNCH("quantize_int8_transposed_kernel");
}

template <typename T>
void launch_channel_mean(const T* x, TokenStrides xs, int batch, int tokens, int heads, int dim, float* partial, float* mean,
                         cudaStream_t stream) {
  if (batch == 0 || tokens == 0 || heads == 0) return;
  const int runs = (tokens + kMeanRunTokens - 1) / kMeanRunTokens;
  const int64_t threads = int64_t(batch) * runs * heads * (dim / 8);
  const auto kernel = vector_loads(x, xs) ? channel_partial_sum_kernel<T, true> : channel_partial_sum_kernel<T, false>;
  kernel<<<unsigned((threads + 127) / 128), 128, 0, stream>>>(x, xs, batch, tokens, heads, dim, partial);
  TA_CUDA_CHECK_LAUNCH("channel_partial_sum_kernel");
  channel_mean_kernel<<<dim3{unsigned(heads), unsigned(batch)}, 128, 0, stream>>>(partial, runs, tokens, heads, dim, mean);
  TA_CUDA_CHECK_LAUNCH("channel_mean_kernel");
}

void launch_transpose_codes(const int8_t* codes, TokenStrides cs, int batch, int tokens, int heads, int dim, int8_t* out,
                            int padded_tokens, cudaStream_t stream) {
  if (batch == 0 || tokens == 0 || heads == 0) return;
  const dim3 grid{unsigned(TA_BLOCK_COUNT(tokens)), unsigned(heads), unsigned(batch)};
  transpose_codes_kernel<<<grid, kThreads, TA_BLOCK_TOKENS * dim, stream>>>(codes, cs, tokens, heads, dim, out, padded_tokens);
  TA_CUDA_CHECK_LAUNCH("transpose_codes_kernel");
}

template void launch_quantize_int8<__half>(const QuantizeArgs<__half>&, cudaStream_t);
template void launch_quantize_int8<__nv_bfloat16>(const QuantizeArgs<__nv_bfloat16>&, cudaStream_t);
template void launch_quantize_int8_transposed<__half>(const QuantizeArgs<__half>&, int, cudaStream_t);
template void launch_quantize_int8_transposed<__nv_bfloat16>(const QuantizeArgs<__nv_bfloat16>&, int, cudaStream_t);
template void launch_channel_mean<__half>(const __half*, TokenStrides, int, int, int, int, float*, float*, cudaStream_t);
template void launch_channel_mean<__nv_bfloat16>(const __nv_bfloat16*, TokenStrides, int, int, int, int, float*, float*,
                                                 cudaStream_t);

namespace {
template <typename T>
void quantize_public(const ta_tensor& x, const ta_tensor* shift, ta_tensor& codes, ta_tensor& scales, cudaStream_t s) {
  QuantizeArgs<T> a{};
  a.x = static_cast<const T*>(x.data);
  a.xs = {x.strides[0], x.strides[1], x.strides[2]};
  if (shift) a.shift = static_cast<const float*>(shift->data), a.shift_b = shift->strides[0], a.shift_h = shift->strides[1];
  a.codes = static_cast<int8_t*>(codes.data);
  a.cs = {codes.strides[0], codes.strides[1], codes.strides[2]};
  a.scales = static_cast<float*>(scales.data);
  a.scale_b = scales.strides[0], a.scale_h = scales.strides[1];
  require(scales.strides[2] == 1 || scales.shape[2] <= 1, TA_ERROR_INVALID_ARGUMENT, "scales: the last dimension must be contiguous");
  a.batch = int(x.shape[0]), a.tokens = int(x.shape[1]), a.heads = int(x.shape[2]), a.dim = int(x.shape[3]);
  launch_quantize_int8(a, s);
}
}  // namespace

void quantize_int8(const ta_tensor& x, const ta_tensor* shift, ta_tensor& codes, ta_tensor& scales, void* stream) {
  expect_device_pointer(x.data, "x");
  expect_device_pointer(codes.data, "codes");
  expect_device_pointer(scales.data, "scales");
  if (shift) expect_device_pointer(shift->data, "shift");
  require(x.shape[1] < (int64_t(1) << 30), TA_ERROR_UNSUPPORTED, "x: ", x.shape[1], " tokens: over 2^30 is not supported on CUDA");
  const auto s = static_cast<cudaStream_t>(stream);
  if (x.dtype == TA_DTYPE_F16) quantize_public<__half>(x, shift, codes, scales, s);
  else quantize_public<__nv_bfloat16>(x, shift, codes, scales, s);
}

}  // namespace turboattn::cuda
