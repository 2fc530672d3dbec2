// Cache writes on the GPU: one CTA per (run of tokens inside one 64-token block, KV head). Tokens are
// quantized per token into the INT8 buffer (3.1); a run that completes its block is flushed straight
// into its page (3.2-3.4) with the tokens already buffered (the sequence's first block into its own
// region, at 8 bits). Bulk writes and appends run the same body (write_run), so they produce the same
// bytes, and both match the CPU cache (src/reference/kv_cache.cpp) bit for bit.
#pragma once

#include <stdint.h>

#include "cuda/cache/codes.cuh"
#include "cuda/cache/device_cache.hpp"  // kInlineWriteRuns
#include "cuda/common/int8.cuh"
#include "cuda/common/numeric.cuh"
#include "format/cache_layout.h"
#include "turboattn/format.h"

namespace turboattn::cuda {

// A run of a sequence's new tokens inside one block.
struct WriteRun {
  int32_t slot;        // sequence slot
  int32_t src;         // first token's row in k and v
  int32_t count;       // tokens in the run
  int32_t page;        // the block's page when the run completes a block after the first, else -1
  int64_t pos0;        // sequence position of the run's first token
  int64_t new_length;  // the sequence's length after the write (on its last run), else -1
  __host__ __device__ bool completes_block() const { return pos0 % TA_BLOCK_TOKENS + count == TA_BLOCK_TOKENS; }
};

template <typename T>
struct WriteParams {
  const T* k;
  const T* v;
  int64_t k_n, k_h, v_n, v_h;  // element strides of k, v [T, Hkv, D]
  const WriteRun* runs;  // in device memory (cache_write_kernel; cache_write_inline_kernel takes them inline)
  uint8_t* pool;       // the layer's pages
  uint8_t* buffers;    // the layer's INT8 buffers [slot][head]
  uint8_t* first_blocks;  // the layer's first blocks [slot][head]
  float* means;        // the layer's K means [slot][head][D] (cache_mean_kernel writes those of new sequences)
  const PageLayout* layout;
  int32_t* tables;     // [slot][table_width]
  int table_width;
  int64_t* lengths;    // the layer's lengths [slot]
  int kv_heads, dim;
};

constexpr int kWriteThreads = 128;

// A launch of up to kInlineWriteRuns runs (device_cache.hpp) takes them in its parameters: sent through
// pinned memory they were a copy-engine transfer on the stream before every append, which took longer
// than the append's kernel (docs/BENCHMARKS.md).
struct InlineWriteRuns {
  WriteRun run[kInlineWriteRuns];
};
static_assert(sizeof(WriteParams<uint16_t>) + sizeof(InlineWriteRuns) <= 32764,
              "kernel parameters are limited to 32764 bytes (CUDA 12.1 and later)");

// Dynamic shared memory of the write kernel: INT8 K and V of the block, their token scales, and the
// stage-2 codes of one of them in storage order.
__host__ __device__ constexpr int write_smem_bytes(int dim) { return 3 * TA_BLOCK_TOKENS * dim + 2 * 4 * TA_BLOCK_TOKENS; }

// A CTA's run (blockIdx.x) of head blockIdx.y. One instance per head dim: a flush's loops index its
// block by token and channel, which a runtime head dim made integer divisions (a quarter of the kernel's
// instructions). Shared memory is addressed from `smem` itself, so that the compiler keeps every access a
// shared-memory one (through pointers picked at run time it had made the stage-2 loops' loads generic).
template <typename T, int kHeadDim>
__device__ __forceinline__ void write_run(const WriteParams<T>& p, const WriteRun run) {
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int kBlock = TA_BLOCK_TOKENS, D = kHeadDim, kLaneValues = D / 32;
  static_assert(D % 32 == 0, "a lane takes every 32nd channel");
  const int h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto s_q = [&](int which) { return reinterpret_cast<int8_t*>(smem) + which * kBlock * D; };  // K, V
  uint8_t* s_codes = smem + 2 * kBlock * D;
  const auto s_scale = [&](int which) { return reinterpret_cast<float*>(smem + 3 * kBlock * D) + which * kBlock; };

  uint8_t* buf = p.buffers + (int64_t(run.slot) * p.kv_heads + h) * buffer_head_bytes(D);
  int8_t* buf_q[2] = {reinterpret_cast<int8_t*>(buf + buffer_k_offset(D)), reinterpret_cast<int8_t*>(buf + buffer_v_offset(D))};
  float* buf_scale[2] = {reinterpret_cast<float*>(buf + buffer_k_scale_offset(D)),
                         reinterpret_cast<float*>(buf + buffer_v_scale_offset(D))};
  const int slot0 = int(run.pos0 % kBlock);
  const bool complete = run.completes_block();
  const float* mean = p.means + (int64_t(run.slot) * p.kv_heads + h) * D;

  // Tokens already in the buffer join the block when it completes.
  if (complete) {
    for (int i = threadIdx.x; i < slot0 * D; i += kWriteThreads) s_q(0)[i] = buf_q[0][i], s_q(1)[i] = buf_q[1][i];
    for (int i = threadIdx.x; i < slot0; i += kWriteThreads) s_scale(0)[i] = buf_scale[0][i], s_scale(1)[i] = buf_scale[1][i];
  }

  // Per-token INT8 (ref::quantize_block_int8 of one row; K minus the sequence's mean), a warp per token:
  // lane values c = lane + 32 m, read once into registers for the maximum and the codes.
  float lane_mean[kLaneValues];
#pragma unroll
  for (int m = 0; m < kLaneValues; ++m) lane_mean[m] = mean[lane + 32 * m];
  for (int i = warp; i < run.count; i += kWriteThreads / 32) {
    const int t = slot0 + i;
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      const T* src = which ? p.v + int64_t(run.src + i) * p.v_n + int64_t(h) * p.v_h
                           : p.k + int64_t(run.src + i) * p.k_n + int64_t(h) * p.k_h;
      float x[kLaneValues];
      float amax = 0.0f;
      bool finite = true;
#pragma unroll
      for (int m = 0; m < kLaneValues; ++m) {
        x[m] = which ? to_float(src[lane + 32 * m]) : __fsub_rn(to_float(src[lane + 32 * m]), lane_mean[m]);
        finite = finite && isfinite(x[m]);
        amax = fmaxf(amax, fabsf(x[m]));
      }
      for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      finite = __all_sync(0xffffffffu, finite);
      const Int8Scale s = int8_block_scale(amax, finite);
      int8_t* dst = complete ? s_q(which) + t * D : buf_q[which] + t * D;
#pragma unroll
      for (int m = 0; m < kLaneValues; ++m) dst[lane + 32 * m] = int8_code(x[m], s.inv);
      if (lane == 0) (complete ? s_scale(which) : buf_scale[which])[t] = s.scale;
    }
  }
  if (!complete) {
    if (h == 0 && threadIdx.x == 0 && run.new_length >= 0) p.lengths[run.slot] = run.new_length;
    return;
  }
  __syncthreads();

