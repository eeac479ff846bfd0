// CUDA kernels of the safe math ops (schemas and semantics: gradguard/_safe_math_ops.py and
// gradguard/reference/safe_math.py): clamp and math fused into one elementwise pass, forward and
// backward, float16/bfloat16 (computed in float, as torch does), float32 and float64.
//
// Values equal the eager composites on CUDA bit for bit (one exception: torch's CUDA division by
// a number or a 0-dim CPU tensor multiplies by its reciprocal, ~1 ulp from the IEEE division
// these kernels and the CPU make; tests/test_cuda.py allows that): the bound is rounded to the dtype as
// torch.clamp rounds its scalar, the math is the same CUDA libm call torch's log/exp/sqrt kernels
// make (logf/expf/sqrtf on the float value for half/bfloat16/float32, log/exp/sqrt for float64,
// no fast-math), and every intermediate the composite stores in a tensor is rounded to the dtype
// here too (the static_cast<T>(...) steps). Nothing has the a*b+c shape, so fma contraction
// cannot change a result.
//
// Layouts, broadcasting, 64-bit indexing and vectorized loads come from TensorIterator and
// gpu_kernel, on the current stream under a device guard. Argument checks match the CPU
// kernels' (csrc/cpu/safe_math_cpu.cpp) so both devices refuse the same calls.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/Resize.h>
#include <ATen/native/cuda/Loops.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "kernel_image.h"
#include "safe_math_args.h"

#include <thrust/tuple.h>

#include <cmath>
#include <type_traits>

