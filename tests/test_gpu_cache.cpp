// The KV cache on the GPU against the CPU cache (the reference): the same tokens give the same bytes
// (pages, buffers, K means, page tables, lengths) after any mix of bulk writes, appends and releases;
// decode matches the reference's decode and float64 attention over the cache's values; capacity errors
// write nothing; decode replays correctly from a CUDA graph. SKIPPED without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "api/errors.hpp"
#include "cuda/cache/code_order.cuh"
#include "cuda/cache/device_cache.hpp"
#include "gpu_test_util.hpp"
#include "reference/kv_cache.hpp"
#include "reference/quant.hpp"
#include "test_util.hpp"

namespace test = turboattn::test;
using namespace turboattn;
using test::InputKind;

namespace {

// "8", "4" or "2": every head at that width; "a/b": heads alternate between a and b bits; "mix" is "4/2".
std::vector<int> head_bits(const std::string& name, int layers, int heads) {
  const std::string spec = name == "mix" ? "4/2" : name;
  const size_t slash = spec.find('/');
  const int even = std::stoi(spec.substr(0, slash)), odd = slash == std::string::npos ? even : std::stoi(spec.substr(slash + 1));
  std::vector<int> b(size_t(layers) * heads);
  for (size_t i = 0; i < b.size(); ++i) b[i] = (i % 2) ? odd : even;
  return b;
}

ref::CacheConfig make_config(const std::string& bits, int layers, int heads, int dim, int pages, int max_seqs = 6) {
  ref::CacheConfig c;
  c.layers = layers, c.kv_heads = heads, c.head_dim = dim, c.num_pages = pages, c.max_seqs = max_seqs;
  c.max_seq_len = 1 << 20, c.bits = head_bits(bits, layers, heads);
  return c;
}

ta_tensor device_tensor(void* data, ta_dtype dtype, std::initializer_list<int64_t> shape) {
  const std::vector<int64_t> s(shape);
  return ta_tensor_contiguous(data, dtype, TA_DEVICE_CUDA, int32_t(s.size()), s.data());
}

// The GPU cache and the CPU cache, fed the same tokens.
struct Mirror {
  ref::CacheConfig cfg;
  ref::KvCache cpu;
  cuda::DeviceCache gpu;
  std::mt19937_64& rng;
  InputKind kind = InputKind::Normal;
  // Applied to each generated k, v (write) and q (decode) before rounding: extreme values, NaN, Inf.
  std::function<void(std::vector<float>&, char role)> edit;
  Mirror(const ref::CacheConfig& c, std::mt19937_64& r) : cfg(c), cpu(c), gpu(c), rng(r) {}

  int add() {
    const int a = cpu.add_sequence(), b = gpu.book().add_sequence();
    EXPECT_EQ(a, b);
    return a;
  }
  void release(int seq) { cpu.release_sequence(seq), gpu.book().release_sequence(seq); }

  // `tokens[i]` new tokens for seqs[i] in one call (an append when every count is 1), in `dtype`.
  void write(int layer, const std::vector<int>& seqs, const std::vector<int>& tokens, ta_dtype dtype = TA_DTYPE_F16) {
    const int H = cfg.kv_heads, D = cfg.head_dim;
    std::vector<int32_t> cu{0};
    for (int t : tokens) cu.push_back(cu.back() + t);
    const int total = cu.back();
    std::vector<float> k = test::make_input(rng, total, H, D, kind, 'k'), v = test::make_input(rng, total, H, D, kind, 'v');
    if (edit) edit(k, 'k'), edit(v, 'v');
    std::vector<uint16_t> kb(k.size()), vb(v.size());
    for (size_t i = 0; i < k.size(); ++i) {  // round to the dtype the GPU receives; the CPU gets the same values
      kb[i] = dtype == TA_DTYPE_F16 ? ref::float_to_half(k[i]) : ref::float_to_bf16(k[i]);
      vb[i] = dtype == TA_DTYPE_F16 ? ref::float_to_half(v[i]) : ref::float_to_bf16(v[i]);
      k[i] = dtype == TA_DTYPE_F16 ? ref::half_to_float(kb[i]) : ref::bf16_to_float(kb[i]);
      v[i] = dtype == TA_DTYPE_F16 ? ref::half_to_float(vb[i]) : ref::bf16_to_float(vb[i]);
    }
    for (size_t i = 0; i < seqs.size(); ++i) {
      const int n = tokens[i];
      ref::HeadsView kv = test::view_of(k, total, H, D), vv = test::view_of(v, total, H, D);
      kv.data += size_t(cu[i]) * H * D, vv.data += size_t(cu[i]) * H * D;
      kv.tokens = vv.tokens = n;
      cpu.write(layer, seqs[i], kv, vv);
    }
    test::DeviceBuffer<uint16_t> dk(kb.size()), dv(vb.size());
    dk.upload(kb), dv.upload(vb);
    const ta_tensor tk = device_tensor(dk.ptr, dtype, {total, H, D}), tv = device_tensor(dv.ptr, dtype, {total, H, D});
    gpu.write(layer, seqs.data(), int(seqs.size()), tk, tv, cu, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }

  // Lengths (host and device), page tables (host and device), its first blocks, every page of the
  // sequence, the valid rows of its buffers and its K means: all equal to the CPU cache's.
  void expect_same(int layer, int seq) {
    const int D = cfg.head_dim;
    const int64_t len = cpu.length(layer, seq), blocks = len / TA_BLOCK_TOKENS;
    const int buffered = int(len % TA_BLOCK_TOKENS);
    ASSERT_EQ(gpu.book().length(layer, seq), len);
    if (len > 0) ASSERT_EQ(gpu.download_length(layer, seq), len);
    ASSERT_EQ(gpu.book().table(seq), cpu.page_table(seq));
    const std::vector<int32_t> table = gpu.download_table(seq);
    for (int64_t b = 1; b < blocks; ++b) {
      const size_t i = size_t(PageBook::table_index(b));
      ASSERT_EQ(table[i], cpu.page_table(seq)[i]) << "device page table, block " << b;
      const std::vector<uint8_t> page = gpu.download_page(layer, table[i]);
      ASSERT_EQ(0, std::memcmp(page.data(), cpu.page(layer, table[i]), page.size())) << "layer " << layer << " block " << b;
    }
    for (int h = 0; h < cfg.kv_heads && blocks > 0; ++h) {
      const std::vector<uint8_t> first = gpu.download_first_block(layer, seq, h);
      ASSERT_EQ(0, std::memcmp(first.data(), cpu.first_block(layer, seq, h), first.size())) << "layer " << layer << " first block, head " << h;
    }
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const std::vector<uint8_t> buf = gpu.download_buffer(layer, seq, h);
      const uint8_t* want = cpu.buffer(layer, seq, h);
      for (int64_t off : {buffer_k_offset(D), buffer_v_offset(D)})
        ASSERT_EQ(0, std::memcmp(buf.data() + off, want + off, size_t(buffered) * D)) << "buffer codes, head " << h;
      for (int64_t off : {buffer_k_scale_offset(D), buffer_v_scale_offset(D)})
        ASSERT_EQ(0, std::memcmp(buf.data() + off, want + off, size_t(buffered) * 4)) << "buffer scales, head " << h;
    }
    if (len > 0) {
      const std::vector<float> mean = gpu.download_k_mean(layer, seq);
      ASSERT_EQ(0, std::memcmp(mean.data(), cpu.k_mean(layer, seq), mean.size() * 4)) << "K mean";
    }
    // Equal bytes read back as equal values (ta_cache_read's path for each device).
    std::vector<float> kg(size_t(len) * cfg.kv_heads * D), vg(kg.size()), kc(kg.size()), vc(kg.size());
    gpu.read_tokens(layer, seq, kg.data(), vg.data());
    cpu.read_tokens(layer, seq, kc.data(), vc.data());
    ASSERT_EQ(0, std::memcmp(kg.data(), kc.data(), kg.size() * 4)) << "read K";
    ASSERT_EQ(0, std::memcmp(vg.data(), vc.data(), vg.size() * 4)) << "read V";
  }

