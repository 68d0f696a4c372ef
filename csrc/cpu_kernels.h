// CPU kernels of the fused attack ops, on raw pointers (see cpu_kernels.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace fastadv {
namespace cpu {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// alpha or eps: a per-sample float32 array [B], or one value when `t` is null.
struct PerSample {
  const float* t;
  float v;
  float at(int64_t sample) const { return t != nullptr ? t[sample] : v; }
};

// linf_step / l2_step. `out` may be `x_adv` (in place); x_nat may alias them too.
struct StepArgs {
  void* out;
  const void* x_adv;
  const void* x_nat;
  const void* grad;
  DType x_dtype;      // out, x_adv, x_nat
  DType grad_dtype;
  int64_t numel;
  int64_t per_sample; // numel / B, >= 1
  PerSample alpha;
  PerSample eps;
  float lower;
  float upper;
};

// linf_project / l2_project.
struct ProjectArgs {
  void* out;
  const void* x;
  const void* x_nat;
  DType x_dtype;
  int64_t numel;
  int64_t per_sample;
  PerSample eps;
  float lower;
  float upper;
};

void linf_step(const StepArgs& a);
void l2_step(const StepArgs& a);
void linf_project(const ProjectArgs& a);
void l2_project(const ProjectArgs& a);

// The instruction-set variant the kernels run: "avx2" or "baseline". set_isa("")
// returns to automatic choice; an unknown or unsupported name is an error (false).
std::string isa();
bool set_isa(const std::string& name);
// The variants compiled into this build, e.g. "baseline,avx2".
std::string compiled_isas();

}  // namespace cpu
}  // namespace fastadv
