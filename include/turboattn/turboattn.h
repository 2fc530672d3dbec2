/* turboattn C API: quantized attention (FlashQ + SAS) and a compressed paged KV cache.
 * Usable from C and C++. Every function returns a ta_status; on failure ta_last_error() names the
 * argument at fault and what was expected. docs/FORMATS.md defines every number computed here. */
#ifndef TURBOATTN_H
#define TURBOATTN_H

#include <stddef.h>
#include <stdint.h>

#include "turboattn/format.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TA_API __declspec(dllexport)
#else
#define TA_API __attribute__((visibility("default")))
#endif

typedef enum ta_status {
  TA_SUCCESS = 0,
  TA_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, wrong dtype, rank, shape, stride or length */
  TA_ERROR_UNSUPPORTED = 2,      /* valid, but not supported here: head dim, device, build */
  TA_ERROR_OUT_OF_CAPACITY = 3,  /* the cache has no free page or slot, or a sequence is too long */
  TA_ERROR_OUT_OF_MEMORY = 4,
  TA_ERROR_CUDA = 5, /* a CUDA call failed */
  TA_ERROR_INTERNAL = 6,
  TA_STATUS_MAX_ENUM = 0x7fffffff /* makes every int32 a valid value: callers may pass any code */
} ta_status;

typedef enum ta_dtype {
  TA_DTYPE_F16 = 1,
  TA_DTYPE_BF16 = 2,
  TA_DTYPE_F32 = 3,
  TA_DTYPE_I8 = 4,
  TA_DTYPE_U8 = 5,
  TA_DTYPE_I32 = 6,
  TA_DTYPE_MAX_ENUM = 0x7fffffff
} ta_dtype;

typedef enum ta_device { TA_DEVICE_CPU = 0, TA_DEVICE_CUDA = 1, TA_DEVICE_MAX_ENUM = 0x7fffffff } ta_device;

#define TA_MAX_DIMS 4

/* A strided tensor in memory the caller owns. Strides are in elements. */
typedef struct ta_tensor {
  void* data;
  ta_dtype dtype;
  ta_device device;
  int32_t ndim;
  int64_t shape[TA_MAX_DIMS];
  int64_t strides[TA_MAX_DIMS];
} ta_tensor;

/* Builds a contiguous tensor descriptor of rank ndim (1..4). */
TA_API ta_tensor ta_tensor_contiguous(void* data, ta_dtype dtype, ta_device device, int32_t ndim,
                                      const int64_t* shape);

TA_API const char* ta_version(void);
TA_API const char* ta_status_string(ta_status status);
/* Message of the last failed call on this thread ("" if none). */
TA_API const char* ta_last_error(void);
/* 1 if this build has the CUDA kernels and a CUDA device is visible. */
TA_API int ta_cuda_available(void);

/* ---- FlashQ + SAS attention (prefill) ----
 * q: [B, Nq, Hq, D] and k, v: [B, Nk, Hkv, D], f16 or bf16, any strides with the last dim contiguous
 * ([B, H, N, D] memory works through strides). Variable length: q [Tq, Hq, D], k, v [Tk, Hkv, D] with
 * cu_seqlens_q, cu_seqlens_k (i32 [B + 1], ascending from 0; on the CPU or, for CUDA tensors, on the
 * GPU, which the call then reads back, synchronizing its stream). out has q's shape and dtype;
 * lse (optional, f32) is [B, Hq, Nq], or [Hq, Tq] for variable length. Hq must be a multiple of Hkv.
 * D in {64, 96, 128, 256}. */
typedef struct ta_attention_options {
  float softmax_scale; /* 0: 1/sqrt(D) */
  int32_t causal;      /* bottom-right aligned: query i sees keys j <= i + Nk - Nq */
  int32_t use_sas;     /* 1: SAS exponential (default); 0: exact exponential */
  int32_t smooth_k;    /* 1: subtract the per-head mean of K (default); 0: off */
} ta_attention_options;

TA_API ta_attention_options ta_attention_default_options(void);

