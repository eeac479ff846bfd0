"""Multi-tensor gradient statistics: grad_stats, all_finite, clip_grad_norm_, get_total_norm,
clip_grads_with_norm_.

Everything here returns device tensors and never reads a value back to the host (the
exceptions: ``nonfinite="raise"`` and ``error_if_nonfinite=True``, which must look at the flag or
the norm to raise, and a tensor ``norm_type``, read as torch reads it). Results
gather on the first tensor's device: a list that mixes CUDA tensors into a CPU-first list copies
their small per-tensor results to the host, which waits for the GPU; put a CUDA tensor first.
"""
from __future__ import annotations

import functools
import math
import types
import warnings
from typing import Iterable, NamedTuple

import torch

from gradguard import _host
from gradguard import _ops  # noqa: F401  (defines torch.ops.gradguard.*)
from gradguard import distributed as _distributed
from gradguard._numbers import float_or_inf, real_number, to_float
from gradguard.errors import ArgumentTypeError, NonFiniteGradError
# The same float64 norm math as the decision op's reference kernel (one copy of it).
from gradguard.reference.decide import _total as _total64
from gradguard.reference.safe_math import device_scalar

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GradStats(NamedTuple):
    """Statistics of a list of tensors, all device tensors (see ``grad_stats``)."""

    norms: torch.Tensor
    nan_count: torch.Tensor
    inf_count: torch.Tensor
    amax: torch.Tensor
    total_norm: torch.Tensor
    found_inf: torch.Tensor


class _Raw(NamedTuple):
    # Per tensor, in input order, on the output device: what multi_tensor_stats returns (float64
    # sum of (|x| / amax)^p over finite elements, int64 NaN and Inf counts, float64 finite amax).
    acc: torch.Tensor
    nan_count: torch.Tensor
    inf_count: torch.Tensor
    amax: torch.Tensor
    out_dtype: torch.dtype
    device: torch.device


def check_norm_type(norm_type, *, torch_compat: bool = False) -> float:
    """The p of a p-norm as a float. ``grad_stats`` and ``GradGuard`` take a number, p > 0 or inf.
    The clip functions (``torch_compat``) read it as torch's clip does, ``float(norm_type)``: also
    a numeric string such as ``"inf"``, a one-element real tensor (read on the host), and torch's
    other orders 0 (nonzero count), negative p and -inf."""
    if torch_compat and isinstance(norm_type, torch.Tensor):
        if norm_type.numel() != 1 or norm_type.is_complex() or norm_type.dtype == torch.bool:
            err = ValueError if norm_type.numel() != 1 else ArgumentTypeError
            raise err(f"gradguard: `norm_type` must be a real number, a numeric string or a one-element real "
                      f"tensor, got a {norm_type.dtype} tensor of shape {tuple(norm_type.shape)}")
        norm_type = norm_type.item()
    if torch_compat and isinstance(norm_type, str):
        try:
            p = float(norm_type)
        except ValueError:
            raise ValueError(f"gradguard: `norm_type` must be a number or a numeric string such as 'inf', "
                             f"got {norm_type!r}") from None
    elif isinstance(norm_type, str):
        try:  # suggest the conversion only where it works ('inf', '2')
            float(norm_type)
            hint = f": pass a number, e.g. float({norm_type!r})"
        except ValueError:
            hint = ""
        raise ArgumentTypeError(f"gradguard: `norm_type` must be a positive number or inf, got the string {norm_type!r}"
                         f"{hint} (only the clip functions take numeric strings, as torch's)")
    elif real_number(norm_type) is None:
        raise ArgumentTypeError(f"gradguard: `norm_type` must be a positive number or inf, got "
                                f"{type(norm_type).__name__} {norm_type!r}")
    else:
        # Not float() nor math.isnan under torch.compile: a norm_type that changes between calls
        # is a symbolic float there, which neither traces (as for max_norm).
        number = real_number(norm_type)
        p = number if torch.compiler.is_compiling() else to_float(number, "gradguard: `norm_type`")
    if p != p:
        raise ValueError(f"gradguard: `norm_type` must not be NaN, got {norm_type!r}")
    if p <= 0.0 and not torch_compat:
        raise ValueError(f"gradguard: `norm_type` must be > 0 (or inf), got {norm_type!r}")
    return p


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _iterable(items, what: str, where: str):
    """``iter(items)``; for an object that cannot be iterated at all, a TypeError that names the
    argument (Python's own says only "'NoneType' object is not iterable", which is what torch's
    clip gives for ``None``). An iterable whose own ``__iter__`` raises keeps its error."""
    kind = type(items)
    if not (hasattr(kind, "__iter__") or hasattr(kind, "__getitem__")):
        raise TypeError(f"{where}: {what} must be a tensor or an iterable of tensors, got {kind.__name__}")
    return iter(items)


