// FlashQ + SAS reference attention against exact float64 attention: head dims, masks, GQA/MQA, odd
// lengths, random normal and outlier-channel inputs, SAS on and off.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <tuple>

#include "reference/attention.hpp"
#include "test_util.hpp"
#include "turboattn/format.h"

using namespace turboattn;
using namespace turboattn::ref;
using test::InputKind;

namespace {

struct Case {
  int dim, nq, nk, hq, hkv;
  bool causal, sas;
  InputKind kind;
};

// Bounds beside test::bound_rel_l2 (docs/FORMATS.md, "Measured error"). The log-sum-exp bound is on
// the worst row; under a causal mask the first rows see one key or a few, so their error is that of
// a few INT8 dot products. On normal inputs at 257 tokens, causal, the largest of 3000 draws was
// 0.050 (0.05 was the bound until a CI run crossed it); the bound is twice that.
double bound_cosine(InputKind kind) { return kind == InputKind::Normal ? 0.999 : 0.98; }
double bound_lse(InputKind kind) { return kind == InputKind::Normal ? 0.1 : 1.0; }

struct Result {
  test::ErrorStats out;
  double lse_max_abs = 0;
  std::vector<float> got;
};

Result run(const Case& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> q = test::make_input(rng, c.nq, c.hq, c.dim, c.kind, 'q');
  std::vector<float> k = test::make_input(rng, c.nk, c.hkv, c.dim, c.kind, 'k');
  std::vector<float> v = test::make_input(rng, c.nk, c.hkv, c.dim, c.kind, 'v');
  test::to_half(q), test::to_half(k), test::to_half(v);
  const HeadsView qv = test::view_of(q, c.nq, c.hq, c.dim), kv = test::view_of(k, c.nk, c.hkv, c.dim),
                  vv = test::view_of(v, c.nk, c.hkv, c.dim);
  Result r;
  r.got.assign(q.size(), std::nanf(""));  // poisoned: every element must be written
  std::vector<float> lse(size_t(c.hq) * c.nq, std::nanf(""));
  AttentionOptions opt;
  opt.causal = c.causal, opt.sas = c.sas;
  flashq_attention(qv, kv, vv, opt, r.got.data(), lse.data());
  std::vector<double> want(q.size()), want_lse(lse.size());
  exact_attention(qv, kv, vv, 0.0f, c.causal, want.data(), want_lse.data());
  r.out = test::compare(r.got, want);
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(want_lse[i])) {
      EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << "row " << i << " sees no key: lse must be -inf";
      continue;
    }
    r.lse_max_abs = std::max(r.lse_max_abs, std::fabs(double(lse[i]) - want_lse[i]));
  }
  return r;
}

void check(const Case& c) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed << " dim " << c.dim << " nq " << c.nq << " nk " << c.nk << " hq " << c.hq
                                  << " hkv " << c.hkv << " causal " << c.causal << " sas " << c.sas << " "
                                  << test::kind_name(c.kind));
  const Result r = run(c, seed);
  EXPECT_TRUE(r.out.finite);
  EXPECT_LE(r.out.rel_l2, test::bound_rel_l2(c.kind, int64_t(c.nq) * c.hq));
  EXPECT_GE(r.out.cosine, bound_cosine(c.kind));
  EXPECT_LE(r.lse_max_abs, bound_lse(c.kind));
  testing::Test::RecordProperty("rel_l2", std::to_string(r.out.rel_l2));
  testing::Test::RecordProperty("lse_max_abs", std::to_string(r.lse_max_abs));
}

}  // namespace

class HeadDims : public testing::TestWithParam<std::tuple<int, bool, InputKind>> {};
TEST_P(HeadDims, MatchesFloat64) {
  const auto [dim, causal, kind] = GetParam();
  check({dim, 257, 257, 4, 2, causal, true, kind});
}
INSTANTIATE_TEST_SUITE_P(All, HeadDims,
                         testing::Combine(testing::Values(64, 96, 128, 256), testing::Bool(),
                                          testing::Values(InputKind::Normal, InputKind::Outliers)));

