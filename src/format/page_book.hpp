// Bookkeeping of a paged KV cache on the host: sequence slots, per-layer lengths, page tables and the
// free-page pool. The CPU cache and the GPU cache share it, so they allocate pages identically.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "format/cache_layout.h"
#include "turboattn/format.h"

namespace turboattn {

class PageBook {
 public:
  PageBook(int layers, int max_seqs, int num_pages)
      : layers_(layers), max_seqs_(max_seqs), length_(size_t(layers) * max_seqs, 0), tables_(size_t(max_seqs)),
        active_(size_t(max_seqs), false) {
    for (int p = num_pages - 1; p >= 0; --p) free_.push_back(p);
  }

  // The lowest free slot, or -1 when every slot is taken.
  int add_sequence() {
    for (int s = 0; s < max_seqs_; ++s)
      if (!active_[size_t(s)]) {
        active_[size_t(s)] = true;
        for (int l = 0; l < layers_; ++l) length_[index(l, s)] = 0;
        return s;
      }
    return -1;
  }
  void release_sequence(int seq) {
    for (int p : tables_[size_t(seq)]) free_.push_back(p);
    tables_[size_t(seq)].clear();
    active_[size_t(seq)] = false;
    for (int l = 0; l < layers_; ++l) length_[index(l, seq)] = 0;
  }
  bool active(int seq) const { return seq >= 0 && seq < max_seqs_ && active_[size_t(seq)]; }
  int64_t length(int layer, int seq) const { return length_[index(layer, seq)]; }
  void add_tokens(int layer, int seq, int64_t tokens) { length_[index(layer, seq)] += tokens; }
  int free_pages() const { return int(free_.size()); }
  const std::vector<int>& table(int seq) const { return tables_[size_t(seq)]; }

  // A sequence's first block is kept at 8 bits in a region of its slot, not in a page (docs/FORMATS.md
  // 3.2): block b >= 1 is in the page of table entry b - 1 (cache_layout.h, shared with the kernels).
  static int64_t table_index(int64_t block) { return page_table_index(block); }
  // Pages a sequence must newly take for `tokens` more tokens in `layer` (a page is taken when a
  // layer first fills its block; the other layers then share it).
  int pages_needed(int layer, int seq, int64_t tokens) const {
    const int64_t blocks = (length(layer, seq) + tokens) / TA_BLOCK_TOKENS;
    return int(std::max<int64_t>(0, table_index(blocks) - int64_t(tables_[size_t(seq)].size())));
  }
  // The page of block `block` (>= 1) of a sequence, taking a free one when no layer has filled it yet.
  // Blocks fill in order, so its table index is at most the table's size; the caller checked capacity.
  int page_for_block(int seq, int64_t block) {
    std::vector<int>& table = tables_[size_t(seq)];
    const int64_t i = table_index(block);
    if (int64_t(table.size()) <= i) {
      table.push_back(free_.back());
      free_.pop_back();
    }
    return table[size_t(i)];
  }

 private:
  size_t index(int layer, int seq) const { return size_t(layer) * max_seqs_ + seq; }
  int layers_, max_seqs_;
  std::vector<int64_t> length_;          // per (layer, seq)
  std::vector<std::vector<int>> tables_;  // per seq: page ids of its blocks after the first
  std::vector<bool> active_;
  std::vector<int> free_;  // free page ids (a stack)
};

}  // namespace turboattn
