"""Reference kernels of the safe math ops: the eager composites themselves.

The public semantics are defined as these compositions of torch ops (so the compiled kernels
must match them bit for bit), and they are the default kernels of the ops wherever no compiled
kernel is registered. The backward functions are also what autograd uses when a second
derivative is needed: every op here is differentiable.

A bound (eps, max, fill) is a Python float that torch rounds to the tensor's dtype, exactly as
``torch.clamp(x, min=eps)`` does; one the dtype cannot hold is refused (check_bound_fits), and
operands on other devices too (check_devices), as the compiled kernels refuse them. Forward results are allocated as the fake kernels promise
(``torch.empty_like(input)``, or ``empty_broadcast``) and written with ``out=``.
"""
from __future__ import annotations

import math
import warnings

import torch


def resize_out(out: torch.Tensor, shape, op: str, operands=()) -> None:
    """torch's out= convention: a wrong-shaped `out` is resized (with a warning if it held data),
    except when `out` is also an operand: resizing it would rewrite the operand before it is read
    (``safe_div(a(2,3), b(3), out=b)``), and torch.div refuses that too."""
    if out.shape != torch.Size(shape):
        for t in operands:
            if _aliases(out, t):
                raise RuntimeError(f"gradguard.{op}: `out` with shape {list(out.shape)} is also an operand and "
                                   f"doesn't match the broadcast shape {list(shape)} (it would be resized before "
                                   "it is read); pass an `out` of the broadcast shape")
        if out.numel() != 0:
            warnings.warn(f"gradguard.{op}: an output with one or more elements was resized since it had shape "
                          f"{list(out.shape)}, which does not match the required output shape {list(shape)}. "
                          "Pass an output of the right shape, or of 0 elements.", UserWarning, stacklevel=4)
        out.resize_(shape)


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.device.type == "meta":
        return a is b
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.untyped_storage().nbytes() > 0


def div_device(input: torch.Tensor, other: torch.Tensor) -> torch.device:
    """The device safe_div computes on: torch's rule, where a 0-dim CPU operand does not decide."""
    if input.dim() == 0 and input.device.type == "cpu":
        return other.device
    return input.device


def check_devices(op: str, device: torch.device, scalar_ok=(), **tensors: torch.Tensor) -> None:
    """Every tensor on `device` (torch.div's rule; the names in `scalar_ok` may also be 0-dim CPU
    tensors). Checked by every kernel of the op, so a meta or other-device operand is refused
    instead of being read as memory of this device."""
    for name, t in tensors.items():
        if t.device == device or (name in scalar_ok and t.dim() == 0 and t.device.type == "cpu"):
            continue
        raise RuntimeError(f"gradguard.{op}: expected all tensors to be on the same device, but `{name}` is on "
                           f"{t.device} and the result on {device} (only a 0-dim CPU tensor operand may differ, "
                           "as in torch.div)")


def check_bound_fits(v: float, dtype: torch.dtype, op: str, arg: str, keep_nonzero: bool) -> None:
    """A bound the tensor's dtype cannot hold is refused rather than rounded into something else in
    kind: a finite one beyond the dtype's largest finite value (eps=1e300 on float32, fill=1e10 on
    float16), or, with `keep_nonzero`, a positive one below its smallest positive value (eps=1e-8
    on float16, where log would give -inf). Strict limits, the same as csrc/safe_math_args.h's.
    An eps (`keep_nonzero`) of +inf is refused too: every element would be at or below it."""
    if keep_nonzero and v == math.inf:
        raise ValueError(f"gradguard.{op}: `{arg}` must be finite: at inf every element is at or below it")
    if v != v or v in (math.inf, -math.inf):
        return
    fi = torch.finfo(dtype)
    a = abs(v)
    if a > fi.max:
        raise ValueError(f"gradguard.{op}: `{arg}`={v!r} overflows to {'inf' if v > 0 else '-inf'} in {dtype} "
                         f"(largest finite value {fi.max!r}); pass a value the input's dtype can hold")
    smallest = fi.tiny * fi.eps
    if keep_nonzero and 0.0 < a < smallest:
        raise ValueError(f"gradguard.{op}: `{arg}`={v!r} is below the smallest positive value of {dtype} "
                         f"({smallest!r}): it rounds to 0 or up to that value, depending on the path; pass at "
                         "least that, or 0 to mean no bound")


