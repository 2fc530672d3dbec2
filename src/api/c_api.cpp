// The C API: argument validation, then dispatch to the CPU reference or the CUDA kernels.
#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cuda_backend.hpp"
#include "errors.hpp"
#include "reference/attention.hpp"
#include "reference/head_bits.hpp"
#include "reference/kv_cache.hpp"
#include "tensor_args.hpp"
#include "turboattn/turboattn.h"
#ifdef TURBOATTN_WITH_CUDA
#include "cuda/cache/device_cache.hpp"
#endif

namespace turboattn {

namespace {
thread_local std::string g_last_error;

#ifdef TURBOATTN_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
constexpr const char* kBuiltWithCudaText = "";
#else
constexpr bool kBuiltWithCuda = false;
constexpr const char* kBuiltWithCudaText = " (built without CUDA)";
#endif

// The one message for CUDA tensors this build cannot serve.
[[noreturn, maybe_unused]] void no_cuda_path(const char* what) {
  throw Error(TA_ERROR_UNSUPPORTED, concat(what, " on CUDA tensors is not available in this build",
                                           kBuiltWithCudaText, "; use CPU tensors"));
}

void check_softmax_scale(float scale, const char* name) {
  require(std::isfinite(scale) && scale >= 0.0f, TA_ERROR_INVALID_ARGUMENT, name, ": ", scale,
          " is not a finite non-negative number (0 selects 1/sqrt(D))");
}

// lse: f32 of the given shape on `device`, when given.
void check_lse(const ta_tensor* lse_, ta_device device, std::initializer_list<int64_t> shape) {
  if (!lse_) return;
  const ta_tensor& lse = check_tensor(lse_, "lse");
  expect_dtype(lse, "lse", {TA_DTYPE_F32});
  expect_device(lse, "lse", device);
  expect_shape(lse, "lse", shape);
}


// Shapes of an attention call, batched ([B, N, H, D]) or variable-length ([T, H, D] + cu_seqlens).
struct AttentionShape {
  int64_t batch = 0, hq = 0, hkv = 0, dim = 0, total_q = 0, total_k = 0;
  bool varlen = false;
  std::vector<int64_t> q_start, q_len, k_start, k_len;
  std::vector<int32_t> cu_q, cu_k;  // variable length only
};

// Cumulative lengths on the CPU, or on CUDA (copied to the host: the call synchronizes its stream).
std::vector<int32_t> cu_seqlens_values(const ta_tensor* t_, const char* name, int64_t total, void* stream) {
  const ta_tensor& t = check_tensor(t_, name);
  if (t.device == TA_DEVICE_CPU) return read_cu_seqlens(t, name, total);
  check_cu_seqlens_tensor(t, name);
#ifdef TURBOATTN_WITH_CUDA
  std::vector<int32_t> cu = cuda::read_device_i32(t.data, t.shape[0], t.strides[0], stream);
  validate_cu_seqlens(cu, name, total);
  return cu;
#else
  (void)stream;
  no_cuda_path(name);
#endif
}

AttentionShape check_attention(const ta_tensor* q_, const ta_tensor* k_, const ta_tensor* v_, const ta_tensor* cu_q_,
                               const ta_tensor* cu_k_, const ta_tensor* out_, const ta_tensor* lse_,
                               bool allow_cuda, void* stream = nullptr) {
  const ta_tensor& q = check_tensor(q_, "q");
  const ta_tensor& k = check_tensor(k_, "k");
  const ta_tensor& v = check_tensor(v_, "v");
  const ta_tensor& out = check_tensor(out_, "out");
  expect_dtype(q, "q", {TA_DTYPE_F16, TA_DTYPE_BF16});
  expect_dtype(k, "k", {q.dtype});
  expect_dtype(v, "v", {q.dtype});
  expect_dtype(out, "out", {q.dtype});
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) {
    expect_device(*t, name, allow_cuda ? q.device : TA_DEVICE_CPU);
    expect_last_dim_contiguous(*t, name);
  }
  AttentionShape s;
  s.varlen = cu_q_ != nullptr || cu_k_ != nullptr;
  const int r = s.varlen ? 3 : 4;
  expect_rank(q, "q", r);
  expect_rank(k, "k", r);
  s.dim = q.shape[r - 1];
  s.hq = q.shape[r - 2];
  s.hkv = k.shape[r - 2];
  expect_head_dim(s.dim, "q");
  require(k.shape[r - 1] == s.dim, TA_ERROR_INVALID_ARGUMENT, "k: head dim ", k.shape[r - 1], " differs from q's ", s.dim);
  require(s.hkv > 0 && s.hq > 0 && s.hq % s.hkv == 0, TA_ERROR_INVALID_ARGUMENT, "q: ", s.hq,
          " query heads is not a positive multiple of k's ", s.hkv, " KV heads");
  if (s.varlen) {
    require(cu_q_ && cu_k_, TA_ERROR_INVALID_ARGUMENT, "cu_seqlens_q and cu_seqlens_k must be given together");
    s.total_q = q.shape[0];
    s.total_k = k.shape[0];
    s.cu_q = cu_seqlens_values(cu_q_, "cu_seqlens_q", s.total_q, stream);
    s.cu_k = cu_seqlens_values(cu_k_, "cu_seqlens_k", s.total_k, stream);
    const std::vector<int32_t>& cq = s.cu_q;
    const std::vector<int32_t>& ck = s.cu_k;
    require(cq.size() == ck.size(), TA_ERROR_INVALID_ARGUMENT, "cu_seqlens_q has ", cq.size(), " entries but cu_seqlens_k has ",
            ck.size());
    s.batch = int64_t(cq.size()) - 1;
    for (int64_t b = 0; b < s.batch; ++b) {
      s.q_start.push_back(cq[size_t(b)]), s.q_len.push_back(cq[size_t(b) + 1] - cq[size_t(b)]);
      s.k_start.push_back(ck[size_t(b)]), s.k_len.push_back(ck[size_t(b) + 1] - ck[size_t(b)]);
    }
    expect_shape(v, "v", {s.total_k, s.hkv, s.dim});
    expect_shape(out, "out", {s.total_q, s.hq, s.dim});
  } else {
    s.batch = q.shape[0];
    require(k.shape[0] == s.batch, TA_ERROR_INVALID_ARGUMENT, "k: batch ", k.shape[0], " differs from q's ", s.batch);
    for (int64_t b = 0; b < s.batch; ++b) {
      s.q_start.push_back(b * q.shape[1]), s.q_len.push_back(q.shape[1]);
      s.k_start.push_back(b * k.shape[1]), s.k_len.push_back(k.shape[1]);
    }
    s.total_q = s.batch * q.shape[1];
    s.total_k = s.batch * k.shape[1];
    expect_shape(v, "v", {s.batch, k.shape[1], s.hkv, s.dim});
    expect_shape(out, "out", {s.batch, q.shape[1], s.hq, s.dim});
  }
  if (s.varlen) check_lse(lse_, q.device, {s.hq, s.total_q});
  else check_lse(lse_, q.device, {s.batch, s.hq, q.shape[1]});
  return s;
}

ref::HeadsView view(const std::vector<float>& data, int64_t start, int64_t tokens, int64_t heads, int64_t dim) {
  ref::HeadsView h;
  h.data = data.data() + start * heads * dim;
  h.tokens = int(tokens), h.heads = int(heads), h.dim = int(dim);
  h.head_stride = dim;
  h.token_stride = heads * dim;
  return h;
}

// Runs fn(b, q, k, v, out_floats, lse_floats) per sequence on float copies, then writes out and lse.
template <class Fn>
void run_attention_cpu(const AttentionShape& s, const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, ta_tensor& out,
                       ta_tensor* lse, Fn&& fn) {
  const std::vector<float> qf = to_float(q), kf = to_float(k), vf = to_float(v);
  std::vector<float> of(static_cast<size_t>(s.total_q * s.hq * s.dim));
  std::vector<float> lf(lse ? size_t(s.total_q * s.hq) : 0);
  for (int64_t b = 0; b < s.batch; ++b) {
    std::vector<float> seq_lse(size_t(s.hq * s.q_len[size_t(b)]));
    fn(view(qf, s.q_start[size_t(b)], s.q_len[size_t(b)], s.hq, s.dim), view(kf, s.k_start[size_t(b)], s.k_len[size_t(b)], s.hkv, s.dim),
       view(vf, s.k_start[size_t(b)], s.k_len[size_t(b)], s.hkv, s.dim), of.data() + s.q_start[size_t(b)] * s.hq * s.dim,
       seq_lse.data());
    if (!lse) continue;
    for (int64_t h = 0; h < s.hq; ++h)
      for (int64_t i = 0; i < s.q_len[size_t(b)]; ++i) {
        const size_t dst = s.varlen ? size_t(h * s.total_q + s.q_start[size_t(b)] + i)
                                    : size_t((b * s.hq + h) * s.q_len[size_t(b)] + i);
        lf[dst] = seq_lse[size_t(h * s.q_len[size_t(b)] + i)];
      }
  }
  from_float(of, out);
  if (lse) from_float(lf, *lse);
}
}  // namespace

