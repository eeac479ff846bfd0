"""GradGuard: wrap any torch.optim optimizer so that every step is checked, clipped, and skipped
when the gradients are not finite, for the price of one read pass over the gradients.

How a step decides, and what it costs (``step()`` is stats -> decide -> apply):

- One ``multi_tensor_stats`` pass over all gradients (one kernel per (device, dtype) group)
  gives per-tensor normalized sums, NaN/Inf counts and amax.
- One ``guard_decide`` op (one kernel on a GPU) turns them into everything the step needs: norms,
  the total norm, the 0-dim float32 found-inf flag (exactly 0 or 1), the clip coefficient
  (``max_norm`` and/or the spike policy), the skip decision, the multiplier for the grads and
  the fused optimizers' ``grad_scale``; and it updates the counters, the skip streak, the
  per-parameter totals, the spike statistics and the history slot in place.
- Then one of: nothing (a skipped step), one scaling op, the fused inner step handed
  ``found_inf``/``grad_scale``, or the inner step. At most 4 ops of the guard's own per step,
  whatever the path (see ``python -m gradguard.bench``).
- Fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``) are handed the
  flag as ``found_inf`` and the clip factor as ``grad_scale``: the fused kernel skips the whole
  update on the device when the flag is 1, so the step never syncs with the host. The kernel
  *divides* the gradients by ``grad_scale`` (and writes the result back to ``.grad``), so the
  guard passes the reciprocal of the clip coefficient (times the loss scale under a GradScaler).
  ``grad_scale`` is float32: float64 gradients are scaled by the float64 multiplier in one op
  of their own instead, so that their clip is as exact as ``clip_grad_norm_``'s.
- Every other optimizer: the guard reads the decision's 8 scalars back once per step (one
  transfer) to decide whether to call the inner ``step()``, and multiplies the gradients by the
  clip factor only when it is not exactly 1. Under a CUDA graph capture, which cannot hold that
  read, the inner step is taken whatever the decision and undone on the device where it says
  skip (parameters and state copied before the step, selected back after it: more memory traffic
  than the read, paid only in a graph). A fused optimizer (``fused=True, capturable=True``)
  needs neither: its kernel skips on ``found_inf``.
- ``on_nonfinite="raise"`` and ``max_consecutive_skips`` need that same one read on fused
  optimizers too; ``"zero"`` on a fused optimizer rewrites every gradient once (zeroing NaN/Inf
  and clipping in one pass) so that it needs no read.
- On the CPU a read is no sync (nothing is queued), so there the guard always reads: a skipped
  step never calls the inner step, and a fused step that does not clip gets no ``grad_scale``,
  sparing the kernel's write-back of the grads. Every other device takes the read-free path.
- On the CPU a fused ``Adam``/``AdamW`` (float32/float16/bfloat16, no amsgrad) that clips,
  outside GradScaler, runs ``gradguard::fused_adam_readonly_grads_`` in place of PyTorch's
  kernel: the same step bit for bit (checked on a probe before first use, PyTorch's kernel kept
  where it differs), without the write-back, so ``.grad`` keeps the gradient backward made (see
  gradguard.fused_adam).

Sparse COO gradients (``nn.Embedding(sparse=True)``, ``SparseAdam``) are judged by their
coalesced values and clipped through their stored values. With ``LBFGS`` and a closure, every
closure evaluation inside its step is checked (one read each; LBFGS reads the loss anyway), and a
non-finite one rolls the parameters and LBFGS state back to before the step, which counts as
skipped. A step under ``torch.inference_mode()`` creates normal tensors (the guard's state and
the inner optimizer's), so later steps outside it work.

A skipped step is still a step for the loop around it: an LR scheduler stepped after it advances,
as it does when GradScaler skips a step. ``opt.last.skipped`` tells which steps were skipped.

With ``torch.amp.GradScaler``: the guard tells GradScaler it handles scaling itself
(``_step_supports_amp_scaling``), so ``scaler.step(opt)`` hands it the loss scale and the
scaler's own found-inf flag. The guard measures the scaled gradients, divides norms by the scale,
combines both flags with a max (never a sum, which the fused kernels' ``found_inf == 1`` test
would miss), and always skips an overflowed step whatever ``on_nonfinite`` says: an overflow is
the scaler's signal to lower the scale, and the scaler's ``update()`` counts it. The guard counts
that skip once, in its own counters, marks it ``report.amp_overflow``, and does not count it
toward ``max_consecutive_skips`` (a calibrating scaler overflows several steps in a row) unless
the scale cannot be undone (0, inf, or an inverse beyond float32: a NaN in every batch keeps the
scaler's flag set and halves the scale to nothing). If the
step raises, the scale and flag GradScaler left on the guard are removed (GradScaler removes
them only after a step that returns). Under FSDP1 shards (``model=``, or ``process_group=``
over FSDP1 parameters) the scaler's flag is this rank's alone, so there the guard does not claim
the step: GradScaler unscales, reads its flag (``ShardedGradScaler``, which FSDP1 needs,
all-reduces it) and skips an overflowed step itself, which the guard then never sees or counts.
Under ``process_group=`` over other (hand-made) shards or an inner ZeroRedundancyOptimizer the
guard keeps the contract: its global statistics skip an overflow on every rank, while each rank's
GradScaler backs off on its own flag.

Distributed (see gradguard.distributed): DTensor gradients (FSDP2, tensor parallel), FSDP1
shards (``model=`` the FSDP module, or ``process_group=``) and an inner ZeroRedundancyOptimizer
add ONE collective per step, so that every rank sees the same global norms, clip coefficient and
skip decision. DDP gradients are identical on every rank already: no collective. With DTensor
parameters a fused optimizer takes the read path (its kernel does not take plain-tensor flags
beside DTensor parameters).
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch.utils.hooks import RemovableHandle

from gradguard import _host
from gradguard import distributed as _distributed
from gradguard import fused_adam as _fused_adam
from gradguard import hygiene as _hygiene
from gradguard._numbers import check_int
from gradguard.errors import NonFiniteGradError
from gradguard.hygiene import EVAL_MODE, NOT_CLEARED, ClearTracker
from gradguard.guard_state import GuardState
from gradguard.reference import decide as _decide_ref
from gradguard.report import History, StepReport
from gradguard.spike import SpikePolicy
from gradguard.stats import (_FLOAT_DTYPES, _Raw, _refuse_meta, check_max_norm, check_norm_type, global_raw_stats,
                             grad_or_empty, limit_on, nonfinite_message, refuse_unreduced_fsdp1, scale_)

ON_NONFINITE = ("skip", "zero", "raise", "ignore")
_GUARD_KEYS = ("steps", "totals", "consecutive", "layer_nonfinite", "layer_max_norm", "spike", "history")


class _Plan(NamedTuple):
    groups: list            # the param_groups list it was made from (held: its id cannot be reused)
    params: list
    names: list
    simple: bool            # one device and dtype, nothing distributed: the one-pass gather
    device: torch.device | None
    dtype: torch.dtype | None
    double: bool            # float64 parameters: float64 results
    plain: bool             # every parameter a torch.Tensor/Parameter: grads read in one C++ call
    dtensor: bool           # a DTensor among them: statistics reduced over its mesh, every entry packed


def _scale(grads, mult, zero_nonfinite: bool, simple: bool) -> None:
    """Multiplies the grads by `mult` (and zeroes NaN/Inf first): one op for a single device and
    dtype, one per (device, dtype) group otherwise."""
    if not simple:
        scale_(grads, mult, zero_nonfinite=zero_nonfinite)
    elif zero_nonfinite:
        torch.ops.gradguard.zero_nonfinite_and_scale_(grads, mult)
    else:
        torch.ops.gradguard.maybe_scale_(grads, mult)


def _capturing(device: torch.device) -> bool:
    """Whether this step is being captured into a CUDA graph (no host read possible)."""
    return _host.device_type(device) == "cuda" and torch.cuda.is_current_stream_capturing()


_LAYOUTS_KEPT = 16


def _index_tensor(present: list[int], device: torch.device) -> torch.Tensor:
    """`present` as an int64 tensor on `device`. On a GPU through pinned memory and a copy that
    does not block the host (torch keeps the pinned block until the copy has run). Refused under
    a CUDA graph capture: it would record a copy from a temporary host buffer (and a copy from
    pageable memory, which it made before, synchronizes: the capture failed with CUDA's error)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "gradguard.GradGuard: under a CUDA graph capture, the parameters that have a gradient (some have none) "
            "are not those of any recent eager step: their index would be copied from the host, which a capture "
            "cannot hold. Take an eager warm-up step in which the same parameters have gradients before capturing")
    cpu = torch.tensor(present, dtype=torch.int64)
    if device.type != "cuda":
        return cpu.to(device)
    return cpu.pin_memory().to(device, non_blocking=True)


def _bad_loss_scale(loss_scale: torch.Tensor | None) -> float | None:
    """The loss scale's value where unscaling by it is impossible (guard_decide's rule: not
    positive, inf, or its inverse overflows float32); None otherwise. For error
    messages only: it reads the scale (a host sync)."""
    if loss_scale is None:
        return None
    ls64 = loss_scale.detach().to("cpu", torch.float64).reshape(())
    return float(ls64) if bool(_decide_ref.bad_loss_scale(ls64)) else None


def _limit_read_free(max_norm: torch.Tensor) -> bool:
    """Whether a tensor max_norm's value can be read without a device sync (a CPU tensor, in
    eager mode)."""
    return max_norm.device.type == "cpu" and not torch.compiler.is_compiling()


def _bad_limit(limit: torch.Tensor | None) -> float | None:
    """A device `max_norm`'s value where it is negative or NaN (guard_decide then makes the step
    non-finite); None otherwise. For error messages only: it reads the value (a host sync)."""
    if limit is None:
        return None
    v = float(limit)
    return None if v >= 0 else v


def _hook_note(err) -> str:
    return "" if err is None else f" (a step hook also raised {type(err).__name__}: {err})"


class _BadEvaluation(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _check_guard_fields(guard: dict, where: str) -> None:
    """The kinds and shapes of a guard checkpoint's fields, each named where it is wrong: loaded
    unchecked, a None step count failed half-way with int()'s message, and a history of the wrong
    width was taken and made every later step raise."""
    def wrong(key: str, want: str, value):
        got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
               else f"{type(value).__name__} {value!r}")
        raise ValueError(f"{where}: state_dict['gradguard'][{key}] must be {want}, got {got}")

    def is_count(v) -> bool:
        return not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 0

    if not is_count(guard["steps"]):
        wrong("'steps'", "an int >= 0", guard["steps"])
    history = guard["history"]
    if not is_count(history["count"]):
        wrong("'history']['count'", "an int >= 0", history["count"])
    if not isinstance(history["steps"], (list, tuple)) or not all(is_count(s) for s in history["steps"]):
        wrong("'history']['steps'", "a list of step numbers", history["steps"])
    values = history["values"]
    if values is not None and not (isinstance(values, torch.Tensor) and values.is_floating_point()
                                   and tuple(values.shape) == (history["size"], 3)):
        wrong("'history']['values'", f"None or a float tensor of shape ({history['size']}, 3)", values)
    if guard["totals"] is None:
        return  # saved before any step: nothing else is read
    for key, numel in (("totals", 3), ("consecutive", 1), ("layer_nonfinite", None), ("layer_max_norm", None)):
        value = guard[key]
        if not isinstance(value, torch.Tensor) or (numel is not None and value.numel() != numel):
            wrong(repr(key), "a tensor" + (f" of {numel} element{'s' * (numel > 1)}" if numel else ""), value)
    if guard["layer_max_norm"].numel() != guard["layer_nonfinite"].numel():
        wrong("'layer_max_norm'", f"a tensor of {guard['layer_nonfinite'].numel()} elements (one a parameter, as "
              "'layer_nonfinite')", guard["layer_max_norm"])