def check_no_partial_overlap(out: torch.Tensor, operands) -> None:
    """torch's rule for out= (the compiled kernels get it from TensorIterator): an `out` that is
    exactly an operand is fine (in place), one that shares only some of its memory is refused.
    Decided, as torch decides it, only where both are dense; other layouts are not checked."""
    dense = torch.ops.aten.is_non_overlapping_and_dense
    if out.numel() == 0 or out.device.type == "meta" or not dense(out):
        return
    a0 = out.data_ptr()
    a1 = a0 + out.numel() * out.element_size()
    for t in operands:
        if (not isinstance(t, torch.Tensor) or t.device != out.device or t.numel() == 0
                or not dense(t) or not _aliases(out, t)):
            continue
        b0 = t.data_ptr()
        b1 = b0 + t.numel() * t.element_size()
        if (a0, a1) == (b0, b1) and out.stride() == t.stride():
            continue
        if a0 < b1 and b0 < a1:
            raise RuntimeError("unsupported operation: some elements of the input tensor and the written-to tensor "
                               "refer to a single memory location. Please clone() the tensor before performing the "
                               "operation.")


def _check_out_dtype(out: torch.Tensor, dtype: torch.dtype, op: str) -> None:
    if out.dtype != dtype:
        raise RuntimeError(f"gradguard.{op}: `out` has dtype {out.dtype} but the result has dtype {dtype}; "
                           "pass an `out` of the result's dtype")


def empty_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """safe_div's result, of a's dtype (b's may be float32: divides_by_float32): laid out like
    whichever operand already has the broadcast shape and is on the result's device."""
    shape = torch.broadcast_shapes(a.shape, b.shape)
    device = div_device(a, b)
    if a.shape == shape and a.device == device:
        return torch.empty_like(a)
    if b.shape == shape and b.device == device:
        return torch.empty_like(b, dtype=a.dtype)
    return a.new_empty(shape, device=device)


def check_param(v: float, op: str, arg: str, nonneg: bool) -> None:
    """csrc/safe_math_args.h's check_param: a bound is not NaN, and an eps not negative
    (RuntimeError, as the compiled kernels raise). The public functions check before, with
    errors of their own; this is for the ops called directly (torch.ops.gradguard.*), which
    took a NaN or negative eps here and refused it in the compiled kernels."""
    if v != v:
        raise RuntimeError(f"gradguard.{op}: `{arg}` must not be NaN")
    if nonneg and v < 0.0:
        raise RuntimeError(f"gradguard.{op}: `{arg}` must be >= 0, got {v}")


def _check_unary(op: str, input: torch.Tensor, arg: str, bound: float, keep_nonzero: bool, out=None) -> None:
    check_param(bound, op, arg, keep_nonzero)
    check_bound_fits(bound, input.dtype, op, arg, keep_nonzero)
    if out is not None:
        check_devices(op, input.device, out=out)


def safe_log(input: torch.Tensor, eps: float, straight_through: bool) -> torch.Tensor:
    _check_unary("safe_log", input, "eps", eps, True)
    return torch.log(torch.clamp(input, min=eps), out=torch.empty_like(input))


def safe_log_out(input: torch.Tensor, eps: float, straight_through: bool, *, out: torch.Tensor) -> None:
    _check_unary("safe_log", input, "eps", eps, True, out)
    _check_out_dtype(out, input.dtype, "safe_log")
    resize_out(out, input.shape, "safe_log", (input,))
    check_no_partial_overlap(out, (input,))
    torch.log(torch.clamp(input, min=eps), out=out)


