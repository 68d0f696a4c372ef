// The fastadv_ext ops: schemas, argument checks, the CPU and Meta implementations.
//
// These are the kernel-level ops behind the Python-level fastadv:: custom ops
// (fastadv/ops/_library.py). Each writes into `out`, which may be `x_adv`/`x`
// itself (in place). The layout contract (fastadv/ops/_registry.py): all tensors
// share shape and strides, are non-overlapping and dense with the batch outermost.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cmath>
#include <sstream>
#include <string>

#include "build_info.h"
#include "cpu_kernels.h"
#include "op_checks.h"

#if defined(FASTADV_WITH_CUDA)
extern "C" const char* fastadv_cuda_arch_list(void);
extern "C" int fastadv_cuda_runtime_version(void);
#endif

namespace fastadv {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// out: the reference every other tensor argument is compared with.
FlatBatch check_out(const char* op, c10::DeviceType device, const at::Tensor& out) {
  TORCH_CHECK(out.defined(), op, ": out must be a tensor, got None");
  TORCH_CHECK(out.device().type() == device, op, ": out must be on ", c10::DeviceTypeName(device),
              " for this implementation, got ", out.device());
  TORCH_CHECK(is_float_dtype(out.scalar_type()), op,
              ": out must be float32, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(out.dim() >= 1, op, ": out must be a batch [B, ...], got a 0-d tensor");
  const int64_t numel = out.numel();
  if (numel == 0) return {0, 1};
  const int64_t batch = out.size(0);
  const int64_t per_sample = numel / batch;
  TORCH_CHECK(out.is_non_overlapping_and_dense(), op,
              ": out must be non-overlapping and dense (contiguous or channels_last), got strides ",
              out.strides());
  TORCH_CHECK(batch == 1 || out.stride(0) == per_sample, op,
              ": out must have the batch dimension outermost in memory (stride(0) == ", per_sample,
              "), got strides ", out.strides());
  return {numel, per_sample};
}

// Same shape, device and strides (dims of size 1 may differ) as out.
void check_like_out(const char* op, const char* name, const at::Tensor& t, const at::Tensor& out) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device() == out.device(), op, ": ", name, " must be on ", out.device(),
              " (the device of out), got ", t.device());
  TORCH_CHECK(t.sizes() == out.sizes(), op, ": ", name, " must have shape ", out.sizes(),
              " (that of out), got ", t.sizes());
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) == out.stride(d), op, ": ", name,
                " must have the strides of out ", out.strides(), ", got ", t.strides(),
                " (make them match, e.g. with torch.empty_like(out).copy_(", name, "))");
  }
  if (t.numel() > 0) at::assert_no_partial_overlap(out, t);
}

void check_per_sample(const char* op, const char* name, const std::optional<at::Tensor>& t,
                      const at::Tensor& out) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t batch = out.size(0);
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, op, ": ", name,
              " must have shape [", batch, "] (one value per sample), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t->device() == out.device(), op, ": ", name, " must be on ", out.device(),
              ", got ", t->device());
}

void check_bounds(const char* op, double lower, double upper) {
  TORCH_CHECK(!std::isnan(lower) && !std::isnan(upper), op,
              ": lower and upper must be numbers, got lower=", lower, ", upper=", upper);
  TORCH_CHECK(lower <= upper, op, ": lower must be <= upper, got lower=", lower,
              " > upper=", upper);
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

cpu::DType cpu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cpu::DType::Float16;
    case at::kBFloat16: return cpu::DType::BFloat16;
    default: return cpu::DType::Float32;
  }
}

// ------------------------------------------------------------------ CPU
cpu::StepArgs cpu_step_args(const FlatBatch& fb, const at::Tensor& out, const at::Tensor& x_adv,
                            const at::Tensor& x_nat, const at::Tensor& grad,
                            const std::optional<at::Tensor>& alpha_t, double alpha,
                            const std::optional<at::Tensor>& eps_t, double eps, double lower,
                            double upper) {
  return cpu::StepArgs{out.data_ptr(), x_adv.const_data_ptr(), x_nat.const_data_ptr(),
                       grad.const_data_ptr(), cpu_dtype(out.scalar_type()),
                       cpu_dtype(grad.scalar_type()), fb.numel, fb.per_sample,
                       cpu::PerSample{data_or_null(alpha_t), static_cast<float>(alpha)},
                       cpu::PerSample{data_or_null(eps_t), static_cast<float>(eps)},
                       static_cast<float>(lower), static_cast<float>(upper)};
}

