// l2_step and l2_project: per-sample norms, then the update.
//
// l2_step:    gn = max(||g||, 1e-12); x' = x_adv + alpha*(g/gn); δ = x' - x_nat;
//             out = clamp(x_nat + δ*min(1, eps/||δ||), lower, upper)
// l2_project: the same with x' = x.
//
// Two schedules, chosen by the launcher (blocks_per_sample):
//  * fused: one block per sample does every phase (sum g², sum δ², write) in one
//    kernel; the re-reads of a sample hit L2 while the samples in flight fit there.
//  * split: `bps` blocks per sample, one launch; each block does one phase of one
//    chunk, writes its partial sum to the workspace, and the next phase of the sample
//    adds its partials in a fixed order (deterministic, no atomics in the sums).
//    Waves of samples sized to L2 keep a big sample's re-reads in cache.
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
  int64_t batch;
  // split schedule only
  int64_t group;     // samples per wave
  int64_t groups;    // waves' groups: ceil(batch / group)
  float* ws_g;       // [B * bps] partial sums of g²
  float* ws_d;       // [B * bps] partial sums of δ²
  int* count_g;      // [B] blocks done with a sample's g² (zeroed before the launch)
  int* count_d;      // [B] blocks done with a sample's δ²
  unsigned* ticket;  // next block's place in the schedule
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
// One launch of D * B * bps blocks (D = 3 phases for the step, 2 for the projection:
// PHASE 0 partial sums of g², 1 partial sums of δ², 2 write). Each block takes the
// next ticket from a counter, and the ticket, not blockIdx, says which phase of which
// chunk it does (locate). Tickets go out in the order blocks start, and a block only
// ever waits for blocks with smaller tickets (a chunk's earlier phases), which have
// started and wait only on smaller ones still: there is no deadlock whatever the GPU
// runs at once. The order is by waves of `group` samples: wave w holds the write phase
// of group w-2, the δ² phase of group w-1 and the g² phase of group w, so a sample's
// chunks are re-read one and two waves after they were first read; the launcher sizes
// a group so that two waves' traffic fits in L2, and a big sample then moves about 4
// tensor-sizes (read x, x_nat, g once; write out) instead of the 8 of three sweeps.
struct Slot {
  int phase;
  int64_t sample;
  int64_t part;
};

// Blocks of all (phase, group) slots in the waves before `wave` (r = 0 is the
// launch's first phase, r = D-1 its write; slot (r, g) is in wave g + r).
__device__ __forceinline__ int64_t blocks_before(const L2Args& p, int phases, int64_t wave) {
  int64_t n = 0;
  for (int r = 0; r < phases; ++r) {
    int64_t groups = wave - r;
    groups = groups < 0 ? 0 : (groups > p.groups ? p.groups : groups);
    const int64_t samples = groups * p.group;
    n += samples < p.batch ? samples : p.batch;
  }
  return n * p.bps;
}

__device__ Slot locate(const L2Args& p, int phases, int first_phase, int64_t ticket) {
  int64_t lo = 0, hi = p.groups + phases - 1;  // the wave: last one with blocks_before <= ticket
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (blocks_before(p, phases, mid) <= ticket) lo = mid; else hi = mid;
  }
  int64_t o = ticket - blocks_before(p, phases, lo);
  for (int r = phases - 1; r >= 0; --r) {  // oldest first: its data has waited longest in L2
    const int64_t g = lo - r;
    if (g < 0 || g >= p.groups) continue;
    const int64_t first = g * p.group;
    const int64_t last = first + p.group < p.batch ? first + p.group : p.batch;
    const int64_t n = (last - first) * p.bps;
    if (o < n) return Slot{first_phase + r, first + o / p.bps, o % p.bps};
    o -= n;
  }
  return Slot{-1, 0, 0};  // not reached: the grid has exactly as many blocks as slots
}

// Waits until all bps blocks of the sample's earlier phase have counted themselves in.
__device__ __forceinline__ void wait_for(int* count, int bps) {
  while (atomicAdd(count, 0) < bps) backoff();
  __threadfence();  // their partial sums are visible from here on
}

// Publishes this block's partial sum of a sample (thread 0).
__device__ __forceinline__ void publish(float* ws, int64_t index, float v, int* count) {
  ws[index] = v;
  __threadfence();
  atomicAdd(count, 1);
}