  // Flush: block scale, requantization, stage 2, packing; K token-major, V channel-major. The
  // sequence's first block goes to its own region at 8 bits, every later one to its page.
  const PageLayout& lay = *p.layout;
  const bool to_page = run.page >= 0;
  const int bits = to_page ? lay.bits[h] : TA_BITS_8;
  uint8_t* page = p.pool + int64_t(run.page) * lay.page_bytes;
  uint8_t* first = p.first_blocks + (int64_t(run.slot) * p.kv_heads + h) * first_block_bytes(D);
  // The block scales of K (warp 0) and V (warp 1), ref::requantize_tokens_to_block's: the last NaN in
  // token order if any, else the maximum; then each token's ratio to its block scale (0 where the block's
  // codes must be 0) in place of its scale.
  static_assert(kBlock == 64 && kWriteThreads >= 64, "a warp takes a block's 64 token scales, two a lane");
  if (warp < 2) {
    float* ts = s_scale(warp);
    const float a = ts[lane], b = ts[lane + 32];
    int last_nan = isnan(b) ? lane + 32 : isnan(a) ? lane : -1;
    float amax = fmaxf(fmaxf(0.0f, isnan(a) ? 0.0f : a), isnan(b) ? 0.0f : b);
    for (int o = 16; o > 0; o >>= 1) {
      last_nan = max(last_nan, __shfl_xor_sync(0xffffffffu, last_nan, o));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    }
    const float nan_scale = __shfl_sync(0xffffffffu, last_nan >= 32 ? b : a, max(last_nan, 0) % 32);
    const float block = last_nan >= 0 ? nan_scale : amax;
    if (lane == 0)
      *reinterpret_cast<float*>(to_page ? page + (warp ? page_v_scale_offset(p.kv_heads, h) : page_k_scale_offset(h))
                                        : first + first_block_scale_offset(D) + 4 * warp) = block;
    const bool zero_codes = !(block > 0.0f);
    ts[lane] = zero_codes ? 0.0f : __fdiv_rn(a, block);
    ts[lane + 32] = zero_codes ? 0.0f : __fdiv_rn(b, block);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * kBlock * D; i += kWriteThreads) {  // K then V, requantized to the block scale
    int8_t* q = reinterpret_cast<int8_t*>(smem) + i;
    *q = round_int8(__fmul_rn(float(*q), s_scale(0)[i / D]));  // V's ratios follow K's
  }
  __syncthreads();
#pragma unroll 1
  for (int which = 0; which < 2; ++which) {
    const int8_t* q = s_q(which);
    uint8_t* region = to_page ? page + (which ? lay.v_offset[h] : lay.k_offset[h])
                              : first + (which ? first_block_v_offset(D) : first_block_k_offset(D));
    const int code_bytes = int(block_code_bytes(bits, D));
    // s_codes[i] in storage order: K row t is token t's channels, V row c is channel c's tokens.
    if (bits == 8) {
      for (int i = threadIdx.x; i < kBlock * D; i += kWriteThreads) {
        const int t = i / D, c = i % D;
        s_codes[which ? c * kBlock + t : i] = uint8_t(q[i]);
      }
    } else {
      // K: a grid per channel over each token group (group g: channel g % D of token group g / D); V: a
      // grid per token over its channels. Groups of fewer than the CTA's threads (64 V tokens, 64 K
      // channels at D = 64 and 4 bits) take two lanes each.
      const int groups = which ? kBlock : k_groups(bits) * D, count = which ? D : k_group_tokens(bits);
      const int lanes = groups * 2 <= kWriteThreads ? 2 : 1;
      for (int g = threadIdx.x / lanes; g < groups; g += kWriteThreads / lanes) {
        const int first = which ? g * D : g / D * count * D + g % D;  // the group's first value in q and in s_codes
        uint8_t* meta = region + code_bytes + g;
        stage2_encode(q + first, count, which ? 1 : D, bits, lanes, threadIdx.x % lanes, s_codes + (which ? g : first),
                      which ? kBlock : D, meta, reinterpret_cast<int8_t*>(meta + groups));
      }
    }
    __syncthreads();
    const int per_byte = 8 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int i = threadIdx.x; i < code_bytes; i += kWriteThreads) {  // ref::pack_codes, LSB first
      uint32_t byte = 0;
      for (int e = 0; e < per_byte; ++e) byte |= (s_codes[i * per_byte + e] & mask) << (e * bits);
      region[i] = uint8_t(byte);
    }
    __syncthreads();
  }
  if (h == 0 && threadIdx.x == 0) {
    if (to_page) p.tables[int64_t(run.slot) * p.table_width + page_table_index(run.pos0 / kBlock)] = run.page;
    if (run.new_length >= 0) p.lengths[run.slot] = run.new_length;
  }
}

