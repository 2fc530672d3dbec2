#include "tensor_args.hpp"

#include <cstring>

#include "errors.hpp"
#include "reference/half.hpp"

namespace turboattn {

const char* dtype_name(ta_dtype dtype) {
  switch (dtype) {
    case TA_DTYPE_F16: return "f16";
    case TA_DTYPE_BF16: return "bf16";
    case TA_DTYPE_F32: return "f32";
    case TA_DTYPE_I8: return "i8";
    case TA_DTYPE_U8: return "u8";
    case TA_DTYPE_I32: return "i32";
    case TA_DTYPE_MAX_ENUM: break;
  }
  return "unknown dtype";
}

const char* device_name(ta_device device) {
  switch (device) {
    case TA_DEVICE_CPU: return "cpu";
    case TA_DEVICE_CUDA: return "cuda";
    case TA_DEVICE_MAX_ENUM: break;
  }
  return "unknown device";
}

std::string shape_string(const ta_tensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

int64_t numel(const ta_tensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
  return n;
}

namespace {
size_t element_size(ta_dtype dtype) {
  switch (dtype) {
    case TA_DTYPE_F16:
    case TA_DTYPE_BF16: return 2;
    case TA_DTYPE_F32:
    case TA_DTYPE_I32: return 4;
    case TA_DTYPE_I8:
    case TA_DTYPE_U8: return 1;
    case TA_DTYPE_MAX_ENUM: break;
  }
  return 0;
}
}  // namespace

const ta_tensor& check_tensor(const ta_tensor* t, const char* name) {
  require(t != nullptr, TA_ERROR_INVALID_ARGUMENT, name, ": tensor descriptor is NULL");
  require(t->ndim >= 1 && t->ndim <= TA_MAX_DIMS, TA_ERROR_INVALID_ARGUMENT, name, ": rank ", t->ndim,
          " is outside [1, ", TA_MAX_DIMS, "]");
  require(element_size(t->dtype) != 0, TA_ERROR_INVALID_ARGUMENT, name, ": unknown dtype code ", int(t->dtype));
  require(t->device == TA_DEVICE_CPU || t->device == TA_DEVICE_CUDA, TA_ERROR_INVALID_ARGUMENT, name,
          ": unknown device code ", int(t->device));
  for (int i = 0; i < t->ndim; ++i) {
    require(t->shape[i] >= 0, TA_ERROR_INVALID_ARGUMENT, name, ": negative size ", t->shape[i], " in dim ", i);
    require(t->strides[i] >= 0, TA_ERROR_INVALID_ARGUMENT, name, ": negative stride ", t->strides[i], " in dim ", i);
  }
  // Element count and largest offset must fit in int64 (index arithmetic relies on it).
  int64_t count = 1, extent = 0;
  for (int i = 0; i < t->ndim; ++i) {
    int64_t span = 0;
    const bool ok = !__builtin_mul_overflow(count, t->shape[i], &count) &&
                    (t->shape[i] == 0 || (!__builtin_mul_overflow(t->shape[i] - 1, t->strides[i], &span) &&
                                          !__builtin_add_overflow(extent, span, &extent)));
    require(ok && count <= (int64_t(1) << 48), TA_ERROR_INVALID_ARGUMENT, name, ": shape ", shape_string(*t),
            " with its strides addresses more elements than supported");
  }
  require(t->data != nullptr || count == 0, TA_ERROR_INVALID_ARGUMENT, name, ": data pointer is NULL");
  return *t;
}

void expect_dtype(const ta_tensor& t, const char* name, std::initializer_list<ta_dtype> allowed) {
  std::string list;
  for (ta_dtype d : allowed) {
    if (d == t.dtype) return;
    list += std::string(list.empty() ? "" : " or ") + dtype_name(d);
  }
  throw Error(TA_ERROR_INVALID_ARGUMENT, concat(name, ": dtype ", dtype_name(t.dtype), ", expected ", list));
}

void expect_rank(const ta_tensor& t, const char* name, int ndim) {
  require(t.ndim == ndim, TA_ERROR_INVALID_ARGUMENT, name, ": rank ", t.ndim, " (shape ", shape_string(t),
          "), expected rank ", ndim);
}

void expect_shape(const ta_tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = int(shape.size()) == t.ndim;
  std::string want = "[";
  int i = 0;
  for (int64_t s : shape) {
    ok = ok && i < t.ndim && t.shape[i] == s;
    want += (i++ ? ", " : "") + std::to_string(s);
  }
  require(ok, TA_ERROR_INVALID_ARGUMENT, name, ": shape ", shape_string(t), ", expected ", want, "]");
}

void expect_last_dim_contiguous(const ta_tensor& t, const char* name) {
  require(t.strides[t.ndim - 1] == 1 || t.shape[t.ndim - 1] <= 1, TA_ERROR_INVALID_ARGUMENT, name,
          ": last dimension must be contiguous (stride 1), got stride ", t.strides[t.ndim - 1]);
}

void expect_device(const ta_tensor& t, const char* name, ta_device device) {
  require(t.device == device, TA_ERROR_INVALID_ARGUMENT, name, ": on ", device_name(t.device), ", expected ",
          device_name(device), " like the other tensors");
}

void expect_head_dim(int64_t dim, const char* name) {
  require(dim == 64 || dim == 96 || dim == 128 || dim == 256, TA_ERROR_UNSUPPORTED, name, ": head dim ", dim,
          " is not supported (64, 96, 128 or 256)");
}

namespace {
// Calls fn(linear index, element offset) over t in index order.
template <class Fn>
void for_each_offset(const ta_tensor& t, Fn&& fn) {
  int64_t idx[TA_MAX_DIMS] = {0, 0, 0, 0};
  const int64_t n = numel(t);
  for (int64_t linear = 0; linear < n; ++linear) {
    int64_t off = 0;
    for (int d = 0; d < t.ndim; ++d) off += idx[d] * t.strides[d];
    fn(linear, off);
    for (int d = t.ndim - 1; d >= 0; --d) {
      if (++idx[d] < t.shape[d]) break;
      idx[d] = 0;
    }
  }
}
}  // namespace

std::vector<float> to_float(const ta_tensor& t) {
  std::vector<float> out(size_t(numel(t)));
  const auto* u16 = static_cast<const uint16_t*>(t.data);
  const auto* f32 = static_cast<const float*>(t.data);
  switch (t.dtype) {
    case TA_DTYPE_F16: for_each_offset(t, [&](int64_t i, int64_t o) { out[size_t(i)] = ref::half_to_float(u16[o]); }); break;
    case TA_DTYPE_BF16: for_each_offset(t, [&](int64_t i, int64_t o) { out[size_t(i)] = ref::bf16_to_float(u16[o]); }); break;
    case TA_DTYPE_F32: for_each_offset(t, [&](int64_t i, int64_t o) { out[size_t(i)] = f32[o]; }); break;
    default: throw Error(TA_ERROR_INTERNAL, "to_float: unsupported dtype");
  }
  return out;
}

void from_float(const std::vector<float>& src, ta_tensor& t) {
  auto* u16 = static_cast<uint16_t*>(t.data);
  auto* f32 = static_cast<float*>(t.data);
  switch (t.dtype) {
    case TA_DTYPE_F16: for_each_offset(t, [&](int64_t i, int64_t o) { u16[o] = ref::float_to_half(src[size_t(i)]); }); break;
    case TA_DTYPE_BF16: for_each_offset(t, [&](int64_t i, int64_t o) { u16[o] = ref::float_to_bf16(src[size_t(i)]); }); break;
    case TA_DTYPE_F32: for_each_offset(t, [&](int64_t i, int64_t o) { f32[o] = src[size_t(i)]; }); break;
    default: throw Error(TA_ERROR_INTERNAL, "from_float: unsupported dtype");
  }
}

void check_cu_seqlens_tensor(const ta_tensor& t, const char* name) {
  expect_dtype(t, name, {TA_DTYPE_I32});
  expect_rank(t, name, 1);
  require(t.shape[0] >= 2, TA_ERROR_INVALID_ARGUMENT, name, ": needs at least 2 entries (batch + 1), got ", t.shape[0]);
}

void validate_cu_seqlens(const std::vector<int32_t>& cu, const char* name, int64_t total) {
  require(cu[0] == 0, TA_ERROR_INVALID_ARGUMENT, name, "[0] is ", cu[0], ", expected 0");
  for (size_t i = 1; i < cu.size(); ++i)
    require(cu[i] >= cu[i - 1], TA_ERROR_INVALID_ARGUMENT, name, " decreases at index ", i, " (", cu[i - 1], " -> ",
            cu[i], "): sequence lengths must be non-negative");
  require(cu.back() == total, TA_ERROR_INVALID_ARGUMENT, name, " ends at ", cu.back(), ", expected the total token count ",
          total);
}

std::vector<int32_t> read_cu_seqlens(const ta_tensor& t, const char* name, int64_t total) {
  check_cu_seqlens_tensor(t, name);
  expect_device(t, name, TA_DEVICE_CPU);
  std::vector<int32_t> cu(size_t(t.shape[0]));
  for (int64_t i = 0; i < t.shape[0]; ++i) cu[size_t(i)] = static_cast<const int32_t*>(t.data)[i * t.strides[0]];
  validate_cu_seqlens(cu, name, total);
  return cu;
}

}  // namespace turboattn
