// Vectorised, multi-threaded CPU kernels of the fused attack ops.
//
// The loops are plain C++ that the compiler vectorises (-O3); at::parallel_for
// spreads them over torch's intra-op threads. On x86-64 with GCC the kernels are
// compiled twice, for the baseline instruction set and for AVX2+FMA+F16C, and the
// best one the CPU supports is picked at run time: one binary is portable and fast.
// FASTADV_CPU_ISA=baseline|avx2 overrides the choice (for testing both).
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTADV_HAVE_AVX2_VARIANT 1
#include <immintrin.h>
#else
#define FASTADV_HAVE_AVX2_VARIANT 0
#endif

namespace fastadv {
namespace cpu {
namespace {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Storage types of the 16-bit formats (only their bits matter here).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Picks a where cond, else b, without a branch. The explicit mask (rather than
// ?:) matters: GCC does not speculate the float arithmetic of a ?: arm (it might
// trap), so loops with such selects would stay scalar.
inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  return (a & m) | (b & ~m);
}

// Conversions to and from float, written branch-free so that loops over them
// vectorise; stores round to nearest even, as torch's .to(dtype) does.
template <class T> struct Storage;

template <> struct Storage<float> {
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

template <> struct Storage<BFloat16> {
  static float load(BFloat16 v) { return float_of(static_cast<uint32_t>(v.bits) << 16); }
  static BFloat16 store(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return BFloat16{static_cast<uint16_t>(select_bits(nan, 0x7fc0u, rounded))};
  }
};

template <> struct Storage<Half> {
  static float load(Half v) {
    const uint32_t h = v.bits;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;  // exponent and mantissa
    const uint32_t normal = (em << 13) + (112u << 23);  // exponent bias 15 -> 127
    const uint32_t inf_nan = (em << 13) | 0x7f800000u;
    // Subnormal halves are mantissa * 2^-24: exact through an int conversion.
    const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
    uint32_t r = select_bits(em >= 0x7c00u, inf_nan, normal);
    r = select_bits(em < 0x0400u, subnormal, r);
    return float_of(r | sign);
  }
  static Half store(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    // Normal halves: drop 13 mantissa bits rounding to nearest even, rebias the
    // exponent; anything that rounds past the largest half becomes infinity.
    const uint32_t normal = std::min((a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13, 0x7c00u);
    // Below 2^-14: adding 0.5 (whose ulp is 2^-24) rounds |f| to a multiple of
    // 2^-24 in the FPU; the low bits are then the subnormal's mantissa.
    const uint32_t subnormal = bits_of(float_of(a) + 0.5f) - bits_of(0.5f);
    uint32_t r = select_bits(a < 0x38800000u, subnormal, normal);
    r = select_bits(a > 0x7f800000u, 0x7e00u, r);  // NaN stays NaN (quiet)
    return Half{static_cast<uint16_t>(r | sign)};
  }
};

template <class T> struct Tag {
  using type = T;
};

template <class F> void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: f(Tag<float>{}); return;
    case DType::Float16: f(Tag<Half>{}); return;
    case DType::BFloat16: f(Tag<BFloat16>{}); return;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastadv

#define FASTADV_ISA_NS baseline
#define FASTADV_ISA_F16C 0
#include "cpu_kernels_impl.h"
#undef FASTADV_ISA_F16C
#undef FASTADV_ISA_NS

#if FASTADV_HAVE_AVX2_VARIANT
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTADV_ISA_NS avx2
#define FASTADV_ISA_F16C 1  // half <-> float by the F16C instructions
#include "cpu_kernels_impl.h"
#undef FASTADV_ISA_F16C
#undef FASTADV_ISA_NS
#pragma GCC pop_options
#endif

namespace fastadv {
namespace cpu {
namespace {

enum class Isa : int { Baseline = 0, Avx2 = 1 };

bool cpu_supports_avx2() {
#if FASTADV_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

int isa_from_name(const std::string& name) {
  if (name == "baseline") return static_cast<int>(Isa::Baseline);
  if (name == "avx2" && cpu_supports_avx2()) return static_cast<int>(Isa::Avx2);
  return -1;
}

int best_isa() {
  static const int best = [] {
    const char* env = std::getenv("FASTADV_CPU_ISA");
    if (env != nullptr && *env != '\0') {
      const int forced = isa_from_name(env);
      if (forced >= 0) return forced;
    }
    return static_cast<int>(cpu_supports_avx2() ? Isa::Avx2 : Isa::Baseline);
  }();
  return best;
}

std::atomic<int> chosen{-1};  // set_isa's choice; -1: best_isa()

Isa current() {
  const int c = chosen.load(std::memory_order_relaxed);
  return static_cast<Isa>(c >= 0 ? c : best_isa());
}

}  // namespace

#if FASTADV_HAVE_AVX2_VARIANT
#define FASTADV_BY_ISA(fn, args)                      \
  do {                                                \
    if (current() == Isa::Avx2) return avx2::fn(args); \
    return baseline::fn(args);                        \
  } while (0)
#else
#define FASTADV_BY_ISA(fn, args) return baseline::fn(args)
#endif

void linf_step(const StepArgs& a) { FASTADV_BY_ISA(linf_step, a); }
void l2_step(const StepArgs& a) { FASTADV_BY_ISA(l2_step, a); }
void linf_project(const ProjectArgs& a) { FASTADV_BY_ISA(linf_project, a); }
void l2_project(const ProjectArgs& a) { FASTADV_BY_ISA(l2_project, a); }

std::string isa() { return current() == Isa::Avx2 ? "avx2" : "baseline"; }

bool set_isa(const std::string& name) {
  if (name.empty()) {
    chosen.store(-1);
    return true;
  }
  const int v = isa_from_name(name);
  if (v < 0) return false;
  chosen.store(v);
  return true;
}

std::string compiled_isas() { return FASTADV_HAVE_AVX2_VARIANT ? "baseline,avx2" : "baseline"; }

}  // namespace cpu
}  // namespace fastadv