  // GPU decode of q_len fresh query tokens per sequence: q (as the GPU saw it, in float) and the output,
  // both [n, q_len, hq, D], the output poisoned beforehand.
  struct Decoded {
    std::vector<float> q, out;
  };
  Decoded run_decode(int layer, const std::vector<int>& seqs, int hq, int q_len, ta_dtype dtype, bool sas, int split_tiles) {
    const int D = cfg.head_dim, n = int(seqs.size());
    Decoded r;
    r.q = test::make_input(rng, n * q_len, hq, D, kind, 'q');
    if (edit) edit(r.q, 'q');
    std::vector<uint16_t> qb(r.q.size());
    for (size_t i = 0; i < r.q.size(); ++i) {
      qb[i] = dtype == TA_DTYPE_F16 ? ref::float_to_half(r.q[i]) : ref::float_to_bf16(r.q[i]);
      r.q[i] = dtype == TA_DTYPE_F16 ? ref::half_to_float(qb[i]) : ref::bf16_to_float(qb[i]);
    }
    test::DeviceBuffer<uint16_t> dq(qb.size()), dout(qb.size());
    dq.upload(qb);
    dout.poison();
    ta_tensor tq = device_tensor(dq.ptr, dtype, {n, q_len, hq, D}), tout = device_tensor(dout.ptr, dtype, {n, q_len, hq, D});
    ta_decode_options o = ta_decode_default_options();
    o.use_sas = sas, o.split_tiles = split_tiles;
    gpu.decode(layer, seqs.data(), n, tq, o, tout, nullptr);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint16_t> ob = dout.download();
    r.out.resize(ob.size());
    for (size_t e = 0; e < ob.size(); ++e) r.out[e] = dtype == TA_DTYPE_F16 ? ref::half_to_float(ob[e]) : ref::bf16_to_float(ob[e]);
    return r;
  }

