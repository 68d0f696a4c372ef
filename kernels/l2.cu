// l2_step and l2_project: per-sample norms, then the update.
//
// l2_step:    gn = max(||g||, 1e-12); x' = x_adv + alpha*(g/gn); δ = x' - x_nat;
//             out = clamp(x_nat + δ*min(1, eps/||δ||), lower, upper)
// l2_project: the same with x' = x.
//
// Two schedules, chosen by the launcher:
//  * fused: one block per sample does every phase (sum g², sum δ², write) in one
//    kernel; the re-reads of a small sample mostly hit L1/L2. Used when samples
//    are small or there are enough of them to fill the GPU.
//  * split: `bps` blocks per sample, one kernel per phase; each block writes its
//    partial sum to the workspace and the next phase adds a sample's partials in
//    a fixed order (deterministic, no atomics, no memset).
// The operation order and rounding (no FMA contraction) follow the reference.
#include "fastadv_kernels.cuh"

namespace fastadv_dev {
namespace {

struct L2Args {
  void* out;
  const void* x;
  const void* x_nat;
  const void* grad;  // unused when !STEP
  int64_t per_sample;
  int64_t chunk;     // elements per block in the split schedule (a multiple of VEC)
  int bps;           // blocks per sample (1: fused)
  const float* alpha_t;
  float alpha;
  const float* eps_t;
  float eps;
  float lower;
  float upper;
  float* ws_g;       // [B * bps] partial sums of g² (split schedule)
  float* ws_d;       // [B * bps] partial sums of δ²
};

// Visits the elements [begin, end) of one sample as float triples (x, x_nat, g),
// VEC at a time; begin and end are multiples of VEC when VEC > 1.
template <class X, class G, int VEC, bool STEP, class F>
__device__ __forceinline__ void for_each(const L2Args& p, int64_t begin, int64_t end, F&& f) {
  const X* x = static_cast<const X*>(p.x);
  const X* xn = static_cast<const X*>(p.x_nat);
  const G* g = static_cast<const G*>(p.grad);
  for (int64_t v = begin / VEC + threadIdx.x; v < end / VEC; v += kThreads) {
    const Pack<X, VEC> px = reinterpret_cast<const Pack<X, VEC>*>(x)[v];
    const Pack<X, VEC> pn = reinterpret_cast<const Pack<X, VEC>*>(xn)[v];
    Pack<G, VEC> pg;
    if (STEP) pg = reinterpret_cast<const Pack<G, VEC>*>(g)[v];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      f(v * VEC + j, Cvt<X>::load(px.v[j]), Cvt<X>::load(pn.v[j]),
        STEP ? finite_or_zero(Cvt<G>::load(pg.v[j])) : 0.f);
    }
  }
}

// x' - x_nat, rounded as the reference rounds it.
template <bool STEP>
__device__ __forceinline__ float delta_of(float x, float xn, float g, float a, float gn) {
  const float moved = STEP ? __fadd_rn(x, __fmul_rn(a, __fdiv_rn(g, gn))) : x;
  return __fsub_rn(moved, xn);
}

template <class X, class G, int VEC, bool STEP>
__device__ __forceinline__ float partial_sum_g2(const L2Args& p, int64_t begin, int64_t end) {
  float acc = 0.f;
  for_each<X, G, VEC, STEP>(p, begin, end, [&](int64_t, float, float, float g) {
    acc = fmaf(g, g, acc);
  });
  return acc;
}

template <class X, class G, int VEC, bool STEP>
__device__ __forceinline__ float partial_sum_d2(const L2Args& p, int64_t begin, int64_t end,
                                                float a, float gn) {
  float acc = 0.f;
  for_each<X, G, VEC, STEP>(p, begin, end, [&](int64_t, float x, float xn, float g) {
    const float d = delta_of<STEP>(x, xn, g, a, gn);
    acc = fmaf(d, d, acc);
  });
  return acc;
}

template <class X, class G, int VEC, bool STEP>
__device__ __forceinline__ void write_out(const L2Args& p, int64_t begin, int64_t end, float a,
                                          float gn, float scale) {
  X* out = static_cast<X*>(p.out);
  const float lo = p.lower, hi = p.upper;
  // Each thread writes exactly the elements it read: safe when out aliases x or x_nat.
  if (VEC == 1) {
    for_each<X, G, 1, STEP>(p, begin, end, [&](int64_t i, float x, float xn, float g) {
      const float d = delta_of<STEP>(x, xn, g, a, gn);
      out[i] = Cvt<X>::store(clamp_keep_nan(__fadd_rn(xn, __fmul_rn(d, scale)), lo, hi));
    });
    return;
  }
  const X* x = static_cast<const X*>(p.x);
  const X* xnp = static_cast<const X*>(p.x_nat);
  const G* gp = static_cast<const G*>(p.grad);
  for (int64_t v = begin / VEC + threadIdx.x; v < end / VEC; v += kThreads) {
    const Pack<X, VEC> px = reinterpret_cast<const Pack<X, VEC>*>(x)[v];
    const Pack<X, VEC> pn = reinterpret_cast<const Pack<X, VEC>*>(xnp)[v];
    Pack<G, VEC> pg;
    if (STEP) pg = reinterpret_cast<const Pack<G, VEC>*>(gp)[v];
    Pack<X, VEC> po;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xn = Cvt<X>::load(pn.v[j]);
      const float g = STEP ? finite_or_zero(Cvt<G>::load(pg.v[j])) : 0.f;
      const float d = delta_of<STEP>(Cvt<X>::load(px.v[j]), xn, g, a, gn);
      po.v[j] = Cvt<X>::store(clamp_keep_nan(__fadd_rn(xn, __fmul_rn(d, scale)), lo, hi));
    }
    reinterpret_cast<Pack<X, VEC>*>(out)[v] = po;
  }
}

