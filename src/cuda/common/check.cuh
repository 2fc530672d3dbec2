// CUDA error checks for host code: every CUDA call and every launch is checked, and a failure
// becomes a turboattn::Error with TA_ERROR_CUDA naming the call.
#pragma once

#include <cuda_runtime.h>

#include "api/errors.hpp"

#define TA_CUDA_CHECK(call)                                                                          \
  do {                                                                                               \
    const cudaError_t err_ = (call);                                                                 \
    ::turboattn::require(err_ == cudaSuccess, TA_ERROR_CUDA, #call, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

#define TA_CUDA_CHECK_LAUNCH(kernel_name) \
  ::turboattn::require(cudaGetLastError() == cudaSuccess, TA_ERROR_CUDA, "launch of " kernel_name " failed")

#include "api/cuda_backend.hpp"  // expect_device_pointer
