// Host side of the GPU KV cache: device memory, the runs of a write, decode launches, the automatic
// split, and the one place that maps (head dim, SAS, row groups, head widths) to a decode kernel instance.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "api/errors.hpp"
#include "cuda/cache/decode_kernel.cuh"
#include "cuda/cache/device_cache.hpp"
#include "cuda/cache/write_kernel.cuh"
#include "cuda/common/check.cuh"
#include "cuda/common/head_dim.cuh"
#include "cuda/common/upload_ring.cuh"
#include "reference/attention.hpp"
#include "reference/kv_cache.hpp"

namespace turboattn::cuda {

namespace {

// Whether work queued on `stream` is being captured into a CUDA graph (also when the capture has been
// invalidated): what the cache refuses, or plans on the GPU, there.
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  TA_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

template <typename X>
X* device_alloc(int64_t count, const char* what) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, size_t(std::max<int64_t>(count, 1)) * sizeof(X));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw Error(TA_ERROR_OUT_OF_MEMORY, concat("cache: cannot allocate ", count * int64_t(sizeof(X)), " bytes of GPU memory for ",
                                               what, ": ", cudaGetErrorString(err)));
  }
  TA_CUDA_CHECK(cudaMemset(p, 0, size_t(std::max<int64_t>(count, 1)) * sizeof(X)));
  return static_cast<X*>(p);
}

// The write kernel's instance for p's head dim on `runs` CTAs per head, its shared-memory limit raised
// (once per device) to what it needs: cache_write_kernel over p.runs, or, given inline_runs,
// cache_write_inline_kernel over those.
template <typename T>
void launch_write_kernel(const WriteParams<T>& p, unsigned runs, const InlineWriteRuns* inline_runs, cudaStream_t stream) {
  with_head_dim(p.dim, "cache write kernel", [&](auto d) {
    constexpr int D = decltype(d)::value;
    const dim3 grid{runs, unsigned(p.kv_heads)};
    if (inline_runs != nullptr) {
      static std::atomic<uint64_t> configured{0};
      allow_dynamic_smem(configured, reinterpret_cast<const void*>(cache_write_inline_kernel<T, D>), write_smem_bytes(D));
      cache_write_inline_kernel<T, D><<<grid, kWriteThreads, write_smem_bytes(D), stream>>>(p, *inline_runs);
      TA_CUDA_CHECK_LAUNCH("cache_write_inline_kernel");
    } else {
      static std::atomic<uint64_t> configured{0};
      allow_dynamic_smem(configured, reinterpret_cast<const void*>(cache_write_kernel<T, D>), write_smem_bytes(D));
      cache_write_kernel<T, D><<<grid, kWriteThreads, write_smem_bytes(D), stream>>>(p);
      TA_CUDA_CHECK_LAUNCH("cache_write_kernel");
    }
  });
}

// A write's runs (host-planned, in `runs`) into the cache that `p` describes (DeviceCache::write_params),
// after the K means of the sequences it starts (`means`).
template <typename T>
void launch_write(WriteParams<T> p, const std::vector<WriteRun>& runs, const std::vector<MeanRun>& means, bool smooth,
                  UploadRing& uploads, cudaStream_t stream) {
  // Runs that complete a block read the tokens buffered before them, so they go first; runs that
  // leave tokens in the buffer (a sequence's last) go second. Runs all of one kind (most decode steps'
  // appends) need no reordering.
  const auto completes = [](const WriteRun& r) { return r.completes_block(); };
  std::vector<WriteRun> ordered[2];
  const std::vector<WriteRun>* parts[2] = {&runs, &ordered[1]};
  const auto completing = std::count_if(runs.begin(), runs.end(), completes);
  if (completing != 0 && size_t(completing) != runs.size()) {
    for (const WriteRun& r : runs) ordered[completes(r) ? 0 : 1].push_back(r);
    parts[0] = &ordered[0];
  }
  // Without means to compute, parts that fit go in the launches' parameters, and nothing is uploaded.
  if (means.empty() && parts[0]->size() <= size_t(kInlineWriteRuns) && parts[1]->size() <= size_t(kInlineWriteRuns)) {
    for (const std::vector<WriteRun>* part : parts) {
      if (part->empty()) continue;
      InlineWriteRuns inline_runs{};  // zeroed: no uninitialized bytes go to the driver
      std::copy(part->begin(), part->end(), inline_runs.run);
      launch_write_kernel(p, unsigned(part->size()), &inline_runs, stream);
    }
    return;
  }
  // Else the means' and the runs' arrays go to the device in one upload.
  UploadRing::Batch upload(uploads, means, *parts[0], *parts[1]);  // arrays 0, 1 and 2
  upload.upload(stream);
  if (!means.empty()) {
    cache_mean_kernel<T><<<dim3{unsigned(means.size()), unsigned(p.kv_heads)}, 128, 0, stream>>>(
        p.k, p.k_n, p.k_h, upload.device<MeanRun>(0), p.means, p.kv_heads, p.dim, smooth);
    TA_CUDA_CHECK_LAUNCH("cache_mean_kernel");
  }
  for (int i = 0; i < 2; ++i) {
    const std::vector<WriteRun>& part = *parts[i];
    if (part.empty()) continue;
    p.runs = upload.device<WriteRun>(1 + size_t(i));
    launch_write_kernel(p, unsigned(part.size()), nullptr, stream);
  }
  upload.release(stream);
}