def check_backward_eps(eps: float, op: str) -> None:
    """The backward ops' eps: not NaN, >= 0 (RuntimeError, as the compiled kernels' check_param),
    finite (ValueError); csrc/safe_math_args.h's check_backward_eps."""
    check_param(eps, op, "eps", True)
    if eps == math.inf:
        raise ValueError(f"gradguard.{op}: `eps` must be finite: at inf every element is at or below it")


def safe_log_backward(grad: torch.Tensor, input: torch.Tensor, eps: float, straight_through: bool) -> torch.Tensor:
    check_devices("safe_log_backward", grad.device, input=input)
    check_backward_eps(eps, "safe_log_backward")
    # torch's log backward (grad / x) applied to the clamped x, then clamp's backward (pass where
    # input >= eps, including the boundary) unless the gradient goes straight through.
    c = torch.clamp(input, min=eps)
    if straight_through:
        return grad / c
    # Masked elements divide by 1 instead of c: same values, and no 0 * inf in a second
    # derivative when eps == 0 (the double-where idiom).
    keep = input >= eps
    return torch.where(keep, grad / torch.where(keep, c, 1.0), 0.0)


def safe_exp(input: torch.Tensor, max: float, straight_through: bool) -> torch.Tensor:
    _check_unary("safe_exp", input, "max", max, False)
    return torch.exp(torch.clamp(input, max=max), out=torch.empty_like(input))


def safe_exp_out(input: torch.Tensor, max: float, straight_through: bool, *, out: torch.Tensor) -> None:
    _check_unary("safe_exp", input, "max", max, False, out)
    _check_out_dtype(out, input.dtype, "safe_exp")
    resize_out(out, input.shape, "safe_exp", (input,))
    check_no_partial_overlap(out, (input,))
    torch.exp(torch.clamp(input, max=max), out=out)


def safe_exp_backward(grad: torch.Tensor, result: torch.Tensor, input: torch.Tensor, max: float,
                      straight_through: bool) -> torch.Tensor:
    check_devices("safe_exp_backward", grad.device, result=result, input=input)
    g = grad * result
    return g if straight_through else torch.where(input <= max, g, 0.0)


def safe_sqrt(input: torch.Tensor, eps: float) -> torch.Tensor:
    _check_unary("safe_sqrt", input, "eps", eps, True)
    return torch.sqrt(torch.clamp(input, min=0.0), out=torch.empty_like(input))


def safe_sqrt_out(input: torch.Tensor, eps: float, *, out: torch.Tensor) -> None:
    _check_unary("safe_sqrt", input, "eps", eps, True, out)
    _check_out_dtype(out, input.dtype, "safe_sqrt")
    resize_out(out, input.shape, "safe_sqrt", (input,))
    check_no_partial_overlap(out, (input,))
    torch.sqrt(torch.clamp(input, min=0.0), out=out)


def safe_sqrt_backward(grad: torch.Tensor, input: torch.Tensor, eps: float) -> torch.Tensor:
    check_devices("safe_sqrt_backward", grad.device, input=input)
    check_backward_eps(eps, "safe_sqrt_backward")
    # torch's sqrt backward (grad / (2 sqrt(x))) where x > eps; zero at and below eps, where it
    # would be inf (x = 0) or huge. Above eps the clamp is the identity, so sqrt of the masked
    # input has the forward's values, and a second derivative never sees sqrt'(0).
    keep = input > eps
    root = torch.sqrt(torch.where(keep, input, 1.0))
    return torch.where(keep, grad / (2 * root), 0.0)


def divides_by_float32(input: torch.Tensor, other: torch.Tensor) -> bool:
    """A float16/bfloat16 `input` with a 0-dim float32 `other`: how torch.div divides such a tensor
    by a number (or a 0-dim CPU float32 tensor), in float32 by the divisor's float32 value,
    rounded once. The forward ops take it (the result has the input's dtype), the backward op
    does not (csrc/safe_math_args.h has the same rule)."""
    return other.dim() == 0 and other.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)


