// The C API: results through it equal the reference, and every bad argument gets a clear status and
// a message naming the argument, never a crash.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "reference/attention.hpp"
#include "reference/kv_cache.hpp"
#include "test_util.hpp"
#include "turboattn/turboattn.hpp"

using namespace turboattn;
using test::InputKind;

namespace {

struct Problem {
  int b, nq, nk, hq, hkv, d;
  std::vector<uint16_t> q, k, v, out;
  std::vector<float> lse;
  Problem(int b_, int nq_, int nk_, int hq_, int hkv_, int d_) : b(b_), nq(nq_), nk(nk_), hq(hq_), hkv(hkv_), d(d_) {
    std::mt19937_64 rng(std::random_device{}());
    std::vector<float> qf = test::make_input(rng, b * nq, hq, d, InputKind::Normal, 'q');
    std::vector<float> kf = test::make_input(rng, b * nk, hkv, d, InputKind::Normal, 'k');
    std::vector<float> vf = test::make_input(rng, b * nk, hkv, d, InputKind::Normal, 'v');
    q = test::to_half(qf), k = test::to_half(kf), v = test::to_half(vf);
    out.assign(q.size(), 0x7E00);  // NaN poison
    lse.assign(size_t(b) * hq * nq, std::nanf(""));
  }
  ta_tensor tq() { return tensor(q.data(), TA_DTYPE_F16, {b, nq, hq, d}); }
  ta_tensor tk() { return tensor(k.data(), TA_DTYPE_F16, {b, nk, hkv, d}); }
  ta_tensor tv() { return tensor(v.data(), TA_DTYPE_F16, {b, nk, hkv, d}); }
  ta_tensor tout() { return tensor(out.data(), TA_DTYPE_F16, {b, nq, hq, d}); }
  ta_tensor tlse() { return tensor(lse.data(), TA_DTYPE_F32, {b, hq, nq}); }
};

// Calls ta_attention and expects `status` with `needle` in the message.
void expect_error(ta_status status, const std::string& needle, const ta_tensor* q, const ta_tensor* k, const ta_tensor* v,
                  ta_tensor* out, ta_tensor* lse = nullptr, const ta_tensor* cq = nullptr, const ta_tensor* ck = nullptr) {
  const ta_status got = ta_attention(q, k, v, cq, ck, nullptr, out, lse, nullptr);
  EXPECT_EQ(got, status) << ta_last_error();
  EXPECT_NE(std::string(ta_last_error()).find(needle), std::string::npos) << "message: " << ta_last_error();
}

}  // namespace

TEST(CApi, AttentionMatchesReferenceAndWritesEveryOutput) {
  Problem p(2, 70, 90, 4, 2, 64);
  ta_tensor q = p.tq(), k = p.tk(), v = p.tv(), out = p.tout(), lse = p.tlse();
  ta_attention_options opt = ta_attention_default_options();
  opt.causal = 1;
  ASSERT_EQ(ta_attention(&q, &k, &v, nullptr, nullptr, &opt, &out, &lse, nullptr), TA_SUCCESS) << ta_last_error();
  for (uint16_t h : p.out) ASSERT_TRUE(std::isfinite(ref::half_to_float(h)));
  for (float l : p.lse) ASSERT_TRUE(std::isfinite(l));
  // Variable length with the same two sequences gives the same bits.
  std::vector<uint16_t> out2(p.out.size(), 0x7E00);
  int32_t cq[3] = {0, 70, 140}, ck[3] = {0, 90, 180};
  ta_tensor q3 = tensor(p.q.data(), TA_DTYPE_F16, {140, 4, 64}), k3 = tensor(p.k.data(), TA_DTYPE_F16, {180, 2, 64}),
            v3 = tensor(p.v.data(), TA_DTYPE_F16, {180, 2, 64}), o3 = tensor(out2.data(), TA_DTYPE_F16, {140, 4, 64});
  ta_tensor tcq = tensor(cq, TA_DTYPE_I32, {3}), tck = tensor(ck, TA_DTYPE_I32, {3});
  ASSERT_EQ(ta_attention(&q3, &k3, &v3, &tcq, &tck, &opt, &o3, nullptr, nullptr), TA_SUCCESS) << ta_last_error();
  EXPECT_EQ(out2, p.out);
}

TEST(CApi, HeadMajorLayoutThroughStrides) {
  // q stored as [B, H, N, D] in memory, described as [B, N, H, D] with strides: same result.
  Problem p(1, 33, 33, 2, 2, 64);
  ta_tensor q = p.tq(), k = p.tk(), v = p.tv(), out = p.tout();
  ASSERT_EQ(ta_attention(&q, &k, &v, nullptr, nullptr, nullptr, &out, nullptr, nullptr), TA_SUCCESS);
  std::vector<uint16_t> qh(p.q.size()), kh(p.k.size()), vh(p.v.size()), out2(p.out.size(), 0x7E00);
  for (int n = 0; n < 33; ++n)
    for (int h = 0; h < 2; ++h)
      for (int d = 0; d < 64; ++d) {
        const size_t bnhd = (size_t(n) * 2 + h) * 64 + d, bhnd = (size_t(h) * 33 + n) * 64 + d;
        qh[bhnd] = p.q[bnhd], kh[bhnd] = p.k[bnhd], vh[bhnd] = p.v[bnhd];
      }
  auto head_major = [](std::vector<uint16_t>& x) {
    ta_tensor t = tensor(x.data(), TA_DTYPE_F16, {1, 33, 2, 64});
    t.strides[0] = 2 * 33 * 64, t.strides[1] = 64, t.strides[2] = 33 * 64, t.strides[3] = 1;
    return t;
  };
  ta_tensor q2 = head_major(qh), k2 = head_major(kh), v2 = head_major(vh), o2 = tensor(out2.data(), TA_DTYPE_F16, {1, 33, 2, 64});
  ASSERT_EQ(ta_attention(&q2, &k2, &v2, nullptr, nullptr, nullptr, &o2, nullptr, nullptr), TA_SUCCESS) << ta_last_error();
  EXPECT_EQ(out2, p.out);
}

