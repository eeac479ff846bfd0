"""Reference kernel of ``gradguard::guard_decide``: the whole decision of a guarded step, from the
raw per-tensor results of ``multi_tensor_stats`` and the guard's device state.

It is the default kernel of the op (every device without a compiled one) and the test oracle of
the CPU and CUDA kernels (csrc/guard_decide_math.h holds their shared scalar math). All math is
float64; a value is rounded to its result dtype once, at the end. Read it as the specification:

Inputs (all on one device; per-tensor ones of shape [n]):
    acc, nan_count, inf_count, amax: what multi_tensor_stats returns (made global across ranks).
    index: int64 [n] positions of the n tensors among the guard's P parameters (None: n == P).
        GradGuard's are distinct; a repeated one (a direct call) adds its tensors' non-finite
        counts and keeps the largest of their norms (the CUDA kernel's updates are atomic).
    max_norm: 0-dim device tensor limit, or None.  max_norm_value: a number limit, or None.
    loss_scale: GradScaler's scale still in the grads (0-dim), or None.
    scaler_found: GradScaler's found-inf flag (0-dim, a sum over devices), or None.
    counters: int64 [5] skipped steps, clipped steps, non-finite steps, skip streak, history
        entries written (the ring slot is that count modulo the history's rows).
    layer_nonfinite int64 [P], layer_max_norm float64 [P]: per-parameter totals.
    spike_state: float64; zscore: [mean, var, count]; percentile: [count, window values (NaN =
        unfilled)]; none: ignored (may be empty).  spike_args: zscore (z, alpha, warmup);
        percentile (q, window, warmup).
    history: float64 [H, 3] ring of (total_norm, clip_coef, skipped).
    Any of the five state tensors may be None (``clip_grad_norm_`` keeps no state).
    norm_type: p > 0 or inf.  nonfinite: "skip", "zero", "raise" or "ignore" (a GradScaler, i.e.
    loss_scale or scaler_found given, makes it "skip").  double_out: results in float64 (a
    float64 gradient), else float32.

Outputs:
    norms, amax_out [n] (result dtype): per-tensor norm (NaN/inf where the tensor holds one) and
        largest finite |x|, divided by the loss scale.
    scalars float64 [9]: total_norm, clip_coef, found_inf, skipped, amp_overflow, skip streak
        (after this step), multiplier (clip_coef / loss_scale: what the grads are multiplied by),
        clipped, and the history rows written after this step (counters[4], 0 without counters:
        the step's number on the device, which the host cannot count across CUDA graph replays).
        One transfer reads everything the host may need.
    found_inf float32 0-dim (exactly 0 or 1; what a fused optimizer takes).
    multiplier 0-dim (float64 in "zero" mode or with float64 results, else float32).
    grad_scale float32 0-dim: loss_scale / clip_coef, the divisor a fused optimizer applies;
        with a loss scale, where that is past float32 (a GradScaler scale grown to 2^124 over a
        clip coefficient below 1/16: inf, and a fused kernel zeroed every gradient), the loss
        scale alone, and
    pre_scale float32 0-dim the clip coefficient, to multiply the gradients by first; else 1.

The rules:
    found_inf = any NaN/Inf element, or a total norm of finite elements too large for the result
        dtype, or GradScaler's flag, or a device max_norm that is negative or NaN.
    The clip basis is the total norm (result dtype); in "zero" mode the float64 norm of the
    finite elements. limit = min(max_norm, max_norm_value, spike threshold); the spike threshold
    is the policy's limit when its warm-up is over and the basis exceeds it, else inf.
    clip_coef = min(limit / (basis + 1e-6), 1) (1 without any limit); a non-finite step keeps
    clip_coef 1 except in "zero" mode. skipped = non-finite in "skip"/"raise" mode. clipped =
    clip_coef < 1 and not skipped.
    The spike policy absorbs the clipped basis (zscore: Welford during warm-up, then an EMA) or
    the raw one (percentile: the ring slot count % window) only on a finite step.
    The streak is reset by a taken step, grows by a skipped one, and is left as it is by a
    GradScaler overflow, unless the loss scale is itself bad (not positive, inf, or its inverse
    overflows the multiplier's dtype): a NaN that never goes away keeps the scaler's flag set.
    Per parameter: non-finite steps += 1 where the grad held NaN/Inf, max norm = max(max norm,
    finite norm, 0 for a non-finite grad).
"""
from __future__ import annotations

import math

import torch

MODES = ("skip", "zero", "raise", "ignore")
SPIKES = ("none", "zscore", "percentile")
SCALARS = ("total_norm", "clip_coef", "found_inf", "skipped", "amp_overflow", "streak", "multiplier", "clipped")


