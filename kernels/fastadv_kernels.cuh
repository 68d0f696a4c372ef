// fastadv CUDA kernels: the fused attack ops on raw pointers and a cudaStream_t.
//
// No PyTorch header is needed here: `nvcc -c kernels/*.cu` compiles on its own,
// and csrc/cuda_ops.cpp (host C++) calls the plain C launchers declared below.
//
// The layout contract (fastadv/ops/_registry.py): every tensor is one dense
// block of `numel` elements, the batch outermost, so element i belongs to
// sample i / per_sample. `out` may alias `x_adv`/`x` and `x_nat` (each element
// is read before it is written, by the same thread). Arithmetic is float32;
// results round to the x dtype once, to nearest even.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum fastadv_dtype {
  FASTADV_FLOAT32 = 0,
  FASTADV_FLOAT16 = 1,
  FASTADV_BFLOAT16 = 2
} fastadv_dtype;

// linf_step / l2_step. alpha_t/eps_t: float32 [B] on the device, or NULL to use alpha/eps.
typedef struct fastadv_step_params {
  void* out;
  const void* x_adv;
  const void* x_nat;
  const void* grad;
  fastadv_dtype x_dtype;     // out, x_adv and x_nat
  fastadv_dtype grad_dtype;
  int64_t numel;
  int64_t per_sample;        // numel / B, >= 1
  const float* alpha_t;
  float alpha;
  const float* eps_t;
  float eps;
  float lower;
  float upper;
} fastadv_step_params;

// linf_project / l2_project.
typedef struct fastadv_project_params {
  void* out;
  const void* x;
  const void* x_nat;
  fastadv_dtype x_dtype;
  int64_t numel;
  int64_t per_sample;
  const float* eps_t;
  float eps;
  float lower;
  float upper;
} fastadv_project_params;

cudaError_t fastadv_linf_step_launch(const fastadv_step_params* p, cudaStream_t stream);
cudaError_t fastadv_linf_project_launch(const fastadv_project_params* p, cudaStream_t stream);

// The L2 ops reduce per sample. One block per sample does a sample in one sweep
// when the samples in flight fit in L2 ("fused"); otherwise samples are split over
// several blocks that write per-block partial sums into `workspace` and are added in
// a fixed order (deterministic), in waves sized to L2 so that a big sample is read
// from memory once (kernels/l2.cu). Ask for the workspace size first (it may be 0,
// then workspace may be NULL); it depends on the current device (multiprocessors, L2)
// and is zeroed in part by the launch itself (on the stream).
size_t fastadv_l2_workspace_bytes(int64_t numel, int64_t per_sample);
cudaError_t fastadv_l2_step_launch(const fastadv_step_params* p, float* workspace, cudaStream_t stream);
cudaError_t fastadv_l2_project_launch(const fastadv_project_params* p, float* workspace,
                                      cudaStream_t stream);

// The schedule an L2 op would run with on the current device, for tests and benchmarks.
typedef struct fastadv_l2_schedule {
  int blocks_per_sample;      // 1: fused (one block per sample), else split
  int64_t samples_per_group;  // samples per wave (split); the batch when fused
  int64_t blocks;             // blocks launched
  int64_t workspace_bytes;    // = fastadv_l2_workspace_bytes
} fastadv_l2_schedule;
fastadv_l2_schedule fastadv_l2_schedule_for(int64_t numel, int64_t per_sample, fastadv_dtype x_dtype,
                                            fastadv_dtype grad_dtype, int step);

// What this object code was compiled for: "800,900" (__CUDA_ARCH_LIST__), and CUDART_VERSION.
const char* fastadv_cuda_arch_list(void);
int fastadv_cuda_runtime_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif

// ------------------------------------------------------------------ device code
#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastadv_dev {

constexpr int kThreads = 256;            // threads per block, every kernel
constexpr float kGradNormFloor = 1e-12f; // fastadv.ops.reference.GRAD_NORM_FLOOR

// float <-> storage type; stores round to nearest even, as torch's .to() does.
template <class T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// N elements moved as one aligned access (16 bytes for N * sizeof(T) == 16).
template <class T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// max/min propagating a NaN of either operand, like torch.maximum/minimum and torch.clamp
// with tensor bounds (a NaN in x_nat makes its ball bounds NaN, and the output NaN).
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (a < b || b != b) ? b : a; }
__device__ __forceinline__ float min_keep_nan(float a, float b) { return (a > b || b != b) ? b : a; }

__device__ __forceinline__ float clamp_keep_nan(float v, float lo, float hi) {
  return min_keep_nan(max_keep_nan(v, lo), hi);
}

// sign with sign(0) = sign(NaN) = 0: a NaN gradient entry moves nothing.
__device__ __forceinline__ float finite_sign(float g) {
  return static_cast<float>(g > 0.f) - static_cast<float>(g < 0.f);
}

// Non-finite gradient entries count as 0 in the L2 step.
__device__ __forceinline__ float finite_or_zero(float g) {
  return (__float_as_uint(g) & 0x7f800000u) == 0x7f800000u ? 0.f : g;
}

__device__ __forceinline__ float per_sample_value(const float* t, float v, int64_t s) {
  return t != nullptr ? t[s] : v;
}

template <class T> struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the storage type T of a dtype.
template <class F> cudaError_t dispatch_dtype(fastadv_dtype d, F&& f) {
  switch (d) {
    case FASTADV_FLOAT32: return f(Tag<float>{});
    case FASTADV_FLOAT16: return f(Tag<__half>{});
    case FASTADV_BFLOAT16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

struct DeviceInfo {
  int sms;       // multiprocessors
  int l2_bytes;  // L2 cache size; 0 if unknown
};

// The current device's multiprocessor count and L2 size, asked once per device.
inline const DeviceInfo& device_info() {
  static DeviceInfo cache[64] = {};
  static const DeviceInfo fallback{1, 0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return fallback;
  DeviceInfo& d = cache[dev];
  if (d.sms > 0) return d;
  int n = 0, l2 = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 1;
  if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess || l2 < 0) l2 = 0;
  d.l2_bytes = l2;
  d.sms = n;
  return d;
}

inline int multiprocessor_count() { return device_info().sms; }

// Lets the other warps run while a thread waits for another block (sm_70 and up).
__device__ __forceinline__ void backoff() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  __nanosleep(100);
#endif
}

// The L∞ element update: linf_step when STEP, else linf_project (g unused).
template <bool STEP>
__device__ __forceinline__ float linf_element(float x, float xn, float g, float a, float e,
                                              float lo, float hi) {
  float v = x;
  if (STEP) v = x + a * finite_sign(g);
  v = min_keep_nan(max_keep_nan(v, xn - e), xn + e);
  return clamp_keep_nan(v, lo, hi);
}

// Sum over a block; every thread gets the result. `scratch` holds kThreads/32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];  // same order in every thread
  return total;
}

}  // namespace fastadv_dev

#endif  // __CUDACC__
