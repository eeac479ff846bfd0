// The dtypes the stats and scaling kernels take, and the checks of the scaling ops' arguments
// that every kernel (CPU, CUDA) makes alike; gradguard/reference/stats.py makes the same ones.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/grad_mode.h>

#include <type_traits>

namespace gradguard {

// The 16-bit types, which the kernels widen to float32 to compute.
template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

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

// What the in-place scaling ops refuse of each tensor besides its device (checked per kernel).
inline void check_scaled_tensor(const char* op, size_t i, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": tensors[", i, "] has dtype ", t.scalar_type(), " but tensors[0] has ",
              dtype);
  // Writing through a view whose elements alias each other (an expand) would scale them twice:
  // refused with the same check (and message) as torch's own in-place ops.
  at::assert_no_internal_overlap(t);
  // The write is not recorded by autograd: refused where torch's in-place ops would record it or
  // refuse it (a leaf), as the reference's nan_to_num_/mul_ refuse a leaf.
  TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), op, ": tensors[", i,
              "] requires grad, and an in-place scaling of it would not be recorded by autograd (a leaf "
              "Variable that requires grad is being used in an in-place operation); call it under "
              "torch.no_grad(), as optimizers and clip_grad_norm_ do");
}

// The scale as the kernels multiply by it, from `s`, a CPU scale read once as a double before
// anything is written (so a scale that is an element of one of the tensors counts with the value
// it had, on every path). An integer scale beyond 2^53 was rounded in that read: it is rounded
// once to float32 from its own value instead (as torch's `.to(float32)` does), not twice. Both
// kernels (CPU, and CUDA with a CPU scale) multiply by this.
inline double op_math_scale(const at::Tensor& scale, double s, at::ScalarType dtype) {
  if (dtype != at::kDouble && at::isIntegralType(scale.scalar_type(), /*includeBool=*/true)) {
    return static_cast<double>(scale.to(at::kFloat).item<float>());
  }
  return s;
}

}  // namespace gradguard
