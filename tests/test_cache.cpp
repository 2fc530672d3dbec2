// The compressed paged KV cache on the CPU: bulk write == token-by-token appends (bit-exact), decode
// against float64 attention, split-KV, capacity errors that leave the cache untouched, memory figures.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "reference/kv_cache.hpp"
#include "reference/quant.hpp"
#include "test_util.hpp"
#include "turboattn/turboattn.hpp"

namespace test = turboattn::test;
using namespace turboattn::ref;
using turboattn::tensor;
using turboattn::first_block_bytes, turboattn::buffer_k_offset, turboattn::buffer_v_offset, turboattn::buffer_k_scale_offset,
    turboattn::buffer_v_scale_offset, turboattn::PageBook;
using test::InputKind;

namespace {

std::vector<int> bits_for(const std::string& name, int layers, int heads) {
  std::vector<int> b(size_t(layers) * heads);
  for (size_t i = 0; i < b.size(); ++i) {
    if (name == "8") b[i] = 8;
    else if (name == "4") b[i] = 4;
    else if (name == "2") b[i] = 2;
    else b[i] = (i % 2) ? 2 : 4;  // "mix": half the heads at 2 bits
  }
  return b;
}

CacheConfig config(const std::string& bits, int heads, int dim, int pages = 64, int layers = 1) {
  CacheConfig c;
  c.layers = layers, c.kv_heads = heads, c.head_dim = dim, c.num_pages = pages, c.max_seqs = 4, c.max_seq_len = 1 << 20;
  c.bits = bits_for(bits, layers, heads);
  return c;
}

// Equal bytes of a sequence's full blocks: its first block's (every head's) and its pages'.
void expect_same_blocks(const KvCache& a, int seq_a, const KvCache& b, int seq_b, int layer, int64_t blocks) {
  const int64_t page_bytes = a.layout(layer).page_bytes;
  if (blocks > 0)
    for (int h = 0; h < a.config().kv_heads; ++h)
      ASSERT_EQ(0, std::memcmp(a.first_block(layer, seq_a, h), b.first_block(layer, seq_b, h),
                               size_t(first_block_bytes(a.config().head_dim))))
          << "first block, head " << h;
  for (int64_t blk = 1; blk < blocks; ++blk) {
    const size_t i = size_t(PageBook::table_index(blk));
    ASSERT_EQ(0, std::memcmp(a.page(layer, a.page_table(seq_a)[i]), b.page(layer, b.page_table(seq_b)[i]), size_t(page_bytes)))
        << "block " << blk;
  }
}

// Equal lengths, page tables, bytes of every full block, and the valid rows of every buffer.
void expect_same_contents(const KvCache& a, const KvCache& b, int layer, int seq) {
  ASSERT_EQ(a.length(layer, seq), b.length(layer, seq));
  const auto& cfg = a.config();
  const int64_t len = a.length(layer, seq), blocks = len / TA_BLOCK_TOKENS;
  const int buffered = int(len % TA_BLOCK_TOKENS), d = cfg.head_dim;
  ASSERT_EQ(a.page_table(seq).size(), b.page_table(seq).size());
  ASSERT_NO_FATAL_FAILURE(expect_same_blocks(a, seq, b, seq, layer, blocks));
  for (int h = 0; h < cfg.kv_heads; ++h) {
    const uint8_t *ba = a.buffer(layer, seq, h), *bb = b.buffer(layer, seq, h);
    for (int64_t off : {buffer_k_offset(d), buffer_v_offset(d)})
      ASSERT_EQ(0, std::memcmp(ba + off, bb + off, size_t(buffered) * d)) << "buffer codes, head " << h;
    for (int64_t off : {buffer_k_scale_offset(d), buffer_v_scale_offset(d)})
      ASSERT_EQ(0, std::memcmp(ba + off, bb + off, size_t(buffered) * 4)) << "buffer scales, head " << h;
  }
}

}  // namespace

class AppendEqualsBulk : public testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(AppendEqualsBulk, BitExact) {
  const auto [bits, n] = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int heads = 4, d = 64;
  std::vector<float> k = test::make_input(rng, n, heads, d, InputKind::Outliers, 'k');
  std::vector<float> v = test::make_input(rng, n, heads, d, InputKind::Outliers, 'v');
  test::to_half(k), test::to_half(v);
  const HeadsView kv = test::view_of(k, n, heads, d), vv = test::view_of(v, n, heads, d);
  std::vector<float> mean(size_t(heads) * d);
  for (int h = 0; h < heads; ++h) head_mean(kv, h, mean.data() + size_t(h) * d);

