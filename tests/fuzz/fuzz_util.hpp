// Helpers of the fuzz targets: tensors whose descriptors (shape, strides, dtype, device) come from the
// fuzzer's bytes, each backed by a buffer that covers every element its descriptor can address (the
// C API cannot know a caller's buffer sizes; it must handle anything consistent with them).
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "turboattn/turboattn.h"

namespace turboattn::fuzz {

struct FuzzTensor {
  ta_tensor t{};
  std::vector<uint8_t> storage;
  const ta_tensor* ptr() const { return &t; }
  ta_tensor* ptr() { return &t; }
};

inline int64_t pick_head_dim(FuzzedDataProvider& in) {
  const int64_t dims[] = {64, 96, 128, 256, 0, 1, 80, 512};
  return dims[in.ConsumeIntegralInRange<int>(0, 7)];
}

inline ta_dtype pick_dtype(FuzzedDataProvider& in, ta_dtype usual) {
  return in.ConsumeIntegralInRange<int>(0, 9) ? usual : ta_dtype(in.ConsumeIntegralInRange<int>(0, 7));
}

// A tensor of the given shape (each dim possibly perturbed), dtype and rank, contiguous or strided,
// with random contents (NaN and Inf included), on the CPU (rarely marked CUDA).
inline FuzzTensor make_tensor(FuzzedDataProvider& in, std::vector<int64_t> shape, ta_dtype dtype) {
  FuzzTensor f;
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0) shape.push_back(1);            // wrong rank
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0 && !shape.empty()) shape.pop_back();
  for (int64_t& s : shape)
    if (in.ConsumeIntegralInRange<int>(0, 20) == 0) s = in.ConsumeIntegralInRange<int64_t>(-2, 70);
  const int ndim = int(std::min<size_t>(shape.size(), TA_MAX_DIMS));
  f.t.dtype = pick_dtype(in, dtype);
  f.t.device = in.ConsumeIntegralInRange<int>(0, 30) ? TA_DEVICE_CPU : ta_device(in.ConsumeIntegralInRange<int>(1, 3));
  f.t.ndim = in.ConsumeIntegralInRange<int>(0, 40) ? ndim : in.ConsumeIntegralInRange<int>(-1, 6);
  int64_t stride = 1, extent = 1;
  const bool padded = in.ConsumeBool();
  for (int i = ndim - 1; i >= 0; --i) {
    f.t.shape[i] = shape[size_t(i)];
    f.t.strides[i] = (i == ndim - 1 && in.ConsumeIntegralInRange<int>(0, 20)) ? 1 : stride + (padded ? in.ConsumeIntegralInRange<int>(0, 3) : 0);
    if (in.ConsumeIntegralInRange<int>(0, 30) == 0) f.t.strides[i] = -1;  // a negative stride: must be rejected
    if (f.t.shape[i] > 0 && f.t.strides[i] > 0) extent += (f.t.shape[i] - 1) * f.t.strides[i];
    stride = std::max<int64_t>(1, f.t.strides[i] * std::max<int64_t>(1, f.t.shape[i]));
  }
  if (extent > (1 << 22)) extent = 0;  // too large to back: described over no memory
  f.storage.resize(size_t(std::max<int64_t>(extent, 1)) * 4 + 16);
  for (size_t i = 0; i < f.storage.size(); i += 97) f.storage[i] = in.ConsumeIntegral<uint8_t>();
  f.t.data = (extent > 0 && in.ConsumeIntegralInRange<int>(0, 30)) ? f.storage.data() : nullptr;
  return f;
}

}  // namespace turboattn::fuzz
