// Blockwise INT8 quantization kernels (docs/FORMATS.md, 1.2), shared by ta_quantize_int8 and the
// attention pre-pass. Every rounding is an explicit IEEE round-to-nearest-even operation, so the
// codes and scales are bit-exact with ref::quantize_block_int8.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace turboattn::cuda {

// Element strides of a [B, N, H, D] tensor (the last dim is contiguous).
struct TokenStrides {
  int64_t b, n, h;
};

// Where a quantization pass reads and writes. `shift` ([B, H, D] with strides shift_b, shift_h) is
// subtracted first when not null. Scales go to scales[b * scale_b + h * scale_h + block].
template <typename T>
struct QuantizeArgs {
  const T* x;
  TokenStrides xs;
  const float* shift;
  int64_t shift_b, shift_h;
  int8_t* codes;
  TokenStrides cs;  // token-major output (unused by the transposed layout)
  float* scales;
  int64_t scale_b, scale_h;
  int batch, tokens, heads, dim;
};

// Token-major codes at codes[b * cs.b + t * cs.n + h * cs.h + c].
template <typename T>
void launch_quantize_int8(const QuantizeArgs<T>& a, cudaStream_t stream);

// Channel-major codes for P.V: codes[((b * heads + h) * dim + c) * padded_tokens + position], where
// position permutes keys within each group of 16 as the u8 x s8 fragment of P expects (see
// vt_position); positions past `tokens` up to padded_tokens are written as 0. `codes` must be 4-byte
// aligned and padded_tokens a multiple of 64.
template <typename T>
void launch_quantize_int8_transposed(const QuantizeArgs<T>& a, int padded_tokens, cudaStream_t stream);

// Already-quantized codes [B, N, H, D] (strided) to the same channel-major layout.
void launch_transpose_codes(const int8_t* codes, TokenStrides cs, int batch, int tokens, int heads, int dim, int8_t* out,
                            int padded_tokens, cudaStream_t stream);

// mean[(b * heads + h) * dim + c] = the mean of x over its tokens, summed in fp32 over runs of
// kMeanRunTokens tokens (partial sums, then the runs in order): the K smoothing mean of the prefill
// pre-pass (docs/FORMATS.md 1.4 lets kernels sum in any order). `partial` holds
// mean_partial_count(...) floats of scratch.
constexpr int kMeanRunTokens = 256;
inline int64_t mean_partial_count(int batch, int tokens, int heads, int dim) {
  return int64_t(batch) * heads * ((tokens + kMeanRunTokens - 1) / kMeanRunTokens) * dim;
}
template <typename T>
void launch_channel_mean(const T* x, TokenStrides xs, int batch, int tokens, int heads, int dim, float* partial, float* mean,
                         cudaStream_t stream);

// Key order of the transposed V within a group of 16 keys: stored position 4i + e holds key
// {2i, 2i + 1, 8 + 2i, 9 + 2i}[e]: the keys a thread's two score n-tiles give it (sm80 prefill).
__host__ __device__ __forceinline__ int vt_position(int key) {
  const int k = key & 15, i = (k & 7) >> 1, e = (k & 1) | ((k >> 3) << 1);
  return (key & ~15) | (4 * i + e);
}

// The inverse of vt_position: the key stored at a position.
__host__ __device__ __forceinline__ int vt_key(int position) {
  const int p = position & 15, i = p >> 2, e = p & 3;
  return (position & ~15) | (2 * i + (e & 1) + 8 * (e >> 1));
}

}  // namespace turboattn::cuda
