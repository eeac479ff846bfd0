"""Multi-tensor gradient statistics: grad_stats, all_finite, clip_grad_norm_.

Everything here returns device tensors and never reads a value back to the host (the one
exception: ``clip_grad_norm_(nonfinite="raise")``, which must look at the flag to raise). Results
gather on the first tensor's device: a list that mixes CUDA tensors into a CPU-first list copies
their small per-tensor results to the host, which waits for the GPU; put a CUDA tensor first.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, NamedTuple

import torch

from gradguard import _ops  # noqa: F401  (defines torch.ops.gradguard.*)
from gradguard.errors import NonFiniteGradError

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


def check_norm_type(norm_type) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise ValueError(f"gradguard: `norm_type` must be a positive number or inf, got {norm_type!r}")
    p = float(norm_type)
    if math.isnan(p) or p <= 0.0:
        raise ValueError(f"gradguard: `norm_type` must be > 0 (or inf), got {norm_type!r}")
    return p


def as_tensor_list(tensors, what: str = "tensors") -> list[torch.Tensor]:
    """The values a gradient list is judged by: sparse tensors by their (coalesced) values,
    complex ones by |z|. Refuses anything that is not a floating-point or complex tensor."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradguard: {what}[{i}] is a {type(t).__name__}, expected a floating-point or complex tensor")
        if t.layout == torch.sparse_coo:
            t = t.coalesce().values()
        elif t.layout != torch.strided:
            t = t.values()  # compressed layouts hold no duplicates
        if t.is_complex():
            t = t.abs()
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"gradguard: {what}[{i}] has dtype {t.dtype}, expected a floating-point or complex tensor")
        out.append(t.detach())
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


def raw_stats(tensors, norm_type: float) -> _Raw:
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


def _root(acc: torch.Tensor, p: float) -> torch.Tensor:
    if math.isinf(p) or p == 1.0:
        return acc
    if p == 2.0:
        return acc.sqrt()
    return acc.pow(1.0 / p)


def _mark_nonfinite(value: torch.Tensor, nan: torch.Tensor, inf: torch.Tensor) -> torch.Tensor:
    value = torch.where(inf > 0, math.inf, value)
    return torch.where(nan > 0, math.nan, value)


def _norms64(acc: torch.Tensor, amax: torch.Tensor, p: float) -> torch.Tensor:
    # acc is normalized by amax (see the op's schema in gradguard._ops): norm = amax * acc^(1/p),
    # a float64 product that overflows only when the norm itself is above float64's range.
    return amax * _root(acc, p)


def _total64(acc: torch.Tensor, amax: torch.Tensor, p: float) -> torch.Tensor:
    """The float64 p-norm of all finite elements together, from per-tensor (acc, amax)."""
    if acc.numel() == 0:
        return acc.new_zeros(())
    m = amax.max()
    if math.isinf(p):
        return m
    w = amax / torch.where(m > 0, m, 1.0)
    return m * _root((acc * (w if p == 1.0 else w.pow(p))).sum(), p)


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


def finite_norm(raw: _Raw, p: float) -> torch.Tensor:
    """The total p-norm of the finite elements only: what is left once NaN/Inf are zeroed.
    float64 (not the grads' dtype), so that a norm above the grads' range still gives the right,
    representable clip factor."""
    return _total64(raw.acc, raw.amax, p)


def finalize(raw: _Raw, p: float) -> GradStats:
    """Norms in the result dtype. A norm of finite elements that this dtype cannot hold is inf
    and sets found_inf, exactly like a NaN/Inf element: a caller must never clip by it (the
    factor would be 0 and zero every gradient) or step with it."""
    norms = _mark_nonfinite(_norms64(raw.acc, raw.amax, p), raw.nan_count, raw.inf_count)
    tot = _total64(raw.acc, raw.amax, p)
    nan_total, inf_total = raw.nan_count.sum(), raw.inf_count.sum()
    total = _mark_nonfinite(tot, nan_total, inf_total).to(raw.out_dtype)
    found_inf = (((nan_total + inf_total) > 0) | _overflows(tot, raw.out_dtype)).to(torch.float32)
    return GradStats(
        norms=norms.to(raw.out_dtype),
        nan_count=raw.nan_count,
        inf_count=raw.inf_count,
        amax=raw.amax.to(raw.out_dtype),
        total_norm=total,
        found_inf=found_inf,
    )


