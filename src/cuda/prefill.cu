// Host side of FlashQ + SAS prefill on CUDA: the quantization pre-pass (K mean, INT8 Q and K, INT8 V
// transposed: quantize.cu), the attention kernel, dispatched by head dim and output dtype in one place.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "api/cuda_backend.hpp"
#include "api/errors.hpp"
#include "reference/attention.hpp"
#include "cuda/common/check.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/quantize.cuh"
#include "cuda/prefill/prefill_kernel.cuh"
#include "cuda/sm80/prefill_mma.cuh"
#include "cuda/sm90/prefill_kernel.cuh"
#include "turboattn/format.h"

namespace turboattn::cuda {

namespace {

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
    require(n_ < kSlots, TA_ERROR_INTERNAL, "workspace: more than ", kSlots, " allocations");
    TA_CUDA_CHECK(cudaMallocAsync(&p, size_t(std::max<int64_t>(count, 1)) * sizeof(T), stream_));
    ptrs_[n_++] = p;
    return static_cast<T*>(p);
  }

 private:
  static constexpr int kSlots = 16;
  cudaStream_t stream_;
  void* ptrs_[kSlots] = {};
  int n_ = 0;
};

TokenStrides strides_of(const ta_tensor& t) { return {t.strides[0], t.strides[1], t.strides[2]}; }

// The prefill kernel for a head dim on the current device: the warp-specialized Hopper kernel
// (sm90::flashq_prefill_ws_kernel) at head dims 64 and 128 on a compute capability 9.0 device when
// the build has sm_90a (on an H200 1.06-1.25x the mma.sync kernel at N >= 4k, 0.95-1.04x at 1k:
// docs/BENCHMARKS.md), else the mma.sync kernel (flashq_prefill_kernel over sm80::PrefillMma).
// TURBOATTN_PREFILL_MMA=sm80 or =sm90 forces one (sm90 where the Hopper kernel cannot run is an error,
// never a fallback). Both give the same bytes; tests and benchmarks compare them.
enum class PrefillPath { kMmaSync, kWarpSpecialized };

// Why the warp-specialized kernel cannot run here, or "" when it can.
std::string warp_specialized_unavailable(int dim) {
#ifndef TURBOATTN_HAVE_SM90A
  (void)dim;
  return "this build has no sm_90a code (add 90a to TURBOATTN_CUDA_ARCHS)";
#else
  int device = 0, major = 0;
  TA_CUDA_CHECK(cudaGetDevice(&device));
  TA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9) return concat("needs a compute capability 9.0 device; this one is ", major, ".x");
  if (dim != 64 && dim != 128) return concat("head dim ", dim, " has no warp-specialized kernel (64 and 128 do)");
  return "";
#endif
}

PrefillPath prefill_path(int dim) {
  const char* forced = std::getenv("TURBOATTN_PREFILL_MMA");
  if (!forced || !*forced) {
    return warp_specialized_unavailable(dim).empty() ? PrefillPath::kWarpSpecialized : PrefillPath::kMmaSync;
  }
  const std::string want = forced;
  require(want == "sm80" || want == "sm90", TA_ERROR_INVALID_ARGUMENT, "TURBOATTN_PREFILL_MMA=", want, ": expected sm80, sm90 or unset");
  if (want == "sm80") return PrefillPath::kMmaSync;
  const std::string why = warp_specialized_unavailable(dim);
  require(why.empty(), TA_ERROR_UNSUPPORTED, "TURBOATTN_PREFILL_MMA=sm90: ", why);
  return PrefillPath::kWarpSpecialized;
}

template <class Mma, typename Out, bool kSas>
void launch_prefill(const PrefillParams& p, int batch, cudaStream_t stream) {
  using Shape = PrefillShape<Mma::kHeadDim>;
  constexpr int smem = prefill_smem_bytes<Mma>();
  auto kernel = flashq_prefill_kernel<Mma, Out, kSas>;
  static std::atomic<uint64_t> configured{0};
  allow_dynamic_smem(configured, reinterpret_cast<const void*>(kernel), smem);
  const dim3 grid{unsigned((p.nq + Shape::kBlockM - 1) / Shape::kBlockM), unsigned(p.hq), unsigned(batch)};
  kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
  TA_CUDA_CHECK_LAUNCH("flashq_prefill_kernel");
}

