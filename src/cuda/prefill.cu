// Host side of FlashQ + SAS prefill on CUDA: the quantization pre-pass (K mean, INT8 Q and K, INT8 V
// transposed), the attention kernel, dispatched by head dim and output dtype in one place.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "api/cuda_backend.hpp"
#include "api/errors.hpp"
#include "cuda/common/check.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/quantize.cuh"
#include "cuda/sm80/prefill_kernel.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

namespace {

constexpr int kMeanTokens = 256;  // tokens per partial sum of the K mean

// Partial per-channel sums of K over runs of kMeanTokens tokens: partial[b][h][split][c].
template <typename T>
__global__ void k_partial_sum_kernel(const T* k, TokenStrides ks, int tokens, int heads, int dim, float* partial) {
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.0f;
    const int t1 = min(tokens, (split + 1) * kMeanTokens);
    for (int t = split * kMeanTokens; t < t1; ++t) sum += to_float(k[b * ks.b + int64_t(t) * ks.n + h * ks.h + c]);
    partial[((int64_t(b) * heads + h) * splits + split) * dim + c] = sum;
  }
}

// mean[b][h][c] = sum of the partials (in order) / tokens.
__global__ void k_mean_kernel(const float* partial, int splits, int tokens, int heads, int dim, float* mean) {
  const int h = blockIdx.x, b = blockIdx.y;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[((int64_t(b) * heads + h) * splits + s) * dim + c];
    mean[(int64_t(b) * heads + h) * dim + c] = sum / float(tokens);
  }
}

// lse_offset[b][h][i] = softmax_scale * (q_i . mean of h's KV head): what K smoothing took from the
// row's log-sum-exp (docs/FORMATS.md, 1.4). One warp per row.
template <typename T>
__global__ void lse_offset_kernel(const T* q, TokenStrides qs, const float* mean, int nq, int hq, int hkv, int dim,
                                  float softmax_scale, float* offset) {
  const int row = blockIdx.x * 4 + threadIdx.x / 32, h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x % 32;
  if (row >= nq) return;
  const float* mu = mean + (int64_t(b) * hkv + h / (hq / hkv)) * dim;
  float dot = 0.0f;
  for (int c = lane; c < dim; c += 32) dot = fmaf(to_float(q[b * qs.b + int64_t(row) * qs.n + h * qs.h + c]), mu[c], dot);
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (lane == 0) offset[(int64_t(b) * hq + h) * nq + row] = softmax_scale * dot;
}

// Device scratch for one call, released on the stream when the call's work is done.
class Workspace {
 public:
  explicit Workspace(cudaStream_t s) : stream_(s) {}
  ~Workspace() {
    for (void* p : ptrs_) cudaFreeAsync(p, stream_);
  }
  template <typename T>
  T* get(int64_t count) {
    void* p = nullptr;
    TA_CUDA_CHECK(cudaMallocAsync(&p, size_t(std::max<int64_t>(count, 1)) * sizeof(T), stream_));
    ptrs_[n_++] = p;
    return static_cast<T*>(p);
  }

 private:
  cudaStream_t stream_;
  void* ptrs_[16] = {};
  int n_ = 0;
};

TokenStrides strides_of(const ta_tensor& t) { return {t.strides[0], t.strides[1], t.strides[2]}; }

template <int kHeadDim, typename Out>
void launch_prefill(const sm80::PrefillParams& p, bool sas, int batch, cudaStream_t stream) {
  using Tr = sm80::PrefillTraits<kHeadDim>;
  auto kernel = sas ? sm80::flashq_prefill_kernel<kHeadDim, Out, true> : sm80::flashq_prefill_kernel<kHeadDim, Out, false>;
  TA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid{unsigned((p.nq + Tr::kBlockM - 1) / Tr::kBlockM), unsigned(p.hq), unsigned(batch)};
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  TA_CUDA_CHECK_LAUNCH("flashq_prefill_kernel");
}

// The one place that maps (head dim, dtype) to a kernel instance.
template <typename Out>
void dispatch_head_dim(int dim, const sm80::PrefillParams& p, bool sas, int batch, cudaStream_t stream) {
  switch (dim) {
    case 64: return launch_prefill<64, Out>(p, sas, batch, stream);
    case 96: return launch_prefill<96, Out>(p, sas, batch, stream);
    case 128: return launch_prefill<128, Out>(p, sas, batch, stream);
    case 256: return launch_prefill<256, Out>(p, sas, batch, stream);
  }
  throw Error(TA_ERROR_UNSUPPORTED, concat("head dim ", dim, " has no CUDA kernel"));
}

