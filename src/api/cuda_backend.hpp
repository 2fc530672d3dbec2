// The CUDA side of the C API: entry points implemented in src/cuda/, compiled only when nvcc is
// found (TURBOATTN_WITH_CUDA). The C API validates arguments before calling any of these.
#pragma once

#include <cstdint>
#include <vector>

#include "turboattn/turboattn.h"

namespace turboattn::cuda {

bool device_available();

// Throws unless ptr is device (or managed) memory of the current device; `name` is the argument's.
void expect_device_pointer(const void* ptr, const char* name);

// Blockwise INT8 quantization (docs/FORMATS.md, FlashQ compute format); arguments already validated.
void quantize_int8(const ta_tensor& x, const ta_tensor* shift, ta_tensor& codes, ta_tensor& scales, void* stream);

// FlashQ + SAS attention of batched q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D]; arguments already validated.
void attention(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const ta_attention_options& options, ta_tensor& out,
               ta_tensor* lse, void* stream);

// Variable-length q [Tq, Hq, D], k, v [Tk, Hkv, D] with host copies of the cumulative lengths;
// lse, if given, is [Hq, Tq].
void attention_varlen(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, const std::vector<int32_t>& cu_q,
                      const std::vector<int32_t>& cu_k, const ta_attention_options& options, ta_tensor& out, ta_tensor* lse,
                      void* stream);

// Attention over K and V already quantized (ta_attention_int8kv); arguments already validated.
void attention_int8kv(const ta_tensor& q, const ta_tensor& k_codes, const ta_tensor& k_scales, const ta_tensor& v_codes,
                      const ta_tensor& v_scales, const ta_tensor* k_mean, const ta_attention_options& options, ta_tensor& out,
                      ta_tensor* lse, void* stream);

// Copies `count` int32 values (element stride `stride`) from device memory, synchronizing the stream.
std::vector<int32_t> read_device_i32(const void* data, int64_t count, int64_t stride, void* stream);

}  // namespace turboattn::cuda