template <int kHeadDim, typename Out, bool kSas>
void launch_prefill_ws(const PrefillParams& p, int batch, cudaStream_t stream) {
  if constexpr (kHeadDim == 64 || kHeadDim == 128) {
    using Tr = sm90::PrefillTraits<kHeadDim>;
    auto kernel = sm90::flashq_prefill_ws_kernel<kHeadDim, Out, kSas>;
    static std::atomic<uint64_t> configured{0};
    allow_dynamic_smem(configured, reinterpret_cast<const void*>(kernel), Tr::kSmemBytes);
    const int q_blocks = TA_BLOCK_COUNT(p.nq);
    const dim3 grid{unsigned((q_blocks + Tr::kConsumers - 1) / Tr::kConsumers), unsigned(p.hq), unsigned(batch)};
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    TA_CUDA_CHECK_LAUNCH("flashq_prefill_ws_kernel");
  } else {
    throw Error(TA_ERROR_INTERNAL, "no warp-specialized prefill kernel for this head dim");  // prefill_path rules it out
  }
}

template <int kHeadDim, typename Out>
void launch_prefill(const PrefillParams& p, bool sas, PrefillPath path, int batch, cudaStream_t stream) {
  if (path == PrefillPath::kWarpSpecialized)
    return sas ? launch_prefill_ws<kHeadDim, Out, true>(p, batch, stream) : launch_prefill_ws<kHeadDim, Out, false>(p, batch, stream);
  using Mma = sm80::PrefillMma<kHeadDim>;
  return sas ? launch_prefill<Mma, Out, true>(p, batch, stream) : launch_prefill<Mma, Out, false>(p, batch, stream);
}

// The one place that maps (head dim, dtype, kernel) to a kernel instance.
template <typename Out>
void dispatch_head_dim(int dim, const PrefillParams& p, bool sas, int batch, cudaStream_t stream) {
  const PrefillPath path = prefill_path(dim);
  switch (dim) {
    case 64: return launch_prefill<64, Out>(p, sas, path, batch, stream);
    case 96: return launch_prefill<96, Out>(p, sas, path, batch, stream);
    case 128: return launch_prefill<128, Out>(p, sas, path, batch, stream);
    case 256: return launch_prefill<256, Out>(p, sas, path, batch, stream);
  }
  throw Error(TA_ERROR_UNSUPPORTED, concat("head dim ", dim, " has no CUDA kernel"));
}

int blocks_of(int tokens) { return TA_BLOCK_COUNT(tokens); }

// Row pitch in bytes of a 2-D copy whose rows are `stride` bytes apart: rows must not overlap.
size_t pitch_of(int64_t stride, int64_t width, int64_t rows, const char* name) {
  if (rows <= 1) return size_t(width);
  require(stride >= width, TA_ERROR_INVALID_ARGUMENT, name, ": rows ", stride, " bytes apart overlap rows of ", width,
          " bytes; CUDA needs them apart");
  return size_t(stride);
}

// K and V in the kernel's compute format, with the K mean that smoothing subtracted (or null).
struct KvOperands {
  int8_t* k8;      // [B, Hkv, Nk, D]
  int8_t* vt8;     // [B, Hkv, D, nk_padded], keys permuted by vt_position
  float* k_scale;  // [B, Hkv, k_blocks]
  float* v_scale;  // [B, Hkv, k_blocks]
  const float* mean;  // [B, Hkv, D] or null
  int nk, hkv;
  int nk_padded() const { return blocks_of(nk) * TA_BLOCK_TOKENS; }
};

KvOperands allocate_kv(Workspace& ws, int batch, int hkv, int nk, int dim) {
  KvOperands kv{};
  kv.nk = nk, kv.hkv = hkv;
  kv.k8 = ws.get<int8_t>(int64_t(batch) * hkv * nk * dim);
  kv.vt8 = ws.get<int8_t>(int64_t(batch) * hkv * dim * kv.nk_padded());
  kv.k_scale = ws.get<float>(int64_t(batch) * hkv * blocks_of(nk));
  kv.v_scale = ws.get<float>(int64_t(batch) * hkv * blocks_of(nk));
  return kv;
}


