"""The gradguard dispatcher ops: schemas, fake (meta) kernels, and the reference kernels
registered as each op's default implementation.

Compiled kernels (``gradguard._C``) register CPU and CUDA implementations of these same ops with
``TORCH_LIBRARY_IMPL``; the dispatcher picks them over the default where they exist. The public
API in ``gradguard.stats`` only ever calls ``torch.ops.gradguard.*``.
"""
from __future__ import annotations

import torch

from gradguard import reference

_lib = torch.library.Library("gradguard", "DEF")

# All tensors of one call share a device and a dtype (the Python API groups them); a tensor on
# another device (meta included) is an error. Outputs, each of shape [len(tensors)] on
# tensors[0]'s device, per tensor x:
#   acc  float64  sum over the finite elements of (|x| / amax)^p; 0 when amax is 0; for p = inf,
#                 1 when amax > 0. Normalized so that it never overflows (it lies in [1, numel]):
#                 the norm is amax * acc^(1/p), computed in float64 by gradguard.stats, and a norm
#                 above float64's range is inf there, never a wrong finite number.
#   nan, inf  int64   the NaN and +-Inf element counts;
#   amax float64  the largest finite |x| (0 if none).
# Results of shards of the same tensors merge exactly: gradguard.stats.merge_shard_stats.
_lib.define("multi_tensor_stats(Tensor[] tensors, float norm_type) -> (Tensor, Tensor, Tensor, Tensor)")
# Both mutate every tensor of the list in place; `scale` is a 0-dim tensor on their device, so the
# factor never visits the host. maybe_scale_ writes nothing when scale is exactly 1 (an unclipped
# or skipped step leaves the grads' bits untouched); zero_nonfinite_and_scale_ also sets NaN/Inf
# elements to 0 in the same pass.
_lib.define("maybe_scale_(Tensor(a!)[] tensors, Tensor scale) -> ()")
_lib.define("zero_nonfinite_and_scale_(Tensor(a!)[] tensors, Tensor scale) -> ()")

