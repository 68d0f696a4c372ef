// The CPU kernels, once per instruction-set variant.
//
// No include guard on purpose: cpu_kernels.cpp includes this file once for each
// variant, with FASTADV_ISA_NS naming the namespace and, for the AVX2 variant, a
// target pragma around it. All headers are included by cpu_kernels.cpp before.
//
// Every loop stages kChunk elements through float buffers on the stack: loads
// convert to float, the arithmetic runs on the buffers (no aliasing, so the
// compiler vectorises it), stores round back. That also makes `out` aliasing an
// input harmless: a chunk is read completely before any of it is written.

namespace fastadv {
namespace cpu {
namespace FASTADV_ISA_NS {

constexpr int64_t kChunk = 256;    // elements per staged chunk
constexpr int64_t kGrain = 16384;  // elements per at::parallel_for task, at least
constexpr float kGradNormFloor = 1e-12f;  // fastadv.ops.reference.GRAD_NORM_FLOOR

template <class T>
inline void load_chunk(float* __restrict dst, const T* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = Storage<T>::load(src[k]);
}

template <class T>
inline void store_chunk(T* dst, const float* __restrict src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = Storage<T>::store(src[k]);
}

// max/min keeping a NaN of `a` (the value clamped), as torch.clamp/maximum do.
inline float max_keep_nan(float a, float b) { return a < b ? b : a; }
inline float min_keep_nan(float a, float b) { return a > b ? b : a; }

// sign with sign(0) = sign(NaN) = 0.
inline float finite_sign(float g) {
  return static_cast<float>(g > 0.f) - static_cast<float>(g < 0.f);
}

// Non-finite gradient entries count as 0 (l2_step).
inline void zero_non_finite(float* __restrict v, int64_t n) {
  for (int64_t k = 0; k < n; ++k) v[k] = (bits_of(v[k]) & 0x7f800000u) == 0x7f800000u ? 0.f : v[k];
}

// Sum of squares of a chunk: float lanes (vectorised), totalled in double.
inline double sum_squares(const float* __restrict v, int64_t n) {
  constexpr int L = 16;
  float lanes[L] = {0.f};
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    for (int j = 0; j < L; ++j) lanes[j] += v[k + j] * v[k + j];
  }
  double s = 0.0;
  for (; k < n; ++k) s += static_cast<double>(v[k]) * v[k];
  for (int j = 0; j < L; ++j) s += lanes[j];
  return s;
}

// ------------------------------------------------------------------ L∞ ops
template <class X, class G, bool STEP>
void linf_segment(X* out, const X* x, const X* xn, const G* g, int64_t n, float a, float e,
                  float lo, float hi) {
  alignas(64) float bx[kChunk];
  alignas(64) float bn[kChunk];
  alignas(64) float bg[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    load_chunk(bx, x + c, m);
    load_chunk(bn, xn + c, m);
    if (STEP) load_chunk(bg, g + c, m);
    for (int64_t k = 0; k < m; ++k) {
      float v = bx[k];
      if (STEP) v = v + a * finite_sign(bg[k]);
      v = min_keep_nan(max_keep_nan(v, bn[k] - e), bn[k] + e);
      bx[k] = min_keep_nan(max_keep_nan(v, lo), hi);
    }
    store_chunk(out + c, bx, m);
  }
}

template <class X, class G, bool STEP>
void linf_run(X* out, const X* x, const X* xn, const G* g, int64_t numel, int64_t per_sample,
              PerSample alpha, PerSample eps, float lo, float hi) {
  const bool per = alpha.t != nullptr || eps.t != nullptr;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      // alpha/eps are constant over a segment: the rest of a sample, or all of it.
      const int64_t s = per ? i / per_sample : 0;
      const int64_t stop = per ? std::min(end, (s + 1) * per_sample) : end;
      linf_segment<X, G, STEP>(out + i, x + i, xn + i, STEP ? g + i : nullptr, stop - i,
                               STEP ? alpha.at(s) : 0.f, eps.at(s), lo, hi);
      i = stop;
    }
  });
}

