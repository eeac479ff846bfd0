"""The safe math dispatcher ops: schemas, fake kernels, autograd, and the reference kernels
registered as each op's default implementation (gradguard/_C registers the CPU kernels).

Every forward op takes plain floats for its bounds (the Python API has already validated them
and read a 0-dim tensor bound) and a tensor of one floating dtype; safe_div's two tensors share
that dtype and broadcast, or (torch.div by a number) a float16/bfloat16 input is divided by a
0-dim float32 divisor, in float32, rounded once to the input's dtype. ``straight_through`` does not change a forward value: it is in the
forward schema so that autograd knows which backward to run.

Backward ops are ops of their own (one fused pass each). Their outputs are not differentiable
by the dispatcher; when a second derivative is asked for (grad mode on inside backward), the
autograd formulas below compose the backward from differentiable torch ops instead, with the
same values.
"""
from __future__ import annotations

import torch

from gradguard import _ops  # noqa: F401  (the DEF library of the namespace must exist before a FRAGMENT)
from gradguard.reference import safe_math as ref

_lib = torch.library.Library("gradguard", "FRAGMENT")

_lib.define("safe_log(Tensor input, float eps, bool straight_through) -> Tensor")
_lib.define("safe_log.out(Tensor input, float eps, bool straight_through, *, Tensor(a!) out) -> ()")
_lib.define("safe_log_backward(Tensor grad, Tensor input, float eps, bool straight_through) -> Tensor")
_lib.define("safe_exp(Tensor input, float max, bool straight_through) -> Tensor")
_lib.define("safe_exp.out(Tensor input, float max, bool straight_through, *, Tensor(a!) out) -> ()")
_lib.define("safe_exp_backward(Tensor grad, Tensor result, Tensor input, float max, bool straight_through) -> Tensor")
_lib.define("safe_sqrt(Tensor input, float eps) -> Tensor")
_lib.define("safe_sqrt.out(Tensor input, float eps, *, Tensor(a!) out) -> ()")
_lib.define("safe_sqrt_backward(Tensor grad, Tensor input, float eps) -> Tensor")
_lib.define("safe_div(Tensor input, Tensor other, float eps, float fill) -> Tensor")
_lib.define("safe_div.out(Tensor input, Tensor other, float eps, float fill, *, Tensor(a!) out) -> ()")
_lib.define("safe_div_backward(Tensor grad, Tensor input, Tensor other, float eps) -> (Tensor, Tensor)")


