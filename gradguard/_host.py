"""Host-side helpers of GradGuard.step() whose cost grows with the parameter count.

Reading ``p.grad`` or ``g._version`` from Python goes through torch's attribute getters (~60 ns
each), and a ``torch.ops`` call converts its tensor list to IValues and back: with 1,000
parameters, reading the grads cost ~65 us a step, calling the stats op ~90 us and the hygiene
tracker's weakref marks ~210 us, more than the rest of the guard together. The compiled CPU
module (csrc/cpu/host_helpers.cpp) does the same in C++ at ~10 ns per tensor; these pure-Python
versions serve when it is not loaded (not built, or ``GRADGUARD_DISABLE_EXT=1``), with the same
results.
"""
from __future__ import annotations

import ctypes
import struct
import weakref

import torch

from gradguard import _extension


def _compiled():
    if "gradguard._C" not in _extension._state["modules"]:
        return None
    import gradguard._C as c  # noqa: PLC0415  (loaded by _extension already)

    return c if hasattr(c, "grad_stats_of") else None


_C = _compiled()

# Types whose .grad is autograd's own: a subclass may override it through __torch_function__,
# which the compiled reader does not consult.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _compiled_now():
    """The compiled helpers, or None: also None while torch.compile traces (dynamo cannot trace
    into a C function; the Python path is made of ops it can)."""
    if _C is None or torch.compiler.is_compiling():
        return None
    return _C


def plain_stats(tensors, norm_type: float):
    """``(acc, nan_count, inf_count, amax)`` of one ``gradguard::multi_tensor_stats`` call over
    ``tensors`` when they are the plain common case (a list or tuple of torch.Tensor/Parameter
    objects, strided, floating-point, not requiring grad, one device and one dtype), else None:
    the caller's general path (as_tensor_list, grouping, the distributed plan) handles the rest,
    and is what the fallback always takes."""
    c = _compiled_now()
    return None if c is None else c.plain_stats(tensors, norm_type)


def plain_grad_stats(tensors, norm_type: float):
    """``(norms, nan_count, inf_count, amax, total_norm, found_inf)``, what ``grad_stats`` returns,
    from one compiled call when ``tensors`` is the plain common case (as for plain_stats), else
    None: the caller then computes it as stats.finalize does, which is also the fallback's way."""
    c = _compiled_now()
    return None if c is None else c.plain_grad_stats(tensors, norm_type)


_last_device: tuple = (object(), None)  # no device is this object: the first call reads .type


def device_type(device: torch.device) -> str:
    """``device.type``, remembered for the last device object asked about (GradGuard's plan keeps
    one object per step's device): torch builds the string through a std::ostringstream at every
    read, and the first such read in a step after a long inner step cost 7-9 us at 1,000
    parameters (cold locale code and data; 2026-12-07, Intel VM), wherever in the step it came."""
    global _last_device
    last = _last_device
    if last[0] is device:
        return last[1]
    kind = device.type
    _last_device = (device, kind)
    return kind


# The dtypes a one-element CPU tensor is read in from its memory (the common limits' dtypes).
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double, torch.int64: ctypes.c_int64,
           torch.int32: ctypes.c_int32, torch.int16: ctypes.c_int16, torch.int8: ctypes.c_int8,
           torch.uint8: ctypes.c_uint8}
_BYTE_FLOATS: dict = {}  # a 1-byte float dtype (float8) -> its 256 values, made at its first read


def cpu_value(t: torch.Tensor) -> float:
    """The value of a one-element real CPU tensor, read from its memory: float(t) dispatches
    aten::item, one more op in a step whose op count is bounded (a CPU tensor max_norm's check
    made the clipping SGD step 5 ops). Other dtypes (bool, uint16-64) through float(t)."""
    c = _CTYPES.get(t.dtype)
    if c is not None:
        return float(c.from_address(t.data_ptr()).value)
    if t.dtype is torch.float16 or t.dtype is torch.bfloat16:
        bits = ctypes.c_uint16.from_address(t.data_ptr()).value
        # float16 decoded by struct's IEEE half; bfloat16 is a float32's upper half.
        return (struct.unpack("<e", struct.pack("<H", bits))[0] if t.dtype is torch.float16
                else struct.unpack("<f", struct.pack("<I", bits << 16))[0])
    if t.is_floating_point() and t.element_size() == 1:  # the float8 formats: a table of their values
        table = _BYTE_FLOATS.get(t.dtype)
        if table is None:
            table = _BYTE_FLOATS[t.dtype] = torch.arange(256, dtype=torch.uint8).view(t.dtype).double().tolist()
        return table[ctypes.c_uint8.from_address(t.data_ptr()).value]
    return float(t)


