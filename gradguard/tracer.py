"""NanTracer: where in the forward or backward pass the first NaN/Inf of a step was born.

How it records (``mode="always"``): a forward pre-hook and a forward hook on every module, and a
gradient hook on every tensor that enters or leaves a module. Each one launches one
``torch.aminmax`` per tensor it has not seen yet (a tensor that left one module unchanged and
enters the next is checked once) and appends the two 0-dim results to a list, in execution order.
Both are finite exactly when every element is finite (NaN propagates through min and max), so
nothing is ever read back on a good step. ``first_nonfinite()``
stacks the list and reads one index: the first non-finite event. Its meaning:

- the input of the outermost module call held NaN/Inf: the batch (phase ``"input"``);
- the output of module M: M produced it from finite inputs (phase ``"forward"``);
- the input of module N that no module produced: the code of N's parent between its submodules;
- the gradient of a tensor (phase ``"backward"``): the backward of the modules that consumed it,
  or of the loss when it is the model's output.

Only then, on the bad step, the report looks closer (syncs allowed): which batch rows, whether
the module's own parameters are finite, and which aten op it was, by re-running that module on
its recorded inputs under a dispatch mode that checks every op.

``mode="on_failure"`` attaches nothing: ``begin_step()`` saves the RNG state, and on a bad step
``replay(fn, *args)`` re-runs the step function with the hooks on, the op checker on, the saved
RNG state (dropout draws the same masks), dynamo disabled (a compiled model runs eagerly), and
the model's gradients and buffers restored afterwards.
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from gradguard._numbers import check_int, is_bool
from gradguard.errors import ArgumentTypeError
from gradguard._trace_ops import FirstNonfiniteOp, bad_rows, checkable, nonfinite_kind
from gradguard._trace_origin import Origin
from gradguard import distributed as _distributed
from gradguard.stats import _raw_of

MODES = ("always", "on_failure")
_INF = math.inf
_MANY_EVENTS = 1_000_000


class _Call:
    """One module call: its name, numbers, enclosing call, and its inputs (weakly held unless the
    tracer keeps tensors, for the per-module op replay)."""

    __slots__ = ("name", "module", "call", "module_call", "parent", "leaves", "spec", "kw", "versions", "autocast")

    def __init__(self, name, module, call, module_call, parent, leaves, spec, kw, keep):
        self.name, self.module, self.call, self.module_call, self.parent = name, module, call, module_call, parent
        self.spec, self.kw = spec, kw  # spec None: bare positional tensors; kw: leaves of (args, kwargs)
        self.versions = [_version(t) if isinstance(t, torch.Tensor) else None for t in leaves]
        self.leaves = leaves if keep else [weakref.ref(t) if isinstance(t, torch.Tensor) else t for t in leaves]
        self.autocast = None
        for dev in ("cuda", "cpu"):
            if torch.is_autocast_enabled(dev):
                self.autocast = (dev, torch.get_autocast_dtype(dev))
                break

    def inputs(self):
        """(args, kwargs) as they were, or None when a tensor input died or was modified."""
        out = []
        for v, ver in zip(self.leaves, self.versions):
            if isinstance(v, weakref.ref):
                v = v()
                if v is None:
                    return None
            if isinstance(v, torch.Tensor) and _version(v) != ver:
                return None
            out.append(v)
        if self.spec is None:
            return tuple(out), {}
        value = tree_unflatten(out, self.spec)
        return (tuple(value[0]), dict(value[1])) if self.kw else (tuple(value), {})


class _Site:
    """A tensor whose gradient is hooked: the module call that produced it (or None) and the
    module calls that took it as input."""

    __slots__ = ("producer", "consumers", "model_output")

    def __init__(self, producer=None):
        self.producer = producer
        self.consumers = []
        self.model_output = False  # also an output of the traced model itself: the loss's input


class _Record:
    """The events of one step, in execution order: ``flags[i]`` is a 0-dim max-abs tensor,
    ``meta[i]`` = (kind, call, leaf index, tensor or weakref, version, site)."""

    def __init__(self):
        self.flags: list[torch.Tensor] = []
        self.meta: list[tuple] = []
        self.first_backward: int | None = None
        self.calls = 0
        self.module_calls: dict = {}
        self.seen: dict = {}   # id(tensor) -> (weakref, version): already checked
        self.sites: dict = {}  # id(tensor) -> (weakref, _Site, grad_fn and output_nr hooked at)
        self.batch_size: int | None = None
        self.nograd = False    # an event recorded with gradients off (its value reaches no gradient)
        self.found_inf = None  # the guard's flag for this step, when a GradGuard ended it
        self.report = None     # and its StepReport
        self.judged = None     # () -> the parameters the report's counts are of
        self.guarded = None    # every parameter of that guard (present or not)
        self.op = None         # set by a replay's op checker
        self.origin = None     # the answer, once computed (without a loss)
        self.replay_origin = None  # a replay's answer (computed with its loss)
        self.step = None       # the tracer's step count when this record was kept (see first_nonfinite)
        self.param_names = None
        # The gradient hooks placed this step, removed when it ends (release()): a hook on a leaf
        # tensor (a Parameter passed straight to a submodule) or on any tensor that outlives the
        # step outlives it too, and one on a tensor the record holds (keep_tensors=True) makes a
        # cycle through autograd's C++ hook list that the garbage collector cannot see: either
        # kept every step's record alive.
        self.hooks: list = []  # (handle, id(tensor))

    def release(self) -> None:
        for handle, key in self.hooks:
            handle.remove()
            self.sites.pop(key, None)  # hooked again by the next forward that sees the tensor
        self.hooks = []


def _version(t: torch.Tensor) -> int:
    # An inference tensor has no version counter (reading it raises): one made under
    # torch.inference_mode() and fed to a traced model outside it counts as never modified.
    return -1 if t.is_inference() else t._version


def _leaves(value):
    """Leaves and spec of a hook's argument, with a fast path for the common bare tensor(s)."""
    if isinstance(value, torch.Tensor):
        return [value], None
    return tree_flatten(value)