template <class X, class G, int VEC, bool STEP>
__global__ void __launch_bounds__(kThreads) l2_split_kernel(L2Args p) {
  __shared__ float scratch[kThreads / 32];
  __shared__ float total;
  __shared__ Slot slot;
  if (threadIdx.x == 0) {
    const Slot sl = locate(p, STEP ? 3 : 2, STEP ? 0 : 1, static_cast<int64_t>(atomicAdd(p.ticket, 1u)));
    if (sl.phase == 1 && STEP) wait_for(&p.count_g[sl.sample], p.bps);
    if (sl.phase == 2) wait_for(&p.count_d[sl.sample], p.bps);
    slot = sl;
  }
  __syncthreads();
  const Slot sl = slot;
  const int64_t s = sl.sample;
  const int64_t index = s * p.bps + sl.part;
  const int64_t sample_end = (s + 1) * p.per_sample;
  const int64_t begin = s * p.per_sample + sl.part * p.chunk;
  const int64_t end = begin + p.chunk < sample_end ? begin + p.chunk : sample_end;
  if (sl.phase == 0) {
    const float v = block_sum(partial_sum_g2<X, G, VEC, STEP>(p, begin, end), scratch);
    if (threadIdx.x == 0) publish(p.ws_g, index, v, &p.count_g[s]);
    return;
  }
  const float a = STEP ? per_sample_value(p.alpha_t, p.alpha, s) : 0.f;
  const float gn = STEP ? grad_norm(sum_partials(p.ws_g, s, p.bps, &total)) : 1.f;
  if (sl.phase == 1) {
    const float v = block_sum(partial_sum_d2<X, G, VEC, STEP>(p, begin, end, a, gn), scratch);
    if (threadIdx.x == 0) publish(p.ws_d, index, v, &p.count_d[s]);
    return;
  }
  const float e = per_sample_value(p.eps_t, p.eps, s);
  const float scale = ball_scale(sum_partials(p.ws_d, s, p.bps, &total), e);
  write_out<X, G, VEC, STEP>(p, begin, end, a, gn, scale);
}

// ---------------------------------------------------------------- schedule
constexpr int64_t kChunk = 4096;       // elements a split block aims to cover (16 per thread)
constexpr int64_t kMinChunk = 1024;    // and at least this many
constexpr int64_t kSplitMin = 32768;   // a sample this big is split even if fused ones fit L2
constexpr int kMaxBlocksPerSample = 128;

// Blocks per sample, 1 for the fused schedule. Fused re-reads each sample twice from
// wherever it is: L2 when the samples in flight (one per resident block) fit in half
// of it, else memory (8 tensor-sizes moved instead of 4). So it is taken when they
// fit and either the batch fills the GPU or samples are small; otherwise a sample is
// split into chunks of ~kChunk elements, and into more when the batch is too small to
// give every multiprocessor 4 blocks. Independent of the dtypes, so that the
// workspace size is too.
int blocks_per_sample(int64_t batch, int64_t per_sample) {
  const int64_t by_size = (per_sample + kChunk - 1) / kChunk;
  if (by_size < 2) return 1;
  const DeviceInfo& dev = device_info();
  const int64_t resident = static_cast<int64_t>(dev.sms) * (2048 / kThreads);
  const int64_t in_flight = batch < resident ? batch : resident;
  const bool fits = dev.l2_bytes <= 0 || in_flight * per_sample * 12 <= dev.l2_bytes / 2;
  if (fits && (batch >= 4 * dev.sms || per_sample < kSplitMin)) return 1;
  const int64_t to_fill = (4 * dev.sms + batch - 1) / batch;
  const int64_t most = (per_sample + kMinChunk - 1) / kMinChunk;
  int64_t bps = by_size > to_fill ? by_size : to_fill;
  if (bps > most) bps = most;
  if (bps > kMaxBlocksPerSample) bps = kMaxBlocksPerSample;
  return static_cast<int>(bps);
}

// Samples per wave: two waves' traffic (each reads x, x_nat, g and writes out once per
// element of its group) in half of L2; the whole batch if L2's size is unknown.
int64_t samples_per_group(int64_t batch, int64_t per_sample, int64_t x_bytes, int64_t g_bytes) {
  const int64_t l2 = device_info().l2_bytes;
  if (l2 <= 0) return batch;
  const int64_t wave_bytes = per_sample * (3 * x_bytes + g_bytes);
  int64_t group = (l2 / 2) / (2 * wave_bytes);
  if (group < 1) group = 1;
  return group < batch ? group : batch;
}

size_t split_workspace_bytes(int64_t batch, int bps) {
  // partial sums of g² and δ² [B*bps] each, then counters: g² and δ² done [B] each, the ticket
  return static_cast<size_t>(2 * batch * bps) * sizeof(float) + static_cast<size_t>(2 * batch + 1) * sizeof(int);
}

