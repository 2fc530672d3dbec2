// GPU: FlashQ + SAS prefill attention against the CPU reference and against float64 attention, over
// head dims, lengths, masks, head groups, dtypes, layouts and input kinds. Skipped (reported as
// skipped) when no CUDA device is visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>

#include "gpu_test_util.hpp"
#include "test_util.hpp"
#include "turboattn/turboattn.hpp"

using namespace turboattn;
using test::DeviceBuffer;
using test::have_gpu;
using test::InputKind;
using DeviceMem = DeviceBuffer<uint8_t>;  // sized in bytes

namespace {

struct GpuCase {
  int dim, nq, nk, hq, hkv;
  bool causal;
  InputKind kind;
  ta_dtype dtype = TA_DTYPE_F16;
  bool head_major = false, sas = true, smooth = true;
  int offset = 0;  // elements between an aligned address and the GPU's q, k and v (1: the pre-pass's element-wise loads)
};



ta_tensor describe(void* data, ta_dtype dtype, ta_device dev, int B, int N, int H, int D, bool head_major) {
  ta_tensor t = tensor(data, dtype, {B, N, H, D}, dev);
  if (head_major) t.strides[0] = int64_t(H) * N * D, t.strides[1] = D, t.strides[2] = int64_t(N) * D;
  return t;
}

float value(uint16_t bits, ta_dtype dtype) { return dtype == TA_DTYPE_F16 ? ref::half_to_float(bits) : ref::bf16_to_float(bits); }


// Copies the GPU's output and log-sum-exp back and checks them against the reference's: every output
// written and finite, output within out_bound relative L2, each lse within lse_bound (-inf where the
// reference has it). Returns the GPU output as floats.
std::vector<float> expect_close_to_reference(const DeviceMem& dout, const DeviceMem& dlse, const std::vector<uint16_t>& ref_out,
                                             const std::vector<float>& ref_lse, ta_dtype dtype, double out_bound,
                                             double lse_bound) {
  std::vector<uint16_t> out(ref_out.size());
  std::vector<float> lse(ref_lse.size());
  EXPECT_EQ(cudaMemcpy(out.data(), dout.ptr, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(lse.data(), dlse.ptr, lse.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<float> g(out.size()), r(out.size());
  for (size_t i = 0; i < g.size(); ++i) {
    g[i] = value(out[i], dtype), r[i] = value(ref_out[i], dtype);
    if (!std::isfinite(g[i])) {
      ADD_FAILURE() << "output " << i << " not written or not finite";
      break;
    }
  }
  EXPECT_LE(test::compare(g, r).rel_l2, out_bound);
  double lse_diff = 0;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref_lse[i])) EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << "lse " << i;
    else lse_diff = std::max(lse_diff, double(std::fabs(lse[i] - ref_lse[i])));
  }
  EXPECT_LE(lse_diff, lse_bound);
  return g;
}

// The prefill kernels (mma.sync, and on sm_90a the warp-specialized wgmma kernel) give the same
// bytes: `call` reruns the attention into dout and dlse under each kernel this device and head dim
// have (TURBOATTN_PREFILL_MMA), and each result must equal what the default wrote there. (Which
// kernels a Hopper device must have is KernelSwitchIsCheckedAndHopperRunsWarpSpecialized's to check.)
template <class Call>
void expect_kernels_agree(DeviceMem& dout, DeviceMem& dlse, Call call) {
  const std::vector<uint8_t> out0 = dout.download(), lse0 = dlse.download();
  for (const char* path : {"sm80", "sm90"}) {
    test::ScopedEnv env("TURBOATTN_PREFILL_MMA", path);
    dout.poison(), dlse.poison();
    const ta_status st = call();
    if (st == TA_ERROR_UNSUPPORTED && std::string(path) == "sm90") continue;  // not a Hopper device or build, or head dim
    EXPECT_EQ(st, TA_SUCCESS) << path << ": " << ta_last_error();
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_TRUE(dout.download() == out0) << path << ": output bytes differ from the default kernel's";
    EXPECT_TRUE(dlse.download() == lse0) << path << ": lse bytes differ from the default kernel's";
  }
}

void run_case(const GpuCase& c) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed << " dim " << c.dim << " nq " << c.nq << " nk " << c.nk << " hq " << c.hq
                                  << " hkv " << c.hkv << " causal " << c.causal << " " << test::kind_name(c.kind) << " dtype "
                                  << c.dtype << " head_major " << c.head_major << " sas " << c.sas << " smooth " << c.smooth
                                  << " offset " << c.offset);
  std::mt19937_64 rng(seed);
  const int B = 2;
  std::vector<float> q = test::make_input(rng, B * c.nq, c.hq, c.dim, c.kind, 'q');
  std::vector<float> k = test::make_input(rng, B * c.nk, c.hkv, c.dim, c.kind, 'k');
  std::vector<float> v = test::make_input(rng, B * c.nk, c.hkv, c.dim, c.kind, 'v');
  std::vector<uint16_t> qh = test::store_as(q, B, c.nq, c.hq, c.dim, c.dtype, c.head_major);
  std::vector<uint16_t> kh = test::store_as(k, B, c.nk, c.hkv, c.dim, c.dtype, c.head_major);
  std::vector<uint16_t> vh = test::store_as(v, B, c.nk, c.hkv, c.dim, c.dtype, c.head_major);
  ta_attention_options opt = ta_attention_default_options();
  opt.causal = c.causal, opt.use_sas = c.sas, opt.smooth_k = c.smooth;

  // CPU reference and exact attention.
  std::vector<uint16_t> ref_out(qh.size(), 0x7E00), exact_out(qh.size());
  std::vector<float> ref_lse(size_t(B) * c.hq * c.nq, std::nanf("")), exact_lse(ref_lse.size());
  ta_tensor cq = describe(qh.data(), c.dtype, TA_DEVICE_CPU, B, c.nq, c.hq, c.dim, c.head_major);
  ta_tensor ck = describe(kh.data(), c.dtype, TA_DEVICE_CPU, B, c.nk, c.hkv, c.dim, c.head_major);
  ta_tensor cv = describe(vh.data(), c.dtype, TA_DEVICE_CPU, B, c.nk, c.hkv, c.dim, c.head_major);
  ta_tensor co = tensor(ref_out.data(), c.dtype, {B, c.nq, c.hq, c.dim});
  ta_tensor cl = tensor(ref_lse.data(), TA_DTYPE_F32, {B, c.hq, c.nq});
  ASSERT_EQ(ta_attention(&cq, &ck, &cv, nullptr, nullptr, &opt, &co, &cl, nullptr), TA_SUCCESS) << ta_last_error();
  ta_tensor eo = tensor(exact_out.data(), c.dtype, {B, c.nq, c.hq, c.dim}), el = tensor(exact_lse.data(), TA_DTYPE_F32, {B, c.hq, c.nq});
  ASSERT_EQ(ta_attention_exact(&cq, &ck, &cv, nullptr, nullptr, 0.0f, c.causal, &eo, &el), TA_SUCCESS) << ta_last_error();

  // GPU, outputs poisoned with NaN.
  const size_t skip = 2 * size_t(c.offset);
  DeviceMem dq(qh.size() * 2 + skip), dk(kh.size() * 2 + skip), dv(vh.size() * 2 + skip), dout(qh.size() * 2), dlse(ref_lse.size() * 4);
  ASSERT_EQ(cudaMemcpy(dq.ptr + skip, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dk.ptr + skip, kh.data(), kh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dv.ptr + skip, vh.data(), vh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dout.ptr, 0xFF, qh.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMemset(dlse.ptr, 0xFF, ref_lse.size() * 4), cudaSuccess);
  ta_tensor gq = describe(dq.ptr + skip, c.dtype, TA_DEVICE_CUDA, B, c.nq, c.hq, c.dim, c.head_major);
  ta_tensor gk = describe(dk.ptr + skip, c.dtype, TA_DEVICE_CUDA, B, c.nk, c.hkv, c.dim, c.head_major);
  ta_tensor gv = describe(dv.ptr + skip, c.dtype, TA_DEVICE_CUDA, B, c.nk, c.hkv, c.dim, c.head_major);
  ta_tensor go = tensor(dout.ptr, c.dtype, {B, c.nq, c.hq, c.dim}, TA_DEVICE_CUDA);
  ta_tensor gl = tensor(dlse.ptr, TA_DTYPE_F32, {B, c.hq, c.nq}, TA_DEVICE_CUDA);
  ASSERT_EQ(ta_attention(&gq, &gk, &gv, nullptr, nullptr, &opt, &go, &gl, nullptr), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // Same arithmetic as the reference but for exp2 (MUFU vs libm), the K mean's summation order and
  // the order of the row sums: differences at rounding level.
  const std::vector<float> g = expect_close_to_reference(dout, dlse, ref_out, ref_lse, c.dtype, 5e-3, 2e-2);
  expect_kernels_agree(dout, dlse, [&] { return ta_attention(&gq, &gk, &gv, nullptr, nullptr, &opt, &go, &gl, nullptr); });
  std::vector<float> e(qh.size());
  for (size_t i = 0; i < e.size(); ++i) e[i] = value(exact_out[i], c.dtype);
  const test::ErrorStats vs_exact = test::compare(g, e);
  EXPECT_LE(vs_exact.rel_l2, test::bound_rel_l2(c.kind, int64_t(B) * c.nq * c.hq));
  testing::Test::RecordProperty("rel_l2_vs_exact", std::to_string(vs_exact.rel_l2));
}



}  // namespace

