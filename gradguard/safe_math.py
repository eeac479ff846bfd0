"""Safe math: log, exp, sqrt and division that clamp and compute in one pass, with autograd.

Drop-in for the composites people write by hand (``torch.log(torch.clamp(x, min=eps))``): with
the defaults, values and gradients equal those composites bit for bit, forward and backward run
as one fused kernel each (CPU extension; the pure-PyTorch composite elsewhere), and a NaN that
was already in the input always comes out as NaN. One point differs by torch version: exactly at
the bound (x == eps for log, x == max for exp) the gradient passes, as torch.clamp's did up to
torch 2.13; torch 2.14's clamp gives 0 there. gradguard keeps the same gradient on every torch.

Common rules:
- ``input`` is a dense tensor of any shape and strides. Integer and bool tensors are promoted to
  the default dtype, as ``torch.log`` does; complex, sparse and nested tensors are refused
  (TypeError naming the argument). Tensors of one call share a device, as in ``torch.div``
  (``safe_div`` also takes a 0-dim CPU tensor operand with a tensor on another device, as
  ``torch.div`` does); a meta or other-device operand is a RuntimeError.
- Bounds (``eps``, ``max``, ``fill``) are Python numbers or 0-dim tensors; a tensor bound is read
  once on the host (a device sync for a CUDA tensor, and a graph break under torch.compile) and
  gets no gradient. They are rounded to the input's dtype, as ``torch.clamp`` rounds its bound;
  a bound that rounding would change in kind is a ValueError naming the argument, on every
  kernel path alike: a finite value that overflows the dtype (``eps=1e300`` on float32,
  ``fill=1e10`` on float16) and a positive ``eps`` below its smallest positive value (``eps=1e-8``
  on float16 rounds to 0).
  ``safe_exp``'s ``max`` must also be at most ``EXP_MAX[dtype]`` (``max=100`` on float16 would
  give inf). NaN or negative bounds where they must be >= 0 raise ValueError too, and so does an
  infinite ``eps`` (every element would be at or below it).
- Under ``torch.compile`` (``torch.compiler.is_compiling()``) the functions take a composite of
  aten ops instead of the custom ops (reference/safe_math.py's ``*_composite``: autograd Functions
  whose backward is the defined gradient), so inductor fuses them with their neighbours instead
  of calling an opaque kernel; eager keeps the fused kernels. So do forward-mode AD
  (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``) and ``torch.func``'s transforms
  (``grad``, ``jacrev``, ``hessian``, ``vmap``), which the custom ops' reverse-mode formula does
  not serve (``jacfwd`` of one gave zeros without an error). Same definition, same checks
  (with ``fullgraph=True`` an argument error surfaces as dynamo's ``Unsupported`` carrying the
  same message); values differ from eager only by inductor's own log/exp/sqrt (README). A
  wrong-shaped ``out=`` is resized in eager only (dynamo cannot trace the alias check).
- ``out=`` (as ``torch.log(..., out=)``) writes into a preallocated tensor of the result's dtype
  and device, resizing it if its shape differs, unless it is also an operand (``safe_div(a(2,3),
  b(3), out=b)`` raises, as ``torch.div`` does); like torch's out= functions it refuses inputs
  that require grad while grad mode is on.
"""
from __future__ import annotations

import math
import numbers
import struct

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor

from gradguard import _safe_math_ops  # noqa: F401  (defines torch.ops.gradguard.safe_*)
from gradguard._numbers import real_number
from gradguard.errors import ArgumentTypeError
from gradguard.reference import safe_math as _ref
from gradguard.reference.safe_math import check_devices, div_device, resize_out

__all__ = ["safe_div", "safe_exp", "safe_log", "safe_sqrt"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GRAD_MODES = ("clamp", "straight_through")

# The largest value of each dtype whose exp, rounded to the dtype, is finite: the largest
# representable value <= log(finfo(dtype).max). exp of the next value up is inf (tested).
EXP_MAX = {
    torch.float16: 11.0859375,
    torch.bfloat16: 88.5,
    torch.float32: 88.72283172607422,
    torch.float64: 709.782712893384,
}


def _float_input(input, op: str, arg: str = "input") -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"gradguard.{op}: `{arg}` must be a tensor, got {type(input).__name__}")
    _dense(input, op, arg)
    if input.is_complex():
        raise TypeError(f"gradguard.{op}: `{arg}` is complex ({input.dtype}); only real tensors are supported")
    if not input.is_floating_point():
        return input.to(torch.get_default_dtype())
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gradguard.{op}: `{arg}` has dtype {input.dtype}; supported: float16, bfloat16, "
                        "float32, float64 (and integer types, promoted)")
    return input