  KvCache bulk(config(bits, heads, d)), steps(config(bits, heads, d)), mixed(config(bits, heads, d));
  const int s = bulk.add_sequence();
  ASSERT_EQ(steps.add_sequence(), s);
  ASSERT_EQ(mixed.add_sequence(), s);
  bulk.write(0, s, kv, vv);  // computes the same mean itself
  for (int t = 0; t < n; ++t) {
    HeadsView kt = kv, vt = vv;
    kt.data = kv.row(t, 0), vt.data = vv.row(t, 0), kt.tokens = vt.tokens = 1;
    steps.write(0, s, kt, vt, mean.data());
  }
  const int first = n / 3;  // a bulk write followed by appends, as after a prefill
  HeadsView k1 = kv, v1 = vv, k2 = kv, v2 = vv;
  k1.tokens = v1.tokens = first;
  k2.data = kv.row(first, 0), v2.data = vv.row(first, 0), k2.tokens = v2.tokens = n - first;
  mixed.write(0, s, k1, v1, mean.data());
  mixed.write(0, s, k2, v2);
  expect_same_contents(bulk, steps, 0, s);
  expect_same_contents(bulk, mixed, 0, s);
}
INSTANTIATE_TEST_SUITE_P(All, AppendEqualsBulk,
                         testing::Combine(testing::Values("8", "4", "2", "mix"), testing::Values(1, 63, 64, 65, 200)));

namespace {
struct DecodeCase {
  std::string bits;
  int len, q_len;
  InputKind kind;
};

struct DecodeErrors {
  test::ErrorStats vs_exact;        // against float64 attention over the original K and V
  test::ErrorStats vs_dequantized;  // against float64 attention over the cache's own K and V
  std::vector<float> out;
};

DecodeErrors decode_errors(const DecodeCase& c, uint64_t seed, int split_tiles = 0) {
  std::mt19937_64 rng(seed);
  const int hkv = 2, hq = 8, d = 128;
  std::vector<float> k = test::make_input(rng, c.len, hkv, d, c.kind, 'k');
  std::vector<float> v = test::make_input(rng, c.len, hkv, d, c.kind, 'v');
  std::vector<float> q = test::make_input(rng, c.q_len, hq, d, c.kind, 'q');
  test::to_half(k), test::to_half(v), test::to_half(q);
  KvCache cache(config(c.bits, hkv, d));
  const int s = cache.add_sequence();
  cache.write(0, s, test::view_of(k, c.len, hkv, d), test::view_of(v, c.len, hkv, d));
  DecodeErrors e;
  e.out.assign(q.size(), std::nanf(""));
  cache.decode(0, s, test::view_of(q, c.q_len, hq, d), 0.0f, true, split_tiles, e.out.data());
  std::vector<double> want(q.size());
  exact_attention(test::view_of(q, c.q_len, hq, d), test::view_of(k, c.len, hkv, d), test::view_of(v, c.len, hkv, d), 0.0f,
                  true, want.data(), nullptr);
  e.vs_exact = test::compare(e.out, want);
  std::vector<float> kd(k.size()), vd(v.size());
  cache.read_tokens(0, s, kd.data(), vd.data());
  exact_attention(test::view_of(q, c.q_len, hq, d), test::view_of(kd, c.len, hkv, d), test::view_of(vd, c.len, hkv, d), 0.0f,
                  true, want.data(), nullptr);
  e.vs_dequantized = test::compare(e.out, want);
  return e;
}

// Bounds against float64 over the original K and V (docs/FORMATS.md, "Measured error"): about 1.5x
// the largest error measured on normal inputs; on outlier inputs, whose errors have a heavy tail,
// above the largest of 300 draws and of the CI runs (one reached 0.59 at 4 bits). 2-bit storage is
// checked through the other two tests only.
double bound_vs_exact(const std::string& bits, InputKind kind) {
  const bool normal = kind == InputKind::Normal;
  if (bits == "8") return normal ? 0.04 : 0.2;
  if (bits == "4") return normal ? 0.22 : 0.8;
  return INFINITY;
}
}  // namespace

// Cached lengths x query lengths (q_len <= length: the queries are the last cached tokens).
const std::pair<int, int> kDecodeLengths[] = {{1, 1}, {65, 1}, {65, 3}, {1000, 1}, {1000, 3}};