// The runs from device memory (p.runs: uploaded, or planned on the GPU) ...
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kWriteThreads) cache_write_kernel(const WriteParams<T> p) {
  write_run<T, kHeadDim>(p, p.runs[blockIdx.x]);
}

// ... or from the launch's parameters. Two kernels rather than one choosing at run time: the choice
// cost the kernel registers and a spill, and bulk writes 6% of their time (docs/BENCHMARKS.md).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kWriteThreads) cache_write_inline_kernel(const WriteParams<T> p,
                                                                           const __grid_constant__ InlineWriteRuns inline_runs) {
  write_run<T, kHeadDim>(p, inline_runs.run[blockIdx.x]);
}

// Captured appends (one token per sequence) plan their runs on the device, from the lengths a replay
// finds there: a run per sequence, flushing into the page reserved for its block (PageBook::reserve).
// A sequence at its reservation's end gets an empty run (nothing written) and sets *overflow, which the
// host reads at its next sync. Slots travel in the parameters, as the decode's do, so a captured launch
// reads no host memory at replay.
constexpr int kAppendPlanMaxSeqs = 2048;
struct AppendPlanParams {
  const int64_t* lengths;       // the layer's [slot]
  const int64_t* reserved_end;  // [slot]
  const int32_t* tables;        // [slot][table_width]
  int table_width;
  WriteRun* runs;               // the plan's runs, first of this launch's sequences
  int* overflow;
  int first_src;                // row in k and v of this launch's first sequence
  int count;
  int32_t slots[kAppendPlanMaxSeqs];
};
static_assert(sizeof(AppendPlanParams) <= 32764, "kernel parameters are limited to 32764 bytes (CUDA 12.1 and later)");

__global__ void cache_append_plan_kernel(const AppendPlanParams p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.count) return;
  const int slot = p.slots[i];
  const int64_t pos = p.lengths[slot];
  WriteRun run{slot, p.first_src + i, 1, -1, pos, pos + 1};
  if (pos >= p.reserved_end[slot]) {
    run.count = 0, run.new_length = -1;
    atomicOr(p.overflow, 1);
  } else if (run.completes_block() && pos >= TA_BLOCK_TOKENS) {
    run.page = p.tables[int64_t(slot) * p.table_width + page_table_index(pos / TA_BLOCK_TOKENS)];
  }
  p.runs[i] = run;
}

// K means of sequences written for the first time (ref::head_mean: a float64 sum in token order, so
// bit-exact), or zeros without smoothing. One CTA per (sequence, head).
struct MeanRun {
  int32_t slot, src, count;
};
template <typename T>
__global__ void cache_mean_kernel(const T* k, int64_t k_n, int64_t k_h, const MeanRun* runs, float* means, int kv_heads,
                                  int dim, bool smooth) {
  const MeanRun run = runs[blockIdx.x];
  const int h = blockIdx.y;
  float* mean = means + (int64_t(run.slot) * kv_heads + h) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    double sum = 0.0;
    if (smooth)
      for (int t = 0; t < run.count; ++t) sum += double(to_float(k[int64_t(run.src + t) * k_n + int64_t(h) * k_h + c]));
    const float m = smooth && run.count ? __double2float_rn(sum / double(run.count)) : 0.0f;
    mean[c] = isnan(m) ? stored_nan() : m;  // one NaN on every device
  }
}

}  // namespace turboattn::cuda