void set_last_error(const std::string& message) { g_last_error = message; }

}  // namespace turboattn

// A cache on the CPU (the reference) or on CUDA; the C API validates against its config and book.
struct ta_cache {
  ta_device device = TA_DEVICE_CPU;
  std::unique_ptr<turboattn::ref::KvCache> host;
#ifdef TURBOATTN_WITH_CUDA
  std::unique_ptr<turboattn::cuda::DeviceCache> gpu;
  const turboattn::ref::CacheConfig& config() const { return gpu ? gpu->config() : host->config(); }
  const turboattn::PageBook& book() const { return gpu ? gpu->book() : host->book(); }
  turboattn::PageBook& book() { return gpu ? gpu->book() : host->book(); }
  const turboattn::PageLayout& layout(int l) const { return gpu ? gpu->layout(l) : host->layout(l); }
#else
  const turboattn::ref::CacheConfig& config() const { return host->config(); }
  const turboattn::PageBook& book() const { return host->book(); }
  turboattn::PageBook& book() { return host->book(); }
  const turboattn::PageLayout& layout(int l) const { return host->layout(l); }
#endif
};

// A decode's layer-independent arguments, checked once (ta_decode_plan_create).
struct ta_decode_plan {
  ta_cache* cache;
  std::vector<int32_t> seqs;
  ta_tensor q, out;
  ta_decode_options options;
};

using namespace turboattn;

namespace {
// ta_assign_head_bits and its across-layers twin: the same checks, then `rule`.
template <class Rule>
ta_status assign_bits(const float* priority, int32_t num_layers, int32_t num_kv_heads, float fraction_2bit,
                      int32_t* head_bits, Rule rule) {
  return guard([&] {
    require(priority != nullptr, TA_ERROR_INVALID_ARGUMENT, "priority: is NULL");
    require(head_bits != nullptr, TA_ERROR_INVALID_ARGUMENT, "head_bits: is NULL");
    require(num_layers >= 1 && num_kv_heads >= 1, TA_ERROR_INVALID_ARGUMENT, "num_layers and num_kv_heads must be >= 1, got ",
            num_layers, " and ", num_kv_heads);
    require(fraction_2bit >= 0.0f && fraction_2bit <= 1.0f, TA_ERROR_INVALID_ARGUMENT, "fraction_2bit: ", fraction_2bit,
            " is outside [0, 1]");
    const std::vector<float> p(priority, priority + size_t(num_layers) * num_kv_heads);
    for (size_t i = 0; i < p.size(); ++i)
      require(std::isfinite(p[i]), TA_ERROR_INVALID_ARGUMENT, "priority[", i, "]: ", p[i], " is not finite");
    const std::vector<int> bits = rule(p, num_layers, num_kv_heads, fraction_2bit);
    std::copy(bits.begin(), bits.end(), head_bits);
  });
}
}  // namespace

extern "C" {

const char* ta_version(void) { return "0.1.0"; }

const char* ta_status_string(ta_status status) {
  switch (status) {
    case TA_SUCCESS: return "success";
    case TA_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case TA_ERROR_UNSUPPORTED: return "unsupported";
    case TA_ERROR_OUT_OF_CAPACITY: return "out of capacity";
    case TA_ERROR_OUT_OF_MEMORY: return "out of memory";
    case TA_ERROR_CUDA: return "CUDA error";
    case TA_ERROR_INTERNAL: return "internal error";
    case TA_STATUS_MAX_ENUM: break;
  }
  return "unknown status";
}

const char* ta_last_error(void) { return g_last_error.c_str(); }

int ta_cuda_available(void) {
  if constexpr (kBuiltWithCuda) return cuda::device_available() ? 1 : 0;
  return 0;
}

ta_tensor ta_tensor_contiguous(void* data, ta_dtype dtype, ta_device device, int32_t ndim, const int64_t* shape) {
  ta_tensor t{};
  t.data = data, t.dtype = dtype, t.device = device, t.ndim = ndim;
  if (ndim < 1 || ndim > TA_MAX_DIMS || !shape) {
    t.ndim = 0;  // rejected by every entry point
    return t;
  }
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.strides[i] = stride;
    stride *= shape[i];
  }
  return t;
}

