// Autograd of the safe math forward ops (safe_log, safe_exp, safe_sqrt, safe_div), in C++.
//
// Why here: the same formulas registered from Python (torch.library.register_autograd in
// gradguard/_safe_math_ops.py) run a Python wrapper on every call, ~10 us without grad and ~55 us
// with it on this VM (1,024 elements: safe_log 73 us against 14 for torch.log(torch.clamp(x))).
// On a GPU that host time is the op's whole cost below a few million elements. These kernels are
// device-independent (the Autograd alias key) and live in the CPU module; where that module is
// not loaded, gradguard registers the Python formulas instead (gradguard/_safe_math_ops.py).
//
// Values are those of the Python formulas, which stay the fallback and the oracle:
// - a first backward (grad mode off) calls the fused backward op below autograd;
// - a backward that builds a graph (create_graph=True, a second derivative) composes the same
//   differentiable aten ops as gradguard/reference/safe_math.py's *_backward (same values);
// - safe_div of a float16/bfloat16 input by a 0-dim float32 divisor takes the formulas in
//   float32 on float32 copies, as the Python formula does (gradguard.safe_div itself runs an
//   autograd Function of its own for that case, without the copies).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace gradguard {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The forward ops, called below autograd (Function::forward only turns grad mode off; the op
// would come back to these kernels).
Tensor call_log(const Tensor& x, double eps, bool st) {
  static auto op = find_op<Tensor(const Tensor&, double, bool)>("gradguard::safe_log");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, eps, st);
}
Tensor call_exp(const Tensor& x, double max, bool st) {
  static auto op = find_op<Tensor(const Tensor&, double, bool)>("gradguard::safe_exp");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, max, st);
}
Tensor call_sqrt(const Tensor& x, double eps) {
  static auto op = find_op<Tensor(const Tensor&, double)>("gradguard::safe_sqrt");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, eps);
}
Tensor call_div(const Tensor& x, const Tensor& y, double eps, double fill) {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, double, double)>("gradguard::safe_div");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, y, eps, fill);
}

// The fused backward ops, called below autograd: their results need no graph (grad mode is off),
// and the boxed autograd fallback would only add its own cost.
Tensor log_backward_op(const Tensor& g, const Tensor& x, double eps, bool st) {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, double, bool)>("gradguard::safe_log_backward");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(g, x, eps, st);
}
Tensor exp_backward_op(const Tensor& g, const Tensor& r, const Tensor& x, double max, bool st) {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool)>(
      "gradguard::safe_exp_backward");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(g, r, x, max, st);
}
Tensor sqrt_backward_op(const Tensor& g, const Tensor& x, double eps) {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, double)>("gradguard::safe_sqrt_backward");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(g, x, eps);
}
std::tuple<Tensor, Tensor> div_backward_op(const Tensor& g, const Tensor& x, const Tensor& y, double eps) {
  static auto op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>(
      "gradguard::safe_div_backward");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(g, x, y, eps);
}

// The differentiable formulas (reference/safe_math.py's safe_*_backward: the same operations on
// the same operands, so the same values; a dispatch mode may see them in another order). Masked
// elements divide by 1, so a second derivative has no 0 * inf.
Tensor log_backward_formula(const Tensor& g, const Tensor& x, double eps, bool st) {
  const Tensor c = at::clamp(x, eps);
  if (st) return g / c;
  const Tensor keep = x >= eps;
  return at::where(keep, g / at::where(keep, c, 1.0), 0.0);
}
Tensor exp_backward_formula(const Tensor& g, const Tensor& r, const Tensor& x, double max, bool st) {
  const Tensor gr = g * r;
  return st ? gr : at::where(x <= max, gr, 0.0);
}
Tensor sqrt_backward_formula(const Tensor& g, const Tensor& x, double eps) {
  const Tensor keep = x > eps;
  const Tensor root = at::sqrt(at::where(keep, x, 1.0));
  return at::where(keep, g / (root * 2), 0.0);
}
std::tuple<Tensor, Tensor> div_backward_formula(const Tensor& g, const Tensor& x, const Tensor& y, double eps) {
  const Tensor guard = y.abs() <= eps;
  const Tensor b = at::where(guard, 1.0, y);
  return {at::where(guard, 0.0, g / b), at::where(guard, 0.0, -g * ((x / b) / b))};
}

// A broadcast operand's gradient summed back to its shape, as torch.div's is; not summed where
// the shape is already its own (sum_to_size sums a 0-dim tensor: -0.0 would come back +0.0).
// Symbolic sizes: under torch.compile with dynamic shapes, sizes() pinned every size to a
// constant (a recompile per shape, and mark_dynamic's dims refused as specialized).
Tensor sum_to_shape(const Tensor& g, c10::SymIntArrayRef shape) {
  return g.sym_sizes() == shape ? g : g.sum_to_size_symint(shape);
}