__device__ __forceinline__ float grad_norm(float sum_g2) {
  return fmaxf(sqrtf(sum_g2), kGradNormFloor);
}

// min(1, eps/||δ||), and 1 where ||δ|| <= eps (so eps = ||δ|| = 0 gives 1, not NaN).
__device__ __forceinline__ float ball_scale(float sum_d2, float e) {
  const float n = sqrtf(sum_d2);
  return n > e ? __fdiv_rn(e, n) : 1.f;
}

// Sum of one sample's bps partials, in a fixed order; the result lands in every thread.
__device__ float sum_partials(const float* ws, int64_t sample, int bps, float* shared_out) {
  if (threadIdx.x < 32) {
    double acc = 0.0;
    for (int k = threadIdx.x; k < bps; k += 32) acc += static_cast<double>(ws[sample * bps + k]);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (threadIdx.x == 0) *shared_out = static_cast<float>(acc);
  }
  __syncthreads();
  const float r = *shared_out;
  __syncthreads();
  return r;
}

// ------------------------------------------------------------------- fused
template <class X, class G, int VEC, bool STEP>
__global__ void __launch_bounds__(kThreads) l2_fused_kernel(L2Args p) {
  __shared__ float scratch[kThreads / 32];
  const int64_t s = blockIdx.x;
  const int64_t begin = s * p.per_sample, end = begin + p.per_sample;
  const float a = STEP ? per_sample_value(p.alpha_t, p.alpha, s) : 0.f;
  const float e = per_sample_value(p.eps_t, p.eps, s);
  float gn = 1.f;
  if (STEP) gn = grad_norm(block_sum(partial_sum_g2<X, G, VEC, STEP>(p, begin, end), scratch));
  const float scale = ball_scale(block_sum(partial_sum_d2<X, G, VEC, STEP>(p, begin, end, a, gn), scratch), e);
  write_out<X, G, VEC, STEP>(p, begin, end, a, gn, scale);
}

// ------------------------------------------------------------------- split
// PHASE 0: partial sums of g²; 1: partial sums of δ²; 2: write.
template <class X, class G, int VEC, bool STEP, int PHASE>
__global__ void __launch_bounds__(kThreads) l2_split_kernel(L2Args p) {
  __shared__ float scratch[kThreads / 32];
  __shared__ float total;
  const int64_t s = blockIdx.x / p.bps;
  const int64_t part = blockIdx.x % p.bps;
  const int64_t sample_end = (s + 1) * p.per_sample;
  const int64_t begin = s * p.per_sample + part * p.chunk;
  const int64_t end = begin + p.chunk < sample_end ? begin + p.chunk : sample_end;
  if (PHASE == 0) {
    const float v = block_sum(partial_sum_g2<X, G, VEC, STEP>(p, begin, end), scratch);
    if (threadIdx.x == 0) p.ws_g[blockIdx.x] = v;
    return;
  }
  const float a = STEP ? per_sample_value(p.alpha_t, p.alpha, s) : 0.f;
  const float gn = STEP ? grad_norm(sum_partials(p.ws_g, s, p.bps, &total)) : 1.f;
  if (PHASE == 1) {
    const float v = block_sum(partial_sum_d2<X, G, VEC, STEP>(p, begin, end, a, gn), scratch);
    if (threadIdx.x == 0) p.ws_d[blockIdx.x] = v;
    return;
  }
  const float e = per_sample_value(p.eps_t, p.eps, s);
  const float scale = ball_scale(sum_partials(p.ws_d, s, p.bps, &total), e);
  write_out<X, G, VEC, STEP>(p, begin, end, a, gn, scale);
}

