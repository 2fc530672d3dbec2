// Inline-PTX wrappers for the synchronization of Hopper's warp-specialized kernels (sm_90a), one per
// instruction, named after it: shared-memory mbarriers (a producer fills a stage, consumers release
// it), cp.async completion tracked by an mbarrier, named barriers, and setmaxnreg, which moves
// registers from the producer warpgroup to the consumers.
#pragma once

#include <stdint.h>

#include "cuda/sm90/sm90a.cuh"

namespace turboattn::cuda::sm90 {

__device__ __forceinline__ uint32_t shared_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// mbarrier.init.shared::cta.b64: a phase completes after `count` arrivals.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  TA_SM90A_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
}

// mbarrier.arrive.shared::cta.b64 (release at CTA scope).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  TA_SM90A_ASM("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(shared_address(bar)) : "memory");
}

// mbarrier.try_wait.parity.shared::cta.b64 in a loop: returns once the phase of parity `parity` has
// completed (acquire at CTA scope).
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  TA_SM90A_ASM(
      "{\n.reg .pred ready;\nretry:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@!ready bra retry;\n}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
}

// cp.async.mbarrier.arrive.noinc.shared::cta.b64: one arrival on `bar` once every cp.async this thread
// issued so far has landed (noinc: the arrival is one of the count given at init).
__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint64_t* bar) {
  TA_SM90A_ASM("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(shared_address(bar)) : "memory");
}

// cp.async.wait_all.
__device__ __forceinline__ void cp_async_wait_all() { TA_SM90A_ASM("cp.async.wait_all;\n" ::: "memory"); }

// bar.sync id, threads: a barrier over `threads` threads (a multiple of 32); id 0 is __syncthreads'.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  TA_SM90A_ASM("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// bar.arrive id, threads: counts the calling warps toward barrier `id` without waiting for it.
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  TA_SM90A_ASM("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// setmaxnreg.{inc,dec}.sync.aligned.u32: the executing warpgroup's registers per thread become N.
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  TA_SM90A_ASM("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  TA_SM90A_ASM("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace turboattn::cuda::sm90