  // GPU decode against the CPU cache's decode and float64 attention over the cache's own (dequantized)
  // values.
  void expect_decode(int layer, const std::vector<int>& seqs, int hq, int q_len, ta_dtype dtype, bool sas, int split_tiles,
                     double bound_vs_exact) {
    const int D = cfg.head_dim, n = int(seqs.size());
    const Decoded r = run_decode(layer, seqs, hq, q_len, dtype, sas, split_tiles);
    for (int i = 0; i < n; ++i) {
      const size_t row = size_t(q_len) * hq * D;
      const std::vector<float> got(r.out.begin() + long(i * row), r.out.begin() + long((i + 1) * row));
      std::vector<float> want(row);
      ref::HeadsView qv = test::view_of(r.q, n * q_len, hq, D);
      qv.data += size_t(i) * row, qv.tokens = q_len;
      cpu.decode(layer, seqs[size_t(i)], qv, 0.0f, sas, 0, want.data());
      const test::ErrorStats e = test::compare(got, want);
      EXPECT_TRUE(e.finite) << "sequence " << i;
      EXPECT_LE(e.rel_l2, 0.01) << "GPU vs CPU decode, sequence " << i << " of length " << cpu.length(layer, seqs[size_t(i)]);
      const int64_t len = cpu.length(layer, seqs[size_t(i)]);
      std::vector<float> kc(size_t(len) * cfg.kv_heads * D), vc(kc.size());
      cpu.read_tokens(layer, seqs[size_t(i)], kc.data(), vc.data());
      std::vector<double> exact(row);
      ref::exact_attention(qv, test::view_of(kc, int(len), cfg.kv_heads, D), test::view_of(vc, int(len), cfg.kv_heads, D), 0.0f,
                           true, exact.data(), nullptr);
      EXPECT_LE(test::compare(got, exact).rel_l2, bound_vs_exact) << "vs float64 over the cache's values, length " << len;
    }
  }
};

class GpuCacheBytes : public test::GpuTestWithParam<std::tuple<int, std::string>> {};

TEST_P(GpuCacheBytes, WritesAppendsAndReleasesMatchTheCpuCache) {
  const auto [dim, bits] = GetParam();
  Mirror m(make_config(bits, 2, 3, dim, 48), rng);
  const int a = m.add(), b = m.add();
  for (int layer = 0; layer < 2; ++layer) {
    m.write(layer, {a}, {1});
    m.write(layer, {a, b}, {63, 200});  // a completes its first block from the buffer
    m.write(layer, {a}, {65}, TA_DTYPE_BF16);
  }
  for (int step = 0; step < 70; ++step)  // appends across block boundaries, both layers
    for (int layer = 0; layer < 2; ++layer) m.write(layer, {b, a}, {1, 1});
  for (int layer = 0; layer < 2; ++layer) m.expect_same(layer, a), m.expect_same(layer, b);
  m.release(a);
  const int c = m.add();  // reuses a's slot and pages
  for (int layer = 0; layer < 2; ++layer) m.write(layer, {c, b}, {130, 3});
  for (int layer = 0; layer < 2; ++layer) m.expect_same(layer, b), m.expect_same(layer, c);
  EXPECT_EQ(m.gpu.book().free_pages(), m.cpu.free_pages());
}

INSTANTIATE_TEST_SUITE_P(All, GpuCacheBytes,
                         testing::Combine(testing::Values(64, 96, 128, 256), testing::Values("8", "4", "2", "mix")));

// The decode kernel's walk over packed code rows (code_order.cuh), on the host: code_at and
// position_of are inverse permutations, each quad lane's fragment registers (whole rows and single
// k-steps alike) hold the codes of the positions they stand for, unpacked from a row packed as docs/FORMATS.md 3.4 packs it, and keys 16 apart
// sit a fixed number of positions apart (the kernel's P stores rely on it).
template <int kBits, int kRow>
void expect_code_order(std::mt19937_64& rng) {
  using Order = cuda::CodeOrder<kBits, kRow>;
  SCOPED_TRACE(testing::Message() << kBits << "-bit rows of " << kRow << " codes");
  for (int p = 0; p < kRow; ++p) {
    ASSERT_GE(Order::code_at(p), 0);
    ASSERT_LT(Order::code_at(p), kRow);
    EXPECT_EQ(Order::position_of(Order::code_at(p)), p) << "position " << p;
  }
  if (kRow == TA_BLOCK_TOKENS)
    for (int key = 0; key + 16 < kRow; ++key)
      EXPECT_EQ(Order::position_of(key + 16), Order::position_of(key) + Order::position_of(16)) << "key " << key;
  std::vector<uint8_t> codes(kRow);
  for (uint8_t& c : codes) c = uint8_t(rng() & ((1u << kBits) - 1u));
  alignas(16) uint8_t packed[kRow * kBits / 8];
  if (kBits == 8)
    std::memcpy(packed, codes.data(), codes.size());
  else
    ref::pack_codes(codes.data(), kRow, kBits, packed);
  for (int t = 0; t < 4; ++t) {
    uint32_t frag[Order::kSteps][2];
    Order::load(frag, packed, t);
    for (int ks = 0; ks < Order::kSteps; ++ks) {
      uint32_t step[2];
      Order::load_step(step, packed, t, ks);
      for (int h = 0; h < 2; ++h) {
        EXPECT_EQ(step[h], frag[ks][h]) << "load_step, lane " << t << ", k-step " << ks;
        for (int b = 0; b < 4; ++b) {
          const int p = 32 * ks + 16 * h + 4 * t + b;
          EXPECT_EQ((frag[ks][h] >> (8 * b)) & 0xFFu, codes[size_t(Order::code_at(p))]) << "lane " << t << ", position " << p;
        }
      }
    }
  }
}

TEST(DecodeCodeOrder, PositionsAndFragmentsAgreeWithThePacking) {
  std::mt19937_64 rng(std::random_device{}());
  expect_code_order<8, 64>(rng), expect_code_order<8, 128>(rng), expect_code_order<8, 96>(rng);
  expect_code_order<4, 64>(rng), expect_code_order<4, 96>(rng), expect_code_order<4, 128>(rng), expect_code_order<4, 256>(rng);
  expect_code_order<2, 64>(rng), expect_code_order<2, 96>(rng), expect_code_order<2, 128>(rng), expect_code_order<2, 256>(rng);
}

// The automatic split on the benchmark's shapes (8 KV heads, an H200's 132 SMs): the best of the fixed
// splits docs/BENCHMARKS.md measured, within 2%. Resident CTAs per SM: 4 for one row group without 8-bit
// heads, 3 with two groups, 2 with 8-bit heads; one round is filled to 2 per SM with the 4-bit path alone
// (uniform 4-bit layers at D = 128), to 3 in other layers with 4-bit heads, to all of them at 2 bits.
TEST(DecodeSplit, PicksTheBestMeasuredSplit) {
  const int64_t sms = 132;
  auto split = [&](int resident, int layer_bits, cuda::LayerWidths widths) {
    const int fill = cuda::decode_fill_ctas_per_sm(widths, layer_bits, resident);
    return [=](int64_t ctas, int64_t tiles) { return cuda::automatic_decode_splits(ctas, sms, resident, fill, tiles); };
  };
  const auto four_bit = split(4, TA_BITS_4, {TA_BITS_4, true});       // the 4-bit path alone
  const auto four_bit_d64 = split(4, 0, {TA_BITS_4, true});           // every width's path
  const auto mixed = split(4, 0, {TA_BITS_4, false});                 // 4- and 2-bit heads
  const auto two_bit = split(4, 0, {TA_BITS_2, false});
  const auto two_groups = split(3, 0, {TA_BITS_4, false});
  const auto two_groups_4bit = split(3, TA_BITS_4, {TA_BITS_4, true});
  const auto eight_bit = split(2, 0, {TA_BITS_8, false});
  EXPECT_EQ(four_bit(1 * 8, 32768 / 64), 32);   // batch 1: 16-tile splits
  EXPECT_EQ(four_bit(8 * 8, 32768 / 64), 4);    // 8 x 32k: 256 CTAs (86.6 us against 88.0 with 6 splits)
  EXPECT_EQ(four_bit(1 * 8, 65536 / 64), 33);   // 1 x 64k: 32 tiles each (35.6 against 38.3 us with 21)
  EXPECT_EQ(four_bit(32 * 8, 8192 / 64), 1);    // 32 x 8k: 256 CTAs are enough
  EXPECT_EQ(four_bit(64 * 8, 4096 / 64), 1);    // 64 x 4k: 512 of 528 slots
  EXPECT_EQ(four_bit(128 * 8, 2048 / 64), 1);   // 128 x 2k: 1.94 rounds; 2 splits would make 3.9
  EXPECT_EQ(four_bit(1 * 8, 2), 1);             // short: never under 8 tiles
  EXPECT_EQ(four_bit(1 * 8, 8192 / 64), 16);    // 1 x 8k: 8-tile splits, 128 CTAs (16-tile ones leave half the SMs idle)
  EXPECT_EQ(four_bit(1 * 8, 4096 / 64), 8);
  EXPECT_EQ(four_bit(1 * 8, 16384 / 64), 16);   // 1 x 16k: 16 tiles, 128 CTAs
  EXPECT_EQ(four_bit_d64(8 * 8, 32768 / 64), 6);  // D = 64: 3 per SM (53.6 us against 55.2 with 4 splits)
  EXPECT_EQ(mixed(8 * 8, 32768 / 64), 6);
  EXPECT_EQ(two_bit(8 * 8, 32768 / 64), 8);
  EXPECT_EQ(two_bit(32 * 8, 8192 / 64), 2);
  EXPECT_EQ(two_bit(64 * 8, 4096 / 64), 1);
  EXPECT_EQ(two_bit(128 * 8, 2048 / 64), 1);
  EXPECT_EQ(two_bit(1 * 8, 8192 / 64), 16);
  EXPECT_EQ(two_groups(32 * 8, 8192 / 64), 1);
  EXPECT_EQ(two_groups(8 * 8, 32768 / 64), 6);
  EXPECT_EQ(two_groups(64 * 8, 4096 / 64), 2);  // 1.3 rounds -> 2.6
  EXPECT_EQ(two_groups(128 * 8, 2048 / 64), 1); // 2.6 rounds
  EXPECT_EQ(two_groups_4bit(8 * 8, 32768 / 64), 4);
  EXPECT_EQ(eight_bit(8 * 8, 32768 / 64), 4);
  EXPECT_EQ(eight_bit(32 * 8, 8192 / 64), 1);
  EXPECT_EQ(eight_bit(64 * 8, 4096 / 64), 1);   // 1.94 rounds
  // 1M tokens: a few sequences fill one round; 256 of them (5.2 rounds at one split) split 11 ways
  // (56.9 rounds: the last nearly full).
  EXPECT_EQ(two_groups(2 * 8, (1 << 20) / 64), 24);
  EXPECT_EQ(two_groups(256 * 8, (1 << 20) / 64), 11);
}

// (head dim, bits, query heads per KV head, q_len, SAS, split_tiles, dtype of q)
using DecodeCase = std::tuple<int, std::string, int, int, bool, int, ta_dtype>;
class GpuDecode : public test::GpuTestWithParam<DecodeCase> {};

TEST_P(GpuDecode, MatchesTheCpuCacheAndFloat64) {
  const auto [dim, bits, group, q_len, sas, split_tiles, dtype] = GetParam();
  const int hkv = 2;
  Mirror m(make_config(bits, 1, hkv, dim, 160, 8), rng);
  std::vector<int> seqs, lengths;
  for (int len : {3, 63, 64, 65, 200, 1000, 4097})
    if (len + 1 >= q_len) lengths.push_back(len);  // the sequences hold at least q_len tokens
  for (size_t i = 0; i < lengths.size(); ++i) seqs.push_back(m.add());
  m.write(0, seqs, lengths);
  m.write(0, seqs, std::vector<int>(seqs.size(), 1));  // one appended token each
  // The cache's 4- and 2-bit values are the ground truth here, so every width is held to the 8-bit
  // level of FlashQ's own rounding (Q and P); SAS off uses ex2.approx.
  m.expect_decode(0, seqs, hkv * group, q_len, dtype, sas, split_tiles, 0.03);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuDecode,
    testing::Values(DecodeCase{64, "8", 4, 1, true, 0, TA_DTYPE_F16}, DecodeCase{128, "8", 4, 1, true, 0, TA_DTYPE_F16},
                    DecodeCase{128, "4", 4, 1, true, 0, TA_DTYPE_F16}, DecodeCase{128, "2", 4, 1, true, 0, TA_DTYPE_F16},
                    DecodeCase{128, "mix", 4, 1, true, 0, TA_DTYPE_BF16}, DecodeCase{96, "4", 2, 1, true, 0, TA_DTYPE_F16},
                    DecodeCase{256, "4", 4, 1, true, 0, TA_DTYPE_F16}, DecodeCase{256, "2", 1, 2, true, 0, TA_DTYPE_BF16},
                    DecodeCase{128, "4", 8, 1, true, 3, TA_DTYPE_F16}, DecodeCase{128, "4", 4, 3, true, 1, TA_DTYPE_F16},
                    DecodeCase{64, "mix", 4, 4, false, 0, TA_DTYPE_F16}, DecodeCase{128, "8", 1, 1, false, 2, TA_DTYPE_BF16},
                    DecodeCase{64, "4", 16, 1, true, 0, TA_DTYPE_F16}, DecodeCase{64, "8", 4, 8, true, 0, TA_DTYPE_F16}, DecodeCase{96, "2", 8, 1, true, 0, TA_DTYPE_F16},
                    DecodeCase{128, "2", 2, 1, false, 2, TA_DTYPE_BF16},  // the 4-CTA instance with SAS off, bf16 and a merge
                    // q_len over 8 runs in launches of 8 query tokens (a chunked prefill over the cache)
                    DecodeCase{128, "4", 4, 13, true, 0, TA_DTYPE_F16}, DecodeCase{64, "mix", 2, 20, true, 2, TA_DTYPE_BF16},
                    DecodeCase{128, "8", 1, 9, false, 0, TA_DTYPE_F16},
                    // rings sized for 8-bit heads: a 2-bit head's Q' rows in a slot's tail, a 4-bit head's Q' in registers
                    DecodeCase{128, "8/2", 4, 1, true, 0, TA_DTYPE_F16}, DecodeCase{128, "8/4", 4, 1, true, 0, TA_DTYPE_BF16},
                    // the 4-bit path alone (DecodeTraits::kFourBitInstance) with SAS off, bf16 and a merge; a 4/2
                    // layer with two row groups (every width's path), SAS off and a merge
                    DecodeCase{128, "4", 2, 1, false, 2, TA_DTYPE_BF16}, DecodeCase{128, "mix", 8, 1, false, 3, TA_DTYPE_F16}));

// Suites of one or more GPU tests each (skipped without a device, seeded afresh: test::GpuTest).
class GpuCacheServing : public test::GpuTest {};
class GpuCacheNumerics : public test::GpuTest {};
class GpuCacheCapi : public test::GpuTest {};
class GpuDecodeLaunches : public test::GpuTest {};
class GpuCacheGraph : public test::GpuTest {};

TEST_F(GpuCacheServing, RandomLivesStayIdenticalToTheCpuCache) {
  // Sequences start, append, finish and reuse slots and pages at random; after every step each live
  // sequence's bytes equal the CPU cache's, one layer's decode matches it, and the free page counts agree
  // (no page leaked).
  Mirror m(make_config("mix", 2, 2, 64, 96, 6), rng);
  std::vector<int> live;
  for (int step = 0; step < 150; ++step) {
    SCOPED_TRACE(testing::Message() << "step " << step);
    const int r = int(rng() % 10);
    if (r == 0 && !live.empty()) {  // a sequence finishes
      const size_t i = size_t(rng() % live.size());
      m.release(live[i]);
      live.erase(live.begin() + long(i));
    } else if (r == 1 && live.size() < 6) {  // a sequence starts with a prompt, if the pool has room
      const int tokens = 1 + int(rng() % 300);
      if (m.gpu.book().free_pages() < tokens / TA_BLOCK_TOKENS + 8) continue;
      const int s = m.add();
      live.push_back(s);
      for (int layer = 0; layer < 2; ++layer) m.write(layer, {s}, {tokens});
    } else if (!live.empty() && m.gpu.book().free_pages() >= int(live.size())) {  // a decode step
      for (int layer = 0; layer < 2; ++layer) m.write(layer, live, std::vector<int>(live.size(), 1));
    }
    for (int s : live)
      for (int layer = 0; layer < 2; ++layer) m.expect_same(layer, s);
    if (!live.empty()) m.expect_decode(step % 2, live, 4, 1, TA_DTYPE_F16, true, 0, 0.03);
    ASSERT_EQ(m.gpu.book().free_pages(), m.cpu.free_pages());
    if (HasFailure()) break;
  }
  for (int s : live) m.release(s);
  EXPECT_EQ(m.gpu.book().free_pages(), 96);
}

TEST_F(GpuCacheServing, AppendsAroundTheInlineRunLimitMatchTheCpuCache) {
  // An append's runs travel in the write kernel's parameters while each of its two launches (runs that
  // complete a block, then the others) takes at most kInlineWriteRuns, else through the upload ring:
  // one launch at the limit, one past it, and two launches under it that together pass it.
  const int limit = cuda::kInlineWriteRuns;
  for (const int n : {limit, limit + 1, 2 * limit - 100}) {
    SCOPED_TRACE(testing::Message() << n << " sequences");
    Mirror m(make_config("mix", 1, 2, 64, 3 * n, n), rng);
    std::vector<int> seqs, prompt;
    for (int i = 0; i < n; ++i) {
      seqs.push_back(m.add());
      // n > limit + 1: half the sequences complete their first block on the first append.
      prompt.push_back(n == limit ? 60 + i % 8 : n == limit + 1 ? 1 : i < n / 2 ? 63 : 10);
    }
    m.write(0, seqs, prompt);
    for (int step = 0; step < 6; ++step) m.write(0, seqs, std::vector<int>(size_t(n), 1));
    for (int s : seqs) m.expect_same(0, s);
  }
}

// Extreme values, non-finite tokens, the shortest and the longest sequences: the policies of
// docs/FORMATS.md 1.6 and docs/ROBUSTNESS.md on the GPU, as test_cache.cpp checks them on the CPU.
TEST_F(GpuCacheNumerics, InputsNearTheFp16MaximumStayFiniteAndMatchTheCpu) {
  for (const char* bits : {"8", "4", "2", "mix"}) {
    SCOPED_TRACE(bits);
    Mirror m(make_config(bits, 1, 2, 64, 8, 2), rng);
    m.edit = [](std::vector<float>& x, char role) {  // K and V up to 60,000 (fp16's maximum is 65,504)
      if (role != 'q')
        for (float& e : x) e = std::clamp(e * 20000.0f, -60000.0f, 60000.0f);
    };
    const int s = m.add();
    m.write(0, {s}, {200});
    m.write(0, {s}, {1});
    m.expect_same(0, s);
    const Mirror::Decoded r = m.run_decode(0, {s}, 4, 1, TA_DTYPE_F16, true, 0);
    for (float x : r.out) {
      ASSERT_TRUE(std::isfinite(x));
      ASSERT_LE(std::fabs(x), 60000.0f * 1.01f);
    }
    std::vector<float> want(r.out.size());
    m.cpu.decode(0, s, test::view_of(r.q, 1, 4, 64), 0.0f, true, 0, want.data());
    EXPECT_LE(test::compare(r.out, want).rel_l2, 0.01) << "GPU vs CPU decode";
  }
}

TEST_F(GpuCacheNumerics, NonFiniteTokenPoisonsItsSequenceOnly) {
  // Propagate, never hide: a NaN in one V value of a flushed block, an Inf in one K value still in the
  // buffer (which also makes the sequence's K mean infinite), or a NaN in one K value (its channel's K
  // mean NaN) makes that sequence's decode NaN; the other sequence, sharing the pool and the launch,
  // stays finite. The poisoned sequence's bytes are the CPU cache's too (the NaN scales and means they
  // store are TA_NAN_BITS on both).
  const int n = 100, d = 64;  // block 0 flushed, 36 tokens in the buffer
  enum class Poison { PageV, BufferKInf, KNan };
  for (const char* bits : {"8", "4", "2"})
    for (const Poison poison : {Poison::PageV, Poison::BufferKInf, Poison::KNan}) {
      SCOPED_TRACE(testing::Message() << bits << " bits, case " << int(poison));
      Mirror m(make_config(bits, 1, 1, d, 8, 2), rng);
      const int bad = m.add(), good = m.add();
      m.edit = [&](std::vector<float>& x, char role) {
        if (poison == Poison::BufferKInf && role == 'k') x[size_t(90) * d + 5] = INFINITY;
        if (poison == Poison::PageV && role == 'v') x[size_t(10) * d + 7] = NAN;
        if (poison == Poison::KNan && role == 'k') x[size_t(30) * d + 9] = NAN;
      };
      m.write(0, {bad}, {n});
      m.edit = nullptr;
      m.write(0, {good}, {n});
      m.expect_same(0, bad);
      m.expect_same(0, good);
      const Mirror::Decoded r = m.run_decode(0, {bad, good}, 2, 1, TA_DTYPE_F16, true, 0);
      const size_t row = size_t(2) * d;
      EXPECT_TRUE(std::any_of(r.out.begin(), r.out.begin() + long(row), [](float x) { return std::isnan(x); }));
      EXPECT_TRUE(std::all_of(r.out.begin() + long(row), r.out.end(), [](float x) { return std::isfinite(x); }));
    }
}

TEST_F(GpuCacheNumerics, EqualScoresAverageTheValues) {
  // q = 0: every score is equal, so the output is the mean of the cached V (as the CPU cache computes it).
  Mirror m(make_config("4", 1, 2, 128, 8, 2), rng);
  const int s = m.add();
  m.write(0, {s}, {150});
  m.edit = [](std::vector<float>& x, char role) {
    if (role == 'q') std::fill(x.begin(), x.end(), 0.0f);
  };
  m.expect_decode(0, {s}, 8, 1, TA_DTYPE_F16, true, 0, 0.03);
}

TEST_F(GpuCacheNumerics, SequencesOfOneAndTwoTokens) {
  for (const char* bits : {"8", "2"}) {
    Mirror m(make_config(bits, 1, 2, 64, 8, 4), rng);
    const int a = m.add(), b = m.add(), c = m.add();
    m.write(0, {a, b}, {1, 1});  // appends to empty sequences
    m.write(0, {c}, {2});
    m.expect_same(0, a), m.expect_same(0, c);
    m.expect_decode(0, {a, b, c}, 4, 1, TA_DTYPE_F16, true, 0, 0.03);
    m.expect_decode(0, {c}, 4, 2, TA_DTYPE_BF16, false, 0, 0.03);
  }
}

TEST_F(GpuCacheNumerics, DecodeOver128kTokens) {
  // 131,077 tokens (the first block, 2,047 pages and 5 buffered): the same bytes as the CPU cache, and one decode step of
  // 4 query heads within the usual bounds, with the automatic split and with many splits.
  const int n = 131072 + 5;
  Mirror m(make_config("4", 1, 1, 64, n / TA_BLOCK_TOKENS + 1, 1), rng);
  const int s = m.add();
  m.write(0, {s}, {n});
  m.expect_same(0, s);
  EXPECT_EQ(m.gpu.book().free_pages(), 2);
  m.expect_decode(0, {s}, 4, 1, TA_DTYPE_F16, true, 0, 0.03);
  m.expect_decode(0, {s}, 4, 1, TA_DTYPE_F16, true, 16, 0.03);
}

TEST_F(GpuCacheCapi, CapacityErrorsWriteNothingAndBadTensorsAreRejected) {
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.num_pages = 2, cfg.max_seqs = 2, cfg.max_seq_len = 1000;
  ta_cache* cache = nullptr;
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CUDA, &cache), TA_SUCCESS) << ta_last_error();
  int32_t s = -1;
  ASSERT_EQ(ta_cache_add_sequence(cache, &s), TA_SUCCESS);
  const int T = 256;  // needs 3 pages (blocks 1-3), 2 exist
  test::DeviceBuffer<uint16_t> k(size_t(T) * 2 * 64);
  EXPECT_EQ(cudaMemset(k.ptr, 0x3c, k.n * 2), cudaSuccess);
  const ta_tensor tk = device_tensor(k.ptr, TA_DTYPE_F16, {T, 2, 64});
  const int32_t cu_host[2] = {0, T};
  const int64_t cu_shape[1] = {2};
  const ta_tensor cu = ta_tensor_contiguous(const_cast<int32_t*>(cu_host), TA_DTYPE_I32, TA_DEVICE_CPU, 1, cu_shape);
  EXPECT_EQ(ta_cache_write(cache, 0, &s, 1, &tk, &tk, &cu, nullptr), TA_ERROR_OUT_OF_CAPACITY);
  EXPECT_NE(std::string(ta_last_error()).find("nothing was written"), std::string::npos) << ta_last_error();
  int64_t len = -1;
  int32_t free_pages = -1;
  ASSERT_EQ(ta_cache_sequence_length(cache, 0, s, &len), TA_SUCCESS);
  ASSERT_EQ(ta_cache_free_pages(cache, &free_pages), TA_SUCCESS);
  EXPECT_EQ(len, 0);
  EXPECT_EQ(free_pages, 2);
  // Host tensors for a CUDA cache are rejected by name.
  std::vector<uint16_t> host(size_t(T) * 2 * 64, 0x3c00);
  const int64_t shape[3] = {T, 2, 64};
  const ta_tensor th = ta_tensor_contiguous(host.data(), TA_DTYPE_F16, TA_DEVICE_CPU, 3, shape);
  EXPECT_EQ(ta_cache_write(cache, 0, &s, 1, &th, &th, &cu, nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("k"), std::string::npos) << ta_last_error();
  // A CUDA-marked host pointer is caught too.
  ta_tensor lie = th;
  lie.device = TA_DEVICE_CUDA;
  const int32_t cu2_host[2] = {0, 100};
  const ta_tensor cu2 = ta_tensor_contiguous(const_cast<int32_t*>(cu2_host), TA_DTYPE_I32, TA_DEVICE_CPU, 1, cu_shape);
  lie.shape[0] = 100;
  EXPECT_EQ(ta_cache_write(cache, 0, &s, 1, &lie, &lie, &cu2, nullptr), TA_ERROR_INVALID_ARGUMENT) << ta_last_error();
  // A write that fits succeeds; q_len over the cached length is refused by name.
  ta_tensor tk100 = tk;
  tk100.shape[0] = 100;
  ASSERT_EQ(ta_cache_write(cache, 0, &s, 1, &tk100, &tk100, &cu2, nullptr), TA_SUCCESS) << ta_last_error();
  test::DeviceBuffer<uint16_t> q(size_t(101) * 4 * 64), out(size_t(101) * 4 * 64);
  const ta_tensor tq = device_tensor(q.ptr, TA_DTYPE_F16, {1, 101, 4, 64}), to = device_tensor(out.ptr, TA_DTYPE_F16, {1, 101, 4, 64});
  EXPECT_EQ(ta_decode(cache, 0, &s, 1, &tq, nullptr, const_cast<ta_tensor*>(&to), nullptr), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("q_len 101 exceeds"), std::string::npos) << ta_last_error();
  // Read back into host memory: every token was 0x3c3c (1.0586), K's mean itself, V one INT8 code.
  std::vector<float> back_k(size_t(100) * 2 * 64, NAN), back_v(back_k.size(), NAN);
  const int64_t back_shape[3] = {100, 2, 64};
  ta_tensor tbk = ta_tensor_contiguous(back_k.data(), TA_DTYPE_F32, TA_DEVICE_CPU, 3, back_shape);
  ta_tensor tbv = ta_tensor_contiguous(back_v.data(), TA_DTYPE_F32, TA_DEVICE_CPU, 3, back_shape);
  ASSERT_EQ(ta_cache_read(cache, 0, s, &tbk, &tbv), TA_SUCCESS) << ta_last_error();
  const float one = ref::half_to_float(0x3c3c);
  for (size_t i = 0; i < back_k.size(); ++i) {
    ASSERT_NEAR(back_k[i], one, 1e-6f) << i;
    ASSERT_NEAR(back_v[i], one, one / 254) << i;  // half an INT8 step
  }
  // Device memory for the result is refused by name.
  ta_tensor tbd = device_tensor(out.ptr, TA_DTYPE_F16, {100, 2, 64});
  EXPECT_EQ(ta_cache_read(cache, 0, s, &tbk, &tbd), TA_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ta_last_error()).find("v: on cuda; ta_cache_read writes host memory"), std::string::npos) << ta_last_error();
  ta_cache_destroy(cache);
}

