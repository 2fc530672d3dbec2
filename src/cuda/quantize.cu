#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "api/cuda_backend.hpp"
#include "api/errors.hpp"
#include "cuda/common/check.cuh"
#include "cuda/common/int8.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/quantize.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T>
struct BlockView {
  const T* x;
  const float* shift;
  int64_t token_stride;
  int rows, dim;
  __device__ float load(int r, int c) const {
    const float v = to_float(x[int64_t(r) * token_stride + c]);
    return shift ? __fsub_rn(v, shift[c]) : v;
  }
};

template <typename T>
__device__ BlockView<T> block_view(const QuantizeArgs<T>& a, int block, int h, int b) {
  const int t0 = block * TA_BLOCK_TOKENS;
  return {a.x + b * a.xs.b + h * a.xs.h + int64_t(t0) * a.xs.n, a.shift ? a.shift + b * a.shift_b + h * a.shift_h : nullptr,
          a.xs.n, min(TA_BLOCK_TOKENS, a.tokens - t0), a.dim};
}

// The block's scale and 127 / amax (0 when the codes are all 0), per the rules of ref::int8_scale.
// Called by every thread of the CTA; writes the scale to *scale_out from thread 0.
template <typename T>
__device__ float block_inverse_scale(const BlockView<T>& v, float* scale_out) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = threadIdx.x; i < v.rows * v.dim; i += kThreads) {
    const float x = v.load(i / v.dim, i % v.dim);
    finite = finite && isfinite(x);
    amax = fmaxf(amax, fabsf(x));
  }
  __shared__ float warp_max[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  finite = __syncthreads_and(finite);
  amax = warp_max[0];
  for (int w = 1; w < kThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const Int8Scale s = int8_block_scale(amax, finite);
  if (threadIdx.x == 0) *scale_out = s.scale;
  return s.inv;
}

// One CTA per (block of 64 tokens, head, batch).
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_int8_kernel(QuantizeArgs<T> a) {
  const int block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const BlockView<T> v = block_view(a, block, h, b);
  const float inv = block_inverse_scale(v, a.scales + b * a.scale_b + h * a.scale_h + block);
  int8_t* out = a.codes + b * a.cs.b + h * a.cs.h + int64_t(block) * TA_BLOCK_TOKENS * a.cs.n;
  for (int i = threadIdx.x; i < v.rows * v.dim; i += kThreads) {
    const int r = i / v.dim, c = i % v.dim;
    out[int64_t(r) * a.cs.n + c] = int8_code(v.load(r, c), inv);
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

// As above, but the codes go channel-major (keys permuted by vt_position) through shared memory,
// so that the writes are whole 64-byte rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_int8_transposed_kernel(QuantizeArgs<T> a, int padded_tokens) {
  extern __shared__ int8_t tile[];  // [dim][TA_BLOCK_TOKENS]
  const int block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const BlockView<T> v = block_view(a, block, h, b);
  const float inv = block_inverse_scale(v, a.scales + b * a.scale_b + h * a.scale_h + block);
  for (int i = threadIdx.x; i < TA_BLOCK_TOKENS * v.dim; i += kThreads) {
    const int r = i / v.dim, c = i % v.dim;
    tile[c * TA_BLOCK_TOKENS + vt_position(r)] = r < v.rows ? int8_code(v.load(r, c), inv) : int8_t(0);
  }
  __syncthreads();
  store_transposed_tile(tile, a.codes, b, h, block, a.heads, a.dim, padded_tokens);
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

}  // namespace

template <typename T>
void launch_quantize_int8(const QuantizeArgs<T>& a, cudaStream_t stream) {
  if (a.batch == 0 || a.tokens == 0 || a.heads == 0) return;
  quantize_int8_kernel<<<grid_of(a), kThreads, 0, stream>>>(a);
  TA_CUDA_CHECK_LAUNCH("quantize_int8_kernel");
}

template <typename T>
void launch_quantize_int8_transposed(const QuantizeArgs<T>& a, int padded_tokens, cudaStream_t stream) {
  if (a.batch == 0 || a.tokens == 0 || a.heads == 0) return;
  const int smem = TA_BLOCK_TOKENS * a.dim;
  quantize_int8_transposed_kernel<<<grid_of(a), kThreads, smem, stream>>>(a, padded_tokens);
  TA_CUDA_CHECK_LAUNCH("quantize_int8_transposed_kernel");
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