template <typename T>
void attention_typed(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const ta_attention_options& o, ta_tensor& out,
                     ta_tensor* lse, cudaStream_t stream) {
  const int B = int(q.shape[0]), nq = int(q.shape[1]), hq = int(q.shape[2]), D = int(q.shape[3]);
  const int nk = int(k.shape[1]), hkv = int(k.shape[2]);
  const int q_blocks = (nq + TA_BLOCK_TOKENS - 1) / TA_BLOCK_TOKENS, k_blocks = (nk + TA_BLOCK_TOKENS - 1) / TA_BLOCK_TOKENS;
  const int nk_padded = k_blocks * TA_BLOCK_TOKENS;
  const float softmax_scale = o.softmax_scale > 0.0f ? o.softmax_scale : float(1.0 / std::sqrt(double(D)));
  Workspace ws(stream);
  int8_t* q8 = ws.get<int8_t>(int64_t(B) * hq * nq * D);
  int8_t* k8 = ws.get<int8_t>(int64_t(B) * hkv * nk * D);
  int8_t* vt8 = ws.get<int8_t>(int64_t(B) * hkv * D * nk_padded);
  float* q_scale = ws.get<float>(int64_t(B) * hq * q_blocks);
  float* k_scale = ws.get<float>(int64_t(B) * hkv * k_blocks);
  float* v_scale = ws.get<float>(int64_t(B) * hkv * k_blocks);
  float* mean = nullptr;
  float* lse_offset = nullptr;
  if (o.smooth_k && nk > 0) {
    const int splits = (nk + kMeanTokens - 1) / kMeanTokens;
    float* partial = ws.get<float>(int64_t(B) * hkv * splits * D);
    mean = ws.get<float>(int64_t(B) * hkv * D);
    k_partial_sum_kernel<<<dim3{unsigned(splits), unsigned(hkv), unsigned(B)}, 128, 0, stream>>>(
        static_cast<const T*>(k.data), strides_of(k), nk, hkv, D, partial);
    TA_CUDA_CHECK_LAUNCH("k_partial_sum_kernel");
    k_mean_kernel<<<dim3{unsigned(hkv), unsigned(B)}, 128, 0, stream>>>(partial, splits, nk, hkv, D, mean);
    TA_CUDA_CHECK_LAUNCH("k_mean_kernel");
    if (lse) {
      lse_offset = ws.get<float>(int64_t(B) * hq * nq);
      lse_offset_kernel<<<dim3{unsigned((nq + 3) / 4), unsigned(hq), unsigned(B)}, 128, 0, stream>>>(
          static_cast<const T*>(q.data), strides_of(q), mean, nq, hq, hkv, D, softmax_scale, lse_offset);
      TA_CUDA_CHECK_LAUNCH("lse_offset_kernel");
    }
  }
  auto args = [&](const ta_tensor& x, int tokens, int heads, const float* shift, int8_t* codes, float* scales, int blocks) {
    QuantizeArgs<T> a{};
    a.x = static_cast<const T*>(x.data);
    a.xs = strides_of(x);
    a.shift = shift, a.shift_b = int64_t(heads) * D, a.shift_h = D;
    a.codes = codes;
    a.cs = {int64_t(heads) * tokens * D, D, int64_t(tokens) * D};  // [B, H, N, D]
    a.scales = scales, a.scale_b = int64_t(heads) * blocks, a.scale_h = blocks;
    a.batch = B, a.tokens = tokens, a.heads = heads, a.dim = D;
    return a;
  };
  launch_quantize_int8(args(q, nq, hq, nullptr, q8, q_scale, q_blocks), stream);
  launch_quantize_int8(args(k, nk, hkv, mean, k8, k_scale, k_blocks), stream);
  launch_quantize_int8_transposed(args(v, nk, hkv, nullptr, vt8, v_scale, k_blocks), nk_padded, stream);

  sm80::PrefillParams p{};
  p.q = q8, p.k = k8, p.vt = vt8, p.q_scale = q_scale, p.k_scale = k_scale, p.v_scale = v_scale, p.lse_offset = lse_offset;
  p.out = out.data, p.out_b = out.strides[0], p.out_n = out.strides[1], p.out_h = out.strides[2];
  p.lse = lse ? static_cast<float*>(lse->data) : nullptr;
  p.hq = hq, p.hkv = hkv, p.nq = nq, p.nk = nk, p.nk_padded = nk_padded;
  p.scale_log2 = float(double(softmax_scale) * 1.4426950408889634);
  p.causal = o.causal != 0;
  if (nq > 0) dispatch_head_dim<T>(D, p, o.use_sas != 0, B, stream);
}

}  // namespace

void attention(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const ta_attention_options& options, ta_tensor& out,
               ta_tensor* lse, void* stream) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {static_cast<const ta_tensor*>(&out), "out"}})
    expect_device_pointer(t->data, name);
  if (lse) expect_device_pointer(lse->data, "lse");
  require(reinterpret_cast<uintptr_t>(out.data) % 4 == 0 && out.strides[0] % 2 == 0 && out.strides[1] % 2 == 0 &&
              out.strides[2] % 2 == 0,
          TA_ERROR_INVALID_ARGUMENT, "out: the CUDA kernel stores pairs of elements: the pointer must be 4-byte aligned and "
                                     "the strides even");
  if (lse)
    require(lse->strides[2] == 1 && lse->strides[1] == q.shape[1] && lse->strides[0] == q.shape[1] * q.shape[2],
            TA_ERROR_INVALID_ARGUMENT, "lse: must be contiguous on CUDA");
  require(q.shape[1] < (1 << 30) && k.shape[1] < (1 << 30), TA_ERROR_UNSUPPORTED, "sequence length over 2^30 tokens");
  const auto s = static_cast<cudaStream_t>(stream);
  if (q.dtype == TA_DTYPE_F16) attention_typed<__half>(q, k, v, options, out, lse, s);
  else attention_typed<__nv_bfloat16>(q, k, v, options, out, lse, s);
}

}  // namespace turboattn::cuda