class GpuPrefill : public testing::TestWithParam<std::tuple<int, std::pair<int, int>, bool, InputKind>> {};
TEST_P(GpuPrefill, MatchesReferenceAndFloat64) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [dim, lens, causal, kind] = GetParam();
  run_case({dim, lens.first, lens.second, 4, 2, causal, kind});
}
// {200, 64} causal: the first Q blocks see no key while later ones do (the Hopper kernel's consumers
// then only release the tiles their CTA loads).
const std::pair<int, int> kLengths[] = {{1, 1},    {63, 63},   {65, 65}, {257, 257}, {1000, 1000},
                                        {65, 1000}, {100, 64}, {1, 1000}, {200, 64}};
INSTANTIATE_TEST_SUITE_P(Shapes, GpuPrefill,
                         testing::Combine(testing::Values(64, 96, 128, 256), testing::ValuesIn(kLengths), testing::Bool(),
                                          testing::Values(InputKind::Normal, InputKind::Outliers)));

class GpuPrefillVariants : public testing::TestWithParam<int> {};
TEST_P(GpuPrefillVariants, DtypesLayoutsGroupsOptions) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  GpuCase c{128, 300, 300, 4, 2, true, InputKind::Outliers};
  switch (GetParam()) {
    case 0: c.dtype = TA_DTYPE_BF16; break;
    case 1: c.head_major = true; break;
    case 2: c.hq = 8, c.hkv = 1; break;  // MQA
    case 3: c.hq = 4, c.hkv = 4; break;  // MHA
    case 4: c.sas = false; break;
    case 5: c.smooth = false; break;
    case 6: c.dtype = TA_DTYPE_BF16, c.head_major = true, c.dim = 64, c.kind = InputKind::Normal; break;
    case 7: c.offset = 1; break;                  // misaligned q, k, v: element-wise pre-pass loads
    case 8: c.offset = 1, c.dim = 96; break;      // and at a head dim whose V tasks do not divide the CTA
    case 9: c.offset = 1, c.head_major = true, c.dim = 64, c.dtype = TA_DTYPE_BF16; break;
  }
  run_case(c);
}
INSTANTIATE_TEST_SUITE_P(All, GpuPrefillVariants, testing::Range(0, 10));