class Decode : public testing::TestWithParam<std::tuple<std::string, std::pair<int, int>, InputKind>> {};

TEST_P(Decode, MatchesFloat64) {
  const auto [bits, lengths, kind] = GetParam();
  const auto [len, q_len] = lengths;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed << " bits " << bits << " len " << len << " q_len " << q_len << " "
                                  << test::kind_name(kind));
  const DecodeErrors e = decode_errors({bits, len, q_len, kind}, seed);
  EXPECT_TRUE(e.vs_exact.finite);
  EXPECT_LE(e.vs_exact.rel_l2, bound_vs_exact(bits, kind));
  // Against the values the cache holds, only the INT8 query and the P codes remain: the prefill bounds.
  EXPECT_LE(e.vs_dequantized.rel_l2, test::bound_rel_l2(kind, int64_t(q_len) * 8));
  testing::Test::RecordProperty("rel_l2", std::to_string(e.vs_exact.rel_l2));
}
INSTANTIATE_TEST_SUITE_P(All, Decode,
                         testing::Combine(testing::Values("8", "4", "2", "mix"), testing::ValuesIn(kDecodeLengths),
                                          testing::Values(InputKind::Normal, InputKind::Outliers)));

TEST(Decode, ErrorGrowsAsBitsShrink) {
  double sum[3] = {0, 0, 0};
  const char* bits[3] = {"8", "4", "2"};
  for (int trial = 0; trial < 4; ++trial) {
    const uint64_t seed = std::random_device{}();
    for (int b = 0; b < 3; ++b) sum[b] += decode_errors({bits[b], 500, 1, InputKind::Normal}, seed).vs_exact.rel_l2;
  }
  EXPECT_LT(sum[0], sum[1]);
  EXPECT_LT(sum[1], sum[2]);
}

TEST(Decode, SplitKvMatchesSinglePass) {
  // Splits change which tiles the skip rule drops and the fp32 rounding of the merge only.
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const DecodeErrors one = decode_errors({"4", 1000, 2, InputKind::Normal}, seed);
  const DecodeErrors split1 = decode_errors({"4", 1000, 2, InputKind::Normal}, seed, 1);
  const DecodeErrors split3 = decode_errors({"4", 1000, 2, InputKind::Normal}, seed, 3);
  EXPECT_LE(test::compare(split1.out, one.out).rel_l2, 0.03);
  EXPECT_LE(test::compare(split3.out, one.out).rel_l2, 0.03);
  EXPECT_LE(split3.vs_dequantized.rel_l2, 0.02);
}

TEST(CacheCapacity, FullPoolIsAnErrorAndNothingChanges) {
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.num_pages = 2, cfg.max_seqs = 2, cfg.max_seq_len = 1000;
  turboattn::KvCache cache(cfg);
  const int32_t s = cache.add_sequence();
  std::mt19937_64 rng(std::random_device{}());
  auto tokens = [&](int n) {
    std::vector<float> x = test::make_input(rng, n, 2, 64, InputKind::Normal, 'k');
    return test::to_half(x);
  };
  std::vector<uint16_t> k = tokens(100), v = tokens(100);
  int32_t cu[2] = {0, 100};
  ta_tensor kt = tensor(k.data(), TA_DTYPE_F16, {100, 2, 64}), vt = tensor(v.data(), TA_DTYPE_F16, {100, 2, 64});
  ta_tensor cut = tensor(cu, TA_DTYPE_I32, {2});
  cache.write(0, {s}, kt, vt, cut);
  EXPECT_EQ(cache.free_pages(), 2);  // the first block is in the sequence's slot, not in a page
  cache.write(0, {s}, kt, vt, cut);  // 200 tokens: blocks 1 and 2 take both pages
  EXPECT_EQ(cache.free_pages(), 0);
  EXPECT_EQ(cache.length(0, s), 200);
  // A third page is needed by 56 more tokens: refused before anything is written.
  std::vector<uint16_t> more_k = tokens(56), more_v = tokens(56);
  ta_tensor mk = tensor(more_k.data(), TA_DTYPE_F16, {56, 2, 64}), mv = tensor(more_v.data(), TA_DTYPE_F16, {56, 2, 64});
  cu[1] = 56;
  const ta_status st = ta_cache_write(cache.get(), 0, &s, 1, &mk, &mv, &cut, nullptr);
  EXPECT_EQ(st, TA_ERROR_OUT_OF_CAPACITY);
  EXPECT_NE(std::string(ta_last_error()).find("pages"), std::string::npos) << ta_last_error();
  EXPECT_EQ(cache.length(0, s), 200);
  // 55 more tokens fit in the buffer.
  cu[1] = 55;
  mk.shape[0] = mv.shape[0] = 55;
  EXPECT_EQ(ta_cache_write(cache.get(), 0, &s, 1, &mk, &mv, &cut, nullptr), TA_SUCCESS) << ta_last_error();
  EXPECT_EQ(cache.length(0, s), 255);
  // Releasing the sequence returns its pages.
  cache.release_sequence(s);
  EXPECT_EQ(cache.free_pages(), 2);
  EXPECT_THROW(cache.length(0, s), turboattn::Exception);
}