def check_div_args(op: str, input: torch.Tensor, other: torch.Tensor, eps: float, fill: float | None = None) -> None:
    if other.dtype != input.dtype and not (fill is not None and divides_by_float32(input, other)):
        # `fill` is given by the forward ops only.
        raise RuntimeError(f"gradguard.{op}: `other` has dtype {other.dtype} but `input` has {input.dtype}; they "
                           "must match" + (", or `other` be a 0-dim float32 tensor with a float16/bfloat16 `input`"
                                           if fill is not None else ""))
    check_devices(op, div_device(input, other), ("input", "other"), input=input, other=other)
    check_param(eps, op, "eps", True)
    check_bound_fits(eps, input.dtype, op, "eps", True)
    if fill is not None:
        check_bound_fits(fill, input.dtype, op, "fill", False)


def _div_guard(other: torch.Tensor, eps: float) -> torch.Tensor:
    return other.abs() <= eps


def safe_div(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float) -> torch.Tensor:
    check_div_args("safe_div", input, other, eps, fill)
    if other.dtype != input.dtype:
        return _div_by_float32(input, other, eps, fill)
    # A NaN numerator is never replaced by `fill`: the guard only hides a division by ~0.
    # (The input first: a shape mismatch then names the operands as torch.div does, a before b.)
    guard = ~torch.isnan(input) & _div_guard(other, eps)
    result = empty_broadcast(input, other)
    # A fill on the result's device: no host-to-device copy of the value.
    fill_t = torch.full((), fill, dtype=input.dtype, device=result.device)
    return torch.where(guard, fill_t, input / other, out=result)


# Elements per float32 piece of _div_by_float32: 4 MB a float32 buffer, so that the buffers stay in
# a CPU's last-level cache between the passes over a piece.
DIV_PIECE = 1 << 20


def _div_by_float32(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float) -> torch.Tensor:
    """divides_by_float32: the float32 division, DIV_PIECE elements at a time through two reused
    float32 buffers (the compiled kernels widen each element in registers). Float32 copies of the
    whole input held 5x the input's bytes at once: out of memory at 2^31 float16 elements on a
    24 GiB machine, where torch.div fits."""
    result = empty_broadcast(input, other)
    if input.device != result.device:  # a 0-dim CPU input divided on another device
        input = input.to(result.device)
    if other.device != result.device:
        # A 0-dim CPU divisor, filled on the device (reading it costs no sync): torch's CUDA
        # division by a CPU scalar multiplies by its reciprocal, where the kernels divide.
        other = torch.full((), float(other), dtype=torch.float32, device=result.device)
    if not is_dense(result):  # not expected (empty_like is dense but for odd empty shapes): at once
        return result.copy_(safe_div(input.to(torch.float32), other, eps, fill))
    xs = in_layout_of(input, result)
    xbuf, rbuf = float32_buffers(2, xs)
    guard = _div_guard(other, eps)
    fill_t = torch.full((), fill, dtype=torch.float32, device=result.device)
    for xp, rp in pieces(xs, result):
        xb, rb = xbuf[:xp.numel()], rbuf[:xp.numel()]
        xb.copy_(xp)
        torch.div(xb, other, out=rb)
        rp.copy_(torch.where(guard & ~torch.isnan(xb), fill_t, rb, out=rb))
    return result


def flat_memory(t: torch.Tensor) -> torch.Tensor:
    """The elements of a non-overlapping, dense tensor in memory order, as a 1-D view."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def pieces(*tensors: torch.Tensor):
    """Matching DIV_PIECE-element slices of tensors of one shape and one dense layout."""
    flat = [flat_memory(t) for t in tensors]
    for start in range(0, flat[0].numel(), DIV_PIECE):
        yield tuple(t[start:start + DIV_PIECE] for t in flat)


def float32_buffers(count: int, like: torch.Tensor) -> list[torch.Tensor]:
    # Reused by every piece: a fresh 4 MB tensor a piece is an allocation and its page faults.
    size = min(like.numel(), DIV_PIECE)
    return [torch.empty(size, dtype=torch.float32, device=like.device) for _ in range(count)]


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill numel() consecutive places of memory."""
    expect = 1
    for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if st != expect:
            return False
        expect *= sz
    return True