namespace gradguard {
namespace cuda {
namespace {

using namespace safe_math_args;  // NOLINT: the shared argument rules

enum class Math { Log, Exp, Sqrt };

template <Math M, typename A>
__host__ __device__ __forceinline__ A apply_math(A v) {
  if constexpr (std::is_same_v<A, double>) {
    if constexpr (M == Math::Log) return ::log(v);
    if constexpr (M == Math::Exp) return ::exp(v);
    if constexpr (M == Math::Sqrt) return ::sqrt(v);
  } else {
    if constexpr (M == Math::Log) return ::logf(v);
    if constexpr (M == Math::Exp) return ::expf(v);
    if constexpr (M == Math::Sqrt) return ::sqrtf(v);
  }
}

// out = math(clamp(x, min=bound)) or math(clamp(x, max=bound)). NaN compares false and passes
// through the clamp; -0.0 < 0 is false, so -0.0 stays -0.0 as in torch.clamp.
template <typename T, Math M, bool kMin>
struct ClampedMath {
  T bound;
  __host__ __device__ T operator()(T x) const {
    using acc_t = at::opmath_type<T>;
    const acc_t v = static_cast<acc_t>(x), b = static_cast<acc_t>(bound);
    const T c = (kMin ? v < b : v > b) ? bound : x;
    return static_cast<T>(apply_math<M>(static_cast<acc_t>(c)));
  }
};

// where(x >= eps, g / clamp(x, min=eps), 0); straight-through drops the where.
template <typename T>
struct LogBackward {
  T eps;
  bool straight_through;
  __host__ __device__ T operator()(T g, T x) const {
    using acc_t = at::opmath_type<T>;
    const acc_t xv = static_cast<acc_t>(x), e = static_cast<acc_t>(eps);
    const acc_t q = static_cast<acc_t>(g) / (xv < e ? e : xv);
    return static_cast<T>(straight_through || xv >= e ? q : acc_t(0));
  }
};

// where(x <= max, g * result, 0).
template <typename T>
struct ExpBackward {
  T max;
  bool straight_through;
  __host__ __device__ T operator()(T g, T r, T x) const {
    using acc_t = at::opmath_type<T>;
    const acc_t q = static_cast<acc_t>(g) * static_cast<acc_t>(r);
    return static_cast<T>(straight_through || static_cast<acc_t>(x) <= static_cast<acc_t>(max) ? q : acc_t(0));
  }
};

// where(x > eps, g / (2 * sqrt(clamp(x, min=0))), 0), with the composite's roundings: the root
// and the doubled root are tensors there, so both are rounded to T.
template <typename T>
struct SqrtBackward {
  T eps;
  __host__ __device__ T operator()(T g, T x) const {
    using acc_t = at::opmath_type<T>;
    const acc_t xv = static_cast<acc_t>(x);
    const T clamped = xv < acc_t(0) ? static_cast<T>(0) : x;
    const T root = static_cast<T>(apply_math<Math::Sqrt>(static_cast<acc_t>(clamped)));
    const T twice = static_cast<T>(acc_t(2) * static_cast<acc_t>(root));
    const acc_t q = static_cast<acc_t>(g) / static_cast<acc_t>(twice);
    return static_cast<T>(xv > static_cast<acc_t>(eps) ? q : acc_t(0));
  }
};

// where(|b| <= eps and a is not NaN, fill, a / b): the guard never replaces a NaN numerator.
template <typename T>
struct Div {
  T eps;
  T fill;
  __host__ __device__ T operator()(T a, T b) const {
    using acc_t = at::opmath_type<T>;
    const acc_t av = static_cast<acc_t>(a), bv = static_cast<acc_t>(b);
    const bool guard = (bv < 0 ? -bv : bv) <= static_cast<acc_t>(eps) && av == av;
    return guard ? fill : static_cast<T>(av / bv);
  }
};

// A float16/bfloat16 element divided by a float32 number (torch.div by a number): in float32,
// rounded once. The divisor is a value (a CPU operand, read on the host) or the pointer to a
// 0-dim device tensor's element, read by every thread (no host read, so no sync).
template <typename T>
struct DivByFloat {
  const float* divisor;
  float value;
  float eps;
  T fill;
  // __host__ as well, as gpu_kernel's lambdas are; only the device runs it.
  __host__ __device__ T operator()(T a) const {
    const float b = divisor != nullptr ? *divisor : value;
    const float av = static_cast<float>(a);
    const bool guard = (b < 0 ? -b : b) <= eps && av == av;
    return guard ? fill : static_cast<T>(av / b);
  }
};

// Guarded elements get zero gradients, the others torch.div's formulas grad / b and
// -grad * ((a / b) / b), with the composite's roundings of a / b and (a / b) / b.
template <typename T>
struct DivBackward {
  T eps;
  __host__ __device__ thrust::tuple<T, T> operator()(T g, T a, T b) const {
    using acc_t = at::opmath_type<T>;
    const acc_t gv = static_cast<acc_t>(g), av = static_cast<acc_t>(a), bv = static_cast<acc_t>(b);
    const bool guard = (bv < 0 ? -bv : bv) <= static_cast<acc_t>(eps);
    const acc_t q1 = static_cast<acc_t>(static_cast<T>(av / bv));
    const acc_t q2 = static_cast<acc_t>(static_cast<T>(q1 / bv));
    return thrust::make_tuple(static_cast<T>(guard ? acc_t(0) : gv / bv), static_cast<T>(guard ? acc_t(0) : -gv * q2));
  }
};

}  // namespace

// gpu_kernel_multiple_outputs takes only a __host__ __device__ lambda, and nvcc allows those only
// in functions with external linkage: hence this one function outside the anonymous namespace.
void safe_div_backward_kernel(at::TensorIteratorBase& iter, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, iter.common_dtype(), "gradguard_safe_div_backward_cuda", [&] {
    const DivBackward<scalar_t> f{static_cast<scalar_t>(eps)};
    at::native::gpu_kernel_multiple_outputs(
        iter, [f] GPU_LAMBDA(scalar_t g, scalar_t a, scalar_t b) -> thrust::tuple<scalar_t, scalar_t> { return f(g, a, b); });
  });
}

namespace {

// ---- forward: log, exp, sqrt -----------------------------------------------------------------

template <Math M, bool kMin>
void clamped_math(const at::Tensor& out, const at::Tensor& input, double bound) {
  const c10::cuda::CUDAGuard guard(input.device());
  require_kernel_image();
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(input).check_all_same_dtype(true).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gradguard_safe_unary_cuda", [&] {
    // Rounded to the dtype first, as torch.clamp does with its scalar bound.
    at::native::gpu_kernel(iter, ClampedMath<scalar_t, M, kMin>{static_cast<scalar_t>(bound)});
  });
}