def _laid_out_like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t with the strides the fake kernel promises (empty_like(like)); copies only if they differ.
    The reference backward functions stay plain differentiable compositions for double backward."""
    want = torch.empty_like(like)
    return t if want.stride() == t.stride() else want.copy_(t)


def _log_backward_default(grad, input, eps, straight_through):
    return _laid_out_like(input, ref.safe_log_backward(grad, input, eps, straight_through))


def _exp_backward_default(grad, result, input, max, straight_through):
    return _laid_out_like(input, ref.safe_exp_backward(grad, result, input, max, straight_through))


def _sqrt_backward_default(grad, input, eps):
    return _laid_out_like(input, ref.safe_sqrt_backward(grad, input, eps))


def _div_backward_default(grad, input, other, eps):
    like = ref.empty_broadcast(input, other)
    return tuple(_laid_out_like(like, t) for t in ref.safe_div_backward(grad, input, other, eps))


_DEFAULTS = {
    "safe_log": ref.safe_log,
    "safe_log.out": ref.safe_log_out,
    "safe_log_backward": _log_backward_default,
    "safe_exp": ref.safe_exp,
    "safe_exp.out": ref.safe_exp_out,
    "safe_exp_backward": _exp_backward_default,
    "safe_sqrt": ref.safe_sqrt,
    "safe_sqrt.out": ref.safe_sqrt_out,
    "safe_sqrt_backward": _sqrt_backward_default,
    "safe_div": ref.safe_div,
    "safe_div.out": ref.safe_div_out,
    "safe_div_backward": _div_backward_default,
}
for _name, _fn in _DEFAULTS.items():
    torch.library.impl(f"gradguard::{_name}", "default", lib=_lib)(_fn)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- fake kernels: the same allocation rules as the CPU kernels ---------------------------------

def _check_float(t, op, arg="input"):
    torch._check(t.dtype in _FLOAT_DTYPES,
                 lambda: f"gradguard.{op}: `{arg}` must be float16, bfloat16, float32 or float64, got {t.dtype}")


_BOUND_ARG = {"safe_log": ("eps", True), "safe_exp": ("max", False), "safe_sqrt": ("eps", True)}


def _unary_fake(op):
    def fake(input, bound, *args):
        _check_float(input, op)
        ref.check_bound_fits(bound, input.dtype, op, *_BOUND_ARG[op])
        return torch.empty_like(input)
    return fake


def _unary_out_fake(op):
    def fake(input, bound, *args, out):
        _check_float(input, op)
        ref.check_bound_fits(bound, input.dtype, op, *_BOUND_ARG[op])
        ref.check_devices(op, input.device, out=out)
        ref._check_out_dtype(out, input.dtype, op)  # as the kernels refuse it
    return fake


for _op in ("safe_log", "safe_exp", "safe_sqrt"):
    torch.library.register_fake(f"gradguard::{_op}", _unary_fake(_op), lib=_lib)
    torch.library.register_fake(f"gradguard::{_op}.out", _unary_out_fake(_op), lib=_lib)


@torch.library.register_fake("gradguard::safe_log_backward", lib=_lib)
def _safe_log_backward_fake(grad, input, eps, straight_through):
    _check_float(grad, "safe_log_backward", "grad")
    ref.check_devices("safe_log_backward", grad.device, input=input)
    ref.check_backward_eps(eps, "safe_log_backward")
    return torch.empty_like(input)


@torch.library.register_fake("gradguard::safe_exp_backward", lib=_lib)
def _safe_exp_backward_fake(grad, result, input, max, straight_through):
    _check_float(grad, "safe_exp_backward", "grad")
    ref.check_devices("safe_exp_backward", grad.device, result=result, input=input)
    return torch.empty_like(input)


@torch.library.register_fake("gradguard::safe_sqrt_backward", lib=_lib)
def _safe_sqrt_backward_fake(grad, input, eps):
    _check_float(grad, "safe_sqrt_backward", "grad")
    ref.check_devices("safe_sqrt_backward", grad.device, input=input)
    ref.check_backward_eps(eps, "safe_sqrt_backward")
    return torch.empty_like(input)


def _check_div(input, other, op, eps, fill=None):
    _check_float(input, op)
    ref.check_div_args(op, input, other, eps, fill)  # the dtypes too (fill: a forward op)


@torch.library.register_fake("gradguard::safe_div", lib=_lib)
def _safe_div_fake(input, other, eps, fill):
    _check_div(input, other, "safe_div", eps, fill)
    return ref.empty_broadcast(input, other)


@torch.library.register_fake("gradguard::safe_div.out", lib=_lib)
def _safe_div_out_fake(input, other, eps, fill, *, out):
    _check_div(input, other, "safe_div", eps, fill)
    ref.check_devices("safe_div", ref.div_device(input, other), out=out)
    ref._check_out_dtype(out, input.dtype, "safe_div")


@torch.library.register_fake("gradguard::safe_div_backward", lib=_lib)
def _safe_div_backward_fake(grad, input, other, eps):
    _check_div(input, other, "safe_div_backward", eps)
    ref.check_devices("safe_div_backward", ref.div_device(input, other), grad=grad)
    return ref.empty_broadcast(input, other), ref.empty_broadcast(input, other)


# ---- autograd ---------------------------------------------------------------------------------

def _log_setup(ctx, inputs, output):
    input, eps, straight_through = inputs
    ctx.save_for_backward(input)
    ctx.eps, ctx.straight_through = eps, straight_through


def _log_backward(ctx, grad):
    (input,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        g = ref.safe_log_backward(grad, input, ctx.eps, ctx.straight_through)
    else:
        g = torch.ops.gradguard.safe_log_backward(grad, input, ctx.eps, ctx.straight_through)
    return g, None, None


def _exp_setup(ctx, inputs, output):
    input, max, straight_through = inputs
    ctx.save_for_backward(output, input)
    ctx.max, ctx.straight_through = max, straight_through


def _exp_backward(ctx, grad):
    result, input = ctx.saved_tensors
    if torch.is_grad_enabled():
        g = ref.safe_exp_backward(grad, result, input, ctx.max, ctx.straight_through)
    else:
        g = torch.ops.gradguard.safe_exp_backward(grad, result, input, ctx.max, ctx.straight_through)
    return g, None, None


def _sqrt_setup(ctx, inputs, output):
    input, eps = inputs
    ctx.save_for_backward(input)
    ctx.eps = eps


def _sqrt_backward(ctx, grad):
    (input,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        g = ref.safe_sqrt_backward(grad, input, ctx.eps)
    else:
        g = torch.ops.gradguard.safe_sqrt_backward(grad, input, ctx.eps)
    return g, None


def _div_setup(ctx, inputs, output):
    input, other, eps, fill = inputs
    # As torch.div: the input is saved only where the divisor needs a gradient (the input's needs
    # the divisor alone), so that otherwise it may be changed in place after the call.
    ctx.save_for_backward(other, input) if other.requires_grad else ctx.save_for_backward(other)
    ctx.input_shape, ctx.input_dtype = input.shape, input.dtype
    ctx.eps = eps


def _div_backward(ctx, grad):
    other, *rest = ctx.saved_tensors
    input = rest[0] if rest else None
    # Without the input the gradient stands in for it (its dtype, the broadcast shape); the
    # divisor's gradient made from it is dropped.
    if other.dtype != ctx.input_dtype:
        # A float16/bfloat16 input by a 0-dim float32 divisor (ref.divides_by_float32): the
        # formulas in float32, as the division was, on float32 copies of the whole tensors.
        # (gradguard.safe_div runs its own autograd Function for this case, without the copies.)
        g = grad.float()
        gi, go = ref.safe_div_backward(g, g if input is None else input.float(), other, ctx.eps)
        return gi.to(ctx.input_dtype), None if input is None else _sum_to(go, other.shape), None, None
    xs = grad if input is None else input
    if torch.is_grad_enabled():
        gi, go = ref.safe_div_backward(grad, xs, other, ctx.eps)
    else:
        gi, go = torch.ops.gradguard.safe_div_backward(grad, xs, other, ctx.eps)
    return _sum_to(gi, ctx.input_shape), None if input is None else _sum_to(go, other.shape), None, None


def _sum_to(grad, shape):
    # A broadcast operand's gradient summed back to its shape, as torch.div's is; not summed where
    # the shape is already its own (sum_to_size sums a 0-dim tensor: -0.0 came back +0.0).
    return grad if grad.shape == shape else grad.sum_to_size(shape)


_AUTOGRAD = {
    "safe_log": (_log_backward, _log_setup),
    "safe_exp": (_exp_backward, _exp_setup),
    "safe_sqrt": (_sqrt_backward, _sqrt_setup),
    "safe_div": (_div_backward, _div_setup),
}


def register_python_autograd() -> None:
    """Registers the formulas above on each forward op that has no Autograd kernel yet; called
    once the compiled modules are loaded (gradguard/__init__.py). The CPU module registers the
    same formulas in C++ (csrc/cpu/safe_math_autograd.cpp): a Python autograd kernel runs a Python
    wrapper on every call, 10-55 us, the whole cost of the op on a small tensor."""
    for name, (backward, setup) in _AUTOGRAD.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"gradguard::{name}", "Autograd"):
            torch.library.register_autograd(f"gradguard::{name}", backward, setup_context=setup, lib=_lib)


# Under CUDA autocast torch.log and torch.exp run in float32 (autocast's fp32 list): a float16
# input gives a float32 result. These ops had no autocast kernel, so safe_log(x16) stayed float16,
# where the composite it stands for is float32 (the sigmoid outputs of the README's first example
# differed by up to 9e-4). As aten's fp32 policy: float16/bfloat16 tensors are cast to float32,
# float32/float64 are left as they are, and the op runs with autocast off. (CPU autocast keeps
# log/exp in the input's dtype, and so do these; sqrt and div are on neither list.)
_AUTOCAST_CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)


def _autocast_to_float32(op):
    def kernel(keyset, input, *args):
        if input.dtype in (torch.float16, torch.bfloat16):
            input = input.float()
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CUDA):
            return op(input, *args)
    return kernel


for _op in ("safe_log", "safe_exp"):
    _lib.impl(_op, _autocast_to_float32(getattr(torch.ops.gradguard, _op).default), "AutocastCUDA", with_keyset=True)