TEST(GpuPrefill, RowsWithNoVisibleKeyAreZero) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  run_case({64, 150, 40, 2, 1, true, InputKind::Normal});  // causal, nq > nk: 110 rows see nothing
}

TEST(GpuPrefill, RejectsHostPointersAndVarlen) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  std::vector<uint16_t> x(64 * 64, 0x3C00), o(x.size());
  ta_tensor t = tensor(x.data(), TA_DTYPE_F16, {1, 64, 1, 64}, TA_DEVICE_CUDA), to = tensor(o.data(), TA_DTYPE_F16, {1, 64, 1, 64}, TA_DEVICE_CUDA);
  EXPECT_EQ(ta_attention(&t, &t, &t, nullptr, nullptr, nullptr, &to, nullptr, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("not device memory"), std::string::npos) << ta_last_error();
}

class GpuPrefillVarlen : public testing::TestWithParam<std::tuple<bool, bool>> {};
TEST_P(GpuPrefillVarlen, MatchesReferenceWithCuSeqlensOnEitherDevice) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [causal, cu_on_gpu] = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed << " causal " << causal << " cu_seqlens on gpu " << cu_on_gpu);
  std::mt19937_64 rng(seed);
  const int hq = 4, hkv = 2, d = 128;
  const std::vector<int32_t> q_lens = {1, 0, 65, 200, 130, 64}, k_lens = {1, 5, 65, 300, 100, 64};
  std::vector<int32_t> cu_q{0}, cu_k{0};
  for (size_t i = 0; i < q_lens.size(); ++i) cu_q.push_back(cu_q.back() + q_lens[i]), cu_k.push_back(cu_k.back() + k_lens[i]);
  const int tq = cu_q.back(), tk = cu_k.back(), B = int(q_lens.size());
  std::vector<float> q = test::make_input(rng, tq, hq, d, InputKind::Outliers, 'q');
  std::vector<float> k = test::make_input(rng, tk, hkv, d, InputKind::Outliers, 'k');
  std::vector<float> v = test::make_input(rng, tk, hkv, d, InputKind::Outliers, 'v');
  std::vector<uint16_t> qh = test::to_half(q), kh = test::to_half(k), vh = test::to_half(v);
  ta_attention_options opt = ta_attention_default_options();
  opt.causal = causal;
  std::vector<uint16_t> ref_out(qh.size(), 0x7E00);
  std::vector<float> ref_lse(size_t(hq) * tq);
  ta_tensor cq = tensor(qh.data(), TA_DTYPE_F16, {tq, hq, d}), ck = tensor(kh.data(), TA_DTYPE_F16, {tk, hkv, d}),
            cv = tensor(vh.data(), TA_DTYPE_F16, {tk, hkv, d}), co = tensor(ref_out.data(), TA_DTYPE_F16, {tq, hq, d}),
            cl = tensor(ref_lse.data(), TA_DTYPE_F32, {hq, tq});
  ta_tensor tcq = tensor(cu_q.data(), TA_DTYPE_I32, {B + 1}), tck = tensor(cu_k.data(), TA_DTYPE_I32, {B + 1});
  ASSERT_EQ(ta_attention(&cq, &ck, &cv, &tcq, &tck, &opt, &co, &cl, nullptr), TA_SUCCESS) << ta_last_error();

  DeviceMem dq(qh.size() * 2), dk(kh.size() * 2), dv(vh.size() * 2), dout(qh.size() * 2), dlse(ref_lse.size() * 4), dcq(cu_q.size() * 4),
      dck(cu_k.size() * 4);
  ASSERT_EQ(cudaMemcpy(dq.ptr, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dk.ptr, kh.data(), kh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dv.ptr, vh.data(), vh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dcq.ptr, cu_q.data(), cu_q.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dck.ptr, cu_k.data(), cu_k.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dout.ptr, 0xFF, qh.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMemset(dlse.ptr, 0xFF, ref_lse.size() * 4), cudaSuccess);
  ta_tensor gq = tensor(dq.ptr, TA_DTYPE_F16, {tq, hq, d}, TA_DEVICE_CUDA), gk = tensor(dk.ptr, TA_DTYPE_F16, {tk, hkv, d}, TA_DEVICE_CUDA),
            gv = tensor(dv.ptr, TA_DTYPE_F16, {tk, hkv, d}, TA_DEVICE_CUDA), go = tensor(dout.ptr, TA_DTYPE_F16, {tq, hq, d}, TA_DEVICE_CUDA),
            gl = tensor(dlse.ptr, TA_DTYPE_F32, {hq, tq}, TA_DEVICE_CUDA);
  ta_tensor gcq = cu_on_gpu ? tensor(dcq.ptr, TA_DTYPE_I32, {B + 1}, TA_DEVICE_CUDA) : tcq;
  ta_tensor gck = cu_on_gpu ? tensor(dck.ptr, TA_DTYPE_I32, {B + 1}, TA_DEVICE_CUDA) : tck;
  ASSERT_EQ(ta_attention(&gq, &gk, &gv, &gcq, &gck, &opt, &go, &gl, nullptr), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close_to_reference(dout, dlse, ref_out, ref_lse, TA_DTYPE_F16, 5e-3, 2e-2);
  expect_kernels_agree(dout, dlse, [&] { return ta_attention(&gq, &gk, &gv, &gcq, &gck, &opt, &go, &gl, nullptr); });
}
INSTANTIATE_TEST_SUITE_P(All, GpuPrefillVarlen, testing::Combine(testing::Bool(), testing::Bool()));

class GpuPrefillInt8Kv : public test::GpuTest {};
TEST_F(GpuPrefillInt8Kv, MatchesReferenceOverTheSameCodes) {
  const int B = 2, nq = 190, nk = 333, hq = 8, hkv = 2, D = 128, blocks = TA_BLOCK_COUNT(nk);
  std::vector<float> q = test::make_input(rng, B * nq, hq, D, InputKind::Outliers, 'q');
  std::vector<float> k = test::make_input(rng, B * nk, hkv, D, InputKind::Outliers, 'k');
  std::vector<float> v = test::make_input(rng, B * nk, hkv, D, InputKind::Outliers, 'v');
  std::vector<uint16_t> qh = test::to_half(q), kh = test::to_half(k), vh = test::to_half(v);
  std::vector<float> mean(size_t(B) * hkv * D);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (float& m : mean) m = nd(rng);
  // CPU: codes and the reference.
  std::vector<int8_t> kc(kh.size()), vc(vh.size());
  std::vector<float> ks(size_t(B) * hkv * blocks), vs(ks.size());
  ta_tensor tk = tensor(kh.data(), TA_DTYPE_F16, {B, nk, hkv, D}), tv = tensor(vh.data(), TA_DTYPE_F16, {B, nk, hkv, D});
  ta_tensor tm = tensor(mean.data(), TA_DTYPE_F32, {B, hkv, D});
  ta_tensor tkc = tensor(kc.data(), TA_DTYPE_I8, {B, nk, hkv, D}), tvc = tensor(vc.data(), TA_DTYPE_I8, {B, nk, hkv, D}),
            tks = tensor(ks.data(), TA_DTYPE_F32, {B, hkv, blocks}), tvs = tensor(vs.data(), TA_DTYPE_F32, {B, hkv, blocks});
  ASSERT_EQ(ta_quantize_int8(&tk, &tm, &tkc, &tks, nullptr), TA_SUCCESS);
  ASSERT_EQ(ta_quantize_int8(&tv, nullptr, &tvc, &tvs, nullptr), TA_SUCCESS);
  ta_attention_options opt = ta_attention_default_options();
  opt.causal = 1;
  std::vector<uint16_t> ref_out(qh.size());
  std::vector<float> ref_lse(size_t(B) * hq * nq);
  ta_tensor tq = tensor(qh.data(), TA_DTYPE_F16, {B, nq, hq, D}), to = tensor(ref_out.data(), TA_DTYPE_F16, {B, nq, hq, D}),
            tl = tensor(ref_lse.data(), TA_DTYPE_F32, {B, hq, nq});
  ASSERT_EQ(ta_attention_int8kv(&tq, &tkc, &tks, &tvc, &tvs, &tm, &opt, &to, &tl, nullptr), TA_SUCCESS) << ta_last_error();
  // GPU over the same codes.
  DeviceMem dq(qh.size() * 2), dkc(kc.size()), dvc(vc.size()), dks(ks.size() * 4), dvs(vs.size() * 4), dm(mean.size() * 4),
      dout(qh.size() * 2), dlse(ref_lse.size() * 4);
  ASSERT_EQ(cudaMemcpy(dq.ptr, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dkc.ptr, kc.data(), kc.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dvc.ptr, vc.data(), vc.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dks.ptr, ks.data(), ks.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dvs.ptr, vs.data(), vs.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dm.ptr, mean.data(), mean.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dlse.ptr, 0xFF, ref_lse.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMemset(dout.ptr, 0xFF, qh.size() * 2), cudaSuccess);
  ta_tensor gq = tensor(dq.ptr, TA_DTYPE_F16, {B, nq, hq, D}, TA_DEVICE_CUDA), gkc = tensor(dkc.ptr, TA_DTYPE_I8, {B, nk, hkv, D}, TA_DEVICE_CUDA),
            gvc = tensor(dvc.ptr, TA_DTYPE_I8, {B, nk, hkv, D}, TA_DEVICE_CUDA), gks = tensor(dks.ptr, TA_DTYPE_F32, {B, hkv, blocks}, TA_DEVICE_CUDA),
            gvs = tensor(dvs.ptr, TA_DTYPE_F32, {B, hkv, blocks}, TA_DEVICE_CUDA), gm = tensor(dm.ptr, TA_DTYPE_F32, {B, hkv, D}, TA_DEVICE_CUDA),
            go = tensor(dout.ptr, TA_DTYPE_F16, {B, nq, hq, D}, TA_DEVICE_CUDA), gl = tensor(dlse.ptr, TA_DTYPE_F32, {B, hq, nq}, TA_DEVICE_CUDA);
  ASSERT_EQ(ta_attention_int8kv(&gq, &gkc, &gks, &gvc, &gvs, &gm, &opt, &go, &gl, nullptr), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // The same codes on both sides: only exp2 and the order of the row sums differ.
  expect_close_to_reference(dout, dlse, ref_out, ref_lse, TA_DTYPE_F16, 2e-3, 1e-2);
  expect_kernels_agree(dout, dlse, [&] { return ta_attention_int8kv(&gq, &gkc, &gks, &gvc, &gvs, &gm, &opt, &go, &gl, nullptr); });
}

TEST(GpuPrefill, KernelSwitchIsCheckedAndHopperRunsWarpSpecialized) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer<uint16_t> dq(64 * 64), dout(64 * 64);
  dq.upload(std::vector<uint16_t>(64 * 64, 0x3C00));
  ta_tensor gq = tensor(dq.ptr, TA_DTYPE_F16, {1, 64, 1, 64}, TA_DEVICE_CUDA), go = tensor(dout.ptr, TA_DTYPE_F16, {1, 64, 1, 64}, TA_DEVICE_CUDA);
  {
    test::ScopedEnv env("TURBOATTN_PREFILL_MMA", "sm75");
    EXPECT_EQ(ta_attention(&gq, &gq, &gq, nullptr, nullptr, nullptr, &go, nullptr, nullptr), TA_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ta_last_error()).find("TURBOATTN_PREFILL_MMA=sm75: expected sm80, sm90 or unset"), std::string::npos)
        << ta_last_error();
  }
  int major = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  test::ScopedEnv env("TURBOATTN_PREFILL_MMA", "sm90");
  DeviceBuffer<uint16_t> dq128(64 * 128), dout128(64 * 128);
  dq128.upload(std::vector<uint16_t>(64 * 128, 0x3C00));
  ta_tensor gq128 = tensor(dq128.ptr, TA_DTYPE_F16, {1, 64, 1, 128}, TA_DEVICE_CUDA),
            go128 = tensor(dout128.ptr, TA_DTYPE_F16, {1, 64, 1, 128}, TA_DEVICE_CUDA);
  for (auto [q, o] : {std::pair{&gq, &go}, {&gq128, &go128}}) {
    const ta_status st = ta_attention(q, q, q, nullptr, nullptr, nullptr, o, nullptr, nullptr);
    if (major == 9) EXPECT_EQ(st, TA_SUCCESS) << "a Hopper device must have the warp-specialized kernel at head dim " << q->shape[3]
                                              << ": " << ta_last_error();
    else EXPECT_EQ(st, TA_ERROR_UNSUPPORTED);
  }
  if (major != 9) return;
  // It covers head dims 64 and 128: another is an error, not a fallback.
  DeviceBuffer<uint16_t> dq96(64 * 96), dout96(64 * 96);
  dq96.upload(std::vector<uint16_t>(64 * 96, 0x3C00));
  ta_tensor gq96 = tensor(dq96.ptr, TA_DTYPE_F16, {1, 64, 1, 96}, TA_DEVICE_CUDA), go96 = tensor(dout96.ptr, TA_DTYPE_F16, {1, 64, 1, 96}, TA_DEVICE_CUDA);
  EXPECT_EQ(ta_attention(&gq96, &gq96, &gq96, nullptr, nullptr, nullptr, &go96, nullptr, nullptr), TA_ERROR_UNSUPPORTED);
  EXPECT_NE(std::string(ta_last_error()).find("TURBOATTN_PREFILL_MMA=sm90: head dim 96 has no warp-specialized kernel"), std::string::npos)
      << ta_last_error();
}

namespace {
// Runs GPU attention (causal, q [1, nq, 1, D], k and v [1, nk, 1, D], fp16) and returns the outputs as
// floats.
std::vector<float> gpu_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, int nq,
                                 int nk, int d) {
  std::vector<float> qq = q, kk = k, vv = v;
  std::vector<uint16_t> qh = test::to_half(qq), kh = test::to_half(kk), vh = test::to_half(vv);
  DeviceBuffer<uint16_t> dq(qh.size()), dk(kh.size()), dv(vh.size()), dout(qh.size());
  dq.upload(qh), dk.upload(kh), dv.upload(vh), dout.poison();
  ta_tensor gq = tensor(dq.ptr, TA_DTYPE_F16, {1, nq, 1, d}, TA_DEVICE_CUDA), gk = tensor(dk.ptr, TA_DTYPE_F16, {1, nk, 1, d}, TA_DEVICE_CUDA),
            gv = tensor(dv.ptr, TA_DTYPE_F16, {1, nk, 1, d}, TA_DEVICE_CUDA), go = tensor(dout.ptr, TA_DTYPE_F16, {1, nq, 1, d}, TA_DEVICE_CUDA);
  ta_attention_options opt = ta_attention_default_options();
  opt.causal = 1;
  EXPECT_EQ(ta_attention(&gq, &gk, &gv, nullptr, nullptr, &opt, &go, nullptr, nullptr), TA_SUCCESS) << ta_last_error();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> out;
  for (uint16_t h : dout.download()) out.push_back(ref::half_to_float(h));
  return out;
}
}  // namespace

