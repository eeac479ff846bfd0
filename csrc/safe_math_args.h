// Argument rules of the safe-math ops, shared by the CPU and CUDA kernels so both refuse the same
// inputs with the same messages, and how the result of a broadcasting op is allocated.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/native/Resize.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <utility>

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

// A bound the tensor's dtype cannot hold is refused rather than rounded into something else in
// kind: a finite one beyond the dtype's largest finite value (eps=1e300 on float32, fill=1e10 on
// float16: inf), or, with `keep_nonzero`, a positive one below its smallest positive value
// (eps=1e-8 on float16: 0, and log would give -inf). Strict limits, not rounding thresholds:
// torch casts a double bound through float for float16/bfloat16, so values just past a limit
// round differently by path, and torch's own checked conversion already refuses past float's max.
// gradguard/reference/safe_math.py applies the same rule.
// An eps (`keep_nonzero`) of +inf is refused too: every element would be at or below it, the
// whole result the bound's (log(inf), sqrt's zero gradient, safe_div's fill).
inline void check_bound_fits(double v, at::ScalarType dtype, const char* op, const char* arg, bool keep_nonzero) {
  TORCH_CHECK_VALUE(!keep_nonzero || v != std::numeric_limits<double>::infinity(), "gradguard.", op, ": `", arg,
                    "` must be finite: at inf every element is at or below it");
  if (!std::isfinite(v)) return;
  double mx = 0.0, smallest = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_check_bound", [&] {
    using limits = std::numeric_limits<scalar_t>;
    using acc = at::opmath_type<scalar_t>;
    mx = static_cast<double>(static_cast<acc>(limits::max()));
    smallest = static_cast<double>(static_cast<acc>(limits::min())) * static_cast<double>(static_cast<acc>(limits::epsilon()));
  });
  const double a = std::fabs(v);
  TORCH_CHECK_VALUE(a <= mx, "gradguard.", op, ": `", arg, "`=", v, " overflows to ", v > 0 ? "inf" : "-inf", " in ",
                    dtype, " (largest finite value ", mx, "); pass a value the input's dtype can hold");
  TORCH_CHECK_VALUE(!keep_nonzero || a == 0.0 || a >= smallest, "gradguard.", op, ": `", arg, "`=", v,
                    " is below the smallest positive value of ", dtype, " (", smallest,
                    "): it rounds to 0 or up to that value, depending on the path; pass at least that, or 0 "
                    "to mean no bound");
}

// The backward ops' eps (safe_log_backward, safe_sqrt_backward), called directly or by the
// autograd formula after the forward's checks: not NaN, >= 0, finite (the forward's rules; the
// bound-fits rule is the forward's alone, as the backward computes in its own dtype's terms).
inline void check_backward_eps(double eps, const char* op) {
  check_param(eps, op, "eps", true);
  TORCH_CHECK_VALUE(eps != std::numeric_limits<double>::infinity(), "gradguard.", op,
                    ": `eps` must be finite: at inf every element is at or below it");
}

// Tensors of one call live on one device, as torch.div requires; the exception is torch's: a
// 0-dim CPU tensor operand (`scalar_ok`) goes with a tensor on any device. Without this a meta
// or other-device operand would be read as if it were memory of this device.
inline void check_device(const at::Tensor& t, c10::Device device, const char* op, const char* arg, bool scalar_ok) {
  if (t.device() == device) return;
  if (scalar_ok && t.dim() == 0 && t.device().is_cpu()) return;
  TORCH_CHECK(false, "gradguard.", op, ": expected all tensors to be on the same device, but `", arg, "` is on ",
              t.device(), " and the result on ", device, " (only a 0-dim CPU tensor operand may differ, as in torch.div)");
}

// The device a safe_div call computes on: torch's rule, where a 0-dim CPU operand does not decide.
inline c10::Device div_device(const at::Tensor& input, const at::Tensor& other) {
  if (input.dim() == 0 && input.device().is_cpu()) return other.device();
  return input.device();
}

inline void check_backward_operand(const at::Tensor& t, const at::Tensor& grad, const char* op, const char* arg) {
  check_same_dtype(t, grad, op, arg, "grad");
  TORCH_CHECK(t.sizes() == grad.sizes(), "gradguard.", op, ": `", arg, "` has shape ", t.sizes(), " but `grad` has ",
              grad.sizes(), "; they must match");
}

// A float16/bfloat16 `input` with a 0-dim float32 `other`: how torch.div divides such a tensor by
// a number (or by a 0-dim CPU float32 tensor), in float32 by the divisor's float32 value, rounded
// once to the input's dtype. The forward ops take it (the result has the input's dtype); the
// backward op does not (its autograd formula computes that case in float32, _safe_math_ops.py).
inline bool divides_by_float32(const at::Tensor& input, const at::Tensor& other) {
  const auto dt = input.scalar_type();
  return other.dim() == 0 && other.scalar_type() == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16);
}

