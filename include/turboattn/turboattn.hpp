// turboattn C++ API: a thin layer over the C API (turboattn.h) with exceptions and RAII.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "turboattn/turboattn.h"

namespace turboattn {

// Thrown by every wrapper when the C call fails; status() is the ta_status, what() the message.
class Exception : public std::runtime_error {
 public:
  Exception(ta_status status, const std::string& message)
      : std::runtime_error(std::string(ta_status_string(status)) + ": " + message), status_(status) {}
  ta_status status() const { return status_; }

 private:
  ta_status status_;
};

inline void check(ta_status status) {
  if (status != TA_SUCCESS) throw Exception(status, ta_last_error());
}

// A contiguous tensor descriptor over caller memory.
inline ta_tensor tensor(void* data, ta_dtype dtype, std::vector<int64_t> shape, ta_device device = TA_DEVICE_CPU) {
  return ta_tensor_contiguous(data, dtype, device, int32_t(shape.size()), shape.data());
}

struct AttentionOptions : ta_attention_options {
  AttentionOptions() : ta_attention_options(ta_attention_default_options()) {}
};

inline void attention(const ta_tensor& q, const ta_tensor& k, const ta_tensor& v, ta_tensor& out,
                      const AttentionOptions& options = {}, ta_tensor* lse = nullptr,
                      const ta_tensor* cu_seqlens_q = nullptr, const ta_tensor* cu_seqlens_k = nullptr,
                      void* cuda_stream = nullptr) {
  check(ta_attention(&q, &k, &v, cu_seqlens_q, cu_seqlens_k, &options, &out, lse, cuda_stream));
}

// The compressed paged KV cache; owns its ta_cache.
class KvCache {
 public:
  KvCache(const ta_cache_config& config, ta_device device = TA_DEVICE_CPU) {
    ta_cache* c = nullptr;
    check(ta_cache_create(&config, device, &c));
    cache_.reset(c);
  }
  int32_t add_sequence() {
    int32_t s = -1;
    check(ta_cache_add_sequence(cache_.get(), &s));
    return s;
  }
  void release_sequence(int32_t seq) { check(ta_cache_release_sequence(cache_.get(), seq)); }
  int64_t length(int32_t layer, int32_t seq) const {
    int64_t n = 0;
    check(ta_cache_sequence_length(cache_.get(), layer, seq, &n));
    return n;
  }
  int32_t free_pages() const {
    int32_t n = 0;
    check(ta_cache_free_pages(cache_.get(), &n));
    return n;
  }
  ta_cache_memory memory() const {
    ta_cache_memory m{};
    check(ta_cache_memory_info(cache_.get(), &m));
    return m;
  }
  void write(int32_t layer, const std::vector<int32_t>& seqs, const ta_tensor& k, const ta_tensor& v,
             const ta_tensor& cu_seqlens, void* cuda_stream = nullptr) {
    check(ta_cache_write(cache_.get(), layer, seqs.data(), int32_t(seqs.size()), &k, &v, &cu_seqlens, cuda_stream));
  }
  void append(int32_t layer, const std::vector<int32_t>& seqs, const ta_tensor& k, const ta_tensor& v,
              void* cuda_stream = nullptr) {
    check(ta_cache_append(cache_.get(), layer, seqs.data(), int32_t(seqs.size()), &k, &v, cuda_stream));
  }
  // Capturable appends (ta_cache_reserve, ta_cache_sync).
  void reserve(const std::vector<int32_t>& seqs, int64_t tokens, void* cuda_stream = nullptr) {
    check(ta_cache_reserve(cache_.get(), seqs.data(), int32_t(seqs.size()), tokens, cuda_stream));
  }
  void sync() { check(ta_cache_sync(cache_.get())); }
  void decode(int32_t layer, const std::vector<int32_t>& seqs, const ta_tensor& q, ta_tensor& out,
              const ta_decode_options& options = ta_decode_default_options(), void* cuda_stream = nullptr) {
    check(ta_decode(cache_.get(), layer, seqs.data(), int32_t(seqs.size()), &q, &options, &out, cuda_stream));
  }
  // append then decode, one call (ta_cache_append_decode).
  void append_decode(int32_t layer, const std::vector<int32_t>& seqs, const ta_tensor& k, const ta_tensor& v, const ta_tensor& q,
                     ta_tensor& out, const ta_decode_options& options = ta_decode_default_options(), void* cuda_stream = nullptr) {
    check(ta_cache_append_decode(cache_.get(), layer, seqs.data(), int32_t(seqs.size()), &k, &v, &q, &options, &out, cuda_stream));
  }
  // What a sequence holds in one layer, dequantized: k, v [length, Hkv, D] on the CPU (ta_cache_read).
  void read(int32_t layer, int32_t seq, ta_tensor& k, ta_tensor& v) const {
    check(ta_cache_read(cache_.get(), layer, seq, &k, &v));
  }
  ta_cache* get() { return cache_.get(); }

 private:
  struct Deleter {
    void operator()(ta_cache* c) const { ta_cache_destroy(c); }
  };
  std::unique_ptr<ta_cache, Deleter> cache_;
};

// ta_decode_plan: one step's decode arguments checked once, run per layer. Must not outlive its cache.
class DecodePlan {
 public:
  DecodePlan(KvCache& cache, const std::vector<int32_t>& seqs, const ta_tensor& q, ta_tensor& out,
             const ta_decode_options& options = ta_decode_default_options()) {
    ta_decode_plan* p = nullptr;
    check(ta_decode_plan_create(cache.get(), seqs.data(), int32_t(seqs.size()), &q, &options, &out, &p));
    plan_.reset(p);
  }
  void run(int32_t layer, void* cuda_stream = nullptr) { check(ta_decode_plan_run(plan_.get(), layer, cuda_stream)); }

 private:
  struct Deleter {
    void operator()(ta_decode_plan* p) const { ta_decode_plan_destroy(p); }
  };
  std::unique_ptr<ta_decode_plan, Deleter> plan_;
};

}  // namespace turboattn