def _dense(t: torch.Tensor, op: str, arg: str) -> None:
    if t.is_nested:
        raise TypeError(f"gradguard.{op}: `{arg}` is a nested tensor; safe math takes dense (strided) tensors "
                        "(apply it to each component, or to the padded tensor)")
    if t.layout != torch.strided:
        if t.layout == torch._mkldnn:
            raise TypeError(f"gradguard.{op}: `{arg}` is an MKLDNN tensor; safe math takes dense (strided) tensors "
                            "(pass .to_dense())")
        raise TypeError(f"gradguard.{op}: `{arg}` is a sparse tensor ({t.layout}); safe math takes dense (strided) "
                        "tensors (apply it to .values(), or pass .to_dense())")
    if t.is_quantized:  # torch's own error named no argument ("Creation of quantized tensor requires ...")
        raise TypeError(f"gradguard.{op}: `{arg}` is a quantized tensor ({t.dtype}); safe math takes floating-point "
                        "tensors (pass .dequantize())")


def _number(value, name: str, op: str, *, nonneg: bool, allow_nan: bool = False) -> float:
    if type(value) is float:  # the common case, without the ABC checks below (~1 us each)
        v = value
    else:
        v = _to_float(value, name, op)
    if v != v and not allow_nan:  # not math.isnan: that does not trace when torch.compile makes v symbolic
        raise ValueError(f"gradguard.{op}: `{name}` must not be NaN")
    if nonneg and v < 0.0:
        raise ValueError(f"gradguard.{op}: `{name}` must be >= 0, got {v}")
    return v


def _to_float(value, name: str, op: str) -> float:
    # The wrong kind of object is a TypeError (also a ValueError, as it was before: ArgumentTypeError),
    # a wrong shape or value a ValueError, as in Python's own float() and torch's argument checks.
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"gradguard.{op}: `{name}` must be a real number or a 0-dim real tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ArgumentTypeError(f"gradguard.{op}: `{name}` must be a real number or a 0-dim real tensor, got a "
                                    f"0-dim {value.dtype} tensor")
        if value.device.type == "meta":
            raise ValueError(f"gradguard.{op}: `{name}` is a meta tensor, which holds no value")
        value = value.item()
    number = real_number(value)  # a 0-dim numpy array unwrapped
    if number is None:
        raise ArgumentTypeError(f"gradguard.{op}: `{name}` must be a real number or a 0-dim tensor, got "
                                f"{type(value).__name__} {value!r}")
    value = number
    try:
        return float(value)
    except OverflowError:  # a Python int beyond float64
        raise ValueError(f"gradguard.{op}: `{name}` is an integer of {len(str(abs(value)))} digits, beyond "
                         "float64's range") from None


def _straight_through(grad, op: str) -> bool:
    if grad not in _GRAD_MODES:
        raise ValueError(f"gradguard.{op}: `grad` must be 'clamp' or 'straight_through', got {grad!r}")
    return grad == "straight_through"


def _check_out(out, op: str, shape, device, *inputs: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"gradguard.{op}: `out` must be a tensor, got {type(out).__name__}")
    _dense(out, op, "out")
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs + (out,)):
        raise RuntimeError(f"gradguard.{op}(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad.")
    check_devices(op, device, out=out)  # before resizing: a refused call leaves `out` as it was
    # Likewise (the op checks it only after the resize); `dtype`: the result's, where the
    # operands are wider (safe_div computes float16/bfloat16 by a number in float32).
    _ref._check_out_dtype(out, inputs[0].dtype if dtype is None else dtype, op)
    resize_out(out, shape, op, inputs)


