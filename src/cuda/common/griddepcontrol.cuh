// Programmatic dependent launch (sm_90 and later): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it in the
// stream is still running, once every CTA of that kernel has executed launch_dependents or exited. It
// must wait (griddepcontrol.wait) before it reads what that kernel writes: the wait returns when the
// kernel has completed and its memory is visible. Without the attribute the wait returns at once; below
// sm_90 both are no-ops.
#pragma once

namespace turboattn::cuda {

__device__ __forceinline__ void griddepcontrol_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void griddepcontrol_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace turboattn::cuda