// A captured append: its runs planned on the device (cache_append_plan_kernel), then written as any.
template <typename T>
void launch_planned_append(WriteParams<T> p, const int32_t* seqs, int num_seqs, AppendPlanParams plan, cudaStream_t stream) {
  p.runs = plan.runs;
  for (int s0 = 0; s0 < num_seqs; s0 += kAppendPlanMaxSeqs) {
    plan.count = std::min(kAppendPlanMaxSeqs, num_seqs - s0);
    plan.first_src = s0;
    std::copy(seqs + s0, seqs + s0 + plan.count, plan.slots);
    cache_append_plan_kernel<<<unsigned((plan.count + 127) / 128), 128, 0, stream>>>(plan);
    TA_CUDA_CHECK_LAUNCH("cache_append_plan_kernel");
    plan.runs += plan.count;
  }
  launch_write_kernel(p, unsigned(num_seqs), nullptr, stream);
}

// The one place that maps (head dim, SAS, row groups, the layer's widths) to a decode kernel instance:
// calls fn(D, SAS, GROUPS, MIN_BLOCKS, LAYER_BITS), each a std::integral_constant. A CTA's query rows
// (heads x q_len) come in groups of 4: one group when they fit. Layers without 8-bit heads, with one
// group, take the instance budgeted for more CTAs per SM (DecodeTraits::kMinBlocksPerSmPacked). Layers
// whose heads are all 4-bit take, where DecodeTraits::kFourBitInstance, an instance with the 4-bit path
// alone (LAYER_BITS 4; else 0, every width's path).
template <typename Fn>
void with_decode_instance(int dim, bool sas, int rows, LayerWidths widths, Fn&& fn) {
  const auto by_rest = [&](auto d) {
    using Tr = DecodeTraits<decltype(d)::value>;
    using One = std::integral_constant<int, 1>;
    using Two = std::integral_constant<int, 2>;
    using Budget = std::integral_constant<int, Tr::kMinBlocksPerSm>;
    using Packed = std::integral_constant<int, Tr::kMinBlocksPerSmPacked>;
    using AnyWidth = std::integral_constant<int, 0>;
    using Only4 = std::integral_constant<int, TA_BITS_4>;
    const auto by_groups = [&](auto s) {
      const auto by_width = [&](auto g, auto b) {
        if constexpr (Tr::kFourBitInstance)
          if (widths.all_4bit) return fn(d, s, g, b, Only4{});
        return fn(d, s, g, b, AnyWidth{});
      };
      if (rows > 4) return by_width(Two{}, Budget{});
      if constexpr (Packed::value != Budget::value)
        if (widths.max_bits <= TA_BITS_4) return by_width(One{}, Packed{});
      // An 8-bit head (or no packed budget): never all 4-bit where the 4-bit instance exists.
      static_assert(!Tr::kFourBitInstance || Packed::value != Budget::value, "4-bit layers with one group take Packed");
      return fn(d, s, One{}, Budget{}, AnyWidth{});
    };
    return sas ? by_groups(std::true_type{}) : by_groups(std::false_type{});
  };
  with_head_dim(dim, "CUDA decode kernel", by_rest);
}

// A decode kernel instance, its shared-memory limit raised (once per device) to what any layer needs.
template <int kHeadDim, typename T, bool kSas, int kGroups, int kMinBlocks, int kLayerBits>
auto decode_kernel() {
  const auto kernel = cache_decode_kernel<kHeadDim, T, kSas, kGroups, kMinBlocks, kLayerBits>;
  static std::atomic<uint64_t> configured{0};
  allow_dynamic_smem(configured, reinterpret_cast<const void*>(kernel), DecodeTraits<kHeadDim>::smem_bytes(kGroups, TA_BITS_8));
  return kernel;
}