def _root(acc: torch.Tensor, p: float) -> torch.Tensor:
    if math.isinf(p) or p == 1.0:
        return acc
    if p == 2.0:
        return acc.sqrt()
    return acc.pow(1.0 / p)


def _scaled_root(scale: torch.Tensor, acc: torch.Tensor, p: float) -> torch.Tensor:
    """scale * acc^(1/p). For p far below 1, acc^(1/p) alone can pass float64's range where the
    product does not (2,000 elements of 1e-200 at p = 0.01: 2000^100 is inf, the norm 1.3e130):
    there (scale^p * acc)^(1/p), whose factor scale^p stays in range for such p. acc is a sum of
    terms <= 1, so acc^(1/p) <= acc for p >= 1 (guard_decide_math.h's scaled_root)."""
    r = _root(acc, p)
    if math.isinf(p) or p >= 1.0:
        return scale * r
    return torch.where(torch.isinf(r) & ~torch.isinf(acc), (scale.pow(p) * acc).pow(1.0 / p), scale * r)


def _total(acc: torch.Tensor, amax: torch.Tensor, p: float) -> torch.Tensor:
    # acc is normalized by each tensor's amax: rescale to the largest amax (factors <= 1).
    if acc.numel() == 0:
        return acc.new_zeros(())
    m = amax.max()
    if math.isinf(p):
        return m
    w = amax / torch.where(m > 0, m, 1.0)
    return _scaled_root(m, (acc * (w if p == 1.0 else w.pow(p))).sum(), p)