TA_API ta_status ta_attention(const ta_tensor* q, const ta_tensor* k, const ta_tensor* v,
                              const ta_tensor* cu_seqlens_q, const ta_tensor* cu_seqlens_k,
                              const ta_attention_options* options, ta_tensor* out, ta_tensor* lse,
                              void* cuda_stream);

/* The same attention over K and V already in the FlashQ compute format (ta_quantize_int8's output,
 * e.g. blocks read from a cache): k_codes, v_codes i8 [B, Nk, Hkv, D], k_scales, v_scales f32
 * [B, Hkv, ceil(Nk / 64)] (last dim contiguous); k_mean f32 [B, Hkv, D] or NULL: the mean subtracted
 * from K before quantization, needed only to give lse its true value. options->smooth_k is not used.
 * The scales must be >= 0 or NaN, as ta_quantize_int8 writes them (P's codes take each tile's maximum
 * as its largest score times the scale): checked for CPU tensors, not for CUDA ones (that would need
 * a synchronization), where a negative K scale gives wrong output. Batched only (no cu_seqlens). */
TA_API ta_status ta_attention_int8kv(const ta_tensor* q, const ta_tensor* k_codes, const ta_tensor* k_scales,
                                     const ta_tensor* v_codes, const ta_tensor* v_scales, const ta_tensor* k_mean,
                                     const ta_attention_options* options, ta_tensor* out, ta_tensor* lse,
                                     void* cuda_stream);

/* Exact attention in float64 on the CPU (the accuracy yardstick); same shapes, out and lse f32. */
TA_API ta_status ta_attention_exact(const ta_tensor* q, const ta_tensor* k, const ta_tensor* v,
                                    const ta_tensor* cu_seqlens_q, const ta_tensor* cu_seqlens_k,
                                    float softmax_scale, int32_t causal, ta_tensor* out,
                                    ta_tensor* lse);

/* Blockwise INT8 quantization (FlashQ compute format) of x [B, N, H, D] (f16 or bf16): codes i8 with
 * x's shape, scales f32 [B, H, ceil(N / 64)]. If shift (f32 [B, H, D]) is given it is subtracted
 * first (K smoothing). */
TA_API ta_status ta_quantize_int8(const ta_tensor* x, const ta_tensor* shift, ta_tensor* codes,
                                  ta_tensor* scales, void* cuda_stream);

/* ---- Compressed paged KV cache ----
 * A cache lives on one device (ta_cache_create's device). On TA_DEVICE_CUDA the pages, buffers, page
 * tables and lengths are in GPU memory and every tensor passed to write, append and decode must be a
 * CUDA tensor; the bookkeeping (which pages are free, each sequence's length) is also kept on the host,
 * so capacity is checked before any work is queued. Calls are ordered on the given stream (NULL: the
 * default stream); sequence ids and cu_seqlens are host arrays. ta_decode on CUDA makes no allocation
 * and no host synchronization once its workspace has grown to the call's shape (its first call with a
 * larger batch x q heads x q_len allocates): it can then be captured in a CUDA graph, and it reads the
 * sequence lengths from GPU memory, so a replay sees the tokens appended since. Writes and appends take
 * their pages on the host, so they can be captured only as ta_cache_reserve describes; any other one
 * queued on a capturing stream is refused (TA_ERROR_INVALID_ARGUMENT) before anything changes. They do
 * not wait for the stream (the positions they send to the GPU go through a ring of pinned memory)
 * unless the GPU falls 64 calls behind. */
typedef struct ta_cache ta_cache;

typedef struct ta_cache_config {
  int32_t num_layers;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t num_pages;        /* 64-token pages in the pool (a page holds one block of every head) */
  int32_t max_seqs;         /* sequence slots */
  int64_t max_seq_len;      /* tokens per sequence */
  const int32_t* head_bits; /* num_layers * num_kv_heads values in {8, 4, 2}; NULL: all 4 */
  int32_t smooth_k;         /* subtract the per-head K mean of a sequence's first write (default 1) */
} ta_cache_config;