TEST_F(GpuCacheCapi, AnotherCurrentDeviceIsRejected) {
  // The cache's memory is on the device current at creation; writes and decodes with another device
  // current are refused by name, even when the tensors are on that other device.
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 2) GTEST_SKIP() << "needs two CUDA devices";  // one: GpuTest
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.num_pages = 4, cfg.max_seqs = 2, cfg.max_seq_len = 1000;
  ta_cache* cache = nullptr;
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CUDA, &cache), TA_SUCCESS) << ta_last_error();
  int32_t s = -1;
  ASSERT_EQ(ta_cache_add_sequence(cache, &s), TA_SUCCESS);
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  {
    test::DeviceBuffer<uint16_t> k(size_t(2) * 64);  // on device 1
    EXPECT_EQ(cudaMemset(k.ptr, 0x3c, k.n * 2), cudaSuccess);
    const ta_tensor tk = device_tensor(k.ptr, TA_DTYPE_F16, {1, 2, 64});
    EXPECT_EQ(ta_cache_append(cache, 0, &s, 1, &tk, &tk, nullptr), TA_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ta_last_error()).find("current device is 1"), std::string::npos) << ta_last_error();
    int64_t len = -1;
    ASSERT_EQ(ta_cache_sequence_length(cache, 0, s, &len), TA_SUCCESS);
    EXPECT_EQ(len, 0);  // nothing written
  }
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  {
    test::DeviceBuffer<uint16_t> k(size_t(2) * 64), q(size_t(4) * 64), out(size_t(4) * 64);
    EXPECT_EQ(cudaMemset(k.ptr, 0x3c, k.n * 2), cudaSuccess);
    EXPECT_EQ(cudaMemset(q.ptr, 0x3c, q.n * 2), cudaSuccess);
    const ta_tensor tk = device_tensor(k.ptr, TA_DTYPE_F16, {1, 2, 64});
    ASSERT_EQ(ta_cache_append(cache, 0, &s, 1, &tk, &tk, nullptr), TA_SUCCESS) << ta_last_error();
    const ta_tensor tq = device_tensor(q.ptr, TA_DTYPE_F16, {1, 1, 4, 64});
    ta_tensor to = device_tensor(out.ptr, TA_DTYPE_F16, {1, 1, 4, 64});
    ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
    EXPECT_EQ(ta_decode(cache, 0, &s, 1, &tq, nullptr, &to, nullptr), TA_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ta_last_error()).find("its memory is on CUDA device 0"), std::string::npos) << ta_last_error();
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    EXPECT_EQ(ta_decode(cache, 0, &s, 1, &tq, nullptr, &to, nullptr), TA_SUCCESS) << ta_last_error();
  }
  ta_cache_destroy(cache);
}