template <typename T>
QuantizeArgs<T> quantize_args(const ta_tensor& x, const float* shift, int8_t* codes, float* scales) {
  const int B = int(x.shape[0]), tokens = int(x.shape[1]), heads = int(x.shape[2]), D = int(x.shape[3]);
  QuantizeArgs<T> a{};
  a.x = static_cast<const T*>(x.data);
  a.xs = strides_of(x);
  a.shift = shift, a.shift_b = int64_t(heads) * D, a.shift_h = D;
  a.codes = codes;
  a.cs = {int64_t(heads) * tokens * D, D, int64_t(tokens) * D};  // [B, H, N, D]
  a.scales = scales, a.scale_b = int64_t(heads) * blocks_of(tokens), a.scale_h = blocks_of(tokens);
  a.batch = B, a.tokens = tokens, a.heads = heads, a.dim = D;
  return a;
}

// Quantizes Q, then runs the kernel over kv.
template <typename T>
void run_attention(const ta_tensor& q, const KvOperands& kv, const ta_attention_options& o, ta_tensor& out, ta_tensor* lse,
                   Workspace& ws, cudaStream_t stream) {
  const int B = int(q.shape[0]), nq = int(q.shape[1]), hq = int(q.shape[2]), D = int(q.shape[3]);
  const float softmax_scale = ref::resolve_softmax_scale(o.softmax_scale, D);
  int8_t* q8 = ws.get<int8_t>(int64_t(B) * hq * nq * D);
  float* q_scale = ws.get<float>(int64_t(B) * hq * blocks_of(nq));
  launch_quantize_int8(quantize_args<T>(q, nullptr, q8, q_scale), stream);
  float* lse_offset = nullptr;
  if (lse && kv.mean) {
    lse_offset = ws.get<float>(int64_t(B) * hq * nq);
    lse_offset_kernel<<<dim3{unsigned((nq + 3) / 4), unsigned(hq), unsigned(B)}, 128, 0, stream>>>(
        static_cast<const T*>(q.data), strides_of(q), kv.mean, nq, hq, kv.hkv, D, softmax_scale, lse_offset);
    TA_CUDA_CHECK_LAUNCH("lse_offset_kernel");
  }
  PrefillParams p{};
  p.q = q8, p.k = kv.k8, p.vt = kv.vt8, p.q_scale = q_scale, p.k_scale = kv.k_scale, p.v_scale = kv.v_scale;
  p.lse_offset = lse_offset;
  p.out = out.data, p.out_b = out.strides[0], p.out_n = out.strides[1], p.out_h = out.strides[2];
  if (lse) p.lse = static_cast<float*>(lse->data), p.lse_b = lse->strides[0], p.lse_h = lse->strides[1];
  p.hq = hq, p.hkv = kv.hkv, p.nq = nq, p.nk = kv.nk, p.nk_padded = kv.nk_padded();
  p.scale_log2 = ref::scale_log2(softmax_scale);
  p.causal = o.causal != 0;
  if (nq > 0) dispatch_head_dim<T>(D, p, o.use_sas != 0, B, stream);
}

template <typename T>
void attention_typed(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const ta_attention_options& o, ta_tensor& out,
                     ta_tensor* lse, cudaStream_t stream) {
  const int B = int(q.shape[0]), D = int(q.shape[3]), nk = int(k.shape[1]), hkv = int(k.shape[2]);
  Workspace ws(stream);
  KvOperands kv = allocate_kv(ws, B, hkv, nk, D);
  float* mean = nullptr;
  if (o.smooth_k && nk > 0) {
    float* partial = ws.get<float>(mean_partial_count(B, nk, hkv, D));
    mean = ws.get<float>(int64_t(B) * hkv * D);
    launch_channel_mean(static_cast<const T*>(k.data), strides_of(k), B, nk, hkv, D, partial, mean, stream);
  }
  launch_quantize_int8(quantize_args<T>(k, mean, kv.k8, kv.k_scale), stream);
  launch_quantize_int8_transposed(quantize_args<T>(v, nullptr, kv.vt8, kv.v_scale), kv.nk_padded(), stream);
  kv.mean = mean;
  run_attention<T>(q, kv, o, out, lse, ws, stream);
}

