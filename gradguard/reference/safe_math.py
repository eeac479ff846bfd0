"""Reference kernels of the safe math ops: the eager composites themselves.

The public semantics are defined as these compositions of torch ops (so the compiled kernels
must match them bit for bit), and they are the default kernels of the ops wherever no compiled
kernel is registered. The backward functions are also what autograd uses when a second
derivative is needed: every op here is differentiable.

A bound (eps, max, fill) is a Python float that torch rounds to the tensor's dtype, exactly as
``torch.clamp(x, min=eps)`` does.
"""
from __future__ import annotations

import torch


def _resize_out(out: torch.Tensor, shape, op: str) -> None:
    """torch's out= convention: a wrong-shaped `out` is resized (with a warning if it held data)."""
    if out.shape != torch.Size(shape):
        if out.numel() != 0:
            import warnings

            warnings.warn(f"gradguard.{op}: an output with one or more elements was resized since it had shape "
                          f"{list(out.shape)}, which does not match the required output shape {list(shape)}. "
                          "Pass an output of the right shape, or of 0 elements.", UserWarning, stacklevel=3)
        out.resize_(shape)


def _check_out_dtype(out: torch.Tensor, dtype: torch.dtype, op: str) -> None:
    if out.dtype != dtype:
        raise RuntimeError(f"gradguard.{op}: `out` has dtype {out.dtype} but the result has dtype {dtype}; "
                           "pass an `out` of the result's dtype")


def safe_log(input: torch.Tensor, eps: float, straight_through: bool) -> torch.Tensor:
    return torch.log(torch.clamp(input, min=eps))


def safe_log_out(input: torch.Tensor, eps: float, straight_through: bool, *, out: torch.Tensor) -> torch.Tensor:
    _check_out_dtype(out, input.dtype, "safe_log")
    _resize_out(out, input.shape, "safe_log")
    return torch.log(torch.clamp(input, min=eps), out=out)


def safe_log_backward(grad: torch.Tensor, input: torch.Tensor, eps: float, straight_through: bool) -> torch.Tensor:
    # torch's log backward (grad / x) applied to the clamped x, then clamp's backward (pass where
    # input >= eps, including the boundary) unless the gradient goes straight through.
    g = grad / torch.clamp(input, min=eps)
    return g if straight_through else torch.where(input >= eps, g, 0.0)


def safe_exp(input: torch.Tensor, max: float, straight_through: bool) -> torch.Tensor:
    return torch.exp(torch.clamp(input, max=max))


def safe_exp_out(input: torch.Tensor, max: float, straight_through: bool, *, out: torch.Tensor) -> torch.Tensor:
    _check_out_dtype(out, input.dtype, "safe_exp")
    _resize_out(out, input.shape, "safe_exp")
    return torch.exp(torch.clamp(input, max=max), out=out)


def safe_exp_backward(grad: torch.Tensor, result: torch.Tensor, input: torch.Tensor, max: float,
                      straight_through: bool) -> torch.Tensor:
    g = grad * result
    return g if straight_through else torch.where(input <= max, g, 0.0)


def safe_sqrt(input: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(torch.clamp(input, min=0.0))


def safe_sqrt_out(input: torch.Tensor, eps: float, *, out: torch.Tensor) -> torch.Tensor:
    _check_out_dtype(out, input.dtype, "safe_sqrt")
    _resize_out(out, input.shape, "safe_sqrt")
    return torch.sqrt(torch.clamp(input, min=0.0), out=out)


def safe_sqrt_backward(grad: torch.Tensor, input: torch.Tensor, eps: float) -> torch.Tensor:
    # torch's sqrt backward (grad / (2 sqrt(x))) where x > eps; zero at and below eps, where it
    # would be inf (x = 0) or huge.
    g = grad / (2 * torch.sqrt(torch.clamp(input, min=0.0)))
    return torch.where(input > eps, g, 0.0)


def _div_guard(other: torch.Tensor, eps: float) -> torch.Tensor:
    return other.abs() <= eps


def safe_div(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float) -> torch.Tensor:
    # A NaN numerator is never replaced by `fill`: the guard only hides a division by ~0.
    guard = _div_guard(other, eps) & ~torch.isnan(input)
    return torch.where(guard, fill, input / other)


def safe_div_out(input: torch.Tensor, other: torch.Tensor, eps: float, fill: float, *,
                 out: torch.Tensor) -> torch.Tensor:
    _check_out_dtype(out, input.dtype, "safe_div")
    _resize_out(out, torch.broadcast_shapes(input.shape, other.shape), "safe_div")
    return out.copy_(safe_div(input, other, eps, fill))


def safe_div_backward(grad: torch.Tensor, input: torch.Tensor, other: torch.Tensor, eps: float):
    """Both gradients at the broadcast shape (the caller reduces them to each operand's shape):
    torch.div's formulas, zero where |other| <= eps."""
    guard = _div_guard(other, eps)
    grad_input = torch.where(guard, 0.0, grad / other)
    grad_other = torch.where(guard, 0.0, -grad * ((input / other) / other))
    return grad_input, grad_other