def as_tensor_list(tensors, what: str = "tensors") -> list[torch.Tensor]:
    """The values a gradient list is judged by: sparse tensors by their (coalesced) values,
    complex ones by |z|. Refuses anything that is not a floating-point or complex tensor."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    elif not isinstance(tensors, (list, tuple)):
        tensors = _iterable(tensors, f"`{what}`", "gradguard")
    out = []
    strided = torch.strided
    for i, t in enumerate(tensors):
        # The common case first, in as few attribute reads as possible (this loop runs per
        # gradient per step): a dense real floating-point tensor that needs no detach (a nested
        # tensor's layout is strided too).
        if (isinstance(t, torch.Tensor) and t.layout is strided and t.dtype in _FLOAT_DTYPES
                and not t.requires_grad and not t.is_nested):
            out.append(t)
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradguard: {what}[{i}] is a {type(t).__name__}, expected a floating-point or complex tensor")
        if t.layout == torch.sparse_coo:
            t = t.coalesce().values()
        elif t.layout in _COMPRESSED:
            t = t.values()  # compressed layouts hold no duplicates
        elif t.layout != torch.strided or t.is_nested:
            kind = "a nested tensor" if t.is_nested else f"a tensor of layout {t.layout}"
            raise TypeError(f"gradguard: {what}[{i}] is {kind}; gradguard takes strided, sparse COO and compressed "
                            "sparse tensors")
        if t.is_complex():
            t = t.abs()
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"gradguard: {what}[{i}] has dtype {t.dtype}, expected a floating-point or complex tensor")
        # A DTensor is detached as its local shard, in gradguard.distributed (DTensor.detach()
        # costs more than the statistics of a small tensor).
        out.append(t if _distributed.is_dtensor(t) else t.detach())
    return out


def _grouped(tensors: list[torch.Tensor]):
    """Indices of `tensors` grouped by (device, dtype), groups in order of first appearance."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _runs(order: list[int]):
    """Splits the positions of `order` (a permutation of range(n)) into maximal runs that are
    consecutive in the input, as (start in concatenated output, length) in input order."""
    where = {idx: pos for pos, idx in enumerate(order)}
    runs, i, n = [], 0, len(order)
    while i < n:
        start = where[i]
        length = 1
        while i + length < n and where[i + length] == start + length:
            length += 1
        runs.append((start, length))
        i += length
    return runs


def _refuse_meta(device: torch.device, index: int, names=None) -> None:
    if device.type == "meta":  # the statistics of tensors without values could never be read
        what = f"the gradient of {names[index]!r}" if names is not None else f"tensors[{index}]"
        raise ValueError(f"gradguard: {what} is on the meta device: it holds no values to check")


def raw_stats(tensors, norm_type: float, names=None) -> _Raw:
    """One kernel call per (device, dtype) group; results in input order on the first device."""
    if not tensors:
        device = torch.device("cpu")
        empty_f = torch.zeros(0, dtype=torch.float64)
        empty_i = torch.zeros(0, dtype=torch.int64)
        return _Raw(empty_f, empty_i, empty_i, empty_f, torch.float32, device)
    device = tensors[0].device
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    groups = _grouped(tensors)
    parts = []
    for idx in groups:
        _refuse_meta(tensors[idx[0]].device, idx[0], names)
        res = torch.ops.gradguard.multi_tensor_stats([tensors[i] for i in idx], norm_type)
        parts.append([r.to(device) for r in res])
    if len(parts) == 1:
        acc, nan, inf, amax = parts[0]
    else:
        # Concatenate the groups, then pick consecutive runs back into input order: slices and
        # one cat, no index tensor to build on the host and copy over.
        cat = [torch.cat([p[k] for p in parts]) for k in range(4)]
        order = [i for idx in groups for i in idx]
        runs = _runs(order)
        acc, nan, inf, amax = (torch.cat([c[s:s + n] for s, n in runs]) for c in cat)
    return _Raw(acc, nan, inf, amax, out_dtype, device)


def _raw_of(tensors, p: float, process_group) -> _Raw:
    """all_finite's read: the plain common case in one compiled call
    (gradguard/_host.py plain_stats), anything else through as_tensor_list and global_raw_stats."""
    got = _host.plain_stats(tensors, p) if process_group is None else None
    if got is None:
        return global_raw_stats(as_tensor_list(tensors), p, process_group=process_group)[0]
    acc, nan, inf, amax = got
    _refuse_meta(acc.device, 0)  # one device per compiled call: the first tensor's
    out_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return _Raw(acc, nan, inf, amax, out_dtype, acc.device)


def global_raw_stats(tensors: list[torch.Tensor], norm_type: float, *, process_group=None, groups=None,
                     decide_group=None, names=None, reduced: dict | None = None):
    """raw_stats of the local parts of `tensors`, made global across ranks where they are sharded
    (DTensor placements, `process_group` for every plain tensor or `groups` per tensor) by one
    collective (see gradguard.distributed). Partial DTensors are reduced first (into `reduced`,
    see distributed.localize). Returns (raw, local tensors)."""
    if process_group is not None and groups is None:  # the functional API's process_group=
        _distributed.check_process_group(process_group, "gradguard")
        # The statistics are gathered by position: a rank with fewer tensors made gloo abort on
        # another, and one with none returned alone while the others hung. Checked at the first
        # call with each count (a host read), not at every call.
        _distributed.check_same_count_once(len(tensors), process_group, "gradguard")
        groups = [process_group] * len(tensors)
    local, plan = _distributed.localize(tensors, groups=groups, decide_group=decide_group, names=names,
                                        reduced=reduced)
    return _distributed.reduce_raw(raw_stats(local, norm_type, names), plan, norm_type), local