template <typename T>
void launch_decode(int dim, bool sas, LayerWidths widths, const DecodeParams& p, int num_seqs, int chunks, cudaStream_t stream) {
  with_decode_instance(dim, sas, p.heads_per_cta * p.q_len, widths, [&](auto d, auto s, auto g, auto b, auto w) {
    using Tr = DecodeTraits<decltype(d)::value>;
    const dim3 grid{unsigned(p.num_splits), unsigned(p.hkv * chunks), unsigned(num_seqs)};
    decode_kernel<decltype(d)::value, T, decltype(s)::value, decltype(g)::value, decltype(b)::value, decltype(w)::value>()<<<
        grid, Tr::kThreads, Tr::smem_bytes(decltype(g)::value, widths.max_bits), stream>>>(p);
    TA_CUDA_CHECK_LAUNCH("cache_decode_kernel");
  });
}

// CTAs of that instance one SM holds at once for a layer of those widths, and how many one round is
// filled to.
template <typename T>
DecodeOccupancy decode_occupancy(int dim, bool sas, int rows, LayerWidths widths) {
  DecodeOccupancy o;
  with_decode_instance(dim, sas, rows, widths, [&](auto d, auto s, auto g, auto b, auto w) {
    using Tr = DecodeTraits<decltype(d)::value>;
    const auto kernel = decode_kernel<decltype(d)::value, T, decltype(s)::value, decltype(g)::value, decltype(b)::value, decltype(w)::value>();
    TA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o.resident, kernel, Tr::kThreads, Tr::smem_bytes(decltype(g)::value, widths.max_bits)));
    o.resident = std::max(1, o.resident);
    o.fill = decode_fill_ctas_per_sm(widths, decltype(w)::value, o.resident);
  });
  return o;
}

// The merge of the launch's splits' parts (p.num_splits > 1): a CTA per row, launched as a programmatic
// dependent of the decode kernel where the device has it (`dependent`), so that its launch overlaps the
// decode kernel's end.
template <typename T>
void launch_merge(const DecodeParams& p, int dim, unsigned rows, bool dependent, cudaStream_t stream) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(rows), config.blockDim = dim3(128), config.stream = stream;
  config.attrs = &attribute, config.numAttrs = dependent ? 1 : 0;
  const auto kernel =
      p.num_splits <= kMergeBatchSmall ? cache_merge_kernel<T, kMergeBatchSmall> : cache_merge_kernel<T, kMergeBatchLarge>;
  // Checked as the <<<>>> launches are, through cudaGetLastError, which also clears a launch error.
  (void)cudaLaunchKernelEx(&config, kernel, static_cast<const float*>(p.partial), p.num_splits, p.hq, p.q_len, dim, p.out, p.o_b,
                           p.o_n, p.o_h);
  TA_CUDA_CHECK_LAUNCH("cache_merge_kernel");
}

}  // namespace

