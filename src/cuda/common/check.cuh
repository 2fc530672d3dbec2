// CUDA error checks for host code: every CUDA call and every launch is checked, and a failure
// becomes a turboattn::Error with TA_ERROR_CUDA naming the call.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "api/errors.hpp"

#define TA_CUDA_CHECK(call)                                                                          \
  do {                                                                                               \
    const cudaError_t err_ = (call);                                                                 \
    ::turboattn::require(err_ == cudaSuccess, TA_ERROR_CUDA, #call, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

#define TA_CUDA_CHECK_LAUNCH(kernel_name)                                                                 \
  do {                                                                                                    \
    const cudaError_t err_ = cudaGetLastError();                                                          \
    ::turboattn::require(err_ == cudaSuccess, TA_ERROR_CUDA, "launch of " kernel_name " failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace turboattn::cuda {

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) holds for the current device only; `done` (one per
// kernel instance) records the devices it has been set on, so each device gets it once.
inline void allow_dynamic_smem(std::atomic<uint64_t>& done, const void* kernel, int bytes) {
  int device = 0;
  TA_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return;
  TA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.fetch_or(bit, std::memory_order_release);
}

}  // namespace turboattn::cuda

#include "api/cuda_backend.hpp"  // expect_device_pointer