ta_attention_options ta_attention_default_options(void) { return {0.0f, 0, 1, 1}; }

ta_status ta_attention(const ta_tensor* q, const ta_tensor* k, const ta_tensor* v, const ta_tensor* cu_seqlens_q,
                       const ta_tensor* cu_seqlens_k, const ta_attention_options* options, ta_tensor* out, ta_tensor* lse,
                       void* cuda_stream) {
  return guard([&] {
    const AttentionShape s = check_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, true, cuda_stream);
    const ta_attention_options o = options ? *options : ta_attention_default_options();
    check_softmax_scale(o.softmax_scale, "options.softmax_scale");
    if (q->device == TA_DEVICE_CUDA) {
#ifdef TURBOATTN_WITH_CUDA
      if (s.varlen) cuda::attention_varlen(*q, *k, *v, s.cu_q, s.cu_k, o, *out, lse, cuda_stream);
      else cuda::attention(*q, *k, *v, o, *out, lse, cuda_stream);
      return;
#else
      no_cuda_path("ta_attention");
#endif
    }
    ref::AttentionOptions ro;
    ro.softmax_scale = o.softmax_scale, ro.causal = o.causal != 0, ro.sas = o.use_sas != 0, ro.smooth_k = o.smooth_k != 0;
    run_attention_cpu(s, *q, *k, *v, *out, lse, [&](auto qv, auto kv, auto vv, float* o_, float* l_) {
      ref::flashq_attention(qv, kv, vv, ro, o_, l_);
    });
  });
}

ta_status ta_attention_int8kv(const ta_tensor* q_, const ta_tensor* kc_, const ta_tensor* ks_, const ta_tensor* vc_,
                              const ta_tensor* vs_, const ta_tensor* mean_, const ta_attention_options* options, ta_tensor* out_,
                              ta_tensor* lse_, void* cuda_stream) {
  return guard([&] {
    const ta_tensor& q = check_tensor(q_, "q");
    const ta_tensor& kc = check_tensor(kc_, "k_codes");
    const ta_tensor& vc = check_tensor(vc_, "v_codes");
    const ta_tensor& ks = check_tensor(ks_, "k_scales");
    const ta_tensor& vs = check_tensor(vs_, "v_scales");
    ta_tensor& out = const_cast<ta_tensor&>(check_tensor(out_, "out"));
    expect_dtype(q, "q", {TA_DTYPE_F16, TA_DTYPE_BF16});
    expect_dtype(out, "out", {q.dtype});
    expect_rank(q, "q", 4);
    const int64_t B = q.shape[0], nq = q.shape[1], hq = q.shape[2], D = q.shape[3];
    expect_head_dim(D, "q");
    expect_dtype(kc, "k_codes", {TA_DTYPE_I8});
    expect_dtype(vc, "v_codes", {TA_DTYPE_I8});
    expect_rank(kc, "k_codes", 4);
    const int64_t nk = kc.shape[1], hkv = kc.shape[2], blocks = TA_BLOCK_COUNT(nk);
    require(kc.shape[0] == B && kc.shape[3] == D, TA_ERROR_INVALID_ARGUMENT, "k_codes: shape ", shape_string(kc),
            " does not match q's batch ", B, " and head dim ", D);
    require(hkv > 0 && hq % hkv == 0, TA_ERROR_INVALID_ARGUMENT, "q: ", hq, " query heads is not a positive multiple of k_codes' ",
            hkv, " KV heads");
    expect_shape(vc, "v_codes", {B, nk, hkv, D});
    expect_dtype(ks, "k_scales", {TA_DTYPE_F32});
    expect_dtype(vs, "v_scales", {TA_DTYPE_F32});
    expect_shape(ks, "k_scales", {B, hkv, blocks});
    expect_shape(vs, "v_scales", {B, hkv, blocks});
    expect_shape(out, "out", {B, nq, hq, D});
    for (auto [t, name] : {std::pair{&q, "q"}, {&kc, "k_codes"}, {&vc, "v_codes"}, {&ks, "k_scales"}, {&vs, "v_scales"}, {&out, "out"}}) {
      expect_device(*t, name, q.device);
      expect_last_dim_contiguous(*t, name);
    }
    if (mean_) {
      const ta_tensor& m = check_tensor(mean_, "k_mean");
      expect_dtype(m, "k_mean", {TA_DTYPE_F32});
      expect_shape(m, "k_mean", {B, hkv, D});
      expect_device(m, "k_mean", q.device);
      expect_last_dim_contiguous(m, "k_mean");
    }
    check_lse(lse_, q.device, {B, hq, nq});
    const ta_attention_options o = options ? *options : ta_attention_default_options();
    check_softmax_scale(o.softmax_scale, "options.softmax_scale");
    if (q.device == TA_DEVICE_CUDA) {
#ifdef TURBOATTN_WITH_CUDA
      cuda::attention_int8kv(q, kc, ks, vc, vs, mean_, o, out, lse_, cuda_stream);
      return;
#else
      (void)cuda_stream;
      no_cuda_path("ta_attention_int8kv");
#endif
    }
    for (auto [t, name] : {std::pair{&ks, "k_scales"}, {&vs, "v_scales"}})  // ta_quantize_int8's scales are >= 0 or NaN
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < hkv; ++h)
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const float x = static_cast<const float*>(t->data)[b * t->strides[0] + h * t->strides[1] + blk * t->strides[2]];
            require(!(x < 0.0f), TA_ERROR_INVALID_ARGUMENT, name, ": ", x, " at [", b, ", ", h, ", ", blk,
                    "], expected a scale >= 0 (or NaN) as ta_quantize_int8 writes");
          }
    ref::AttentionOptions ro;
    ro.softmax_scale = o.softmax_scale, ro.causal = o.causal != 0, ro.sas = o.use_sas != 0;
    const std::vector<float> qf = to_float(q);
    const std::vector<float> mf = mean_ ? to_float(*mean_) : std::vector<float>();
    std::vector<float> of(qf.size()), lf(size_t(B * hq * nq));
    const auto* kp = static_cast<const int8_t*>(kc.data);
    const auto* vp = static_cast<const int8_t*>(vc.data);
    for (int64_t b = 0; b < B; ++b) {
      ref::Int8KV kv;
      kv.tokens = int(nk), kv.heads = int(hkv), kv.dim = int(D);
      kv.k.resize(size_t(hkv * nk * D)), kv.v.resize(kv.k.size());
      kv.k_scale.resize(size_t(hkv * nk)), kv.v_scale.resize(kv.k_scale.size());
      kv.k_mean.assign(size_t(hkv * D), 0.0f);
      for (int64_t h = 0; h < hkv; ++h) {
        for (int64_t t = 0; t < nk; ++t) {
          const size_t at = size_t(h * nk + t);
          for (int64_t c = 0; c < D; ++c) {
            kv.k[at * D + c] = kp[b * kc.strides[0] + t * kc.strides[1] + h * kc.strides[2] + c];
            kv.v[at * D + c] = vp[b * vc.strides[0] + t * vc.strides[1] + h * vc.strides[2] + c];
          }
          const int64_t blk = t / TA_BLOCK_TOKENS;
          kv.k_scale[at] = static_cast<const float*>(ks.data)[b * ks.strides[0] + h * ks.strides[1] + blk * ks.strides[2]];
          kv.v_scale[at] = static_cast<const float*>(vs.data)[b * vs.strides[0] + h * vs.strides[1] + blk * vs.strides[2]];
        }
        if (mean_) std::copy(mf.begin() + (b * hkv + h) * D, mf.begin() + (b * hkv + h + 1) * D, kv.k_mean.begin() + h * D);
      }
      ref::flashq_attention_int8(view(qf, b * nq, nq, hq, D), kv, ro, of.data() + b * nq * hq * D, lf.data() + b * hq * nq);
    }
    from_float(of, out);
    if (lse_) from_float(lf, *lse_);
  });
}