TEST(CacheMemory, BytesPerValueAtHeadDim128) {
  // The figures docs/FORMATS.md states: 8 KV heads, D = 128, one layer, all metadata included.
  auto bytes_per_value = [](const std::vector<int32_t>& bits) {
    ta_cache_config cfg = ta_cache_default_config();
    cfg.num_kv_heads = 8, cfg.head_dim = 128, cfg.num_pages = 1, cfg.head_bits = bits.data();
    turboattn::KvCache cache(cfg);
    const ta_cache_memory m = cache.memory();
    EXPECT_EQ(m.fp16_bytes_per_token, 8 * 128 * 2 * 2);
    return m.bytes_per_token / (8 * 128 * 2);
  };
  EXPECT_DOUBLE_EQ(bytes_per_value(std::vector<int32_t>(8, 8)), 131200.0 / 131072);
  EXPECT_DOUBLE_EQ(bytes_per_value(std::vector<int32_t>(8, 4)), 68736.0 / 131072);
  EXPECT_DOUBLE_EQ(bytes_per_value(std::vector<int32_t>(8, 2)), 42112.0 / 131072);
  EXPECT_DOUBLE_EQ(bytes_per_value({4, 2, 4, 2, 4, 2, 4, 2}), 55424.0 / 131072);
  EXPECT_GT(2.0 / bytes_per_value({4, 2, 4, 2, 4, 2, 4, 2}), 4.4);  // vs FP16: over the paper's 4.4x
}

TEST(CacheReadBack, ReconstructionErrorShrinksWithBits) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  double prev = 0;
  for (const char* bits : {"8", "4", "2"}) {
    std::mt19937_64 rng(seed);
    const int n = 200, h = 2, d = 64;
    std::vector<float> k = test::make_input(rng, n, h, d, InputKind::Outliers, 'k');
    std::vector<float> v = test::make_input(rng, n, h, d, InputKind::Outliers, 'v');
    test::to_half(k), test::to_half(v);
    KvCache cache(config(bits, h, d));
    const int s = cache.add_sequence();
    cache.write(0, s, test::view_of(k, n, h, d), test::view_of(v, n, h, d));
    std::vector<float> kb(k.size()), vb(v.size());
    cache.read_tokens(0, s, kb.data(), vb.data());
    const double ek = test::compare(kb, k).rel_l2, ev = test::compare(vb, v).rel_l2;
    EXPECT_GT(ek + ev, prev) << bits;
    EXPECT_LT(ek, std::string(bits) == "2" ? 0.2 : 0.05) << bits;
    prev = ek + ev;
  }
}

