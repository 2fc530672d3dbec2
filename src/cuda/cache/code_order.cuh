// The order in which the decode kernel's tensor-core products walk a row of packed cache codes (a K
// row's D channels, a V row's 64 keys; docs/FORMATS.md 3.4), and the loads that follow it. A product's
// sum is the same in any order, so the order is chosen for the loads: lane t of each quad reads one run
// of consecutive words of the row (one vector load where alignment allows), and each word becomes whole
// A-fragment registers by a constant shift and a mask. Q' and P, the B operands, are laid out in the
// same order.
//
// Position p = 32 ks + 16 h + 4 t + b is byte b of fragment register h (a0/a1 for h = 0, a2/a3 for
// h = 1 of an m16n8k32 A operand) of quad lane t in k-step ks. Lane t's words start at word t * kLaneWords:
//   4 bits: word t * kSteps + ks serves k-step ks; its low nibbles are register 0, its high nibbles 1.
//   2 bits: word t * kSteps / 2 + ks / 2 serves k-steps ks and ks + 1; register h of k-step ks is bit
//           pair 2 (ks % 2) + h of each byte.
//   8 bits: the identity (the codes are INT8 values).
// At 2 bits a row of an odd number of k-steps (K rows at D = 96) cannot give each lane whole words;
// there (kShared) the quad shares each k-step's two words, lane t taking bit pair t of each byte.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace turboattn::cuda {

template <int kBits, int kRowCodes>
struct CodeOrder {
  static_assert(kBits == 8 || kBits == 4 || kBits == 2, "8-, 4- or 2-bit codes");
  static_assert(kRowCodes % 32 == 0, "rows of whole k-steps");
  static constexpr int kSteps = kRowCodes / 32;
  static constexpr bool kShared = kBits == 2 && kSteps % 2 == 1;
  static constexpr int kLaneWords = kBits == 8 || kShared ? 0 : kRowCodes * kBits / 128;
  static constexpr uint32_t kMask = ((1u << kBits) - 1u) * 0x01010101u;

  // The code (channel of a K row, key of a V row) at position p.
  __host__ __device__ static constexpr int code_at(int p) {
    const int ks = p / 32, h = (p / 16) % 2, t = (p / 4) % 4, b = p % 4;
    if constexpr (kBits == 8) return p;
    else if constexpr (kBits == 4) return 8 * (t * kSteps + ks) + 2 * b + h;
    else if constexpr (kShared) return 16 * (2 * ks + h) + 4 * b + t;
    else return 16 * (t * (kSteps / 2) + ks / 2) + 4 * b + 2 * (ks % 2) + h;
  }

  // The position of code c: the inverse of code_at.
  __host__ __device__ static constexpr int position_of(int c) {
    if constexpr (kBits == 8) {
      return c;
    } else if constexpr (kBits == 4) {
      const int w = c / 8, r = c % 8;
      return 32 * (w % kSteps) + 16 * (r % 2) + 4 * (w / kSteps) + r / 2;
    } else if constexpr (kShared) {
      const int w = c / 16, r = c % 16;
      return 32 * (w / 2) + 16 * (w % 2) + 4 * (r % 4) + r / 4;
    } else {
      const int w = c / 16, r = c % 16, s = r % 4;
      return 32 * (2 * (w % (kSteps / 2)) + s / 2) + 16 * (s % 2) + 4 * (w / (kSteps / 2)) + r / 4;
    }
  }

  // A row's fragment registers for quad lane t: frag[ks][h] holds positions 32 ks + 16 h + 4 t .. + 3.
  // row: the row's first byte, 16-byte aligned.
  __host__ __device__ static void load(uint32_t (&frag)[kSteps][2], const uint8_t* row, int t) {
    if constexpr (kBits == 8 || kShared) {
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) load_step(frag[ks], row, t, ks);
    } else {  // the lane's words in vector loads
      uint32_t mine[kLaneWords];
      load_words<kLaneWords>(mine, reinterpret_cast<const uint32_t*>(row) + t * kLaneWords);
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks)
        frag[ks][0] = fragment(mine[ks / kPerWord], ks, 0), frag[ks][1] = fragment(mine[ks / kPerWord], ks, 1);
    }
  }

  // The same for one k-step: frag[h] holds positions 32 ks + 16 h + 4 t .. + 3 (32-bit loads).
  __host__ __device__ static void load_step(uint32_t (&frag)[2], const uint8_t* row, int t, int ks) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(row);
    if constexpr (kBits == 8) {
      frag[0] = w[8 * ks + t], frag[1] = w[8 * ks + 4 + t];
    } else if constexpr (kShared) {
      frag[0] = (w[2 * ks] >> (2 * t)) & kMask, frag[1] = (w[2 * ks + 1] >> (2 * t)) & kMask;
    } else {
      const uint32_t word = w[t * kLaneWords + ks / kPerWord];
      frag[0] = fragment(word, ks, 0), frag[1] = fragment(word, ks, 1);
    }
  }

#ifdef __CUDACC__
  // The bytes meta[code_at(4 w + b)], b = 0..3, as one word: the per-code metadata (a K row's
  // per-channel, a V row's per-token scales or zeros; 4-byte aligned) of the four positions of B word w.
  __device__ static uint32_t gather(const uint8_t* meta, int w) {
    const uint32_t* m = reinterpret_cast<const uint32_t*>(meta);
    const int ks = w / 8, h = (w / 4) % 2, t = w % 4;
    if constexpr (kBits == 8) {
      return m[w];
    } else if constexpr (kBits == 4) {  // codes 8 W + h + {0, 2, 4, 6}: bytes h and h + 2 of words 2 W, 2 W + 1
      const int word = t * kSteps + ks;
      return __byte_perm(m[2 * word], m[2 * word + 1], h ? 0x7531 : 0x6420);
    } else {  // codes 16 W + s + {0, 4, 8, 12}: byte s of words 4 W .. 4 W + 3
      const int word = kShared ? 2 * ks + h : t * (kSteps / 2) + ks / 2, s = kShared ? t : 2 * (ks % 2) + h;
      const int sel = s | ((s + 4) << 4);
      const uint32_t* m4 = m + 4 * word;
      return __byte_perm(__byte_perm(m4[0], m4[1], sel), __byte_perm(m4[2], m4[3], sel), 0x5410);
    }
  }
#endif

 private:
  static constexpr int kPerWord = kBits < 8 ? 32 / (8 * kBits) : 1;  // k-steps one word serves: 1 at 4 bits, 2 at 2

  // Register h of k-step ks from the lane's word that serves it (the orders of whole words per lane).
  __host__ __device__ static constexpr uint32_t fragment(uint32_t word, int ks, int h) {
    return (word >> (kBits * ((ks % kPerWord) * 2 + h))) & kMask;
  }

  // n consecutive words in the widest loads their alignment allows (they start 4 n bytes per lane past
  // a 16-byte aligned row start).
  template <int n>
  __host__ __device__ static void load_words(uint32_t (&dst)[n], const uint32_t* src) {
    if constexpr (n % 4 == 0) {
#pragma unroll
      for (int i = 0; i < n; i += 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + i);
        dst[i] = v.x, dst[i + 1] = v.y, dst[i + 2] = v.z, dst[i + 3] = v.w;
      }
    } else if constexpr (n % 2 == 0) {
#pragma unroll
      for (int i = 0; i < n; i += 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(src + i);
        dst[i] = v.x, dst[i + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < n; ++i) dst[i] = src[i];
    }
  }
};

}  // namespace turboattn::cuda