ta_status ta_attention_exact(const ta_tensor* q, const ta_tensor* k, const ta_tensor* v, const ta_tensor* cu_seqlens_q,
                             const ta_tensor* cu_seqlens_k, float softmax_scale, int32_t causal, ta_tensor* out, ta_tensor* lse) {
  return guard([&] {
    const AttentionShape s = check_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, false);
    check_softmax_scale(softmax_scale, "softmax_scale");
    run_attention_cpu(s, *q, *k, *v, *out, lse, [&](auto qv, auto kv, auto vv, float* o_, float* l_) {
      std::vector<double> od(size_t(qv.tokens) * qv.heads * qv.dim), ld(size_t(qv.tokens) * qv.heads);
      ref::exact_attention(qv, kv, vv, softmax_scale, causal != 0, od.data(), ld.data());
      std::copy(od.begin(), od.end(), o_);
      std::copy(ld.begin(), ld.end(), l_);
    });
  });
}

ta_status ta_quantize_int8(const ta_tensor* x_, const ta_tensor* shift_, ta_tensor* codes_, ta_tensor* scales_, void* stream) {
  return guard([&] {
    const ta_tensor& x = check_tensor(x_, "x");
    ta_tensor& codes = const_cast<ta_tensor&>(check_tensor(codes_, "codes"));
    ta_tensor& scales = const_cast<ta_tensor&>(check_tensor(scales_, "scales"));
    expect_dtype(x, "x", {TA_DTYPE_F16, TA_DTYPE_BF16});
    expect_rank(x, "x", 4);
    expect_last_dim_contiguous(x, "x");
    const int64_t B = x.shape[0], N = x.shape[1], H = x.shape[2], D = x.shape[3];
    expect_head_dim(D, "x");
    expect_dtype(codes, "codes", {TA_DTYPE_I8});
    expect_shape(codes, "codes", {B, N, H, D});
    expect_last_dim_contiguous(codes, "codes");
    expect_dtype(scales, "scales", {TA_DTYPE_F32});
    expect_shape(scales, "scales", {B, H, TA_BLOCK_COUNT(N)});
    expect_device(codes, "codes", x.device);
    expect_device(scales, "scales", x.device);
    if (shift_) {
      const ta_tensor& shift = check_tensor(shift_, "shift");
      expect_dtype(shift, "shift", {TA_DTYPE_F32});
      expect_shape(shift, "shift", {B, H, D});
      expect_last_dim_contiguous(shift, "shift");
      expect_device(shift, "shift", x.device);
    }
    if (x.device == TA_DEVICE_CUDA) {
#ifdef TURBOATTN_WITH_CUDA
      cuda::quantize_int8(x, shift_, codes, scales, stream);
      return;
#else
      (void)stream;
      no_cuda_path("ta_quantize_int8");
#endif
    }
    const std::vector<float> xf = to_float(x);
    const std::vector<float> sf = shift_ ? to_float(*shift_) : std::vector<float>();
    std::vector<int8_t> block(static_cast<size_t>(TA_BLOCK_TOKENS * D));
    auto* code_ptr = static_cast<int8_t*>(codes.data);
    auto* scale_ptr = static_cast<float*>(scales.data);
    for (int64_t b = 0; b < B; ++b) {
      const ref::HeadsView xv = view(xf, b * N, N, H, D);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t0 = 0; t0 < N; t0 += TA_BLOCK_TOKENS) {
          const int rows = int(std::min<int64_t>(TA_BLOCK_TOKENS, N - t0));
          const float* shift = shift_ ? sf.data() + (b * H + h) * D : nullptr;
          const float sc = ref::quantize_head_block(xv, int(h), int(t0), rows, shift, block.data());
          scale_ptr[b * scales.strides[0] + h * scales.strides[1] + (t0 / TA_BLOCK_TOKENS) * scales.strides[2]] = sc;
          for (int r = 0; r < rows; ++r)
            for (int64_t c = 0; c < D; ++c)
              code_ptr[b * codes.strides[0] + (t0 + r) * codes.strides[1] + h * codes.strides[2] + c] = block[size_t(r * D + c)];
        }
    }
  });
}

/* ---- cache ---- */

ta_cache_config ta_cache_default_config(void) {
  ta_cache_config c{};
  c.num_layers = 1, c.num_kv_heads = 8, c.head_dim = 128, c.num_pages = 1024, c.max_seqs = 16;
  c.max_seq_len = 32768, c.head_bits = nullptr, c.smooth_k = 1;
  return c;
}