// The .out overloads return nothing (schema `-> ()`), so torch.compile can functionalize them.
at::Tensor safe_log_cuda(const at::Tensor& input, double eps, bool straight_through) {
  check_float(input, "safe_log", "input");
  check_param(eps, "safe_log", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_log", "eps", true);
  check_on_kernel_device({{&input, "input"}}, "safe_log", at::kCUDA);
  at::Tensor out = at::empty_like(input);
  clamped_math<Math::Log, true>(out, input, eps);
  return out;
}

void safe_log_out_cuda(const at::Tensor& input, double eps, bool straight_through, at::Tensor& out) {
  check_float(input, "safe_log", "input");
  check_param(eps, "safe_log", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_log", "eps", true);
  const auto device = check_on_kernel_device({{&input, "input"}}, "safe_log", at::kCUDA);
  prepare_out(out, input, input.sizes(), "safe_log", device, {input});
  write_out(out, {input}, [&](const at::Tensor& o) { clamped_math<Math::Log, true>(o, input, eps); });
}

at::Tensor safe_exp_cuda(const at::Tensor& input, double max, bool straight_through) {
  check_float(input, "safe_exp", "input");
  check_param(max, "safe_exp", "max", false);
  check_bound_fits(max, input.scalar_type(), "safe_exp", "max", false);
  check_on_kernel_device({{&input, "input"}}, "safe_exp", at::kCUDA);
  at::Tensor out = at::empty_like(input);
  clamped_math<Math::Exp, false>(out, input, max);
  return out;
}

void safe_exp_out_cuda(const at::Tensor& input, double max, bool straight_through, at::Tensor& out) {
  check_float(input, "safe_exp", "input");
  check_param(max, "safe_exp", "max", false);
  check_bound_fits(max, input.scalar_type(), "safe_exp", "max", false);
  const auto device = check_on_kernel_device({{&input, "input"}}, "safe_exp", at::kCUDA);
  prepare_out(out, input, input.sizes(), "safe_exp", device, {input});
  write_out(out, {input}, [&](const at::Tensor& o) { clamped_math<Math::Exp, false>(o, input, max); });
}

// safe_sqrt's forward clamps at 0 whatever eps is; eps only bounds the backward.
at::Tensor safe_sqrt_cuda(const at::Tensor& input, double eps) {
  check_float(input, "safe_sqrt", "input");
  check_param(eps, "safe_sqrt", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_sqrt", "eps", true);
  check_on_kernel_device({{&input, "input"}}, "safe_sqrt", at::kCUDA);
  at::Tensor out = at::empty_like(input);
  clamped_math<Math::Sqrt, true>(out, input, 0.0);
  return out;
}

void safe_sqrt_out_cuda(const at::Tensor& input, double eps, at::Tensor& out) {
  check_float(input, "safe_sqrt", "input");
  check_param(eps, "safe_sqrt", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_sqrt", "eps", true);
  const auto device = check_on_kernel_device({{&input, "input"}}, "safe_sqrt", at::kCUDA);
  prepare_out(out, input, input.sizes(), "safe_sqrt", device, {input});
  write_out(out, {input}, [&](const at::Tensor& o) { clamped_math<Math::Sqrt, true>(o, input, 0.0); });
}

// ---- backward: log, exp, sqrt ----------------------------------------------------------------

at::Tensor safe_log_backward_cuda(const at::Tensor& grad, const at::Tensor& input, double eps, bool straight_through) {
  check_float(grad, "safe_log_backward", "grad");
  check_backward_operand(input, grad, "safe_log_backward", "input");
  check_on_kernel_device({{&grad, "grad"}, {&input, "input"}}, "safe_log_backward", at::kCUDA);
  check_backward_eps(eps, "safe_log_backward");
  const c10::cuda::CUDAGuard guard(input.device());
  require_kernel_image();
  at::Tensor out = at::empty_like(input);
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(grad).add_const_input(input).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gradguard_safe_log_backward_cuda", [&] {
    at::native::gpu_kernel(iter, LogBackward<scalar_t>{static_cast<scalar_t>(eps), straight_through});
  });
  return out;
}

at::Tensor safe_exp_backward_cuda(const at::Tensor& grad, const at::Tensor& result, const at::Tensor& input,
                                  double max, bool straight_through) {
  check_float(grad, "safe_exp_backward", "grad");
  check_backward_operand(result, grad, "safe_exp_backward", "result");
  check_backward_operand(input, grad, "safe_exp_backward", "input");
  check_on_kernel_device({{&grad, "grad"}, {&result, "result"}, {&input, "input"}}, "safe_exp_backward", at::kCUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  require_kernel_image();
  at::Tensor out = at::empty_like(input);
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(grad)
                  .add_const_input(result)
                  .add_const_input(input)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gradguard_safe_exp_backward_cuda", [&] {
    at::native::gpu_kernel(iter, ExpBackward<scalar_t>{static_cast<scalar_t>(max), straight_through});
  });
  return out;
}

at::Tensor safe_sqrt_backward_cuda(const at::Tensor& grad, const at::Tensor& input, double eps) {
  check_float(grad, "safe_sqrt_backward", "grad");
  check_backward_operand(input, grad, "safe_sqrt_backward", "input");
  check_on_kernel_device({{&grad, "grad"}, {&input, "input"}}, "safe_sqrt_backward", at::kCUDA);
  check_backward_eps(eps, "safe_sqrt_backward");
  const c10::cuda::CUDAGuard guard(input.device());
  require_kernel_image();
  at::Tensor out = at::empty_like(input);
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(grad).add_const_input(input).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gradguard_safe_sqrt_backward_cuda", [&] {
    at::native::gpu_kernel(iter, SqrtBackward<scalar_t>{static_cast<scalar_t>(eps)});
  });
  return out;
}

