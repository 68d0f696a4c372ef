// The CPU kernels, once per instruction-set variant.
//
// No include guard on purpose: cpu_kernels.cpp includes this file once for each
// variant, with FASTADV_ISA_NS naming the namespace and, for the AVX2 variant, a
// target pragma around it. All headers are included by cpu_kernels.cpp before.
//
// The loops are written for GCC's vectoriser: straight-line bodies, selects
// instead of branches, float lanes for sums. float data is used in place; 16-bit
// data goes through float buffers of kChunk elements on the stack (simple
// conversion loops vectorise; mixed ones do not). `out` may be `x` (in place) or
// even `x_nat`: every element is read before it is written, at the same index,
// which the compiler's run-time alias checks accept (they only reject partial
// overlap), and a staged chunk is read completely before any of it is written.

namespace fastadv {
namespace cpu {
namespace FASTADV_ISA_NS {

constexpr int64_t kChunk = 512;    // elements per staged chunk
constexpr int64_t kGrain = 16384;  // elements per at::parallel_for task, at least
constexpr int kLanes = 16;         // float partial sums kept per reduction
constexpr float kGradNormFloor = 1e-12f;  // fastadv.ops.reference.GRAD_NORM_FLOOR

#if FASTADV_ISA_F16C
// float16 through vcvtph2ps / vcvtps2ph (round to nearest even), 8 at a time.
inline void load_halves(float* __restrict dst, const Half* src, int64_t m) {
  int64_t k = 0;
  for (; k + 8 <= m; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(h));
  }
  for (; k < m; ++k) dst[k] = Storage<Half>::load(src[k]);
}

inline void store_halves(Half* dst, const float* __restrict src, int64_t m) {
  int64_t k = 0;
  for (; k + 8 <= m; k += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), h);
  }
  for (; k < m; ++k) dst[k] = Storage<Half>::store(src[k]);
}
#endif

// The chunk [src, src + m) as floats: src itself for float, else converted into buf.
template <class T>
inline const float* floats_of(const T* src, int64_t m, float* __restrict buf) {
  if constexpr (std::is_same<T, float>::value) {
    return src;
  } else {
#if FASTADV_ISA_F16C
    if constexpr (std::is_same<T, Half>::value) {
      load_halves(buf, src, m);
      return buf;
    }
#endif
    for (int64_t k = 0; k < m; ++k) buf[k] = Storage<T>::load(src[k]);
    return buf;
  }
}

// Where to write a chunk's float results: dst itself for float, else buf...
template <class T>
inline float* float_dest(T* dst, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    return dst;
  } else {
    return buf;
  }
}

// ...and, for 16-bit types, the rounding of buf into dst.
template <class T>
inline void store_floats(T* dst, const float* __restrict buf, int64_t m) {
  if constexpr (!std::is_same<T, float>::value) {
#if FASTADV_ISA_F16C
    if constexpr (std::is_same<T, Half>::value) {
      store_halves(dst, buf, m);
      return;
    }
#endif
    for (int64_t k = 0; k < m; ++k) dst[k] = Storage<T>::store(buf[k]);
  }
}

// max/min propagating a NaN of either operand, as torch.maximum/minimum and torch.clamp
// with tensor bounds do (a NaN in x_nat makes its ball bounds NaN, and the output NaN).
inline float max_keep_nan(float a, float b) { return (a < b || b != b) ? b : a; }
inline float min_keep_nan(float a, float b) { return (a > b || b != b) ? b : a; }

// sign with sign(0) = sign(NaN) = 0.
inline float finite_sign(float g) {
  return static_cast<float>(g > 0.f) - static_cast<float>(g < 0.f);
}

// Non-finite gradient entries count as 0 (l2_step).
inline float finite_or_zero(float g) {
  return float_of(select_bits((bits_of(g) & 0x7f800000u) == 0x7f800000u, 0u, bits_of(g)));
}