ta_status ta_cache_create(const ta_cache_config* config, ta_device device, ta_cache** cache) {
  return guard([&] {
    require(cache != nullptr, TA_ERROR_INVALID_ARGUMENT, "cache: output pointer is NULL");
    *cache = nullptr;
    require(config != nullptr, TA_ERROR_INVALID_ARGUMENT, "config: is NULL");
    const ta_cache_config& c = *config;
    require(c.num_layers >= 1, TA_ERROR_INVALID_ARGUMENT, "config.num_layers: ", c.num_layers, ", expected >= 1");
    require(c.num_kv_heads >= 1 && c.num_kv_heads <= TA_MAX_KV_HEADS, TA_ERROR_INVALID_ARGUMENT, "config.num_kv_heads: ",
            c.num_kv_heads, ", expected 1 to ", TA_MAX_KV_HEADS);
    expect_head_dim(c.head_dim, "config.head_dim");
    require(c.num_pages >= 0, TA_ERROR_INVALID_ARGUMENT, "config.num_pages: ", c.num_pages, ", expected >= 0");
    require(c.max_seqs >= 1, TA_ERROR_INVALID_ARGUMENT, "config.max_seqs: ", c.max_seqs, ", expected >= 1");
    require(c.max_seq_len >= 1, TA_ERROR_INVALID_ARGUMENT, "config.max_seq_len: ", c.max_seq_len, ", expected >= 1");
    require(device == TA_DEVICE_CPU || device == TA_DEVICE_CUDA, TA_ERROR_INVALID_ARGUMENT, "device: unknown code ", int(device));
    if (device == TA_DEVICE_CUDA) {
      require(kBuiltWithCuda, TA_ERROR_UNSUPPORTED, "device: a CUDA cache is not available in this build", kBuiltWithCudaText);
      require(ta_cuda_available() == 1, TA_ERROR_UNSUPPORTED, "device: CUDA was asked for but no CUDA device is visible");
    }
    ref::CacheConfig rc;
    rc.layers = c.num_layers, rc.kv_heads = c.num_kv_heads, rc.head_dim = c.head_dim, rc.num_pages = c.num_pages;
    rc.max_seqs = c.max_seqs, rc.max_seq_len = c.max_seq_len, rc.smooth_k = c.smooth_k != 0;
    const size_t n = size_t(c.num_layers) * c.num_kv_heads;
    rc.bits.assign(n, TA_BITS_4);
    if (c.head_bits) {
      for (size_t i = 0; i < n; ++i) {
        const int b = c.head_bits[i];
        require(b == 8 || b == 4 || b == 2, TA_ERROR_INVALID_ARGUMENT, "config.head_bits[", i, "] (layer ", i / size_t(c.num_kv_heads),
                ", head ", i % size_t(c.num_kv_heads), "): ", b, ", expected 8, 4 or 2");
        rc.bits[i] = b;
      }
    }
    auto handle = std::make_unique<ta_cache>();
    handle->device = device;
#ifdef TURBOATTN_WITH_CUDA
    if (device == TA_DEVICE_CUDA) handle->gpu = std::make_unique<cuda::DeviceCache>(rc);
#endif
    if (device == TA_DEVICE_CPU) handle->host = std::make_unique<ref::KvCache>(rc);
    *cache = handle.release();
  });
}

void ta_cache_destroy(ta_cache* cache) { delete cache; }

namespace {
ta_cache& cache_of(ta_cache* cache) {
  require(cache != nullptr, TA_ERROR_INVALID_ARGUMENT, "cache: is NULL");
  return *cache;
}
void check_layer(const ta_cache& c, int32_t layer) {
  require(layer >= 0 && layer < c.config().layers, TA_ERROR_INVALID_ARGUMENT, "layer: ", layer, " is outside [0, ",
          c.config().layers, ")");
}
void check_seq(const ta_cache& c, int32_t seq, const char* name) {
  require(seq >= 0 && seq < c.config().max_seqs, TA_ERROR_INVALID_ARGUMENT, name, ": sequence id ", seq, " is outside [0, ",
          c.config().max_seqs, ")");
  require(c.book().active(seq), TA_ERROR_INVALID_ARGUMENT, name, ": sequence ", seq, " is not active (add it first)");
}
// Checks the sequence list of a write, append or decode: non-null, active, no repeats.
void check_seqs(const ta_cache& c, const int32_t* seqs, int32_t num_seqs) {
  require(num_seqs >= 1, TA_ERROR_INVALID_ARGUMENT, "num_seqs: ", num_seqs, ", expected >= 1");
  require(seqs != nullptr, TA_ERROR_INVALID_ARGUMENT, "seqs: is NULL");
  // On every decode and append: no allocation and no message text unless something is wrong.
  thread_local std::vector<uint8_t> seen;
  seen.assign(size_t(c.config().max_seqs), 0);
  for (int32_t i = 0; i < num_seqs; ++i) {
    const int32_t s = seqs[i];
    if (s < 0 || s >= c.config().max_seqs || !c.book().active(s)) check_seq(c, s, concat("seqs[", i, "]").c_str());
    require(!seen[size_t(s)], TA_ERROR_INVALID_ARGUMENT, "seqs[", i, "]: sequence ", s, " appears twice");
    seen[size_t(s)] = 1;
  }
}
void check_kv_tokens(const ta_cache& c, const ta_tensor* k_, const ta_tensor* v_, int64_t tokens_expected) {
  const ta_tensor& k = check_tensor(k_, "k");
  const ta_tensor& v = check_tensor(v_, "v");
  expect_dtype(k, "k", {TA_DTYPE_F16, TA_DTYPE_BF16});
  expect_dtype(v, "v", {k.dtype});
  expect_device(k, "k", c.device);
  expect_device(v, "v", c.device);
  expect_rank(k, "k", 3);
  const int64_t tokens = tokens_expected >= 0 ? tokens_expected : k.shape[0];
  expect_shape(k, "k", {tokens, c.config().kv_heads, c.config().head_dim});
  expect_shape(v, "v", {tokens, c.config().kv_heads, c.config().head_dim});
  expect_last_dim_contiguous(k, "k");
  expect_last_dim_contiguous(v, "v");
}
// Refuses a call that needs the host's lengths while captured appends may have moved the device's.
void expect_synced(const ta_cache& c, const char* what) {
#ifdef TURBOATTN_WITH_CUDA
  if (c.gpu) c.gpu->expect_synced(what);
#else
  (void)c, (void)what;
#endif
}
// Rejects, before anything is written, a write of tokens [cu[i], cu[i + 1]) to seqs[i] that would
// overflow a sequence or the page pool.
void check_capacity(const ta_cache& c, int32_t layer, const int32_t* seqs, int32_t num_seqs, const std::vector<int32_t>& cu) {
  int64_t pages = 0;
  for (int32_t i = 0; i < num_seqs; ++i) {
    const int64_t tokens = cu[size_t(i) + 1] - cu[size_t(i)], len = c.book().length(layer, seqs[i]) + tokens;
    require(len <= c.config().max_seq_len, TA_ERROR_OUT_OF_CAPACITY, "sequence ", seqs[i], " would reach ", len,
            " tokens in layer ", layer, ", over max_seq_len ", c.config().max_seq_len);
    pages += c.book().pages_needed(layer, seqs[i], tokens);
  }
  require(pages <= c.book().free_pages(), TA_ERROR_OUT_OF_CAPACITY, "the write needs ", pages, " new pages but only ",
          c.book().free_pages(),
          " are free; nothing was written");
}
}  // namespace