// More sequences than one decode launch holds (cuda::kDecodeMaxSeqs): the call runs in launches of
// that many, each with its own slots and q and output rows, every output compared (split_tiles 1:
// every sequence of over 64 tokens is split and merged). With q_len 12 the launches nest in two query
// chunks (8 and 4 tokens), each with its own q, output and workspace offsets.
TEST_F(GpuDecodeLaunches, MoreSequencesThanOneLaunchHolds) {
  const int n = cuda::kDecodeMaxSeqs + 37, hkv = 2, D = 64;
  Mirror m(make_config("mix", 1, hkv, D, 3 * n, n), rng);
  std::vector<int> seqs, lengths;
  for (int i = 0; i < n; ++i) seqs.push_back(m.add()), lengths.push_back(11 + (i * 53) % 200);
  m.write(0, seqs, lengths);
  m.write(0, seqs, std::vector<int>(size_t(n), 1));
  for (const int q_len : {1, 12}) {
    SCOPED_TRACE(testing::Message() << "q_len " << q_len);
    m.expect_decode(0, seqs, hkv * 3, q_len, TA_DTYPE_F16, true, /*split_tiles=*/1, 0.03);
  }
}

// ta_cache_append_decode on the GPU: the outputs of ta_cache_append then ta_decode, bit for bit, and
// the CPU cache's contents, over steps where some sequences fill a block (their runs go first) and
// others do not, and steps where none does (the runs go uncopied).
TEST_F(GpuCacheCapi, AppendDecodeEqualsAppendThenDecodeAndTheCpuCache) {
  const int H = 2, D = 64, hq = 6, n = 4, lens[n] = {126, 62, 190, 100};
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_layers = 1, cfg.num_kv_heads = H, cfg.head_dim = D, cfg.max_seqs = n, cfg.max_seq_len = 400, cfg.num_pages = 24;
  ta_cache *fused = nullptr, *split = nullptr, *host = nullptr;
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CUDA, &fused), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CUDA, &split), TA_SUCCESS) << ta_last_error();
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CPU, &host), TA_SUCCESS) << ta_last_error();
  std::vector<int32_t> seqs(n);
  for (int i = 0; i < n; ++i)
    for (ta_cache* c : {fused, split, host}) ASSERT_EQ(ta_cache_add_sequence(c, &seqs[size_t(i)]), TA_SUCCESS);
  auto feed = [&](int tokens, std::vector<float> k, std::vector<float> v, const std::vector<int32_t>& cu) {
    const std::vector<uint16_t> kb = test::to_half(k), vb = test::to_half(v);
    test::DeviceBuffer<uint16_t> dk(kb.size()), dv(vb.size());
    dk.upload(kb), dv.upload(vb);
    const ta_tensor tk = device_tensor(dk.ptr, TA_DTYPE_F16, {tokens, H, D}), tv = device_tensor(dv.ptr, TA_DTYPE_F16, {tokens, H, D});
    const ta_tensor hk = ta_tensor_contiguous(const_cast<uint16_t*>(kb.data()), TA_DTYPE_F16, TA_DEVICE_CPU, 3, tk.shape);
    const ta_tensor hv = ta_tensor_contiguous(const_cast<uint16_t*>(vb.data()), TA_DTYPE_F16, TA_DEVICE_CPU, 3, tv.shape);
    const int64_t cu_shape[1] = {int64_t(cu.size())};
    const ta_tensor tcu = ta_tensor_contiguous(const_cast<int32_t*>(cu.data()), TA_DTYPE_I32, TA_DEVICE_CPU, 1, cu_shape);
    for (ta_cache* c : {fused, split}) ASSERT_EQ(ta_cache_write(c, 0, seqs.data(), n, &tk, &tv, &tcu, nullptr), TA_SUCCESS);
    ASSERT_EQ(ta_cache_write(host, 0, seqs.data(), n, &hk, &hv, &tcu, nullptr), TA_SUCCESS) << ta_last_error();
  };
  std::vector<int32_t> cu{0};
  for (int l : lens) cu.push_back(cu.back() + l);
  feed(cu.back(), test::make_input(rng, cu.back(), H, D, InputKind::Outliers, 'k'),
       test::make_input(rng, cu.back(), H, D, InputKind::Normal, 'v'), cu);
  // Blocks fill at step 1 (three of the four sequences), 27 (the fourth) and 65 (three); no other step
  // fills one.
  for (int step = 0; step < 68; ++step) {
    std::vector<float> k = test::make_input(rng, n, H, D, InputKind::Outliers, 'k');
    std::vector<float> v = test::make_input(rng, n, H, D, InputKind::Normal, 'v');
    std::vector<float> q = test::make_input(rng, n, hq, D, InputKind::Normal, 'q');
    const std::vector<uint16_t> kb = test::to_half(k), vb = test::to_half(v), qb = test::to_half(q);
    test::DeviceBuffer<uint16_t> dk(kb.size()), dv(vb.size()), dq(qb.size()), out_fused(qb.size()), out_split(qb.size());
    dk.upload(kb), dv.upload(vb), dq.upload(qb), out_fused.poison(), out_split.poison();
    const ta_tensor tk = device_tensor(dk.ptr, TA_DTYPE_F16, {n, H, D}), tv = device_tensor(dv.ptr, TA_DTYPE_F16, {n, H, D});
    const ta_tensor tq = device_tensor(dq.ptr, TA_DTYPE_F16, {n, 1, hq, D});
    ta_tensor of = device_tensor(out_fused.ptr, TA_DTYPE_F16, {n, 1, hq, D}), os = device_tensor(out_split.ptr, TA_DTYPE_F16, {n, 1, hq, D});
    ASSERT_EQ(ta_cache_append_decode(fused, 0, seqs.data(), n, &tk, &tv, &tq, nullptr, &of, nullptr), TA_SUCCESS) << ta_last_error();
    ASSERT_EQ(ta_cache_append(split, 0, seqs.data(), n, &tk, &tv, nullptr), TA_SUCCESS) << ta_last_error();
    ASSERT_EQ(ta_decode(split, 0, seqs.data(), n, &tq, nullptr, &os, nullptr), TA_SUCCESS) << ta_last_error();
    const ta_tensor hk = ta_tensor_contiguous(const_cast<uint16_t*>(kb.data()), TA_DTYPE_F16, TA_DEVICE_CPU, 3, tk.shape);
    const ta_tensor hv = ta_tensor_contiguous(const_cast<uint16_t*>(vb.data()), TA_DTYPE_F16, TA_DEVICE_CPU, 3, tv.shape);
    ASSERT_EQ(ta_cache_append(host, 0, seqs.data(), n, &hk, &hv, nullptr), TA_SUCCESS) << ta_last_error();
    const std::vector<uint16_t> got = out_fused.download();
    for (uint16_t h : got) ASSERT_TRUE(std::isfinite(ref::half_to_float(h))) << "step " << step;
    ASSERT_EQ(got, out_split.download()) << "step " << step;
  }
  for (int32_t s : seqs) {
    int64_t len = 0;
    ASSERT_EQ(ta_cache_sequence_length(fused, 0, s, &len), TA_SUCCESS);
    std::vector<float> kf(size_t(len) * H * D), vf(kf.size()), kh(kf.size()), vh(kf.size());
    const int64_t shape[3] = {len, H, D};
    ta_tensor a = ta_tensor_contiguous(kf.data(), TA_DTYPE_F32, TA_DEVICE_CPU, 3, shape), b = ta_tensor_contiguous(vf.data(), TA_DTYPE_F32, TA_DEVICE_CPU, 3, shape);
    ta_tensor c = ta_tensor_contiguous(kh.data(), TA_DTYPE_F32, TA_DEVICE_CPU, 3, shape), d = ta_tensor_contiguous(vh.data(), TA_DTYPE_F32, TA_DEVICE_CPU, 3, shape);
    ASSERT_EQ(ta_cache_read(fused, 0, s, &a, &b), TA_SUCCESS) << ta_last_error();
    ASSERT_EQ(ta_cache_read(host, 0, s, &c, &d), TA_SUCCESS) << ta_last_error();
    EXPECT_EQ(0, std::memcmp(kf.data(), kh.data(), kf.size() * 4)) << "sequence " << s << " K";
    EXPECT_EQ(0, std::memcmp(vf.data(), vh.data(), vf.size() * 4)) << "sequence " << s << " V";
  }
  for (ta_cache* c : {fused, split, host}) ta_cache_destroy(c);
}