TEST(CacheFirstBlock, KeptAt8BitsAndInNoPage) {
  // A sequence's first 64 tokens read back exactly as an 8-bit block (per-token INT8 of K minus its
  // mean, then requantized to the block's scale: stage 1 alone), at every width; the blocks after it
  // are compressed (at 2 bits they lose far more) and only they take pages.
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int n = 200, h = 2, d = 64, block = TA_BLOCK_TOKENS;
  std::vector<float> k = test::make_input(rng, n, h, d, InputKind::Outliers, 'k');
  std::vector<float> v = test::make_input(rng, n, h, d, InputKind::Outliers, 'v');
  test::to_half(k), test::to_half(v);
  for (const char* bits : {"8", "4", "2"}) {
    SCOPED_TRACE(bits);
    KvCache cache(config(bits, h, d));
    const int s = cache.add_sequence();
    EXPECT_EQ(cache.pages_needed(0, s, n), n / block - 1);
    cache.write(0, s, test::view_of(k, n, h, d), test::view_of(v, n, h, d));
    EXPECT_EQ(cache.page_table(s).size(), size_t(n / block - 1));
    std::vector<float> kb(k.size()), vb(v.size());
    cache.read_tokens(0, s, kb.data(), vb.data());
    std::vector<float> row(static_cast<size_t>(d)), want_k(size_t(block) * h * d), want_v(want_k.size());
    for (int hh = 0; hh < h; ++hh) {
      const float* mean = cache.k_mean(0, s) + size_t(hh) * d;
      for (int which = 0; which < 2; ++which) {
        std::vector<int8_t> q(size_t(block) * d);
        std::vector<float> token_scale(static_cast<size_t>(block));
        for (int t = 0; t < block; ++t) {
          const float* x = (which ? v : k).data() + (size_t(t) * h + hh) * d;
          for (int c = 0; c < d; ++c) row[size_t(c)] = which ? x[c] : x[c] - mean[c];
          token_scale[size_t(t)] = quantize_block_int8(row.data(), 1, d, d, q.data() + size_t(t) * d, d);
        }
        const float scale = requantize_tokens_to_block(q.data(), token_scale.data(), block, d);
        for (int t = 0; t < block; ++t)
          for (int c = 0; c < d; ++c) {
            const float value = float(q[size_t(t) * d + c]) * scale;
            (which ? want_v : want_k)[(size_t(t) * h + hh) * d + c] = which ? value : value + mean[c];
          }
      }
    }
    ASSERT_EQ(0, std::memcmp(kb.data(), want_k.data(), want_k.size() * 4)) << "first block K";
    ASSERT_EQ(0, std::memcmp(vb.data(), want_v.data(), want_v.size() * 4)) << "first block V";
    if (std::string(bits) == "2") {
      const size_t first = size_t(block) * h * d, second = 2 * first;
      auto err = [&](const std::vector<float>& got, const std::vector<float>& want, size_t from, size_t to) {
        return test::compare(std::vector<float>(got.begin() + long(from), got.begin() + long(to)),
                             std::vector<float>(want.begin() + long(from), want.begin() + long(to)))
            .rel_l2;
      };
      EXPECT_GT(err(kb, k, first, second), 5 * err(kb, k, 0, first)) << "the second block is compressed";
    }
  }
}

TEST(CacheStage2, KeyGridsPerChannelOver64TokensAt4BitsAnd16At2) {
  // docs/FORMATS.md 3.3, derived here independently: a paged block's K reads back as stage 1 (per-token
  // INT8, requantized to the block's scale) and then, per channel, one grid over the block's 64 tokens
  // at 4 bits and one over each quarter's 16 tokens at 2 bits. Each channel's quarters are made to sit
  // far apart, so a grid over the wrong tokens cannot give the same values.
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int n = 2 * TA_BLOCK_TOKENS + 5, h = 2, d = 64, block = TA_BLOCK_TOKENS;
  std::vector<float> k = test::make_input(rng, n, h, d, InputKind::Outliers, 'k');
  std::vector<float> v = test::make_input(rng, n, h, d, InputKind::Normal, 'v');
  for (int t = block; t < 2 * block; ++t)
    for (int c = 0; c < h * d; ++c) k[size_t(t) * h * d + size_t(c)] += (c % 2 ? 6.0f : -6.0f) * (t / 16 % 2 ? 1.0f : -1.0f);
  test::to_half(k), test::to_half(v);
  for (int bits : {4, 2}) {
    SCOPED_TRACE(bits);
    const int group = bits == 2 ? 16 : 64;
    KvCache cache(config(std::to_string(bits), h, d));
    const int s = cache.add_sequence();
    cache.write(0, s, test::view_of(k, n, h, d), test::view_of(v, n, h, d));
    std::vector<float> kb(k.size()), vb(v.size());
    cache.read_tokens(0, s, kb.data(), vb.data());
    for (int hh = 0; hh < h; ++hh) {
      const float* mean = cache.k_mean(0, s) + size_t(hh) * d;
      std::vector<float> row(static_cast<size_t>(d));
      std::vector<int8_t> q(size_t(block) * d);
      std::vector<float> token_scale(static_cast<size_t>(block));
      for (int t = 0; t < block; ++t) {
        const float* x = k.data() + (size_t(block + t) * h + hh) * d;
        for (int c = 0; c < d; ++c) row[size_t(c)] = x[c] - mean[c];
        token_scale[size_t(t)] = quantize_block_int8(row.data(), 1, d, d, q.data() + size_t(t) * d, d);
      }
      const float scale = requantize_tokens_to_block(q.data(), token_scale.data(), block, d);
      std::vector<uint8_t> codes(static_cast<size_t>(group));
      for (int c = 0; c < d; ++c)
        for (int t0 = 0; t0 < block; t0 += group) {
          const Stage2Params p = stage2_encode(q.data() + size_t(t0) * d + c, group, d, bits, codes.data());
          for (int t = 0; t < group; ++t) {
            const float want = float(stage2_decode(codes[size_t(t)], p)) * scale + mean[c];
            ASSERT_EQ(kb[(size_t(block + t0 + t) * h + hh) * d + c], want) << "head " << hh << " channel " << c << " token " << t0 + t;
          }
        }
    }
  }
}