struct SafeLog : public torch::autograd::Function<SafeLog> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double eps, bool st) {
    ctx->save_for_backward({x});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["st"] = st;
    return call_log(x, eps, st);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool st = ctx->saved_data["st"].toBool();
    const Tensor g = at::GradMode::is_enabled() ? log_backward_formula(grads[0], x, eps, st)
                                                : log_backward_op(grads[0], x, eps, st);
    return {g, Tensor(), Tensor()};
  }
};

struct SafeExp : public torch::autograd::Function<SafeExp> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double max, bool st) {
    Tensor r = call_exp(x, max, st);
    ctx->save_for_backward({r, x});
    ctx->saved_data["max"] = max;
    ctx->saved_data["st"] = st;
    return r;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const double max = ctx->saved_data["max"].toDouble();
    const bool st = ctx->saved_data["st"].toBool();
    const Tensor g = at::GradMode::is_enabled() ? exp_backward_formula(grads[0], saved[0], saved[1], max, st)
                                                : exp_backward_op(grads[0], saved[0], saved[1], max, st);
    return {g, Tensor(), Tensor()};
  }
};

struct SafeSqrt : public torch::autograd::Function<SafeSqrt> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double eps) {
    ctx->save_for_backward({x});
    ctx->saved_data["eps"] = eps;
    return call_sqrt(x, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor g = at::GradMode::is_enabled() ? sqrt_backward_formula(grads[0], x, eps)
                                                : sqrt_backward_op(grads[0], x, eps);
    return {g, Tensor()};
  }
};

struct SafeDiv : public torch::autograd::Function<SafeDiv> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, double eps, double fill) {
    // As torch.div: the input is saved only where the divisor needs a gradient (the input's
    // gradient needs the divisor alone), so that otherwise it may be changed in place after the
    // call; its sizes and dtype are kept instead.
    if (y.requires_grad()) {
      ctx->save_for_backward({y, x});
    } else {
      ctx->save_for_backward({y});
    }
    ctx->saved_data["x_sizes"] = x.sym_sizes();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["eps"] = eps;
    return call_div(x, y, eps, fill);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& y = saved[0];
    const Tensor x = saved.size() > 1 ? saved[1] : Tensor();
    const std::vector<c10::SymInt> x_sizes = ctx->saved_data["x_sizes"].toSymIntVector();
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor& g = grads[0];
    if (y.scalar_type() != x_dtype) {
      // A float16/bfloat16 input by a 0-dim float32 divisor: in float32, as the division was.
      const Tensor gf = g.to(at::kFloat);
      auto [gi, go] = div_backward_formula(gf, x.defined() ? x.to(at::kFloat) : gf, y, eps);
      return {gi.to(x_dtype), x.defined() ? sum_to_shape(go, y.sym_sizes()) : Tensor(), Tensor(), Tensor()};
    }
    // Without the input (the divisor needs no gradient) the gradient stands in for it: the same
    // dtype and the broadcast shape, and the divisor's gradient made from it is dropped.
    const Tensor& xs = x.defined() ? x : g;
    auto [gi, go] = at::GradMode::is_enabled() ? div_backward_formula(g, xs, y, eps) : div_backward_op(g, xs, y, eps);
    return {sum_to_shape(gi, x_sizes), x.defined() ? sum_to_shape(go, y.sym_sizes()) : Tensor(), Tensor(), Tensor()};
  }
};

// Where nothing is recorded (grad mode off or no operand requiring grad, and no forward-mode
// tangent, which Function::apply would refuse anyway), the kernel is called directly: building and
// discarding a graph node cost ~1 us a call.
bool records(const Tensor& t) {
  return (at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined();
}

Tensor safe_log_autograd(const Tensor& x, double eps, bool st) {
  return records(x) ? SafeLog::apply(x, eps, st) : call_log(x, eps, st);
}
Tensor safe_exp_autograd(const Tensor& x, double max, bool st) {
  return records(x) ? SafeExp::apply(x, max, st) : call_exp(x, max, st);
}
Tensor safe_sqrt_autograd(const Tensor& x, double eps) {
  return records(x) ? SafeSqrt::apply(x, eps) : call_sqrt(x, eps);
}
Tensor safe_div_autograd(const Tensor& x, const Tensor& y, double eps, double fill) {
  return records(x) || records(y) ? SafeDiv::apply(x, y, eps, fill) : call_div(x, y, eps, fill);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, Autograd, m) {
  m.impl("safe_log", &safe_log_autograd);
  m.impl("safe_exp", &safe_exp_autograd);
  m.impl("safe_sqrt", &safe_sqrt_autograd);
  m.impl("safe_div", &safe_div_autograd);
}

}  // namespace gradguard