// Holds a stream for `*ms` milliseconds (a host function queued on it): work queued after it waits.
void CUDART_CB hold_stream(void* ms) { std::this_thread::sleep_for(std::chrono::milliseconds(*static_cast<int*>(ms))); }

// Appends queued behind a busy stream, one token for each of `n` sequences per call: the CPU cache's
// bytes after them all. With 4 sequences (runs in the launch's parameters, kInlineWriteRuns) 70 calls,
// and with 257 (through the upload ring's pinned memory) 40 calls, fewer than the ring holds, must
// return while the stream is still held (no call waits for it); with 400, 200 calls hold three times
// the ring (UploadRing::kCallsAhead calls), so it wraps and the calls must wait for its oldest regions,
// never overwriting one a queued copy still reads.
struct UploadCase {
  int sequences, calls;
  bool returns_while_held;
};
class GpuCacheUploads : public test::GpuTestWithParam<UploadCase> {};

TEST_P(GpuCacheUploads, AppendsBehindABusyStreamStayExact) {
  const int n = GetParam().sequences, steps = GetParam().calls, H = 2, D = 64;
  Mirror m(make_config("mix", 1, H, D, 4 * n, n), rng);
  std::vector<int> seqs;
  for (int i = 0; i < n; ++i) seqs.push_back(m.add());
  std::vector<int> prompt;
  for (int i = 0; i < n; ++i) prompt.push_back(1 + (i * 37) % 130);  // blocks fill at different steps
  m.write(0, seqs, prompt);
  // Every step's tokens, uploaded before the stream is held.
  std::vector<float> k = test::make_input(rng, steps * n, H, D, InputKind::Outliers, 'k');
  std::vector<float> v = test::make_input(rng, steps * n, H, D, InputKind::Normal, 'v');
  const std::vector<uint16_t> kb = test::to_half(k), vb = test::to_half(v);
  for (size_t i = 0; i < k.size(); ++i) k[i] = ref::half_to_float(kb[i]), v[i] = ref::half_to_float(vb[i]);
  test::DeviceBuffer<uint16_t> dk(kb.size()), dv(vb.size());
  dk.upload(kb), dv.upload(vb);
  std::vector<int32_t> cu(size_t(n) + 1);
  for (int i = 0; i <= n; ++i) cu[size_t(i)] = i;
  const test::Stream stream;
  int hold_ms = 400;
  ASSERT_EQ(cudaLaunchHostFunc(stream, hold_stream, &hold_ms), cudaSuccess);
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    const size_t at = size_t(step) * n * H * D;
    const ta_tensor tk = device_tensor(dk.ptr + at, TA_DTYPE_F16, {n, H, D}), tv = device_tensor(dv.ptr + at, TA_DTYPE_F16, {n, H, D});
    m.gpu.write(0, seqs.data(), n, tk, tv, cu, stream);
  }
  const double queued_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (GetParam().returns_while_held) EXPECT_LT(queued_ms, 200.0) << "the appends waited for the held stream";
  for (int step = 0; step < steps; ++step)
    for (int i = 0; i < n; ++i) {
      ref::HeadsView kv = test::view_of(k, steps * n, H, D), vv = test::view_of(v, steps * n, H, D);
      kv.data += (size_t(step) * n + i) * H * D, vv.data += (size_t(step) * n + i) * H * D;
      kv.tokens = vv.tokens = 1;
      m.cpu.write(0, seqs[size_t(i)], kv, vv);
    }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  for (int s : seqs) m.expect_same(0, s);
}

