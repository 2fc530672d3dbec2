// Blockwise symmetric INT8 quantization of [B, N, H, D] (FlashQ compute format), bit-exact with
// ref::quantize_block_int8: every rounding is an explicit IEEE round-to-nearest-even operation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "api/cuda_backend.hpp"
#include "api/errors.hpp"
#include "common/check.cuh"
#include "common/numeric.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

namespace {

constexpr int kThreads = 256;

struct Strides4 {
  int64_t b, n, h;  // the last dim is contiguous
};

// One CTA quantizes one (batch, head, 64-token block): pass 1 finds amax, pass 2 writes the codes.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_int8_kernel(const T* __restrict__ x, Strides4 xs,
                                                                   const float* __restrict__ shift, Strides4 ss,
                                                                   int8_t* __restrict__ codes, Strides4 cs,
                                                                   float* __restrict__ scales, Strides4 scs, int tokens,
                                                                   int dim) {
  const int block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int t0 = block * TA_BLOCK_TOKENS;
  const int rows = min(TA_BLOCK_TOKENS, tokens - t0);
  const int count = rows * dim;
  const T* xb = x + b * xs.b + h * xs.h + int64_t(t0) * xs.n;
  const float* sh = shift ? shift + b * ss.b + h * ss.h : nullptr;
  auto load = [&](int i) {
    const int r = i / dim, c = i - r * dim;
    const float v = to_float(xb[int64_t(r) * xs.n + c]);
    return sh ? __fsub_rn(v, sh[c]) : v;
  };

  float amax = 0.0f;
  bool finite = true;
  for (int i = threadIdx.x; i < count; i += kThreads) {
    const float v = load(i);
    finite = finite && isfinite(v);
    amax = fmaxf(amax, fabsf(v));
  }
  __shared__ float warp_max[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  finite = __syncthreads_and(finite);
  amax = warp_max[0];
  for (int w = 1; w < kThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);

  // The scale rules of ref::int8_scale: NaN for a non-finite block, 0 for an all-zero block.
  float scale, inv = 0.0f;
  if (!finite) scale = __int_as_float(0x7fffffff);
  else if (amax < TA_ZERO_BLOCK_AMAX) scale = 0.0f;
  else scale = __fdiv_rn(amax, float(TA_INT8_MAX)), inv = __fdiv_rn(float(TA_INT8_MAX), amax);
  if (threadIdx.x == 0) scales[b * scs.b + h * scs.h + block * scs.n] = scale;

  int8_t* cb = codes + b * cs.b + h * cs.h + int64_t(t0) * cs.n;
  for (int i = threadIdx.x; i < count; i += kThreads) {
    const int r = i / dim, c = i - r * dim;
    int q = 0;
    if (inv != 0.0f) q = max(-TA_INT8_MAX, min(TA_INT8_MAX, __float2int_rn(__fmul_rn(load(i), inv))));
    cb[int64_t(r) * cs.n + c] = int8_t(q);
  }
}

Strides4 strides_bnh(const ta_tensor& t) { return {t.strides[0], t.strides[1], t.strides[2]}; }

}  // namespace

void quantize_int8(const ta_tensor& x, const ta_tensor* shift, ta_tensor& codes, ta_tensor& scales, void* stream) {
  expect_device_pointer(x.data, "x");
  expect_device_pointer(codes.data, "codes");
  expect_device_pointer(scales.data, "scales");
  if (shift) expect_device_pointer(shift->data, "shift");
  const int64_t B = x.shape[0], N = x.shape[1], H = x.shape[2], D = x.shape[3];
  const int64_t blocks = (N + TA_BLOCK_TOKENS - 1) / TA_BLOCK_TOKENS;
  if (B == 0 || N == 0 || H == 0) return;
  require(blocks <= 0x7fffffff && H <= 65535 && B <= 65535, TA_ERROR_UNSUPPORTED, "x: shape ", B, "x", N, "x", H,
          " exceeds the launch grid");
  // shift [B, H, D]: batch stride, (unused) token stride, head stride.
  const Strides4 ss = shift ? Strides4{shift->strides[0], 0, shift->strides[1]} : Strides4{0, 0, 0};
  // scales [B, H, blocks]: batch stride, block stride, head stride.
  const Strides4 scs{scales.strides[0], scales.strides[2], scales.strides[1]};
  const dim3 grid{unsigned(blocks), unsigned(H), unsigned(B)};
  auto s = static_cast<cudaStream_t>(stream);
  const float* sh = shift ? static_cast<const float*>(shift->data) : nullptr;
  auto* c = static_cast<int8_t*>(codes.data);
  auto* sc = static_cast<float*>(scales.data);
  if (x.dtype == TA_DTYPE_F16)
    quantize_int8_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __half*>(x.data), strides_bnh(x), sh, ss, c,
                                                   strides_bnh(codes), sc, scs, int(N), int(D));
  else
    quantize_int8_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x.data), strides_bnh(x), sh, ss, c,
                                                   strides_bnh(codes), sc, scs, int(N), int(D));
  TA_CUDA_CHECK_LAUNCH("quantize_int8_kernel");
}

}  // namespace turboattn::cuda
