// The compressed paged KV cache on the CPU: page pool, page tables, INT8 buffers of recent tokens,
// bulk writes, one-token appends with flushes, and decode attention over it. This is the reference
// for the GPU cache: its bytes are the format (docs/FORMATS.md, "KV cache format").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "attention.hpp"
#include "format/cache_layout.h"
#include "format/page_book.hpp"

namespace turboattn::ref {

// One sequence's state in one layer as bytes in host memory: the CPU cache's own, or copies of the GPU
// cache's (whose bytes are the same). first_blocks: each head's first block (at 8 bits, read when
// length >= 64); pages: those of its full blocks after the first, in order;
// buffers: each head's INT8 buffer (the partial block); k_mean: [kv_heads][dim].
struct SequenceBytes {
  const PageLayout* layout = nullptr;
  int64_t length = 0;
  std::vector<const uint8_t*> first_blocks, pages, buffers;
  const float* k_mean = nullptr;
};

// Every token of the sequence dequantized to float as decode reads it (K's mean added back):
// k, v [length][kv_heads][dim].
void read_tokens(const SequenceBytes& sequence, float* k, float* v);

struct CacheConfig {
  int layers = 1, kv_heads = 1, head_dim = 128;
  int num_pages = 0;         // pages in the pool; page p of a sequence is the same id in every layer
  int max_seqs = 1;          // sequence slots
  int64_t max_seq_len = 0;   // tokens per sequence
  std::vector<int> bits;     // layers * kv_heads bit widths (8, 4 or 2)
  bool smooth_k = true;      // subtract the per-head mean of the first write's K
};

class KvCache {
 public:
  explicit KvCache(const CacheConfig& config);

  const CacheConfig& config() const { return cfg_; }
  const PageLayout& layout(int layer) const { return layouts_[size_t(layer)]; }

  // Sequence slots, lengths and pages. add_sequence returns -1 when every slot is taken.
  int add_sequence();
  void release_sequence(int seq) { book_.release_sequence(seq); }
  bool active(int seq) const { return book_.active(seq); }
  int64_t length(int layer, int seq) const { return book_.length(layer, seq); }
  int free_pages() const { return book_.free_pages(); }
  // Pages a sequence must newly take for `tokens` more tokens in `layer`.
  int pages_needed(int layer, int seq, int64_t tokens) const { return book_.pages_needed(layer, seq, tokens); }
  const PageBook& book() const { return book_; }
  PageBook& book() { return book_; }

  // Appends `k`, `v` (tokens x kv_heads x dim) to a sequence: each token is quantized to the buffer
  // and full buffers are flushed into pages. On a sequence's first write to a layer with smooth_k,
  // the K mean is `k_mean` ([kv_heads][dim]) if given, else the mean of these tokens.
  // The caller has checked capacity (pages_needed <= free_pages, length within max_seq_len).
  void write(int layer, int seq, const HeadsView& k, const HeadsView& v, const float* k_mean = nullptr);

  // Decode attention of q (q_len x q_heads x dim, the sequence's last q_len tokens, causal among
  // themselves) into out [q_len][q_heads][dim]. split_tiles > 0 runs split-KV with that many tiles
  // per split and merges, as a GPU kernel does.
  void decode(int layer, int seq, const HeadsView& q, float softmax_scale, bool sas, int split_tiles,
              float* out, float* lse = nullptr) const;

  // Raw state, for tests and for comparison with the GPU cache.
  const uint8_t* page(int layer, int page_id) const;
  const std::vector<int>& page_table(int seq) const { return book_.table(seq); }
  const uint8_t* buffer(int layer, int seq, int head) const;
  const uint8_t* first_block(int layer, int seq, int head) const;
  const float* k_mean(int layer, int seq) const;

  // A sequence's first blocks, pages, buffers and K mean in one layer (pointers into this cache).
  SequenceBytes sequence_bytes(int layer, int seq) const;
  // Every cached token of a sequence dequantized to float (mean added back): [len][kv_heads][dim].
  void read_tokens(int layer, int seq, float* k, float* v) const;

 private:
  uint8_t* buffer_mut(int layer, int seq, int head);
  uint8_t* first_block_mut(int layer, int seq, int head);
  void append_token(int layer, int seq, const float* const* k_rows, const float* const* v_rows);
  void flush(int layer, int seq);

  CacheConfig cfg_;
  std::vector<PageLayout> layouts_;
  std::vector<std::vector<uint8_t>> pools_;    // per layer: num_pages * page_bytes
  std::vector<std::vector<uint8_t>> buffers_;  // per layer: max_seqs * kv_heads * buffer_head_bytes
  std::vector<std::vector<uint8_t>> first_blocks_;  // per layer: max_seqs * kv_heads * first_block_bytes
  std::vector<std::vector<float>> means_;      // per layer: max_seqs * kv_heads * dim
  PageBook book_;
};

}  // namespace turboattn::ref