template <class X, class G, int VEC, bool STEP>
cudaError_t launch_schedule(L2Args p, cudaStream_t stream) {
  if (p.bps == 1) {
    l2_fused_kernel<X, G, VEC, STEP><<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  int64_t chunk = (p.per_sample + p.bps - 1) / p.bps;
  p.chunk = (chunk + VEC - 1) / VEC * VEC;
  const int64_t blocks = (STEP ? 3 : 2) * p.batch * p.bps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  // The counters start at 0 every call (stream-ordered, and legal in graph capture).
  const cudaError_t err = cudaMemsetAsync(p.count_g, 0, static_cast<size_t>(2 * p.batch + 1) * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  l2_split_kernel<X, G, VEC, STEP><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class X, class G, bool STEP>
cudaError_t launch_l2(L2Args p, int64_t numel, float* workspace, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(X);
  p.batch = numel / p.per_sample;
  p.bps = blocks_per_sample(p.batch, p.per_sample);
  if (p.bps > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    p.ws_g = workspace;
    p.ws_d = workspace + p.batch * p.bps;
    p.count_g = reinterpret_cast<int*>(workspace + 2 * p.batch * p.bps);
    p.count_d = p.count_g + p.batch;
    p.ticket = reinterpret_cast<unsigned*>(p.count_d + p.batch);
    p.group = samples_per_group(p.batch, p.per_sample, sizeof(X), STEP ? sizeof(G) : 0);
    p.groups = (p.batch + p.group - 1) / p.group;
  }
  const bool vec_ok = p.per_sample % VEC == 0 && aligned_to(p.out, sizeof(X) * VEC) &&
                      aligned_to(p.x, sizeof(X) * VEC) && aligned_to(p.x_nat, sizeof(X) * VEC) &&
                      (!STEP || aligned_to(p.grad, sizeof(G) * VEC));
  if (vec_ok) return launch_schedule<X, G, VEC, STEP>(p, stream);
  return launch_schedule<X, G, 1, STEP>(p, stream);
}

}  // namespace
}  // namespace fastadv_dev

using namespace fastadv_dev;

extern "C" size_t fastadv_l2_workspace_bytes(int64_t numel, int64_t per_sample) {
  if (numel <= 0 || per_sample < 1) return 0;
  const int64_t batch = numel / per_sample;
  const int bps = blocks_per_sample(batch, per_sample);
  return bps > 1 ? split_workspace_bytes(batch, bps) : 0;
}

extern "C" fastadv_l2_schedule fastadv_l2_schedule_for(int64_t numel, int64_t per_sample,
                                                       fastadv_dtype x_dtype, fastadv_dtype grad_dtype,
                                                       int step) {
  fastadv_l2_schedule s{0, 0, 0, 0};
  if (numel <= 0 || per_sample < 1 || numel % per_sample != 0) return s;
  const int64_t batch = numel / per_sample;
  const int64_t xb = x_dtype == FASTADV_FLOAT32 ? 4 : 2, gb = grad_dtype == FASTADV_FLOAT32 ? 4 : 2;
  s.blocks_per_sample = blocks_per_sample(batch, per_sample);
  if (s.blocks_per_sample == 1) {
    s.samples_per_group = batch;
    s.blocks = batch;
  } else {
    s.samples_per_group = samples_per_group(batch, per_sample, xb, step ? gb : 0);
    s.blocks = (step ? 3 : 2) * batch * s.blocks_per_sample;
  }
  s.workspace_bytes = static_cast<int64_t>(fastadv_l2_workspace_bytes(numel, per_sample));
  return s;
}

extern "C" cudaError_t fastadv_l2_step_launch(const fastadv_step_params* p, float* workspace,
                                              cudaStream_t stream) {
  if (p == nullptr || p->numel < 0 || p->per_sample < 1 || p->numel % p->per_sample != 0)
    return cudaErrorInvalidValue;
  if (p->numel == 0) return cudaSuccess;
  L2Args a{};
  a.out = p->out;
  a.x = p->x_adv;
  a.x_nat = p->x_nat;
  a.grad = p->grad;
  a.per_sample = p->per_sample;
  a.bps = 1;
  a.alpha_t = p->alpha_t;
  a.alpha = p->alpha;
  a.eps_t = p->eps_t;
  a.eps = p->eps;
  a.lower = p->lower;
  a.upper = p->upper;
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
  L2Args a{};
  a.out = p->out;
  a.x = p->x;
  a.x_nat = p->x_nat;
  a.per_sample = p->per_sample;
  a.bps = 1;
  a.eps_t = p->eps_t;
  a.eps = p->eps;
  a.lower = p->lower;
  a.upper = p->upper;
  return dispatch_dtype(p->x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    return launch_l2<X, X, false>(a, p->numel, workspace, stream);
  });
}