_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _promote_floats(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    if a == b:
        return a
    if _FLOAT_RANK[a] == _FLOAT_RANK[b]:  # float16 with bfloat16
        return torch.float32
    return a if _FLOAT_RANK[a] > _FLOAT_RANK[b] else b


def _div_dtype(input: torch.Tensor, other) -> torch.dtype:
    """torch.div's result dtype (torch.result_type, then integers to the default dtype), written
    out because torch.compile cannot trace torch.result_type."""
    default = torch.get_default_dtype()
    if not isinstance(other, torch.Tensor):  # a Python number never widens a float tensor
        return input.dtype if input.is_floating_point() else default
    fa, fb = input.is_floating_point(), other.is_floating_point()
    if (input.dim() == 0) == (other.dim() == 0):
        if fa and fb:
            return _promote_floats(input.dtype, other.dtype)
        return input.dtype if fa else other.dtype if fb else default
    # A 0-dim tensor only decides the dtype when its category (float) is above the other's.
    dimmed, zero = (input, other) if other.dim() == 0 else (other, input)
    if dimmed.is_floating_point():
        return dimmed.dtype
    return zero.dtype if zero.is_floating_point() else default


def _exporting() -> bool:
    # The flag torch.compiler.is_exporting() returns (torch >= 2.7), read directly: dynamo in
    # torch 2.11 folds a traced is_exporting() call to True under torch.compile too (the
    # composite was then never taken), while a module global is read as its value.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return bool(flag)
    # torch 2.6: non-strict export sets the compiling flag without dynamo; strict export runs
    # dynamo and cannot be told from torch.compile (it takes the composite there).
    dynamo = getattr(torch.compiler, "is_dynamo_compiling", None)
    return dynamo is not None and torch.compiler.is_compiling() and not dynamo()


def _composite_path() -> bool:
    """The composite instead of the custom op: under torch.compile (inductor fuses it with its
    neighbours), forward-mode AD and torch.func's transforms (the custom ops' autograd formula is
    reverse mode only: torch.func.jacfwd of one gave zeros without an error, and grad/jacrev
    raised). Same values and gradients. Not under torch.export: an exported program keeps the
    custom op, whose autograd formula is its own (the composite's Function was traced through
    there: gradients by the plain clamp, or none in strict mode)."""
    return (torch.compiler.is_compiling() and not _exporting()) or _transforms()


def _transforms() -> bool:
    """Forward-mode AD or a torch.func transform is active (outside torch.compile): the composite
    whose Function has a jvp and a vmap rule (dynamo refuses a Function with a jvp)."""
    return not torch.compiler.is_compiling() and (_forward_ad._current_level >= 0
                                                  or torch._C._functorch.peek_interpreter_stack() is not None)


def safe_log(input: torch.Tensor, eps=None, *, grad: str = "clamp", out: torch.Tensor | None = None) -> torch.Tensor:
    """``log(max(input, eps))``.

    ``eps`` defaults to ``torch.finfo(dtype).tiny`` (the smallest normal number), so the result
    is finite for finite or +inf input; it must be >= 0. NaN stays NaN, +inf gives +inf.

    Gradient: with ``grad="clamp"``, that of ``torch.log(torch.clamp(input, min=eps))``:
    ``grad / input`` where ``input >= eps``, 0 below eps and at NaN. With
    ``grad="straight_through"``, ``grad / max(input, eps)`` everywhere (NaN at NaN input).
    """
    x = _float_input(input, "safe_log")
    st = _straight_through(grad, "safe_log")
    e = torch.finfo(x.dtype).tiny if eps is None else _number(eps, "eps", "safe_log", nonneg=True)
    if out is not None:
        _check_out(out, "safe_log", x.shape, x.device, x)
        if _composite_path():
            _ref.write_out(out, _ref.safe_log_composite(x, e, st, transforms=_transforms()), "safe_log")
        else:
            torch.ops.gradguard.safe_log.out(x, e, st, out=out)
        return out
    if _composite_path():
        return _ref.safe_log_composite(x, e, st, transforms=_transforms())
    return torch.ops.gradguard.safe_log(x, e, st)


def safe_exp(input: torch.Tensor, max=None, *, grad: str = "clamp", out: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(min(input, max))``.

    ``max`` defaults to the largest value whose exp is finite in the dtype (``EXP_MAX``: 11.0859375
    for float16, 88.5 for bfloat16, 88.72283172607422 for float32, 709.782712893384 for float64);
    a larger ``max`` is a ValueError (the result would not be safe).
    NaN stays NaN, -inf gives 0.

    Gradient: with ``grad="clamp"``, that of ``torch.exp(torch.clamp(input, max=max))``:
    ``grad * result`` where ``input <= max``, 0 above and at NaN. With ``grad="straight_through"``,
    ``grad * result`` everywhere.
    """
    x = _float_input(input, "safe_exp")
    st = _straight_through(grad, "safe_exp")
    m = EXP_MAX[x.dtype] if max is None else _number(max, "max", "safe_exp", nonneg=False)
    if m > EXP_MAX[x.dtype]:
        raise ValueError(f"gradguard.safe_exp: `max`={m!r} is above {EXP_MAX[x.dtype]!r}, the largest {x.dtype} "
                         "value whose exp is finite, so the result could be inf; pass a smaller max, or none "
                         "for that limit")
    if out is not None:
        _check_out(out, "safe_exp", x.shape, x.device, x)
        if _composite_path():
            _ref.write_out(out, _ref.safe_exp_composite(x, m, st, transforms=_transforms()), "safe_exp")
        else:
            torch.ops.gradguard.safe_exp.out(x, m, st, out=out)
        return out
    if _composite_path():
        return _ref.safe_exp_composite(x, m, st, transforms=_transforms())
    return torch.ops.gradguard.safe_exp(x, m, st)


def safe_sqrt(input: torch.Tensor, eps=0.0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sqrt(max(input, 0))``, equal to ``torch.sqrt(torch.clamp(input, min=0))``.

    Gradient: ``grad / (2 sqrt(input))`` where ``input > eps`` (that of the composite), and 0 at
    and below ``eps`` (>= 0): never the composite's inf at 0, the NaN source in norms and
    distances. NaN input gives NaN and a zero gradient.
    """
    x = _float_input(input, "safe_sqrt")
    e = _number(eps, "eps", "safe_sqrt", nonneg=True)
    if out is not None:
        _check_out(out, "safe_sqrt", x.shape, x.device, x)
        if _composite_path():
            _ref.write_out(out, _ref.safe_sqrt_composite(x, e, transforms=_transforms()), "safe_sqrt")
        else:
            torch.ops.gradguard.safe_sqrt.out(x, e, out=out)
        return out
    if _composite_path():
        return _ref.safe_sqrt_composite(x, e, transforms=_transforms())
    return torch.ops.gradguard.safe_sqrt(x, e)


def safe_div(input: torch.Tensor, other, *, eps=None, fill=0.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``input / other``, but ``fill`` where ``|other| <= eps`` (default: where ``other == 0``).

    TensorFlow's ``divide_no_nan`` with an eps, except that a NaN ``input`` stays NaN (a guard
    never hides a NaN that was already there). ``other`` is a tensor or a number; the two
    broadcast and promote as in ``torch.div`` (integers to the default dtype). Guarded elements
    get zero gradients for both operands; the others get ``torch.div``'s gradients: the input's
    exactly, the divisor's within rounding where the divisor is wider than the result (a float32
    0-dim divisor of a float16 tensor: formed in float32, where torch rounds it to float16 first).
    ``fill`` may be any number, NaN or inf included.
    """
    x = _float_input(input, "safe_div")
    if isinstance(other, torch.Tensor):
        _dense(other, "safe_div", "other")
        if other.is_complex():
            raise TypeError(f"gradguard.safe_div: `other` is complex ({other.dtype}); only real tensors are supported")
        if other.is_floating_point() and other.dtype not in _FLOAT_DTYPES:  # float8: a KeyError in promotion
            raise TypeError(f"gradguard.safe_div: `other` has dtype {other.dtype}; supported: float16, bfloat16, "
                            "float32, float64 (and integer types, promoted)")
    elif type(other) not in (float, int) and (isinstance(other, bool) or not isinstance(other, numbers.Real)):
        raise TypeError(f"gradguard.safe_div: `other` must be a tensor or a real number, got {type(other).__name__}")
    dtype = _div_dtype(input, other)
    # An integer input goes to the result dtype in one cast: through the default dtype first,
    # int64 2**24 + 1 divided by a float64 tensor lost its last bit.
    if not input.is_floating_point():
        x = input.to(dtype)
    elif x.dtype != dtype:
        x = x.to(dtype)
    # torch.div divides a float16/bfloat16 tensor by a number (or a 0-dim CPU tensor) in float32,
    # by the divisor's float32 value: rounded to the input's dtype first, 1e5 became inf in
    # float16 (x / 1e5 gave 0), 1e-8 became 0 (the fill), and 0.1 gave results 1 ulp off
    # torch.div's in 10-60% of elements. Such a division runs in float32 and is rounded once.
    # (A 0-dim divisor already of the input's dtype loses nothing: it keeps the one-dtype kernel,
    # which computes in float32 too, and torch.div's gradients exactly.)
    scalar = not isinstance(other, torch.Tensor) or (other.dim() == 0 and other.device.type == "cpu"
                                                     and other.dtype != dtype)
    opmath = torch.float32 if scalar and dtype in (torch.float16, torch.bfloat16) else dtype
    if isinstance(other, torch.Tensor):
        # Devices are not moved: the op takes a 0-dim CPU operand with a tensor anywhere (as
        # torch.div does) and refuses other mixes, naming the operand.
        y = other if other.dtype == opmath else other.to(opmath)
    else:
        # A fill on the device (the value is the fill kernel's argument): torch.tensor(number,
        # device=cuda) would be a blocking host-to-device copy on every call. The number is
        # rounded to the dtype once, as torch casts it (past its range: its signed inf).
        v = _number(other, "other", "safe_div", nonneg=False, allow_nan=True)
        if torch.compiler.is_compiling():
            # Symbolic where it changes per call: 0 + number on the device, which torch rounds
            # (an integer from its own value, not through float64).
            y = _ref.device_scalar(other if type(other) is int else v, opmath, x.device)
        else:
            if opmath is torch.float32:  # torch.full refuses a value past float32's range
                v = _float32_value(other if isinstance(other, numbers.Integral) else v)
            y = _ref.device_scalar(v, opmath, x.device)  # a -0.0 divisor is a guarded zero either way
    e = 0.0 if eps is None else _number(eps, "eps", "safe_div", nonneg=True)
    f = _number(fill, "fill", "safe_div", nonneg=False, allow_nan=True)
    if opmath is not dtype:
        # The bounds must fit the input's dtype, as everywhere (eps=1e-8 on float16 is refused).
        _ref.check_div_args("safe_div", x, y, e, f)
    if out is not None:
        # Aliasing is checked against the caller's operands: x and y may be converted copies here.
        operands = (input, other) if isinstance(other, torch.Tensor) else (input,)
        _check_out(out, "safe_div", torch.broadcast_shapes(x.shape, y.shape), div_device(x, y), *operands,
                   dtype=dtype)
        if _composite_path():
            _ref.write_out(out, _ref.safe_div_composite(x.to(opmath), y, e, f, transforms=_transforms()).to(dtype),
                           "safe_div")
            return out
        # The op's out= kernel checks overlap against its operands, which may be converted copies
        # here (an integer input, a wider divisor): checked against the caller's.
        _ref.check_no_partial_overlap(out, operands)
        # float16/bfloat16 by a float32 divisor: the op divides in float32 and rounds once.
        torch.ops.gradguard.safe_div.out(x, y, e, f, out=out)
        return out
    if _composite_path():
        r = _ref.safe_div_composite(x.to(opmath), y, e, f, transforms=_transforms())
        return r if opmath is dtype else r.to(dtype)
    if (opmath is not dtype and not torch.compiler.is_compiling() and x.device.type != "meta"
            and not isinstance(x, _FakeTensor)):
        # Eagerly, an autograd Function whose backward needs no float32 copy of the whole tensors
        # either (the op's own formula, for the rest: export, meta and fake tensors, makes them).
        # Whether the divisor is guarded is known on the host: a number's value, or a CPU tensor.
        b = _float32_value(other) if isinstance(other, torch.Tensor) else v
        return _DivByFloat32.apply(x, y, e, f, abs(b) <= _float32_value(e))
    return torch.ops.gradguard.safe_div(x, y, e, f)


def _float32_value(v) -> float:
    """A number's (or a 0-dim CPU tensor's) value rounded once to float32 (to nearest, ties to
    even), as torch casts it, as a Python float: past float32's largest value by half an ulp or
    more, its signed inf (a float just past finfo.max rounds down to it); an integer from its own
    value (through float64, one beyond 2^53 was rounded twice)."""
    if isinstance(v, torch.Tensor):
        return float(v.detach().to(torch.float32))
    if isinstance(v, numbers.Integral):
        n = int(v)
        m = abs(n)
        if m > 2 ** 53:
            shift = m.bit_length() - 24  # keep float32's 24 significant bits
            q, r = divmod(m, 1 << shift)
            if 2 * r > 1 << shift or (2 * r == 1 << shift and q & 1):
                q += 1
            try:
                v = math.ldexp(q if n > 0 else -q, shift)
            except OverflowError:  # past float64 too: past float32 all the more
                v = math.inf if n > 0 else -math.inf
    try:
        return struct.unpack("f", struct.pack("f", float(v)))[0]
    except OverflowError:
        return math.inf if v > 0 else -math.inf


class _DivByFloat32(torch.autograd.Function):
    """A float16/bfloat16 ``input`` divided by a 0-dim float32 ``other`` (a number's float32 value),
    in float32 and rounded once, as torch.div does, eagerly. The op does it in one pass (the
    reference kernel in float32 pieces); the backward needs no float32 copy of the whole tensors
    either: the input's gradient is the op again (grad / other, rounded once), the divisor's is
    summed piece by piece in float64. The op's own autograd formula would save the input and make
    whole float32 copies; as torch.div by a number, the input is saved only where the divisor
    needs a gradient (so it may be changed in place after the call otherwise). ``guarded`` is
    |other| <= eps, known on the host (a number, or a CPU tensor)."""

    @staticmethod
    def forward(ctx, x, y, eps, fill, guarded):
        # The caller's x, not a copy: a double backward differentiates through it.
        ctx.save_for_backward(y, x) if ctx.needs_input_grad[1] else ctx.save_for_backward(y)
        ctx.eps, ctx.guarded = eps, guarded
        return torch.ops.gradguard.safe_div(x, y, eps, fill)

    @staticmethod
    def backward(ctx, grad):
        y, *rest = ctx.saved_tensors
        x = rest[0] if rest else None
        batched = torch._C._functorch.is_batchedtensor(grad) or torch._C._functorch.is_legacy_batchedtensor(grad)
        if torch.is_grad_enabled() or batched or torch._C._functorch.peek_interpreter_stack() is not None:
            # A double backward or a batched one (vmap, is_grads_batched): the differentiable
            # formula on whole float32 copies.
            # A 0-dim CPU divisor goes to the gradient's device: torch's CUDA division by a CPU
            # scalar multiplies by its reciprocal, where the op divides.
            yd = y.to(grad.device)
            guard = yd.abs() <= ctx.eps
            b = torch.where(guard, 1.0, yd)  # as the op's formula: no 0 * inf in a second derivative
            g = grad.float()
            gi = torch.where(guard, 0.0, g / b).to(grad.dtype) if ctx.needs_input_grad[0] else None
            go = torch.where(guard, 0.0, -g * ((x.float() / b) / b)).sum().to(y.device) if x is not None else None
            return gi, go, None, None, None
        gi = go = None
        if ctx.needs_input_grad[0]:
            # torch.div's grad / other, rounded once, in the incoming gradient's layout: the op
            # itself, nothing guarded there (|other| > eps >= 0); zeros where the divisor is.
            gi = torch.zeros_like(grad) if ctx.guarded else torch.ops.gradguard.safe_div(grad, y, 0.0, 0.0)
        if x is not None:
            # On the gradient's device: the divisor may be a 0-dim CPU tensor (as torch.div takes).
            go = torch.zeros((), dtype=torch.float64, device=grad.device)
            if not ctx.guarded:
                # -sum(grad * x / y / y): float32 pieces of both, in one memory order, summed in
                # float64 (torch.div forms it in the input's dtype).
                g = grad if _ref.is_dense(grad) else grad.contiguous()
                x = _ref.in_layout_of(x, g)
                gbuf, xbuf = _ref.float32_buffers(2, g)
                for gp, xp in _ref.pieces(g, x):
                    gb, xb = gbuf[:gp.numel()], xbuf[:gp.numel()]
                    gb.copy_(gp)
                    xb.copy_(xp)
                    go -= xb.div_(y).div_(y).mul_(gb).sum(dtype=torch.float64)
            go = go.to(device=y.device, dtype=y.dtype)
        return gi, go, None, None, None