TEST(CApi, RejectsBadAttentionArguments) {
  Problem p(1, 8, 8, 4, 2, 64);
  ta_tensor q = p.tq(), k = p.tk(), v = p.tv(), out = p.tout(), lse = p.tlse();
  expect_error(TA_ERROR_INVALID_ARGUMENT, "q: tensor descriptor is NULL", nullptr, &k, &v, &out);
  expect_error(TA_ERROR_INVALID_ARGUMENT, "out: tensor descriptor is NULL", &q, &k, &v, nullptr);
  ta_tensor bad = q;
  bad.data = nullptr;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "q: data pointer is NULL", &bad, &k, &v, &out);
  bad = q;
  bad.dtype = TA_DTYPE_F32;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "q: dtype f32, expected f16 or bf16", &bad, &k, &v, &out);
  bad = k;
  bad.dtype = TA_DTYPE_BF16;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "k: dtype bf16, expected f16", &q, &bad, &v, &out);
  bad = tensor(p.q.data(), TA_DTYPE_F16, {8, 4, 64});
  expect_error(TA_ERROR_INVALID_ARGUMENT, "q: rank 3", &bad, &k, &v, &out);
  bad = q;
  bad.ndim = 7;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "q: rank 7 is outside", &bad, &k, &v, &out);
  bad = q;
  bad.shape[3] = 80, bad.strides[2] = 80, bad.strides[1] = 320, bad.strides[0] = 2560;
  ta_tensor bad_out = out;
  bad_out.shape[3] = 80;
  expect_error(TA_ERROR_UNSUPPORTED, "head dim 80 is not supported", &bad, &k, &v, &bad_out);
  ta_tensor k3 = tensor(p.k.data(), TA_DTYPE_F16, {1, 8, 3, 64});
  ta_tensor v3 = tensor(p.v.data(), TA_DTYPE_F16, {1, 8, 3, 64});
  expect_error(TA_ERROR_INVALID_ARGUMENT, "4 query heads is not a positive multiple of k's 3 KV heads", &q, &k3, &v3, &out);
  bad = v;
  bad.shape[1] = 7;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "v: shape [1, 7, 2, 64], expected [1, 8, 2, 64]", &q, &k, &bad, &out);
  bad = q;
  bad.strides[3] = 2;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "q: last dimension must be contiguous", &bad, &k, &v, &out);
  bad = lse;
  bad.shape[2] = 9;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "lse: shape [1, 4, 9]", &q, &k, &v, &out, &bad);
  bad = q;
  bad.shape[0] = -1;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "q: negative size", &bad, &k, &v, &out);
  // Variable length: cumulative lengths must start at 0, not decrease and end at the token count.
  ta_tensor q3 = tensor(p.q.data(), TA_DTYPE_F16, {8, 4, 64}), kk3 = tensor(p.k.data(), TA_DTYPE_F16, {8, 2, 64}),
            vv3 = tensor(p.v.data(), TA_DTYPE_F16, {8, 2, 64}), o3 = tensor(p.out.data(), TA_DTYPE_F16, {8, 4, 64});
  int32_t good[3] = {0, 3, 8}, dec[3] = {0, 5, 3}, shortc[3] = {0, 3, 7};
  ta_tensor g = tensor(good, TA_DTYPE_I32, {3}), d = tensor(dec, TA_DTYPE_I32, {3}), s = tensor(shortc, TA_DTYPE_I32, {3});
  expect_error(TA_ERROR_INVALID_ARGUMENT, "cu_seqlens_k decreases at index 2", &q3, &kk3, &vv3, &o3, nullptr, &g, &d);
  expect_error(TA_ERROR_INVALID_ARGUMENT, "cu_seqlens_q ends at 7", &q3, &kk3, &vv3, &o3, nullptr, &s, &g);
  expect_error(TA_ERROR_INVALID_ARGUMENT, "must be given together", &q3, &kk3, &vv3, &o3, nullptr, &g, nullptr);
  int32_t cu_backwards[3] = {8, 3, 0};  // read through a negative stride, this would walk off the array
  ta_tensor neg = tensor(cu_backwards + 2, TA_DTYPE_I32, {3});
  neg.strides[0] = -1;
  expect_error(TA_ERROR_INVALID_ARGUMENT, "cu_seqlens_q: negative stride -1 in dim 0", &q3, &kk3, &vv3, &o3, nullptr, &neg, &g);
  ta_attention_options opt = ta_attention_default_options();
  opt.softmax_scale = NAN;
  EXPECT_EQ(ta_attention(&q, &k, &v, nullptr, nullptr, &opt, &out, nullptr, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("softmax_scale"), std::string::npos);
}