// ---- div -------------------------------------------------------------------------------------

// A 0-dim CPU operand (torch.div accepts one, and autograd saves it as it came) is read on the host
// and passed to the kernel as a value (gpu_kernel_with_scalars), as torch's binary ops do: no
// host-to-device copy, and the guard is on the result's device, never the CPU operand's.
void div_kernel(const at::Tensor& out, const at::Tensor& input, const at::Tensor& other, double eps, double fill) {
  const c10::cuda::CUDAGuard guard(out.device());
  require_kernel_image();
  auto iter = at::TensorIteratorConfig()
                  .allow_cpu_scalars(true)
                  .add_output(out)
                  .add_const_input(input)
                  .add_const_input(other)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gradguard_safe_div_cuda", [&] {
    at::native::gpu_kernel_with_scalars(iter, Div<scalar_t>{static_cast<scalar_t>(eps), static_cast<scalar_t>(fill)});
  });
}

// divides_by_float32 (safe_math_args.h): a float16/bfloat16 input by a 0-dim float32 divisor.
void div_by_float32_kernel(const at::Tensor& out, const at::Tensor& input, const at::Tensor& other, double eps,
                           double fill) {
  const c10::cuda::CUDAGuard guard(out.device());
  require_kernel_image();
  const bool on_host = other.device().is_cpu();
  const float value = on_host ? other.item<float>() : 0.0f;
  const float* divisor = on_host ? nullptr : other.const_data_ptr<float>();
  // A 0-dim CPU input (its divisor then on the device) is filled on the device first.
  const at::Tensor in = input.device() == out.device() ? input : at::scalar_tensor(input.item(), out.options());
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(in).check_all_same_dtype(true).build();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "gradguard_safe_div_by_float32_cuda", [&] {
    // Through float, as the float32 division's fill was before its result was rounded.
    at::native::gpu_kernel(iter, DivByFloat<scalar_t>{divisor, value, static_cast<float>(eps),
                                                      static_cast<scalar_t>(static_cast<float>(fill))});
  });
}

void any_div_kernel(const at::Tensor& out, const at::Tensor& input, const at::Tensor& other, double eps, double fill) {
  if (input.scalar_type() != other.scalar_type()) div_by_float32_kernel(out, input, other, eps, fill);
  else div_kernel(out, input, other, eps, fill);
}