// ------------------------------------------------------------------- L2 ops
// δ = (x + a*(g/gn)) - x_nat in the reference's order of rounding (no contraction:
// the build passes -ffp-contract=off).
template <bool STEP>
inline void delta_chunk(float* __restrict d, const float* __restrict x, const float* __restrict xn,
                        const float* __restrict g, int64_t m, float a, float gn) {
  for (int64_t k = 0; k < m; ++k) {
    const float moved = STEP ? x[k] + a * (g[k] / gn) : x[k];
    d[k] = moved - xn[k];
  }
}

template <class G>
double sum_g2(const G* g, int64_t n) {
  alignas(64) float bg[kChunk];
  double s = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    load_chunk(bg, g + c, m);
    zero_non_finite(bg, m);
    s += sum_squares(bg, m);
  }
  return s;
}

template <class X, class G, bool STEP>
double sum_d2(const X* x, const X* xn, const G* g, int64_t n, float a, float gn) {
  alignas(64) float bx[kChunk];
  alignas(64) float bn[kChunk];
  alignas(64) float bg[kChunk];
  alignas(64) float bd[kChunk];
  double s = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    load_chunk(bx, x + c, m);
    load_chunk(bn, xn + c, m);
    if (STEP) {
      load_chunk(bg, g + c, m);
      zero_non_finite(bg, m);
    }
    delta_chunk<STEP>(bd, bx, bn, bg, m, a, gn);
    s += sum_squares(bd, m);
  }
  return s;
}

template <class X, class G, bool STEP>
void l2_write(X* out, const X* x, const X* xn, const G* g, int64_t n, float a, float gn,
              float scale, float lo, float hi) {
  alignas(64) float bx[kChunk];
  alignas(64) float bn[kChunk];
  alignas(64) float bg[kChunk];
  alignas(64) float bd[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    load_chunk(bx, x + c, m);
    load_chunk(bn, xn + c, m);
    if (STEP) {
      load_chunk(bg, g + c, m);
      zero_non_finite(bg, m);
    }
    delta_chunk<STEP>(bd, bx, bn, bg, m, a, gn);
    for (int64_t k = 0; k < m; ++k) {
      const float v = bn[k] + bd[k] * scale;
      bd[k] = min_keep_nan(max_keep_nan(v, lo), hi);
    }
    store_chunk(out + c, bd, m);
  }
}

inline float grad_norm(double sum_g2) {
  return std::max(static_cast<float>(std::sqrt(sum_g2)), kGradNormFloor);
}

// min(1, eps/||δ||), and 1 where ||δ|| <= eps (so eps = ||δ|| = 0 gives 1, not NaN).
inline float ball_scale(double sum_d2, float e) {
  const float n = static_cast<float>(std::sqrt(sum_d2));
  return n > e ? e / n : 1.f;
}

// Samples are split into `tiles` pieces only when they are few and big, so that
// every thread has work; the split depends on the shape alone, so results do not
// depend on the number of threads.
inline int64_t l2_tiles(int64_t batch, int64_t per_sample) {
  if (batch >= 16 || per_sample < 4 * kGrain) return 1;
  const int64_t by_size = (per_sample + kGrain - 1) / kGrain;
  const int64_t by_batch = (16 + batch - 1) / batch;
  return std::min(by_size, by_batch);
}