def _replay(loss, closure, check_params=None, zero_nonfinite: bool = False, agree=None):
    """A closure for the inner optimizer that returns the loss the guard already computed on
    its first call (so the gradients the guard checked are the ones stepped on) and re-evaluates
    on later calls (LBFGS). With `check_params`, the first evaluation's loss (its gradients were
    decided on) and every later evaluation are checked (loss and gradients; one host read each,
    as LBFGS itself reads the loss) and abort the step when not finite; with `zero_nonfinite`
    ("zero" mode) a later evaluation's NaN/Inf gradient elements are set to 0 instead, and only a
    non-finite loss aborts. `agree(ok) -> bool` (distributed) makes each check every rank's: a
    loss, and a shard's gradients, are rank-local, and a rank that rolled back alone left the
    others waiting in the next evaluation's collectives (DDP's forward)."""
    if closure is None:
        return None
    from gradguard.stats import all_finite  # noqa: PLC0415  (stats imports nothing from here)

    calls = [0]

    def replay():
        calls[0] += 1
        if calls[0] == 1:
            # The guard judged the first evaluation's gradients; LBFGS reads its loss too (a host
            # read of its own), and an inf loss with finite gradients would steer its line search.
            if check_params is not None:
                here = _loss_finite(loss)
                if not (here if agree is None else agree(here)):
                    raise _BadEvaluation("gradguard.GradGuard: evaluation 1 of the closure inside LBFGS.step() gave a "
                                         "non-finite loss" + ("" if not here else " on another rank"))
            return loss
        with torch.enable_grad():
            value = closure()
        if check_params is None:
            return value
        grads = [q.grad for q in check_params if q.grad is not None]
        if zero_nonfinite:
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            grads = []
        here = (bool(all_finite(grads + ([value.detach()] if isinstance(value, torch.Tensor) else [])))
                and (isinstance(value, torch.Tensor) or _loss_finite(value)))
        if not (here if agree is None else agree(here)):
            raise _BadEvaluation(f"gradguard.GradGuard: evaluation {calls[0]} of the closure inside "
                                 "LBFGS.step() gave a non-finite loss or gradients"
                                 + ("" if not here else " on another rank"))
        return value

    return replay


def _loss_finite(loss) -> bool:
    """Whether a closure's loss is finite (a host read; LBFGS reads it too, by float()). A
    tensor, or a Python/NumPy number (LBFGS takes any closure result float() accepts: a float
    loss went unchecked); None (no loss) passes."""
    if loss is None:
        return True
    if isinstance(loss, torch.Tensor):
        return bool(torch.isfinite(loss).all())
    try:
        return math.isfinite(float(loss))
    except (TypeError, ValueError):
        return True  # not a number: LBFGS's own float() will say so


def _mute(*registries) -> list | None:
    """Empties torch's global optimizer step hook registries while the guard's step runs, and
    returns what to put back (None when they are empty: the common case costs two truth tests).
    The global hooks run once per guarded step, around the guard's step(): the inner optimizer's
    step inside it ran them a second time (torch's profiler counts steps with such a hook, so
    it counted two per training step). While muted, another thread's optimizer would not run
    them either."""
    if not any(registries):
        return None
    muted = [(r, list(r.items())) for r in registries]
    for r in registries:
        r.clear()
    return muted


def _unmute(muted) -> None:
    if muted is None:
        return
    for registry, items in muted:
        added = list(registry.items())  # registered during the step: kept, after the others
        registry.clear()
        registry.update(items)
        registry.update(added)


def _lr_may_be_zero(groups) -> bool:
    """The one-look pre-check of is_checkpoint_init_step (a stateless optimizer, plain SGD, has
    no state before every step): the first group's lr is 0 or a tensor."""
    lr = groups[0].get("lr", 0.0) if groups else 0.0
    return isinstance(lr, torch.Tensor) or lr == 0


# A step inside a torch.compile'd function runs eagerly (a graph break): dynamo traced into the
# guard's step, broke at the decision's host read, and lost the report stored in self.last
# (torch 2.13; the step itself ran). torch._disable_dynamo imports dynamo on first use only, and
# only this path pays its wrapper: eager steps do not come here.
@torch._disable_dynamo
def _step_outside_dynamo(guard, closure):
    # The step's own body: dynamo has already run what wraps it (the step pre/post hooks, an LR
    # scheduler's counting wrapper) around this call; guard.step() ran the hooks a second time.
    step = type(guard).step
    return getattr(step, "__wrapped__", step)(guard, closure)