def _mark_nonfinite(value: torch.Tensor, nan: torch.Tensor, inf: torch.Tensor) -> torch.Tensor:
    value = torch.where(inf > 0, math.inf, value)
    return torch.where(nan > 0, math.nan, value)


def merge_shard_stats(acc: torch.Tensor, nan_count: torch.Tensor, inf_count: torch.Tensor, amax: torch.Tensor,
                      norm_type: float):
    """Merges the raw ``multi_tensor_stats`` results of K shards of the same n tensors (each
    argument of shape [K, n], e.g. gathered from K ranks) into the results of the whole tensors
    (shape [n]): counts add, amax is the max, and each shard's normalized sum is rescaled to the
    merged amax (a factor <= 1, so nothing overflows). Device ops only, no host sync."""
    p = check_norm_type(norm_type)
    for name, t in (("acc", acc), ("nan_count", nan_count), ("inf_count", inf_count), ("amax", amax)):
        if t.dim() != 2 or t.shape != acc.shape:
            raise ValueError(f"gradguard.merge_shard_stats: `{name}` must have shape [K, n] like `acc` "
                             f"{tuple(acc.shape)}, got {tuple(t.shape)}")
    m = amax.max(dim=0).values if amax.shape[0] else amax.new_zeros(amax.shape[1:])
    if math.isinf(p):
        merged = (m > 0).to(torch.float64)
    else:
        w = amax / torch.where(m > 0, m, 1.0)
        merged = (acc * (w if p == 1.0 else w.pow(p))).sum(dim=0)
    return merged, nan_count.sum(dim=0), inf_count.sum(dim=0), m