ta_status ta_cache_memory_info(const ta_cache* cache, ta_cache_memory* info) {
  return guard([&] {
    const ta_cache& c = cache_of(const_cast<ta_cache*>(cache));
    require(info != nullptr, TA_ERROR_INVALID_ARGUMENT, "info: is NULL");
    const auto& cfg = c.config();
    int64_t page = 0;
    for (int l = 0; l < cfg.layers; ++l) page += c.layout(l).page_bytes;
    info->page_bytes_total = page;
    info->pool_bytes = page * cfg.num_pages;
    info->buffer_bytes = int64_t(cfg.layers) * cfg.max_seqs * cfg.kv_heads * buffer_head_bytes(cfg.head_dim);
    info->first_block_bytes = int64_t(cfg.layers) * cfg.max_seqs * cfg.kv_heads * first_block_bytes(cfg.head_dim);
    info->bytes_per_token = double(page) / TA_BLOCK_TOKENS;
    info->fp16_bytes_per_token = double(cfg.layers) * cfg.kv_heads * cfg.head_dim * 2 * 2;
  });
}

ta_status ta_cache_add_sequence(ta_cache* cache, int32_t* seq) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    require(seq != nullptr, TA_ERROR_INVALID_ARGUMENT, "seq: output pointer is NULL");
    const int s = c.book().add_sequence();
    require(s >= 0, TA_ERROR_OUT_OF_CAPACITY, "all ", c.config().max_seqs, " sequence slots are in use");
    *seq = s;
  });
}

ta_status ta_cache_release_sequence(ta_cache* cache, int32_t seq) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    check_seq(c, seq, "seq");
#ifdef TURBOATTN_WITH_CUDA
    if (c.gpu) return c.gpu->release_sequence(seq);
#endif
    c.book().release_sequence(seq);
  });
}

ta_status ta_cache_sequence_length(const ta_cache* cache, int32_t layer, int32_t seq, int64_t* length) {
  return guard([&] {
    const ta_cache& c = cache_of(const_cast<ta_cache*>(cache));
    check_layer(c, layer);
    check_seq(c, seq, "seq");
    require(length != nullptr, TA_ERROR_INVALID_ARGUMENT, "length: output pointer is NULL");
    expect_synced(c, "ta_cache_sequence_length");
    *length = c.book().length(layer, seq);
  });
}

ta_status ta_cache_free_pages(const ta_cache* cache, int32_t* pages) {
  return guard([&] {
    const ta_cache& c = cache_of(const_cast<ta_cache*>(cache));
    require(pages != nullptr, TA_ERROR_INVALID_ARGUMENT, "pages: output pointer is NULL");
    *pages = c.book().free_pages();
  });
}

ta_status ta_cache_read(const ta_cache* cache, int32_t layer, int32_t seq, ta_tensor* k_, ta_tensor* v_) {
  return guard([&] {
    const ta_cache& c = cache_of(const_cast<ta_cache*>(cache));
    check_layer(c, layer);
    check_seq(c, seq, "seq");
    check_tensor(k_, "k");
    check_tensor(v_, "v");
    expect_synced(c, "ta_cache_read");
    ta_tensor &k = *k_, &v = *v_;
    const int64_t n = c.book().length(layer, seq), H = c.config().kv_heads, D = c.config().head_dim;
    for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}}) {
      expect_dtype(*t, name, {TA_DTYPE_F32, TA_DTYPE_F16, TA_DTYPE_BF16});
      require(t->device == TA_DEVICE_CPU, TA_ERROR_INVALID_ARGUMENT, name, ": on ", device_name(t->device),
              "; ta_cache_read writes host memory, for a cache on either device");
      expect_shape(*t, name, {n, H, D});
    }
    std::vector<float> kf(size_t(n * H * D)), vf(kf.size());
#ifdef TURBOATTN_WITH_CUDA
    if (c.gpu) {
      c.gpu->expect_current_device();
      c.gpu->read_tokens(layer, seq, kf.data(), vf.data());
    } else
#endif
      c.host->read_tokens(layer, seq, kf.data(), vf.data());
    from_float(kf, k);
    from_float(vf, v);
  });
}

namespace {
// Writes tokens [cu[i], cu[i + 1]) of k, v to seqs[i] (arguments checked but capacity): checks capacity
// for the whole call, then dispatches to the cache's device. Appends are writes of one token each.
void write_tokens(ta_cache& c, int32_t layer, const int32_t* seqs, int32_t num_seqs, const ta_tensor& k, const ta_tensor& v,
                  const std::vector<int32_t>& cu, void* cuda_stream) {
  check_capacity(c, layer, seqs, num_seqs, cu);
#ifdef TURBOATTN_WITH_CUDA
  if (c.gpu) {
    c.gpu->expect_current_device();
    cuda::expect_device_pointer(k.data, "k");
    cuda::expect_device_pointer(v.data, "v");
    return c.gpu->write(layer, seqs, num_seqs, k, v, cu, cuda_stream);
  }
#else
  (void)cuda_stream;
#endif
  const std::vector<float> kf = to_float(k), vf = to_float(v);
  const int64_t H = c.config().kv_heads, D = c.config().head_dim;
  for (int32_t i = 0; i < num_seqs; ++i) {
    const int64_t from = cu[size_t(i)], tokens = cu[size_t(i) + 1] - from;
    c.host->write(layer, seqs[i], view(kf, from, tokens, H, D), view(vf, from, tokens, H, D));
  }
}
}  // namespace