DeviceCache::DeviceCache(const ref::CacheConfig& config)
    : cfg_(config),
      book_(config.layers, config.max_seqs, config.num_pages),
      captured_(size_t(config.layers) * config.max_seqs, 0),
      uploads_(std::make_unique<UploadRing>()) {
  const int64_t max_pages = PageBook::table_index(cfg_.max_seq_len / TA_BLOCK_TOKENS);
  table_width_ = int(std::max<int64_t>(1, std::min<int64_t>(max_pages, cfg_.num_pages)));
  for (int l = 0; l < cfg_.layers; ++l)
    layouts_.push_back(make_page_layout(cfg_.bits.data() + size_t(l) * cfg_.kv_heads, cfg_.kv_heads, cfg_.head_dim));
  try {
    for (int l = 0; l < cfg_.layers; ++l) {
      pools_.push_back(device_alloc<uint8_t>(int64_t(cfg_.num_pages) * layouts_[size_t(l)].page_bytes, "pages"));
      buffers_.push_back(device_alloc<uint8_t>(int64_t(cfg_.max_seqs) * cfg_.kv_heads * buffer_head_bytes(cfg_.head_dim), "buffers"));
      first_blocks_.push_back(
          device_alloc<uint8_t>(int64_t(cfg_.max_seqs) * cfg_.kv_heads * first_block_bytes(cfg_.head_dim), "first blocks"));
      means_.push_back(device_alloc<float>(int64_t(cfg_.max_seqs) * cfg_.kv_heads * cfg_.head_dim, "K means"));
    }
    d_layouts_ = device_alloc<PageLayout>(cfg_.layers, "page layouts");
    TA_CUDA_CHECK(cudaMemcpy(d_layouts_, layouts_.data(), layouts_.size() * sizeof(PageLayout), cudaMemcpyHostToDevice));
    d_tables_ = device_alloc<int32_t>(int64_t(cfg_.max_seqs) * table_width_, "page tables");
    d_lengths_ = device_alloc<int64_t>(int64_t(cfg_.layers) * cfg_.max_seqs, "lengths");
    d_reserved_end_ = device_alloc<int64_t>(cfg_.max_seqs, "reservations");
    d_append_runs_ = device_alloc<WriteRun>(cfg_.max_seqs, "captured appends' runs");
    d_overflow_ = device_alloc<int>(1, "the reservation overflow flag");
    TA_CUDA_CHECK(cudaGetDevice(&device_));  // the cache's device
    TA_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_));
    int major = 0;
    TA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_));
    // Programmatic dependent launch. Every kernel image is SASS for its architecture (CMakeLists.txt embeds
    // no PTX), so on sm_90 and later the merge kernel always has its griddepcontrol.wait.
    dependent_launch_ = major >= 9;
  } catch (...) {
    free_memory();  // the members themselves are destroyed as the exception leaves the constructor
    throw;
  }
}

DeviceCache::~DeviceCache() { free_memory(); }

void DeviceCache::free_memory() {
  for (auto* p : pools_) cudaFree(p);
  for (auto* p : buffers_) cudaFree(p);
  for (auto* p : first_blocks_) cudaFree(p);
  for (auto* p : means_) cudaFree(p);
  cudaFree(d_layouts_), cudaFree(d_tables_), cudaFree(d_lengths_), cudaFree(workspace_);
  cudaFree(d_reserved_end_), cudaFree(d_append_runs_), cudaFree(d_overflow_);
  uploads_.reset();
  pools_.clear(), buffers_.clear(), first_blocks_.clear(), means_.clear();
  d_layouts_ = nullptr, d_tables_ = nullptr, d_lengths_ = nullptr, workspace_ = nullptr;
  d_reserved_end_ = nullptr, d_append_runs_ = nullptr, d_overflow_ = nullptr;
}

void DeviceCache::expect_current_device() const {
  int current = -1;
  TA_CUDA_CHECK(cudaGetDevice(&current));
  require(current == device_, TA_ERROR_INVALID_ARGUMENT, "cache: its memory is on CUDA device ", device_,
          " but the current device is ", current, " (make the cache's device current)");
}

void DeviceCache::expect_synced(const char* what) const {
  require(!device_ahead_, TA_ERROR_INVALID_ARGUMENT, what,
          ": appends captured in a CUDA graph may have run since the last ta_cache_sync, so the host's lengths may be "
          "behind the device's; call ta_cache_sync first");
}

void DeviceCache::reserve(const int32_t* seqs, int num_seqs, int64_t tokens, void* stream_) {
  expect_synced("ta_cache_reserve");
  const auto stream = static_cast<cudaStream_t>(stream_);
  require(!capturing(stream), TA_ERROR_INVALID_ARGUMENT,
          "ta_cache_reserve cannot be captured in a CUDA graph (it takes pages on the host and copies their table to "
          "the GPU): reserve before capturing");
  int lo = cfg_.max_seqs, hi = -1;
  for (int i = 0; i < num_seqs; ++i) {
    book_.reserve(seqs[i], tokens);
    lo = std::min(lo, seqs[i]), hi = std::max(hi, seqs[i]);
  }
  if (hi < lo) return;
  // Rows lo..hi of the page table, as the host has them, in one copy: the other sequences' rows get the
  // entries they hold or are about to be written (the same page ids), so the copy changes nothing of theirs.
  std::vector<int32_t> rows(size_t(hi - lo + 1) * table_width_, 0);
  for (int s = lo; s <= hi; ++s) {
    const std::vector<int>& table = book_.table(s);
    std::copy(table.begin(), table.begin() + std::min<size_t>(table.size(), size_t(table_width_)),
              rows.begin() + size_t(s - lo) * table_width_);
  }
  // Pageable copies: queued in stream order, the host vectors free to go once they return.
  TA_CUDA_CHECK(cudaMemcpyAsync(d_tables_ + int64_t(lo) * table_width_, rows.data(), rows.size() * sizeof(int32_t),
                                cudaMemcpyHostToDevice, stream));
  TA_CUDA_CHECK(cudaMemcpyAsync(d_reserved_end_ + lo, book_.reserved_ends().data() + lo, size_t(hi - lo + 1) * sizeof(int64_t),
                                cudaMemcpyHostToDevice, stream));
}

