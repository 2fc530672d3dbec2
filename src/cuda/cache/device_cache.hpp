// The compressed paged KV cache in GPU memory (docs/FORMATS.md, section 3): pages, INT8 buffers, first
// blocks, K means, page tables and lengths on the device; the same bookkeeping as the CPU cache (PageBook) on the
// host, so capacity is checked before any work is queued. Host-compiler friendly: no CUDA types here.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "format/cache_layout.h"
#include "format/page_book.hpp"
#include "reference/kv_cache.hpp"  // CacheConfig
#include "turboattn/turboattn.h"

namespace turboattn::cuda {

class UploadRing;  // cuda/common/upload_ring.cuh
template <typename T>
struct WriteParams;  // cuda/cache/write_kernel.cuh

// What of a layer's head widths picks its decode kernel instance: the widest (register budget and shared
// memory) and whether every head is 4-bit (an instance with that width's path alone, cache.cu).
struct LayerWidths {
  int max_bits = TA_BITS_2;
  bool all_4bit = true;
};

// Sequences per decode launch: their slots travel in the kernel's parameters, so that a CTA's first loads
// (its length and page table) do not wait for a load of its slot. 2048 slots (8 KB) make one launch of a
// serving batch; such a launch costs about 0.5 us more host time than one with 1 KB of parameters.
constexpr int kDecodeMaxSeqs = 2048;

// Runs a cache write kernel launch takes in its parameters (write_kernel.cuh, InlineWriteRuns; 32 bytes
// each). A write that starts no sequence and whose two launches (runs that complete a block, then the
// others) each have at most this many, such as an append to up to this many sequences, sends its runs
// so, with no copy on the stream; other writes go through the upload ring.
constexpr int kInlineWriteRuns = 256;

// CTAs per SM of a decode kernel instance: those that fit at once, and those one round is filled to.
struct DecodeOccupancy {
  int resident = 0, fill = 0;
};

// CTAs per SM one round of a layer's CTAs is filled to, at most the `resident` ones, fitted to split sweeps
// (docs/BENCHMARKS.md): 2-bit pages, with half the bytes per instruction, gain from every resident CTA;
// the instance with the 4-bit path alone (`layer_bits` 4) streams fastest at 2 per SM, other 8- and 4-bit
// pages at 3: more splits to fill the rest only add their own cost.
inline int decode_fill_ctas_per_sm(LayerWidths widths, int layer_bits, int resident) {
  if (widths.max_bits == TA_BITS_2) return resident;
  return std::min(resident, layer_bits == TA_BITS_4 ? 2 : 3);
}

// The automatic decode split, fitted to sweeps of fixed splits (docs/BENCHMARKS.md), whose best it
// matches within 2% on every benchmark shape. Where one split's `ctas` fit the SMs' resident CTAs
// (`resident` per SM) in one round, as many splits as fill `fill` per SM. Beyond, the split count with
// the least estimated time: rounds of resident CTAs (a partial last round costs a whole one) times each
// CTA's cost, its split's tiles plus kDecodeCtaTiles for its own work (Q, the first copies' latency, the
// merges); ties go to fewer splits. Never a split under 16 tiles (4 per warp), or 8 where 16-tile splits
// would leave half the SMs or more without a CTA (short contexts at small batch: 1 x 4k and 1 x 8k ran
// 6-27% faster).
constexpr int64_t kDecodeCtaTiles = 8;

inline int automatic_decode_splits(int64_t ctas, int64_t sms, int64_t resident, int64_t fill, int64_t max_tiles) {
  const int64_t min_tiles = 2 * ctas * std::max<int64_t>(1, max_tiles / 16) <= sms ? 8 : 16;
  const int64_t most = std::max<int64_t>(1, max_tiles / min_tiles), slots = resident * sms;
  if (ctas <= slots) return int(std::clamp<int64_t>(std::min(resident, fill) * sms / ctas, 1, most));
  int64_t best = 1, best_cost = INT64_MAX;
  // Within r rounds the most splits that fit, floor(r slots / ctas), cost least. Any split count costs
  // at least the ideal (all tiles spread over every slot) plus kDecodeCtaTiles per round, so the
  // rounds stop once that bound reaches the best.
  const int64_t ideal = (ctas * max_tiles + slots - 1) / slots;
  for (int64_t r = (ctas + slots - 1) / slots;; ++r) {
    const int64_t s = std::clamp<int64_t>(r * slots / ctas, 1, most);
    const int64_t cost = (ctas * s + slots - 1) / slots * ((max_tiles + s - 1) / s + kDecodeCtaTiles);
    if (cost < best_cost) best = s, best_cost = cost;
    if (s == most || ideal + r * kDecodeCtaTiles >= best_cost) break;
  }
  return int(best);
}

class DeviceCache {
 public:
  explicit DeviceCache(const ref::CacheConfig& config);
  ~DeviceCache();
  DeviceCache(const DeviceCache&) = delete;
  DeviceCache& operator=(const DeviceCache&) = delete;

  const ref::CacheConfig& config() const { return cfg_; }
  const PageLayout& layout(int layer) const { return layouts_[size_t(layer)]; }
  PageBook& book() { return book_; }
  const PageBook& book() const { return book_; }