cpu::ProjectArgs cpu_project_args(const FlatBatch& fb, const at::Tensor& out, const at::Tensor& x,
                                  const at::Tensor& x_nat, const std::optional<at::Tensor>& eps_t,
                                  double eps, double lower, double upper) {
  return cpu::ProjectArgs{out.data_ptr(), x.const_data_ptr(), x_nat.const_data_ptr(),
                          cpu_dtype(out.scalar_type()), fb.numel, fb.per_sample,
                          cpu::PerSample{data_or_null(eps_t), static_cast<float>(eps)},
                          static_cast<float>(lower), static_cast<float>(upper)};
}

void linf_step_cpu(const at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_nat,
                   const at::Tensor& grad, const std::optional<at::Tensor>& alpha_t, double alpha,
                   const std::optional<at::Tensor>& eps_t, double eps, double lower, double upper) {
  const FlatBatch fb = check_step_args("fastadv_ext::linf_step", c10::DeviceType::CPU, out, x_adv,
                                       x_nat, grad, alpha_t, eps_t, lower, upper);
  if (fb.numel == 0) return;
  cpu::linf_step(cpu_step_args(fb, out, x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper));
}

void l2_step_cpu(const at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_nat,
                 const at::Tensor& grad, const std::optional<at::Tensor>& alpha_t, double alpha,
                 const std::optional<at::Tensor>& eps_t, double eps, double lower, double upper) {
  const FlatBatch fb = check_step_args("fastadv_ext::l2_step", c10::DeviceType::CPU, out, x_adv,
                                       x_nat, grad, alpha_t, eps_t, lower, upper);
  if (fb.numel == 0) return;
  cpu::l2_step(cpu_step_args(fb, out, x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper));
}

void linf_project_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_nat,
                      const std::optional<at::Tensor>& eps_t, double eps, double lower,
                      double upper) {
  const FlatBatch fb = check_project_args("fastadv_ext::linf_project", c10::DeviceType::CPU, out,
                                          x, x_nat, eps_t, lower, upper);
  if (fb.numel == 0) return;
  cpu::linf_project(cpu_project_args(fb, out, x, x_nat, eps_t, eps, lower, upper));
}

void l2_project_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_nat,
                    const std::optional<at::Tensor>& eps_t, double eps, double lower, double upper) {
  const FlatBatch fb = check_project_args("fastadv_ext::l2_project", c10::DeviceType::CPU, out, x,
                                          x_nat, eps_t, lower, upper);
  if (fb.numel == 0) return;
  cpu::l2_project(cpu_project_args(fb, out, x, x_nat, eps_t, eps, lower, upper));
}

// ------------------------------------------------------------------ Meta
// What torch.compile and FakeTensor see: dtype and shape checks only, written with
// symbolic sizes so that dynamic shapes trace (concrete strides are not known there).
void check_like_out_meta(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& out, bool same_dtype) {
  TORCH_CHECK(t.sym_sizes() == out.sym_sizes(), op, ": ", name, " must have shape ",
              out.sym_sizes(), " (that of out), got ", t.sym_sizes());
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == out.scalar_type(), op, ": ", name, " must have the dtype of out (",
                out.scalar_type(), "), got ", t.scalar_type());
  } else {
    TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
                " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_per_sample_meta(const char* op, const char* name, const std::optional<at::Tensor>& t,
                           const at::Tensor& out) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->sym_size(0) == out.sym_size(0), op, ": ", name,
              " must have shape [B] (one value per sample), got ", t->sym_sizes());
}