ta_status ta_cache_write(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs, const ta_tensor* k,
                         const ta_tensor* v, const ta_tensor* cu_seqlens, void* cuda_stream) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    check_layer(c, layer);
    check_seqs(c, seqs, num_seqs);
    check_kv_tokens(c, k, v, -1);
    const std::vector<int32_t> cu = cu_seqlens_values(cu_seqlens, "cu_seqlens", k->shape[0], cuda_stream);
    require(int64_t(cu.size()) == int64_t(num_seqs) + 1, TA_ERROR_INVALID_ARGUMENT, "cu_seqlens: ", cu.size(),
            " entries, expected num_seqs + 1 = ", num_seqs + 1);
    write_tokens(c, layer, seqs, num_seqs, *k, *v, cu, cuda_stream);
  });
}

namespace {
// One token per sequence, the sequence list already checked.
void append_tokens(ta_cache& c, int32_t layer, const int32_t* seqs, int32_t num_seqs, const ta_tensor& k, const ta_tensor& v,
                   void* cuda_stream) {
  std::vector<int32_t> cu(size_t(num_seqs) + 1);
  for (int32_t i = 0; i <= num_seqs; ++i) cu[size_t(i)] = i;
  write_tokens(c, layer, seqs, num_seqs, k, v, cu, cuda_stream);
}
}  // namespace

ta_status ta_cache_append(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs, const ta_tensor* k,
                          const ta_tensor* v, void* cuda_stream) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    check_layer(c, layer);
    check_seqs(c, seqs, num_seqs);
    check_kv_tokens(c, k, v, num_seqs);
    append_tokens(c, layer, seqs, num_seqs, *k, *v, cuda_stream);
  });
}

ta_status ta_cache_reserve(ta_cache* cache, const int32_t* seqs, int32_t num_seqs, int64_t tokens, void* cuda_stream) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    check_seqs(c, seqs, num_seqs);
    require(tokens >= 0 && tokens <= c.config().max_seq_len, TA_ERROR_INVALID_ARGUMENT, "tokens: ", tokens,
            ", expected 0 to max_seq_len (", c.config().max_seq_len, ")");
    expect_synced(c, "ta_cache_reserve");
    int64_t pages = 0;
    for (int32_t i = 0; i < num_seqs; ++i) {
      const int64_t end = c.book().reservation_end(seqs[i], tokens);
      require(end <= c.config().max_seq_len, TA_ERROR_OUT_OF_CAPACITY, "sequence ", seqs[i], " would reach ", end,
              " tokens, over max_seq_len ", c.config().max_seq_len, "; nothing was reserved");
      pages += c.book().pages_to_reserve(seqs[i], tokens);
    }
    require(pages <= c.book().free_pages(), TA_ERROR_OUT_OF_CAPACITY, "the reservation needs ", pages, " new pages but only ",
            c.book().free_pages(), " are free; nothing was reserved");
#ifdef TURBOATTN_WITH_CUDA
    if (c.gpu) {
      c.gpu->expect_current_device();
      return c.gpu->reserve(seqs, num_seqs, tokens, cuda_stream);
    }
#else
    (void)cuda_stream;
#endif
    for (int32_t i = 0; i < num_seqs; ++i) c.book().reserve(seqs[i], tokens);
  });
}

ta_status ta_cache_sync(ta_cache* cache) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
#ifdef TURBOATTN_WITH_CUDA
    if (c.gpu) {
      c.gpu->expect_current_device();
      c.gpu->sync();
    }
#else
    (void)c;
#endif
  });
}

ta_decode_options ta_decode_default_options(void) { return {0.0f, 1, 0}; }

namespace {
// What a decode checks once for all layers: the sequence list, q and out, the options, the pointers.
void check_decode_args(ta_cache& c, const int32_t* seqs, int32_t num_seqs, const ta_tensor* q_, const ta_tensor* out_,
                       const ta_decode_options& o) {
  check_seqs(c, seqs, num_seqs);
  const ta_tensor& q = check_tensor(q_, "q");
  const ta_tensor& out = check_tensor(out_, "out");
  expect_dtype(q, "q", {TA_DTYPE_F16, TA_DTYPE_BF16});
  expect_dtype(out, "out", {q.dtype});
  expect_device(q, "q", c.device);
  expect_device(out, "out", c.device);
  expect_rank(q, "q", 4);
  expect_last_dim_contiguous(q, "q");
  expect_last_dim_contiguous(out, "out");
  const int64_t q_len = q.shape[1], hq = q.shape[2], D = c.config().head_dim, hkv = c.config().kv_heads;
  require(q.shape[0] == num_seqs, TA_ERROR_INVALID_ARGUMENT, "q: batch ", q.shape[0], " differs from num_seqs ", num_seqs);
  require(q.shape[3] == D, TA_ERROR_INVALID_ARGUMENT, "q: head dim ", q.shape[3], " differs from the cache's ", D);
  require(hq > 0 && hq % hkv == 0, TA_ERROR_INVALID_ARGUMENT, "q: ", hq, " query heads is not a positive multiple of the cache's ",
          hkv, " KV heads");
  require(q_len >= 1, TA_ERROR_INVALID_ARGUMENT, "q: q_len ", q_len, ", expected >= 1");
  expect_shape(out, "out", {num_seqs, q_len, hq, D});
  check_softmax_scale(o.softmax_scale, "options.softmax_scale");
  require(o.split_tiles >= 0, TA_ERROR_INVALID_ARGUMENT, "options.split_tiles: ", o.split_tiles, ", expected >= 0");
#ifdef TURBOATTN_WITH_CUDA
  if (c.gpu) {
    c.gpu->expect_current_device();
    cuda::expect_device_pointer(q.data, "q");
    cuda::expect_device_pointer(out.data, "out");
  }
#endif
}

// Every sequence holds at least q_len tokens in the layer, counting `adding` more about to be appended.
void check_decode_lengths(const ta_cache& c, int32_t layer, const int32_t* seqs, int32_t num_seqs, int64_t q_len, int64_t adding) {
  for (int32_t i = 0; i < num_seqs; ++i)
    require(c.book().length(layer, seqs[i]) + adding >= q_len, TA_ERROR_INVALID_ARGUMENT, "q: q_len ", q_len,
            " exceeds sequence ", seqs[i], "'s ", c.book().length(layer, seqs[i]) + adding, " cached tokens in layer ", layer,
            " (append the new tokens first)");
}

// One layer's decode of arguments check_decode_args accepted: what can change between layers and
// steps (the layer, the sequences still being active, their lengths, the current device) is checked
// here; the sequence list and the lengths unless the caller has just checked them.
void run_decode(ta_cache& c, int32_t layer, const int32_t* seqs, int32_t num_seqs, const ta_tensor& q,
                const ta_decode_options& o, ta_tensor& out, void* cuda_stream, bool seqs_checked, bool lengths_checked = false) {
  check_layer(c, layer);
  if (!seqs_checked) check_seqs(c, seqs, num_seqs);
  const int64_t q_len = q.shape[1], hq = q.shape[2], D = c.config().head_dim;
  if (!lengths_checked) check_decode_lengths(c, layer, seqs, num_seqs, q_len, 0);
#ifdef TURBOATTN_WITH_CUDA
  if (c.gpu) {
    c.gpu->expect_current_device();
    return c.gpu->decode(layer, seqs, num_seqs, q, o, out, cuda_stream);
  }
#else
  (void)cuda_stream;
#endif
  const std::vector<float> qf = to_float(q);
  std::vector<float> of(qf.size());
  for (int32_t i = 0; i < num_seqs; ++i)
    c.host->decode(layer, seqs[i], view(qf, int64_t(i) * q_len, q_len, hq, D), o.softmax_scale, o.use_sas != 0, o.split_tiles,
                   of.data() + size_t(i) * q_len * hq * D);
  from_float(of, out);
}
}  // namespace

