// libFuzzer target: the attention and quantization entry points of the C API on the CPU backend,
// with descriptors (shapes, strides, dtypes, devices, ranks, null pointers, lengths, options) drawn
// from the input. Any crash, sanitizer report or unexpected status is a bug.
#include <cmath>
#include <cstdlib>

#include "fuzz_util.hpp"

using namespace turboattn::fuzz;

namespace {
void check_status(ta_status s) {
  if (s < TA_SUCCESS || s > TA_ERROR_INTERNAL || s == TA_ERROR_INTERNAL) std::abort();  // internal errors are bugs
  if (s != TA_SUCCESS && ta_last_error()[0] == '\0') std::abort();                        // every failure says why
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(1, 2), nq = in.ConsumeIntegralInRange<int64_t>(1, 70);
  const int64_t nk = in.ConsumeIntegralInRange<int64_t>(1, 70), hkv = in.ConsumeIntegralInRange<int64_t>(1, 2);
  const int64_t hq = hkv * in.ConsumeIntegralInRange<int64_t>(1, 2) + (in.ConsumeIntegralInRange<int>(0, 10) == 0);
  const int64_t D = pick_head_dim(in);
  const bool varlen = in.ConsumeIntegralInRange<int>(0, 3) == 0;
  const ta_dtype dt = in.ConsumeBool() ? TA_DTYPE_F16 : TA_DTYPE_BF16;
  switch (in.ConsumeIntegralInRange<int>(0, 2)) {
    case 0: {  // ta_attention / ta_attention_exact
      FuzzTensor q = varlen ? make_tensor(in, {B * nq, hq, D}, dt) : make_tensor(in, {B, nq, hq, D}, dt);
      FuzzTensor k = varlen ? make_tensor(in, {B * nk, hkv, D}, dt) : make_tensor(in, {B, nk, hkv, D}, dt);
      FuzzTensor v = varlen ? make_tensor(in, {B * nk, hkv, D}, dt) : make_tensor(in, {B, nk, hkv, D}, dt);
      FuzzTensor o = varlen ? make_tensor(in, {B * nq, hq, D}, dt) : make_tensor(in, {B, nq, hq, D}, dt);
      FuzzTensor lse = varlen ? make_tensor(in, {hq, B * nq}, TA_DTYPE_F32) : make_tensor(in, {B, hq, nq}, TA_DTYPE_F32);
      FuzzTensor cq = make_tensor(in, {B + 1}, TA_DTYPE_I32), ck = make_tensor(in, {B + 1}, TA_DTYPE_I32);
      for (FuzzTensor* cu : {&cq, &ck}) {  // mostly valid cumulative lengths
        if (!cu->t.data || cu->t.dtype != TA_DTYPE_I32 || cu->t.ndim != 1 || cu->t.strides[0] <= 0) continue;
        auto* p = reinterpret_cast<int32_t*>(cu->t.data);
        const int64_t per = cu == &cq ? nq : nk;
        for (int64_t i = 0; i < cu->t.shape[0]; ++i)
          p[i * cu->t.strides[0]] = in.ConsumeIntegralInRange<int>(0, 8) ? int32_t(i * per) : in.ConsumeIntegral<int32_t>();
      }
      ta_attention_options opt = ta_attention_default_options();
      opt.causal = in.ConsumeBool(), opt.use_sas = in.ConsumeBool(), opt.smooth_k = in.ConsumeBool();
      const float scales[] = {0.0f, 0.125f, -1.0f, NAN, INFINITY, 1e-30f};
      opt.softmax_scale = scales[in.ConsumeIntegralInRange<int>(0, 5)];
      const bool with_lse = in.ConsumeBool();
      if (in.ConsumeBool())
        check_status(ta_attention(in.ConsumeIntegralInRange<int>(0, 20) ? q.ptr() : nullptr, k.ptr(), v.ptr(),
                                  varlen ? cq.ptr() : nullptr, varlen ? ck.ptr() : nullptr, in.ConsumeBool() ? &opt : nullptr,
                                  o.ptr(), with_lse ? lse.ptr() : nullptr, nullptr));
      else
        check_status(ta_attention_exact(q.ptr(), k.ptr(), v.ptr(), varlen ? cq.ptr() : nullptr, varlen ? ck.ptr() : nullptr,
                                        opt.softmax_scale, opt.causal, o.ptr(), with_lse ? lse.ptr() : nullptr));
      break;
    }
    case 1: {  // ta_quantize_int8
      FuzzTensor x = make_tensor(in, {B, nk, hkv, D}, dt);
      FuzzTensor shift = make_tensor(in, {B, hkv, D}, TA_DTYPE_F32);
      FuzzTensor codes = make_tensor(in, {B, nk, hkv, D}, TA_DTYPE_I8);
      FuzzTensor scales = make_tensor(in, {B, hkv, (nk + 63) / 64}, TA_DTYPE_F32);
      check_status(ta_quantize_int8(x.ptr(), in.ConsumeBool() ? shift.ptr() : nullptr, codes.ptr(), scales.ptr(), nullptr));
      break;
    }
    default: {  // ta_attention_int8kv
      FuzzTensor q = make_tensor(in, {B, nq, hq, D}, dt), o = make_tensor(in, {B, nq, hq, D}, dt);
      FuzzTensor kc = make_tensor(in, {B, nk, hkv, D}, TA_DTYPE_I8), vc = make_tensor(in, {B, nk, hkv, D}, TA_DTYPE_I8);
      FuzzTensor ks = make_tensor(in, {B, hkv, (nk + 63) / 64}, TA_DTYPE_F32), vs = make_tensor(in, {B, hkv, (nk + 63) / 64}, TA_DTYPE_F32);
      FuzzTensor mean = make_tensor(in, {B, hkv, D}, TA_DTYPE_F32), lse = make_tensor(in, {B, hq, nq}, TA_DTYPE_F32);
      ta_attention_options opt = ta_attention_default_options();
      opt.causal = in.ConsumeBool();
      check_status(ta_attention_int8kv(q.ptr(), kc.ptr(), ks.ptr(), vc.ptr(), vs.ptr(), in.ConsumeBool() ? mean.ptr() : nullptr,
                                       &opt, o.ptr(), in.ConsumeBool() ? lse.ptr() : nullptr, nullptr));
    }
  }
  return 0;
}