class GpuPrefillNumerics : public test::GpuTest {};
TEST_F(GpuPrefillNumerics, LargeMagnitudeInputsStayFinite) {
  const int d = 128, n = 300;
  std::vector<float> q = test::make_input(rng, n, 1, d, InputKind::Normal, 'q');
  std::vector<float> k = test::make_input(rng, n, 1, d, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, n, 1, d, InputKind::Normal, 'v');
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = std::clamp(e * 20000.0f, -65504.0f, 65504.0f);  // near the fp16 maximum
  for (float x : gpu_attention(q, k, v, n, n, d)) ASSERT_TRUE(std::isfinite(x));
}

TEST_F(GpuPrefillNumerics, EqualScoresAverageTheValues) {
  const int d = 64, n = 200;
  std::vector<float> q = test::make_input(rng, n, 1, d, InputKind::Normal, 'q');
  std::vector<float> k(size_t(n) * d, 0.5f);  // every key equal: every score of a row equal
  std::vector<float> v = test::make_input(rng, n, 1, d, InputKind::Normal, 'v');
  const std::vector<float> out = gpu_attention(q, k, v, n, n, d);
  std::vector<float> vh = v;
  test::to_half(vh);
  std::vector<double> mean(size_t(d), 0.0);
  for (int i = 0; i < n; ++i) {  // causal: row i averages V rows 0..i
    std::vector<float> got(out.begin() + size_t(i) * d, out.begin() + size_t(i + 1) * d);
    for (int c = 0; c < d; ++c) mean[size_t(c)] = (mean[size_t(c)] * i + vh[size_t(i) * d + c]) / (i + 1);
    EXPECT_LE(test::compare(got, mean).rel_l2, 0.03) << "row " << i;  // only V's INT8 rounding remains
  }
}

