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
        reserved_end_(size_t(max_seqs), 0), active_(size_t(max_seqs), false) {
    for (int p = num_pages - 1; p >= 0; --p) free_.push_back(p);
  }

  // The lowest free slot, or -1 when every slot is taken.
  int add_sequence() {
    for (int s = 0; s < max_seqs_; ++s)
      if (!active_[size_t(s)]) {
        active_[size_t(s)] = true;
        for (int l = 0; l < layers_; ++l) length_[index(l, s)] = 0;
        reserved_end_[size_t(s)] = 0;
        return s;
      }
    return -1;
  }
  void release_sequence(int seq) {
    for (int p : tables_[size_t(seq)]) free_.push_back(p);
    tables_[size_t(seq)].clear();
    reserved_end_[size_t(seq)] = 0;
    active_[size_t(seq)] = false;
    for (int l = 0; l < layers_; ++l) length_[index(l, seq)] = 0;
  }
  bool active(int seq) const { return seq >= 0 && seq < max_seqs_ && active_[size_t(seq)]; }
  int64_t length(int layer, int seq) const { return length_[index(layer, seq)]; }
  void add_tokens(int layer, int seq, int64_t tokens) { length_[index(layer, seq)] += tokens; }
  void set_length(int layer, int seq, int64_t length) { length_[index(layer, seq)] = length; }
  // The longest the sequence is in any layer.
  int64_t max_length(int seq) const {
    int64_t n = 0;
    for (int l = 0; l < layers_; ++l) n = std::max(n, length(l, seq));
    return n;
  }
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

  // Reservations: the pages of every block a sequence completes in its next `tokens` tokens (counted
  // from its longest layer: reservation_end), taken now (in block order), so that appends up to there
  // need no host work (captured appends, docs/INTEGRATION.md). The caller checked capacity
  // (pages_to_reserve, and the end against max_seq_len).
  int64_t reservation_end(int seq, int64_t tokens) const { return max_length(seq) + tokens; }
  int pages_to_reserve(int seq, int64_t tokens) const {
    const int64_t end = reservation_end(seq, tokens);
    return int(std::max<int64_t>(0, table_index(end / TA_BLOCK_TOKENS) - int64_t(tables_[size_t(seq)].size())));
  }
  void reserve(int seq, int64_t tokens) {
    const int64_t end = reservation_end(seq, tokens);
    std::vector<int>& table = tables_[size_t(seq)];
    while (int64_t(table.size()) < table_index(end / TA_BLOCK_TOKENS)) {
      table.push_back(free_.back());
      free_.pop_back();
    }
    reserved_end_[size_t(seq)] = std::max(reserved_end_[size_t(seq)], end);
  }
  // Tokens the sequence may hold with its pages reserved (0: no reservation).
  int64_t reserved_end(int seq) const { return reserved_end_[size_t(seq)]; }
  const std::vector<int64_t>& reserved_ends() const { return reserved_end_; }

 private:
  size_t index(int layer, int seq) const { return size_t(layer) * max_seqs_ + seq; }
  int layers_, max_seqs_;
  std::vector<int64_t> length_;          // per (layer, seq)
  std::vector<std::vector<int>> tables_;  // per seq: page ids of its blocks after the first
  std::vector<int64_t> reserved_end_;     // per seq: see reserve()
  std::vector<bool> active_;
  std::vector<int> free_;  // free page ids (a stack)
};

}  // namespace turboattn
