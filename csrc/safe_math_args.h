// Argument rules of the safe-math ops, shared by the CPU and CUDA kernels so both refuse the same
// inputs with the same messages, and how the result of a broadcasting op is allocated.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/native/Resize.h>

#include <cmath>

namespace gradguard {
namespace safe_math_args {

inline void check_float(const at::Tensor& t, const char* op, const char* arg) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, "gradguard.", op,
              ": `", arg, "` must be float16, bfloat16, float32 or float64, got ", dt,
              " (gradguard.", op, " promotes integer inputs; the op itself takes floating-point tensors)");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                             const char* ref_arg) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "gradguard.", op, ": `", arg, "` has dtype ", t.scalar_type(),
              " but `", ref_arg, "` has ", ref.scalar_type(), "; they must match");
}

inline void check_param(double v, const char* op, const char* arg, bool nonneg) {
  TORCH_CHECK(!std::isnan(v), "gradguard.", op, ": `", arg, "` must not be NaN");
  TORCH_CHECK(!nonneg || v >= 0.0, "gradguard.", op, ": `", arg, "` must be >= 0, got ", v);
}

inline void check_backward_operand(const at::Tensor& t, const at::Tensor& grad, const char* op, const char* arg) {
  check_same_dtype(t, grad, op, arg, "grad");
  TORCH_CHECK(t.sizes() == grad.sizes(), "gradguard.", op, ": `", arg, "` has shape ", t.sizes(), " but `grad` has ",
              grad.sizes(), "; they must match");
}

inline void check_div_args(const at::Tensor& input, const at::Tensor& other, double eps, const char* op) {
  check_float(input, op, "input");
  check_same_dtype(other, input, op, "other", "input");
  check_param(eps, op, "eps", true);
}

inline void prepare_out(at::Tensor& out, const at::Tensor& like, at::IntArrayRef shape, const char* op) {
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), "gradguard.", op, ": `out` has dtype ", out.scalar_type(),
              " but the result has dtype ", like.scalar_type(), "; pass an `out` of the result's dtype");
  at::native::resize_output(out, shape);
}

// The broadcast result is laid out like whichever operand already has the result's shape (as
// the fake kernel does), else contiguous.
inline at::Tensor empty_broadcast(const at::Tensor& a, const at::Tensor& b) {
  const auto shape = at::infer_size(a.sizes(), b.sizes());
  if (a.sizes() == at::IntArrayRef(shape)) return at::empty_like(a);
  if (b.sizes() == at::IntArrayRef(shape)) return at::empty_like(b);
  return at::empty(shape, a.options());
}

}  // namespace safe_math_args
}  // namespace gradguard