// `kernel_device` is the device type of the kernel running the call: a call that dispatched here
// with its result elsewhere (a meta or other-device operand) is refused. `float32_divisor`: the
// forward ops, which also take divides_by_float32().
inline void check_div_args(const at::Tensor& input, const at::Tensor& other, double eps, const char* op,
                           c10::DeviceType kernel_device, bool float32_divisor = false) {
  check_float(input, op, "input");
  if (float32_divisor) {
    TORCH_CHECK(other.scalar_type() == input.scalar_type() || divides_by_float32(input, other), "gradguard.", op,
                ": `other` has dtype ", other.scalar_type(), " but `input` has ", input.scalar_type(),
                "; they must match, or `other` be a 0-dim float32 tensor with a float16/bfloat16 `input`");
  } else {
    check_same_dtype(other, input, op, "other", "input");
  }
  check_param(eps, op, "eps", true);
  check_bound_fits(eps, input.scalar_type(), op, "eps", true);
  const auto device = div_device(input, other);
  TORCH_CHECK(device.type() == kernel_device, "gradguard.", op, ": expected all tensors to be on the same device, "
              "but `input` is on ", input.device(), " and `other` on ", other.device());
  check_device(input, device, op, "input", true);
  check_device(other, device, op, "other", true);
}

// The unary ops and the backward ops: every tensor on the kernel's device, the first one's.
inline c10::Device check_on_kernel_device(std::initializer_list<std::pair<const at::Tensor*, const char*>> ts,
                                          const char* op, c10::DeviceType kernel_device) {
  const auto device = ts.begin()->first->device();
  for (const auto& [t, arg] : ts) {
    TORCH_CHECK(t->device().type() == kernel_device && t->device() == device, "gradguard.", op,
                ": expected all tensors to be on the same device, but `", arg, "` is on ", t->device(), " and `",
                ts.begin()->second, "` on ", device);
  }
  return device;
}

// `out` must be on the result's device, of its dtype; a wrong shape is resized as torch's out=
// functions do, except when `out` is one of the operands (`safe_div(a(2,3), b(3), out=b)`):
// resizing would rewrite the operand before it is read, and torch.div refuses that too.
inline void prepare_out(at::Tensor& out, const at::Tensor& like, at::IntArrayRef shape, const char* op,
                        c10::Device device, std::initializer_list<at::Tensor> operands) {
  TORCH_CHECK(out.device() == device, "gradguard.", op, ": `out` is on ", out.device(), " but the result is on ",
              device, "; pass an `out` on the result's device");
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), "gradguard.", op, ": `out` has dtype ", out.scalar_type(),
              " but the result has dtype ", like.scalar_type(), "; pass an `out` of the result's dtype");
  if (out.sizes() != shape) {
    for (const auto& t : operands) {
      TORCH_CHECK(!out.is_alias_of(t), "gradguard.", op, ": `out` with shape ", out.sizes(),
                  " is also an operand and doesn't match the broadcast shape ", shape,
                  " (it would be resized before it is read); pass an `out` of the broadcast shape");
    }
  }
  at::native::resize_output(out, shape);
  // As torch's own out= kernels (through ADInplaceOrView): autograd then refuses a backward that
  // needs the overwritten values, and an inference tensor outside inference mode is refused here.
  out.unsafeGetTensorImpl()->bump_version();
}

// An `out` that shares memory with an operand, other than as exactly its elements (in place),
// would be written before all of that operand is read. TensorIterator refuses the partial
// overlaps it can see, as torch does; between non-dense views of one storage it cannot tell
// (at::get_overlap_status: TooHard) and lets them through, and the kernels read values they had
// already overwritten. Such a call computes into a temporary and copies that into `out`, as the
// composite's out= does.
template <typename Kernel>
void write_out(at::Tensor& out, std::initializer_list<at::Tensor> operands, Kernel&& kernel) {
  for (const auto& t : operands) {
    if (out.is_alias_of(t) && at::get_overlap_status(out, t) == at::MemOverlapStatus::TooHard) {
      at::Tensor tmp = at::empty_like(out);
      kernel(tmp);
      out.copy_(tmp);
      return;
    }
  }
  kernel(out);
}

// The broadcast result, of a's dtype (b's may be float32: divides_by_float32), is laid out like
// whichever operand already has the result's shape and is on the result's device (as the fake
// kernel does), else contiguous.
inline at::Tensor empty_broadcast(const at::Tensor& a, const at::Tensor& b) {
  const auto shape = at::infer_size(a.sizes(), b.sizes());
  const auto device = div_device(a, b);
  if (a.sizes() == at::IntArrayRef(shape) && a.device() == device) return at::empty_like(a);
  if (b.sizes() == at::IntArrayRef(shape) && b.device() == device) return at::empty_like(b, a.options().device(device));
  return at::empty(shape, a.options().device(device));
}

}  // namespace safe_math_args
}  // namespace gradguard