typedef struct ta_cache_memory {
  int64_t page_bytes_total; /* one page over all layers */
  int64_t pool_bytes;       /* num_pages * page_bytes_total */
  int64_t buffer_bytes;     /* INT8 buffers of all slots and layers */
  int64_t first_block_bytes; /* the sequences' first blocks (8 bits, not in pages), all slots and layers */
  double bytes_per_token;   /* compressed pages only, all layers and heads, K and V */
  double fp16_bytes_per_token;
} ta_cache_memory;

TA_API ta_cache_config ta_cache_default_config(void);
TA_API ta_status ta_cache_create(const ta_cache_config* config, ta_device device, ta_cache** cache);
TA_API void ta_cache_destroy(ta_cache* cache);
TA_API ta_status ta_cache_memory_info(const ta_cache* cache, ta_cache_memory* info);
TA_API ta_status ta_cache_add_sequence(ta_cache* cache, int32_t* seq);
TA_API ta_status ta_cache_release_sequence(ta_cache* cache, int32_t seq);
TA_API ta_status ta_cache_sequence_length(const ta_cache* cache, int32_t layer, int32_t seq, int64_t* length);
TA_API ta_status ta_cache_free_pages(const ta_cache* cache, int32_t* pages);
/* Every token a sequence holds in one layer, read back as decode sees it: K (its mean added back) and
 * V dequantized into k, v [length, Hkv, D] (f32, f16 or bf16, on the CPU, for caches on either device).
 * For tests, inspection and calibration (turboattn.hf.calibrate), not for speed: on a CUDA cache it
 * synchronizes the device, copies the sequence's pages to the host and dequantizes them there. */
TA_API ta_status ta_cache_read(const ta_cache* cache, int32_t layer, int32_t seq, ta_tensor* k, ta_tensor* v);

/* Writes k, v [T, Hkv, D] (f16 or bf16) of num_seqs sequences (token ranges cu_seqlens, i32
 * [num_seqs + 1]) to the end of those sequences in one layer: the bulk write after prefill. Checks
 * page capacity and lengths for every sequence before anything is written. */
TA_API ta_status ta_cache_write(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs,
                                const ta_tensor* k, const ta_tensor* v, const ta_tensor* cu_seqlens,
                                void* cuda_stream);
/* Appends one token per sequence: k, v [num_seqs, Hkv, D]. Flushes a buffer that reaches 64 tokens. */
TA_API ta_status ta_cache_append(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs,
                                 const ta_tensor* k, const ta_tensor* v, void* cuda_stream);

/* Capturable appends (CUDA caches). ta_cache_reserve takes now, for each listed sequence, the pages of
 * its next `tokens` tokens in every layer (counted from its longest layer), and checks capacity first
 * (TA_ERROR_OUT_OF_CAPACITY, nothing taken); it cannot itself be captured. Then ta_cache_append and
 * ta_cache_append_decode of those sequences (written ones, one token each) can be captured in a CUDA
 * graph: a captured append reads the sequence's length on the GPU at each replay and appends there,
 * flushing into the reserved pages. A replay that finds a sequence at its reservation's end writes
 * nothing for it (the cache stays as it was) and the next ta_cache_sync reports it
 * (TA_ERROR_OUT_OF_CAPACITY). Decodes of reserved sequences size their splits for the reserved length,
 * so a captured decode covers every token replays can add. The host does not see replays: once an
 * append has been captured, host-planned writes and appends (not captured ones), reservations,
 * ta_cache_sequence_length, ta_cache_read and the release of a sequence with captured appends are
 * refused until ta_cache_sync, which waits for the device and reads back the lengths the captured
 * appends reached. Replaying such a graph again after a sync needs another sync before those calls:
 * the library cannot see replays, so that is the caller's to keep. Captured appends of one cache share
 * one buffer of planned positions on the GPU: replay graphs holding them one at a time, in stream
 * order. Reserved pages return to the pool when their sequence is released (after which a replay
 * appends nothing to it). On a CPU cache ta_cache_reserve takes the pages alike and ta_cache_sync does
 * nothing. */
