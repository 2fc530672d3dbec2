// Device queries shared by the CUDA entry points.
#include "api/cuda_backend.hpp"
#include "cuda/common/check.cuh"

namespace turboattn::cuda {

bool device_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

void expect_device_pointer(const void* ptr, const char* name) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) cudaGetLastError();  // clear the sticky-free error of an unknown pointer
  require(err == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged),
          TA_ERROR_INVALID_ARGUMENT, name, ": marked as a CUDA tensor but its data is not device memory");
  int current = -1;
  TA_CUDA_CHECK(cudaGetDevice(&current));
  require(attr.type == cudaMemoryTypeManaged || attr.device == current, TA_ERROR_INVALID_ARGUMENT, name, ": on CUDA device ",
          attr.device, " but the current device is ", current, " (make the tensors' device current)");
}

}  // namespace turboattn::cuda