TEST(CacheServing, RandomizedStartAppendFinishKeepsEverySequenceExact) {
  // A long serving simulation on a small pool: sequences start with a prompt, grow one token per
  // step, finish and free their pages, which later sequences reuse. After every step: no page is
  // lost or shared, and each live sequence's cache equals a bulk write of its tokens (bit for bit).
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int heads = 2, d = 64, pages = 24, slots = 4;
  CacheConfig cfg = config("mix", heads, d, pages);
  cfg.max_seqs = slots;
  KvCache cache(cfg);
  struct Live {
    std::vector<float> k, v, mean;
  };
  std::vector<Live> live(static_cast<size_t>(slots));
  std::vector<bool> active(static_cast<size_t>(slots), false);
  std::uniform_int_distribution<int> prompt_len(1, 150), action(0, 9);
  auto tokens = [&](int n, char role) {
    std::vector<float> x = test::make_input(rng, n, heads, d, InputKind::Outliers, role);
    test::to_half(x);
    return x;
  };
  int starts = 0, appends = 0, finishes = 0, compared_blocks = 0, reused_pages = 0;
  std::vector<bool> ever_used(size_t(pages), false);
  for (int step = 0; step < 3000; ++step) {
    const int a = action(rng);
    const int s = int(rng() % slots);
    if (!active[size_t(s)] && a < 3) {  // start: a prompt, if the pool has room
      const int n = prompt_len(rng);
      if (cache.pages_needed(0, s, n) > cache.free_pages()) continue;
      const int got = cache.add_sequence();
      ASSERT_GE(got, 0);
      Live& l = live[size_t(got)];
      l.k = tokens(n, 'k'), l.v = tokens(n, 'v');
      l.mean.assign(size_t(heads) * d, 0.0f);
      for (int h = 0; h < heads; ++h) head_mean(test::view_of(l.k, n, heads, d), h, l.mean.data() + size_t(h) * d);
      cache.write(0, got, test::view_of(l.k, n, heads, d), test::view_of(l.v, n, heads, d));
      active[size_t(got)] = true;
      ++starts;
    } else if (active[size_t(s)] && a < 8) {  // decode step: one token
      if (cache.pages_needed(0, s, 1) > cache.free_pages()) continue;
      Live& l = live[size_t(s)];
      const std::vector<float> k1 = tokens(1, 'k'), v1 = tokens(1, 'v');
      l.k.insert(l.k.end(), k1.begin(), k1.end()), l.v.insert(l.v.end(), v1.begin(), v1.end());
      cache.write(0, s, test::view_of(k1, 1, heads, d), test::view_of(v1, 1, heads, d));
      ++appends;
    } else if (active[size_t(s)]) {  // finish
      for (int p : cache.page_table(s)) ever_used[size_t(p)] = true;
      cache.release_sequence(s);
      active[size_t(s)] = false;
      ++finishes;
    }
    // Pages: every page is either free or held by exactly one live sequence.
    std::vector<int> owner(size_t(pages), -1);
    int held = 0;
    for (int q = 0; q < slots; ++q) {
      if (!active[size_t(q)]) continue;
      ASSERT_EQ(cache.length(0, q), int64_t(live[size_t(q)].k.size()) / (heads * d));
      ASSERT_EQ(int64_t(cache.page_table(q).size()), std::max<int64_t>(0, PageBook::table_index(cache.length(0, q) / TA_BLOCK_TOKENS)));
      for (int p : cache.page_table(q)) {
        ASSERT_EQ(owner[size_t(p)], -1) << "page " << p << " held twice";
        owner[size_t(p)] = q, ++held;
        if (ever_used[size_t(p)]) ++reused_pages;
      }
    }
    ASSERT_EQ(held + cache.free_pages(), pages) << "a page leaked at step " << step;
    // Contents of one live sequence against a fresh bulk write of its tokens.
    for (int q = 0; q < slots; ++q) {
      if (!active[size_t(q)] || rng() % 4) continue;
      const Live& l = live[size_t(q)];
      const int n = int(l.k.size()) / (heads * d);
      KvCache fresh(cfg);
      const int f = fresh.add_sequence();
      fresh.write(0, f, test::view_of(l.k, n, heads, d), test::view_of(l.v, n, heads, d), l.mean.data());
      SCOPED_TRACE(testing::Message() << "sequence " << q << " at step " << step);
      ASSERT_NO_FATAL_FAILURE(expect_same_blocks(cache, q, fresh, f, 0, n / TA_BLOCK_TOKENS));
      compared_blocks += n / TA_BLOCK_TOKENS;
    }
  }
  // The simulation exercised what it claims to: many lives, flushes, reuse of freed pages.
  EXPECT_GE(starts, 20);
  EXPECT_GE(finishes, 15);
  EXPECT_GE(appends, 500);
  EXPECT_GE(compared_blocks, 200);
  EXPECT_GT(reused_pages, 0);
}