template <class X, class G, bool STEP>
void l2_run(X* out, const X* x, const X* xn, const G* g, int64_t numel, int64_t per_sample,
            PerSample alpha, PerSample eps, float lo, float hi) {
  const int64_t batch = numel / per_sample;
  const int64_t tiles = l2_tiles(batch, per_sample);
  if (tiles == 1) {
    // One task per sample: the three passes re-read it from cache.
    const int64_t grain = std::max<int64_t>(1, kGrain / per_sample);
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t o = s * per_sample;
        const G* gs = STEP ? g + o : nullptr;
        const float a = STEP ? alpha.at(s) : 0.f;
        const float gn = STEP ? grad_norm(sum_g2(gs, per_sample)) : 1.f;
        const float scale = ball_scale(sum_d2<X, G, STEP>(x + o, xn + o, gs, per_sample, a, gn),
                                       eps.at(s));
        l2_write<X, G, STEP>(out + o, x + o, xn + o, gs, per_sample, a, gn, scale, lo, hi);
      }
    });
    return;
  }
  // Few big samples: each pass runs over (sample, tile) items in parallel.
  const int64_t tile_len = (per_sample + tiles - 1) / tiles;
  const int64_t items = batch * tiles;
  std::vector<double> part(static_cast<size_t>(items));
  std::vector<float> gn(static_cast<size_t>(batch), 1.f), scale(static_cast<size_t>(batch));
  auto for_items = [&](auto&& body) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t s = it / tiles, t = it % tiles;
        const int64_t lo_i = std::min(t * tile_len, per_sample);
        const int64_t hi_i = std::min(lo_i + tile_len, per_sample);
        body(it, s, s * per_sample + lo_i, hi_i - lo_i);
      }
    });
  };
  auto per_sample_sum = [&](int64_t s) {
    double v = 0.0;
    for (int64_t t = 0; t < tiles; ++t) v += part[static_cast<size_t>(s * tiles + t)];
    return v;
  };
  if (STEP) {
    for_items([&](int64_t it, int64_t, int64_t o, int64_t n) {
      part[static_cast<size_t>(it)] = sum_g2(g + o, n);
    });
    for (int64_t s = 0; s < batch; ++s) gn[static_cast<size_t>(s)] = grad_norm(per_sample_sum(s));
  }
  for_items([&](int64_t it, int64_t s, int64_t o, int64_t n) {
    part[static_cast<size_t>(it)] = sum_d2<X, G, STEP>(
        x + o, xn + o, STEP ? g + o : nullptr, n, STEP ? alpha.at(s) : 0.f, gn[static_cast<size_t>(s)]);
  });
  for (int64_t s = 0; s < batch; ++s) scale[static_cast<size_t>(s)] = ball_scale(per_sample_sum(s), eps.at(s));
  for_items([&](int64_t, int64_t s, int64_t o, int64_t n) {
    l2_write<X, G, STEP>(out + o, x + o, xn + o, STEP ? g + o : nullptr, n,
                         STEP ? alpha.at(s) : 0.f, gn[static_cast<size_t>(s)],
                         scale[static_cast<size_t>(s)], lo, hi);
  });
}

// ------------------------------------------------------------- entry points
void linf_step(const StepArgs& a) {
  dispatch_dtype(a.x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    dispatch_dtype(a.grad_dtype, [&](auto gt) {
      using G = typename decltype(gt)::type;
      linf_run<X, G, true>(static_cast<X*>(a.out), static_cast<const X*>(a.x_adv),
                           static_cast<const X*>(a.x_nat), static_cast<const G*>(a.grad), a.numel,
                           a.per_sample, a.alpha, a.eps, a.lower, a.upper);
    });
  });
}

void l2_step(const StepArgs& a) {
  dispatch_dtype(a.x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    dispatch_dtype(a.grad_dtype, [&](auto gt) {
      using G = typename decltype(gt)::type;
      l2_run<X, G, true>(static_cast<X*>(a.out), static_cast<const X*>(a.x_adv),
                         static_cast<const X*>(a.x_nat), static_cast<const G*>(a.grad), a.numel,
                         a.per_sample, a.alpha, a.eps, a.lower, a.upper);
    });
  });
}

void linf_project(const ProjectArgs& a) {
  dispatch_dtype(a.x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    linf_run<X, X, false>(static_cast<X*>(a.out), static_cast<const X*>(a.x),
                          static_cast<const X*>(a.x_nat), nullptr, a.numel, a.per_sample,
                          PerSample{nullptr, 0.f}, a.eps, a.lower, a.upper);
  });
}

void l2_project(const ProjectArgs& a) {
  dispatch_dtype(a.x_dtype, [&](auto xt) {
    using X = typename decltype(xt)::type;
    l2_run<X, X, false>(static_cast<X*>(a.out), static_cast<const X*>(a.x),
                        static_cast<const X*>(a.x_nat), nullptr, a.numel, a.per_sample,
                        PerSample{nullptr, 0.f}, a.eps, a.lower, a.upper);
  });
}

}  // namespace FASTADV_ISA_NS
}  // namespace cpu
}  // namespace fastadv