  // Writes k, v [T, Hkv, D] (CUDA, f16 or bf16) of num_seqs sequences (token ranges cu, on the host)
  // to the end of those sequences in one layer; appends are writes of one token per sequence. The
  // caller has checked capacity. Pages are taken on the host exactly as the CPU cache takes them. The
  // device lengths are set (not incremented) by the writes, so a reused slot needs no reset.
  // On a capturing stream only appends to sequences with reserved room (reserve) are taken, planned on
  // the device from the lengths a replay finds there (cache_append_plan_kernel); the host's lengths do
  // not follow replays, so from then on host-planned writes are refused until sync(). Anything else
  // captured is refused before anything changes.
  // The cache's memory is on one device: that device must be current for writes and decodes.
  void expect_current_device() const;
  void write(int layer, const int32_t* seqs, int num_seqs, const ta_tensor& k, const ta_tensor& v,
             const std::vector<int32_t>& cu, void* stream);

  // Takes, for each sequence, the pages of its next `tokens` tokens in every layer (the caller checked
  // capacity) and writes their page-table entries and the reservation's end to the device.
  void reserve(const int32_t* seqs, int num_seqs, int64_t tokens, void* stream);
  // Waits for the device, then takes the lengths captured appends reached into the host's bookkeeping.
  // Throws TA_ERROR_OUT_OF_CAPACITY (after taking them) when a replay found a sequence at its
  // reservation's end: that replay's token was not written.
  void sync();
  // Throws unless the host's lengths are current (no captured append recorded since the last sync);
  // `what` names the call refused.
  void expect_synced(const char* what) const;
  void release_sequence(int seq);

  // Decode attention of q [num_seqs, q_len, Hq, D] over the cache into out (both CUDA, f16 or bf16).
  // Splits are sized for each sequence's reservation where it has one, so a captured decode covers
  // every token a replay's appends can add.
  void decode(int layer, const int32_t* seqs, int num_seqs, const ta_tensor& q, const ta_decode_options& options,
              ta_tensor& out, void* stream);

  // Every token a sequence holds in one layer, dequantized on the host as decode reads it (K's mean
  // added back) into k, v [length][Hkv][D] in host memory. Synchronizes the device first, so that it
  // follows the writes queued on any stream; then copies the sequence's blocks, buffers and K mean.
  void read_tokens(int layer, int seq, float* k, float* v) const;

  // Copies of device state, for tests (synchronous).
  std::vector<uint8_t> download_page(int layer, int page_id) const;
  std::vector<uint8_t> download_buffer(int layer, int seq, int head) const;
  std::vector<uint8_t> download_first_block(int layer, int seq, int head) const;
  std::vector<float> download_k_mean(int layer, int seq) const;
  std::vector<int32_t> download_table(int seq) const;  // the device page table row (all entries)
  int64_t download_length(int layer, int seq) const;

 private:
  ref::CacheConfig cfg_;
  std::vector<PageLayout> layouts_;
  PageBook book_;
  int table_width_ = 0;                 // page-table entries per sequence on the device (blocks after the first)
  std::vector<uint8_t*> pools_;         // per layer: num_pages * page_bytes
  std::vector<uint8_t*> buffers_;       // per layer: max_seqs * kv_heads * buffer_head_bytes
  std::vector<uint8_t*> first_blocks_;  // per layer: max_seqs * kv_heads * first_block_bytes
  std::vector<float*> means_;           // per layer: max_seqs * kv_heads * head_dim
  PageLayout* d_layouts_ = nullptr;     // per layer, for the kernels
  int32_t* d_tables_ = nullptr;         // [max_seqs][table_width_]
  int64_t* d_lengths_ = nullptr;        // [layers][max_seqs]
  int64_t* d_reserved_end_ = nullptr;   // [max_seqs], PageBook::reserved_end
  void* d_append_runs_ = nullptr;       // captured appends' plans: WriteRun [max_seqs]
  int* d_overflow_ = nullptr;           // set by a captured append at its reservation's end
  bool device_ahead_ = false;           // a captured append was recorded since the last sync
  std::vector<uint8_t> captured_;       // [layers][max_seqs]: the slot's sequence has captured appends there
  float* workspace_ = nullptr;          // decode: the splits' parts, grown on demand
  int64_t workspace_floats_ = 0;
  std::unique_ptr<UploadRing> uploads_;  // writes: their runs, through pinned memory
  int device_ = 0;
  int num_sms_ = 0;
  bool dependent_launch_ = false;  // the merge kernel launched as a programmatic dependent (sm_90 on)
  // The occupancy of a decode kernel instance (by dtype, SAS, row groups and the layer's widths), asked of
  // the driver once each: what the automatic split fills.
  DecodeOccupancy occupancy(ta_dtype dtype, bool sas, int rows, LayerWidths widths);
  std::array<DecodeOccupancy, 32> occupancy_{};
  // The write kernel's parameters for `layer` and the tokens k, v (all but the runs).
  template <typename T>
  WriteParams<T> write_params(int layer, const ta_tensor& k, const ta_tensor& v) const;
  // write() on a capturing stream (see write).
  void append_captured(int layer, const int32_t* seqs, int num_seqs, const ta_tensor& k, const ta_tensor& v,
                       const std::vector<int32_t>& cu, void* stream);
  void free_memory();  // every allocation above (the destructor's work, also for a failed constructor)
};

}  // namespace turboattn::cuda