# What wrappers add to named_parameters() names: FSDP1's unit, activation checkpointing's
# checkpoint_wrapper, torch.compile's OptimizedModule. The user's names (names=, the unwrapped
# model's, the state dict torch's FSDP writes) lack them.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _unwrapped_name(name: str) -> str:
    # Whole components only: `my_orig_mod.weight` is a user's attribute, not a wrapper's.
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _model_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in `model`, without the parts wrappers add: the above, and the
    `module.` of a DistributedDataParallel or DataParallel (located by the module's path, since
    `module` is a common attribute name of the user's own)."""
    wrapped = tuple(t for t in (getattr(torch.nn.parallel, "DistributedDataParallel", None),
                                getattr(torch.nn, "DataParallel", None)) if t is not None)
    paths = [f"{n}.module." if n else "module." for n, m in model.named_modules() if isinstance(m, wrapped)]
    names = {}
    for n, p in model.named_parameters():
        for path in paths:
            if n.startswith(path):
                n = n[:len(path) - len("module.")] + n[len(path):]
                break
        names[id(p)] = _unwrapped_name(n)
    return names


class GradGuard(torch.optim.Optimizer):
    """Checks, clips and, when the gradients are not finite, skips the steps of ``optimizer``.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to guard (``opt.optimizer``). The guard shares
            its ``param_groups``, ``state`` and ``defaults``.
        max_norm: clip the total gradient norm to this (a number or a 0-dim device tensor);
            ``None``: no clipping.
        norm_type: the p of the p-norm (``inf`` for the max norm).
        on_nonfinite: ``"skip"`` (no update; params and optimizer state bit-identical, grads
            left for inspection), ``"zero"`` (NaN/Inf elements set to 0, clip by the norm of the
            rest, step), ``"raise"`` (:class:`NonFiniteGradError` carrying the report) or
            ``"ignore"`` (step as if unguarded; the report still says what happened; a
            ``max_norm`` does not clip such a step: its norm is not finite).
        max_consecutive_skips: raise :class:`NonFiniteGradError` once this many steps in a row
            were skipped (``None``: never).
        spike: a :class:`~gradguard.ZScoreClip` or :class:`~gradguard.PercentileClip` policy;
            the step clips to ``min(max_norm, policy threshold)``.
        model: the ``nn.Module`` being trained: parameter names for reports and the eval-mode
            check.
        names: parameter names, one per parameter in ``param_groups`` order (instead of
            ``model``).
        history_size: how many steps ``opt.history`` keeps.
        hygiene: ``False`` turns the training-hygiene warnings off.
        process_group: every gradient is a shard whose statistics are summed over this group
            (hand-rolled sharding). Not needed for DTensor gradients (FSDP2, tensor parallel:
            their mesh says it), for DDP, or for FSDP1: pass ``model=`` the FSDP1 module instead
            (its process group is used for the flat parameters of the units that shard; given
            ``process_group=`` alone, a ``NO_SHARD`` unit's whole gradients would be summed, each
            counted once per rank).
        tracer: a :class:`~gradguard.NanTracer`; every step ends its record (``first_nonfinite()``
            then answers for the step just taken) and starts the next one.

    Distributed: the guard adds one collective per step where statistics must be reduced
    (DTensor shards, FSDP1, an inner ``ZeroRedundancyOptimizer``, whose skip decision is made
    collective so that no rank skips a step another takes) and none under DDP. Every rank must
    call ``step()``; the norms, clip coefficient, skip and report are then the same on all.
    """

    # On the CPU a read is not a sync (there is no device queue to wait for), so there the guard
    # always reads flag and factor: a skipped step never calls the inner step, and a fused step
    # gets no grad_scale (whose write-back costs a pass over the grads) when it does not clip.
    # Tests turn it off to run the device-decided path, the one every accelerator takes.
    _decide_on_host_on_cpu = True
    # A fused Adam/AdamW on the CPU clips through gradguard's read-only-grads kernel (see
    # gradguard.fused_adam). The bench turns it off to time the device path as a GPU runs it
    # (PyTorch's kernel, write-back included).
    _cpu_readonly_adam = True

    def __init__(self, optimizer, max_norm=None, norm_type: float = 2.0, on_nonfinite: str = "skip",
                 max_consecutive_skips=None, spike=None, model=None, *, names=None,
                 history_size: int = 1000, hygiene: bool = True, process_group=None, tracer=None):
        if isinstance(optimizer, GradGuard):
            raise TypeError("gradguard.GradGuard: `optimizer` is already a GradGuard; wrap the inner optimizer once")
        if type(optimizer).__name__ == "AcceleratedOptimizer" and type(optimizer).__module__.startswith("accelerate"):
            # Its step() does nothing on a micro-step that does not sync (gradient accumulation),
            # and under fp16 GradScaler unscales inside it: around it the guard would check and
            # clip half-accumulated, or still-scaled, gradients.
            raise TypeError("gradguard.GradGuard: `optimizer` is Accelerate's AcceleratedOptimizer; wrap the plain "
                            "optimizer before accelerator.prepare: accelerator.prepare(model, GradGuard(optimizer), "
                            "...)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"gradguard.GradGuard: `optimizer` must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self._limits = {}
        # Checked by the properties' setters, here as on a later assignment.
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.optimizer = optimizer
        # The spike policy is checked here and taken last (a guard refused on the way, which an
        # exception's traceback keeps alive, must leave the policy free).
        self._limits["spike"] = None
        self._check_spike(spike)
        self._bind(model, process_group)
        self._decide_group = _distributed.zero_group(optimizer)
        self._state = GuardState(history_size)
        self.hygiene = hygiene
        self.tracer = tracer
        self._name_list = None
        self._layout_cache = None
        # names= names the parameters the optimizer holds now, and follows them by identity: by
        # position alone, a param group removed later gave every later parameter the name of the
        # one before it. (group dict, index in it, parameter, name) of each named parameter.
        self._explicit_slots = self._slots(self._check_names(names))
        self._warned = set()  # before the first naming (a refused complex parameter is named)
        self._check_params(self._params())

        # What torch.optim.Optimizer.__init__ sets up, minus the parameter groups (shared below).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._amp_contract()

        self.last: StepReport | None = None
        self._step_hooks: OrderedDict = OrderedDict()
        self._plan = None              # the parameters' layout, found once (see _current_plan)
        self._fused_state_ready = False  # every parameter with a gradient has fused-step state
        self._fused_missing = None       # (trainable, frozen) parameters without it (see _fused_ready)
        self._fused_state_seen = None    # (id, len) of the inner state when it was complete
        self._fused_stateless = ()       # the parameters without it then (frozen ones), see _fused_ready
        self._tracker = ClearTracker()
        self._apply_watch = None  # (grads, the first one's version) while a scaled step applies
        self._unscaled = None     # [(grad ref, version)] a raised step left unscaled, see _note_unscaled
        self._hygiene_grads = None  # this step's gradients as the hygiene check saw them
        self.spike = spike  # last: a guard refused above leaves the policy free

    @property
    def max_norm(self):
        """The clip limit: None, a non-negative number or a 0-dim tensor, as the constructor's
        argument. An assigned value (a clipping schedule) is checked as that argument is: a
        number assigned unchecked went into the decision as it was, and NaN wrote NaN into every
        parameter, a negative one reversed the update. Held in a dict of its own, which a
        wrapper that copies the guard's ``__dict__`` shares (Lightning's ``self.optimizers()``:
        an assignment through it reached only the copy)."""
        return self._limits["max_norm"]

    @max_norm.setter
    def max_norm(self, value) -> None:
        self._limits["max_norm"] = None if value is None else check_max_norm(value)

    # The other settings are checked on assignment too, and kept beside max_norm: an unchecked
    # max_consecutive_skips = 0 made every finite step raise "0 steps in a row were skipped"
    # after stepping it.
    @property
    def norm_type(self) -> float:
        """The p of the norm (> 0, or inf), as the constructor's argument."""
        return self._limits["norm_type"]

    @norm_type.setter
    def norm_type(self, value) -> None:
        self._limits["norm_type"] = check_norm_type(value)

    @property
    def on_nonfinite(self) -> str:
        """``"skip"``, ``"zero"``, ``"raise"`` or ``"ignore"``, as the constructor's argument."""
        return self._limits["on_nonfinite"]

    @on_nonfinite.setter
    def on_nonfinite(self, value) -> None:
        if not isinstance(value, str) or value not in ON_NONFINITE:
            raise ValueError(f"gradguard.GradGuard: `on_nonfinite` must be one of {ON_NONFINITE}, got {value!r}")
        self._limits["on_nonfinite"] = value

    @property
    def max_consecutive_skips(self):
        """None, or a number >= 1 of skipped steps in a row after which a step raises."""
        return self._limits["max_consecutive_skips"]

    @max_consecutive_skips.setter
    def max_consecutive_skips(self, value) -> None:
        self._limits["max_consecutive_skips"] = None if value is None else check_int(
            value, "gradguard.GradGuard: `max_consecutive_skips`", 1)

    @property
    def hygiene(self) -> bool:
        """Whether the zero_grad() and eval-mode checks run, as the constructor's argument."""
        return self._limits["hygiene"]

    @hygiene.setter
    def hygiene(self, value) -> None:
        if not isinstance(value, bool):  # "off" is truthy: it turned the checks on
            raise TypeError(f"gradguard.GradGuard: `hygiene` must be True or False, got {value!r}")
        self._limits["hygiene"] = value

    @property
    def tracer(self):
        """The NanTracer the step ends (or None), as the constructor's argument."""
        return self._limits["tracer"]

    @tracer.setter
    def tracer(self, value) -> None:
        if value is not None and (isinstance(value, type) or not callable(getattr(value, "_end_step", None))):
            raise TypeError(f"gradguard.GradGuard: `tracer` must be a gradguard.NanTracer, got {type(value).__name__}")
        self._limits["tracer"] = value

    @property
    def spike(self):
        """The spike policy (or None), as the constructor's argument. A policy assigned later is
        checked and taken as there (one guard's norms per policy); the one it replaces is freed."""
        return self._limits.get("spike")

    @spike.setter
    def spike(self, value) -> None:
        home = self._home()
        home._check_spike(value)
        old = home._limits.get("spike")
        if old is not None and old is not value and old._guard() is home:
            old._owner = None
        home._limits["spike"] = value
        if value is not None:
            value._owner = weakref.ref(home)

    def _home(self) -> "GradGuard":
        """The guard itself, also when reached through a wrapper that subclasses its class and
        forwards attribute reads to it (Lightning's LightningOptimizer, whose `optimizer` is the
        guard): what a setter derives, and a spike policy's ownership, belong there (set on the
        wrapper, a process_group left the guard's plan rank-local, the ranks deciding apart)."""
        obj = self
        for _ in range(8):
            if "_limits" in vars(obj):
                return obj
            inner = getattr(obj, "optimizer", None)
            if not isinstance(inner, GradGuard) or inner is obj:
                break
            obj = inner
        return self

    def _check_spike(self, value) -> None:
        if value is not None and (not isinstance(value, SpikePolicy) or value.kind not in ("zscore", "percentile")):
            raise TypeError(f"gradguard.GradGuard: `spike` must be None or a spike policy such as "
                            f"gradguard.ZScoreClip() or gradguard.PercentileClip(), got {type(value).__name__}")
        if value is not None and value._guard() not in (None, self):
            # Its statistics are another live guard's norms: shared, each guard clipped by the other's.
            raise ValueError(f"gradguard.GradGuard: this `spike` policy ({value!r}) belongs to another GradGuard, "
                             "whose norms its statistics are; give each guard a policy of its own: a new "
                             f"{type(value).__name__}(...), or copy.deepcopy(policy) to start from its statistics")

    # model= and process_group= decide how the statistics are made global (FSDP1's groups, the
    # shards' group, the GradScaler contract) and how layers are named: assigned later, all of it
    # is found again (process_group assigned after a step was ignored, the ranks deciding apart;
    # a model assigned later left every report naming param[i]).
    @property
    def model(self):
        """The nn.Module the layers are named from (and FSDP1/DDP found in), or None."""
        return self._limits["model"]

    @model.setter
    def model(self, value) -> None:
        home = self._home()
        home._bind(value, home.process_group)

    @property
    def process_group(self):
        """The process group the parameters are sharded over (process_group=), or None."""
        return self._limits["process_group"]

    @process_group.setter
    def process_group(self, value) -> None:
        home = self._home()
        home._bind(home.model, value)

    def _bind(self, model, process_group) -> None:
        """Checks model= and process_group= together (before anything changes), then derives what
        depends on them and drops what was found from the old ones."""
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"gradguard.GradGuard: `model` must be an nn.Module, got {type(model).__name__}")
        _distributed.check_process_group(process_group, "gradguard.GradGuard")
        # Found once per binding: which group shards FSDP1's flat parameters.
        fsdp_group = _distributed.fsdp1_group(model) if model is not None and process_group is None else None
        # FSDP1 units that do not shard (NO_SHARD, or one rank): whole gradients, never summed.
        fsdp_whole = _distributed.fsdp1_whole(model) if model is not None else frozenset()
        if process_group is not None and _distributed.ddp_overlaps(model, process_group):
            # DDP's gradients are whole and the same on its ranks: summed as shards over them, the
            # norm came out sqrt(world size) too large, and every step clipped that much harder.
            raise ValueError("gradguard.GradGuard: `model` holds a DistributedDataParallel module whose ranks share "
                             "`process_group`: its gradients are already all-reduced (whole and the same on each of "
                             "those ranks), but process_group= sums each gradient's statistics over the group as if it "
                             "were a shard; drop process_group= (DDP needs no collective)")
        if process_group is not None and _distributed.fsdp1_replicas_overlap(model, process_group):
            # The same silent error with FSDP1's hybrid sharding: a shard is held once per replica.
            raise ValueError("gradguard.GradGuard: `model` holds an FSDP1 module with hybrid sharding whose replicas "
                             "share `process_group`: each shard is held once per replica, and process_group= would "
                             "sum it once per replica; pass model= alone (the guard finds FSDP1's shard group) or "
                             "process_group= that shard group")
        rebinding = "model" in self._limits
        self._limits["model"], self._limits["process_group"] = model, process_group
        self._fsdp_group, self._fsdp_whole = fsdp_group, fsdp_whole
        if rebinding:
            self._plan = self._name_list = self._layout_cache = None  # found again at the next step
            self._amp_contract()

    def _amp_contract(self) -> None:
        # GradScaler.step then hands us the loss scale and its flag instead of syncing itself;
        # except under FSDP1 shards, where that flag is this rank's alone (ShardedGradScaler,
        # which FSDP1 needs, all-reduces it only in unscale_) and the ranks' scales drifted apart
        # after a shard-local overflow: there GradScaler unscales and skips an overflowed step
        # itself, with its all-reduced flag. Not under process_group= or ZeRO, whose users take a
        # plain GradScaler: its rank-local skip would leave the other ranks alone in the guard's
        # collective, while through the contract the guard's global statistics skip on every rank.
        # FSDP1 shards under process_group= alike (the refusal of unreduced shards suggested it):
        # the same rank-local flag, and the ranks' scales drifted apart there too.
        self._step_supports_amp_scaling = self._fsdp_group is None and not (
            self.process_group is not None
            and any(_distributed.is_fsdp1_sharded(q, self._fsdp_whole) for q in self._params()))

    @property
    def history(self) -> History:
        """The last ``history_size`` steps' total norm, clip coefficient and skip flag."""
        return self._state.history

    # The inner optimizer owns these; properties (not copies) keep them shared even after the
    # inner load_state_dict() replaces its lists and dicts.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    @staticmethod
    def profile_hook_step(func):
        """torch.optim's step wrapper (step pre/post hooks, global ones too, and the
        ``Optimizer.step#GradGuard.step`` profiler record), minus its fixed cost when no
        profiler runs: the record is entered only then (it costs ~10 us per step otherwise)."""
        from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            self = args[0]
            if torch.autograd.profiler._is_profiler_enabled:
                with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                    return _hooked_call(self, func, args, kwargs)
            return _hooked_call(self, func, args, kwargs)

        def _hooked_call(self, func, args, kwargs):
            try:
                for pre_hook in (*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
                    result = pre_hook(self, args, kwargs)
                    if result is not None:
                        if isinstance(result, tuple) and len(result) == 2:
                            args, kwargs = result
                        else:
                            raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), "
                                               f"but got {result}.")
            except BaseException:
                # As where step() raises: a scale and flag GradScaler.step set, left behind, were
                # the next step's (a plain step took its unscaled grads as scaled by them).
                self._drop_scaler_attrs()
                raise
            muted = _mute(_global_optimizer_pre_hooks, _global_optimizer_post_hooks)
            try:
                out = func(*args, **kwargs)
            finally:
                _unmute(muted)
            self._optimizer_step_code()
            for post_hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

        return wrapper

    # ---- input checks -------------------------------------------------------------------------

    def _check_names(self, names):
        if names is None:
            return None
        try:
            names = None if isinstance(names, str) else list(names)
        except TypeError:
            names = None
        if names is None or not all(isinstance(n, str) for n in names):
            raise TypeError("gradguard.GradGuard: `names` must be a list of str, one per parameter")
        count = len(self._params())
        if len(names) != count:
            raise ValueError(f"gradguard.GradGuard: `names` has {len(names)} entries but the optimizer holds "
                             f"{count} parameters")
        seen = set()
        for i, n in enumerate(names):
            if n in seen:  # one layer's totals would be reported under the other's name
                raise ValueError(f"gradguard.GradGuard: `names` holds {n!r} twice (entry {i}); one name per "
                                 "parameter")
            seen.add(n)
        return names

    def _check_params(self, params) -> None:
        for i, p in enumerate(params):
            if p.is_complex():
                raise TypeError(f"gradguard.GradGuard: parameter {self._name_of(i, params)} is complex; GradGuard "
                                "supports real floating-point parameters only (view it with torch.view_as_real)")

    def _check_grads(self, grads, present, params, plan) -> bool:
        """Refuses what GradGuard cannot take; returns whether the grads still fit the plan (a
        simple plan's one dtype and device)."""
        fits = True
        for g, i in zip(grads, present):
            if plan.simple and (g.dtype is not plan.dtype or g.device != plan.device):
                fits = False
            if g.layout not in (torch.strided, torch.sparse_coo):
                raise TypeError(f"gradguard.GradGuard: the gradient of {self._name_of(i, params)} has layout "
                                f"{g.layout}; GradGuard supports dense and sparse COO gradients")
            if g.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"gradguard.GradGuard: the gradient of {self._name_of(i, params)} has dtype "
                                f"{g.dtype}; GradGuard supports real floating-point gradients only")
        return fits

    # ---- parameters and names -----------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _names(self, params) -> list[str]:
        if self._name_list is None or len(self._name_list) != len(params):
            by_id = {}
            explicit = self._follow_explicit_names(params)
            if self.model is not None:
                by_id = _model_names(self.model)
                if (not all(id(p) in explicit for p in params) and "model_names" not in self._warned
                        and not any(id(p) in by_id for p in params)):
                    # A model that holds none of the parameters (a teacher, a copy, the model
                    # before FSDP1 flattened it) named every layer param[i] without a word. A
                    # warning, not an error: model= may be there for the eval() check alone
                    # (fp32 master weights of a bf16 model, stacked ensembles).
                    self._warned.add("model_names")
                    _hygiene.warn(f"gradguard.GradGuard: `model` ({type(self.model).__name__}) holds none of the "
                                  "optimizer's parameters, so no layer can be named from it (they read param[i]); "
                                  "pass the module whose parameters the optimizer steps, or names=", UserWarning)
            for g in self.optimizer.param_groups:
                for p, n in zip(g["params"], g.get("param_names", ())):
                    by_id.setdefault(id(p), n)
            self._name_list = [explicit[id(p)] if id(p) in explicit else by_id.get(id(p), f"param[{i}]")
                               for i, p in enumerate(params)]
        return self._name_list

    def _slots(self, names) -> list:
        """(group dict, index in its params, parameter, name) for the optimizer's parameters in
        order, named by `names` (None: none named)."""
        if names is None:
            return []
        flat = [(g, j, p) for g in self.optimizer.param_groups for j, p in enumerate(g["params"])]
        return [(g, j, p, n) for (g, j, p), n in zip(flat, names) if n is not None]

    def _follow_explicit_names(self, params) -> dict:
        """id -> names= name for `params`. A parameter keeps its name wherever it moved (groups
        removed, added); one swapped into a slot of a group (model surgery, re-tied weights)
        takes the name of the parameter it replaced there, if that one is no longer held.
        Parameters no longer held are let go, with their names. A list that is not the
        optimizer's (a refused add_param_group's) is named without changing what is kept."""
        slots = self._explicit_slots
        if not slots:
            return {}
        known = {id(p): n for _, _, p, n in slots}
        groups = self.optimizer.param_groups
        current = [p for g in groups for p in g["params"]]
        if len(current) != len(params) or any(a is not b for a, b in zip(current, params)):
            return {id(p): known[id(p)] for p in params if id(p) in known}
        # The slots' group dicts are held in `slots`, so their ids cannot be reused meanwhile.
        by_slot = {(id(g), j): (p, n) for g, j, p, n in slots}
        now = {id(p) for p in current}
        kept = []
        for g in groups:
            for j, p in enumerate(g["params"]):
                n = known.get(id(p))
                if n is None:
                    old = by_slot.get((id(g), j))
                    if old is not None and id(old[0]) not in now:
                        n = old[1]
                if n is not None:
                    kept.append((g, j, p, n))
        self._explicit_slots = kept
        return {id(p): n for _, _, p, n in kept}

    def _name_of(self, i, params) -> str:
        return repr(self._names(params)[i])

    def _layout(self, params, present, device):
        """Names of the parameters that have a gradient, and the index tensor that places them
        among all parameters (None when all have one). The last _LAYOUTS_KEPT patterns are kept:
        with one, a model whose gradless parameters alternate (MoE experts that got no tokens on
        every other step) rebuilt the index every step, and on a GPU each rebuild was a blocking
        host-to-device copy. A rebuild's copy is from pinned memory, without blocking."""
        key = (len(params), tuple(present), device)
        cache = self._layout_cache  # None, or (last key, its layout, every kept key -> layout)
        if cache is not None and cache[0] == key:  # the common case first: no hashing of 1,000 indices
            return cache[1]
        kept = {} if cache is None else cache[2]
        hit = kept.pop(key, None)  # re-inserted last: the least recently used is evicted first
        if hit is not None:
            kept[key] = hit
        else:
            names = self._names(params)
            idx = None if len(present) == len(params) else _index_tensor(present, device)
            if len(kept) >= _LAYOUTS_KEPT:
                del kept[next(iter(kept))]  # the least recently used
            hit = kept[key] = ([names[i] for i in present], idx)
        self._layout_cache = (key, hit, kept)
        return hit

    # ---- torch.optim.Optimizer interface --------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        # Told, not read from the gradients: an in-place clear with no backward after it (a head
        # its batch did not reach) moves each version by one, as a backward without a clear does,
        # and the check warned although the loop cleared. (model.zero_grad() is still read.)
        self._cleared = True

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict) and "params" in param_group:
            # Checked before it is added: refused after, the group stayed in the optimizer.
            new = param_group["params"]
            if not isinstance(new, (torch.Tensor, set)):
                new = param_group["params"] = list(new)  # a generator is read once; torch makes it a list too
            new = [new] if isinstance(new, torch.Tensor) else list(new)
            new = [q[1] if isinstance(q, tuple) and len(q) == 2 else q for q in new]  # (name, param) pairs
            self._check_params(self._params() + [q for q in new if isinstance(q, torch.Tensor)])
        self.optimizer.add_param_group(param_group)
        self._name_list = None  # named afresh (a removed group's names stayed at their positions)
        # Now, not at the next step: a checkpoint saved in between is for every parameter (its
        # totals were one group short, and no guard, this one included, could load it).
        with torch.inference_mode(False):
            self._state.follow(self._params())

    # torch.optim.Optimizer pickles only defaults/state/param_groups, which here live in the inner
    # optimizer: keep the whole guard instead (minus the weak references of the hygiene check, and
    # minus the `step` wrapper an LR scheduler sets on the instance: it holds a weak reference to
    # this guard, so a copy's step() would step the original, and it does not pickle; torch's
    # optimizers drop it the same way).
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_limits"] = dict(self._limits)  # a copy's own max_norm (copy.copy shared the dict)
        state.pop("step", None)
        # Hooks are not copied, as torch's optimizers copy none: a deep copy's steps ran the
        # original's hooks (an EMA updated from the copy), and a lambda hook made torch.save fail.
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks", "_step_hooks"):
            state[name] = OrderedDict()
        state["_tracker"] = None
        state["_layout_cache"] = None
        state["_plan"] = None
        state["_fused_missing"] = None  # rebuilt with the plan
        state["_fused_stateless"] = ()  # rebuilt when the copy's state is found complete
        state["_apply_watch"] = state["_unscaled"] = None  # the original's gradients (weak references)
        state["_hygiene_grads"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_fused_missing", None)  # pickled before it existed
        self.__dict__.setdefault("_fused_state_seen", None)
        self.__dict__.setdefault("_fused_stateless", ())
        self.__dict__.setdefault("_apply_watch", None)
        self.__dict__.setdefault("_unscaled", None)
        self.__dict__.setdefault("_hygiene_grads", None)
        if "_limits" not in self.__dict__:  # pickled while max_norm was a plain attribute (or `_max_norm`)
            self._limits = {"max_norm": self.__dict__.pop("max_norm", self.__dict__.pop("_max_norm", None))}
        for name, default in (("norm_type", 2.0), ("on_nonfinite", "skip"), ("max_consecutive_skips", None),
                              ("hygiene", True), ("tracer", None), ("spike", None), ("model", None),
                              ("process_group", None)):
            if name not in self._limits:  # pickled while these were plain attributes
                self._limits[name] = self.__dict__.pop(name, default)
        # Pickled before these existed: found again from the settings.
        for name in ("_plan", "_name_list", "_layout_cache", "last"):
            self.__dict__.setdefault(name, None)
        if "_fsdp_group" not in self.__dict__ or "_fsdp_whole" not in self.__dict__:
            model, group = self._limits["model"], self._limits["process_group"]
            self._fsdp_group = _distributed.fsdp1_group(model) if model is not None and group is None else None
            self._fsdp_whole = _distributed.fsdp1_whole(model) if model is not None else frozenset()
        if "_decide_group" not in self.__dict__:
            self._decide_group = _distributed.zero_group(self.optimizer)
        if "_explicit_slots" not in self.__dict__:  # pickled before names= followed identity: by position
            self._explicit_slots = self._slots(self.__dict__.pop("_explicit_names", None))
        self._tracker = ClearTracker()
        if self.spike is not None:  # a copy's policy is the copy's (a policy's copy is ownerless)
            self.spike._owner = weakref.ref(self)
        self._patch_step_function()
        # torch's Optimizer.__getstate__ keeps only defaults, state and param_groups: a copied
        # fused optimizer lost the flag that says it takes grad_scale/found_inf (its __init__
        # sets it), and the copy then clipped through another path than the original (values off
        # by an ulp; on a GPU a host read every step). Set again from the groups' `fused`.
        inner = self.optimizer
        if (isinstance(inner, torch.optim.Optimizer) and inner.param_groups
                and all(g.get("fused") for g in inner.param_groups)):
            inner._step_supports_amp_scaling = True
        # Likewise a copied LBFGS lost what its __init__ set (torch's own copies fail the same way
        # at their first step: no attribute '_params').
        if isinstance(inner, torch.optim.LBFGS) and not hasattr(inner, "_params"):
            inner._params = inner.param_groups[0]["params"]
            inner._numel_cache = None

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (f"GradGuard(max_norm={self.max_norm}, norm_type={self.norm_type}, on_nonfinite={self.on_nonfinite!r}, "
                f"max_consecutive_skips={self.max_consecutive_skips}, spike={self.spike!r},\n{inner}\n)")

    def add_step_hook(self, fn) -> RemovableHandle:
        """Calls ``fn(guard, report)`` after every step (also a skipped or raising one), e.g. to
        log ``report.as_dict()`` to TensorBoard. Reading the report syncs; the hook decides."""
        if not callable(fn):
            raise TypeError(f"gradguard.GradGuard.add_step_hook: `fn` must be callable, got {type(fn).__name__}")
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = fn
        return handle

    # ---- the step -------------------------------------------------------------------------------

    def _fused_kind(self) -> bool:
        """Whether the inner optimizer is fused in every group and takes grad_scale/found_inf."""
        opt = self.optimizer
        return bool(getattr(opt, "_step_supports_amp_scaling", False)) and all(g.get("fused") for g in opt.param_groups)

    def _stepped_tensors(self, params):
        """Each parameter with a gradient and each tensor of its optimizer state, once: what an
        inner step may write."""
        seen = set()
        for q in params:
            if q.grad is None:
                continue
            for t in (q, *(v for v in self.optimizer.state.get(q, {}).values() if isinstance(v, torch.Tensor))):
                if id(t) not in seen:
                    seen.add(id(t))
                    yield t

    def _fused_ready(self) -> bool:
        """Whether the inner optimizer takes grad_scale/found_inf (the GradScaler contract) in
        every group, with its first-step trap avoided."""
        opt = self.optimizer
        if not self._fused_kind():
            return False
        if isinstance(opt, torch.optim.SGD):
            # Fused SGD allocates momentum buffers with empty_like() on its first step; when that
            # step is skipped through found_inf it keeps the uninitialized memory as momentum. So
            # until every buffer exists, decide on the host and do not call it at all (checked
            # every step: a parameter that gets its first gradient later would be corrupted).
            for g in opt.param_groups:
                if g["momentum"] != 0 and any(
                        p.grad is not None and "momentum_buffer" not in opt.state.get(p, {}) for p in g["params"]):
                    return False
            return True
        state = opt.state
        if self._fused_state_ready and self._fused_state_seen != (id(state), len(state)):
            # The state was emptied or replaced since it was complete (opt.state.clear() to reset
            # the moments): a skipped step would create it again. Look again.
            self._fused_state_ready, self._fused_missing, self._fused_stateless = False, None, ()
        stateless = self._fused_stateless
        if self._fused_state_ready and stateless and any(p.grad is not None for p in stateless):
            # A parameter frozen when the state became complete (requires_grad=False, so not
            # waited for) has a gradient: unfrozen since (gradual unfreezing). Without state yet,
            # a skipped step would make it, as above: decided on the host until it has state.
            # The list only shrinks: one that has state is dropped from it. Per step, one look
            # at each frozen parameter without state (the general path walks every parameter's
            # gradient anyway).
            if any(p.grad is not None and not state.get(p) for p in stateless):
                return False
            self._fused_stateless = [p for p in stateless if not state.get(p)]
        if not self._fused_state_ready:
            # Fused Adam/AdamW create their state (zero moments, step 0) before the kernel sees
            # found_inf: a skipped first step would leave state where there was none. Until every
            # parameter with a gradient has its state, decide on the host (one read, first steps
            # only) and do not call the step when it is skipped. Checked until every trainable
            # parameter has state, not after: one that had no gradient so far (an expert that got
            # no tokens) may get its first on a step to skip.
            # The trainable parameters still without state are remembered, so that a model with
            # one that never gets a gradient (an unused head) checks those per step, not all.
            # The frozen ones without state are kept apart and only their .grad is looked at (no
            # state lookup, a Python hash each): one unfrozen while the state is still incomplete
            # (the unused head keeps it so) was dropped from every list, and a skipped step made
            # its state.
            if self._fused_missing is None:
                every = [p for g in opt.param_groups for p in g["params"]]
                missing, frozen = [p for p in every if p.requires_grad], [p for p in every if not p.requires_grad]
            else:
                missing, frozen = self._fused_missing
            if any(p.grad is not None and not state.get(p) for p in missing):
                return False
            if any(p.grad is not None for p in frozen):
                if any(p.grad is not None and not state.get(p) for p in frozen):
                    return False
                frozen = [p for p in frozen if not state.get(p)]
            still = [p for p in missing if not state.get(p)]
            missing = [p for p in still if p.requires_grad]
            if len(missing) != len(still):  # frozen since, without state: watched as the others
                frozen = frozen + [p for p in still if not p.requires_grad]
            self._fused_missing = (missing, frozen)
            self._fused_state_ready = not missing
            # Frozen parameters are not waited for; they are watched from then on (above).
            self._fused_stateless = [p for p in frozen if not state.get(p)] if self._fused_state_ready else ()
            # Another count of entries, or another dict, from now on means: look again.
            self._fused_state_seen = (id(state), len(state))
        return True

    def _fused_step(self, replay, found_inf, divisor, device: torch.device, loss_scaled: bool = False) -> None:
        """The inner fused step with the GradScaler contract: it skips on the device when
        found_inf is 1, and divides the grads by grad_scale, hence the divisor loss_scale /
        clip_coef. PyTorch's kernels write the divided grads back to .grad; a CPU Adam/AdamW
        outside GradScaler goes through gradguard.fused_adam instead, which does not."""
        inner = self.optimizer
        try:
            if found_inf is not None:
                inner.found_inf = found_inf
            if divisor is not None:
                inner.grad_scale = divisor  # guard_decide's grad_scale: float32 already
                if (self._cpu_readonly_adam and not loss_scaled and _host.device_type(device) == "cpu"
                        and _fused_adam.takes(inner)):
                    # Adam/AdamW on the CPU: the clip inside the update, no write-back to .grad. Not
                    # under GradScaler, whose contract is unscaled grads after the step (PyTorch's
                    # fused kernel writes them back for it).
                    with _fused_adam.ReadOnlyGrads(divisor):
                        inner.step(replay)
                    return
            inner.step(replay)
        finally:
            for attr in ("found_inf", "grad_scale"):
                if attr in inner.__dict__:
                    delattr(inner, attr)

    def _check_hygiene(self, grads, plain: bool = False) -> None:
        if not self.hygiene:
            return
        # What the step's end remembers (see _step): these gradients (`plain`: no DTensor among
        # them), but no DTensor: FSDP2 adds into the local shard without moving the DTensor's
        # version, so the check cannot tell an in-place zero_grad() from none there (remembered,
        # the DTensor warned at one). A list holding an unremembered gradient is never warned
        # about, as the README says of FSDP2.
        if not plain and any(_distributed.is_dtensor(g) for g in grads):
            self._hygiene_grads = [None if _distributed.is_dtensor(g) else g for g in grads]
        else:
            self._hygiene_grads = grads
        if ("not_cleared" not in self._warned and not self.__dict__.get("_cleared")
                and self._tracker.never_cleared(grads)):
            self._warned.add("not_cleared")
            _hygiene.warn(NOT_CLEARED)
        if "eval" not in self._warned and self.model is not None and not self.model.training:
            self._warned.add("eval")
            _hygiene.warn(EVAL_MODE)

    def step(self, closure=None):
        """Evaluates ``closure`` (if given) once, checks the gradients, then clips and steps the
        inner optimizer or skips it. Returns the closure's loss."""
        if torch.compiler.is_compiling():
            return _step_outside_dynamo(self, closure)
        if not self.optimizer.state and _lr_may_be_zero(self.optimizer.param_groups) \
                and _distributed.is_checkpoint_init_step(self.optimizer.param_groups):
            # torch.distributed.checkpoint's get/set_state_dict create a fresh optimizer's state
            # with one step on zero gradients at lr 0: not a training step, not counted.
            return self.optimizer.step(closure)
        # No-grad mode set by hand instead of @torch.no_grad(), and inference_mode(False) entered
        # only when inference mode is on: the two context managers cost ~8 us per step, a tenth
        # of the guard's whole host budget.
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if torch.is_inference_mode_enabled():
                # The guard's counters and the inner optimizer's state must be normal tensors
                # even when a step runs under torch.inference_mode(): inference tensors created
                # there would make every later (normal) step raise.
                with torch.inference_mode(False):
                    return self._step(closure)
            return self._step(closure)
        except BaseException:
            # GradScaler.step sets these before calling us and deletes them only after a step
            # that returns: left behind, the next step would reuse a stale scale and flag.
            self._drop_scaler_attrs()
            self._note_unscaled()
            raise
        finally:
            self._apply_watch = None  # it holds the gradients: never past the step
            self._hygiene_grads = None  # likewise (a step that raised did not reach its mark)
            torch._C._set_grad_enabled(grad_was)

    def _note_unscaled(self) -> None:
        """After a step that raised once its in-place scaling pass had unscaled the gradients
        under GradScaler (the inner step, or its hook, raised): remembers those gradients, so
        that a retried scaler.step(opt) with no backward in between does not unscale them again
        (GradScaler's stage stays READY, as the step never returned; its own unscale_ marks the
        grads as unscaled first, and a retry of a plain optimizer's step divides once)."""
        watch, self._apply_watch = self._apply_watch, None
        if watch is not None and watch[0][0]._version != watch[1]:
            self._unscaled = [(weakref.ref(g), g._version) for g in watch[0]]

    def _still_unscaled(self, grads) -> bool:
        """Whether `grads` are the gradients _note_unscaled remembered, untouched since."""
        marks, self._unscaled = self._unscaled, None
        return len(marks) == len(grads) and all(r() is g and g._version == v for (r, v), g in zip(marks, grads))

    def _drop_scaler_attrs(self) -> None:
        for attr in ("grad_scale", "found_inf"):
            self.__dict__.pop(attr, None)

    def _current_plan(self) -> _Plan:
        """The parameter list and what is known of it without looking at the gradients, rebuilt
        only when the parameter groups change (add_param_group, load_state_dict, an edited
        list): the per-step cost is then one look at each gradient."""
        plan = self._plan
        groups = self.optimizer.param_groups
        # The same groups list (load_state_dict replaces it, and the groups' param_names with it:
        # the names are read afresh), and in it the same parameters by identity, not only the same
        # lists and lengths: a parameter swapped inside an existing list (model surgery, re-tied
        # weights) must be the one checked, as the optimizer steps it.
        if plan is not None and plan.groups is groups and _host.same_params(groups, plan.params):
            return plan
        # Names and the layout are cached by position: a new plan names its parameters afresh.
        self._name_list = self._layout_cache = None
        self._fused_state_ready = False  # new parameters may have no state yet
        self._fused_missing = None
        self._fused_stateless = ()
        params = self._params()
        self._check_params(params)  # a model converted in place since (model.to(torch.cfloat))
        if self.process_group is not None:  # every rank, one holding no parameter too
            _distributed.check_same_count(len(params), self.process_group, "gradguard.GradGuard")
        kinds = {(q.device, q.dtype) for q in params}
        dtensor = any(_distributed.is_dtensor(q) for q in params)
        simple = (len(kinds) == 1 and self.process_group is None and self._fsdp_group is None
                  and self._decide_group is None and not dtensor
                  and not any(_distributed.is_fsdp1_sharded(q, self._fsdp_whole) for q in params))
        device, dtype = (params[0].device, params[0].dtype) if simple else (None, None)
        plan = _Plan(groups, params, self._names(params), simple, device, dtype,
                     simple and params[0].dtype == torch.float64, all(type(q) in _host.PLAIN_TYPES for q in params),
                     dtensor)
        self._plan = plan
        return plan

    def _gather(self, plan: _Plan, check_plan: bool = True):
        """(gradients to scale, raw statistics, names, index of the present ones among all
        parameters or None). Common case, one pass: every parameter has a dense gradient and
        they share a device and dtype. Otherwise: missing grads, sparse ones, several dtypes,
        distributed shards. None (with `check_plan`) when the grads no longer fit the plan's
        dtype and device: parameters converted in place (``model.double()``, ``.to(device)``
        keep the Parameter objects)."""
        if plan.simple:
            try:
                # The op itself refuses what this path cannot take (a missing grad: TypeError or
                # None; a sparse one: RuntimeError) before it reads anything; the general path
                # then handles it. No per-tensor check in Python here: it would cost as much as
                # the op.
                got = _host.grad_stats_of(plan.params, self.norm_type, plan.plain)
            except (TypeError, RuntimeError):
                got = None
            if got is not None:
                grads, acc, nan, inf, amax = got
                if check_plan and grads and (grads[0].dtype is not plan.dtype or grads[0].device != plan.device):
                    return None
                self._check_hygiene(grads, plain=True)
                self._dtensor_grads = False
                return grads, _Raw(acc, nan, inf, amax, torch.float64 if plan.double else torch.float32,
                                   plan.device), plan.names, None
        params = plan.params
        # Every rank must pack the same statistics: an FSDP1 shard that is empty on this rank has
        # no .grad here but one on other ranks, and with process_group= any shard may have none
        # on some rank (an expert that got no tokens): those enter as empty gradients. So with
        # ZeroRedundancyOptimizer, whose ranks combine their statistics to decide together, and
        # with DTensor parameters, reduced over their meshes (a rank with fewer entries made gloo
        # abort the gather; a DTensor's stand-in keeps its placements, stats.grad_or_empty).
        every = self.process_group is not None or self._decide_group is not None
        keep = self._fsdp_group is not None
        # DTensors: the trainable ones only (a frozen parameter has a gradient on no rank; a
        # stand-in for each of them cost every step of a partly frozen FSDP2 model ~60-150 us).
        present = [i for i, q in enumerate(params)
                   if q.grad is not None or every or (plan.dtensor and q.requires_grad)
                   or (keep and _distributed.is_fsdp1_sharded(q, self._fsdp_whole))]
        grads = [grad_or_empty(params[i]) for i in present]
        if not self._check_grads(grads, present, params, plan) and check_plan:
            return None
        if not grads:  # nothing to check (a step before any backward): no hygiene warning either
            return grads, None, [], None
        self._check_hygiene(grads)
        # A sparse COO gradient is judged by its coalesced values (duplicates summed, as the
        # optimizer will see them) and scaled through its stored values (scaling distributes over
        # duplicates), so the clip needs no coalesced copy written back.
        sparse = [g.layout == torch.sparse_coo for g in grads]
        if self.on_nonfinite == "zero" and any(s and not g.is_coalesced() for g, s in zip(grads, sparse)):
            # Zeroing does not distribute over duplicates (NaN + 4 is NaN, but zeroing the stored
            # NaN leaves 4): the gradient is replaced by its coalesced form, so that the element
            # the guard judged is the one it zeroes.
            for k, (g, s) in enumerate(zip(grads, sparse)):
                if s and not g.is_coalesced():
                    grads[k] = params[present[k]].grad = g.coalesce()
        stat_grads = [g.coalesce().values() if s else g for g, s in zip(grads, sparse)]
        raw, local = self._global_raw(params, present, stat_grads)
        grads = [g._values() if s else t for g, s, t in zip(grads, sparse, local)]
        names, idx = self._layout(params, present, raw.device)
        return grads, raw, names, idx

    def _step(self, closure):
        if closure is None and isinstance(self.optimizer, torch.optim.LBFGS):
            # Refused here, as LBFGS.step() itself refuses it: found by the inner step, after the
            # decision, the step had been counted and .grad clipped, at every retry.
            raise TypeError("gradguard.GradGuard.step: the inner torch.optim.LBFGS needs `closure` (it evaluates the "
                            "loss several times per step); nothing was stepped or recorded")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step(self): the loss scale still in the grads (None once unscale_()
        # ran) and the scaler's found-inf flag (a sum over devices).
        loss_scale = getattr(self, "grad_scale", None)
        scaler_found = getattr(self, "found_inf", None)
        amp = loss_scale is not None or scaler_found is not None
        self._apply_watch = None

        plan = self._current_plan()
        got = self._gather(plan)
        if got is None:  # parameters converted in place since the plan was made: a new one
            self._plan = None
            plan = self._current_plan()
            got = self._gather(plan, check_plan=False)
        grads, raw, names, idx = got
        if self._unscaled is not None and self._still_unscaled(grads) and loss_scale is not None:
            loss_scale = None  # unscaled by the attempt that raised (_note_unscaled)
        if raw is None:
            self.optimizer.step(_replay(loss, closure))
            return loss
        device = raw.device
        if _host.device_type(device) == "meta":  # a dry run: nothing to read, and no state made there
            _refuse_meta(device, 0, names)
        mode = "skip" if amp else self.on_nonfinite
        st = self._state
        capturing = _capturing(device)
        if capturing:
            self._check_capturable(mode, closure, device)
        st.follow(plan.params)  # groups added or removed in param_groups since the last step
        st.ensure(device, len(plan.params))
        # The skip streak before this step's decision: an LBFGS step rolled back after its
        # decision continues it (the decision, seeing a finite first evaluation, reset it).
        prev_streak = (st.counters[3].clone() if closure is not None and isinstance(self.optimizer, torch.optim.LBFGS)
                       and mode in ("skip", "raise", "zero") else None)
        # The ranks' agreement on the LBFGS evaluations' checks, found before anything is recorded
        # (a model whose ranks no one group holds is refused here, not after counting the step).
        agree = self._agreement(device) if prev_streak is not None else None
        # Likewise the spike policy's statistics, which the decision updated with the first
        # evaluation's norm: a step rolled back as non-finite leaves them as they were.
        prev_spike = (self.spike.state_tensor(device).clone() if prev_streak is not None and self.spike is not None
                      else None)
        fused = self._fused_ready() and not self._dtensor_grads
        read = (not fused or mode == "raise" or self.max_consecutive_skips is not None
                or (_host.device_type(device) == "cpu" and self._decide_on_host_on_cpu))
        if capturing:
            # A non-fused inner step runs unconditionally and is rolled back on the device where
            # the decision says skip (_rolled_back_step): no read.
            read = False
        max_norm, spike = self.max_norm, self.spike
        limit_t = None
        if isinstance(max_norm, torch.Tensor):
            if _limit_read_free(max_norm):
                # A CPU tensor, changed in place since it was given (a clipping schedule): its
                # value costs nothing to read, so a bad one is refused as at assignment, before
                # anything is recorded (the decision would skip the step as non-finite).
                v = _host.cpu_value(max_norm)
                if not v >= 0:
                    raise ValueError(f"gradguard.GradGuard: `max_norm` must be a non-negative number, got "
                                     f"tensor({v}) (the tensor given as max_norm was changed since; nothing was "
                                     "stepped or recorded)")
                # The decision takes the value read as a number: no op to convert or move the
                # tensor (an integer, 16-bit or float8 one was converted to float64 every step,
                # one op over a number limit's count; a CPU one filled on a GPU, one more). The
                # same double either way; under a CUDA graph capture fixed at capture, as before.
                # (cpu_value reads every float and signed integer dtype from memory; a bool or
                # unsigned 16-64-bit one is still read by float(), one aten::item.)
                max_norm = v
            else:
                limit_t, max_norm = limit_on(max_norm, device), None
        if loss_scale is not None and loss_scale.device != device:
            loss_scale = loss_scale.to(device)
        if scaler_found is not None and scaler_found.device != device:
            scaler_found = scaler_found.to(device)
        # The decision, the counters, the spike statistics and the history slot: one op.
        norms, amax, scalars, found, mult, grad_scale, pre_scale = _host.guard_decide(
            raw.acc, raw.nan_count, raw.inf_count, raw.amax, idx, limit_t, loss_scale, scaler_found,
            st.counters, st.layer_nonfinite, st.layer_max_norm,
            None if spike is None else spike.state_tensor(device), st.history.values(device),
            self.norm_type, max_norm, mode, "none" if spike is None else spike.kind,
            [] if spike is None else spike.args, raw.out_dtype == torch.float64)
        report = self.last = StepReport(step=st.recorded(capturing), step_offset=st._steps_offset,
                                        capture_step=st.capture_time_step() if capturing else None, names=names,
                                        norms=norms, nan_count=raw.nan_count, inf_count=raw.inf_count, amax=amax,
                                        scalars=scalars, found_inf=found, mode=mode, amp=amp,
                                        total_dtype=raw.out_dtype, coef_dtype=mult.dtype)
        end_trace = None
        lbfgs_live = False  # see end_trace
        rolled_back = None  # an LBFGS step undone by a later evaluation: why (_lbfgs_step)
        if self.tracer is not None:
            if not (closure is not None and isinstance(self.optimizer, torch.optim.LBFGS)):
                self.tracer._end_step(found, report, lambda ps=plan.params, idx=idx: ps if idx is None else
                                      [ps[i] for i in idx.tolist()], plan.params)
            else:
                # LBFGS evaluates the closure again inside its step: those evaluations are this
                # step's, ended after them, also when the step raises (they were recorded into the
                # next step's record, whose first_nonfinite() then reported a rolled-back
                # evaluation's NaN for a finite step). The report counted the first evaluation's
                # gradients: after a later evaluation rolled the step back (or raised), the tracer
                # reads the live ones, the last evaluation's, instead.
                def end_trace(tracer=self.tracer, ps=plan.params, idx=idx):
                    if lbfgs_live:  # rolled back for a later evaluation: the first one's flag says nothing
                        tracer._end_step(None, None, None)
                    else:
                        tracer._end_step(found, report, lambda: ps if idx is None else [ps[i] for i in idx.tolist()])

        try:
            host = None
            if read:
                # The one read of the step (flag, multiplier, skip streak): one transfer.
                host = scalars.tolist()
                found_h, streak_h, mult_h = host[2], int(host[5]), host[6]
                report._skipped_read = bool(host[3])

            if mode == "raise" and host[2]:
                hook_error = self._run_hooks(report, keep_going=True)
                msg, bad = nonfinite_message("gradguard.GradGuard", report.names, raw.nan_count, raw.inf_count,
                                             report.norms, raw.out_dtype, _bad_loss_scale(loss_scale),
                                             _bad_limit(limit_t))
                raise NonFiniteGradError(msg + " (on_nonfinite='raise'; the step was not taken)"
                                         + _hook_note(hook_error), bad, report) from hook_error

            inner = self.optimizer
            snapshot = None
            if closure is not None and isinstance(inner, torch.optim.LBFGS) and mode in ("skip", "raise", "zero"):
                # LBFGS evaluates the closure again inside its step and moves the parameters between
                # evaluations: each later evaluation is checked too, and a non-finite one rolls the
                # parameters and state back to before the step ("zero" mode zeroes a later
                # evaluation's NaN/Inf gradient elements, and rolls back on a non-finite loss only).
                snapshot = ([q.detach().clone() for q in plan.params],
                            {k: copy.deepcopy(v) for k, v in inner.state.items()})
                replay = _replay(loss, closure, plan.params, zero_nonfinite=mode == "zero", agree=agree)
            else:
                replay = _replay(loss, closure)
            clipping = max_norm is not None or limit_t is not None or spike is not None
            # A fused kernel's grad_scale is float32: float64 gradients are clipped (and unscaled) by
            # the float64 multiplier in a pass of their own instead, so that the clip is as exact as
            # clip_grad_norm_'s (through a float32 divisor it was off by up to ~3e-8 relative).
            exact = raw.out_dtype == torch.float64
            if loss_scale is not None and not fused:  # see _note_unscaled
                self._apply_watch = (grads, grads[0]._version)
            if host is None and not fused:  # under a CUDA graph capture: decided on the device, no read
                if mode == "zero":
                    _scale(grads, mult, True, plan.simple)
                elif clipping or loss_scale is not None:  # a skipped step's multiplier only unscales
                    _scale(grads, mult, False, plan.simple)
                if mode == "skip":
                    self._rolled_back_step(replay, found, plan.params)
                else:
                    inner.step(replay)
            elif host is None:  # decided on the device: a fused optimizer, no read
                if mode == "zero":  # one pass zeroes NaN/Inf and clips, then a plain step
                    _scale(grads, mult, True, plan.simple)
                    inner.step(replay)
                elif exact and (clipping or loss_scale is not None):
                    # On a step to skip, the multiplier only unscales (GradScaler's own unscale_ does
                    # that too), and the fused kernel, handed found_inf, touches nothing else.
                    _scale(grads, mult, False, plan.simple)
                    self._fused_step(replay, found if mode in ("skip", "raise") else None, None, device)
                else:
                    divisor = grad_scale if (clipping or loss_scale is not None) else None
                    if loss_scale is not None and clipping:
                        # loss_scale / clip_coef past float32 (a GradScaler scale grown to 2^124
                        # over a coefficient below 1/16): guard_decide's grad_scale is then the loss
                        # scale alone, and its pre_scale the coefficient, applied here (1 otherwise,
                        # and the kernel writes nothing). Dividing by the inf zeroed every gradient.
                        _scale(grads, pre_scale, False, plan.simple)
                    self._fused_step(replay, found if mode in ("skip", "raise") else None, divisor, device,
                                     loss_scale is not None)
            else:
                is_bad = found_h != 0.0
                if snapshot is not None and (not is_bad or mode == "zero"):
                    lbfgs_live = True  # until the step returns without a rollback
                    rolled_back = self._lbfgs_step(inner, replay, mult, mult_h, grads, plan, snapshot, report, mode,
                                                   is_bad, prev_streak, prev_spike)
                    lbfgs_live = rolled_back is not None
                    if lbfgs_live and mode == "raise":
                        # The step hooks see this step as they see every raising one (it raised
                        # inside _lbfgs_step, and a logging hook never saw the bad step), after the
                        # tracer's step has ended, as elsewhere.
                        if end_trace is not None:
                            end_trace()
                            end_trace = None
                        hook_error = self._run_hooks(report, keep_going=True)
                        raise NonFiniteGradError(rolled_back + " (on_nonfinite='raise'; the step was rolled back)"
                                                 + _hook_note(hook_error), [], report) from hook_error
                    if lbfgs_live:
                        streak_h = int(st.counters[3])  # the rolled-back step counts as skipped
                elif not (is_bad and mode in ("skip", "raise")):
                    if fused and not is_bad and mult_h != 1.0 and not exact:
                        # The kernel unscales/clips while it reads the grads: no separate pass (but
                        # where loss_scale / clip_coef is past float32, the coefficient first, as above;
                        # on the CPU a pre_scale of 1 is read on the host and nothing is written).
                        if loss_scale is not None and clipping:
                            _scale(grads, pre_scale, False, plan.simple)
                        self._fused_step(replay, None, grad_scale, device, loss_scale is not None)
                    else:
                        if is_bad and mode == "zero":
                            _scale(grads, mult, True, plan.simple)
                        elif mult_h != 1.0:
                            _scale(grads, mult, False, plan.simple)
                        inner.step(replay)
        finally:
            if end_trace is not None:  # a step that raised part-way ends the tracer's step too
                end_trace()
        if self.hygiene:
            # The gradients as the check saw them: a sparse one itself, not the view of its
            # values that the scaling takes (remembered, the view never matched the next step's
            # gradient, and a forgotten zero_grad() went unwarned with a sparse Embedding).
            marked, self._hygiene_grads = self._hygiene_grads, None
            self._tracker.mark(grads if marked is None else marked)
            self._cleared = False
        giving_up = self.max_consecutive_skips is not None and streak_h >= self.max_consecutive_skips
        hook_error = self._run_hooks(report, keep_going=giving_up) if self._step_hooks else None
        if giving_up:
            if rolled_back is not None:  # the first evaluation was finite: the report's counts say nothing
                msg, bad = rolled_back, []
            else:
                msg, bad = nonfinite_message("gradguard.GradGuard", report.names, raw.nan_count, raw.inf_count,
                                             report.norms, raw.out_dtype, _bad_loss_scale(loss_scale),
                                             _bad_limit(limit_t))
            raise NonFiniteGradError(
                f"gradguard.GradGuard: {'1 step was' if streak_h == 1 else f'{streak_h} steps in a row were'} skipped "
                f"(max_consecutive_skips={self.max_consecutive_skips}); the last one: {msg}" + _hook_note(hook_error),
                bad, report) from hook_error
        return loss

    def _agreement(self, device):
        """`agree(ok) -> bool` over the ranks that step together (process_group=, ZeRO's group,
        else the ranks of the DTensor parameters' meshes and of the DDP/FSDP1 modules in `model=`,
        else FSDP1's group), or None for a single process."""
        group = self.process_group if self.process_group is not None else self._decide_group
        if group is None:
            # The model, and a module that wraps it where a framework keeps one apart (Lightning's
            # strategy.model: DDP wraps the LightningModule the guard names its layers from).
            group = _distributed.agreement_group((self.model, self.__dict__.get("_agree_with")), self._params())
        if group is None:
            group = self._fsdp_group
        if group is None:
            return None
        return lambda ok: _distributed.all_agree(ok, group, device)

    def _check_capturable(self, mode: str, closure, device) -> None:
        """Refuses a step that a CUDA graph capture cannot hold, before anything is allocated or
        recorded (a capture records kernels without running them: state it created would hold
        uninitialized memory)."""
        inner = self.optimizer
        why = ("on_nonfinite='raise'" if mode == "raise" else "max_consecutive_skips" if
               self.max_consecutive_skips is not None else "LBFGS with a closure" if
               closure is not None and isinstance(inner, torch.optim.LBFGS) else None)
        if why is not None:
            raise RuntimeError(f"gradguard.GradGuard: with {why} a step must read its decision on the host, which a "
                               f"CUDA graph capture cannot hold; capture the guard without it")
        if self._decide_group is not None:
            raise RuntimeError(
                "gradguard.GradGuard: a step of an inner ZeroRedundancyOptimizer cannot be captured in a CUDA graph: "
                "its state lives in the local optimizer it wraps, which the guard cannot roll back on a skipped replay")
        fused_kind = self._fused_kind()
        st = self._state
        if st.counters is None or st.counters.device != device or (fused_kind and not self._fused_ready()):
            raise RuntimeError(
                "gradguard.GradGuard: take eager warm-up steps before capturing a guarded step in a CUDA graph (as "
                "PyTorch's notes on graphs ask): the first steps create the guard's and the optimizer's state, which "
                "a capture would record without running")
        if fused_kind and not self._dtensor_grads:
            return  # the fused kernel skips on found_inf: no rollback
        # What _rolled_back_step cannot undo, refused here, before the decision is recorded.
        # (Global step post-hooks need no refusal: they run around the guard's step, after the
        # rollback, not inside the inner step; see _mute.)
        for t in self._stepped_tensors(self._params()):
            if t.device != device:
                raise RuntimeError(
                    f"gradguard.GradGuard: under a CUDA graph capture the inner optimizer's parameters and state must "
                    f"be on {device}, where the decision is; a {tuple(t.shape)} tensor is on {t.device} (an optimizer "
                    f"without capturable=True keeps its step counters on the CPU)")

    def _rolled_back_step(self, replay, found, params) -> None:
        """The inner (non-fused) step taken whatever the decision, then undone on the device
        where `found` is 1: every parameter with a gradient and every tensor of its optimizer
        state is copied before the step and selected back after it (``torch.where``, bit for
        bit). Used only under a CUDA graph capture, where the host cannot read the decision: it
        costs a copy of the parameters and state and a select pass, a price the read path does
        not pay. The inner optimizer's step post-hooks run after the select, so that they never
        see a step that is undone. Refused, with the step undone and the state's structure put
        back: a step that creates or replaces state tensors or changes anything else of the state
        or the param groups, which a replay could not undo (_check_capturable refuses the rest
        before the decision)."""
        inner = self.optimizer
        stepped = [q for q in params if q.grad is not None]

        def entries(d: dict, skip=()):  # a tensor by identity, anything else by value
            return [(k, id(v) if isinstance(v, torch.Tensor) else v) for k, v in d.items() if k not in skip]

        def layout():
            return ([entries(inner.state.get(q, {})) for q in stepped],
                    [entries(g, ("params",)) for g in inner.param_groups])

        live = list(self._stepped_tensors(stepped))
        before = layout()
        states = {q: dict(inner.state[q]) for q in stepped if q in inner.state}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        with torch.no_grad():
            saved = [t.detach().clone() for t in live]
        hooks = inner._optimizer_step_post_hooks
        inner._optimizer_step_post_hooks = OrderedDict()
        try:
            inner.step(replay)
        finally:
            inner._optimizer_step_post_hooks = hooks
        if layout() != before:
            with torch.no_grad():
                for t, s in zip(live, saved):
                    t.detach().copy_(s)
            for q in stepped:
                if q in states:
                    inner.state[q] = states[q]
                else:
                    inner.state.pop(q, None)
            for g, kept in zip(inner.param_groups, groups):
                for k in [k for k in g if k != "params" and k not in kept]:
                    del g[k]
                g.update(kept)
            raise RuntimeError(
                "gradguard.GradGuard: under a CUDA graph capture the inner optimizer created or replaced state "
                "tensors, or changed another entry of its state or param groups, during the step; a replay could "
                "not undo that on a skipped step. Take eager warm-up steps before capturing, and use an optimizer "
                "whose per-step state is all tensors (capturable=True)")
        with torch.no_grad():
            skip = found != 0
            for t, s in zip(live, saved):
                torch.where(skip, s, t.detach(), out=t.detach())
        for hook in list(hooks.values()):
            hook(inner, (inner, replay), {})  # as torch.optim calls it: args include the optimizer

    def _lbfgs_step(self, inner, replay, mult, mult_h, grads, plan, snapshot, report, mode, first_bad,
                    prev_streak, prev_spike) -> str | None:
        """The LBFGS step with every evaluation checked; where it was rolled back, why (a
        sentence), else None."""
        if first_bad:  # "zero" mode: the first evaluation's NaN/Inf zeroed (and the rest clipped)
            _scale(grads, mult, True, plan.simple)
        elif mult_h != 1.0:
            _scale(grads, mult, False, plan.simple)
        try:
            inner.step(replay)
            return None
        except _BadEvaluation as bad:
            saved_params, saved_state = snapshot
            with torch.no_grad():  # grad mode here is whatever the failed inner step left
                for q, s in zip(plan.params, saved_params):
                    q.copy_(s)
            inner.state.clear()
            inner.state.update(saved_state)
            message = bad.message
        # Booked as a skipped non-finite step after all (the first evaluation was finite).
        report._mark_skipped()
        self._state.mark_last_skipped(prev_streak, first_bad)
        if prev_spike is not None:
            self.spike.state_tensor(prev_spike.device).copy_(prev_spike)
        return message

    def _global_raw(self, params, present, grads):
        """The gradients' statistics, made global across ranks when they are sharded (one
        collective), and the local tensors that the clip scales."""
        whole = self._fsdp_whole
        sharded = [_distributed.is_fsdp1_sharded(params[i], whole) for i in present]
        groups = None
        if self.process_group is not None:
            groups = [None if id(params[i]) in whole else self.process_group for i in present]
        elif any(sharded):
            if self._fsdp_group is None:
                names = self._names(params)
                refuse_unreduced_fsdp1([params[i] for i in present], [names[i] for i in present], "gradguard.GradGuard",
                                       whole)
            groups = [self._fsdp_group if s else None for s in sharded]
        self._dtensor_grads = any(_distributed.is_dtensor(g) for g in grads)
        names = None
        if self._dtensor_grads:
            all_names = self._names(params)
            names = [all_names[i] for i in present]
        reduced = {}
        got = global_raw_stats(grads, self.norm_type, groups=groups, decide_group=self._decide_group, names=names,
                               reduced=reduced)
        for k, g in reduced.items():
            # A Partial (pending-sum) DTensor gradient was reduced to judge it: the step scales and
            # takes the reduced one (the optimizer would have reduced it at its first op).
            params[present[k]].grad = g
        return got

    def _run_hooks(self, report, keep_going: bool = False):
        """Runs the step hooks. With `keep_going` (the step is about to raise its own
        NonFiniteGradError) a hook's exception is returned, to be chained, not raised."""
        for fn in list(self._step_hooks.values()):
            if not keep_going:
                fn(self, report)
                continue
            try:
                fn(self, report)
            except Exception as e:  # noqa: BLE001  (chained onto the guard's own error)
                return e
        return None

    # ---- totals and checkpoints -----------------------------------------------------------------

    def summary(self, k: int = 5) -> dict:
        """Totals since construction (or the loaded checkpoint): ``steps``, ``skipped``,
        ``clipped``, ``nonfinite_steps``, ``consecutive_skips``, and ``worst_layers``: the k
        parameters most often non-finite, then with the largest gradient norm seen, as dicts of
        ``name``, ``nonfinite_steps``, ``max_norm``. Reads the counters (a sync)."""
        k = check_int(k, "gradguard.GradGuard.summary: `k`", 0)
        params = self._params()
        self._state.follow(params)
        # Named afresh: the names are cached by position until the next step looks at the
        # groups, and the totals have just followed their parameters by identity.
        self._name_list = None
        return self._state.summary(self._names(params), k)

    def state_dict(self) -> dict:
        """The inner optimizer's state dict plus a ``"gradguard"`` entry: counters, per-parameter
        totals, spike statistics and history (tensors cloned, so later steps do not change it).
        State-dict hooks registered on the guard run around it."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.optimizer.state_dict())

        sd["gradguard"] = self.guard_state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a ``state_dict()`` of a GradGuard (or a plain optimizer state dict, which leaves
        the guard's own state as it is). A checkpoint that does not fit this guard is refused
        before anything is loaded."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if isinstance(state_dict, dict) and "param_groups" not in state_dict and "version" in state_dict:
            raise ValueError("gradguard.GradGuard.load_state_dict: this is a guard_state_dict() (the guard's own "
                             "state, without the optimizer's); load it with load_guard_state_dict()")
        sd = dict(state_dict)
        guard = sd.pop("gradguard", None)
        self._drop_scaler_attrs()  # a scale and flag from before the checkpoint mean nothing now
        if guard is not None:
            self._check_guard_state(guard)

        def load_inner():
            self.optimizer.load_state_dict(sd)
            self._fused_state_ready = False  # the loaded state may cover fewer parameters
            self._fused_missing = None

        if guard is None:
            load_inner()
        else:  # the guard's state first, undone if it or the optimizer's load fails
            self._load_guard_state(guard, then=load_inner)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    @property
    def consolidate_state_dict(self):
        """``ZeroRedundancyOptimizer.consolidate_state_dict`` of the inner optimizer (ZeRO asks
        for it before ``state_dict()`` on the rank that saves). Only there: frameworks test for
        the attribute to treat an optimizer as sharded (Lightning then saves rank 0's state
        alone), so a guard over any other optimizer has none."""
        consolidate = getattr(self.optimizer, "consolidate_state_dict", None)
        if consolidate is None:
            raise AttributeError(f"gradguard.GradGuard: the inner {type(self.optimizer).__name__} has no "
                                 "consolidate_state_dict (only ZeroRedundancyOptimizer needs it)")
        return consolidate

    def guard_state_dict(self) -> dict:
        """The guard's own state alone (what ``state_dict()`` holds under ``"gradguard"``):
        counters, per-parameter totals, spike statistics and history. For checkpointers that keep
        only an optimizer's ``state`` and ``param_groups`` (``torch.distributed.checkpoint``'s
        ``get_state_dict``, ``FSDP.optim_state_dict``): it is the same on every rank; save it
        beside them and load it with ``load_guard_state_dict``."""
        # For the parameters as they are now: groups added or removed through param_groups (or
        # the inner optimizer) since the last step would leave the totals for another count.
        with torch.inference_mode(False):
            self._state.follow(self._params())
        return self._state.state_dict(self.spike)

    def load_guard_state_dict(self, guard: dict) -> None:
        """Loads a ``guard_state_dict()`` (the inner optimizer's state is left as it is)."""
        if isinstance(guard, dict) and "param_groups" in guard and "version" not in guard:
            raise ValueError("gradguard.GradGuard.load_guard_state_dict: this is a full state_dict() (the "
                             "optimizer's state with the guard's under 'gradguard'); load it with load_state_dict(), "
                             "or pass state_dict['gradguard']")
        self._check_guard_state(guard, "gradguard.GradGuard.load_guard_state_dict")
        self._load_guard_state(guard)

    def _load_guard_state(self, guard: dict, then=None) -> None:
        """Loads `guard`, then calls `then` (the inner optimizer's load); if either raises, the
        guard's state is as it was. _check_guard_state refuses a checkpoint that does not fit; a
        malformed value in one that does (a None step count) failed half-way, the history loaded
        and the counters not. Each load below assigns new objects, so the attributes as they were
        are the state as it was."""
        held = [o for o in (self._state, self._state.history, self.spike) if o is not None]
        before = [dict(vars(o)) for o in held]
        try:
            # Loaded under inference_mode (a restore helper decorated with it), the copies made
            # here were inference tensors: the steps' in-place updates refused them (fallback)
            # or wrote into them (extension). As in step(), the guard's own tensors are normal ones.
            with torch.inference_mode(False):
                if self.spike is not None:
                    if guard["spike"] is not None:
                        self.spike.load_state_dict(guard["spike"])
                    else:  # a checkpoint without spike state: the policy starts afresh, as documented
                        self.spike._state = None
                self._state.load_state_dict(guard)
            if then is not None:
                then()
        except BaseException:
            for o, attrs in zip(held, before):
                vars(o).clear()
                vars(o).update(attrs)
            raise
        self._state.params = self._params()  # the check made sure the totals are for these
        self._tracker = ClearTracker()

    def _check_guard_state(self, guard: dict, where: str = "gradguard.GradGuard.load_state_dict") -> None:
        if not isinstance(guard, dict):
            raise ValueError(f"{where}: state_dict['gradguard'] must be a dict, got {type(guard).__name__}")
        if guard.get("version") != 1:
            raise ValueError(f"{where}: unknown guard state version {guard.get('version')!r}")
        missing = [k for k in _GUARD_KEYS if k not in guard]
        history = guard.get("history")
        if isinstance(history, dict):
            missing += [f"history.{k}" for k in ("size", "count", "steps", "values") if k not in history]
        elif "history" not in missing:
            missing.append("history")
        if missing:
            raise ValueError(f"{where}: state_dict['gradguard'] is incomplete (missing {', '.join(missing)}); "
                             "it is not a GradGuard.state_dict() of this version")
        _check_guard_fields(guard, where)
        saved = guard["spike"]
        if saved is not None and self.spike is None:
            raise ValueError(f"{where}: the checkpoint holds {saved.get('kind')} state but this GradGuard has "
                             "spike=None; build it with the same policy")
        mine_kind = None if self.spike is None else self.spike.state_dict().get("kind")
        if saved is not None and saved.get("kind") != mine_kind:
            raise ValueError(f"{where}: the checkpoint holds {saved.get('kind')} spike state, not {mine_kind}")
        layers = guard.get("layer_nonfinite")
        count = len(self._params())
        if isinstance(layers, torch.Tensor) and layers.numel() != count:
            raise ValueError(f"{where}: the checkpoint's guard state is for {layers.numel()} parameters but this "
                             f"GradGuard's optimizer has {count}")
        if guard["history"]["size"] != self._state.history.size:
            raise ValueError(f"{where}: the checkpoint's history holds {guard['history']['size']} steps but this "
                             f"GradGuard was built with history_size={self._state.history.size}")
        if saved is not None:
            # Hyperparameters are the constructor's to set; a checkpoint must not change them quietly.
            mine = self.spike.state_dict()
            differ = [f"{k}={saved[k]!r} (this guard: {mine[k]!r})" for k, v in mine.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k in saved and saved[k] != v]
            if differ:
                raise ValueError(f"{where}: the checkpoint's {saved['kind']} was built with {', '.join(differ)}; "
                                 "build the policy with the checkpoint's values, or set "
                                 "state_dict['gradguard']['spike'] = None to start its statistics afresh")