# The whole decision of a guarded step in one op (see gradguard/reference/decide.py, the default
# kernel and the specification): norms, flag, clip coefficient, skip, the multiplier and the
# fused optimizers' grad_scale, and every counter, spike statistic and history slot updated in
# place. Seven outputs: norms, amax (result dtype, [n]), scalars (float64 [9], one transfer for the
# host), found_inf (float32), multiplier, grad_scale (float32), pre_scale (float32: 1, or the clip
# coefficient to apply before a fused step where loss_scale / clip_coef is past float32).
_lib.define(
    "guard_decide(Tensor acc, Tensor nan_count, Tensor inf_count, Tensor amax, Tensor? index, Tensor? max_norm, "
    "Tensor? loss_scale, Tensor? scaler_found, Tensor(a!)? counters, Tensor(b!)? layer_nonfinite, "
    "Tensor(c!)? layer_max_norm, Tensor(d!)? spike_state, Tensor(e!)? history, float norm_type, "
    "float? max_norm_value, str nonfinite, str spike, float[] spike_args, bool double_out) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

# PyTorch's CPU fused Adam/AdamW step (aten::_fused_adam_/_fused_adamw_ handed grad_scale), except
# that the gradients are divided by grad_scale as they are read and never written back: the clip
# of a guarded fused step without a write pass over .grad. Compiled for the CPU only; the default
# kernel (gradguard/reference/fused_adam.py) is PyTorch's kernel on a copy of the grads.
# gradguard/fused_adam.py uses the compiled one only where it matched PyTorch's bit for bit.
_lib.define(
    "fused_adam_readonly_grads_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor[] state_steps, float lr, float beta1, float beta2, "
    "float weight_decay, float eps, bool maximize, bool decoupled, Tensor grad_scale, Tensor? found_inf) -> ()")

torch.library.impl("gradguard::fused_adam_readonly_grads_", "default", lib=_lib)(
    reference.fused_adam_readonly_grads_)
# Straight to the kernel, typed: the boxed autograd and inplace-or-view fallbacks would box the
# five lists on every call, which the C++ helper's typed call (gradguard/fused_adam.py) exists to
# avoid. The kernels bump the mutated tensors' versions themselves (PyTorch's aten kernel through
# aten, the compiled one directly); the step is not differentiable.
_lib.impl("fused_adam_readonly_grads_", torch.library.fallthrough_kernel, "Autograd")
_lib.impl("fused_adam_readonly_grads_", torch.library.fallthrough_kernel, "ADInplaceOrView")
torch.library.impl("gradguard::multi_tensor_stats", "default", lib=_lib)(reference.multi_tensor_stats)
# The statistics are not differentiable (counts, maxima, normalized sums), so autograd has nothing
# to record: a fallthrough at the Autograd key sends the call straight to the CPU/CUDA/default
# kernel, typed. Without it the dispatcher's boxed autograd fallback copied every tensor of the
# list into an IValue and back: 19 us of the 93 us a 1,000-tensor call cost (2026-12-05, one
# thread). Registered here, not in the extension, so both kernel paths behave alike: the outputs
# never require grad, whatever the inputs.
_lib.impl("multi_tensor_stats", torch.library.fallthrough_kernel, "Autograd")
torch.library.impl("gradguard::maybe_scale_", "default", lib=_lib)(reference.maybe_scale_)
torch.library.impl("gradguard::zero_nonfinite_and_scale_", "default", lib=_lib)(
    reference.zero_nonfinite_and_scale_
)


def _check_one_device(op: str, tensors, scale=None) -> None:
    # A meta tensor mixed with real ones dispatches here (Meta outranks CPU/CUDA): without this
    # check the op would return uninitialized memory or write nothing. torch.add raises; so do we.
    for i, t in enumerate(tensors):
        torch._check(t.device == tensors[0].device, lambda: (
            f"gradguard.{op}: tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}; "
            "every tensor of one call must be on the same device"))
    if scale is not None and tensors:
        torch._check(scale.device.type != "meta" or tensors[0].device.type == "meta", lambda: (
            f"gradguard.{op}: `scale` is on {scale.device} but the tensors are on {tensors[0].device}"))


@torch.library.register_fake("gradguard::multi_tensor_stats", lib=_lib)
def _multi_tensor_stats_fake(tensors, norm_type):
    # The real kernels' checks and error types: the fake took a norm_type <= 0 and a mixed-dtype
    # list, which fail at run time, and raised a RuntimeError for an empty list (a ValueError).
    torch._check_value(len(tensors) > 0, lambda: "gradguard.multi_tensor_stats: `tensors` must not be empty")
    torch._check_value(norm_type > 0, lambda: f"gradguard.multi_tensor_stats: `norm_type` must be > 0, got {norm_type}")
    _check_one_device("multi_tensor_stats", tensors)
    for i, t in enumerate(tensors):
        torch._check(t.dtype == tensors[0].dtype, lambda i=i, t=t: (
            f"gradguard.multi_tensor_stats: tensors[{i}] has dtype {t.dtype} but tensors[0] has {tensors[0].dtype}; "
            "group tensors by dtype before calling the op"))
    torch._check_not_implemented(
        tensors[0].dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        lambda: f"gradguard.multi_tensor_stats: dtype {tensors[0].dtype} is not supported; the op takes float16, "
                "bfloat16, float32 and float64 tensors")
    n = len(tensors)
    t0 = tensors[0]
    return (
        t0.new_empty((n,), dtype=torch.float64),
        t0.new_empty((n,), dtype=torch.int64),
        t0.new_empty((n,), dtype=torch.int64),
        t0.new_empty((n,), dtype=torch.float64),
    )


@torch.library.register_fake("gradguard::fused_adam_readonly_grads_", lib=_lib)
def _fused_adam_readonly_grads_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2,
                                    weight_decay, eps, maximize, decoupled, grad_scale, found_inf):
    _check_one_device("fused_adam_readonly_grads_", list(params) + list(grads) + list(exp_avgs) + list(exp_avg_sqs))
    return None