// Over K and V already in the compute format (codes [B, Nk, Hkv, D], scales [B, Hkv, k_blocks]).
template <typename T>
void attention_int8kv_typed(const ta_tensor& q, const ta_tensor& kc, const ta_tensor& ks, const ta_tensor& vc, const ta_tensor& vs,
                            const ta_tensor* mean, const ta_attention_options& o, ta_tensor& out, ta_tensor* lse,
                            cudaStream_t stream) {
  const int B = int(q.shape[0]), D = int(q.shape[3]), nk = int(kc.shape[1]), hkv = int(kc.shape[2]), k_blocks = blocks_of(nk);
  Workspace ws(stream);
  KvOperands kv = allocate_kv(ws, B, hkv, nk, D);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < hkv; ++h)  // K rows of one (sequence, head) into [Nk, D]
      TA_CUDA_CHECK(cudaMemcpy2DAsync(kv.k8 + (int64_t(b) * hkv + h) * nk * D, D,
                                      static_cast<const int8_t*>(kc.data) + b * kc.strides[0] + h * kc.strides[2],
                                      pitch_of(kc.strides[1], D, nk, "k_codes"), D, nk, cudaMemcpyDeviceToDevice, stream));
    for (auto [src, dst, name] : {std::tuple{&ks, kv.k_scale, "k_scales"}, {&vs, kv.v_scale, "v_scales"}})
      TA_CUDA_CHECK(cudaMemcpy2DAsync(dst + int64_t(b) * hkv * k_blocks, k_blocks * 4,
                                      static_cast<const float*>(src->data) + b * src->strides[0],
                                      pitch_of(src->strides[1] * 4, k_blocks * 4, hkv, name), k_blocks * 4, hkv,
                                      cudaMemcpyDeviceToDevice, stream));
  }
  if (mean) {  // [B, Hkv, D], evenly strided over (batch, head) (checked by the caller)
    float* mu = ws.get<float>(int64_t(B) * hkv * D);
    TA_CUDA_CHECK(cudaMemcpy2DAsync(mu, D * 4, mean->data, pitch_of(mean->strides[1] * 4, D * 4, int64_t(B) * hkv, "k_mean"), D * 4,
                                    int64_t(B) * hkv, cudaMemcpyDeviceToDevice, stream));
    kv.mean = mu;
  }
  launch_transpose_codes(static_cast<const int8_t*>(vc.data), strides_of(vc), B, nk, hkv, D, kv.vt8, kv.nk_padded(), stream);
  run_attention<T>(q, kv, o, out, lse, ws, stream);
}

}  // namespace

namespace {
void check_pointers(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const ta_tensor& out, const ta_tensor* lse) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) expect_device_pointer(t->data, name);
  if (lse) expect_device_pointer(lse->data, "lse");
  const int r = out.ndim;
  require(reinterpret_cast<uintptr_t>(out.data) % 4 == 0 && out.strides[r - 2] % 2 == 0 && out.strides[r - 3] % 2 == 0 &&
              (r == 3 || out.strides[0] % 2 == 0),
          TA_ERROR_INVALID_ARGUMENT, "out: the CUDA kernel stores pairs of elements: the pointer must be 4-byte aligned and "
                                     "the strides even");
  if (lse) require(lse->strides[lse->ndim - 1] == 1, TA_ERROR_INVALID_ARGUMENT, "lse: the last dimension must be contiguous on CUDA");
}

// Sizes the kernels' int indices and launch grids hold; false when there is nothing to compute.
bool check_sizes(int64_t batch, int64_t q_heads, int64_t q_tokens, int64_t kv_heads, int64_t kv_tokens) {
  require(q_tokens < (int64_t(1) << 30) && kv_tokens < (int64_t(1) << 30), TA_ERROR_UNSUPPORTED,
          "sequence length over 2^30 tokens is not supported on CUDA");
  require(batch <= 65535 && q_heads <= 65535 && kv_heads <= 65535, TA_ERROR_UNSUPPORTED,
          "more than 65535 sequences or heads is not supported on CUDA");
  return batch > 0 && q_heads > 0 && q_tokens > 0;
}

template <typename T>
void dispatch_dtype(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const ta_attention_options& o, ta_tensor& out,
                    ta_tensor* lse, cudaStream_t s) {
  if (check_sizes(q.shape[0], q.shape[2], q.shape[1], k.shape[2], k.shape[1])) attention_typed<T>(q, k, v, o, out, lse, s);
}



// A [T, H, D] tensor's tokens [start, start + len) as a [1, len, H, D] tensor.
ta_tensor sequence_view(const ta_tensor& t, int64_t start, int64_t len) {
  ta_tensor v = t;
  v.ndim = 4;
  v.data = static_cast<char*>(t.data) + start * t.strides[0] * (t.dtype == TA_DTYPE_F32 ? 4 : 2);
  v.shape[0] = 1, v.shape[1] = len, v.shape[2] = t.shape[1], v.shape[3] = t.shape[2];
  v.strides[0] = len * t.strides[0], v.strides[1] = t.strides[0], v.strides[2] = t.strides[1], v.strides[3] = 1;
  return v;
}
}  // namespace

