// The KV cache on the GPU against the CPU cache (the reference): the same tokens give the same bytes
// (pages, buffers, K means, page tables, lengths) after any mix of bulk writes, appends and releases;
// decode matches the reference's decode and float64 attention over the cache's values; capacity errors
// write nothing; decode replays correctly from a CUDA graph. SKIPPED without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/cache/device_cache.hpp"
#include "gpu_test_util.hpp"
#include "reference/kv_cache.hpp"
#include "test_util.hpp"

namespace test = turboattn::test;
using namespace turboattn;
using test::have_gpu;
using test::InputKind;

namespace {

std::vector<int> head_bits(const std::string& name, int layers, int heads) {
  std::vector<int> b(size_t(layers) * heads);
  for (size_t i = 0; i < b.size(); ++i) b[i] = name == "mix" ? ((i % 2) ? 2 : 4) : std::stoi(name);
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

  // Lengths (host and device), page tables (host and device), every page of the sequence, the valid
  // rows of its buffers and its K means: all equal to the CPU cache's.
  void expect_same(int layer, int seq) {
    const int D = cfg.head_dim;
    const int64_t len = cpu.length(layer, seq), blocks = len / TA_BLOCK_TOKENS;
    const int buffered = int(len % TA_BLOCK_TOKENS);
    ASSERT_EQ(gpu.book().length(layer, seq), len);
    if (len > 0) ASSERT_EQ(gpu.download_length(layer, seq), len);
    ASSERT_EQ(gpu.book().table(seq), cpu.page_table(seq));
    const std::vector<int32_t> table = gpu.download_table(seq);
    for (int64_t b = 0; b < blocks; ++b) {
      ASSERT_EQ(table[size_t(b)], cpu.page_table(seq)[size_t(b)]) << "device page table, block " << b;
      const std::vector<uint8_t> page = gpu.download_page(layer, table[size_t(b)]);
      ASSERT_EQ(0, std::memcmp(page.data(), cpu.page(layer, table[size_t(b)]), page.size())) << "layer " << layer << " block " << b;
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
  }

  // GPU decode of q_len tokens per sequence against the CPU cache's decode and float64 attention over
  // the cache's own (dequantized) values.
  void expect_decode(int layer, const std::vector<int>& seqs, int hq, int q_len, ta_dtype dtype, bool sas, int split_tiles,
                     double bound_vs_exact) {
    const int D = cfg.head_dim, n = int(seqs.size());
    std::vector<float> q = test::make_input(rng, n * q_len, hq, D, kind, 'q');
    std::vector<uint16_t> qb(q.size());
    for (size_t i = 0; i < q.size(); ++i) {
      qb[i] = dtype == TA_DTYPE_F16 ? ref::float_to_half(q[i]) : ref::float_to_bf16(q[i]);
      q[i] = dtype == TA_DTYPE_F16 ? ref::half_to_float(qb[i]) : ref::bf16_to_float(qb[i]);
    }
    test::DeviceBuffer<uint16_t> dq(qb.size()), dout(qb.size());
    dq.upload(qb);
    dout.poison();
    ta_tensor tq = device_tensor(dq.ptr, dtype, {n, q_len, hq, D}), tout = device_tensor(dout.ptr, dtype, {n, q_len, hq, D});
    ta_decode_options o = ta_decode_default_options();
    o.use_sas = sas, o.split_tiles = split_tiles;
    gpu.decode(layer, seqs.data(), n, tq, o, tout, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint16_t> ob = dout.download();
    for (int i = 0; i < n; ++i) {
      const size_t row = size_t(q_len) * hq * D;
      std::vector<float> got(row), want(row);
      for (size_t e = 0; e < row; ++e)
        got[e] = dtype == TA_DTYPE_F16 ? ref::half_to_float(ob[size_t(i) * row + e]) : ref::bf16_to_float(ob[size_t(i) * row + e]);
      ref::HeadsView qv = test::view_of(q, n * q_len, hq, D);
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

class GpuCacheBytes : public testing::TestWithParam<std::tuple<int, std::string>> {};

TEST_P(GpuCacheBytes, WritesAppendsAndReleasesMatchTheCpuCache) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [dim, bits] = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
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

// (head dim, bits, query heads per KV head, q_len, SAS, split_tiles, dtype of q)
using DecodeCase = std::tuple<int, std::string, int, int, bool, int, ta_dtype>;
class GpuDecode : public testing::TestWithParam<DecodeCase> {};

TEST_P(GpuDecode, MatchesTheCpuCacheAndFloat64) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [dim, bits, group, q_len, sas, split_tiles, dtype] = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int hkv = 2;
  Mirror m(make_config(bits, 1, hkv, dim, 160, 8), rng);
  std::vector<int> seqs, lengths{3, 63, 64, 65, 200, 1000, 4097};
  for (int len : lengths) seqs.push_back(m.add());
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
                    DecodeCase{64, "4", 16, 1, true, 0, TA_DTYPE_F16}, DecodeCase{64, "8", 4, 8, true, 0, TA_DTYPE_F16}, DecodeCase{96, "2", 8, 1, true, 0, TA_DTYPE_F16}));

TEST(GpuCacheServing, RandomLivesStayIdenticalToTheCpuCache) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Mirror m(make_config("mix", 2, 2, 64, 96, 6), rng);
  std::vector<int> live;
  for (int step = 0; step < 120; ++step) {
    const int r = int(rng() % 10);
    if (r == 0 && !live.empty()) {  // a sequence finishes
      const size_t i = size_t(rng() % live.size());
      for (int layer = 0; layer < 2; ++layer) m.expect_same(layer, live[i]);
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
      if (step % 20 == 0) m.expect_decode(1, live, 4, 1, TA_DTYPE_F16, true, 0, 0.03);
    }
  }
  for (int s : live)
    for (int layer = 0; layer < 2; ++layer) m.expect_same(layer, s);
  for (int s : live) m.release(s);
  EXPECT_EQ(m.gpu.book().free_pages(), 96);
}

TEST(GpuCacheCapi, CapacityErrorsWriteNothingAndBadTensorsAreRejected) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_kv_heads = 2, cfg.head_dim = 64, cfg.num_pages = 2, cfg.max_seqs = 2, cfg.max_seq_len = 1000;
  ta_cache* cache = nullptr;
  ASSERT_EQ(ta_cache_create(&cfg, TA_DEVICE_CUDA, &cache), TA_SUCCESS) << ta_last_error();
  int32_t s = -1;
  ASSERT_EQ(ta_cache_add_sequence(cache, &s), TA_SUCCESS);
  const int T = 200;  // needs 3 pages, 2 exist
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
  // A write that fits succeeds; q_len over 16 is refused with a clear error.
  ta_tensor tk100 = tk;
  tk100.shape[0] = 100;
  ASSERT_EQ(ta_cache_write(cache, 0, &s, 1, &tk100, &tk100, &cu2, nullptr), TA_SUCCESS) << ta_last_error();
  test::DeviceBuffer<uint16_t> q(size_t(17) * 4 * 64), out(size_t(17) * 4 * 64);
  const ta_tensor tq = device_tensor(q.ptr, TA_DTYPE_F16, {1, 17, 4, 64}), to = device_tensor(out.ptr, TA_DTYPE_F16, {1, 17, 4, 64});
  EXPECT_EQ(ta_decode(cache, 0, &s, 1, &tq, nullptr, const_cast<ta_tensor*>(&to), nullptr), TA_ERROR_UNSUPPORTED);
  ta_cache_destroy(cache);
}

TEST(GpuCacheGraph, CapturedDecodeSeesTokensAppendedLater) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
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
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  m.gpu.decode(0, &s, 1, tq, o, tg, stream);  // grows the workspace outside capture
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  m.gpu.decode(0, &s, 1, tq, o, tg, stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int step = 0; step < 3; ++step) m.write(0, {s}, {1});  // 703 tokens, beyond the captured length
  graph_out.poison();
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  m.gpu.decode(0, &s, 1, tq, o, tp, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(graph_out.download(), plain_out.download());
  cudaGraphExecDestroy(exec), cudaGraphDestroy(graph), cudaStreamDestroy(stream);
}

}  // namespace