def in_layout_of(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """t itself if it has `layout`'s (dense) strides, else a copy of t in them."""
    return t if t.stride() == layout.stride() and is_dense(t) else torch.empty_like(layout).copy_(t)


def safe_div_out(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float, *,
                 out: torch.Tensor) -> None:
    check_div_args("safe_div", input, other, eps, fill)
    check_devices("safe_div", div_device(input, other), out=out)
    _check_out_dtype(out, input.dtype, "safe_div")
    resize_out(out, torch.broadcast_shapes(input.shape, other.shape), "safe_div", (input, other))
    check_no_partial_overlap(out, (input, other))
    out.copy_(safe_div(input, other, eps, fill))


def safe_div_backward(grad: torch.Tensor, input: torch.Tensor, other: torch.Tensor, eps: float):
    """Both gradients at the broadcast shape (the caller reduces them to each operand's shape):
    torch.div's formulas, zero where |other| <= eps. Guarded divisors are replaced by 1 before
    dividing, so a second derivative has no 0 * inf either."""
    check_div_args("safe_div_backward", input, other, eps)
    check_devices("safe_div_backward", div_device(input, other), grad=grad)
    guard = _div_guard(other, eps)
    b = torch.where(guard, 1.0, other)
    grad_input = torch.where(guard, 0.0, grad / b)
    grad_other = torch.where(guard, 0.0, -grad * ((input / b) / b))
    return grad_input, grad_other


# ---- the composite path taken under torch.compile --------------------------------------------------
#
# Under torch.compile the public functions call these instead of the custom ops: an opaque op is a
# fusion barrier (one more full read and write of the tensor each way), while these are plain aten
# ops that inductor fuses with their neighbours (softmax, the loss, the backward). Each is a
# torch.autograd.Function whose forward is the eager definition above and whose backward is the
# reference backward above, so the gradient is the defined one (straight-through, the gradient
# exactly at the bound, zero at NaN) rather than whatever clamp's autograd gives on this torch.
# Dynamo traces both into the graph (fullgraph=True works); the values differ from eager only by
# inductor's own log/exp/sqrt (measured in the README).

def _bound(x: torch.Tensor, v: float) -> torch.Tensor:
    # The bound as a 0-dim tensor of x's dtype, rounded as the eager kernels round it (to float,
    # then to the dtype: c10's Half/BFloat16 are made from a float). Inductor computes
    # float16/bfloat16 in float32, where an unrounded bound would move the mask `x >= eps` off
    # the clamp's own boundary; and it kept a float16/bfloat16 `full` at the unrounded value
    # (at x == bfloat16(1e-3), d safe_log/dx was 0 compiled, 1000 eager): an explicit cast it
    # does round.
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.full((), v, dtype=torch.float32, device=x.device).to(x.dtype)
    return torch.full((), v, dtype=x.dtype, device=x.device)


def device_scalar(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A number as a 0-dim tensor filled on the device (torch.tensor(number, device=cuda) would
    be a blocking host-to-device copy). Under torch.compile made by arithmetic instead: torch.full
    fixes the number into the graph, so a value that changes per call (a divisor, a clipping
    schedule) recompiled at every call. 0 + v is v, but for -0.0, which becomes +0.0."""
    if torch.compiler.is_compiling():
        return torch.zeros((), dtype=dtype, device=device) + value
    return torch.full((), value, dtype=dtype, device=device)


def _clamp_min(x: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    # Eager torch.clamp's values exactly, NaN and -0.0 included: inductor lowers clamp to a
    # maximum that turns clamp(-0.0, min=0) into +0.0 (so sqrt(-0.0) and a gradient 1/-0.0 would
    # change sign); a select keeps the input wherever it is not below the bound.
    return torch.where(x < lo, lo, x)


# The defined derivatives, shared by both kinds of Function below (a backward's vector-Jacobian
# product and a jvp's Jacobian-vector product are the same elementwise factor).
def _log_derivative(input, eps, straight_through, g):
    e = _bound(input, eps)
    if straight_through:
        return g / _clamp_min(input, e)
    # Where the gradient passes the clamp is the identity: divide by the input itself.
    keep = input >= e
    return torch.where(keep, g / torch.where(keep, input, 1.0), 0.0)


def _exp_derivative(result, input, max, straight_through, g):
    g = g * result
    if not straight_through:
        g = torch.where(input <= _bound(input, max), g, 0.0)
    return g


def _sqrt_derivative(input, eps, g):
    keep = input > _bound(input, eps)
    return torch.where(keep, g / (2 * torch.sqrt(torch.where(keep, input, 1.0))), 0.0)


def _div_parts(other, eps):
    guard = other.abs() <= _bound(other, eps)
    b = torch.where(guard, 1.0, other)
    return guard, b


def _log_value(input, eps):
    return torch.log(_clamp_min(input, _bound(input, eps)))


def _exp_value(input, max):
    m = _bound(input, max)
    return torch.exp(torch.where(input > m, m, input))


def _sqrt_value(input):
    return torch.sqrt(_clamp_min(input, _bound(input, 0.0)))


def _div_value(input, other, eps, fill):
    guard = (other.abs() <= _bound(other, eps)) & ~torch.isnan(input)
    return torch.where(guard, _bound(input, fill), input / other)


# Under torch.func transforms inside torch.compile, dynamo differentiates the forward these
# Functions trace rather than their backward (safe_sqrt's gradient at 0 came out inf). So their
# forwards are written so that plain autograd through them gives the defined first derivative,
# with the same values: the clamped side of safe_sqrt is a detached branch, and a straight-
# through clamp replaces the bound by bound + (x - x.detach()), which is the bound exactly and
# has derivative 1 (x at +-inf stays out of it: inf - inf would be NaN).
def _unit_ramp(input: torch.Tensor) -> torch.Tensor:
    """0 everywhere, with derivative 1 (0 at +-inf, where inf - inf would be NaN)."""
    finite = torch.where(torch.isinf(input), 0.0, input)
    return finite - finite.detach()


def _through(input: torch.Tensor, bound: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    return torch.where(clamped, bound + _unit_ramp(input), input)


def _log_value_for_compile(input, eps, straight_through):
    if not straight_through:
        # Differentiated through the clamp's select (torch.func transforms inside torch.compile
        # only): 1 / NaN at a NaN input, and with eps = 0 a tangent of 0 / 0 below it, where the
        # defined derivative is 0. Written as where(x >= eps, log(where(x >= eps, x, 1)), log(eps))
        # instead, the compiled loss of the bench (softmax, safe_log, NLL) took 1.8x as long
        # (2026-12-07): kept, and said in the README.
        return _log_value(input, eps)
    e = _bound(input, eps)
    if eps == 0.0:  # 1 / eps below would be inf, and 0 * inf NaN
        return torch.log(_through(input, e, input < e))
    # The derivative 1 / eps below the bound as a constant, as the defined gradient has it (its
    # own derivative there is 0: log of the shifted bound would give -1 / eps**2). Divided, not
    # multiplied by 1 / eps: that overflows to inf for float16 eps < 1.5e-5 (and subnormal eps
    # in the other dtypes), and 0 * inf made every clamped value NaN.
    return _log_value(input, eps) + torch.where(input < e, _unit_ramp(input) / e, 0.0)


def _exp_value_for_compile(input, max, straight_through):
    if not straight_through:
        return _exp_value(input, max)  # likewise: exp'(NaN) at a NaN input, under a transform
    m = _bound(input, max)
    return torch.exp(_through(input, m, input > m))


def _sqrt_value_for_compile(input, eps):
    keep = input > _bound(input, eps)
    return torch.where(keep, torch.sqrt(torch.where(keep, input, 1.0)), _sqrt_value(input).detach())


def _div_value_for_compile(input, other, eps, fill):
    # _div_value's values (a NaN input over a guarded divisor is that NaN, as NaN / 0 is), made
    # where the divisor is guarded from nothing that depends on either operand: differentiated,
    # zero there, as defined (a NaN input's tangent was t / 0 = inf, and through a quotient by the
    # divisor replaced by 1 the divisor's tangent was 0 * NaN). The divisor is replaced by 1 there
    # all the same: the unselected quotient's gradient, 0 * (x / 0**2), would be NaN.
    guard, b = _div_parts(other, eps)
    q = torch.where(guard, input.detach(), input / b)
    return torch.where(guard & ~torch.isnan(input), _bound(input, fill), q)


# For torch.compile: dynamo traces these (it refuses a Function that defines jvp).
class _SafeLogComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, eps, straight_through):
        ctx.save_for_backward(input)
        ctx.eps, ctx.straight_through = eps, straight_through
        return _log_value_for_compile(input, eps, straight_through)

    @staticmethod
    def backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return _log_derivative(input, ctx.eps, ctx.straight_through, grad), None, None


class _SafeExpComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, max, straight_through):
        result = _exp_value_for_compile(input, max, straight_through)
        ctx.save_for_backward(result, input)
        ctx.max, ctx.straight_through = max, straight_through
        return result

    @staticmethod
    def backward(ctx, grad):
        result, input = ctx.saved_tensors
        return _exp_derivative(result, input, ctx.max, ctx.straight_through, grad), None, None


class _SafeSqrtComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, eps):
        ctx.eps = eps
        result = _sqrt_value_for_compile(input, eps)
        ctx.save_for_backward(input, result)
        return result

    @staticmethod
    def backward(ctx, grad):
        # From the forward's result, rounded to the dtype where it was stored, as eager's kernels
        # and torch.sqrt's own formula divide by it: recomputed here, inductor kept the root in
        # float32 and float16/bfloat16 gradients came out an ulp or more off eager's.
        input, result = ctx.saved_tensors
        keep = input > _bound(input, ctx.eps)
        return torch.where(keep, grad / (2 * torch.where(keep, result, 1.0)), 0.0), None


class _SafeDivComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, other, eps, fill):
        _save_div(ctx, input, other)
        ctx.eps = eps
        return _div_value_for_compile(input, other, eps, fill)

    @staticmethod
    def backward(ctx, grad):
        other, *rest = ctx.saved_tensors
        guard, b = _div_parts(other, ctx.eps)
        grad_input = torch.where(guard, 0.0, grad / b).sum_to_size(ctx.input_shape)
        if not rest:
            return grad_input, None, None, None
        grad_other = torch.where(guard, 0.0, -grad * ((rest[0] / b) / b))
        return grad_input, grad_other.sum_to_size(other.shape), None, None


def _save_div(ctx, input, other):
    # As torch.div: the input is saved only where the divisor needs a gradient (the input's needs
    # the divisor alone), so that otherwise it may be changed in place after the call.
    ctx.save_for_backward(other, input) if other.requires_grad else ctx.save_for_backward(other)
    ctx.input_shape = input.shape


# For forward-mode AD (torch.autograd.forward_ad, torch.func.jvp/jacfwd) and torch.func's
# transforms (grad, jacrev, hessian, vmap): setup_context, jvp and generate_vmap_rule, which the
# custom ops' reverse-mode formula lacks (torch.func.jacfwd of one gave zeros without an error).
class _SafeLogTransformable(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, eps, straight_through):
        return _log_value(input, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.eps, ctx.straight_through = inputs
        ctx.save_for_backward(input)
        ctx.save_for_forward(input)

    @staticmethod
    def backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return _log_derivative(input, ctx.eps, ctx.straight_through, grad), None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        (input,) = ctx.saved_tensors
        return _log_derivative(input, ctx.eps, ctx.straight_through, tangent)


class _SafeExpTransformable(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, max, straight_through):
        return _exp_value(input, max)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.max, ctx.straight_through = inputs
        ctx.save_for_backward(output, input)
        ctx.save_for_forward(output, input)

    @staticmethod
    def backward(ctx, grad):
        result, input = ctx.saved_tensors
        return _exp_derivative(result, input, ctx.max, ctx.straight_through, grad), None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        result, input = ctx.saved_tensors
        return _exp_derivative(result, input, ctx.max, ctx.straight_through, tangent)


class _SafeSqrtTransformable(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, eps):
        return _sqrt_value(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.eps = inputs
        ctx.save_for_backward(input)
        ctx.save_for_forward(input)

    @staticmethod
    def backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return _sqrt_derivative(input, ctx.eps, grad), None

    @staticmethod
    def jvp(ctx, tangent, *_):
        (input,) = ctx.saved_tensors
        return _sqrt_derivative(input, ctx.eps, tangent)


class _SafeDivTransformable(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, other, eps, fill):
        return _div_value(input, other, eps, fill)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, other, ctx.eps, _ = inputs
        _save_div(ctx, input, other)
        ctx.save_for_forward(input, other)

    @staticmethod
    def backward(ctx, grad):
        return _SafeDivComposite.backward(ctx, grad)

    @staticmethod
    def jvp(ctx, t_input, t_other, *_):
        input, other = ctx.saved_tensors  # what save_for_forward saved
        guard, b = _div_parts(other, ctx.eps)
        out = torch.zeros((), dtype=input.dtype, device=input.device)
        if t_input is not None:
            out = out + t_input / b
        if t_other is not None:
            # A divisor without a tangent comes as zeros (torch.func.jvp, forward_ad): where the
            # quotient's derivative overflows (1e30 / 1e-5 / 1e-5 in float32) 0 * inf made the
            # whole tangent NaN; torch.div leaves out an absent tangent's term, and a zero
            # tangent adds nothing.
            out = out - torch.where(t_other == 0, 0.0, t_other * ((input / b) / b))
        return torch.where(guard, 0.0, out).expand(torch.broadcast_shapes(input.shape, other.shape))


def safe_log_composite(input: torch.Tensor, eps: float, straight_through: bool,
                       transforms: bool = False) -> torch.Tensor:
    """`transforms`: the Function that serves forward-mode AD and torch.func (not torch.compile)."""
    _check_unary("safe_log", input, "eps", eps, True)
    fn = _SafeLogTransformable if transforms else _SafeLogComposite
    return fn.apply(input, eps, straight_through)


def safe_exp_composite(input: torch.Tensor, max: float, straight_through: bool,
                       transforms: bool = False) -> torch.Tensor:
    _check_unary("safe_exp", input, "max", max, False)
    fn = _SafeExpTransformable if transforms else _SafeExpComposite
    return fn.apply(input, max, straight_through)


def safe_sqrt_composite(input: torch.Tensor, eps: float, transforms: bool = False) -> torch.Tensor:
    _check_unary("safe_sqrt", input, "eps", eps, True)
    fn = _SafeSqrtTransformable if transforms else _SafeSqrtComposite
    return fn.apply(input, eps)


def safe_div_composite(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float,
                       transforms: bool = False) -> torch.Tensor:
    check_div_args("safe_div", input, other, eps, fill)
    fn = _SafeDivTransformable if transforms else _SafeDivComposite
    return fn.apply(input, other, eps, fill)


def write_out(out: torch.Tensor, result: torch.Tensor, op: str) -> None:
    """The out= variants under torch.compile: the composite's result copied into `out` (inductor
    writes it there directly); `out` was checked and resized by the caller, as in eager."""
    _check_out_dtype(out, result.dtype, op)
    out.copy_(result)
