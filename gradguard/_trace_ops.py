"""Helpers of the NaN tracer that only run on a bad step: finding the first aten op whose output
went non-finite (a TorchDispatchMode that checks every op, syncing per op), and describing a
tensor's non-finite batch rows."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


_CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def checkable(t) -> bool:
    """A dense tensor that can hold NaN/Inf and has elements (max-abs of an empty tensor is an
    error; aminmax has no sparse, nested or float8 kernel: a sparse activation, the nested
    tensors of a TransformerEncoder's fast path and a float8 one each crashed the forward)."""
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_nested
            and (t.dtype in _CHECKED_FLOATS or t.is_complex()) and t.numel() > 0)


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def nonfinite_kind(t: torch.Tensor) -> str:
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return "NaN and Inf" if nan and inf else ("NaN" if nan else "Inf")


def bad_rows(t: torch.Tensor, batch_dim: int, batch_size: int | None):
    """Indices along the batch dimension that hold NaN/Inf, or None when `t` has no such
    dimension of the batch's size."""
    if batch_size is None or t.dim() <= batch_dim or t.shape[batch_dim] != batch_size:
        return None
    bad = ~torch.isfinite(t.detach())
    return bad.movedim(batch_dim, 0).reshape(batch_size, -1).any(dim=1).nonzero().flatten().tolist()


# Their outputs are uninitialized memory, which may hold any bits, NaN included: never a culprit.
_UNINITIALIZED = frozenset(f"aten.{n}" for n in (
    "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided", "resize_",
    "resize_as_"))


class FirstNonfiniteOp(TorchDispatchMode):
    """Runs every aten op as usual and keeps the first one whose output holds NaN/Inf: its name,
    whether its inputs were finite, and where it ran (``where()``: the innermost module then).
    Syncs the host after every op: only for replays of a step already known to be bad."""

    def __init__(self, where=lambda: None):
        super().__init__()
        self.where = where
        self.found = None  # (op, inputs_finite, module) of the first op with a non-finite output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is not None or str(func.overloadpacket) in _UNINITIALIZED:
            return func(*args, **kwargs)
        ins = [t for t in tree_leaves((args, kwargs)) if checkable(t)]
        # An in-place op overwrites its input: judge the inputs before it runs.
        ins_finite = all_finite(ins) if func._schema.is_mutable else None
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if checkable(t)]
        if outs and not all_finite(outs):
            if ins_finite is None:
                ins_finite = all_finite(ins)
            self.found = (str(func.overloadpacket), ins_finite, self.where())
        return out