// Each kernel (sm90: the Hopper kernel, on compute capability 9.0 devices) at head dims 64 and 128.
class GpuPrefillNan : public test::GpuTestWithParam<std::tuple<int, int, const char*>> {};
TEST_P(GpuPrefillNan, NanInValueReachesExactlyTheRowsThatSeeIt) {
  const auto [nq, d, kernel] = GetParam();
  int major = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  if (std::string(kernel) == "sm90" && major != 9) GTEST_SKIP() << "the Hopper kernel needs a compute capability 9.0 device";
  test::ScopedEnv env("TURBOATTN_PREFILL_MMA", kernel);
  const int nk = 130;  // nq < nk: the causal diagonal is offset by nk - nq
  std::vector<float> q = test::make_input(rng, nq, 1, d, InputKind::Normal, 'q');
  std::vector<float> k = test::make_input(rng, nk, 1, d, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, nk, 1, d, InputKind::Normal, 'v');
  v[size_t(100) * d + 3] = std::nanf("");  // key 100: block 1 (keys 64..127) gets a NaN scale
  const std::vector<float> out = gpu_attention(q, k, v, nq, nk, d);
  for (int i = 0; i < nq; ++i) {
    bool any_nan = false;
    for (int c = 0; c < d; ++c) any_nan = any_nan || std::isnan(out[size_t(i) * d + c]);
    EXPECT_EQ(any_nan, i + nk - nq >= 64) << "query " << i;  // it sees keys up to i + nk - nq
  }
}
INSTANTIATE_TEST_SUITE_P(Offsets, GpuPrefillNan,
                         testing::Combine(testing::Values(130, 100, 77), testing::Values(64, 128), testing::Values("sm80", "sm90")));
