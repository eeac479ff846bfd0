"""Reference kernels of the safe math ops: the eager composites themselves.

The public semantics are defined as these compositions of torch ops (so the compiled kernels
must match them bit for bit), and they are the default kernels of the ops wherever no compiled
kernel is registered. The backward functions are also what autograd uses when a second
derivative is needed: every op here is differentiable.

A bound (eps, max, fill) is a Python float that torch rounds to the tensor's dtype, exactly as
``torch.clamp(x, min=eps)`` does. Forward results are allocated as the fake kernels promise
(``torch.empty_like(input)``, or ``empty_broadcast``) and written with ``out=``.
"""
from __future__ import annotations

import warnings

import torch


def resize_out(out: torch.Tensor, shape, op: str) -> None:
    """torch's out= convention: a wrong-shaped `out` is resized (with a warning if it held data)."""
    if out.shape != torch.Size(shape):
        if out.numel() != 0:
            warnings.warn(f"gradguard.{op}: an output with one or more elements was resized since it had shape "
                          f"{list(out.shape)}, which does not match the required output shape {list(shape)}. "
                          "Pass an output of the right shape, or of 0 elements.", UserWarning, stacklevel=4)
        out.resize_(shape)


def _check_out_dtype(out: torch.Tensor, dtype: torch.dtype, op: str) -> None:
    if out.dtype != dtype:
        raise RuntimeError(f"gradguard.{op}: `out` has dtype {out.dtype} but the result has dtype {dtype}; "
                           "pass an `out` of the result's dtype")


def empty_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """safe_div's result: laid out like whichever operand already has the broadcast shape."""
    shape = torch.broadcast_shapes(a.shape, b.shape)
    if a.shape == shape:
        return torch.empty_like(a)
    if b.shape == shape:
        return torch.empty_like(b)
    return a.new_empty(shape)


def safe_log(input: torch.Tensor, eps: float, straight_through: bool) -> torch.Tensor:
    return torch.log(torch.clamp(input, min=eps), out=torch.empty_like(input))


def safe_log_out(input: torch.Tensor, eps: float, straight_through: bool, *, out: torch.Tensor) -> None:
    _check_out_dtype(out, input.dtype, "safe_log")
    resize_out(out, input.shape, "safe_log")
    torch.log(torch.clamp(input, min=eps), out=out)


def safe_log_backward(grad: torch.Tensor, input: torch.Tensor, eps: float, straight_through: bool) -> torch.Tensor:
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
    return torch.exp(torch.clamp(input, max=max), out=torch.empty_like(input))


def safe_exp_out(input: torch.Tensor, max: float, straight_through: bool, *, out: torch.Tensor) -> None:
    _check_out_dtype(out, input.dtype, "safe_exp")
    resize_out(out, input.shape, "safe_exp")
    torch.exp(torch.clamp(input, max=max), out=out)


def safe_exp_backward(grad: torch.Tensor, result: torch.Tensor, input: torch.Tensor, max: float,
                      straight_through: bool) -> torch.Tensor:
    g = grad * result
    return g if straight_through else torch.where(input <= max, g, 0.0)


def safe_sqrt(input: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(torch.clamp(input, min=0.0), out=torch.empty_like(input))


def safe_sqrt_out(input: torch.Tensor, eps: float, *, out: torch.Tensor) -> None:
    _check_out_dtype(out, input.dtype, "safe_sqrt")
    resize_out(out, input.shape, "safe_sqrt")
    torch.sqrt(torch.clamp(input, min=0.0), out=out)


def safe_sqrt_backward(grad: torch.Tensor, input: torch.Tensor, eps: float) -> torch.Tensor:
    # torch's sqrt backward (grad / (2 sqrt(x))) where x > eps; zero at and below eps, where it
    # would be inf (x = 0) or huge. Above eps the clamp is the identity, so sqrt of the masked
    # input has the forward's values, and a second derivative never sees sqrt'(0).
    keep = input > eps
    root = torch.sqrt(torch.where(keep, input, 1.0))
    return torch.where(keep, grad / (2 * root), 0.0)


def _div_guard(other: torch.Tensor, eps: float) -> torch.Tensor:
    return other.abs() <= eps


def safe_div(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float) -> torch.Tensor:
    # A NaN numerator is never replaced by `fill`: the guard only hides a division by ~0.
    guard = _div_guard(other, eps) & ~torch.isnan(input)
    fill_t = torch.tensor(fill, dtype=input.dtype, device=input.device)
    return torch.where(guard, fill_t, input / other, out=empty_broadcast(input, other))


def safe_div_out(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float, *,
                 out: torch.Tensor) -> None:
    _check_out_dtype(out, input.dtype, "safe_div")
    resize_out(out, torch.broadcast_shapes(input.shape, other.shape), "safe_div")
    out.copy_(safe_div(input, other, eps, fill))


def safe_div_backward(grad: torch.Tensor, input: torch.Tensor, other: torch.Tensor, eps: float):
    """Both gradients at the broadcast shape (the caller reduces them to each operand's shape):
    torch.div's formulas, zero where |other| <= eps. Guarded divisors are replaced by 1 before
    dividing, so a second derivative has no 0 * inf either."""
    guard = _div_guard(other, eps)
    b = torch.where(guard, 1.0, other)
    grad_input = torch.where(guard, 0.0, grad / b)
    grad_other = torch.where(guard, 0.0, -grad * ((input / b) / b))
    return grad_input, grad_other