def guard_decide(*args):
    """``gradguard::guard_decide(*args)``'s seven outputs, as GradGuard calls it: through one typed
    compiled call when its tensor arguments are plain torch.Tensor objects and no
    TorchFunctionMode is active (torch.ops matches the 19 arguments against the schema and boxes
    them: ~4 us of a 6.5 us call at 52 tensors), else through torch.ops. The same kernels and
    profiler record either way, and the same errors for every argument the kernels refuse; the
    compiled call parses its Python arguments by itself (a non-float norm type or a non-bool
    ``double_out`` is a TypeError there), which GradGuard's own arguments never reach."""
    c = _compiled_now()
    got = None if c is None or torch._C._is_torch_function_mode_enabled() else c.guard_decide(*args)
    return torch.ops.gradguard.guard_decide.default(*args) if got is None else got


def same_params(groups, flat: list) -> bool:
    """Whether the optimizer's ``param_groups`` (an iterable of mappings), their ``"params"``
    lists or tuples one after another, hold exactly the objects of ``flat`` in order, by
    identity: GradGuard's check that its parameter plan still matches the live groups. A group
    without ``"params"``, or that is no mapping, is no match."""
    c = _compiled_now()
    if c is not None:
        return c.same_params(groups, flat)
    k = 0
    for g in list(groups):
        try:
            items = g["params"]
        except (KeyError, TypeError):
            return False
        if not isinstance(items, (list, tuple)) or len(items) > len(flat) - k:
            return False
        if not all(a is b for a, b in zip(items, flat[k:k + len(items)])):
            return False
        k += len(items)
    return k == len(flat)


def grad_stats_of(params: list, norm_type: float, plain: bool):
    """``(grads, acc, nan_count, inf_count, amax)``: every parameter's ``.grad`` and one
    ``gradguard::multi_tensor_stats`` call over them. The compiled helper (``plain``: every item
    of ``params`` has a type in PLAIN_TYPES) returns None when a parameter has no gradient; here
    the op refuses that list itself (TypeError). Either way the caller takes its general path."""
    c = _compiled_now() if plain else None
    if c is not None:
        return c.grad_stats_of(params, norm_type)
    grads = [p.grad for p in params]
    return (grads, *torch.ops.gradguard.multi_tensor_stats.default(grads, norm_type))


class ClearMarks:
    """The gradient tensors and their versions at the end of a step: what hygiene.ClearTracker
    compares the next step's gradients with. ``unchanged(grads)`` is True when something was
    remembered, ``grads`` is not empty, the first and the last remembered gradients (the
    anchors) are among ``grads``, and every gradient in ``grads`` is a remembered tensor whose
    version moved by at most one since. Here every tensor is held weakly (exact identity); the
    compiled version holds only the anchors and compares the others by address (the C++ source
    says why, and why the anchors keep that sound)."""

    def __init__(self):
        if _C is not None:
            self._marks = _C.clear_marks_new()
        else:
            self._marks: dict[int, tuple[weakref.ref, int]] = {}
            self._anchors: tuple[int, int] | None = None

    def set(self, grads: list) -> None:
        """Remembers every gradient in ``grads`` (None entries skipped) and its version."""
        if _C is not None:
            _C.clear_marks_set(self._marks, grads)
            return
        kept = [g for g in grads if g is not None]
        self._marks = {id(g): (weakref.ref(g), g._version) for g in kept}
        self._anchors = (id(kept[0]), id(kept[-1])) if kept else None

    def unchanged(self, grads: list) -> bool:
        if _C is not None:
            return _C.clear_marks_unchanged(self._marks, grads)
        if not self._marks or not grads:
            return False
        for g in grads:
            mark = self._marks.get(id(g))
            if mark is None or mark[0]() is not g or g._version - mark[1] > 1:
                return False
        ids = {id(g) for g in grads}  # every grad is a live remembered one: ids are identities
        return all(a in ids for a in self._anchors)