class Lengths : public testing::TestWithParam<std::tuple<std::pair<int, int>, bool>> {};
TEST_P(Lengths, OddAndUnequalLengths) {
  const auto [lens, causal] = GetParam();
  check({128, lens.first, lens.second, 2, 1, causal, true, InputKind::Normal});
}
INSTANTIATE_TEST_SUITE_P(All, Lengths,
                         testing::Combine(testing::Values(std::pair{1, 1}, std::pair{1, 63}, std::pair{63, 63}, std::pair{65, 65},
                                                          std::pair{1000, 1000}, std::pair{65, 1000}, std::pair{1, 1000},
                                                          std::pair{100, 64}),
                                          testing::Bool()));

class HeadGroups : public testing::TestWithParam<std::tuple<int, bool>> {};
TEST_P(HeadGroups, MhaGqaMqa) {
  const auto [hkv, sas] = GetParam();
  check({64, 130, 190, 4, hkv, true, sas, InputKind::Outliers});
}
INSTANTIATE_TEST_SUITE_P(All, HeadGroups, testing::Combine(testing::Values(4, 2, 1), testing::Bool()));

TEST(Attention, KMeanOfNonFiniteKeysIsTheStoredNan) {
  // The K mean the cache stores: TA_NAN_BITS for a channel with a NaN or with both infinities (x86 would
  // give other NaNs), an infinity for a channel with infinities of one sign.
  const int n = 3, d = 8;
  std::vector<float> k(size_t(n) * d, 1.0f);
  k[0 * d + 1] = std::nanf("");
  k[1 * d + 2] = INFINITY, k[2 * d + 2] = -INFINITY;
  k[1 * d + 3] = -INFINITY;
  std::vector<float> mean(d);
  ref::head_mean(test::view_of(k, n, 1, d), 0, mean.data());
  auto bits = [](float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return b;
  };
  EXPECT_EQ(bits(mean[1]), TA_NAN_BITS);
  EXPECT_EQ(bits(mean[2]), TA_NAN_BITS);
  EXPECT_EQ(mean[3], -INFINITY);
  EXPECT_EQ(mean[0], 1.0f);
}

TEST(Attention, CausalMaskIsBottomRightAligned) {
  // With nq < nk, the last query sees every key and the first sees nk - nq + 1: compare with exact
  // attention on exactly those keys.
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int d = 64, nq = 5, nk = 70;
  std::vector<float> q = test::make_input(rng, nq, 1, d, InputKind::Normal, 'q');
  std::vector<float> k = test::make_input(rng, nk, 1, d, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, nk, 1, d, InputKind::Normal, 'v');
  test::to_half(q), test::to_half(k), test::to_half(v);
  std::vector<double> full(q.size());
  exact_attention(test::view_of(q, nq, 1, d), test::view_of(k, nk, 1, d), test::view_of(v, nk, 1, d), 0, true, full.data(),
                  nullptr);
  for (int i = 0; i < nq; ++i) {
    const int visible = nk - nq + i + 1;
    std::vector<double> one(static_cast<size_t>(d));
    exact_attention(test::view_of(std::vector<float>(q.begin() + i * d, q.begin() + (i + 1) * d), 1, 1, d),
                    test::view_of(k, visible, 1, d), test::view_of(v, visible, 1, d), 0, false, one.data(), nullptr);
    for (int c = 0; c < d; ++c) EXPECT_NEAR(full[size_t(i) * d + c], one[size_t(c)], 1e-12);
  }
}