void check_out_meta(const char* op, const at::Tensor& out) {
  TORCH_CHECK(is_float_dtype(out.scalar_type()), op,
              ": out must be float32, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(out.dim() >= 1, op, ": out must be a batch [B, ...], got a 0-d tensor");
}

void step_meta(const char* op, const at::Tensor& out, const at::Tensor& x_adv,
               const at::Tensor& x_nat, const at::Tensor& grad,
               const std::optional<at::Tensor>& alpha_t, const std::optional<at::Tensor>& eps_t,
               double lower, double upper) {
  check_out_meta(op, out);
  check_like_out_meta(op, "x_adv", x_adv, out, true);
  check_like_out_meta(op, "x_nat", x_nat, out, true);
  check_like_out_meta(op, "grad", grad, out, false);
  check_per_sample_meta(op, "alpha_t", alpha_t, out);
  check_per_sample_meta(op, "eps_t", eps_t, out);
  check_bounds(op, lower, upper);
}

void project_meta(const char* op, const at::Tensor& out, const at::Tensor& x,
                  const at::Tensor& x_nat, const std::optional<at::Tensor>& eps_t, double lower,
                  double upper) {
  check_out_meta(op, out);
  check_like_out_meta(op, "x", x, out, true);
  check_like_out_meta(op, "x_nat", x_nat, out, true);
  check_per_sample_meta(op, "eps_t", eps_t, out);
  check_bounds(op, lower, upper);
}

void linf_step_meta(const at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_nat,
                    const at::Tensor& grad, const std::optional<at::Tensor>& alpha_t, double,
                    const std::optional<at::Tensor>& eps_t, double, double lower, double upper) {
  step_meta("fastadv_ext::linf_step", out, x_adv, x_nat, grad, alpha_t, eps_t, lower, upper);
}

void l2_step_meta(const at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_nat,
                  const at::Tensor& grad, const std::optional<at::Tensor>& alpha_t, double,
                  const std::optional<at::Tensor>& eps_t, double, double lower, double upper) {
  step_meta("fastadv_ext::l2_step", out, x_adv, x_nat, grad, alpha_t, eps_t, lower, upper);
}

void linf_project_meta(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_nat,
                       const std::optional<at::Tensor>& eps_t, double, double lower, double upper) {
  project_meta("fastadv_ext::linf_project", out, x, x_nat, eps_t, lower, upper);
}

void l2_project_meta(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_nat,
                     const std::optional<at::Tensor>& eps_t, double, double lower, double upper) {
  project_meta("fastadv_ext::l2_project", out, x, x_nat, eps_t, lower, upper);
}

// ------------------------------------------------------------- utilities
std::string cpu_isa(const std::string& name) {
  TORCH_CHECK(cpu::set_isa(name) || name.empty(), "fastadv_ext::cpu_isa: name must be '', ",
              "'baseline' or 'avx2' (when this CPU has AVX2, FMA and F16C), got '", name, "'");
  return cpu::isa();
}

}  // namespace

FlatBatch check_step_args(const char* op, c10::DeviceType device, const at::Tensor& out,
                          const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                          const std::optional<at::Tensor>& alpha_t,
                          const std::optional<at::Tensor>& eps_t, double lower, double upper) {
  const FlatBatch fb = check_out(op, device, out);
  check_like_out(op, "x_adv", x_adv, out);
  check_like_out(op, "x_nat", x_nat, out);
  check_like_out(op, "grad", grad, out);
  TORCH_CHECK(x_adv.scalar_type() == out.scalar_type(), op, ": x_adv must have the dtype of out (",
              out.scalar_type(), "), got ", x_adv.scalar_type());
  TORCH_CHECK(x_nat.scalar_type() == out.scalar_type(), op, ": x_nat must have the dtype of out (",
              out.scalar_type(), "), got ", x_nat.scalar_type());
  TORCH_CHECK(is_float_dtype(grad.scalar_type()), op,
              ": grad must be float32, float16 or bfloat16, got ", grad.scalar_type());
  if (out.dim() >= 1) {
    check_per_sample(op, "alpha_t", alpha_t, out);
    check_per_sample(op, "eps_t", eps_t, out);
  }
  check_bounds(op, lower, upper);
  return fb;
}