// ------------------------------------------------------------------ L∞ ops
template <class X, class G, bool STEP>
void linf_segment(X* out, const X* x, const X* xn, const G* g, int64_t n, float a, float e,
                  float lo, float hi) {
  alignas(64) float bx[kChunk];
  alignas(64) float bn[kChunk];
  alignas(64) float bg[kChunk];
  alignas(64) float bo[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    const float* px = floats_of(x + c, m, bx);
    const float* pn = floats_of(xn + c, m, bn);
    const float* pg = STEP ? floats_of(g + c, m, bg) : nullptr;
    float* po = float_dest(out + c, bo);
    for (int64_t k = 0; k < m; ++k) {
      float v = px[k];
      if (STEP) v = v + a * finite_sign(pg[k]);
      v = min_keep_nan(max_keep_nan(v, pn[k] - e), pn[k] + e);
      po[k] = min_keep_nan(max_keep_nan(v, lo), hi);
    }
    store_floats(out + c, po, m);
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
inline float delta_of(float x, float xn, float g, float a, float gn) {
  const float moved = STEP ? x + a * (g / gn) : x;
  return moved - xn;
}

// Sum of f(k)^2 over a chunk: kLanes float partial sums (vectorised), totalled in double.
template <class F>
inline double chunk_sum_squares(int64_t m, F&& f) {
  float lanes[kLanes] = {0.f};
  int64_t k = 0;
  for (; k + kLanes <= m; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = f(k + j);
      lanes[j] += v * v;
    }
  }
  double total = 0.0;
  for (; k < m; ++k) {
    const float v = f(k);
    total += static_cast<double>(v) * v;
  }
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

template <class G>
double sum_g2(const G* g, int64_t n) {
  alignas(64) float bg[kChunk];
  double total = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    const float* pg = floats_of(g + c, m, bg);
    total += chunk_sum_squares(m, [pg](int64_t k) { return finite_or_zero(pg[k]); });
  }
  return total;
}

template <class X, class G, bool STEP>
double sum_d2(const X* x, const X* xn, const G* g, int64_t n, float a, float gn) {
  alignas(64) float bx[kChunk];
  alignas(64) float bn[kChunk];
  alignas(64) float bg[kChunk];
  double total = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    const float* px = floats_of(x + c, m, bx);
    const float* pn = floats_of(xn + c, m, bn);
    const float* pg = STEP ? floats_of(g + c, m, bg) : nullptr;
    total += chunk_sum_squares(m, [=](int64_t k) {
      return delta_of<STEP>(px[k], pn[k], STEP ? finite_or_zero(pg[k]) : 0.f, a, gn);
    });
  }
  return total;
}

template <class X, class G, bool STEP>
void l2_write(X* out, const X* x, const X* xn, const G* g, int64_t n, float a, float gn,
              float scale, float lo, float hi) {
  alignas(64) float bx[kChunk];
  alignas(64) float bn[kChunk];
  alignas(64) float bg[kChunk];
  alignas(64) float bo[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    const float* px = floats_of(x + c, m, bx);
    const float* pn = floats_of(xn + c, m, bn);
    const float* pg = STEP ? floats_of(g + c, m, bg) : nullptr;
    float* po = float_dest(out + c, bo);
    for (int64_t k = 0; k < m; ++k) {
      const float d = delta_of<STEP>(px[k], pn[k], STEP ? finite_or_zero(pg[k]) : 0.f, a, gn);
      po[k] = min_keep_nan(max_keep_nan(pn[k] + d * scale, lo), hi);
    }
    store_floats(out + c, po, m);
  }
}

// The norm of a sum of squares that is totalled in double but stands for the reference's
// float32 sum: one beyond float32's range is inf there (|g| ~ 1e19 and up), so it is here.
// Otherwise a gradient moved or not depending on which of a chunk's lanes held its entry.
inline float norm_of(double sum_sq) {
  if (std::isinf(static_cast<float>(sum_sq))) return std::numeric_limits<float>::infinity();
  return static_cast<float>(std::sqrt(sum_sq));
}

inline float grad_norm(double sum_g2) {
  return std::max(norm_of(sum_g2), kGradNormFloor);
}

// min(1, eps/||δ||), and 1 where ||δ|| <= eps (so eps = ||δ|| = 0 gives 1, not NaN).
inline float ball_scale(double sum_d2, float e) {
  const float n = norm_of(sum_d2);
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