def _overflows(value64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """True where a norm of finite elements has no finite value in `dtype`."""
    return torch.isinf(value64.to(dtype))


def finalize(raw: _Raw, p: float) -> GradStats:
    """Norms in the result dtype. A norm of finite elements that this dtype cannot hold is inf
    and sets found_inf, exactly like a NaN/Inf element: a caller must never clip by it (the
    factor would be 0 and zero every gradient) or step with it. One op: guard_decide without
    state or limit computes the same norms, total and flag GradGuard's steps use (the ~20 small
    tensor ops this took before cost more than the stats pass itself on a 30 MB list)."""
    norms, amax, scalars, found, _, _, _ = torch.ops.gradguard.guard_decide.default(
        raw.acc, raw.nan_count, raw.inf_count, raw.amax, None, None, None, None, None, None, None, None, None,
        p, None, "ignore", "none", [], raw.out_dtype == torch.float64)
    return GradStats(
        norms=norms,
        nan_count=raw.nan_count,
        inf_count=raw.inf_count,
        amax=amax,
        total_norm=scalars[0].to(raw.out_dtype),
        found_inf=found,
    )


def grad_stats(tensors: Iterable[torch.Tensor], norm_type: float = 2.0, *, process_group=None) -> GradStats:
    """One read pass over `tensors`: per-tensor p-norm, NaN and Inf counts and largest finite
    magnitude, plus the total p-norm and a found-inf flag. No host sync.

    Returns a :class:`GradStats` of device tensors on the first tensor's device:

    - ``norms`` [n]: each tensor's p-norm (NaN if it holds a NaN, inf if it holds an inf);
    - ``nan_count``, ``inf_count`` [n] int64;
    - ``amax`` [n]: the largest finite |x| (0 if none);
    - ``total_norm`` (0-dim): the p-norm over all tensors together;
    - ``found_inf`` (0-dim float32): exactly 1.0 if any element is NaN or +-Inf, or if the total
      norm of the finite elements is too large for the result dtype (then ``total_norm`` is inf),
      else 0.0.

    Floating results are float64 if any input is float64, float32 otherwise. Sums are
    accumulated in float64, so a float32 gradient of 1e20 has norm 1e20, not inf. Sparse
    tensors count their stored values, complex ones |z|.

    Distributed: DTensor inputs (FSDP2, tensor parallel) give the statistics of the full
    tensors, reduced over the mesh dimensions that shard them and not over those that replicate
    them; ``process_group`` says that every plain tensor is a shard summed over that group
    (FSDP1 flat parameters, hand-rolled sharding). Either costs one collective, which every rank
    of the group must join with the same number of tensors (an empty tensor where a rank holds
    nothing); with ``process_group`` that is checked at the first call with each count (a small
    gather and a host read; not under torch.compile): a rank with another count raises ValueError
    on every rank instead of a hang or a gloo abort.
    """
    p = check_norm_type(norm_type)
    got = _host.plain_grad_stats(tensors, p) if process_group is None else None
    if got is not None:
        _refuse_meta(got[0].device, 0)  # one device per compiled call: the first tensor's
        return GradStats(*got)
    # Not the plain case (plain_stats would refuse it too): the general path.
    return finalize(global_raw_stats(as_tensor_list(tensors), p, process_group=process_group)[0], p)


def all_finite(tensors: Iterable[torch.Tensor], *, process_group=None) -> torch.Tensor:
    """0-dim bool device tensor: True when no element of any tensor is NaN or +-Inf. No sync.
    DTensors and ``process_group`` as in :func:`grad_stats`: the answer is then global."""
    raw = _raw_of(tensors, math.inf, process_group)
    return (raw.nan_count.sum() + raw.inf_count.sum()) == 0


_NONFINITE_MODES = ("skip", "raise", "zero")


def _params_and_names(parameters, where: str = "gradguard.clip_grad_norm_", keep_gradless: bool = False,
                      reduced: bool = False):
    """Accepts a tensor, an iterable of tensors, or of (name, tensor) pairs
    (``model.named_parameters()``); returns the tensors that have a .grad (and, with
    `keep_gradless`, or with `reduced` (the caller reduces their statistics across ranks) where
    one is a DTensor, those that have none and require one, as empty gradients: every rank of a
    group must pack the same entries), and their names.
    An exhausted (empty) generator warns as torch's clip does: it is almost always a
    ``model.parameters()`` consumed earlier, and clipping nothing silently hides that."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    elif isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    elif not isinstance(parameters, (list, tuple)):
        parameters = _iterable(parameters, "`parameters` (e.g. model.parameters())", where)
    params, names = [], []
    gradless = False
    for i, item in enumerate(parameters):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            name, p = f"param[{i}]", item
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: parameters[{i}] is a {type(p).__name__}, expected a tensor")
        if p.grad is None:
            gradless = True
            params.append(p)
            names.append(name)
        else:
            g = p.grad
            if not (g.is_floating_point() or g.is_complex()) or g.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{where}: the gradient of {name} has dtype {g.dtype}, "
                                "expected float16, bfloat16, float32 or float64")
            params.append(p)
            names.append(name)
    # DTensor parameters are reduced over their mesh: every rank must pack the same entries, so a
    # parameter without a gradient here (one that got none on this rank only) enters as an empty
    # gradient there too (a rank with fewer entries made gloo abort the gather).
    if gradless and not keep_gradless:
        trainable = reduced and any(_distributed.is_dtensor(q) for q in params)  # frozen: no gradient anywhere
        keep = [k for k, q in enumerate(params) if q.grad is not None or (trainable and q.requires_grad)]
        params, names = [params[k] for k in keep], [names[k] for k in keep]
    return params, names


def limit_on(max_norm: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor `max_norm` on `device`. A CPU tensor's value is read (free) and filled on an
    accelerator: `.to(device)` from pageable memory is a blocking copy, a host sync every step.
    (Under a CUDA graph capture its value at capture is then fixed; a device tensor can change
    between replays.) An integer or float8 one is read in float64 (exact), the dtypes the decision
    op takes being float16-float64: the compiled kernel refused a float8 one in its own op's name,
    and the reference took it; converted once when given, a schedule written into it in place was
    not followed."""
    if max_norm.dtype not in _FLOAT_DTYPES:
        max_norm = max_norm.to(torch.float64)
    if max_norm.device == device:
        return max_norm
    if max_norm.device.type == "cpu" and not torch.compiler.is_compiling():
        return device_scalar(float(max_norm), max_norm.dtype, device)
    return max_norm.to(device)


def check_max_norm(max_norm):
    """A number, or a one-element tensor (returned 0-dim). A CPU tensor's value is checked here
    (reading it costs nothing); an accelerator tensor's is not, since that read would sync: the
    guard checks it on the device (``guard_decide``) and skips a step whose limit is bad."""
    if isinstance(max_norm, torch.Tensor):
        if max_norm.numel() != 1 or max_norm.is_complex() or max_norm.dtype == torch.bool:
            err = ValueError if max_norm.numel() != 1 else ArgumentTypeError
            raise err(f"gradguard: `max_norm` must be a number or a one-element real tensor, got a tensor of "
                      f"shape {tuple(max_norm.shape)} and dtype {max_norm.dtype}")
        if max_norm.device.type == "meta":
            raise ValueError("gradguard: `max_norm` is a meta tensor, which holds no value; pass a number or a "
                             "tensor on the gradients' device (or on the CPU)")
        # Kept as it is (a view): a schedule written into it in place is followed. torch takes
        # integer and float8 limits too; limit_on reads those in float64 at each use.
        max_norm = max_norm.detach().reshape(())
        # Under torch.compile a read would be a data-dependent branch (fullgraph fails): there,
        # as for an accelerator tensor, the device checks it (max_norm_ok, guard_decide).
        if max_norm.device.type == "cpu" and not torch.compiler.is_compiling():
            v = float(max_norm)
            if math.isnan(v) or v < 0:
                raise ValueError(f"gradguard: `max_norm` must be a non-negative number, got tensor({v})")
        return max_norm
    number = real_number(max_norm)
    if number is None:
        raise ArgumentTypeError(f"gradguard: `max_norm` must be a non-negative number, got "
                                f"{type(max_norm).__name__} {max_norm!r}")
    # not math.isnan, nor float(): under torch.compile a changing max_norm (a clipping schedule)
    # is a symbolic float, which neither traces.
    if number != number or number < 0:
        raise ValueError(f"gradguard: `max_norm` must be a non-negative number, got {max_norm!r}")
    return number if type(number) is float or torch.compiler.is_compiling() else to_float(number, "gradguard: `max_norm`")


def max_norm_ok(max_norm):
    """None when `max_norm` was checked on the host; else a 0-dim device bool: is it >= 0
    (NaN is not)."""
    if isinstance(max_norm, torch.Tensor) and (max_norm.device.type != "cpu" or torch.compiler.is_compiling()):
        return max_norm >= 0
    return None


def _check_foreach(foreach, where: str) -> None:
    # Accepted for torch's signature; gradguard's kernels are multi-tensor whatever its value.
    if foreach is not None and not isinstance(foreach, bool):
        raise ArgumentTypeError(f"{where}: `foreach` must be None, True or False, got {foreach!r}")


def clip_coefficient(total_norm: torch.Tensor, max_norm) -> torch.Tensor:
    """PyTorch's clip factor, min(max_norm / (norm + 1e-6), 1), as a device tensor."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def scale_(grads: list[torch.Tensor], coef: torch.Tensor, zero_nonfinite: bool = False) -> None:
    """Multiplies every grad in place by the 0-dim device tensor `coef` (one pass per
    (device, dtype) group, none where coef is exactly 1); with `zero_nonfinite`, NaN/Inf elements
    become 0 in that same pass."""
    for idx in _grouped(grads):
        group = [grads[i] for i in idx]
        c = coef.to(group[0].device)
        if zero_nonfinite:
            torch.ops.gradguard.zero_nonfinite_and_scale_(group, c.to(torch.float32) if c.dtype != torch.float64 else c)
        else:
            torch.ops.gradguard.maybe_scale_(group, c)


def nonfinite_message(where: str, names, nan_count, inf_count, norms=None,
                      total_dtype: torch.dtype = torch.float32, bad_loss_scale: float | None = None,
                      bad_limit: float | None = None) -> tuple[str, list[str]]:
    """A sentence naming the offending tensors (this reads the counts: a host sync). With every
    element finite, a step is non-finite because the norm overflows `total_dtype`, or because
    the loss scale cannot be undone (`bad_loss_scale`: its value, where it is 0, negative, inf or
    so small that its inverse overflows): then it says so and names the tensors whose own norm
    overflows (`norms`, the per-tensor norms), or because a device `max_norm` is negative or NaN
    (`bad_limit`: its value; the decision makes such a step non-finite)."""
    nan_l, inf_l = nan_count.tolist(), inf_count.tolist()
    bad = [(n, a, b) for n, a, b in zip(names, nan_l, inf_l) if a or b]
    notes = []
    if bad_loss_scale is not None:
        notes.append(f"the loss scale is {bad_loss_scale!r}, which unscaling cannot undo (a GradScaler ends at 0 or "
                     "below ~3e-39 after NaN/Inf gradients on every step for ~140 steps)")
    if bad_limit is not None:
        notes.append(f"the tensor `max_norm` is {bad_limit!r}, a limit that cannot clip (negative or NaN; on the "
                     "device it is checked there, and the step is treated as non-finite)")
    scale = "; and ".join(notes)
    if not bad:
        if scale:
            scaled = " scaled" if bad_loss_scale is not None else ""
            return f"{where}: every{scaled} gradient element is finite, but {scale}", []
        return _overflow_message(where, names, norms, total_dtype)
    shown = ", ".join(f"{n} ({a} NaN, {b} Inf)" for n, a, b in bad[:10])
    more = f", and {len(bad) - 10} more" if len(bad) > 10 else ""
    return (f"{where}: non-finite gradients in {len(bad)} of {len(names)} tensors: {shown}{more}"
            + (f"; {scale}" if scale else ""), [n for n, _, _ in bad])


def _overflow_message(where: str, names, norms, total_dtype: torch.dtype) -> tuple[str, list[str]]:
    over = [] if norms is None else [n for n, v in zip(names, norms.to(total_dtype).tolist()) if math.isinf(v)]
    dtype = str(total_dtype).replace("torch.", "")
    if norms is None:  # torch's orders <= 0: a zero element makes a negative order's norm inf
        return f"{where}: every gradient element is finite, but the total norm is not finite in {dtype}", over
    if over:
        more = f", and {len(over) - 10} more" if len(over) > 10 else ""
        which = f"the norm of {len(over)} of {len(names)} tensors overflows: {', '.join(over[:10])}{more}"
    else:
        which = f"no single tensor's norm overflows, the total over all {len(names)} does"
    return (f"{where}: every gradient element is finite, but the gradient norm overflows {dtype} "
            f"({which}); it is treated as non-finite, since clipping by an infinite norm would zero "
            f"every gradient", over)


def grad_or_empty(p: torch.Tensor) -> torch.Tensor:
    if p.grad is not None:
        return p.grad
    return _distributed.empty_grad_of(p) if _distributed.is_dtensor(p) else p.detach().new_empty(0)


def refuse_unreduced_fsdp1(params, names, where: str, whole: frozenset = frozenset()) -> None:
    """FSDP1 shards are plain tensors: without a group to sum over, a norm would be this rank's."""
    for p, n in zip(params, names):
        if _distributed.is_fsdp1_sharded(p, whole):
            if where == "gradguard.GradGuard":
                hint = ("pass model=<the FSDP module> (it finds the group, and tells units that do not shard, "
                        "NO_SHARD or a single rank, from those that do)")
            else:
                hint = ("pass process_group=<the FSDP module's process_group> when every FSDP unit shards over it "
                        "(GradGuard takes model=<the FSDP module>, which also tells units that do not shard, "
                        "NO_SHARD or a single rank, from those that do)")
            raise ValueError(f"{where}: parameter {n!r} is an FSDP1 (FullyShardedDataParallel) parameter, so this "
                             f"rank may hold only a shard of its gradient; {hint}")


def _result_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    # torch's clip returns its stacked per-tensor norms' dtype: the promotion of the grads' dtypes.
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


class _Total(NamedTuple):
    norm: torch.Tensor        # the total norm at full precision (float32, or float64 with a float64 grad)
    found_inf: torch.Tensor   # 0-dim float32: 1.0 if any element is NaN or Inf
    raw: _Raw
    stats: GradStats | None   # per-tensor statistics (p > 0 only)


def _norms_of(tot: _Total):
    return None if tot.stats is None else tot.stats.norms


def _total_norm(grads: list[torch.Tensor], p: float, *, process_group=None, names=None) -> tuple[_Total, list]:
    """One read pass for p > 0 or inf. torch's other orders (0, negative, -inf) are not sums of
    finite |x|^p the stats kernel keeps (0 counts nonzeros, a zero element makes a negative
    order's sum inf): they take torch.linalg.vector_norm per tensor in float64, plus the stats
    pass for the NaN/Inf flag. Returns it with the local parts of `grads` (DTensor shards), which
    the clip scales."""
    if p > 0:
        raw, local = global_raw_stats(grads, p, process_group=process_group, names=names)
        stats = finalize(raw, p)
        return _Total(stats.total_norm, stats.found_inf, raw, stats), local
    if process_group is not None or any(_distributed.is_dtensor(g) for g in grads):
        raise ValueError(f"gradguard: `norm_type` {p} (0, a negative order or -inf) is not supported for sharded "
                         "gradients (DTensor or process_group=); use a positive order or inf")
    raw = raw_stats(grads, math.inf)
    device = grads[0].device
    norms = torch.stack([torch.linalg.vector_norm(g, p, dtype=torch.float64).to(device) for g in grads])
    total = torch.linalg.vector_norm(norms, p).to(raw.out_dtype)
    found_inf = ((raw.nan_count.sum() + raw.inf_count.sum()) > 0).to(torch.float32)
    return _Total(total, found_inf, raw, None), grads


def _raise_if_total_nonfinite(tot: _Total, p: float, names, where: str, dtype: torch.dtype) -> None:
    """torch's error_if_nonfinite: raise when the total norm, in `dtype` (the returned norm's:
    float16 grads give a float16 norm, which overflows above 65504 as torch's does), is NaN or
    +-inf (a host read), with torch's message first (code greps for it), then the tensors that
    hold NaN/Inf."""
    if bool(torch.isfinite(tot.norm.to(dtype))):
        return
    msg = (f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be clipped. "
           "To disable this error and leave such gradients untouched (gradguard never scales them by a "
           "non-finite norm), set `error_if_nonfinite=False`")
    detail, bad = nonfinite_message(where, names, tot.raw.nan_count, tot.raw.inf_count, _norms_of(tot), dtype)
    raise NonFiniteGradError(f"{msg}. {detail}", bad, tot.stats)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
    """Drop-in for ``torch.nn.utils.get_total_norm``: the p-norm of ``tensors`` taken together,
    in one read pass (p > 0 or inf; 0, negative orders and -inf are computed as torch does), no
    host sync unless ``error_if_nonfinite``.

    ``norm_type`` is a number, ``"inf"`` or a one-element tensor. The result is a 0-dim tensor on
    the first tensor's device, of the tensors' promoted dtype as torch returns it (float16 grads
    give a float16 norm); it is computed in float32 or float64 and only then cast.
    ``error_if_nonfinite=True`` raises :class:`NonFiniteGradError` (a ``RuntimeError`` with
    torch's message) when the norm is NaN or inf. ``foreach`` is accepted and changes nothing.
    No tensors: ``tensor(0.)``.
    """
    _check_foreach(foreach, "gradguard.get_total_norm")
    p = check_norm_type(norm_type, torch_compat=True)
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(_iterable(tensors, "`tensors`", "gradguard.get_total_norm"))
    if not tensors:
        return torch.tensor(0.0)
    grads = as_tensor_list(tensors)
    tot, _ = _total_norm(grads, p)
    if error_if_nonfinite:
        _raise_if_total_nonfinite(tot, p, [f"tensors[{i}]" for i in range(len(grads))], "gradguard.get_total_norm",
                                  _result_dtype(grads))
    return tot.norm.to(_result_dtype(grads))


def _check_total_norm(total_norm, where: str) -> torch.Tensor:
    if isinstance(total_norm, torch.Tensor):
        if _distributed.is_dtensor(total_norm):
            # torch.nn.utils.get_total_norm of DTensor gradients returns a DTensor: its value is
            # the same on every rank (a Partial one is reduced here, on every rank alike).
            total_norm = total_norm.full_tensor()
        if total_norm.numel() != 1:
            raise ValueError(f"{where}: `total_norm` must be a one-element tensor, got a {total_norm.dtype} tensor of "
                             f"shape {tuple(total_norm.shape)}")
        if total_norm.device.type == "meta":
            raise ValueError(f"{where}: `total_norm` is a meta tensor, which holds no value")
        if total_norm.is_complex() or total_norm.dtype == torch.bool:
            raise ArgumentTypeError(f"{where}: `total_norm` must be a real tensor, got a {total_norm.dtype} tensor")
        if not total_norm.is_floating_point():  # an integer norm, as torch takes it
            total_norm = total_norm.to(torch.float64)
        return total_norm.reshape(())
    number = real_number(total_norm)
    if number is None:
        raise ArgumentTypeError(f"{where}: `total_norm` must be a tensor (as get_total_norm returns) or a number, "
                                f"got {type(total_norm).__name__} {total_norm!r}")
    # An integer past float's range is an infinite norm, left alone as one.
    return torch.tensor(float_or_inf(number), dtype=torch.float64)


def _check_clippable(params, names, where: str) -> None:
    """The clip functions scale strided real gradients (as torch's clip_grad_norm_, whose norm
    refuses sparse ones); checked before anything is read."""
    for q, name in zip(params, names):
        g = q.grad
        if g is not None and (g.layout is not torch.strided or g.is_complex()):
            kind = "complex" if g.is_complex() else "nested" if g.is_nested else f"a tensor of layout {g.layout}"
            raise TypeError(f"{where}: the gradient of {name!r} is {kind}; the clip functions take strided real "
                            "gradients (sparse, complex and other layouts are not supported)")


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None) -> None:
    """Drop-in for ``torch.nn.utils.clip_grads_with_norm_``: multiplies every gradient by
    ``min(max_norm / (total_norm + 1e-6), 1)`` in one pass, no host sync, nothing written when the
    factor is exactly 1.

    Unlike torch, a NaN, infinite or negative ``total_norm`` leaves the gradients untouched (torch
    multiplies them by NaN or 0, or flips their sign). ``foreach`` is accepted and changes nothing.
    """
    where = "gradguard.clip_grads_with_norm_"
    _check_foreach(foreach, where)
    max_norm = check_max_norm(max_norm)
    total = _check_total_norm(total_norm, where)
    params, names = _params_and_names(parameters, where)
    grads = [q.grad for q in params]
    if not grads:
        return
    _check_clippable(params, names, where)
    if total.dtype not in (torch.float32, torch.float64):
        total = total.to(torch.float32)  # a float16 norm's 1e-6 and quotient would round in float16
    # Computed as guard_decide computes it (float64, rounded once), so that get_total_norm then
    # clip_grads_with_norm_ scales exactly as clip_grad_norm_ does.
    # A number is filled on the device (torch.tensor would copy it from the host: a sync on a GPU,
    # and no CUDA graph could capture it).
    limit = (limit_on(max_norm, total.device).double() if isinstance(max_norm, torch.Tensor)
             else device_scalar(max_norm, torch.float64, total.device))
    total64 = total.double()
    # A norm is never negative: a negative one (not a norm; torch flips and inflates the grads by
    # it) is as unusable as a NaN, and its root is NaN: one test for NaN, inf and negative.
    coef = torch.where(torch.isfinite(total64.sqrt()), torch.clamp(limit / (total64 + 1e-6), max=1.0), 1.0)
    ok = max_norm_ok(max_norm)
    if ok is not None:  # a negative or NaN max_norm not checked on the host: leave the grads untouched
        coef = torch.where(ok.to(coef.device), coef, 1.0)
    coef = coef.to(total.dtype)
    # DTensor grads are scaled through their local shards (the factor is the same on every rank).
    scale_([_distributed._local(g) if _distributed.is_dtensor(g) else g.detach() for g in grads], coef)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite: bool = False,
                    foreach=None, *, nonfinite: str = "skip", process_group=None) -> torch.Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` with one statistics pass, one scaling pass,
    no host sync, and gradients that survive a non-finite norm.

    Returns the total norm of the gradients as they came in (NaN or inf if any element was, for
    p > 0), as a 0-dim tensor of the grads' promoted dtype, as torch returns it. ``norm_type``
    takes what torch's takes: a number (0, negative orders and -inf included), ``"inf"``, a
    one-element tensor. ``nonfinite`` says what happens when any gradient element is NaN/Inf:
    ``"skip"`` leaves every gradient untouched; ``"raise"`` raises :class:`NonFiniteGradError`
    naming the parameters (a host sync); ``"zero"`` sets the non-finite elements to 0 and clips
    the rest by the norm of the finite ones.

    ``error_if_nonfinite=True`` raises exactly where torch's does, when the total norm is NaN or
    inf (a host sync), as a :class:`NonFiniteGradError` (a ``RuntimeError``) whose message starts
    with torch's ("The total norm of order ... is non-finite, so it cannot be clipped") and then
    names the parameters; otherwise ``nonfinite`` applies. ``foreach`` is accepted and changes
    nothing. ``parameters`` may also be ``model.named_parameters()``, so errors name the layers;
    an exhausted generator warns as torch's does.

    Same as ``get_total_norm`` then ``clip_grads_with_norm_``, but in one call the clip factor
    uses the full-precision norm (a float16 grad list whose norm exceeds 65504 is clipped by its
    true norm; the returned float16 value is inf, as torch's).

    Distributed: DTensor gradients (FSDP2, tensor parallel) are clipped by their global norm, the
    same on every rank (a ``Partial`` one is reduced first, and the reduced gradient kept in
    ``.grad``); ``process_group`` sums the statistics of plain gradients over that group
    (FSDP1: the FSDP module's ``process_group`` when every unit shards; units that do not,
    ``NO_SHARD``, hold whole gradients, which it would count once per rank: use FSDP1's own
    ``model.clip_grad_norm_`` or ``GradGuard(model=...)`` there; without it an FSDP1 shard is
    refused). One collective, which every rank of the group must join.
    """
    where = "gradguard.clip_grad_norm_"
    if nonfinite not in _NONFINITE_MODES:
        raise ValueError(f"{where}: `nonfinite` must be one of {_NONFINITE_MODES}, got {nonfinite!r}")
    _check_foreach(foreach, where)
    max_norm = check_max_norm(max_norm)
    p = check_norm_type(norm_type, torch_compat=True)
    # Every rank must pack the same entries: a shard with no .grad on this rank (an FSDP1 shard
    # that is empty here, an expert that got no tokens) may have one elsewhere, so with a group,
    # or DTensor parameters, every parameter without a gradient enters as an empty one.
    params, names = _params_and_names(parameters, where, keep_gradless=process_group is not None, reduced=True)
    if process_group is None:
        refuse_unreduced_fsdp1(params, names, where)
    _check_clippable(params, names, where)
    grads = as_tensor_list([grad_or_empty(q) for q in params], what="grads")
    if not grads:
        if process_group is not None:  # joins the others' count check: they would wait for this rank
            _distributed.check_process_group(process_group, where)
            _distributed.check_same_count_once(0, process_group, where)
        return torch.tensor(0.0)
    if p > 0:
        return _clip_decided(grads, p, max_norm, nonfinite, error_if_nonfinite, process_group, names, where, params)
    tot, grads = _total_norm(grads, p, process_group=process_group, names=names)
    if error_if_nonfinite:
        _raise_if_total_nonfinite(tot, p, names, where, _result_dtype(grads))
    if nonfinite == "raise":
        if bool(tot.found_inf):
            msg, bad = nonfinite_message(where, names, tot.raw.nan_count, tot.raw.inf_count, _norms_of(tot),
                                         tot.raw.out_dtype)
            raise NonFiniteGradError(msg, bad, tot.stats)
        scale_(grads, clip_coefficient(tot.norm, max_norm))
    elif nonfinite == "skip":
        coef = torch.where(tot.found_inf > 0, 1.0, clip_coefficient(tot.norm, max_norm))
        ok = max_norm_ok(max_norm)
        if ok is not None:  # a negative or NaN device max_norm: leave the grads untouched
            coef = torch.where(ok.to(coef.device), coef, 1.0)
        scale_(grads, coef)
    else:  # "zero": clip by the norm of what is left once the non-finite elements are gone
        finite = _total_norm([g.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) for g in grads], p)[0].norm
        scale_(grads, clip_coefficient(finite, max_norm), zero_nonfinite=True)
    return tot.norm.to(_result_dtype(grads))


def _clip_decided(grads, p, max_norm, nonfinite, error_if_nonfinite, process_group, names, where, params):
    """p > 0: the stats pass, then the decision GradGuard's steps make (``guard_decide``, without
    state): one place holds the skip/zero/raise and clip rules for both."""
    reduced = {}
    raw, local = global_raw_stats(grads, p, process_group=process_group, names=names, reduced=reduced)
    for i, g in reduced.items():  # a Partial gradient, reduced: that is the one clipped (and kept)
        params[i].grad = g
    limit_t = None
    if isinstance(max_norm, torch.Tensor):
        limit_t, max_norm = limit_on(max_norm, raw.device), None
    elif torch.compiler.is_compiling():
        # A number argument of the op is fixed into the graph: a clipping schedule recompiled at
        # every value. As a tensor (device_scalar) it stays symbolic.
        limit_t, max_norm = device_scalar(max_norm, torch.float64, raw.device), None
    _, _, scalars, found, mult, _, _ = torch.ops.gradguard.guard_decide(
        raw.acc, raw.nan_count, raw.inf_count, raw.amax, None, limit_t, None, None, None, None, None, None, None,
        p, max_norm, nonfinite, "none", [], raw.out_dtype == torch.float64)
    total = scalars[0].to(raw.out_dtype)
    if error_if_nonfinite or nonfinite == "raise":
        tot = _Total(total, found, raw, finalize(raw, p))
        if error_if_nonfinite:
            _raise_if_total_nonfinite(tot, p, names, where, _result_dtype(local))
        if nonfinite == "raise" and bool(found):
            msg, bad = nonfinite_message(where, names, raw.nan_count, raw.inf_count, tot.stats.norms, raw.out_dtype)
            raise NonFiniteGradError(msg, bad, tot.stats)
    # "skip": the multiplier is 1 for a non-finite step or a bad device max_norm (nothing written);
    # "zero": the clip factor of the finite elements' norm, NaN/Inf zeroed in the same pass.
    scale_(local, mult, zero_nonfinite=nonfinite == "zero")
    return total.to(_result_dtype(local))