TA_API ta_status ta_cache_reserve(ta_cache* cache, const int32_t* seqs, int32_t num_seqs, int64_t tokens,
                                  void* cuda_stream);
TA_API ta_status ta_cache_sync(ta_cache* cache);

/* Decode attention of q [num_seqs, q_len, Hq, D] (the sequences' last q_len tokens, already in the
 * cache, causal among themselves) over the cache. out: q's shape and dtype. */
typedef struct ta_decode_options {
  float softmax_scale; /* 0: 1/sqrt(D) */
  int32_t use_sas;
  int32_t split_tiles; /* > 0: split-KV with that many 64-token tiles per split; 0: no split */
} ta_decode_options;

TA_API ta_decode_options ta_decode_default_options(void);
TA_API ta_status ta_decode(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs,
                           const ta_tensor* q, const ta_decode_options* options, ta_tensor* out,
                           void* cuda_stream);

/* One decode step of one layer in one call: ta_cache_append of k, v [num_seqs, Hkv, D], then ta_decode
 * of q [num_seqs, q_len, Hq, D] over the cache, the new tokens included. Everything both check is
 * checked before anything is written; the host work the two share (the sequence list, the current
 * device) is done once. For model loops that write and attend layer by layer (turboattn.hf). */
TA_API ta_status ta_cache_append_decode(ta_cache* cache, int32_t layer, const int32_t* seqs, int32_t num_seqs,
                                        const ta_tensor* k, const ta_tensor* v, const ta_tensor* q,
                                        const ta_decode_options* options, ta_tensor* out, void* cuda_stream);

/* A decode prepared once and run per layer: for model loops that keep q and out in fixed buffers and
 * decode the same sequences in every layer of a step. ta_decode_plan_create checks what ta_decode
 * checks that does not depend on the layer (sequences, q, out, options, device pointers) and keeps
 * copies of seqs and of the two descriptors (not of the data: q and out must outlive the plan);
 * ta_decode_plan_run(plan, layer, stream) then decodes one layer with q's current contents, checking
 * only the layer, that the sequences are still active and long enough, and the current device. A plan
 * refers to its cache: destroy plans before their cache. */
typedef struct ta_decode_plan ta_decode_plan;
TA_API ta_status ta_decode_plan_create(ta_cache* cache, const int32_t* seqs, int32_t num_seqs, const ta_tensor* q,
                                       const ta_decode_options* options, ta_tensor* out, ta_decode_plan** plan);
TA_API ta_status ta_decode_plan_run(ta_decode_plan* plan, int32_t layer, void* cuda_stream);
TA_API void ta_decode_plan_destroy(ta_decode_plan* plan);

/* ---- Headwise mixed precision (docs/FORMATS.md 3.6) ----
 * Priority of each KV head of one layer from calibration k, v [T, Hkv, D] (f16, bf16 or f32):
 * priority f32 [Hkv], normalized within the layer. Then bits for every (layer, head) with a target
 * fraction of 2-bit heads: ta_assign_head_bits takes round(fraction * Hkv) heads of lowest priority in
 * each layer; ta_assign_head_bits_across_layers takes round(fraction * layers * Hkv) over the whole
 * model, for priorities comparable across layers (a measured sensitivity, not ta_head_priority's). */
TA_API ta_status ta_head_priority(const ta_tensor* k, const ta_tensor* v, float* priority);
TA_API ta_status ta_assign_head_bits(const float* priority, int32_t num_layers, int32_t num_kv_heads,
                                     float fraction_2bit, int32_t* head_bits);
TA_API ta_status ta_assign_head_bits_across_layers(const float* priority, int32_t num_layers, int32_t num_kv_heads,
                                                   float fraction_2bit, int32_t* head_bits);

#ifdef __cplusplus
}
#endif

#endif /* TURBOATTN_H */
