"""Helpers of the NaN tracer that only run on a bad step: finding the first aten op whose output
went non-finite, a mask's -inf aside (a TorchDispatchMode that checks every op, syncing per op),
and describing a tensor's non-finite batch rows."""
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


# Ops that write a value they are given: with +-inf, what attention does to build its masks.
_FILLS = frozenset(f"aten.{n}" for n in (
    "masked_fill", "masked_fill_", "fill", "fill_", "full", "full_like", "new_full", "index_fill", "index_fill_",
    "where", "scalar_tensor", "constant_pad_nd"))


def _asked_for_inf(name: str, leaves) -> bool:
    """Whether op `name` was asked to write +-inf (``masked_fill_(mask, -inf)``, ``full(size,
    -inf)``): it made that value on purpose. (An op asked for NaN, ``full_like(g, nan)`` in a
    hand-written backward, is still the one that made it: nothing masks with NaN.)"""
    return name in _FILLS and any(v in (float("inf"), float("-inf")) for v in leaves if isinstance(v, float))


def _has_nan(tensors) -> bool:
    return any(bool(torch.isnan(t).any()) for t in tensors)


def _holds_mask(tensors) -> bool:
    """Whether an input is a mask made before the checked code ran: +-inf without NaN, needing no
    gradient (a buffer, a module argument, a constant; a weight that went inf needs one)."""
    return any(not t.requires_grad and bool(torch.isinf(t).any()) and not bool(torch.isnan(t).any())
               for t in tensors)


class FirstNonfiniteOp(TorchDispatchMode):
    """Runs every aten op as usual and keeps the first one whose output holds NaN/Inf: its name,
    whether its inputs were finite, and where it ran (``where()``: the innermost module then).
    Once an op was asked to write +-inf (an attention mask's ``masked_fill_(mask, -inf)``), or took
    such a mask made before (+-inf, no NaN, needing no gradient: a buffer, an argument), that op
    and the ones that carry its -inf along made nothing: the answer is then the first op that made
    a NaN/Inf, from finite inputs or a NaN from inputs without one (0 * inf, inf - inf: a fully
    masked softmax row), and until one is seen the first op with a non-finite output. With
    ``want_nan`` (the value to explain is a NaN) an op that made only +-inf is kept aside and the
    search goes on to the first op that made a NaN (``log`` of 0 clamped away before a ``0 / 0``:
    the division). Syncs the host after every op: only for replays of a step already known to be
    bad."""

    def __init__(self, where=lambda: None, want_nan: bool = False):
        super().__init__()
        self.where = where
        self.want_nan = want_nan
        self._made = None    # (op, inputs_finite, module) of the first op that made a NaN/Inf
        self._first = None   # the same of the first op with a non-finite output not asked for
        self._inf_made = None  # with want_nan: the first op that made only +-inf, from finite inputs
        self._asked = False  # an op was asked to write +-inf

    @property
    def found(self):
        for hit in (self._made, self._inf_made, self._first):
            if hit is not None:
                return hit
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        # With want_nan the search goes on past ops that carry a +-inf along, to the NaN's maker.
        done = self._made is not None or (self._first is not None and not self._asked and not self.want_nan)
        if done or name in _UNINITIALIZED:
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
            if _asked_for_inf(name, leaves):
                self._asked = True
                return out
            if ins_finite is None:
                ins_finite = all_finite(ins)
            seen = (name, ins_finite, self.where())
            if ins_finite:
                if self.want_nan and not _has_nan(outs):
                    if self._inf_made is None:
                        self._inf_made = seen
                    return out
                self._made = seen
                return out
            if ins_nan is None:
                ins_nan = _has_nan(ins)
            if self.want_nan and not ins_nan and _has_nan(outs):
                self._made = seen  # a NaN from +-inf inputs (inf - inf, 0 * inf)
                return out
            if not self._asked and not ins_nan and _holds_mask(ins):
                # A mask made before the checked code (a replay of one module on its recorded
                # inputs, a -inf buffer): as if asked for here; this op carried it.
                self._asked = True
            if self._first is None and (ins_nan or not self._asked):
                self._first = seen  # a NaN/Inf that came in (not a mask's -inf)
            if self._asked and not ins_nan and _has_nan(outs):
                self._made = seen
        return out
