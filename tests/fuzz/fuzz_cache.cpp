// libFuzzer target: the KV cache through the C API (configuration, sequence slots, page allocation
// and page tables, bulk writes, appends with flushes, decode, append-and-decode, reservations) with
// operations and arguments drawn from the input; a refused append-and-decode changes no length, an
// accepted one leaves every sequence at least q_len long; after every operation, no page is lost: free
// pages plus the pages the live sequences hold (one per full block of their longest layer or of their
// reservation, whichever is longer) is the pool.
#include <algorithm>
#include <cstdlib>

#include "format/page_book.hpp"
#include "fuzz_util.hpp"

using namespace turboattn::fuzz;

namespace {
void check_status(ta_status s) {
  if (s == TA_ERROR_INTERNAL || (s != TA_SUCCESS && ta_last_error()[0] == '\0')) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  ta_cache_config cfg = ta_cache_default_config();
  cfg.num_layers = in.ConsumeIntegralInRange<int>(0, 2);
  cfg.num_kv_heads = in.ConsumeIntegralInRange<int>(0, 3);
  cfg.head_dim = int(pick_head_dim(in));
  cfg.num_pages = in.ConsumeIntegralInRange<int>(-1, 6);
  cfg.max_seqs = in.ConsumeIntegralInRange<int>(0, 3);
  cfg.max_seq_len = in.ConsumeIntegralInRange<int64_t>(0, 400);
  std::vector<int32_t> bits(static_cast<size_t>(std::max(0, cfg.num_layers * cfg.num_kv_heads)));
  for (int32_t& b : bits) b = in.ConsumeIntegralInRange<int>(0, 20) ? (in.ConsumeBool() ? 4 : (in.ConsumeBool() ? 2 : 8)) : in.ConsumeIntegral<int8_t>();
  cfg.head_bits = in.ConsumeBool() ? bits.data() : nullptr;
  cfg.smooth_k = in.ConsumeBool();
  ta_cache* cache = nullptr;
  const ta_status created = ta_cache_create(&cfg, in.ConsumeIntegralInRange<int>(0, 20) ? TA_DEVICE_CPU : TA_DEVICE_CUDA, &cache);
  check_status(created);
  if (created != TA_SUCCESS) return 0;
  const int64_t H = cfg.num_kv_heads, D = cfg.head_dim;
  std::vector<bool> live(static_cast<size_t>(cfg.max_seqs), false);
  std::vector<int64_t> reserved(static_cast<size_t>(cfg.max_seqs), 0);  // tokens each sequence has pages for
  const auto longest = [&](int32_t s) {
    int64_t n = 0;
    for (int32_t l = 0; l < cfg.num_layers; ++l) {
      int64_t len = 0;
      check_status(ta_cache_sequence_length(cache, l, s, &len));
      n = std::max(n, len);
    }
    return n;
  };
  const ta_dtype dt = in.ConsumeBool() ? TA_DTYPE_F16 : TA_DTYPE_BF16;
  while (in.remaining_bytes() > 0) {
    int32_t seqs[3];
    const int n = in.ConsumeIntegralInRange<int>(0, 3);
    for (int i = 0; i < n; ++i) seqs[i] = in.ConsumeIntegralInRange<int>(-1, cfg.max_seqs);
    const int32_t layer = in.ConsumeIntegralInRange<int>(-1, cfg.num_layers);
    switch (in.ConsumeIntegralInRange<int>(0, 6)) {
      case 0: {
        int32_t s = -1;
        const ta_status st = ta_cache_add_sequence(cache, in.ConsumeIntegralInRange<int>(0, 20) ? &s : nullptr);
        check_status(st);
        if (st == TA_SUCCESS) live[size_t(s)] = true, reserved[size_t(s)] = 0;
        break;
      }
      case 1: {
        const int32_t s = n ? seqs[0] : in.ConsumeIntegral<int32_t>();
        const ta_status st = ta_cache_release_sequence(cache, s);
        check_status(st);
        if (st == TA_SUCCESS) live[size_t(s)] = false, reserved[size_t(s)] = 0;
        break;
      }
      case 5: {  // reservation (all or nothing), then a sync, which on the CPU changes nothing
        const int64_t tokens = in.ConsumeIntegralInRange<int64_t>(-1, 300);
        const ta_status st = ta_cache_reserve(cache, n ? seqs : nullptr, n, tokens, nullptr);
        check_status(st);
        for (int i = 0; i < n && st == TA_SUCCESS; ++i)
          reserved[size_t(seqs[i])] = std::max(reserved[size_t(seqs[i])], longest(seqs[i]) + tokens);
        check_status(ta_cache_sync(cache));
        break;
      }
      case 2: {  // bulk write of up to 130 tokens per sequence
        std::vector<int64_t> lens(static_cast<size_t>(n));
        int64_t total = 0;
        for (int64_t& l : lens) total += (l = in.ConsumeIntegralInRange<int64_t>(0, 130));
        FuzzTensor k = make_tensor(in, {total, H, D}, dt), v = make_tensor(in, {total, H, D}, dt);
        FuzzTensor cu = make_tensor(in, {n + 1}, TA_DTYPE_I32);
        if (cu.t.data && cu.t.dtype == TA_DTYPE_I32 && cu.t.ndim == 1 && cu.t.strides[0] > 0) {
          auto* p = reinterpret_cast<int32_t*>(cu.t.data);
          int64_t at = 0;
          for (int64_t i = 0; i < cu.t.shape[0]; ++i) {
            p[i * cu.t.strides[0]] = int32_t(at);
            if (i < n) at += lens[size_t(i)];
          }
        }
        check_status(ta_cache_write(cache, layer, n ? seqs : nullptr, n, k.ptr(), v.ptr(), cu.ptr(), nullptr));
        break;
      }
      case 3: {
        FuzzTensor k = make_tensor(in, {n, H, D}, dt), v = make_tensor(in, {n, H, D}, dt);
        check_status(ta_cache_append(cache, layer, n ? seqs : nullptr, n, k.ptr(), v.ptr(), nullptr));
        break;
      }
      case 4: {  // append then decode in one call; refused, it writes nothing
        const int64_t q_len = in.ConsumeIntegralInRange<int64_t>(1, 3), hq = H * in.ConsumeIntegralInRange<int64_t>(1, 2);
        FuzzTensor k = make_tensor(in, {n, H, D}, dt), v = make_tensor(in, {n, H, D}, dt);
        FuzzTensor q = make_tensor(in, {n, q_len, hq, D}, dt), o = make_tensor(in, {n, q_len, hq, D}, dt);
        std::vector<int64_t> before;
        for (int32_t s = 0; s < cfg.max_seqs; ++s)
          for (int32_t l = 0; l < cfg.num_layers; ++l) {
            int64_t len = 0;
            check_status(ta_cache_sequence_length(cache, l, s, &len));
            before.push_back(len);
          }
        const ta_status st = ta_cache_append_decode(cache, layer, n ? seqs : nullptr, n, k.ptr(), v.ptr(), q.ptr(), nullptr, o.ptr(), nullptr);
        check_status(st);
        size_t i = 0;
        for (int32_t s = 0; s < cfg.max_seqs; ++s)
          for (int32_t l = 0; l < cfg.num_layers; ++l, ++i) {
            int64_t len = 0;
            check_status(ta_cache_sequence_length(cache, l, s, &len));
            if (st != TA_SUCCESS && len != before[i]) std::abort();
          }
        for (int i = 0; i < n && st == TA_SUCCESS; ++i) {  // a decode ran: every sequence holds its queries
          int64_t len = 0;
          check_status(ta_cache_sequence_length(cache, layer, seqs[i], &len));
          if (len < q_len) std::abort();
        }
        break;
      }
      default: {
        const int64_t q_len = in.ConsumeIntegralInRange<int64_t>(1, 3), hq = H * in.ConsumeIntegralInRange<int64_t>(1, 2);
        FuzzTensor q = make_tensor(in, {n, q_len, hq, D}, dt), o = make_tensor(in, {n, q_len, hq, D}, dt);
        ta_decode_options opt = ta_decode_default_options();
        opt.split_tiles = in.ConsumeIntegralInRange<int>(-1, 2);
        check_status(ta_decode(cache, layer, n ? seqs : nullptr, n, q.ptr(), &opt, o.ptr(), nullptr));
      }
    }
    int32_t free_pages = 0;
    check_status(ta_cache_free_pages(cache, &free_pages));
    int64_t held = 0;
    for (int32_t s = 0; s < cfg.max_seqs; ++s) {
      if (!live[size_t(s)]) continue;
      const int64_t tokens = std::max(longest(s), reserved[size_t(s)]);
      held += std::max<int64_t>(0, turboattn::PageBook::table_index(tokens / TA_BLOCK_TOKENS));  // pages: blocks after the first
    }
    if (free_pages + held != cfg.num_pages) std::abort();
  }
  ta_cache_destroy(cache);
  return 0;
}