TEST(CacheLongContext, DecodeOver128kTokens) {
  // 131,072 tokens (2,048 pages) written in bulk, then one decode step: no overflow, finite, within
  // the 4-bit bound of float64 attention over the original K and V (N(0, 1) inputs, as at 1k tokens),
  // and exact page accounting. (Peakier rows lose accuracy at this length through the tile skip rule:
  // docs/FORMATS.md, section 7.)
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int n = 131072, hkv = 1, hq = 4, d = 64;
  std::vector<float> k = test::make_input(rng, n, hkv, d, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, n, hkv, d, InputKind::Normal, 'v');
  std::vector<float> q = test::make_input(rng, 1, hq, d, InputKind::Normal, 'q');
  test::to_half(k), test::to_half(v), test::to_half(q);
  CacheConfig cfg = config("4", hkv, d, n / TA_BLOCK_TOKENS + 1);
  KvCache cache(cfg);
  const int s = cache.add_sequence();
  ASSERT_EQ(cache.pages_needed(0, s, n), n / TA_BLOCK_TOKENS - 1);  // the first block needs no page
  cache.write(0, s, test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d));
  EXPECT_EQ(cache.free_pages(), 2);
  std::vector<float> out(q.size(), std::nanf(""));
  cache.decode(0, s, test::view_of(q, 1, hq, d), 0.0f, true, 0, out.data());
  std::vector<double> want(q.size());
  exact_attention(test::view_of(q, 1, hq, d), test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d), 0.0f, true, want.data(),
                  nullptr);
  const test::ErrorStats e = test::compare(out, want);
  EXPECT_TRUE(e.finite);
  EXPECT_LE(e.rel_l2, bound_vs_exact("4", InputKind::Normal));
  cache.release_sequence(s);
  EXPECT_EQ(cache.free_pages(), cfg.num_pages);
}

TEST(CacheLongContext, PeakyRowsKeepTheirAccuracyAtLength) {
  // Scores with a standard deviation of about 3 (q scaled by 3) over 32k keys: most tiles fall far
  // below the row's maximum, yet together they carry real weight. The skip rule's threshold grows
  // with the key count (format/skip_rule.h), so decode stays at the 8-bit cache's own accuracy: against
  // float64 attention over the cache's dequantized values, as at short lengths. (A fixed -9 threshold
  // measured 9-18% here and at 128k, this one about 2%.) Over 1600 draws the error's median was 1.6%,
  // its 99th percentile 3.3-3.5% and its largest 5.3% (0.04 failed one suite run in 150): the bound,
  // 8%, is 1.5x that and still below what the fixed threshold gave.
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int n = 32768 + 17, hkv = 1, hq = 2, d = 64;
  std::vector<float> k = test::make_input(rng, n, hkv, d, InputKind::Normal, 'k');
  std::vector<float> v = test::make_input(rng, n, hkv, d, InputKind::Normal, 'v');
  std::vector<float> q = test::make_input(rng, 1, hq, d, InputKind::Normal, 'q');
  for (float& x : q) x *= 3.0f;
  test::to_half(k), test::to_half(v), test::to_half(q);
  KvCache cache(config("8", hkv, d, n / TA_BLOCK_TOKENS + 1));
  const int s = cache.add_sequence();
  cache.write(0, s, test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d));
  std::vector<float> kc(k.size()), vc(v.size());
  cache.read_tokens(0, s, kc.data(), vc.data());
  std::vector<double> want(q.size());
  exact_attention(test::view_of(q, 1, hq, d), test::view_of(kc, n, hkv, d), test::view_of(vc, n, hkv, d), 0.0f, true,
                  want.data(), nullptr);
  for (int split_tiles : {0, 37}) {
    std::vector<float> out(q.size(), std::nanf(""));
    cache.decode(0, s, test::view_of(q, 1, hq, d), 0.0f, true, split_tiles, out.data());
    const test::ErrorStats e = test::compare(out, want);
    EXPECT_TRUE(e.finite);
    EXPECT_LE(e.rel_l2, 0.08) << "split_tiles " << split_tiles;
    testing::Test::RecordProperty("rel_l2_split_tiles_" + std::to_string(split_tiles), std::to_string(e.rel_l2));
  }
}