void DeviceCache::sync() {
  TA_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int64_t> lengths(size_t(cfg_.layers) * cfg_.max_seqs);
  TA_CUDA_CHECK(cudaMemcpy(lengths.data(), d_lengths_, lengths.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  int overflow = 0;
  TA_CUDA_CHECK(cudaMemcpy(&overflow, d_overflow_, sizeof(int), cudaMemcpyDeviceToHost));
  TA_CUDA_CHECK(cudaMemset(d_overflow_, 0, sizeof(int)));
  // Only captured appends move a device length past the host's (host-planned writes set both alike), and
  // only where this slot's sequence captured one: elsewhere the device may still hold a length of the
  // slot's previous sequence (writes set lengths; nothing resets them).
  for (size_t i = 0; i < captured_.size(); ++i)
    if (captured_[i]) {
      const int l = int(i / size_t(cfg_.max_seqs)), s = int(i % size_t(cfg_.max_seqs));
      book_.set_length(l, s, std::max(book_.length(l, s), lengths[i]));
    }
  device_ahead_ = false;
  require(!overflow, TA_ERROR_OUT_OF_CAPACITY,
          "a captured append found its sequence at the end of its reservation, so that replay's token was not written "
          "(reserve room for every replay before replaying); the cache holds the tokens before it");
}

void DeviceCache::release_sequence(int seq) {
  bool captured = false;
  for (int l = 0; l < cfg_.layers; ++l) captured = captured || captured_[size_t(l) * cfg_.max_seqs + seq];
  require(!(captured && device_ahead_), TA_ERROR_INVALID_ARGUMENT, "seq: sequence ", seq,
          " has appends captured in a CUDA graph that may have run since the last ta_cache_sync; call it before "
          "releasing the sequence");
  if (book_.reserved_end(seq) > 0) {  // first, so that a failed copy leaves the sequence as it was
    const int64_t none = 0;           // a graph replaying appends to the slot then writes nothing
    TA_CUDA_CHECK(cudaMemcpy(d_reserved_end_ + seq, &none, sizeof(none), cudaMemcpyHostToDevice));
  }
  for (int l = 0; l < cfg_.layers; ++l) captured_[size_t(l) * cfg_.max_seqs + seq] = 0;
  book_.release_sequence(seq);
}

template <typename T>
WriteParams<T> DeviceCache::write_params(int layer, const ta_tensor& k, const ta_tensor& v) const {
  WriteParams<T> p{};
  p.k = static_cast<const T*>(k.data), p.v = static_cast<const T*>(v.data);
  p.k_n = k.strides[0], p.k_h = k.strides[1], p.v_n = v.strides[0], p.v_h = v.strides[1];
  p.pool = pools_[size_t(layer)], p.buffers = buffers_[size_t(layer)], p.first_blocks = first_blocks_[size_t(layer)];
  p.means = means_[size_t(layer)], p.layout = d_layouts_ + layer;
  p.tables = d_tables_, p.table_width = table_width_, p.lengths = d_lengths_ + int64_t(layer) * cfg_.max_seqs;
  p.kv_heads = cfg_.kv_heads, p.dim = cfg_.head_dim;
  return p;
}

void DeviceCache::append_captured(int layer, const int32_t* seqs, int num_seqs, const ta_tensor& k, const ta_tensor& v,
                                  const std::vector<int32_t>& cu, void* stream_) {
  const auto stream = static_cast<cudaStream_t>(stream_);
  for (int i = 0; i < num_seqs; ++i)
    require(cu[size_t(i) + 1] - cu[size_t(i)] == 1, TA_ERROR_INVALID_ARGUMENT, "seqs[", i, "]: a cache write of ",
            cu[size_t(i) + 1] - cu[size_t(i)], " tokens to a sequence cannot be captured in a CUDA graph (its pages are "
            "taken on the host); appends of one token per sequence can, after ta_cache_reserve");
  for (int i = 0; i < num_seqs; ++i) {
    const int64_t len = book_.length(layer, seqs[i]);
    require(len > 0 && book_.reserved_end(seqs[i]) > len, TA_ERROR_INVALID_ARGUMENT, "seqs[", i, "]: sequence ", seqs[i],
            len > 0 ? " has no room reserved" : " is empty",
            " for an append captured in a CUDA graph (such an append needs a written sequence with room reserved by "
            "ta_cache_reserve: its pages are taken before capture)");
  }
  AppendPlanParams plan{};
  plan.lengths = d_lengths_ + int64_t(layer) * cfg_.max_seqs, plan.reserved_end = d_reserved_end_, plan.tables = d_tables_;
  plan.table_width = table_width_, plan.runs = static_cast<WriteRun*>(d_append_runs_), plan.overflow = d_overflow_;
  device_ahead_ = true;
  for (int i = 0; i < num_seqs; ++i) captured_[size_t(layer) * cfg_.max_seqs + seqs[i]] = 1;
  if (k.dtype == TA_DTYPE_F16)
    launch_planned_append(write_params<__half>(layer, k, v), seqs, num_seqs, plan, stream);
  else
    launch_planned_append(write_params<__nv_bfloat16>(layer, k, v), seqs, num_seqs, plan, stream);
}

void DeviceCache::write(int layer, const int32_t* seqs, int num_seqs, const ta_tensor& k, const ta_tensor& v,
                        const std::vector<int32_t>& cu, void* stream_) {
  const auto stream = static_cast<cudaStream_t>(stream_);
  if (capturing(stream)) return append_captured(layer, seqs, num_seqs, k, v, cu, stream_);
  expect_synced("a cache write or append");
  std::vector<WriteRun> runs;
  runs.reserve(size_t(num_seqs));  // an append's: one run per sequence
  std::vector<MeanRun> means;
  for (int i = 0; i < num_seqs; ++i) {
    const int seq = seqs[i];
    const int64_t len0 = book_.length(layer, seq), tokens = cu[size_t(i) + 1] - cu[size_t(i)];
    if (len0 == 0) means.push_back({seq, cu[size_t(i)], int32_t(tokens)});
    int64_t pos = len0;
    int32_t src = cu[size_t(i)];
    for (int64_t left = tokens; left > 0;) {
      const int count = int(std::min<int64_t>(left, TA_BLOCK_TOKENS - pos % TA_BLOCK_TOKENS));
      const int64_t block = pos / TA_BLOCK_TOKENS;
      const bool to_page = block > 0 && (pos % TA_BLOCK_TOKENS) + count == TA_BLOCK_TOKENS;
      const int page = to_page ? book_.page_for_block(seq, block) : -1;
      runs.push_back({seq, src, count, page, pos, -1});
      pos += count, src += count, left -= count;
    }
    if (tokens > 0) {
      runs.back().new_length = len0 + tokens;
      book_.add_tokens(layer, seq, tokens);
    }
  }
  if (k.dtype == TA_DTYPE_F16)
    launch_write(write_params<__half>(layer, k, v), runs, means, cfg_.smooth_k, *uploads_, stream);
  else
    launch_write(write_params<__nv_bfloat16>(layer, k, v), runs, means, cfg_.smooth_k, *uploads_, stream);
}

DecodeOccupancy DeviceCache::occupancy(ta_dtype dtype, bool sas, int rows, LayerWidths widths) {
  const int width_class = widths.max_bits == TA_BITS_8 ? 2 : widths.all_4bit ? 3 : widths.max_bits == TA_BITS_4;
  const int key = ((int(dtype == TA_DTYPE_F16) * 2 + int(sas)) * 2 + int(rows > 4)) * 4 + width_class;
  DecodeOccupancy& o = occupancy_[size_t(key)];
  if (o.resident == 0)
    o = dtype == TA_DTYPE_F16 ? decode_occupancy<__half>(cfg_.head_dim, sas, rows, widths)
                              : decode_occupancy<__nv_bfloat16>(cfg_.head_dim, sas, rows, widths);
  return o;
}

void DeviceCache::decode(int layer, const int32_t* seqs, int num_seqs, const ta_tensor& q, const ta_decode_options& options,
                         ta_tensor& out, void* stream_) {
  const auto stream = static_cast<cudaStream_t>(stream_);
  const int D = cfg_.head_dim, hkv = cfg_.kv_heads, call_q = int(q.shape[1]), hq = int(q.shape[2]), group = hq / hkv;
  // Launches take up to TA_DECODE_Q_TOKENS query tokens per head (the CTA's 8 rows); a longer q_len
  // runs in chunks, each masked as the tokens it holds (q_behind: the call's tokens after the chunk).
  const int max_q = std::min(call_q, TA_DECODE_Q_TOKENS);
  int64_t max_tiles = 1;
  for (int i = 0; i < num_seqs; ++i)
    max_tiles = std::max<int64_t>(max_tiles, TA_BLOCK_COUNT(std::max(book_.length(layer, seqs[i]), book_.reserved_end(seqs[i]))));
  auto row_groups = [&](int q_len) {  // (heads per CTA, CTAs per KV head)
    const int heads_per_cta = std::max(1, std::min(group, DecodeTraits<64>::kRows / q_len));
    return std::pair{heads_per_cta, (group + heads_per_cta - 1) / heads_per_cta};
  };
  LayerWidths widths;
  for (int h = 0; h < hkv; ++h) {
    const int bits = layouts_[size_t(layer)].bits[h];
    widths.max_bits = std::max(widths.max_bits, bits), widths.all_4bit = widths.all_4bit && bits == TA_BITS_4;
  }
  // Every sequence's splits are split_tiles long (its last ones short or empty), so that a CTA's tiles do
  // not depend on its sequence's length: its first page table read goes out beside the length's.
  int split_tiles = options.split_tiles;
  if (split_tiles <= 0) {
    const auto [heads_per_cta, chunks] = row_groups(max_q);
    const int64_t ctas = int64_t(std::min(num_seqs, kDecodeMaxSeqs)) * hkv * chunks;
    const DecodeOccupancy o = occupancy(q.dtype, options.use_sas != 0, heads_per_cta * max_q, widths);
    const int64_t automatic = automatic_decode_splits(ctas, num_sms_, o.resident, o.fill, max_tiles);
    split_tiles = int((max_tiles + automatic - 1) / automatic);
  }
  const int splits = int((max_tiles + split_tiles - 1) / split_tiles);
  // With several splits, the splits' parts (docs/FORMATS.md 1.7) for cache_merge_kernel.
  const int64_t part_floats = splits > 1 ? int64_t(num_seqs) * hq * max_q * splits * (D + 2) : 0;
  if (part_floats > workspace_floats_) {
    require(!capturing(stream), TA_ERROR_INVALID_ARGUMENT, "decode: its workspace must grow to ",
            part_floats * 4, " bytes, which cannot happen inside CUDA graph capture; run one call of this shape before capturing");
    TA_CUDA_CHECK(cudaStreamSynchronize(stream));
    cudaFree(workspace_);
    workspace_ = nullptr, workspace_floats_ = 0;
    workspace_ = device_alloc<float>(part_floats, "the decode workspace");
    workspace_floats_ = part_floats;
  }
  const float scale = ref::resolve_softmax_scale(options.softmax_scale, D);
  const size_t elem = q.dtype == TA_DTYPE_F16 ? sizeof(__half) : sizeof(__nv_bfloat16);
  for (int q0 = 0; q0 < call_q; q0 += TA_DECODE_Q_TOKENS) {
    const int q_len = std::min(TA_DECODE_Q_TOKENS, call_q - q0);
    const auto [heads_per_cta, chunks] = row_groups(q_len);
    for (int s0 = 0; s0 < num_seqs; s0 += kDecodeMaxSeqs) {
      const int n = std::min(kDecodeMaxSeqs, num_seqs - s0);
      DecodeParams p{};
      p.pool = pools_[size_t(layer)], p.buffers = buffers_[size_t(layer)], p.first_blocks = first_blocks_[size_t(layer)];
      p.layout = layouts_[size_t(layer)];
      p.tables = d_tables_, p.table_width = table_width_, p.lengths = d_lengths_ + int64_t(layer) * cfg_.max_seqs;
      p.q = static_cast<const uint8_t*>(q.data) + (int64_t(s0) * q.strides[0] + int64_t(q0) * q.strides[1]) * int64_t(elem);
      p.q_b = q.strides[0], p.q_n = q.strides[1], p.q_h = q.strides[2];
      p.out = static_cast<uint8_t*>(out.data) + (int64_t(s0) * out.strides[0] + int64_t(q0) * out.strides[1]) * int64_t(elem);
      p.o_b = out.strides[0], p.o_n = out.strides[1], p.o_h = out.strides[2];
      p.partial = splits > 1 ? workspace_ + int64_t(s0) * hq * q_len * splits * (D + 2) : nullptr;
      p.hq = hq, p.hkv = hkv, p.q_len = q_len, p.heads_per_cta = heads_per_cta, p.num_splits = splits, p.max_bits = widths.max_bits;
      p.split_tiles = split_tiles;
      p.q_behind = call_q - q0 - q_len;
      p.scale_log2 = ref::scale_log2(scale);
      for (int i = 0; i < n; ++i) p.slots[i] = seqs[s0 + i];
      const unsigned rows = unsigned(n * hq * q_len);
      if (q.dtype == TA_DTYPE_F16) {
        launch_decode<__half>(D, options.use_sas != 0, widths, p, n, chunks, stream);
        if (splits > 1) launch_merge<__half>(p, D, rows, dependent_launch_, stream);
      } else {
        launch_decode<__nv_bfloat16>(D, options.use_sas != 0, widths, p, n, chunks, stream);
        if (splits > 1) launch_merge<__nv_bfloat16>(p, D, rows, dependent_launch_, stream);
      }
    }
  }
}

void DeviceCache::read_tokens(int layer, int seq, float* k, float* v) const {
  TA_CUDA_CHECK(cudaDeviceSynchronize());
  const int64_t length = book_.length(layer, seq);
  std::vector<std::vector<uint8_t>> pages, buffers, first_blocks;
  for (int64_t b = 1; b < length / TA_BLOCK_TOKENS; ++b)
    pages.push_back(download_page(layer, book_.table(seq)[size_t(PageBook::table_index(b))]));
  for (int h = 0; h < cfg_.kv_heads; ++h) {
    buffers.push_back(download_buffer(layer, seq, h));
    first_blocks.push_back(download_first_block(layer, seq, h));
  }
  const std::vector<float> mean = download_k_mean(layer, seq);
  ref::SequenceBytes bytes;
  bytes.layout = &layouts_[size_t(layer)];
  bytes.length = length;
  for (const auto& p : pages) bytes.pages.push_back(p.data());
  for (const auto& b : buffers) bytes.buffers.push_back(b.data());
  for (const auto& b : first_blocks) bytes.first_blocks.push_back(b.data());
  bytes.k_mean = mean.data();
  ref::read_tokens(bytes, k, v);
}

std::vector<uint8_t> DeviceCache::download_page(int layer, int page_id) const {
  std::vector<uint8_t> host(size_t(layouts_[size_t(layer)].page_bytes));
  TA_CUDA_CHECK(cudaMemcpy(host.data(), pools_[size_t(layer)] + int64_t(page_id) * layouts_[size_t(layer)].page_bytes, host.size(),
                           cudaMemcpyDeviceToHost));
  return host;
}
namespace {
std::vector<uint8_t> download_head_region(const uint8_t* base, int kv_heads, int64_t bytes, int seq, int head) {
  std::vector<uint8_t> host(static_cast<size_t>(bytes));
  TA_CUDA_CHECK(cudaMemcpy(host.data(), base + (int64_t(seq) * kv_heads + head) * int64_t(host.size()), host.size(),
                           cudaMemcpyDeviceToHost));
  return host;
}
}  // namespace
std::vector<uint8_t> DeviceCache::download_buffer(int layer, int seq, int head) const {
  return download_head_region(buffers_[size_t(layer)], cfg_.kv_heads, buffer_head_bytes(cfg_.head_dim), seq, head);
}
std::vector<uint8_t> DeviceCache::download_first_block(int layer, int seq, int head) const {
  return download_head_region(first_blocks_[size_t(layer)], cfg_.kv_heads, first_block_bytes(cfg_.head_dim), seq, head);
}
std::vector<float> DeviceCache::download_k_mean(int layer, int seq) const {
  std::vector<float> host(size_t(cfg_.kv_heads) * cfg_.head_dim);
  TA_CUDA_CHECK(cudaMemcpy(host.data(), means_[size_t(layer)] + int64_t(seq) * int64_t(host.size()), host.size() * 4,
                           cudaMemcpyDeviceToHost));
  return host;
}
std::vector<int32_t> DeviceCache::download_table(int seq) const {
  std::vector<int32_t> host(static_cast<size_t>(table_width_));
  TA_CUDA_CHECK(cudaMemcpy(host.data(), d_tables_ + int64_t(seq) * table_width_, host.size() * 4, cudaMemcpyDeviceToHost));
  return host;
}
int64_t DeviceCache::download_length(int layer, int seq) const {
  int64_t n = 0;
  TA_CUDA_CHECK(cudaMemcpy(&n, d_lengths_ + int64_t(layer) * cfg_.max_seqs + seq, 8, cudaMemcpyDeviceToHost));
  return n;
}

}  // namespace turboattn::cuda