def bad_loss_scale(ls64: torch.Tensor) -> torch.Tensor:
    """A loss scale unscaling cannot undo: not positive, inf, or its inverse beyond float32, in
    which GradScaler takes it, whatever the multiplier's dtype (guard_decide_math.h's bad_scale;
    the guard's error message asks it too)."""
    return ~((ls64 > 0) & ~torch.isinf(ls64) & ~torch.isinf(_round(1.0 / ls64, torch.float32)))


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64) rounded to `dtype` and back: the value a `dtype` result holds."""
    return x.to(dtype).double()


def _spike_limit(spike: str, args, state: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    if spike == "zscore":
        z, _, warmup = args
        mean, var, count = state[0], state[1], state[2]
        limit = mean + z * var.sqrt()
    else:
        q, _, warmup = args
        count = state[0]
        limit = torch.nanquantile(state[1:], q)
    # Only a norm above the limit is clipped: a norm on it (e.g. std 0) is left alone.
    return torch.where((count >= warmup) & (basis > limit), limit, math.inf)


def _spike_update(spike: str, args, state: torch.Tensor, basis, clipped_basis, finite) -> None:
    if spike == "zscore":
        _, alpha, warmup = args
        mean, var, count = state[0], state[1], state[2]
        x = clipped_basis
        warm = count < warmup
        # Welford's update during warm-up (weight 1/(n+1)), an EMA after (weight 1 - alpha).
        w = torch.where(warm, 1.0 / (count + 1.0), 1.0 - alpha)
        new_mean = mean + w * (x - mean)
        term = torch.where(warm, (x - mean) * (x - new_mean), (x - new_mean) ** 2)
        new_var = var + w * (term - var)
        # A square or squared deviation past float64's range is not absorbed (guard_decide_math.h).
        keep = finite & ~torch.isinf(new_var) & ~torch.isinf(x * x)
        state.copy_(torch.where(keep, torch.stack([new_mean, new_var, count + 1.0]), state))
    else:
        window = int(args[1])
        slot = torch.remainder(state[0], window).to(torch.int64)
        buf = state[1:]
        hit = (torch.arange(window, device=state.device) == slot) & finite
        buf.copy_(torch.where(hit, basis, buf))
        state[0] += finite.double()


def guard_decide(acc, nan_count, inf_count, amax, index, max_norm, loss_scale, scaler_found,
                 counters, layer_nonfinite, layer_max_norm, spike_state, history,
                 norm_type, max_norm_value, nonfinite, spike, spike_args, double_out):
    p = float(norm_type)
    mode = nonfinite
    max_norm, loss_scale, scaler_found = (None if t is None else t.reshape(())
                                          for t in (max_norm, loss_scale, scaler_found))
    out_dtype = torch.float64 if double_out else torch.float32
    dev = acc.device
    acc, amax = acc.double(), amax.double()
    amp = loss_scale is not None or scaler_found is not None
    mode = "skip" if amp else mode
    basis_dtype = torch.float64 if (mode == "zero" or double_out) else out_dtype

    # Per-tensor and total norms (float64), NaN/inf marked.
    bad = (nan_count + inf_count) > 0
    norms64 = _scaled_root(amax, acc, p)
    norms64 = torch.where(nan_count > 0, math.nan, torch.where(inf_count > 0, math.inf, norms64))
    finite_total = _total(acc, amax, p)
    nan_total, inf_total = nan_count.sum(), inf_count.sum()
    total64 = torch.where(nan_total > 0, math.nan, torch.where(inf_total > 0, math.inf, finite_total))
    inv = 1.0 if loss_scale is None else 1.0 / loss_scale.to(device=dev).double()
    total = _round(total64 * inv, out_dtype)
    # Judged unscaled; a loss scale that is not positive, inf, or whose inverse overflows float32
    # is as bad (see guard_decide_math.h).
    found = ((nan_total + inf_total) > 0) | ~torch.isfinite(total)
    bad_scale = torch.zeros((), dtype=torch.bool, device=dev)
    if loss_scale is not None:
        ls64 = loss_scale.to(device=dev).double()
        bad_scale = bad_loss_scale(ls64)
        found = found | bad_scale
    overflow = torch.zeros((), dtype=torch.bool, device=dev)
    if scaler_found is not None:
        overflow = scaler_found.to(device=dev).double() > 0
        found = found | overflow
    if max_norm is not None:
        bad_limit = ~(max_norm.to(device=dev).double() >= 0)  # not a limit, in any mode
        found = found | bad_limit
    finite = ~found

    norms = _round(norms64 * inv, out_dtype)
    amax_out = _round(amax * inv, out_dtype)
    basis = finite_total if mode == "zero" else total

    limit = torch.full((), math.inf, dtype=torch.float64, device=dev)
    clipping = max_norm is not None or max_norm_value is not None or spike != "none"
    if max_norm_value is not None:
        limit = torch.clamp(limit, max=float(max_norm_value))
    if max_norm is not None:
        limit = torch.minimum(limit, torch.where(bad_limit, math.inf, max_norm.to(device=dev).double()))
    spike_limit = None
    if spike != "none":
        spike_limit = _round(_spike_limit(spike, spike_args, spike_state, basis), basis_dtype)
        limit = torch.minimum(limit, spike_limit)
    if clipping:
        coef = _round(torch.clamp(limit / (basis + 1e-6), max=1.0), basis_dtype)
        if mode != "zero":
            coef = torch.where(finite, coef, 1.0)
    else:
        coef = torch.ones((), dtype=torch.float64, device=dev)
    if spike != "none":
        # A zero norm (no gradient at all) is not absorbed either: see guard_decide_math.h.
        _spike_update(spike, spike_args, spike_state, basis, torch.minimum(basis, spike_limit), finite & (basis > 0))

    skipped = ~finite if mode in ("skip", "raise") else torch.zeros((), dtype=torch.bool, device=dev)
    clipped = (coef < 1) & ~skipped
    ls = 1.0 if loss_scale is None else loss_scale.to(device=dev).double()
    multiplier = _round(coef / ls, basis_dtype)
    grad_scale = (ls / coef).to(torch.float32)
    pre_scale = torch.ones((), dtype=torch.float32, device=dev)
    if loss_scale is not None:
        past = torch.isinf(grad_scale) & ~torch.isinf(ls)
        pre_scale = torch.where(past, coef.to(torch.float32), pre_scale)
        grad_scale = torch.where(past, ls.to(torch.float32), grad_scale)

    if counters is not None:
        streak = torch.where(skipped, counters[3] + 1, 0)
        streak = torch.where(overflow & ~bad_scale, counters[3], streak)
        if history is not None:
            # One row written in place, at an index the device holds (no host read): a where()
            # over the whole ring cost ~13 ms a step at history_size=1e6.
            slot = torch.remainder(counters[4], history.shape[0]).reshape(1)
            row = torch.stack([total, coef, skipped.double()]).to(history.dtype)
            history.index_copy_(0, slot, row[None, :])
        counters.copy_(counters + torch.stack([skipped.long(), clipped.long(), found.long(),
                                               streak - counters[3], torch.ones_like(counters[4])]))
        written = counters[4].double()
    else:
        streak = skipped.long()
        written = torch.zeros((), dtype=torch.float64, device=dev)
    if layer_nonfinite is not None:
        where = torch.arange(layer_nonfinite.numel(), device=dev) if index is None else index
        layer_nonfinite.index_add_(0, where, bad.long())
        finite_norms = torch.where(bad, 0.0, norms)
        # scatter_reduce, not an indexed assignment: with a repeated position the last write won,
        # where the CPU kernel keeps the largest (NaN-propagating, as its max_nan does).
        layer_max_norm.scatter_reduce_(0, where, finite_norms, reduce="amax", include_self=True)

    scalars = torch.stack([total, coef, found.double(), skipped.double(), overflow.double(), streak.double(),
                           multiplier, clipped.double(), written])
    return (norms.to(out_dtype), amax_out.to(out_dtype), scalars, found.to(torch.float32),
            multiplier.to(basis_dtype), grad_scale, pre_scale)