@torch.library.register_fake("gradguard::maybe_scale_", lib=_lib)
def _maybe_scale_fake(tensors, scale):
    _check_one_device("maybe_scale_", tensors, scale)
    reference.check_scale_args("maybe_scale_", tensors, scale, autograd=False)
    return None


@torch.library.register_fake("gradguard::zero_nonfinite_and_scale_", lib=_lib)
def _zero_nonfinite_and_scale_fake(tensors, scale):
    _check_one_device("zero_nonfinite_and_scale_", tensors, scale)
    reference.check_scale_args("zero_nonfinite_and_scale_", tensors, scale, autograd=False)
    return None


_DECIDE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The largest percentile window (a count held exactly in a double; 2^40 ring entries are 8 TB).
_MAX_WINDOW = float(2 ** 40)


def _check_decide_args(acc, nan_count, inf_count, amax, index, max_norm, loss_scale, scaler_found, counters,
                       layer_nonfinite, layer_max_norm, spike_state, history, norm_type, nonfinite, spike, spike_args):
    where = "gradguard.guard_decide"
    n = acc.shape[0] if acc.dim() == 1 else -1
    for name, t, dtype in (("acc", acc, torch.float64), ("nan_count", nan_count, torch.int64),
                           ("inf_count", inf_count, torch.int64), ("amax", amax, torch.float64)):
        torch._check(t.dim() == 1 and t.shape[0] == n and t.dtype == dtype, lambda: (
            f"{where}: `{name}` must be a {dtype} tensor of shape [n] like `acc`, got {t.dtype} {tuple(t.shape)}"))
    dev = acc.device
    named = (("nan_count", nan_count), ("inf_count", inf_count), ("amax", amax), ("index", index),
             ("max_norm", max_norm), ("loss_scale", loss_scale), ("scaler_found", scaler_found),
             ("counters", counters), ("layer_nonfinite", layer_nonfinite), ("layer_max_norm", layer_max_norm),
             ("spike_state", spike_state), ("history", history))
    for name, t in named:
        torch._check(t is None or t.device == dev, lambda: (
            f"{where}: `{name}` is on {t.device} but `acc` is on {dev}; every tensor must be on one device"))
    for name, t in (("max_norm", max_norm), ("loss_scale", loss_scale), ("scaler_found", scaler_found)):
        # float16-float64, as the compiled kernels take (a float8 one was taken here).
        torch._check(t is None or (t.numel() == 1 and t.dtype in _DECIDE_FLOATS), lambda: (
            f"{where}: `{name}` must be a one-element float16, bfloat16, float32 or float64 tensor, got "
            f"{t.dtype} with {t.numel()} elements"))
    torch._check(counters is None or (counters.dtype == torch.int64 and tuple(counters.shape) == (5,)),
                 lambda: f"{where}: `counters` must be an int64 tensor of shape [5]")
    torch._check((layer_nonfinite is None) == (layer_max_norm is None),
                 lambda: f"{where}: `layer_nonfinite` and `layer_max_norm` go together")
    if layer_nonfinite is not None:
        torch._check(layer_nonfinite.dtype == torch.int64 and layer_nonfinite.dim() == 1
                     and layer_max_norm.dtype == torch.float64 and layer_max_norm.shape == layer_nonfinite.shape,
                     lambda: f"{where}: `layer_nonfinite` (int64 [P]) and `layer_max_norm` (float64 [P]) disagree")
        torch._check((layer_nonfinite.shape[0] == n) if index is None else True,
                     lambda: f"{where}: without `index`, `layer_nonfinite` must have n = {n} entries")
    if index is not None:
        torch._check(index.dtype == torch.int64 and tuple(index.shape) == (n,),
                     lambda: f"{where}: `index` must be an int64 tensor of shape [n] = [{n}]")
        torch._check(layer_nonfinite is not None, lambda: f"{where}: `index` needs `layer_nonfinite`")
    torch._check(history is None or (history.dtype == torch.float64 and history.dim() == 2
                                     and history.shape[1] == 3 and history.shape[0] >= 1),
                 lambda: f"{where}: `history` must be a float64 tensor of shape [H, 3], H >= 1")
    torch._check(history is None or counters is not None, lambda: f"{where}: `history` needs `counters`")
    torch._check(norm_type > 0, lambda: f"{where}: `norm_type` must be > 0 or inf, got {norm_type}")
    torch._check(nonfinite in reference.decide.MODES,
                 lambda: f"{where}: `nonfinite` must be one of {reference.decide.MODES}")
    torch._check(spike in reference.decide.SPIKES, lambda: f"{where}: `spike` must be one of {reference.decide.SPIKES}")
    if spike != "none":
        torch._check(len(spike_args) == 3 and spike_state is not None and spike_state.dtype == torch.float64,
                     lambda: f"{where}: spike {spike!r} needs 3 `spike_args` and a float64 `spike_state`")
        if spike == "percentile":
            # The kernels' own checks (csrc/guard_decide_args.h): the reference failed inside
            # torch.nanquantile or int() with torch's messages, and the fake kernel took them.
            q, window = spike_args[0], spike_args[1]
            torch._check(0 <= q <= 1, lambda: f"{where}: spike 'percentile' needs `spike_args`[0] (q) in [0, 1], "
                                              f"got {q}")
            torch._check(1 <= window <= _MAX_WINDOW, lambda: (
                f"{where}: spike 'percentile' needs `spike_args`[1] (window) >= 1 and <= 2^40, got {window}"))
        size = 3 if spike == "zscore" else 1 + int(spike_args[1])
        torch._check(tuple(spike_state.shape) == (size,),
                     lambda: f"{where}: `spike_state` of {spike!r} must have shape [{size}]")