def grad_stats(tensors: Iterable[torch.Tensor], norm_type: float = 2.0) -> GradStats:
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
    """
    p = check_norm_type(norm_type)
    return finalize(raw_stats(as_tensor_list(tensors), p), p)


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-dim bool device tensor: True when no element of any tensor is NaN or +-Inf. No sync."""
    raw = raw_stats(as_tensor_list(tensors), math.inf)
    return (raw.nan_count.sum() + raw.inf_count.sum()) == 0


_NONFINITE_MODES = ("skip", "raise", "zero")


def _params_and_names(parameters):
    """Accepts a tensor, an iterable of tensors, or of (name, tensor) pairs
    (``model.named_parameters()``); returns the tensors that have a .grad, and their names."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params, names = [], []
    for i, item in enumerate(parameters):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            name, p = f"param[{i}]", item
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"gradguard.clip_grad_norm_: parameters[{i}] is a {type(p).__name__}, expected a tensor")
        if p.grad is not None:
            g = p.grad
            if not (g.is_floating_point() or g.is_complex()) or g.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"gradguard.clip_grad_norm_: the gradient of {name} has dtype {g.dtype}, "
                                "expected float16, bfloat16, float32 or float64")
            params.append(p)
            names.append(name)
    return params, names


def check_max_norm(max_norm):
    if isinstance(max_norm, torch.Tensor):
        return max_norm  # validating it would read it back to the host
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise ValueError(f"gradguard: `max_norm` must be a non-negative number, got {max_norm!r}")
    if math.isnan(max_norm) or max_norm < 0:
        raise ValueError(f"gradguard: `max_norm` must be a non-negative number, got {max_norm!r}")
    return float(max_norm)


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


def nonfinite_message(where: str, names, nan_count, inf_count) -> tuple[str, list[str]]:
    """A sentence naming the offending tensors (this reads the counts: a host sync)."""
    nan_l, inf_l = nan_count.tolist(), inf_count.tolist()
    bad = [(n, a, b) for n, a, b in zip(names, nan_l, inf_l) if a or b]
    shown = ", ".join(f"{n} ({a} NaN, {b} Inf)" for n, a, b in bad[:10])
    more = f", and {len(bad) - 10} more" if len(bad) > 10 else ""
    return (f"{where}: non-finite gradients in {len(bad)} of {len(names)} tensors: {shown}{more}",
            [n for n, _, _ in bad])


def clip_grad_norm_(parameters, max_norm, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None, *, nonfinite: str = "skip") -> torch.Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` with one statistics pass, one scaling pass,
    no host sync, and gradients that survive a non-finite norm.

    Returns the total norm of the gradients as they came in (NaN or inf if any element was).
    ``nonfinite`` says what happens then: ``"skip"`` leaves every gradient untouched; ``"raise"``
    raises :class:`NonFiniteGradError` naming the parameters (a host sync); ``"zero"`` sets the
    non-finite elements to 0 and clips the rest by the norm of the finite ones.
    ``error_if_nonfinite=True`` means ``nonfinite="raise"``; ``foreach`` is accepted for
    compatibility and ignored. ``parameters`` may also be ``model.named_parameters()``, so errors
    name the layers.
    """
    if nonfinite not in _NONFINITE_MODES:
        raise ValueError(f"gradguard.clip_grad_norm_: `nonfinite` must be one of {_NONFINITE_MODES}, got {nonfinite!r}")
    if error_if_nonfinite:
        nonfinite = "raise"
    max_norm = check_max_norm(max_norm)
    p = check_norm_type(norm_type)
    params, names = _params_and_names(parameters)
    grads = as_tensor_list([q.grad for q in params], what="grads")
    if not grads:
        return torch.tensor(0.0)
    if any(g.is_complex() or g.layout != torch.strided for g in (q.grad for q in params)):
        raise TypeError("gradguard.clip_grad_norm_: sparse and complex gradients are not supported for clipping")
    raw = raw_stats(grads, p)
    stats = finalize(raw, p)
    if nonfinite == "raise":
        if bool(stats.found_inf):
            msg, bad = nonfinite_message("gradguard.clip_grad_norm_", names, stats.nan_count, stats.inf_count)
            raise NonFiniteGradError(msg, bad, stats)
        scale_(grads, clip_coefficient(stats.total_norm, max_norm))
    elif nonfinite == "skip":
        coef = torch.where(stats.found_inf > 0, 1.0, clip_coefficient(stats.total_norm, max_norm))
        scale_(grads, coef)
    else:  # "zero": clip by the norm of what is left once the non-finite elements are gone
        scale_(grads, clip_coefficient(finite_norm(raw, p), max_norm), zero_nonfinite=True)
    return stats.total_norm