INSTANTIATE_TEST_SUITE_P(Sequences, GpuCacheUploads,
                         testing::Values(UploadCase{4, 70, true}, UploadCase{257, 40, true}, UploadCase{400, 200, false}));

// A write queued inside CUDA graph capture is refused before anything changes: its pages are taken on
// the host, so a replay could not take the next ones.
TEST_F(GpuCacheGraph, CapturedAppendIsRefusedAndWritesNothing) {
  Mirror m(make_config("4", 1, 2, 64, 16, 2), rng);
  const int s = m.add();
  m.write(0, {s}, {63});
  test::DeviceBuffer<uint16_t> dk(2 * 64), dv(2 * 64);
  std::vector<float> k = test::make_input(rng, 1, 2, 64, InputKind::Normal, 'k'), v = test::make_input(rng, 1, 2, 64, InputKind::Normal, 'v');
  dk.upload(test::to_half(k)), dv.upload(test::to_half(v));
  const ta_tensor tk = device_tensor(dk.ptr, TA_DTYPE_F16, {1, 2, 64}), tv = device_tensor(dv.ptr, TA_DTYPE_F16, {1, 2, 64});
  const test::Stream stream;
  const test::CapturedGraph graph(stream, [&] { m.gpu.write(0, &s, 1, tk, tv, {0, 1}, stream); });
  EXPECT_NE(graph.error().find("CUDA graph"), std::string::npos) << "message: " << graph.error();
  EXPECT_EQ(m.gpu.book().length(0, s), 63);
  m.expect_same(0, s);
}

