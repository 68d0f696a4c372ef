// Argument checks shared by the CPU, CUDA and Meta implementations (ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <optional>
#include <string>

namespace fastadv {

// Flat view of the batch the kernels work on: `numel` elements, sample i / per_sample.
struct FlatBatch {
  int64_t numel;
  int64_t per_sample;
};

// linf_step / l2_step: `device` is the device type the implementation serves.
FlatBatch check_step_args(const char* op, c10::DeviceType device, const at::Tensor& out,
                          const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                          const std::optional<at::Tensor>& alpha_t,
                          const std::optional<at::Tensor>& eps_t, double lower, double upper);

// linf_project / l2_project.
FlatBatch check_project_args(const char* op, c10::DeviceType device, const at::Tensor& out,
                             const at::Tensor& x, const at::Tensor& x_nat,
                             const std::optional<at::Tensor>& eps_t, double lower, double upper);

}  // namespace fastadv
