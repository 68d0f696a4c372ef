// linf_step and linf_project: one elementwise pass, 16-byte accesses where aligned.
#include "fastadv_kernels.cuh"

namespace fastadv_dev {
namespace {

struct LinfArgs {
  void* out;
  const void* x;
  const void* x_nat;
  const void* grad;  // unused when !STEP
  int64_t numel;
  int64_t per_sample;
  const float* alpha_t;
  float alpha;
  const float* eps_t;
  float eps;
  float lower;
  float upper;
};

// VEC elements per access; per-sample values are looked up once per access (an
// access spans at most two samples when per_sample >= VEC).
template <class X, class G, int VEC, bool STEP>
__global__ void __launch_bounds__(kThreads) linf_kernel(LinfArgs p) {
  X* out = static_cast<X*>(p.out);
  const X* x = static_cast<const X*>(p.x);
  const X* xn = static_cast<const X*>(p.x_nat);
  const G* g = static_cast<const G*>(p.grad);
  const bool per = p.alpha_t != nullptr || p.eps_t != nullptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nvec = p.numel / VEC;

  for (int64_t v = first; v < nvec; v += stride) {
    const int64_t i0 = v * VEC;
    const Pack<X, VEC> px = reinterpret_cast<const Pack<X, VEC>*>(x)[v];
    const Pack<X, VEC> pn = reinterpret_cast<const Pack<X, VEC>*>(xn)[v];
    Pack<G, VEC> pg;
    if (STEP) pg = reinterpret_cast<const Pack<G, VEC>*>(g)[v];
    float a0 = p.alpha, e0 = p.eps, a1 = p.alpha, e1 = p.eps;
    int split = VEC;  // elements j >= split belong to the next sample
    if (per && p.per_sample >= VEC) {
      const int64_t s = i0 / p.per_sample;
      a0 = per_sample_value(p.alpha_t, p.alpha, s);
      e0 = per_sample_value(p.eps_t, p.eps, s);
      const int64_t left = (s + 1) * p.per_sample - i0;
      if (left < VEC) {
        split = static_cast<int>(left);
        a1 = per_sample_value(p.alpha_t, p.alpha, s + 1);
        e1 = per_sample_value(p.eps_t, p.eps, s + 1);
      }
    }
    Pack<X, VEC> po;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float a = j < split ? a0 : a1, e = j < split ? e0 : e1;
      if (per && p.per_sample < VEC) {  // tiny samples: several per access
        const int64_t s = (i0 + j) / p.per_sample;
        a = per_sample_value(p.alpha_t, p.alpha, s);
        e = per_sample_value(p.eps_t, p.eps, s);
      }
      const float gv = STEP ? Cvt<G>::load(pg.v[j]) : 0.f;
      po.v[j] = Cvt<X>::store(linf_element<STEP>(Cvt<X>::load(px.v[j]), Cvt<X>::load(pn.v[j]), gv,
                                                 a, e, p.lower, p.upper));
    }
    reinterpret_cast<Pack<X, VEC>*>(out)[v] = po;
  }

  // The last numel % VEC elements, one at a time.
  for (int64_t i = nvec * VEC + first; i < p.numel; i += stride) {
    const int64_t s = per ? i / p.per_sample : 0;
    const float a = per_sample_value(p.alpha_t, p.alpha, s);
    const float e = per_sample_value(p.eps_t, p.eps, s);
    const float gv = STEP ? Cvt<G>::load(g[i]) : 0.f;
    out[i] = Cvt<X>::store(
        linf_element<STEP>(Cvt<X>::load(x[i]), Cvt<X>::load(xn[i]), gv, a, e, p.lower, p.upper));
  }
}

template <class X, class G, bool STEP>
cudaError_t launch_linf(const LinfArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(X);
  const bool vec_ok = aligned_to(a.out, sizeof(X) * VEC) && aligned_to(a.x, sizeof(X) * VEC) &&
                      aligned_to(a.x_nat, sizeof(X) * VEC) &&
                      (!STEP || aligned_to(a.grad, sizeof(G) * VEC));
  const int vec = vec_ok ? VEC : 1;
  const int64_t work = a.numel / vec + a.numel % vec;  // accesses to make
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * (2048 / kThreads) * 4;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  if (vec_ok) {
    linf_kernel<X, G, VEC, STEP><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    linf_kernel<X, G, 1, STEP><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace fastadv_dev

using namespace fastadv_dev;

extern "C" cudaError_t fastadv_linf_step_launch(const fastadv_step_params* p, cudaStream_t stream) {
  if (p == nullptr || p->numel < 0 || p->per_sample < 1) return cudaErrorInvalidValue;
  if (p->numel == 0) return cudaSuccess;
  const LinfArgs a{p->out, p->x_adv, p->x_nat, p->grad, p->numel, p->per_sample, p->alpha_t,
                   p->alpha, p->eps_t, p->eps, p->lower, p->upper};
  return dispatch_dtype(p->x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    return dispatch_dtype(p->grad_dtype, [&](auto gt) {
      using G = typename decltype(gt)::type;
      return launch_linf<X, G, true>(a, stream);
    });
  });
}

extern "C" cudaError_t fastadv_linf_project_launch(const fastadv_project_params* p,
                                                   cudaStream_t stream) {
  if (p == nullptr || p->numel < 0 || p->per_sample < 1) return cudaErrorInvalidValue;
  if (p->numel == 0) return cudaSuccess;
  const LinfArgs a{p->out, p->x, p->x_nat, nullptr, p->numel, p->per_sample, nullptr,
                   0.f, p->eps_t, p->eps, p->lower, p->upper};
  return dispatch_dtype(p->x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    return launch_linf<X, X, false>(a, stream);
  });
}
