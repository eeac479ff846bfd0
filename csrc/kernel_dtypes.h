// The dtypes the stats and scaling kernels take, and the checks of the scaling ops' arguments
// that every kernel (CPU, CUDA) makes alike; gradguard/reference/stats.py makes the same ones.
#pragma once

#include <ATen/ATen.h>

namespace gradguard {

// Not at::isFloatingType: that admits the float8 types, which then failed inside AT_DISPATCH with
// a message that named neither the op's argument nor what it takes.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// A complex scale was cast to its real part with a warning (a gradient times 2j came back zeroed).
inline void check_scale_kind(const char* op, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, op, ": `scale` must hold one element, got shape ", scale.sizes());
  TORCH_CHECK_TYPE(!scale.is_complex(), op, ": `scale` must be real, got a ", scale.scalar_type(), " tensor");
}

inline void check_scaled_dtype(const char* op, at::TensorList tensors) {
  if (tensors.empty()) return;
  const auto dtype = tensors[0].scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(is_kernel_dtype(dtype), op, ": dtype ", dtype,
                              " is not supported; the op takes float16, bfloat16, float32 and float64 tensors");
}

}  // namespace gradguard