TEST(CacheNumerics, InputsNearTheFp16MaximumStayFinite) {
  // K, V and q up to 60,000 (fp16's maximum is 65,504): scales are fp32, codes are integers, so every
  // width decodes to finite values, whose average stays within the values' range.
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int n = 200, hkv = 2, hq = 4, d = 64;
  for (const char* bits : {"8", "4", "2", "mix"}) {
    std::vector<float> k = test::make_input(rng, n, hkv, d, InputKind::Normal, 'k');
    std::vector<float> v = test::make_input(rng, n, hkv, d, InputKind::Normal, 'v');
    std::vector<float> q = test::make_input(rng, 1, hq, d, InputKind::Normal, 'q');
    for (auto* x : {&k, &v, &q})
      for (float& e : *x) e = std::clamp(e * 20000.0f, -60000.0f, 60000.0f);
    test::to_half(k), test::to_half(v), test::to_half(q);
    KvCache cache(config(bits, hkv, d));
    const int s = cache.add_sequence();
    cache.write(0, s, test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d));
    std::vector<float> out(q.size(), std::nanf(""));
    cache.decode(0, s, test::view_of(q, 1, hq, d), 0.0f, true, 0, out.data());
    for (float x : out) {
      ASSERT_TRUE(std::isfinite(x)) << bits;
      ASSERT_LE(std::fabs(x), 60000.0f * 1.01f) << bits;
    }
  }
}

TEST(CacheNumerics, NonFiniteTokenPoisonsItsSequenceOnly) {
  // Policy (docs/FORMATS.md 1.6): propagate, never hide. A NaN in one V value of a flushed block, or an
  // Inf in one K value still in the buffer, makes that sequence's decode NaN; the other sequence of the
  // same cache, sharing its pool, stays finite.
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int n = 100, hkv = 1, hq = 2, d = 64;  // block 0 flushed, 36 tokens in the buffer
  for (const char* bits : {"8", "4", "2"})
    for (const bool in_buffer : {false, true}) {
      KvCache cache(config(bits, hkv, d));
      const int bad = cache.add_sequence(), good = cache.add_sequence();
      std::vector<float> q = test::make_input(rng, 1, hq, d, InputKind::Normal, 'q');
      test::to_half(q);
      for (int s : {bad, good}) {
        std::vector<float> k = test::make_input(rng, n, hkv, d, InputKind::Normal, 'k');
        std::vector<float> v = test::make_input(rng, n, hkv, d, InputKind::Normal, 'v');
        test::to_half(k), test::to_half(v);
        if (s == bad) (in_buffer ? k[size_t(90) * d + 5] : v[size_t(10) * d + 7]) = in_buffer ? INFINITY : NAN;
        // The K mean comes from these tokens: an Inf K would make it non-finite for the whole head
        // (documented); give the bad sequence a finite mean so the test sees the token itself.
        std::vector<float> mean(size_t(hkv) * d, 0.0f);
        cache.write(0, s, test::view_of(k, n, hkv, d), test::view_of(v, n, hkv, d), mean.data());
      }
      for (int s : {bad, good}) {
        std::vector<float> out(q.size(), 0.0f);
        cache.decode(0, s, test::view_of(q, 1, hq, d), 0.0f, true, 0, out.data());
        const bool any_nan = std::any_of(out.begin(), out.end(), [](float x) { return std::isnan(x); });
        const bool all_finite = std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); });
        if (s == bad) EXPECT_TRUE(any_nan) << bits << (in_buffer ? " buffer" : " page");
        else EXPECT_TRUE(all_finite) << bits << (in_buffer ? " buffer" : " page");
      }
    }
}