ta_status ta_decode(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs, const ta_tensor* q,
                    const ta_decode_options* options, ta_tensor* out, void* cuda_stream) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    const ta_decode_options o = options ? *options : ta_decode_default_options();
    check_decode_args(c, seqs, num_seqs, q, out, o);
    run_decode(c, layer, seqs, num_seqs, *q, o, *out, cuda_stream, /*seqs_checked=*/true);
  });
}

ta_status ta_cache_append_decode(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs, const ta_tensor* k,
                                 const ta_tensor* v, const ta_tensor* q, const ta_decode_options* options, ta_tensor* out,
                                 void* cuda_stream) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    const ta_decode_options o = options ? *options : ta_decode_default_options();
    check_layer(c, layer);
    check_decode_args(c, seqs, num_seqs, q, out, o);
    check_kv_tokens(c, k, v, num_seqs);
    // Everything the decode checks is checked before the append writes (capacity: append_tokens, first);
    // a q_len of 1 always fits a sequence holding the token about to be appended.
    if (q->shape[1] > 1) check_decode_lengths(c, layer, seqs, num_seqs, q->shape[1], 1);
    append_tokens(c, layer, seqs, num_seqs, *k, *v, cuda_stream);
    run_decode(c, layer, seqs, num_seqs, *q, o, *out, cuda_stream, /*seqs_checked=*/true, /*lengths_checked=*/true);
  });
}

ta_status ta_decode_plan_create(ta_cache* cache, const int32_t* seqs, int32_t num_seqs, const ta_tensor* q,
                                const ta_decode_options* options, ta_tensor* out, ta_decode_plan** plan) {
  return guard([&] {
    ta_cache& c = cache_of(cache);
    require(plan != nullptr, TA_ERROR_INVALID_ARGUMENT, "plan: output pointer is NULL");
    const ta_decode_options o = options ? *options : ta_decode_default_options();
    check_decode_args(c, seqs, num_seqs, q, out, o);
    *plan = new ta_decode_plan{&c, std::vector<int32_t>(seqs, seqs + num_seqs), *q, *out, o};
  });
}

ta_status ta_decode_plan_run(ta_decode_plan* plan, int32_t layer, void* cuda_stream) {
  return guard([&] {
    require(plan != nullptr, TA_ERROR_INVALID_ARGUMENT, "plan: is NULL");
    ta_decode_plan& p = *plan;
    run_decode(*p.cache, layer, p.seqs.data(), int32_t(p.seqs.size()), p.q, p.options, p.out, cuda_stream,
               /*seqs_checked=*/false);
  });
}

void ta_decode_plan_destroy(ta_decode_plan* plan) { delete plan; }

ta_status ta_head_priority(const ta_tensor* k_, const ta_tensor* v_, float* priority) {
  return guard([&] {
    const ta_tensor& k = check_tensor(k_, "k");
    const ta_tensor& v = check_tensor(v_, "v");
    expect_dtype(k, "k", {TA_DTYPE_F16, TA_DTYPE_BF16, TA_DTYPE_F32});
    expect_dtype(v, "v", {TA_DTYPE_F16, TA_DTYPE_BF16, TA_DTYPE_F32});
    expect_device(k, "k", TA_DEVICE_CPU);
    expect_device(v, "v", TA_DEVICE_CPU);
    expect_rank(k, "k", 3);
    expect_shape(v, "v", {k.shape[0], k.shape[1], k.shape[2]});
    require(k.shape[0] >= 1 && k.shape[1] >= 1 && k.shape[2] >= 1, TA_ERROR_INVALID_ARGUMENT, "k: shape ", shape_string(k),
            " has an empty dimension");
    require(priority != nullptr, TA_ERROR_INVALID_ARGUMENT, "priority: is NULL");
    const std::vector<float> kf = to_float(k), vf = to_float(v);
    const std::vector<float> p =
        ref::head_priority(view(kf, 0, k.shape[0], k.shape[1], k.shape[2]), view(vf, 0, k.shape[0], k.shape[1], k.shape[2]));
    std::copy(p.begin(), p.end(), priority);
  });
}

ta_status ta_assign_head_bits(const float* priority, int32_t num_layers, int32_t num_kv_heads, float fraction_2bit,
                              int32_t* head_bits) {
  return assign_bits(priority, num_layers, num_kv_heads, fraction_2bit, head_bits, ref::assign_head_bits);
}

ta_status ta_assign_head_bits_across_layers(const float* priority, int32_t num_layers, int32_t num_kv_heads,
                                            float fraction_2bit, int32_t* head_bits) {
  return assign_bits(priority, num_layers, num_kv_heads, fraction_2bit, head_bits, ref::assign_head_bits_across_layers);
}

}  // extern "C"
