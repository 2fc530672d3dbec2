// Validation of ta_tensor arguments (each failure names the argument and what was expected) and
// conversion between caller tensors and the float arrays the CPU reference works on.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "turboattn/turboattn.h"

namespace turboattn {

const char* dtype_name(ta_dtype dtype);
const char* device_name(ta_device device);
std::string shape_string(const ta_tensor& t);
int64_t numel(const ta_tensor& t);

// Non-null descriptor and data, rank in [1, 4], non-negative shape, a known dtype and device.
const ta_tensor& check_tensor(const ta_tensor* t, const char* name);
void expect_dtype(const ta_tensor& t, const char* name, std::initializer_list<ta_dtype> allowed);
void expect_rank(const ta_tensor& t, const char* name, int ndim);
void expect_shape(const ta_tensor& t, const char* name, std::initializer_list<int64_t> shape);
void expect_last_dim_contiguous(const ta_tensor& t, const char* name);
void expect_device(const ta_tensor& t, const char* name, ta_device device);
void expect_head_dim(int64_t dim, const char* name);

// Copies a f16/bf16/f32 tensor into contiguous float32, in the tensor's index order.
std::vector<float> to_float(const ta_tensor& t);
// Writes contiguous floats (in t's index order) into t (f16, bf16 or f32), rounding to nearest even.
void from_float(const std::vector<float>& src, ta_tensor& t);

// Cumulative sequence lengths: an i32 [n + 1] tensor whose values start at 0, never decrease and end
// at the total token count. read_cu_seqlens reads and checks one on the CPU.
void check_cu_seqlens_tensor(const ta_tensor& t, const char* name);
void validate_cu_seqlens(const std::vector<int32_t>& cu, const char* name, int64_t total);
std::vector<int32_t> read_cu_seqlens(const ta_tensor& t, const char* name, int64_t total);

}  // namespace turboattn