// The backward's multi-output kernel takes device tensors only: a 0-dim CPU operand becomes a
// 0-dim device tensor filled with its value (a fill kernel with the value as its argument, no
// host-to-device copy and no sync; reading a CPU tensor is not a device sync either).
at::Tensor on_device(const at::Tensor& t, c10::Device device) {
  if (t.device() == device) return t;
  return at::scalar_tensor(t.item(), t.options().device(device));
}

at::Tensor safe_div_cuda(const at::Tensor& input, const at::Tensor& other, double eps, double fill) {
  check_div_args(input, other, eps, "safe_div", at::kCUDA, /*float32_divisor=*/true);
  check_bound_fits(fill, input.scalar_type(), "safe_div", "fill", false);
  at::Tensor out = empty_broadcast(input, other);
  any_div_kernel(out, input, other, eps, fill);
  return out;
}

void safe_div_out_cuda(const at::Tensor& input, const at::Tensor& other, double eps, double fill,
                              at::Tensor& out) {
  check_div_args(input, other, eps, "safe_div", at::kCUDA, /*float32_divisor=*/true);
  check_bound_fits(fill, input.scalar_type(), "safe_div", "fill", false);
  prepare_out(out, input, at::infer_size(input.sizes(), other.sizes()), "safe_div", div_device(input, other),
              {input, other});
  write_out(out, {input, other}, [&](const at::Tensor& o) { any_div_kernel(o, input, other, eps, fill); });
}

// Both gradients at the broadcast shape in one pass; autograd reduces them to each operand's
// shape (sum_to_size), as it does for torch.div.
std::tuple<at::Tensor, at::Tensor> safe_div_backward_cuda(const at::Tensor& grad, const at::Tensor& input,
                                                          const at::Tensor& other, double eps) {
  check_div_args(input, other, eps, "safe_div_backward", at::kCUDA);
  check_device(grad, div_device(input, other), "safe_div_backward", "grad", false);
  check_same_dtype(grad, input, "safe_div_backward", "grad", "input");
  const auto shape = at::infer_size(input.sizes(), other.sizes());
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), "gradguard.safe_div_backward: `grad` has shape ", grad.sizes(),
              " but input and other broadcast to ", at::IntArrayRef(shape));
  const auto device = div_device(input, other);
  const c10::cuda::CUDAGuard guard(device);
  require_kernel_image();
  at::Tensor grad_input = empty_broadcast(input, other);
  at::Tensor grad_other = empty_broadcast(input, other);
  const at::Tensor input_d = on_device(input, device), other_d = on_device(other, device);
  auto iter = at::TensorIteratorConfig()
                  .add_output(grad_input)
                  .add_output(grad_other)
                  .add_const_input(grad)
                  .add_const_input(input_d)
                  .add_const_input(other_d)
                  .build();
  safe_div_backward_kernel(iter, eps);
  return {grad_input, grad_other};
}

}  // namespace
}  // namespace cuda

// The schemas are defined in Python (gradguard/_safe_math_ops.py); a build of this file without
// them is harmless: the dispatcher keeps an impl for a not-yet-defined op until its def arrives.
TORCH_LIBRARY_IMPL(gradguard, CUDA, m) {
  m.impl("safe_log", &cuda::safe_log_cuda);
  m.impl("safe_log.out", &cuda::safe_log_out_cuda);
  m.impl("safe_log_backward", &cuda::safe_log_backward_cuda);
  m.impl("safe_exp", &cuda::safe_exp_cuda);
  m.impl("safe_exp.out", &cuda::safe_exp_out_cuda);
  m.impl("safe_exp_backward", &cuda::safe_exp_backward_cuda);
  m.impl("safe_sqrt", &cuda::safe_sqrt_cuda);
  m.impl("safe_sqrt.out", &cuda::safe_sqrt_out_cuda);
  m.impl("safe_sqrt_backward", &cuda::safe_sqrt_backward_cuda);
  m.impl("safe_div", &cuda::safe_div_cuda);
  m.impl("safe_div.out", &cuda::safe_div_out_cuda);
  m.impl("safe_div_backward", &cuda::safe_div_backward_cuda);
}

}  // namespace gradguard
