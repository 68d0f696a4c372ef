// cuda_emu: runs unmodified CUDA kernels on the host, for tests (g++ -include cuda_emu.h).
//
// Each CUDA thread of a block is a fiber (runtime.cpp); blocks of a grid run one
// after another, so `__shared__` is a function-local static (one per kernel instance,
// reused by the next block). __syncthreads and __shfl_xor_sync are barriers over the
// block's / the warp's threads; under ThreadSanitizer they are the only
// happens-before edges between threads besides atomics, as on a GPU.
// The launch syntax `k<<<grid, block, shmem, stream>>>(args)` is rewritten (by the
// test harness, tests/cuda_emu/harness.py) to
// `::cuda_emu::Launch(grid, block, shmem, stream).kernel(k, "k")(args)`.
//
// The CUDA toolkit's own headers supply the types (cudaError_t, dim3) and the
// fp16/bf16 conversions: they are included here in host mode, before __CUDACC__
// is defined, so the kernels' later #includes of them are no-ops.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// From here on the kernel sources see a CUDA compiler.
#define __CUDACC__ 1

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Per-block storage: one instance per kernel (blocks run one after another).
#define __shared__ static

namespace cuda_emu {

// The executing CUDA thread's coordinates (set by the scheduler before it runs a thread).
extern uint3 thread_idx;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

void sync_threads();                               // the block's barrier
void warp_exchange(uint64_t mine, uint64_t* all);  // all[lane] = each lane's `mine`
void fail(const char* what);                       // prints and aborts
unsigned lane_id();                                // the executing thread's lane in its warp
void spin_pause();                                 // lets the block's other threads run

struct Kernel {
  void (*run)(void* args);  // runs the kernel body once, in the calling CUDA thread
  void* args;
  const char* name;
};

// Runs `k` over the configured grid; records the launch; returns the launch's error.
cudaError_t run_grid(const Kernel& k, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream);

template <class... P> struct Bound {
  void (*fn)(P...);
  const char* name;
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;

  template <class... A> void operator()(A&&... a) const {
    // Kernel parameters are copied at launch, as on a GPU.
    struct Pack {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> args;
    } pack{fn, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    Kernel k{[](void* p) {
               auto* pk = static_cast<Pack*>(p);
               auto copy = pk->args;  // each thread gets its own copy of the parameters
               std::apply(pk->fn, copy);
             },
             &pack, name};
    run_grid(k, grid, block, shmem, stream);
  }
};

struct Launch {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), shmem(s), stream(st) {}
  template <class... P> Bound<P...> kernel(void (*fn)(P...), const char* name) const {
    return Bound<P...>{fn, name, grid, block, shmem, stream};
  }
};

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx)
#define blockIdx (::cuda_emu::block_idx)
#define blockDim (::cuda_emu::block_dim)
#define gridDim (::cuda_emu::grid_dim)
#define warpSize 32

inline void __syncthreads() { ::cuda_emu::sync_threads(); }

template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "cuda_emu: shuffles of up to 8 bytes");
  if (mask != 0xffffffffu || width != 32) ::cuda_emu::fail("cuda_emu: only full-warp shuffles are emulated");
  uint64_t mine = 0, all[32];
  std::memcpy(&mine, &v, sizeof(T));
  ::cuda_emu::warp_exchange(mine, all);
  T r;
  std::memcpy(&r, &all[(::cuda_emu::lane_id()) ^ static_cast<unsigned>(lane_mask & 31)], sizeof(T));
  return r;
}

// Device intrinsics with the host's IEEE float arithmetic (build with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline int __float_as_int(float v) { return static_cast<int>(__float_as_uint(v)); }

// Atomics: sequentially consistent here (a GPU's are relaxed; kernels order them with
// __threadfence, which this makes a full fence). ThreadSanitizer sees them as sync.
template <class T> inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicCAS(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
// Under ThreadSanitizer (which does not model fences) the seq_cst atomics above are
// what orders a kernel's publish/wait pairs; the fence adds nothing there.
#if defined(__SANITIZE_THREAD__)
inline void __threadfence() {}
#else
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif
inline void __nanosleep(unsigned) { ::cuda_emu::spin_pause(); }