// Blocks per sample: 1 unless samples are big and too few to give every
// multiprocessor ~4 blocks (a block streams one sample at a time).
int blocks_per_sample(int64_t batch, int64_t per_sample) {
  const int sms = multiprocessor_count();
  if (batch >= 4 * sms || per_sample < 32768) return 1;
  int64_t bps = (4 * sms + batch - 1) / batch;
  const int64_t by_size = (per_sample + 8191) / 8192;
  if (bps > by_size) bps = by_size;
  if (bps > 128) bps = 128;
  return bps < 1 ? 1 : static_cast<int>(bps);
}

template <class X, class G, int VEC, bool STEP>
cudaError_t launch_schedule(L2Args p, int64_t batch, cudaStream_t stream) {
  if (p.bps == 1) {
    l2_fused_kernel<X, G, VEC, STEP><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  int64_t chunk = (p.per_sample + p.bps - 1) / p.bps;
  p.chunk = (chunk + VEC - 1) / VEC * VEC;
  const unsigned blocks = static_cast<unsigned>(batch * p.bps);
  if (STEP) l2_split_kernel<X, G, VEC, STEP, 0><<<blocks, kThreads, 0, stream>>>(p);
  l2_split_kernel<X, G, VEC, STEP, 1><<<blocks, kThreads, 0, stream>>>(p);
  l2_split_kernel<X, G, VEC, STEP, 2><<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class X, class G, bool STEP>
cudaError_t launch_l2(L2Args p, int64_t numel, float* workspace, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(X);
  const int64_t batch = numel / p.per_sample;
  p.bps = blocks_per_sample(batch, p.per_sample);
  if (p.bps > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    p.ws_g = workspace;
    p.ws_d = workspace + batch * p.bps;
  }
  const bool vec_ok = p.per_sample % VEC == 0 && aligned_to(p.out, sizeof(X) * VEC) &&
                      aligned_to(p.x, sizeof(X) * VEC) && aligned_to(p.x_nat, sizeof(X) * VEC) &&
                      (!STEP || aligned_to(p.grad, sizeof(G) * VEC));
  if (vec_ok) return launch_schedule<X, G, VEC, STEP>(p, batch, stream);
  return launch_schedule<X, G, 1, STEP>(p, batch, stream);
}

}  // namespace
}  // namespace fastadv_dev

using namespace fastadv_dev;

extern "C" size_t fastadv_l2_workspace_bytes(int64_t numel, int64_t per_sample) {
  if (numel <= 0 || per_sample < 1) return 0;
  const int64_t batch = numel / per_sample;
  const int bps = blocks_per_sample(batch, per_sample);
  return bps > 1 ? static_cast<size_t>(2 * batch * bps) * sizeof(float) : 0;
}

extern "C" cudaError_t fastadv_l2_step_launch(const fastadv_step_params* p, float* workspace,
                                              cudaStream_t stream) {
  if (p == nullptr || p->numel < 0 || p->per_sample < 1 || p->numel % p->per_sample != 0)
    return cudaErrorInvalidValue;
  if (p->numel == 0) return cudaSuccess;
  const L2Args a{p->out, p->x_adv, p->x_nat, p->grad, p->per_sample, 0, 1, p->alpha_t,
                 p->alpha, p->eps_t, p->eps, p->lower, p->upper, nullptr, nullptr};
  return dispatch_dtype(p->x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    return dispatch_dtype(p->grad_dtype, [&](auto gt) {
      using G = typename decltype(gt)::type;
      return launch_l2<X, G, true>(a, p->numel, workspace, stream);
    });
  });
}

extern "C" cudaError_t fastadv_l2_project_launch(const fastadv_project_params* p, float* workspace,
                                                 cudaStream_t stream) {
  if (p == nullptr || p->numel < 0 || p->per_sample < 1 || p->numel % p->per_sample != 0)
    return cudaErrorInvalidValue;
  if (p->numel == 0) return cudaSuccess;
  const L2Args a{p->out, p->x, p->x_nat, nullptr, p->per_sample, 0, 1, nullptr,
                 0.f, p->eps_t, p->eps, p->lower, p->upper, nullptr, nullptr};
  return dispatch_dtype(p->x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    return launch_l2<X, X, false>(a, p->numel, workspace, stream);
  });
}
