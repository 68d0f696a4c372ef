// What the compiled CUDA code targets, for `fastadv doctor` and build_info().
#include "fastadv_kernels.cuh"

#define FASTADV_STR2(...) #__VA_ARGS__
#define FASTADV_STR(...) FASTADV_STR2(__VA_ARGS__)

extern "C" const char* fastadv_cuda_arch_list(void) {
#if defined(__CUDA_ARCH_LIST__)
  // nvcc defines it (CUDA >= 11.5) in every compilation pass: "800,900".
  return FASTADV_STR(__CUDA_ARCH_LIST__);
#elif defined(FASTADV_CUDA_ARCHS)
  return FASTADV_STR(FASTADV_CUDA_ARCHS);
#else
  return "";
#endif
}

extern "C" int fastadv_cuda_runtime_version(void) { return CUDART_VERSION; }