void attention(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const ta_attention_options& options, ta_tensor& out,
               ta_tensor* lse, void* stream) {
  check_pointers(q, k, v, out, lse);
  const auto s = static_cast<cudaStream_t>(stream);
  if (q.dtype == TA_DTYPE_F16) dispatch_dtype<__half>(q, k, v, options, out, lse, s);
  else dispatch_dtype<__nv_bfloat16>(q, k, v, options, out, lse, s);
}

void attention_varlen(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const std::vector<int32_t>& cu_q,
                      const std::vector<int32_t>& cu_k, const ta_attention_options& options, ta_tensor& out, ta_tensor* lse,
                      void* stream) {
  check_pointers(q, k, v, out, lse);
  const auto s = static_cast<cudaStream_t>(stream);
  // One launch sequence per sequence (prefill batches hold tens of sequences, each long enough to fill
  // the card's CTAs on its own).
  for (size_t b = 0; b + 1 < cu_q.size(); ++b) {
    const int64_t q0 = cu_q[b], nq = cu_q[b + 1] - q0, k0 = cu_k[b], nk = cu_k[b + 1] - k0;
    if (nq == 0) continue;
    const ta_tensor qs = sequence_view(q, q0, nq), ks = sequence_view(k, k0, nk), vs = sequence_view(v, k0, nk);
    ta_tensor os = sequence_view(out, q0, nq);
    ta_tensor ls{};
    if (lse) {  // lse [Hq, Tq]: this sequence's columns as [1, Hq, nq]
      ls = *lse;
      ls.ndim = 3;
      ls.data = static_cast<float*>(lse->data) + q0 * lse->strides[1];
      ls.shape[0] = 1, ls.shape[1] = lse->shape[0], ls.shape[2] = nq;
      ls.strides[0] = 0, ls.strides[1] = lse->strides[0], ls.strides[2] = 1;
    }
    if (q.dtype == TA_DTYPE_F16) dispatch_dtype<__half>(qs, ks, vs, options, os, lse ? &ls : nullptr, s);
    else dispatch_dtype<__nv_bfloat16>(qs, ks, vs, options, os, lse ? &ls : nullptr, s);
  }
}

void attention_int8kv(const ta_tensor& q, const ta_tensor& k_codes, const ta_tensor& k_scales, const ta_tensor& v_codes,
                       const ta_tensor& v_scales, const ta_tensor* k_mean, const ta_attention_options& options, ta_tensor& out,
                       ta_tensor* lse, void* stream) {
  check_pointers(q, k_codes, v_codes, out, lse);
  for (auto [t, name] : {std::pair{&k_scales, "k_scales"}, {&v_scales, "v_scales"}}) expect_device_pointer(t->data, name);
  if (k_mean) {
    expect_device_pointer(k_mean->data, "k_mean");
    require(k_mean->shape[0] <= 1 || k_mean->strides[0] == k_mean->shape[1] * k_mean->strides[1], TA_ERROR_INVALID_ARGUMENT,
            "k_mean: batch and head dimensions must be evenly strided on CUDA");
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (!check_sizes(q.shape[0], q.shape[2], q.shape[1], k_codes.shape[2], k_codes.shape[1])) return;
  if (q.dtype == TA_DTYPE_F16) attention_int8kv_typed<__half>(q, k_codes, k_scales, v_codes, v_scales, k_mean, options, out, lse, s);
  else attention_int8kv_typed<__nv_bfloat16>(q, k_codes, k_scales, v_codes, v_scales, k_mean, options, out, lse, s);
}

std::vector<int32_t> read_device_i32(const void* data, int64_t count, int64_t stride, void* stream) {
  expect_device_pointer(data, "cu_seqlens");
  require((count - 1) * stride < (int64_t(1) << 24), TA_ERROR_INVALID_ARGUMENT, "cu_seqlens: ", count, " entries ", stride,
          " apart span too much memory");
  std::vector<int32_t> strided(static_cast<size_t>((count - 1) * stride + 1));
  TA_CUDA_CHECK(cudaMemcpyAsync(strided.data(), data, strided.size() * 4, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream)));
  TA_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  std::vector<int32_t> values(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) values[size_t(i)] = strided[size_t(i * stride)];
  return values;
}

}  // namespace turboattn::cuda