@torch.library.register_fake("gradguard::guard_decide", lib=_lib)
def _guard_decide_fake(acc, nan_count, inf_count, amax, index, max_norm, loss_scale, scaler_found, counters,
                       layer_nonfinite, layer_max_norm, spike_state, history, norm_type, max_norm_value, nonfinite,
                       spike, spike_args, double_out):
    _check_decide_args(acc, nan_count, inf_count, amax, index, max_norm, loss_scale, scaler_found, counters,
                       layer_nonfinite, layer_max_norm, spike_state, history, norm_type, nonfinite, spike, spike_args)
    n = acc.shape[0]
    amp = loss_scale is not None or scaler_found is not None
    out = torch.float64 if double_out else torch.float32
    basis = torch.float64 if (double_out or (nonfinite == "zero" and not amp)) else torch.float32
    return (acc.new_empty((n,), dtype=out), acc.new_empty((n,), dtype=out), acc.new_empty((9,), dtype=torch.float64),
            acc.new_empty((), dtype=torch.float32), acc.new_empty((), dtype=basis),
            acc.new_empty((), dtype=torch.float32), acc.new_empty((), dtype=torch.float32))


def _guard_decide_default(*args):
    _check_decide_args(*args[:14], *args[15:18])
    index, layer_nonfinite = args[4], args[9]
    if index is not None and index.device.type == "cpu" and index.numel():
        # Checked before anything is written, as the compiled kernels do (free on the CPU; on
        # another device reading it would sync, and index_add_ asserts there).
        lo, hi = index.min().item(), index.max().item()
        # IndexError, as the compiled kernel's TORCH_CHECK_INDEX (a RuntimeError here before).
        torch._check_index(lo >= 0 and hi < layer_nonfinite.numel(), lambda: (
            f"gradguard.guard_decide: `index` holds {lo if lo < 0 else hi}, outside [0, {layer_nonfinite.numel()})"))
    return reference.guard_decide(*args)


torch.library.impl("gradguard::guard_decide", "default", lib=_lib)(_guard_decide_default)
