// GPU: blockwise INT8 quantization kernel against the CPU reference, bit for bit. Skipped (reported
// as skipped) when no CUDA device is visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <tuple>

#include "cuda/quantize.cuh"
#include "gpu_test_util.hpp"
#include "test_util.hpp"
#include "turboattn/turboattn.hpp"

using namespace turboattn;
using test::DeviceBuffer;
using test::have_gpu;
using test::InputKind;

namespace {

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call



}  // namespace

// Layouts of x (and of the codes): token-major [B, N, H, D]; head-major strides; token-major one
// element past an aligned address (the kernels' element-wise path instead of 16-byte loads).
enum class Layout { TokenMajor, HeadMajor, Misaligned };

class GpuQuantize : public testing::TestWithParam<std::tuple<int, int, ta_dtype, InputKind, bool, Layout>> {};

TEST_P(GpuQuantize, BitExactWithReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [n, dim, dtype, kind, with_shift, layout] = GetParam();
  const bool head_major = layout == Layout::HeadMajor;
  const size_t offset = layout == Layout::Misaligned ? 1 : 0;  // elements
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int B = 2, H = 3, blocks = TA_BLOCK_COUNT(n);
  std::vector<float> x = test::make_input(rng, B * n, H, dim, kind, 'k');
  if (n > 64) {  // special blocks: batch 1 head 0 block 0 all zero, head 1 block 1 holds a NaN
    for (int t = 0; t < 64; ++t)
      for (int d = 0; d < dim; ++d) x[((size_t(n) + t) * H + 0) * dim + d] = 0.0f;
    x[((size_t(n) + 70) * H + 1) * dim + 5] = std::nanf("");
  }
  std::vector<uint16_t> bits = test::store_as(x, B, n, H, dim, dtype, head_major);
  std::vector<float> shift(size_t(B) * H * dim);
  std::normal_distribution<float> nd(0.0f, 5.0f);
  for (float& s : shift) s = nd(rng);

  auto describe = [&](void* data, ta_device dev) {
    ta_tensor t = tensor(data, dtype, {B, n, H, dim}, dev);
    if (head_major) t.strides[0] = int64_t(H) * n * dim, t.strides[1] = dim, t.strides[2] = int64_t(n) * dim;
    return t;
  };
  // CPU reference.
  std::vector<int8_t> codes_ref(bits.size(), 0x55);
  std::vector<float> scales_ref(size_t(B) * H * blocks, std::nanf(""));
  ta_tensor cx = describe(bits.data(), TA_DEVICE_CPU);
  ta_tensor cc = tensor(codes_ref.data(), TA_DTYPE_I8, {B, n, H, dim}), cs = tensor(scales_ref.data(), TA_DTYPE_F32, {B, H, blocks});
  ta_tensor csh = tensor(shift.data(), TA_DTYPE_F32, {B, H, dim});
  ASSERT_EQ(ta_quantize_int8(&cx, with_shift ? &csh : nullptr, &cc, &cs, nullptr), TA_SUCCESS) << ta_last_error();
  // GPU, outputs poisoned first.
  DeviceBuffer<uint16_t> dx(bits.size() + offset);
  DeviceBuffer<int8_t> dc(bits.size() + offset);
  DeviceBuffer<float> ds(scales_ref.size()), dsh(shift.size());
  std::vector<uint16_t> shifted(offset, 0);
  shifted.insert(shifted.end(), bits.begin(), bits.end());
  dx.upload(shifted);
  dsh.upload(shift);
  CUDA_OK(cudaMemset(dc.ptr, 0x55, dc.n));
  CUDA_OK(cudaMemset(ds.ptr, 0xFF, ds.n * sizeof(float)));
  ta_tensor gx = describe(dx.ptr + offset, TA_DEVICE_CUDA);
  ta_tensor gc = tensor(dc.ptr + offset, TA_DTYPE_I8, {B, n, H, dim}, TA_DEVICE_CUDA);
  ta_tensor gs = tensor(ds.ptr, TA_DTYPE_F32, {B, H, blocks}, TA_DEVICE_CUDA);
  ta_tensor gsh = tensor(dsh.ptr, TA_DTYPE_F32, {B, H, dim}, TA_DEVICE_CUDA);
  ASSERT_EQ(ta_quantize_int8(&gx, with_shift ? &gsh : nullptr, &gc, &gs, nullptr), TA_SUCCESS) << ta_last_error();
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<int8_t> codes = dc.download();
  ASSERT_TRUE(offset == 0 || codes[0] == 0x55) << "a code was written before the tensor";
  codes.erase(codes.begin(), codes.begin() + offset);
  const std::vector<float> scales = ds.download();
  for (size_t i = 0; i < scales.size(); ++i)  // NaN scales included: one bit pattern (TA_NAN_BITS)
    ASSERT_EQ(std::memcmp(&scales[i], &scales_ref[i], 4), 0) << "scale " << i << ": " << scales[i] << " vs " << scales_ref[i];
  for (size_t i = 0; i < codes.size(); ++i) ASSERT_EQ(codes[i], codes_ref[i]) << "code " << i;
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuQuantize,
                         testing::Combine(testing::Values(1, 63, 65, 1000), testing::Values(64, 96, 128, 256),
                                          testing::Values(TA_DTYPE_F16, TA_DTYPE_BF16),
                                          testing::Values(InputKind::Normal, InputKind::Outliers), testing::Bool(),
                                          testing::Values(Layout::TokenMajor, Layout::HeadMajor, Layout::Misaligned)));

// The transposed V layout's key order (vt_position) and its inverse (vt_key, which the quantization
// kernel writes by) agree, and vt_position permutes each group of 16 keys.
TEST(VtLayout, KeyOrderAndItsInverseAgree) {
  for (int key = 0; key < 64; ++key) {
    EXPECT_EQ(cuda::vt_key(cuda::vt_position(key)), key) << "key " << key;
    EXPECT_EQ(cuda::vt_position(key) / 16, key / 16) << "key " << key;
  }
  EXPECT_EQ(cuda::vt_position(2), 4);  // position 4i + e holds key {2i, 2i + 1, 8 + 2i, 9 + 2i}[e]
  EXPECT_EQ(cuda::vt_position(9), 3);
}

TEST(GpuQuantize, HostPointerMarkedCudaIsRejected) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  std::vector<uint16_t> x(64 * 64, 0x3C00);
  std::vector<int8_t> c(x.size());
  std::vector<float> s(1);
  ta_tensor tx = tensor(x.data(), TA_DTYPE_F16, {1, 64, 1, 64}, TA_DEVICE_CUDA);
  ta_tensor tc = tensor(c.data(), TA_DTYPE_I8, {1, 64, 1, 64}, TA_DEVICE_CUDA);
  ta_tensor ts = tensor(s.data(), TA_DTYPE_F32, {1, 1, 1}, TA_DEVICE_CUDA);
  EXPECT_EQ(ta_quantize_int8(&tx, nullptr, &tc, &ts, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("x: marked as a CUDA tensor but its data is not device memory"),
            std::string::npos)
      << ta_last_error();
}
