// Programmatic dependent launch (sm_90): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it in the stream
// is finishing; it must wait before reading that kernel's output. No-ops before sm_90, where the launch
// attribute is not set (src/cuda/cache.cu).
#pragma once

namespace turboattn::cuda {

// griddepcontrol.launch_dependents: this CTA no longer holds back the dependent grid's launch.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// griddepcontrol.wait: returns once the prerequisite grid has completed and its writes are visible.
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace turboattn::cuda