class NanTracer:
    """Finds the module, tensor and batch rows where the first NaN/Inf of a step appeared.

    Args:
        model: the ``nn.Module`` to trace (all its submodules are hooked).
        mode: ``"always"`` (hooks on every step, device-side flags, no host sync) or
            ``"on_failure"`` (nothing attached; ``replay(fn, *args)`` traces a bad step again).
        batch_dim: the batch dimension of the model's first tensor input and of the tensors that
            carry it (for ``origin.rows``).
        check_ops: on a bad step, find the first non-finite aten op by re-running the offending
            module (``"always"``) or the whole step (``replay``) under an op checker.
        keep_tensors: hold every checked tensor until ``reset()`` (more memory: activations
            outlive backward), so that ``rows`` and ``op`` are known in ``"always"`` mode.
            Without it they are known only for tensors the caller still holds (the batch),
            and always after ``replay()``: autograd keeps saved activations without their
            Python objects, so weak references to them die after the forward.

    ``first_nonfinite()`` answers for the current step, or, right after a
    ``GradGuard(..., tracer=tracer)`` step (which resets the tracer), for that step.
    """

    def __init__(self, model, mode: str = "always", *, batch_dim: int = 0, check_ops: bool = True,
                 keep_tensors: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"gradguard.NanTracer: `model` must be an nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"gradguard.NanTracer: `mode` must be one of {MODES}, got {mode!r}")
        self.batch_dim = check_int(batch_dim, "gradguard.NanTracer: `batch_dim`", 0)
        for name, flag in (("check_ops", check_ops), ("keep_tensors", keep_tensors)):
            if not is_bool(flag):  # bool("false") is True
                raise TypeError(f"gradguard.NanTracer: `{name}` must be True or False, got {flag!r}")
        self.model = model
        self.mode = mode
        self.check_ops = bool(check_ops)
        self._names = {}
        for name, mod in model.named_modules():
            self._names.setdefault(mod, name)
        self._handles = []
        self._rec = _Record()
        self._last: _Record | None = None
        self._stack: list = []
        self.keep_tensors = bool(keep_tensors)
        self._keep = self.keep_tensors  # hold tensors strongly (rows, op replay of any event)
        self._quiet = False      # hooks only track the module stack (per-module op replay)
        self._removed = False
        self._warned_many = False
        self._rng = self._rng_done = None
        self._rec_op = None
        self._ended = False
        self._gen = 0  # counts step boundaries: a kept record answers only until the next one
        self.last_origin: Origin | None = None
        if mode == "always":
            self._attach()
        self.begin_step()

    # ---- attaching ------------------------------------------------------------------------------

    def _attach(self) -> None:
        if self._handles:
            return
        for mod in self._names:
            self._handles.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
            # always_call: a forward that raises still pops its frame (a stale one made a later
            # direct call of a submodule look like code inside a dead call).
            self._handles.append(mod.register_forward_hook(self._post, with_kwargs=True, always_call=True))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stack = []

    def remove(self) -> None:
        """Detaches every hook and forgets the record; gradient hooks already placed on this
        step's activations do nothing, and those on parameters and other leaf tensors are removed."""
        self._detach()
        self.reset()
        self._removed = True

    def reset(self) -> None:
        """Forgets the recorded events (call it before each step, unless a GradGuard does)."""
        self._rec.release()
        self._rec = _Record()
        self._last = None
        self._stack = []
        self.last_origin = None
        self._gen += 1

    def begin_step(self) -> None:
        """Saves the RNG state the next step starts from (for ``replay``; a few microseconds).
        It does not start a new record (a loop may call it once per micro-batch, and the earlier
        micro-batches' events are the step's too): ``reset()`` or a GradGuard step does. An older
        step's kept record (a replay's, holding its tensors) is dropped here: it answers for no
        step from now on."""
        self._rng = _rng_state()
        self._ended = False
        self._gen += 1
        self._last = None

    def _end_step(self, found_inf=None, report=None, judged=None, guarded=None) -> None:
        """Called by ``GradGuard.step()``: keeps this step's events for ``first_nonfinite()``,
        starts a fresh record and saves the RNG state for the next step. ``report``: the step's
        StepReport, whose per-parameter counts are of the gradients as they came in (a
        ``"zero"`` step or a ``zero_grad()`` since has cleaned the live ones); ``judged()``: the
        parameters those counts are of, in the report's order (asked for on a bad step only)."""
        rec = self._rec
        rec.release()  # the step's backward is over
        self._gen += 1
        if rec.flags or rec.op is not None:
            rec.step = self._gen
            rec.found_inf = found_inf
            rec.report, rec.judged, rec.guarded = report, judged, guarded
            self._last = rec
            self._rec = _Record()
        elif self._last is not None and self._last.step != self._gen:
            # An older step's record (a replay's, which holds its tensors) answers for no step
            # from now on: dropped here, not only when first_nonfinite() is next asked (on good
            # steps in "on_failure" mode nobody asks, and a replay's 36 MB stayed alive).
            self._last = None
        self._stack = []
        self._rng_done = self._rng
        self._rng = _rng_state()
        self._ended = True

    # ---- recording (hot path: no host sync, one small device op per hook at most) ---------------

    def _skip(self) -> bool:
        # Dynamo inlines hooks: inside a compiled region record nothing (the eager replay does).
        # A forward run inside backward is a gradient-checkpoint recompute, already recorded.
        # Under torch.inference_mode() (an evaluation loop) no training step is being traced.
        # Inside a torch.func transform (vmap of grad: per-sample gradients) the tensors are the
        # transform's wrappers, which must not outlive it: reading their flags after it raised.
        return (torch.compiler.is_compiling() or torch._C._current_graph_task_id() != -1
                or torch.is_inference_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None)

    def _known(self, rec, t) -> bool:
        hit = rec.seen.get(id(t))
        return hit is not None and hit[0]() is t and hit[1] == _version(t)

    def _check(self, rec, kind, frame, leaves, idx) -> None:
        """One foreach max-abs over the leaves not checked yet; marks them checked."""
        todo = []
        for i in idx:
            t = leaves[i]
            if self._known(rec, t):
                continue
            rec.seen[id(t)] = (weakref.ref(t), _version(t))
            if checkable(t):
                todo.append(i)
        if not todo:
            return
        if not torch.is_grad_enabled():
            rec.nograd = True
        for i in todo:
            t = leaves[i]
            rec.flags.extend(_min_max(t))
            meta = (kind, frame, i, t if self._keep else weakref.ref(t), _version(t), None)
            rec.meta += (meta, meta)
        if len(rec.flags) > _MANY_EVENTS and not self._warned_many:
            self._warned_many = True
            warnings.warn("gradguard.NanTracer: over a million events recorded since the last reset(); call "
                          "tracer.reset() every step, or pass tracer= to GradGuard", stacklevel=3)

    def _hook_grads(self, rec, leaves, idx, frame, as_output) -> None:
        for i in idx:
            t = leaves[i]
            if not (t.requires_grad and checkable(t)):
                continue
            # A tensor changed in place by an autograd op since its hook (ReLU(inplace=True) on a
            # Linear's output) has a new grad_fn: a new value with a gradient of its own, which
            # gets a site and a hook of its own (the old hook sees the gradient of the value
            # before the change, which blamed the in-place module for the backward of the module
            # after it). A change autograd does not record (under no_grad) keeps the node, and a
            # leaf's hook follows it through any change: those keep their site. The node's Python
            # object is held (until the record's release) and compared by identity: torch 2.11
            # makes a new one at each read of grad_fn unless one is alive, so an id did not match.
            node = t.grad_fn
            hit = rec.sites.get(id(t))
            if hit is not None and hit[0]() is t and hit[2] is node and hit[3] == t.output_nr:
                site = hit[1]
            else:
                site = _Site()
                rec.sites[id(t)] = (weakref.ref(t), site, node, t.output_nr)
                handle = t.register_hook(self._grad_hook(rec, site))
                # Kept for every tensor, activations too: one that outlives the step (a tensor
                # computed once and fed to every step) gathered a hook per step, each holding
                # its step's record alive.
                rec.hooks.append((handle, id(t)))
            if as_output:
                site.producer = site.producer or frame
                site.model_output = site.model_output or frame.parent is None
            else:
                site.consumers.append(frame)

    def _grad_hook(self, rec, site):
        def hook(grad):
            if self._removed or rec is not self._rec or not checkable(grad):
                return None
            if rec.first_backward is None:
                rec.first_backward = len(rec.flags)
            rec.flags.extend(_min_max(grad))
            meta = ("grad", None, None, grad if self._keep else None, None, site)
            rec.meta += (meta, meta)
            return None
        return hook

    def _pre(self, mod, args, kwargs):
        if self._quiet:
            self._stack.append(self._names.get(mod))
            return None
        if mod is self.model:  # a new outermost call: frames left by a forward that raised are stale
            self._stack = []
        # An evaluation forward (the model in eval() mode, gradients off: a validation batch) is
        # not part of a training step: recorded, its NaN was blamed for the next step's.
        # The traced model's mode, not the module's: a frozen submodule in eval() called under
        # no_grad inside a training forward (a distillation teacher) is part of the step.
        if self._skip() or (not self.model.training and not torch.is_grad_enabled()):
            self._stack.append(None)
            return None
        rec = self._rec
        name = self._names.get(mod, type(mod).__name__)
        rec.calls += 1
        mc = rec.module_calls[name] = rec.module_calls.get(name, 0) + 1
        parent = next((f for f in reversed(self._stack) if isinstance(f, _Call)), None)
        if kwargs:
            leaves, spec = tree_flatten((args, kwargs))
        elif all(isinstance(a, torch.Tensor) for a in args):
            leaves, spec = list(args), None
        else:
            leaves, spec = tree_flatten(args)
        frame = _Call(name, mod, rec.calls, mc, parent, leaves, spec, bool(kwargs), self._keep)
        idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        if parent is None and rec.batch_size is None and idx:
            t0 = leaves[idx[0]]
            if t0.dim() > self.batch_dim:
                rec.batch_size = t0.shape[self.batch_dim]
        checked = idx
        if kwargs:
            # An additive attention mask holds -inf by design (torch's TransformerEncoder turns a
            # boolean padding mask into one for every layer): a keyword argument named *mask* is
            # not checked (a NaN in one shows in the output of the module that applies it).
            masks = {id(v) for k, v in kwargs.items() if "mask" in k.lower() and isinstance(v, torch.Tensor)}
            if masks:
                checked = [i for i in idx if id(leaves[i]) not in masks]
        self._check(rec, "input", frame, leaves, checked)
        if torch.is_grad_enabled():
            self._hook_grads(rec, leaves, idx, frame, as_output=False)
        self._stack.append(frame)
        return None

    def _post(self, mod, args, kwargs, output):
        frame = self._stack.pop() if self._stack else None
        if not isinstance(frame, _Call):
            return None
        rec = self._rec
        leaves, _ = _leaves(output)
        idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        self._check(rec, "output", frame, leaves, idx)
        if torch.is_grad_enabled():
            self._hook_grads(rec, leaves, idx, frame, as_output=True)
        return None

    # ---- the answer -----------------------------------------------------------------------------

    def first_nonfinite(self, loss=None) -> Origin | None:
        """The first NaN/Inf of the step, or None when every recorded value was finite, or when
        the GradGuard step that ended it found it finite (it guards every trainable parameter and
        no event was recorded with gradients off). Reads one index from the device. ``loss``: the
        step's loss, to tell a non-finite loss computed from finite model outputs (phase
        ``"loss"``) from the rest."""
        if self._last is not None and self._last.step != self._gen:
            # Kept at an earlier step boundary (a replay's, or a step the guard ended) and a step
            # has begun or ended since: its answer is not this step's (a replay's answer was given
            # for every later good step, and hid a new fault).
            self._last = None
        rec = self._rec if (self._rec.flags or self._rec.op is not None or self._last is None) else self._last
        if loss is None and rec.replay_origin is not None:
            return rec.replay_origin
        if not rec.flags and loss is None:
            return None
        if (loss is None and rec.found_inf is not None and rec.guarded is not None and not rec.nograd
                and not bool(rec.found_inf)):
            # The GradGuard step that ended this step found it finite (one read, in place of the
            # two a good step made), it guards every trainable parameter of the model (a second
            # optimizer's parameter may still be bad), and every event was recorded with
            # gradients on (a no_grad forward in training mode, pseudo-labels or a target
            # network's, reaches no gradient and may poison BatchNorm's statistics: those events
            # are still looked at). A value recorded as non-finite there is one a module made on
            # purpose and the step absorbed (masked logits, masked_fill(-inf) before a
            # cross-entropy): it was given as every good step's answer.
            ids = {id(p) for p in rec.guarded}
            if all(id(p) in ids for p in self.model.parameters() if p.requires_grad):
                return None
        if loss is None and rec.origin is not None:
            return rec.origin
        flags = list(rec.flags)
        # The loss is computed after the last forward (micro-batch) and before the backward that
        # follows it: with gradient accumulation, not at the first backward (a NaN made in a later
        # micro-batch's forward was reported as the loss's).
        cut = len(flags)
        if rec.first_backward is not None:
            cut = next((i + 1 for i in range(len(rec.meta) - 1, -1, -1) if rec.meta[i][0] != "grad"), 0)
        loss_at = None
        if loss is not None:
            if not isinstance(loss, torch.Tensor):
                try:  # of a dict (a model's outputs): "Could not infer dtype of dict", naming nothing
                    loss = torch.as_tensor(loss)
                except (TypeError, ValueError, RuntimeError):
                    raise ArgumentTypeError(f"gradguard.NanTracer.first_nonfinite: `loss` must be a tensor or a "
                                            f"number (the loss itself, e.g. outputs.loss), got {type(loss).__name__}"
                                            ) from None
            elif loss.device.type == "meta":
                raise ValueError("gradguard.NanTracer.first_nonfinite: `loss` is a meta tensor, which holds no value")
            with torch.no_grad():
                flags.insert(cut, torch.linalg.vector_norm(loss.detach().to(torch.float64), _INF)
                             if loss.numel() else loss.new_zeros((), dtype=torch.float64))
            loss_at = cut
        i = _first_bad(flags)
        if i is None:
            return self._param_grad_origin(rec) if rec.first_backward is not None else None
        if loss_at is not None:
            if i == loss_at:
                origin = Origin(phase="loss", module="", where="loss", kind=nonfinite_kind(loss.detach()))
                return self._finish(rec, origin, cache=False)
            if i > loss_at:
                i -= 1
        return self._finish(rec, self._describe(rec, i), cache=loss is None)

    def _finish(self, rec, origin: Origin, cache: bool = True) -> Origin:
        if rec.op is not None and origin.op is None and origin.phase != "input" and _op_fits(rec.op[2], origin):
            origin.op, origin.op_inputs_finite, origin.op_module = rec.op
        if cache:
            rec.origin = origin
        self.last_origin = origin
        return origin

    def _describe(self, rec, i) -> Origin:
        self._rec_op = rec.op  # a replay's whole-step op checker already answered
        kind, frame, leaf, ref, version, site = rec.meta[i]
        t = ref() if isinstance(ref, weakref.ref) else ref
        if t is not None and version is not None and _version(t) != version:
            t = None
        what = nonfinite_kind(t) if t is not None else ("NaN" if math.isnan(float(rec.flags[i])) else "Inf")
        rows = bad_rows(t, self.batch_dim, rec.batch_size) if t is not None else None
        if kind == "grad":
            consumers = [c.name for c in site.consumers]
            where, submodule = "gradient", None
            candidates = []
            if consumers:
                # The first module that took the tensor itself, not only passed it on to one that
                # did (the model, named "" like the loss, when the input requires grad): consumers
                # that are an ancestor of another are left out.
                passed_on = {id(a) for c in site.consumers for a in _ancestors(c)}
                takers = [c.name for c in site.consumers if id(c) not in passed_on]
                module = takers[0]
                # Siblings that each took it (a residual, attention's q/k/v): its gradient is the
                # sum of theirs, and a hook sees only the sum, so any of them may have made it. A
                # model output that a module also took: the loss's backward is one of them.
                candidates = list(dict.fromkeys(takers)) if len(set(takers)) > 1 or site.model_output else []
            elif site.producer is not None and site.producer.parent is not None and not site.model_output:
                # No module took the tensor: the code of the producer's parent did. When that
                # parent is the model itself, its name is "" like the loss's: say which it is.
                module = site.producer.parent.name
                if module == "":
                    where, submodule = "code gradient", site.producer.name
            else:
                module = ""  # the model's output: the loss's backward made it non-finite
            return Origin(phase="backward", module=module, where=where, kind=what, rows=rows,
                          batch_size=rec.batch_size, consumers=consumers, submodule=submodule,
                          candidates=candidates if consumers else [],
                          loss_too=bool(consumers) and bool(site.model_output))
        path = _leaf_path(frame, leaf) if kind == "input" else None
        if kind == "input" and frame.parent is None:
            return Origin(phase="input", module="", where="input", call=frame.call, kind=what, tensor=path,
                          rows=rows, batch_size=rec.batch_size)
        if kind == "input":
            origin = Origin(phase="forward", module=frame.parent.name, where="code", call=frame.call, kind=what,
                            rows=rows, batch_size=rec.batch_size, submodule=frame.name)
            self._find_op(origin, frame.parent)
            return origin
        origin = Origin(phase="forward", module=frame.name, where="output", call=frame.call,
                        module_call=frame.module_call, kind=what, rows=rows, batch_size=rec.batch_size)
        bad, peak = [], None
        for pname, p in frame.module.named_parameters(recurse=False):
            if not checkable(p):
                continue
            if not bool(torch.isfinite(p).all()):
                bad.append(f"`{pname}`")
            else:
                m = float(p.detach().abs().max())
                peak = m if peak is None else max(peak, m)
        origin.bad_params, origin.max_param = bad, peak
        self._find_op(origin, frame)
        return origin

    def _find_op(self, origin: Origin, frame: _Call) -> None:
        """Re-runs one module call on its recorded inputs under the op checker (bad step only)."""
        if not self.check_ops or origin.op is not None or self._rec_op is not None:
            return
        inputs = frame.inputs()
        if inputs is None:
            return
        args, kwargs = inputs
        # A NaN at the module's output: the op that made a NaN, not one before it that made a
        # -inf the module then clamped away (clamp(log(relu(x))) before a z / z named aten.log).
        found = self._run_checked(lambda: frame.module(*args, **kwargs), frame, want_nan=origin.kind == "NaN")
        if found is not None:
            origin.op, origin.op_inputs_finite, origin.op_module = found

    def _run_checked(self, fn, frame, want_nan: bool = False):
        stack, quiet = self._stack, self._quiet
        self._stack, self._quiet = [], True
        checker = FirstNonfiniteOp(lambda: next((n for n in reversed(self._stack) if n), None), want_nan=want_nan)
        state = _rng_state()
        # Asking must not change the model: a re-run in training mode updates BatchNorm's running
        # statistics (and any stateful module's buffers) a second time with the same batch. Those
        # the re-run changed are put back, the others left alone (not even a version bump).
        buffers = [(b, b._version, b.clone()) for b in frame.module.buffers()]
        try:
            ctx = torch.autocast(frame.autocast[0], dtype=frame.autocast[1]) if frame.autocast else _nullctx()
            with torch.enable_grad(), ctx, checker:
                fn()
        except Exception:  # a best-effort look closer: the report stands without it
            return None
        finally:
            _set_rng_state(state)
            self._stack, self._quiet = stack, quiet
            with torch.no_grad():
                for b, version, saved in buffers:
                    # BatchNorm's kernel updates its running statistics without a version bump.
                    if b._version != version or not torch.equal(b, saved):
                        b.copy_(saved)
        return checker.found

    def _param_grad_origin(self, rec):
        """Every hooked gradient was finite: look at the parameters' own gradients (bad step
        only, or a step whose gradients the guard found bad), in module order: as the guard's
        report counted them when a GradGuard ended the step (its "zero" mode, or a zero_grad()
        since, cleaned the live ones), else (a parameter of no guard's, or no guard) the live
        ones."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1
        counts = {}
        if rec.report is not None and rec.judged is not None:
            host = rec.report._fetch()  # one read (once per report)
            counts = {id(p): (nan, inf) for p, nan, inf in zip(rec.judged(), host["nan"], host["inf"])}
        params = [(mname, pname, p) for mod, mname in self._names.items()
                  for pname, p in mod.named_parameters(recurse=False)]
        # The live gradients no report counted: their NaN/Inf counts from one stats pass (the raw
        # counts all_finite reads; no norms) and one read (a read per parameter cost one sync each
        # on every good step). A DTensor's local shard: this rank's answer, with no collective
        # (another rank may not be asking).
        live = [p for _, _, p in params if id(p) not in counts and p.grad is not None and checkable(p.grad)]
        if live:
            raw = _raw_of([_distributed._local(p.grad) if _distributed.is_dtensor(p.grad) else p.grad.detach()
                           for p in live], math.inf, None)
            both = torch.stack([raw.nan_count, raw.inf_count]).tolist()
            counts.update({id(p): (nan, inf) for p, nan, inf in zip(live, both[0], both[1])})
        for mname, pname, p in params:
            nan, inf = counts.get(id(p), (0, 0))
            if nan or inf:
                kind = "NaN and Inf" if nan and inf else ("NaN" if nan else "Inf")
                full = f"{mname}.{pname}" if mname else pname
                return self._finish(rec, Origin(phase="backward", module=mname, where="parameter gradient",
                                                kind=kind, tensor=full, distributed=dist))
        return None

    # ---- on_failure: replay a bad step -----------------------------------------------------------

    def replay(self, fn, *args, backward=None, **kwargs) -> Origin | None:
        """Re-runs ``fn(*args, **kwargs)`` (the step's forward and backward, without the optimizer
        step) traced, from the RNG state saved by ``begin_step()`` (or by the GradGuard step that
        just ended), and returns ``first_nonfinite()`` for it. The model's ``.grad`` and buffers
        (BatchNorm statistics) are restored afterwards; the RNG continues where it was.
        ``backward``: call ``.backward()`` on the loss ``fn`` returns (a tensor, a dict with
        ``"loss"`` or an object with ``.loss``); ``None``: only when ``fn`` did not run one."""
        if not callable(fn):
            raise TypeError(f"gradguard.NanTracer.replay: `fn` must be callable, got {type(fn).__name__}")
        snap = self._rng_done if self._ended and self._rng_done is not None else self._rng
        params = [p for p in self.model.parameters()]
        grads = [p.grad for p in params]
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        current = _rng_state()
        attached = bool(self._handles)
        self._rec.release()
        rec = self._rec = _Record()
        self._stack, self._keep, self._removed = [], True, False
        checker = FirstNonfiniteOp(lambda: next((f.name for f in reversed(self._stack) if isinstance(f, _Call)),
                                                None)) if self.check_ops else _nullctx()
        loss = None
        try:
            for p in params:
                p.grad = None
            _set_rng_state(snap)
            self._attach()
            with torch._dynamo.config.patch(disable=True), checker:
                out = fn(*args, **kwargs)
                loss = _loss_of(out)
                do_backward = backward if backward is not None else rec.first_backward is None
                if do_backward and loss is not None and loss.requires_grad:
                    loss.backward()
            if self.check_ops:
                rec.op = checker.found
            origin = self.first_nonfinite(loss=loss)
            rec.replay_origin = origin
        finally:
            rec.release()
            if self._rec is rec:
                # The replay's record answers for the step it replayed, until the next step
                # boundary; the next step records into a fresh one (it appended to this one,
                # whose cached answer it then gave).
                rec.step = self._gen
                self._last = rec
                self._rec = _Record()
            self._keep = self.keep_tensors
            if not attached:
                self._detach()
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in zip(params, grads):
                p.grad = g
            _set_rng_state(current)
        self.last_origin = origin
        return origin


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ancestors(frame):
    while frame.parent is not None:
        frame = frame.parent
        yield frame


def _min_max(t: torch.Tensor):
    """Both are finite exactly when every element is (min and max propagate NaN; an Inf is an
    extreme). One fast reduction op: max-abs (the inf-norm) is a slow path on the CPU, and a sum
    would call a large finite tensor non-finite. Detached: builds no graph, needs no no_grad()
    context (which costs more than the op)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return torch.aminmax(t)


def _op_fits(op_module, origin: Origin) -> bool:
    """Whether a replay's first non-finite op can be the origin's: one that ran inside the
    origin's module (or a submodule of it) for a forward origin, outside every module (autograd's
    backward, the loss's code) for a backward or loss one. An op elsewhere made a value that did
    not reach the origin (a log's -inf clamped away in another module): named, the answer read
    "the first non-finite gradient appeared in the backward of `bad`; first non-finite op: aten.log
    in `sl`"."""
    if origin.phase != "forward":
        return op_module is None
    return origin.module == "" or op_module is not None and (
        op_module == origin.module or op_module.startswith(origin.module + "."))


def _first_bad(flags):
    """Index of the first non-finite flag: one read from the device, or None."""
    if not flags:
        return None
    by_device: dict = {}
    for f in flags:
        by_device.setdefault(f.device, []).append(f.reshape(()))
    if len(by_device) == 1:
        allf = torch.stack(flags)
    else:  # a model split over devices: bring the flags together in one order
        allf = torch.stack([f.to(flags[0].device, non_blocking=True).double() for f in flags])
    bad = ~torch.isfinite(allf)
    idx = torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1)
    i = int(idx)
    return None if i < 0 else i


def _leaf_path(frame, leaf) -> str | None:
    """The input's name: ``[0]`` for the first positional argument, ``['mask']`` for a keyword."""
    if frame.spec is None:
        return f"[{leaf}]"
    path = tree_flatten_with_path(tree_unflatten([0] * frame.spec.num_leaves, frame.spec))[0][leaf][0]
    return keystr(path[1:] if frame.kw else path)


def _loss_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