FlatBatch check_project_args(const char* op, c10::DeviceType device, const at::Tensor& out,
                             const at::Tensor& x, const at::Tensor& x_nat,
                             const std::optional<at::Tensor>& eps_t, double lower, double upper) {
  const FlatBatch fb = check_out(op, device, out);
  check_like_out(op, "x", x, out);
  check_like_out(op, "x_nat", x_nat, out);
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), op, ": x must have the dtype of out (",
              out.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK(x_nat.scalar_type() == out.scalar_type(), op, ": x_nat must have the dtype of out (",
              out.scalar_type(), "), got ", x_nat.scalar_type());
  check_per_sample(op, "eps_t", eps_t, out);
  check_bounds(op, lower, upper);
  return fb;
}

std::string build_info_json() {
  std::ostringstream js;
  js << "{\"torch_version\": \"" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "."
     << TORCH_VERSION_PATCH << "\"";
#if defined(FASTADV_WITH_CUDA)
  // "800,900" (nvcc's __CUDA_ARCH_LIST__) -> ["sm_80", "sm_90"]
  const std::string list = fastadv_cuda_arch_list();
  std::string archs;
  std::istringstream items(list);
  for (std::string item; std::getline(items, item, ',');) {
    if (item.empty()) continue;
    const int arch = std::stoi(item);
    archs += (archs.empty() ? "" : ", ") + std::string("\"sm_") + std::to_string(arch / 10) + "\"";
  }
  const int rt = fastadv_cuda_runtime_version();
  js << ", \"cuda\": true, \"cuda_arch_list\": \"" << list << "\", \"cuda_archs\": [" << archs
     << "], \"cuda_runtime\": " << rt << ", \"cuda_version\": \"" << rt / 1000 << "."
     << (rt % 1000) / 10 << "\"";
#else
  js << ", \"cuda\": false, \"cuda_arch_list\": \"\", \"cuda_archs\": [], \"cuda_runtime\": 0, "
     << "\"cuda_version\": null";
#endif
  js << ", \"cpu_isas\": \"" << cpu::compiled_isas() << "\", \"cpu_isa\": \"" << cpu::isa() << "\"";
#if defined(_OPENMP)
  js << ", \"openmp\": true";
#else
  js << ", \"openmp\": false";
#endif
#if defined(__clang__)
  js << ", \"compiler\": \"clang " << __clang_major__ << "." << __clang_minor__ << "\"";
#elif defined(__GNUC__)
  js << ", \"compiler\": \"gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "\"";
#elif defined(_MSC_VER)
  js << ", \"compiler\": \"msvc " << _MSC_VER << "\"";
#else
  js << ", \"compiler\": \"unknown\"";
#endif
  js << "}";
  return js.str();
}

}  // namespace fastadv

TORCH_LIBRARY(fastadv_ext, m) {
  m.def("linf_step(Tensor(a!) out, Tensor x_adv, Tensor x_nat, Tensor grad, Tensor? alpha_t, "
        "float alpha, Tensor? eps_t, float eps, float lower, float upper) -> ()");
  m.def("l2_step(Tensor(a!) out, Tensor x_adv, Tensor x_nat, Tensor grad, Tensor? alpha_t, "
        "float alpha, Tensor? eps_t, float eps, float lower, float upper) -> ()");
  m.def("linf_project(Tensor(a!) out, Tensor x, Tensor x_nat, Tensor? eps_t, float eps, "
        "float lower, float upper) -> ()");
  m.def("l2_project(Tensor(a!) out, Tensor x, Tensor x_nat, Tensor? eps_t, float eps, "
        "float lower, float upper) -> ()");
  m.def("build_info() -> str", &fastadv::build_info_json);
  m.def("cpu_isa(str name='') -> str", &fastadv::cpu_isa);
}

TORCH_LIBRARY_IMPL(fastadv_ext, CPU, m) {
  m.impl("linf_step", &fastadv::linf_step_cpu);
  m.impl("l2_step", &fastadv::l2_step_cpu);
  m.impl("linf_project", &fastadv::linf_project_cpu);
  m.impl("l2_project", &fastadv::l2_project_cpu);
}

TORCH_LIBRARY_IMPL(fastadv_ext, Meta, m) {
  m.impl("linf_step", &fastadv::linf_step_meta);
  m.impl("l2_step", &fastadv::l2_step_meta);
  m.impl("linf_project", &fastadv::linf_project_meta);
  m.impl("l2_project", &fastadv::l2_project_meta);
}
