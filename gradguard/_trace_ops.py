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


def _infinite_number(leaves) -> bool:
    """Whether a plain number among an op's arguments is +-inf: an op asked for such a value
    (``masked_fill_(mask, -inf)``, ``full(size, -inf)``: how attention builds its masks) made it
    on purpose. (An op asked for NaN, ``full_like(g, nan)`` in a hand-written backward, is still
    the one that made it: nothing masks with NaN.)"""
    return any(v in (float("inf"), float("-inf")) for v in leaves if isinstance(v, float))


def _has_nan(tensors) -> bool:
    return any(bool(torch.isnan(t).any()) for t in tensors)


class FirstNonfiniteOp(TorchDispatchMode):
    """Runs every aten op as usual and keeps the first one that made a NaN/Inf: its name,
    whether its inputs were finite, and where it ran (``where()``: the innermost module then).
    Made means: a non-finite output from finite inputs, or a NaN from inputs without one (0 * inf,
    inf - inf: a fully masked softmax row). An op asked for an infinite number (an attention
    mask's ``masked_fill_(mask, -inf)``) made nothing, and the ops after it that carry its -inf
    along made nothing either: until a maker is seen, the first op with a non-finite output is
    kept as the answer (the NaN came in with the inputs). Syncs the host after every op: only for
    replays of a step already known to be bad."""

    def __init__(self, where=lambda: None):
        super().__init__()
        self.where = where
        self._made = None    # (op, inputs_finite, module) of the first op that made a NaN/Inf
        self._first = None   # the same of the first op with a non-finite output, asked for or not

    @property
    def found(self):
        return self._made if self._made is not None else self._first

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._made is not None or str(func.overloadpacket) in _UNINITIALIZED:
            return func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        ins = [t for t in leaves if checkable(t)]
        # An in-place op overwrites its input: judge the inputs before it runs.
        mutable = func._schema.is_mutable
        ins_finite = all_finite(ins) if mutable else None
        ins_nan = _has_nan(ins) if mutable and not ins_finite else None
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if checkable(t)]
        if outs and not all_finite(outs):
            if ins_finite is None:
                ins_finite = all_finite(ins)
            seen = (str(func.overloadpacket), ins_finite, self.where())
            if _infinite_number(leaves):
                return out
            if self._first is None:
                self._first = seen
            if ins_finite:
                self._made = seen
            else:
                if ins_nan is None:
                    ins_nan = _has_nan(ins)
                if not ins_nan and _has_nan(outs):
                    self._made = seen
        return out
