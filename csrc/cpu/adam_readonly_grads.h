// What csrc/cpu/host_helpers.cpp needs of csrc/cpu/adam_readonly_grads_cpu.cpp: whether the
// read-only-grads Adam kernel can take a call, asked before calling it (a refusal is then a plain
// False for Python, not an exception).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace gradguard {

// Why gradguard::fused_adam_readonly_grads_ would refuse these arguments, or "" when it takes them.
std::string fused_adam_readonly_grads_refusal(at::TensorList params, at::TensorList grads, at::TensorList ms,
                                              at::TensorList vs, at::TensorList steps, const at::Tensor& grad_scale,
                                              const std::optional<at::Tensor>& found_inf);

}  // namespace gradguard