TEST(Attention, RowsWithNoVisibleKeyAreZero) {
  // Causal with nq > nk: the first nq - nk queries see no key; defined output 0, lse -inf.
  const Case c{64, 80, 16, 2, 1, true, true, InputKind::Normal};
  const Result r = run(c, std::random_device{}());
  for (int i = 0; i < c.nq - c.nk; ++i)
    for (int h = 0; h < c.hq; ++h)
      for (int d = 0; d < c.dim; ++d) ASSERT_EQ(r.got[(size_t(i) * c.hq + h) * c.dim + d], 0.0f);
  EXPECT_LE(r.out.rel_l2, 0.02);
}

TEST(Attention, LargeMagnitudeInputsStayFinite) {
  std::mt19937_64 rng(std::random_device{}());
  const int d = 128, n = 100;
  std::vector<float> q = test::make_input(rng, n, 1, d, InputKind::Normal, 'q');
  std::vector<float> k = q, v = q;
  for (float& x : q) x *= 6000.0f;  // near the fp16 maximum once products are formed
  for (float& x : k) x = std::clamp(x * 20000.0f, -65504.0f, 65504.0f);
  for (float& x : v) x = std::clamp(x * 20000.0f, -65504.0f, 65504.0f);
  test::to_half(q), test::to_half(k), test::to_half(v);
  std::vector<float> out(q.size(), std::nanf(""));
  flashq_attention(test::view_of(q, n, 1, d), test::view_of(k, n, 1, d), test::view_of(v, n, 1, d), AttentionOptions{},
                   out.data(), nullptr);
  for (float x : out) ASSERT_TRUE(std::isfinite(x));
}

TEST(Attention, NanInputPropagatesToItsRows) {
  std::mt19937_64 rng(std::random_device{}());
  const int d = 64, n = 130;
  std::vector<float> q = test::make_input(rng, n, 1, d, InputKind::Normal, 'q');
  std::vector<float> k = test::make_input(rng, n, 1, d, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, n, 1, d, InputKind::Normal, 'v');
  v[size_t(100) * d + 3] = std::nanf("");  // key 100 (block 1) is NaN in V
  std::vector<float> out(q.size());
  AttentionOptions opt;
  opt.causal = true;
  flashq_attention(test::view_of(q, n, 1, d), test::view_of(k, n, 1, d), test::view_of(v, n, 1, d), opt, out.data(), nullptr);
  for (int i = 0; i < n; ++i) {
    bool any_nan = false;
    for (int c = 0; c < d; ++c) any_nan = any_nan || std::isnan(out[size_t(i) * d + c]);
    // Queries that see block 1 (keys 64..) read its NaN V scale; earlier queries do not.
    EXPECT_EQ(any_nan, i >= 64) << "query " << i;
  }
}

TEST(Attention, EmptyRowsKeepZeroOutputAndMinusInfinityLseWhateverTheirQuery) {
  // A row that sees no key is defined as 0 with lse -inf, even if its query holds a NaN (the smoothing
  // correction of the log-sum-exp must not reach it).
  std::mt19937_64 rng(std::random_device{}());
  const int d = 64, nq = 100, nk = 40;
  std::vector<float> q = test::make_input(rng, nq, 1, d, InputKind::Normal, 'q');
  std::vector<float> k = test::make_input(rng, nk, 1, d, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, nk, 1, d, InputKind::Normal, 'v');
  q[5] = std::nanf("");  // row 0
  std::vector<float> out(q.size()), lse(static_cast<size_t>(nq));
  AttentionOptions opt;
  opt.causal = true;
  flashq_attention(test::view_of(q, nq, 1, d), test::view_of(k, nk, 1, d), test::view_of(v, nk, 1, d), opt, out.data(), lse.data());
  for (int i = 0; i < nq - nk; ++i) {
    EXPECT_TRUE(std::isinf(lse[size_t(i)]) && lse[size_t(i)] < 0) << "row " << i << ": " << lse[size_t(i)];
    for (int c = 0; c < d; ++c) ASSERT_EQ(out[size_t(i) * d + c], 0.0f);
  }
}
