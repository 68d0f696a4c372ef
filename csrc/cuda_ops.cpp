// The CUDA implementations of the fastadv_ext ops: checks, then the kernels/
// launchers on the current stream (so CUDA graphs and streams work as usual).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "../kernels/fastadv_kernels.cuh"
#include "op_checks.h"

namespace fastadv {
namespace {

fastadv_dtype cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return FASTADV_FLOAT16;
    case at::kBFloat16: return FASTADV_BFLOAT16;
    default: return FASTADV_FLOAT32;
  }
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

fastadv_step_params step_params(const FlatBatch& fb, const at::Tensor& out, const at::Tensor& x_adv,
                                const at::Tensor& x_nat, const at::Tensor& grad,
                                const std::optional<at::Tensor>& alpha_t, double alpha,
                                const std::optional<at::Tensor>& eps_t, double eps, double lower,
                                double upper) {
  fastadv_step_params p;
  p.out = out.data_ptr();
  p.x_adv = x_adv.const_data_ptr();
  p.x_nat = x_nat.const_data_ptr();
  p.grad = grad.const_data_ptr();
  p.x_dtype = cuda_dtype(out.scalar_type());
  p.grad_dtype = cuda_dtype(grad.scalar_type());
  p.numel = fb.numel;
  p.per_sample = fb.per_sample;
  p.alpha_t = data_or_null(alpha_t);
  p.alpha = static_cast<float>(alpha);
  p.eps_t = data_or_null(eps_t);
  p.eps = static_cast<float>(eps);
  p.lower = static_cast<float>(lower);
  p.upper = static_cast<float>(upper);
  return p;
}

fastadv_project_params project_params(const FlatBatch& fb, const at::Tensor& out,
                                      const at::Tensor& x, const at::Tensor& x_nat,
                                      const std::optional<at::Tensor>& eps_t, double eps,
                                      double lower, double upper) {
  fastadv_project_params p;
  p.out = out.data_ptr();
  p.x = x.const_data_ptr();
  p.x_nat = x_nat.const_data_ptr();
  p.x_dtype = cuda_dtype(out.scalar_type());
  p.numel = fb.numel;
  p.per_sample = fb.per_sample;
  p.eps_t = data_or_null(eps_t);
  p.eps = static_cast<float>(eps);
  p.lower = static_cast<float>(lower);
  p.upper = static_cast<float>(upper);
  return p;
}

// Scratch for the L2 ops' per-block partial sums (often none), from torch's
// caching allocator: cheap, stream-ordered and legal inside CUDA graph capture.
at::Tensor l2_workspace(const at::Tensor& out, const FlatBatch& fb) {
  const size_t bytes = fastadv_l2_workspace_bytes(fb.numel, fb.per_sample);
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes / sizeof(float))}, out.options().dtype(at::kFloat));
}

float* workspace_ptr(const at::Tensor& ws) { return ws.defined() ? ws.data_ptr<float>() : nullptr; }

void linf_step_cuda(const at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_nat,
                    const at::Tensor& grad, const std::optional<at::Tensor>& alpha_t, double alpha,
                    const std::optional<at::Tensor>& eps_t, double eps, double lower, double upper) {
  const char* op = "fastadv_ext::linf_step";
  const FlatBatch fb = check_step_args(op, c10::DeviceType::CUDA, out, x_adv, x_nat, grad, alpha_t,
                                       eps_t, lower, upper);
  if (fb.numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const fastadv_step_params p =
      step_params(fb, out, x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper);
  check_launch(op, fastadv_linf_step_launch(&p, c10::cuda::getCurrentCUDAStream().stream()));
}

void l2_step_cuda(const at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_nat,
                  const at::Tensor& grad, const std::optional<at::Tensor>& alpha_t, double alpha,
                  const std::optional<at::Tensor>& eps_t, double eps, double lower, double upper) {
  const char* op = "fastadv_ext::l2_step";
  const FlatBatch fb = check_step_args(op, c10::DeviceType::CUDA, out, x_adv, x_nat, grad, alpha_t,
                                       eps_t, lower, upper);
  if (fb.numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const fastadv_step_params p =
      step_params(fb, out, x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper);
  const at::Tensor ws = l2_workspace(out, fb);
  check_launch(op, fastadv_l2_step_launch(&p, workspace_ptr(ws),
                                          c10::cuda::getCurrentCUDAStream().stream()));
}

void linf_project_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_nat,
                       const std::optional<at::Tensor>& eps_t, double eps, double lower,
                       double upper) {
  const char* op = "fastadv_ext::linf_project";
  const FlatBatch fb =
      check_project_args(op, c10::DeviceType::CUDA, out, x, x_nat, eps_t, lower, upper);
  if (fb.numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const fastadv_project_params p = project_params(fb, out, x, x_nat, eps_t, eps, lower, upper);
  check_launch(op, fastadv_linf_project_launch(&p, c10::cuda::getCurrentCUDAStream().stream()));
}

void l2_project_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_nat,
                     const std::optional<at::Tensor>& eps_t, double eps, double lower,
                     double upper) {
  const char* op = "fastadv_ext::l2_project";
  const FlatBatch fb =
      check_project_args(op, c10::DeviceType::CUDA, out, x, x_nat, eps_t, lower, upper);
  if (fb.numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const fastadv_project_params p = project_params(fb, out, x, x_nat, eps_t, eps, lower, upper);
  const at::Tensor ws = l2_workspace(out, fb);
  check_launch(op, fastadv_l2_project_launch(&p, workspace_ptr(ws),
                                             c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace fastadv

TORCH_LIBRARY_IMPL(fastadv_ext, CUDA, m) {
  m.impl("linf_step", &fastadv::linf_step_cuda);
  m.impl("l2_step", &fastadv::l2_step_cuda);
  m.impl("linf_project", &fastadv::linf_project_cuda);
  m.impl("l2_project", &fastadv::l2_project_cuda);
}