TEST_F(GpuCacheGraph, CapturedDecodeSeesTokensAppendedLater) {
  Mirror m(make_config("4", 1, 2, 128, 64, 2), rng);
  const int s = m.add();
  m.write(0, {s}, {700});
  const int hq = 8, D = 128;
  std::vector<float> q = test::make_input(rng, 1, hq, D, InputKind::Normal, 'q');
  test::DeviceBuffer<uint16_t> dq(q.size()), graph_out(q.size()), plain_out(q.size());
  dq.upload(test::to_half(q));
  const ta_tensor tq = device_tensor(dq.ptr, TA_DTYPE_F16, {1, 1, hq, D});
  ta_tensor tg = device_tensor(graph_out.ptr, TA_DTYPE_F16, {1, 1, hq, D}), tp = device_tensor(plain_out.ptr, TA_DTYPE_F16, {1, 1, hq, D});
  ta_decode_options o = ta_decode_default_options();
  o.split_tiles = 2;  // fixed splits: the captured grid covers the longer sequence too
  const test::Stream stream;
  m.gpu.decode(0, &s, 1, tq, o, tg, stream);  // grows the workspace outside capture
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const test::CapturedGraph graph(stream, [&] { m.gpu.decode(0, &s, 1, tq, o, tg, stream); });
  ASSERT_TRUE(graph.ready()) << graph.error();
  for (int step = 0; step < 3; ++step) m.write(0, {s}, {1});  // 703 tokens, beyond the captured length
  graph_out.poison();
  ASSERT_EQ(graph.launch(stream), cudaSuccess);
  m.gpu.decode(0, &s, 1, tq, o, tp, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(graph_out.download(), plain_out.download());
  // 1403 tokens, past the 12 tiles the captured splits were sized for: the last split takes the rest.
  m.write(0, {s}, {700});
  graph_out.poison();
  ASSERT_EQ(graph.launch(stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<float> got, want(q.size());
  for (uint16_t b : graph_out.download()) got.push_back(ref::half_to_float(b));
  m.cpu.decode(0, s, test::view_of(q, 1, hq, D), 0.0f, true, 0, want.data());
  EXPECT_LE(test::compare(got, want).rel_l2, 0.01) << "replay over 1403 tokens vs the CPU decode";
}

// Decode steps (append, then decode, in two layers) captured once and replayed across block
// boundaries: the cache afterwards holds exactly the CPU cache's bytes for the same tokens, each
// replay's outputs match the CPU decode, the host's lengths follow at sync, and replays past the
// reservation write nothing and are reported.
TEST_F(GpuCacheGraph, CapturedAppendsReplayAsEagerAppends) {
  const int layers = 2, H = 2, D = 64, hq = 6, steps = 140;
  Mirror m(make_config("mix", layers, H, D, 64, 4), rng);
  const std::vector<int> seqs = {m.add(), m.add(), m.add()};
  const int n = int(seqs.size());
  for (int l = 0; l < layers; ++l) m.write(l, seqs, {1, 62, 129});
  const test::Stream stream;
  m.gpu.reserve(seqs.data(), n, steps, stream);
  for (int s : seqs) m.cpu.book().reserve(s, steps);  // the same page ids
  ASSERT_EQ(m.gpu.book().table(seqs[2]), m.cpu.page_table(seqs[2]));

  test::DeviceBuffer<uint16_t> dk(size_t(layers) * n * H * D), dv(dk.n), dq(size_t(n) * hq * D), dout(size_t(layers) * n * hq * D);
  const auto layer_tensor = [&](uint16_t* base, int l, std::initializer_list<int64_t> shape, int64_t per_layer) {
    return device_tensor(base + l * per_layer, TA_DTYPE_F16, shape);
  };
  ta_decode_options o = ta_decode_default_options();
  const auto step = [&](cudaStream_t st) {
    for (int l = 0; l < layers; ++l) {
      const ta_tensor tk = layer_tensor(dk.ptr, l, {n, H, D}, int64_t(n) * H * D), tv = layer_tensor(dv.ptr, l, {n, H, D}, int64_t(n) * H * D);
      ta_tensor to = layer_tensor(dout.ptr, l, {n, 1, hq, D}, int64_t(n) * hq * D);
      m.gpu.write(l, seqs.data(), n, tk, tv, {0, 1, 2, 3}, st);
      m.gpu.decode(l, seqs.data(), n, device_tensor(dq.ptr, TA_DTYPE_F16, {n, 1, hq, D}), o, to, st);
    }
  };
  std::vector<float> q = test::make_input(rng, n, hq, D, InputKind::Normal, 'q');
  dq.upload(test::to_half(q));  // read by the decodes below
  // Sizes the decode workspace outside capture (for the reserved lengths) without appending.
  for (int l = 0; l < layers; ++l) {
    ta_tensor to = layer_tensor(dout.ptr, l, {n, 1, hq, D}, int64_t(n) * hq * D);
    m.gpu.decode(l, seqs.data(), n, device_tensor(dq.ptr, TA_DTYPE_F16, {n, 1, hq, D}), o, to, stream);
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const test::CapturedGraph graph(stream, [&] { step(stream); });
  ASSERT_TRUE(graph.ready()) << graph.error();
  // The host's lengths are behind from now on: host-planned writes are refused until sync.
  EXPECT_THROW(m.gpu.write(0, seqs.data(), 1, layer_tensor(dk.ptr, 0, {1, H, D}, 0), layer_tensor(dv.ptr, 0, {1, H, D}, 0), {0, 1}, stream),
               Error);

  for (int t = 0; t < steps; ++t) {
    std::vector<float> k = test::make_input(rng, layers * n, H, D, InputKind::Normal, 'k');
    std::vector<float> v = test::make_input(rng, layers * n, H, D, InputKind::Normal, 'v');
    q = test::make_input(rng, n, hq, D, InputKind::Normal, 'q');
    const std::vector<uint16_t> kb = test::to_half(k), vb = test::to_half(v), qb = test::to_half(q);
    ASSERT_EQ(cudaMemcpyAsync(dk.ptr, kb.data(), kb.size() * 2, cudaMemcpyHostToDevice, stream), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(dv.ptr, vb.data(), vb.size() * 2, cudaMemcpyHostToDevice, stream), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(dq.ptr, qb.data(), qb.size() * 2, cudaMemcpyHostToDevice, stream), cudaSuccess);
    dout.poison();
    ASSERT_EQ(graph.launch(stream), cudaSuccess);
    for (int l = 0; l < layers; ++l)
      for (int i = 0; i < n; ++i) {
        ref::HeadsView kv = test::view_of(k, layers * n, H, D), vv = test::view_of(v, layers * n, H, D);
        kv.data += size_t(l * n + i) * H * D, vv.data += size_t(l * n + i) * H * D, kv.tokens = vv.tokens = 1;
        m.cpu.write(l, seqs[size_t(i)], kv, vv);
      }
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);  // the pageable copies' sources stay valid until here
    if (t % 23 != 0 && t != steps - 1) continue;
    const std::vector<uint16_t> ob = dout.download();
    for (int l = 0; l < layers; ++l)
      for (int i = 0; i < n; ++i) {
        std::vector<float> got(size_t(hq) * D), want(got.size());
        for (size_t e = 0; e < got.size(); ++e) got[e] = ref::half_to_float(ob[(size_t(l) * n + i) * hq * D + e]);
        ref::HeadsView qv = test::view_of(q, n, hq, D);
        qv.data += size_t(i) * hq * D, qv.tokens = 1;
        m.cpu.decode(l, seqs[size_t(i)], qv, 0.0f, true, 0, want.data());
        const test::ErrorStats e = test::compare(got, want);
        EXPECT_TRUE(e.finite) << "step " << t << " layer " << l << " sequence " << i;
        EXPECT_LE(e.rel_l2, 0.01) << "step " << t << " layer " << l << " sequence " << i << " of " << m.cpu.length(l, seqs[size_t(i)]);
      }
  }
  m.gpu.sync();
  for (int l = 0; l < layers; ++l)
    for (int s : seqs) m.expect_same(l, s);
  m.write(1, {seqs[1]}, {1});  // host-planned writes work again
  m.expect_same(1, seqs[1]);

  // Every sequence is at (or, seqs[1] in layer 1, past) its reservation's end: a replay writes nothing,
  // and sync says so.
  ASSERT_EQ(graph.launch(stream), cudaSuccess);
  try {
    m.gpu.sync();
    ADD_FAILURE() << "sync after a replay past the reservation did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), TA_ERROR_OUT_OF_CAPACITY) << e.what();
    EXPECT_NE(std::string(e.what()).find("reservation"), std::string::npos) << e.what();
  }
  for (int l = 0; l < layers; ++l)
    for (int s : seqs) m.expect_same(l, s);
}

// sync takes a device length only where the slot's own sequence captured appends: a slot reused after a
// long sequence keeps that sequence's device lengths in the layers the new one has not written. And a
// sequence with captured appends is not released before a sync.
TEST_F(GpuCacheGraph, SyncTakesOnlyTheCapturedAppendsLengths) {
  Mirror m(make_config("4", 2, 2, 64, 16, 1), rng);
  const int old_seq = m.add();
  for (int l = 0; l < 2; ++l) m.write(l, {old_seq}, {300});
  m.release(old_seq);
  const int s = m.add();
  ASSERT_EQ(s, old_seq);
  m.write(0, {s}, {10});  // layer 1 left empty: its device length is still 300
  const test::Stream stream;
  m.gpu.reserve(&s, 1, 5, stream);
  m.cpu.book().reserve(s, 5);
  std::vector<float> k = test::make_input(rng, 1, 2, 64, InputKind::Normal, 'k'), v = test::make_input(rng, 1, 2, 64, InputKind::Normal, 'v');
  test::DeviceBuffer<uint16_t> dk(2 * 64), dv(2 * 64);
  dk.upload(test::to_half(k)), dv.upload(test::to_half(v));
  const ta_tensor tk = device_tensor(dk.ptr, TA_DTYPE_F16, {1, 2, 64}), tv = device_tensor(dv.ptr, TA_DTYPE_F16, {1, 2, 64});
  const test::CapturedGraph graph(stream, [&] { m.gpu.write(0, &s, 1, tk, tv, {0, 1}, stream); });
  ASSERT_TRUE(graph.ready()) << graph.error();
  ASSERT_EQ(graph.launch(stream), cudaSuccess);
  m.cpu.write(0, s, test::view_of(k, 1, 2, 64), test::view_of(v, 1, 2, 64));
  EXPECT_THROW(m.gpu.release_sequence(s), Error);
  m.gpu.sync();
  EXPECT_EQ(m.gpu.book().length(0, s), 11);
  EXPECT_EQ(m.gpu.book().length(1, s), 0);
  m.expect_same(0, s);
  m.gpu.release_sequence(s);  // after the sync
}

// What a capture refuses, before anything changes: several tokens per sequence, and appends to
// sequences without room reserved.
TEST_F(GpuCacheGraph, CaptureRefusesWritesWithoutReservedRoom) {
  Mirror m(make_config("4", 1, 2, 64, 16, 2), rng);
  const int a = m.add(), b = m.add();
  m.write(0, {a, b}, {63, 10});
  const test::Stream stream;
  m.gpu.reserve(&a, 1, 1, stream);  // room for one token of a; none for b
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  test::DeviceBuffer<uint16_t> dk(2 * 2 * 64), dv(2 * 2 * 64);
  const ta_tensor tk = device_tensor(dk.ptr, TA_DTYPE_F16, {2, 2, 64}), tv = device_tensor(dv.ptr, TA_DTYPE_F16, {2, 2, 64});
  const int both[2] = {a, b};
  const auto captured_message = [&](auto&& call) { return test::CapturedGraph(stream, call).error(); };
  EXPECT_NE(captured_message([&] { m.gpu.write(0, &a, 1, tk, tv, {0, 2}, stream); }).find("a cache write of 2 tokens"),
            std::string::npos);
  EXPECT_NE(captured_message([&] { m.gpu.write(0, both, 2, tk, tv, {0, 1, 2}, stream); }).find("no room reserved"),
            std::string::npos);
  // No token for the first of two sequences and two for the second: as many rows as sequences, still not
  // an append (the first sequence's count is the one refused).
  EXPECT_NE(captured_message([&] { m.gpu.write(0, both, 2, tk, tv, {0, 0, 2}, stream); }).find("a cache write of 0 tokens"),
            std::string::npos);
  EXPECT_NE(captured_message([&] { m.gpu.reserve(&a, 1, 1, stream); }).find("reserve before capturing"), std::string::npos);
  m.gpu.sync();  // nothing was captured: no-op
  for (int s : {a, b}) m.expect_same(0, s);
}

}  // namespace