TEST(CApi, CudaTensorsWithoutTheKernelAreAClearError) {
  Problem p(1, 8, 8, 2, 2, 64);
  ta_tensor q = p.tq(), k = p.tk(), v = p.tv(), out = p.tout();
  q.device = k.device = v.device = out.device = TA_DEVICE_CUDA;
  // Host memory marked as CUDA: without the kernels, unsupported; with them, not device memory.
  const ta_status st = ta_attention(&q, &k, &v, nullptr, nullptr, nullptr, &out, nullptr, nullptr);
  const std::string msg = ta_last_error();
  if (st == TA_ERROR_UNSUPPORTED) EXPECT_NE(msg.find("built without CUDA"), std::string::npos) << msg;
  else EXPECT_NE(msg.find("q: marked as a CUDA tensor but its data is not device memory"), std::string::npos) << msg;
  EXPECT_TRUE(st == TA_ERROR_UNSUPPORTED || st == TA_ERROR_INVALID_ARGUMENT) << msg;
  ta_tensor mixed = p.tk();
  EXPECT_EQ(ta_attention(&q, &mixed, &v, nullptr, nullptr, nullptr, &out, nullptr, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k: on cpu, expected cuda"), std::string::npos) << ta_last_error();
}

TEST(CApi, RejectsBadCacheArguments) {
  ta_cache* c = nullptr;
  EXPECT_EQ(ta_cache_create(nullptr, TA_DEVICE_CPU, &c), TA_ERROR_INVALID_ARGUMENT);
  ta_cache_config cfg = ta_cache_default_config();
  cfg.head_dim = 72;
  EXPECT_EQ(ta_cache_create(&cfg, TA_DEVICE_CPU, &c), TA_ERROR_UNSUPPORTED);
  EXPECT_NE(std::string(ta_last_error()).find("config.head_dim"), std::string::npos);
  cfg = ta_cache_default_config();
  const int32_t bits[8] = {4, 4, 3, 4, 4, 4, 4, 4};
  cfg.head_bits = bits;
  EXPECT_EQ(ta_cache_create(&cfg, TA_DEVICE_CPU, &c), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("config.head_bits[2] (layer 0, head 2): 3"), std::string::npos) << ta_last_error();
  cfg = ta_cache_default_config();
  cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.max_seqs = 1, cfg.max_seq_len = 10, cfg.num_pages = 4;
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CPU, &c), TA_SUCCESS);
  int32_t s = -1, s2 = -1;
  ASSERT_EQ(ta_cache_add_sequence(c, &s), TA_SUCCESS);
  EXPECT_EQ(ta_cache_add_sequence(c, &s2), TA_ERROR_OUT_OF_CAPACITY);
  std::vector<uint16_t> kv(11 * 2 * 64, 0x3C00);
  ta_tensor k = tensor(kv.data(), TA_DTYPE_F16, {11, 2, 64});
  int32_t cu[2] = {0, 11};
  ta_tensor tcu = tensor(cu, TA_DTYPE_I32, {2});
  EXPECT_EQ(ta_cache_write(c, 0, &s, 1, &k, &k, &tcu, nullptr), TA_ERROR_OUT_OF_CAPACITY);
  EXPECT_NE(std::string(ta_last_error()).find("over max_seq_len 10"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_cache_write(c, 1, &s, 1, &k, &k, &tcu, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("layer: 1 is outside [0, 1)"), std::string::npos);
  const int32_t unknown = 3;
  EXPECT_EQ(ta_cache_write(c, 0, &unknown, 1, &k, &k, &tcu, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ta_cache_write(c, 0, nullptr, 1, &k, &k, &tcu, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("seqs: is NULL"), std::string::npos);
  ta_tensor k3 = tensor(kv.data(), TA_DTYPE_F16, {11, 1, 128});
  EXPECT_EQ(ta_cache_write(c, 0, &s, 1, &k3, &k3, &tcu, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k: shape [11, 1, 128], expected [11, 2, 64]"), std::string::npos) << ta_last_error();
  // Decode: q_len over the cached length, wrong heads.
  std::vector<uint16_t> qd(1 * 2 * 4 * 64, 0x3C00), od(qd.size());
  ta_tensor q = tensor(qd.data(), TA_DTYPE_F16, {1, 2, 4, 64}), o = tensor(od.data(), TA_DTYPE_F16, {1, 2, 4, 64});
  EXPECT_EQ(ta_decode(c, 0, &s, 1, &q, nullptr, &o, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("q_len 2 exceeds"), std::string::npos) << ta_last_error();
  ta_tensor q3h = tensor(qd.data(), TA_DTYPE_F16, {1, 1, 3, 64});
  EXPECT_EQ(ta_decode(c, 0, &s, 1, &q3h, nullptr, &o, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("3 query heads"), std::string::npos);
  EXPECT_EQ(ta_cache_release_sequence(c, 5), TA_ERROR_INVALID_ARGUMENT);
  ta_cache_destroy(c);
}

// Reservations take the pages of a sequence's next tokens now (checking capacity first), the later
// writes use them, and release returns them; on a CPU cache sync does nothing.
TEST(CApi, ReserveTakesPagesAheadAndReleaseReturnsThem) {
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_layers = 2, cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.max_seqs = 2, cfg.max_seq_len = 1000, cfg.num_pages = 8;
  ta_cache* c = nullptr;
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CPU, &c), TA_SUCCESS);
  int32_t a = -1, b = -1;
  ASSERT_EQ(ta_cache_add_sequence(c, &a), TA_SUCCESS);
  ASSERT_EQ(ta_cache_add_sequence(c, &b), TA_SUCCESS);
  std::mt19937_64 rng(7);
  std::vector<float> kf = test::make_input(rng, 100, 2, 64, InputKind::Normal, 'k');
  std::vector<uint16_t> kv = test::to_half(kf);
  ta_tensor k = tensor(kv.data(), TA_DTYPE_F16, {100, 2, 64});
  int32_t cu[2] = {0, 100};
  ta_tensor tcu = tensor(cu, TA_DTYPE_I32, {2});
  ASSERT_EQ(ta_cache_write(c, 1, &a, 1, &k, &k, &tcu, nullptr), TA_SUCCESS);  // a: 100 tokens in layer 1, none in 0
  int32_t free_pages = -1;
  // From a's longest layer: 100 + 300 = 400 tokens complete blocks 0..5, pages for blocks 1..5.
  ASSERT_EQ(ta_cache_reserve(c, &a, 1, 300, nullptr), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(ta_cache_free_pages(c, &free_pages), TA_SUCCESS);
  EXPECT_EQ(free_pages, 3);
  // Over capacity: nothing taken.
  EXPECT_EQ(ta_cache_reserve(c, &b, 1, 5 * 64, nullptr), TA_ERROR_OUT_OF_CAPACITY);
  EXPECT_NE(std::string(ta_last_error()).find("needs 4 new pages but only 3 are free"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_cache_reserve(c, &a, 1, 901, nullptr), TA_ERROR_OUT_OF_CAPACITY);  // 100 + 901 tokens
  EXPECT_NE(std::string(ta_last_error()).find("would reach 1001 tokens, over max_seq_len 1000"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_cache_reserve(c, &b, 1, -1, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ta_cache_reserve(c, &b, 1, INT64_MAX, nullptr), TA_ERROR_INVALID_ARGUMENT);  // no overflow past the check
  EXPECT_NE(std::string(ta_last_error()).find("expected 0 to max_seq_len (1000)"), std::string::npos) << ta_last_error();
  const int32_t twice[2] = {b, b};
  EXPECT_EQ(ta_cache_reserve(c, twice, 2, 1, nullptr), TA_ERROR_INVALID_ARGUMENT);
  ASSERT_EQ(ta_cache_free_pages(c, &free_pages), TA_SUCCESS);
  EXPECT_EQ(free_pages, 3);
  // Writes within the reservation take no more pages, in either layer.
  ASSERT_EQ(ta_cache_write(c, 0, &a, 1, &k, &k, &tcu, nullptr), TA_SUCCESS);
  ASSERT_EQ(ta_cache_write(c, 1, &a, 1, &k, &k, &tcu, nullptr), TA_SUCCESS);
  ASSERT_EQ(ta_cache_free_pages(c, &free_pages), TA_SUCCESS);
  EXPECT_EQ(free_pages, 3);
  EXPECT_EQ(ta_cache_sync(c), TA_SUCCESS);
  int64_t length = -1;
  ASSERT_EQ(ta_cache_sequence_length(c, 1, a, &length), TA_SUCCESS);
  EXPECT_EQ(length, 200);
  ASSERT_EQ(ta_cache_release_sequence(c, a), TA_SUCCESS);
  ASSERT_EQ(ta_cache_free_pages(c, &free_pages), TA_SUCCESS);
  EXPECT_EQ(free_pages, 8);
  EXPECT_EQ(ta_cache_sync(nullptr), TA_ERROR_INVALID_ARGUMENT);
  ta_cache_destroy(c);
  // The same through the C++ wrapper.
  KvCache cache(cfg);
  const int32_t s = cache.add_sequence();
  cache.reserve({s}, 200);  // 200 tokens complete blocks 0..2: pages for blocks 1 and 2
  EXPECT_EQ(cache.free_pages(), 6);
  EXPECT_THROW(cache.reserve({s}, 1001), Exception);  // more tokens than max_seq_len
  cache.sync();
}

// A decode plan gives ta_decode's bytes in every layer; what can change after its creation (the
// sequences, their lengths, the layer) is checked at each run.
TEST(CApi, DecodePlanEqualsDecodeAndRechecksEachRun) {
  std::mt19937_64 rng(std::random_device{}());
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_layers = 2, cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.max_seqs = 3, cfg.max_seq_len = 300, cfg.num_pages = 16;
  KvCache cache(cfg);
  const std::vector<int32_t> seqs = {cache.add_sequence(), cache.add_sequence()};
  const int lens[2] = {131, 70}, q_len = 2, hq = 4;
  for (int layer = 0; layer < 2; ++layer)
    for (int i = 0; i < 2; ++i) {
      std::vector<float> kf = test::make_input(rng, lens[i], 2, 64, InputKind::Outliers, 'k');
      std::vector<float> vf = test::make_input(rng, lens[i], 2, 64, InputKind::Normal, 'v');
      std::vector<uint16_t> k = test::to_half(kf), v = test::to_half(vf);
      int32_t cu[2] = {0, lens[i]};
      cache.write(layer, {seqs[size_t(i)]}, tensor(k.data(), TA_DTYPE_F16, {lens[i], 2, 64}),
                  tensor(v.data(), TA_DTYPE_F16, {lens[i], 2, 64}), tensor(cu, TA_DTYPE_I32, {2}));
    }
  std::vector<float> qf = test::make_input(rng, 2 * q_len, hq, 64, InputKind::Normal, 'q');
  std::vector<uint16_t> q = test::to_half(qf);
  std::vector<uint16_t> by_plan(q.size(), 0x7E00), by_call(q.size(), 0x7E00);
  const ta_tensor tq = tensor(q.data(), TA_DTYPE_F16, {2, q_len, hq, 64});
  ta_tensor t_plan = tensor(by_plan.data(), TA_DTYPE_F16, {2, q_len, hq, 64});
  ta_tensor t_call = tensor(by_call.data(), TA_DTYPE_F16, {2, q_len, hq, 64});
  DecodePlan plan(cache, seqs, tq, t_plan);
  for (int layer = 0; layer < 2; ++layer) {
    std::fill(by_plan.begin(), by_plan.end(), uint16_t(0x7E00));  // NaN poison
    std::fill(by_call.begin(), by_call.end(), uint16_t(0x7E00));
    plan.run(layer);
    cache.decode(layer, seqs, tq, t_call);
    for (uint16_t h : by_plan) ASSERT_TRUE(std::isfinite(ref::half_to_float(h))) << "layer " << layer;
    EXPECT_EQ(by_plan, by_call) << "layer " << layer;
  }
  // Creation rejects what ta_decode rejects, by the same names.
  ta_decode_plan* bad = nullptr;
  ta_tensor q3h = tensor(q.data(), TA_DTYPE_F16, {2, 1, 3, 64});
  EXPECT_EQ(ta_decode_plan_create(cache.get(), seqs.data(), 2, &q3h, nullptr, &t_plan, &bad), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("3 query heads"), std::string::npos) << ta_last_error();
  const int32_t twice[2] = {seqs[0], seqs[0]};
  EXPECT_EQ(ta_decode_plan_create(cache.get(), twice, 2, &tq, nullptr, &t_plan, &bad), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("appears twice"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_decode_plan_create(cache.get(), seqs.data(), 2, &tq, nullptr, &t_plan, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(bad, nullptr);
  EXPECT_EQ(ta_decode_plan_run(nullptr, 0, nullptr), TA_ERROR_INVALID_ARGUMENT);
  // Each run: the layer, a released sequence.
  ta_decode_plan* raw = nullptr;
  ASSERT_EQ(ta_decode_plan_create(cache.get(), seqs.data(), 2, &tq, nullptr, &t_plan, &raw), TA_SUCCESS) << ta_last_error();
  EXPECT_EQ(ta_decode_plan_run(raw, 2, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("layer: 2 is outside [0, 2)"), std::string::npos) << ta_last_error();
  cache.release_sequence(seqs[1]);
  EXPECT_EQ(ta_decode_plan_run(raw, 0, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("sequence " + std::to_string(seqs[1]) + " is not active"), std::string::npos)
      << ta_last_error();
  // A re-added sequence shorter than q_len: refused by length, not decoded.
  ASSERT_EQ(cache.add_sequence(), seqs[1]);
  EXPECT_EQ(ta_decode_plan_run(raw, 0, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("q_len 2 exceeds"), std::string::npos) << ta_last_error();
  ta_decode_plan_destroy(raw);
}

// append_decode is append then decode: the same cache bytes and outputs, over a step that flushes a
// buffer; what either would refuse is refused before anything is written.
TEST(CApi, AppendDecodeEqualsAppendThenDecode) {
  std::mt19937_64 rng(std::random_device{}());
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_layers = 1, cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.max_seqs = 4, cfg.max_seq_len = 200, cfg.num_pages = 12;
  const int hq = 4, lens[2] = {127, 61};
  KvCache fused(cfg), split(cfg);
  std::vector<int32_t> seqs;
  for (int i = 0; i < 2; ++i) {
    seqs.push_back(fused.add_sequence());
    ASSERT_EQ(split.add_sequence(), seqs.back());
    std::vector<float> kf = test::make_input(rng, lens[i], 2, 64, InputKind::Outliers, 'k');
    std::vector<float> vf = test::make_input(rng, lens[i], 2, 64, InputKind::Normal, 'v');
    std::vector<uint16_t> k = test::to_half(kf), v = test::to_half(vf);
    int32_t cu[2] = {0, lens[i]};
    for (KvCache* c : {&fused, &split})
      c->write(0, {seqs.back()}, tensor(k.data(), TA_DTYPE_F16, {lens[i], 2, 64}), tensor(v.data(), TA_DTYPE_F16, {lens[i], 2, 64}),
               tensor(cu, TA_DTYPE_I32, {2}));
  }
  for (int step = 0; step < 4; ++step) {  // the first sequence's buffer fills at step 0 (token 128)
    std::vector<float> kf = test::make_input(rng, 2, 2, 64, InputKind::Outliers, 'k');
    std::vector<float> vf = test::make_input(rng, 2, 2, 64, InputKind::Normal, 'v');
    std::vector<float> qf = test::make_input(rng, 2, hq, 64, InputKind::Normal, 'q');
    std::vector<uint16_t> k = test::to_half(kf), v = test::to_half(vf), q = test::to_half(qf);
    std::vector<uint16_t> out_fused(q.size(), 0x7E00), out_split(q.size(), 0x7E00);  // NaN poison
    const ta_tensor tk = tensor(k.data(), TA_DTYPE_F16, {2, 2, 64}), tv = tensor(v.data(), TA_DTYPE_F16, {2, 2, 64});
    const ta_tensor tq = tensor(q.data(), TA_DTYPE_F16, {2, 1, hq, 64});
    ta_tensor of = tensor(out_fused.data(), TA_DTYPE_F16, {2, 1, hq, 64}), os = tensor(out_split.data(), TA_DTYPE_F16, {2, 1, hq, 64});
    fused.append_decode(0, seqs, tk, tv, tq, of);
    split.append(0, seqs, tk, tv);
    split.decode(0, seqs, tq, os);
    for (uint16_t h : out_fused) ASSERT_TRUE(std::isfinite(ref::half_to_float(h))) << "step " << step;
    EXPECT_EQ(out_fused, out_split) << "step " << step;
  }
  for (int32_t s : seqs) {
    std::vector<float> kf(size_t(lens[0] + 4) * 2 * 64), vf(kf.size()), ks(kf.size()), vs(kf.size());
    const int64_t n = fused.length(0, s);
    ASSERT_EQ(n, split.length(0, s));
    ta_tensor a = tensor(kf.data(), TA_DTYPE_F32, {n, 2, 64}), b = tensor(vf.data(), TA_DTYPE_F32, {n, 2, 64});
    ta_tensor c = tensor(ks.data(), TA_DTYPE_F32, {n, 2, 64}), d = tensor(vs.data(), TA_DTYPE_F32, {n, 2, 64});
    fused.read(0, s, a, b);
    split.read(0, s, c, d);
    EXPECT_EQ(kf, ks) << "sequence " << s;
    EXPECT_EQ(vf, vs) << "sequence " << s;
  }
  // Refusals write nothing: q_len over the length the append would give, a bad q, a bad k.
  std::vector<uint16_t> one(2 * 2 * 64, 0x3C00), q3(2 * 3 * hq * 64, 0x3C00), out3(q3.size());
  const ta_tensor tk = tensor(one.data(), TA_DTYPE_F16, {2, 2, 64});
  const int64_t before = fused.length(0, seqs[1]);
  const int32_t fresh[1] = {fused.add_sequence()};
  ta_tensor q_long = tensor(q3.data(), TA_DTYPE_F16, {1, 2, hq, 64}), o_long = tensor(out3.data(), TA_DTYPE_F16, {1, 2, hq, 64});
  ta_tensor k_one = tensor(one.data(), TA_DTYPE_F16, {1, 2, 64});
  EXPECT_EQ(ta_cache_append_decode(fused.get(), 0, fresh, 1, &k_one, &k_one, &q_long, nullptr, &o_long, nullptr),
            TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("q_len 2 exceeds"), std::string::npos) << ta_last_error();
  EXPECT_EQ(fused.length(0, fresh[0]), 0);
  ta_tensor q_heads = tensor(q3.data(), TA_DTYPE_F16, {2, 1, 3, 64}), o_heads = tensor(out3.data(), TA_DTYPE_F16, {2, 1, 3, 64});
  EXPECT_EQ(ta_cache_append_decode(fused.get(), 0, seqs.data(), 2, &tk, &tk, &q_heads, nullptr, &o_heads, nullptr),
            TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("3 query heads"), std::string::npos) << ta_last_error();
  ta_tensor q_ok = tensor(q3.data(), TA_DTYPE_F16, {2, 1, hq, 64}), o_ok = tensor(out3.data(), TA_DTYPE_F16, {2, 1, hq, 64});
  ta_tensor k_bad = tensor(one.data(), TA_DTYPE_F16, {2, 1, 128});
  EXPECT_EQ(ta_cache_append_decode(fused.get(), 0, seqs.data(), 2, &k_bad, &k_bad, &q_ok, nullptr, &o_ok, nullptr),
            TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k: shape [2, 1, 128], expected [2, 2, 64]"), std::string::npos) << ta_last_error();
  EXPECT_EQ(fused.length(0, seqs[1]), before);
}

TEST(CApi, QuantizeInt8MatchesReferenceBlocks) {
  std::mt19937_64 rng(std::random_device{}());
  const int B = 2, N = 130, H = 3, D = 96;
  std::vector<float> x = test::make_input(rng, B * N, H, D, InputKind::Outliers, 'k');
  std::vector<uint16_t> xh = test::to_half(x);
  std::vector<int8_t> codes(xh.size(), 99);
  std::vector<float> scales(size_t(B) * H * 3, std::nanf(""));
  ta_tensor tx = tensor(xh.data(), TA_DTYPE_F16, {B, N, H, D}), tc = tensor(codes.data(), TA_DTYPE_I8, {B, N, H, D}),
            ts = tensor(scales.data(), TA_DTYPE_F32, {B, H, 3});
  ASSERT_EQ(ta_quantize_int8(&tx, nullptr, &tc, &ts, nullptr), TA_SUCCESS) << ta_last_error();
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int blk = 0; blk < 3; ++blk) {
        const float s = scales[(size_t(b) * H + h) * 3 + blk];
        ASSERT_GT(s, 0.0f);
        for (int t = blk * 64; t < std::min(N, blk * 64 + 64); ++t)
          for (int d = 0; d < D; ++d) {
            const size_t i = ((size_t(b) * N + t) * H + h) * D + d;
            ASSERT_LE(std::fabs(codes[i] * s - x[i]), 0.5f * s * 1.0001f);
          }
      }
  ts.shape[2] = 2;
  EXPECT_EQ(ta_quantize_int8(&tx, nullptr, &tc, &ts, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("scales: shape [2, 3, 2], expected [2, 3, 3]"), std::string::npos)
      << ta_last_error();
}

TEST(CApi, HeadBitsAssignmentRule) {
  const float priority[8] = {0.5f, 2.0f, 0.1f, 1.0f, /* layer 1 */ 1.0f, 1.0f, 1.0f, 0.2f};
  int32_t bits[8];
  ASSERT_EQ(ta_assign_head_bits(priority, 2, 4, 0.5f, bits), TA_SUCCESS);
  const int32_t want[8] = {2, 4, 2, 4, /* ties: lower index first */ 2, 4, 4, 2};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(bits[i], want[i]) << i;
  EXPECT_EQ(ta_assign_head_bits(priority, 2, 4, 1.5f, bits), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ta_assign_head_bits(nullptr, 2, 4, 0.5f, bits), TA_ERROR_INVALID_ARGUMENT);
  // Across layers: the 4 lowest of all 8, so layer 1 (three ties at 1.0) keeps one 2-bit head less.
  ASSERT_EQ(ta_assign_head_bits_across_layers(priority, 2, 4, 0.5f, bits), TA_SUCCESS) << ta_last_error();
  const int32_t want_model[8] = {2, 4, 2, 2, /* 1.0 ties with layer 0's head 3, which comes first */ 4, 4, 4, 2};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(bits[i], want_model[i]) << i;
  // round(0.3 * 8) = 2 heads: the two lowest.
  ASSERT_EQ(ta_assign_head_bits_across_layers(priority, 2, 4, 0.3f, bits), TA_SUCCESS);
  const int32_t want_two[8] = {4, 4, 2, 4, 4, 4, 4, 2};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(bits[i], want_two[i]) << i;
  const float nan_priority[2] = {1.0f, std::nanf("")};
  EXPECT_EQ(ta_assign_head_bits_across_layers(nan_priority, 1, 2, 0.5f, bits), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("priority[1]"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_assign_head_bits_across_layers(priority, 2, 4, -0.1f, bits), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("fraction_2bit"), std::string::npos) << ta_last_error();
}

// ta_cache_read gives what the reference cache holds, after a bulk write and appends across a flush,
// in any float dtype and through strides; bad arguments are refused by name.
TEST(CApi, CacheReadReturnsWhatTheReferenceHolds) {
  std::mt19937_64 rng(std::random_device{}());
  const int H = 2, D = 64, bulk = 100, appended = 30, n = bulk + appended;
  ta_cache_config cfg = ta_cache_default_config();
  const int32_t bits[4] = {4, 2, 8, 4};
  cfg.num_layers = 2, cfg.num_kv_heads = H, cfg.head_dim = D, cfg.max_seqs = 2, cfg.max_seq_len = 256, cfg.num_pages = 8;
  cfg.head_bits = bits;
  KvCache cache(cfg);
  ref::CacheConfig rcfg;
  rcfg.layers = 2, rcfg.kv_heads = H, rcfg.head_dim = D, rcfg.num_pages = 8, rcfg.max_seqs = 2, rcfg.max_seq_len = 256;
  rcfg.bits.assign(bits, bits + 4);
  ref::KvCache want(rcfg);
  const int32_t s = cache.add_sequence();
  ASSERT_EQ(want.add_sequence(), s);
  std::vector<float> kf = test::make_input(rng, n, H, D, InputKind::Outliers, 'k');
  std::vector<float> vf = test::make_input(rng, n, H, D, InputKind::Normal, 'v');
  std::vector<uint16_t> kh = test::to_half(kf), vh = test::to_half(vf);  // kf, vf now hold the fp16 values
  const int layer = 1;
  int32_t cu[2] = {0, bulk};
  cache.write(layer, {s}, tensor(kh.data(), TA_DTYPE_F16, {bulk, H, D}), tensor(vh.data(), TA_DTYPE_F16, {bulk, H, D}),
              tensor(cu, TA_DTYPE_I32, {2}));
  want.write(layer, s, test::view_of(kf, bulk, H, D), test::view_of(vf, bulk, H, D));
  for (int t = bulk; t < n; ++t) {
    const size_t row = size_t(t) * H * D;
    cache.append(layer, {s}, tensor(kh.data() + row, TA_DTYPE_F16, {1, H, D}), tensor(vh.data() + row, TA_DTYPE_F16, {1, H, D}));
    std::vector<float> k1(kf.begin() + long(row), kf.begin() + long(row + H * D)), v1(vf.begin() + long(row), vf.begin() + long(row + H * D));
    want.write(layer, s, test::view_of(k1, 1, H, D), test::view_of(v1, 1, H, D));
  }
  std::vector<float> wk(kf.size()), wv(vf.size());
  want.read_tokens(layer, s, wk.data(), wv.data());
  std::vector<float> gk(kf.size(), std::nanf("")), gv(vf.size(), std::nanf(""));
  ta_tensor tk = tensor(gk.data(), TA_DTYPE_F32, {n, H, D}), tv = tensor(gv.data(), TA_DTYPE_F32, {n, H, D});
  cache.read(layer, s, tk, tv);
  EXPECT_EQ(gk, wk);
  EXPECT_EQ(gv, wv);
  EXPECT_GT(test::compare(gk, kf).cosine, 0.99);  // and it is the data written, not a copy of zeros
  // f16 out, head-major memory through strides: [H, n, D] viewed as [n, H, D].
  std::vector<uint16_t> hk(kf.size(), 0x7E00), hv(vf.size(), 0x7E00);
  ta_tensor sk = tensor(hk.data(), TA_DTYPE_F16, {n, H, D}), sv = tensor(hv.data(), TA_DTYPE_F16, {n, H, D});
  sk.strides[0] = sv.strides[0] = D, sk.strides[1] = sv.strides[1] = int64_t(n) * D;
  cache.read(layer, s, sk, sv);
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h)
      for (int c = 0; c < D; ++c) {
        const size_t i = (size_t(t) * H + h) * D + c, j = (size_t(h) * n + t) * D + c;
        ASSERT_EQ(hk[j], ref::float_to_half(wk[i])) << t << " " << h << " " << c;
        ASSERT_EQ(hv[j], ref::float_to_half(wv[i])) << t << " " << h << " " << c;
      }
  // Bad arguments.
  ta_tensor short_k = tensor(gk.data(), TA_DTYPE_F32, {n - 1, H, D});
  EXPECT_EQ(ta_cache_read(cache.get(), layer, s, &short_k, &tv), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k: shape [129, 2, 64], expected [130, 2, 64]"), std::string::npos)
      << ta_last_error();
  ta_tensor i8 = tensor(gk.data(), TA_DTYPE_I8, {n, H, D});
  EXPECT_EQ(ta_cache_read(cache.get(), layer, s, &tk, &i8), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("v: dtype"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_cache_read(cache.get(), 2, s, &tk, &tv), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("layer: 2 is outside [0, 2)"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_cache_read(cache.get(), layer, 1, &tk, &tv), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("not active"), std::string::npos) << ta_last_error();
  EXPECT_EQ(ta_cache_read(nullptr, layer, s, &tk, &tv), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ta_cache_read(cache.get(), layer, s, nullptr, &tv), TA_ERROR_INVALID_ARGUMENT);
  // The other layer holds nothing yet: an empty read.
  ta_tensor empty = tensor(nullptr, TA_DTYPE_F32, {0, H, D});
  EXPECT_EQ(ta_cache_read(cache.get(), 0, s, &empty, &empty), TA_SUCCESS) << ta_last_error();
}

TEST(CApi, HeadPriorityRanksWideHeadsHigher) {
  std::mt19937_64 rng(std::random_device{}());
  const int T = 256, H = 3, D = 64;
  std::vector<float> k = test::make_input(rng, T, H, D, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, T, H, D, InputKind::Normal, 'v');
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < D; ++d) {
      k[(size_t(t) * H + 1) * D + d] *= 4.0f;  // head 1: wider K and V
      v[(size_t(t) * H + 1) * D + d] *= 4.0f;
      k[(size_t(t) * H + 2) * D + d] *= 0.25f;  // head 2: narrower
      v[(size_t(t) * H + 2) * D + d] *= 0.25f;
    }
  ta_tensor tk = tensor(k.data(), TA_DTYPE_F32, {T, H, D}), tv = tensor(v.data(), TA_DTYPE_F32, {T, H, D});
  float p[3];
  ASSERT_EQ(ta_head_priority(&tk, &tv, p), TA_SUCCESS) << ta_last_error();
  EXPECT_GT(p[1], p[0]);
  EXPECT_GT(p[0], p[2]);
  EXPECT_NEAR(p[0] + p[1] + p[2], 6.0f, 1e-4f);  // each tensor's terms average to 1 over heads
}

TEST(CApi, AttentionOverInt8KvEqualsAttentionOverFloats) {
  // ta_quantize_int8's codes (K minus its mean) fed to ta_attention_int8kv give ta_attention's bits.
  std::mt19937_64 rng(std::random_device{}());
  const int B = 2, nq = 70, nk = 130, hq = 4, hkv = 2, D = 64, blocks = 3;
  std::vector<float> q = test::make_input(rng, B * nq, hq, D, InputKind::Outliers, 'q');
  std::vector<float> k = test::make_input(rng, B * nk, hkv, D, InputKind::Outliers, 'k');
  std::vector<float> v = test::make_input(rng, B * nk, hkv, D, InputKind::Outliers, 'v');
  std::vector<uint16_t> qh = test::to_half(q), kh = test::to_half(k), vh = test::to_half(v);
  std::vector<float> mean(size_t(B) * hkv * D);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < hkv; ++h) {
      std::vector<float> kb(k.begin() + size_t(b) * nk * hkv * D, k.begin() + size_t(b + 1) * nk * hkv * D);
      ref::head_mean(test::view_of(kb, nk, hkv, D), h, mean.data() + (size_t(b) * hkv + h) * D);
    }
  ta_tensor tq = tensor(qh.data(), TA_DTYPE_F16, {B, nq, hq, D}), tk = tensor(kh.data(), TA_DTYPE_F16, {B, nk, hkv, D}),
            tv = tensor(vh.data(), TA_DTYPE_F16, {B, nk, hkv, D}), tm = tensor(mean.data(), TA_DTYPE_F32, {B, hkv, D});
  std::vector<int8_t> kc(kh.size()), vc(vh.size());
  std::vector<float> ks(size_t(B) * hkv * blocks), vs(ks.size());
  ta_tensor tkc = tensor(kc.data(), TA_DTYPE_I8, {B, nk, hkv, D}), tvc = tensor(vc.data(), TA_DTYPE_I8, {B, nk, hkv, D}),
            tks = tensor(ks.data(), TA_DTYPE_F32, {B, hkv, blocks}), tvs = tensor(vs.data(), TA_DTYPE_F32, {B, hkv, blocks});
  ASSERT_EQ(ta_quantize_int8(&tk, &tm, &tkc, &tks, nullptr), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(ta_quantize_int8(&tv, nullptr, &tvc, &tvs, nullptr), TA_SUCCESS) << ta_last_error();
  ta_attention_options opt = ta_attention_default_options();
  opt.causal = 1;
  std::vector<uint16_t> out_f(qh.size(), 0x7E00), out_i(qh.size(), 0x7E00);
  std::vector<float> lse_f(size_t(B) * hq * nq), lse_i(lse_f.size());
  ta_tensor tof = tensor(out_f.data(), TA_DTYPE_F16, {B, nq, hq, D}), toi = tensor(out_i.data(), TA_DTYPE_F16, {B, nq, hq, D});
  ta_tensor tlf = tensor(lse_f.data(), TA_DTYPE_F32, {B, hq, nq}), tli = tensor(lse_i.data(), TA_DTYPE_F32, {B, hq, nq});
  ASSERT_EQ(ta_attention(&tq, &tk, &tv, nullptr, nullptr, &opt, &tof, &tlf, nullptr), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(ta_attention_int8kv(&tq, &tkc, &tks, &tvc, &tvs, &tm, &opt, &toi, &tli, nullptr), TA_SUCCESS) << ta_last_error();
  EXPECT_EQ(out_f, out_i);
  EXPECT_EQ(lse_f, lse_i);
  // Argument errors name the argument.
  tks.shape[2] = 2;
  EXPECT_EQ(ta_attention_int8kv(&tq, &tkc, &tks, &tvc, &tvs, &tm, &opt, &toi, nullptr, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k_scales: shape [2, 2, 2], expected [2, 2, 3]"), std::string::npos) << ta_last_error();
  tks.shape[2] = 3;
  EXPECT_EQ(ta_attention_int8kv(&tq, &tk, &tks, &tvc, &tvs, &tm, &opt, &toi, nullptr, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k_codes: dtype f16, expected i8"), std::string::npos) << ta_last_error();
  ks[4] = -0.5f;  // a negative scale (b 0, h 1, block 1): an error, no output written
  std::vector<uint16_t> before = out_i;
  EXPECT_EQ(ta_attention_int8kv(&tq, &tkc, &tks, &tvc, &tvs, &tm, &opt, &toi, nullptr, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k_scales: "), std::string::npos) << ta_last_error();
  EXPECT_NE(std::string(ta_last_error()).find("at [0, 1, 1], expected a scale >= 0"), std::string::npos) << ta_last_error();
  EXPECT_EQ(out_i, before);
}
