// TA_SM90A_ASM: inline PTX that exists on sm_90a only. The library is also compiled for sm_80 and
// sm_89, where these bodies trap instead (the dispatch never runs an sm_90a kernel there:
// cuda/prefill.cu).
#pragma once

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TA_SM90A_ASM(...) asm volatile(__VA_ARGS__)
#else
#define TA_SM90A_ASM(...) __trap()
#endif
