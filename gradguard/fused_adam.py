"""The clip of a guarded fused Adam/AdamW step on the CPU, without PyTorch's write-back of the grads.

A guard that clips a fused optimizer hands it ``grad_scale`` (the GradScaler contract). PyTorch's fused Adam kernel then divides every gradient by it *and stores the result
back to .grad*: a write pass over the gradients, 0.14-0.20x of the whole step on the GPT-2-small
list, and the reason a clipping guarded step cost 1.43x the bare step instead of the bare step
plus the guard's one read (README, "Guarded optimizer step").

``gradguard::fused_adam_readonly_grads_`` (csrc/cpu/adam_readonly_grads_cpu.cpp) is PyTorch's CPU
kernel, operation for operation, without that store: parameters and optimizer state come out
bit-identical, and ``.grad`` keeps the gradient as backward left it. While the inner step runs,
``torch._fused_adam_``/``torch._fused_adamw_`` are wrappers that hand the call carrying the
guard's ``grad_scale`` to it; everything else (state creation, the step counts, the grouping,
other devices, other callers) stays PyTorch's own code.

Trusted only where checked: the first time a configuration (dtype, Adam or AdamW, maximize,
weight decay or not, which branch of the ``lerp``) is met, both kernels step a probe (every
length around the vector widths, special values included; with fixed hyperparameters of the same
branches and with the call's own) and PyTorch's kernel keeps the call, write-back and all, unless
every bit agrees. Another torch release or build whose arithmetic differs therefore costs speed,
never a bit of the result. Not taken (PyTorch's kernel as before): amsgrad, tensors that do not
share one dense layout with their parameter, any device but the CPU, a build without the CPU
kernels; and, from GradGuard, steps under GradScaler (its contract is unscaled grads after the
step, which PyTorch's kernel writes back for it) and float64 parameters (the guard clips those in
place by the float64 multiplier, exactly; ``grad_scale`` is float32). float32, float16 and
bfloat16 parameters are taken.
"""
from __future__ import annotations

import struct
import threading

import torch

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_verdicts: dict = {}  # configuration -> bool: the probe agreed with PyTorch's kernel bit for bit


_ready: list = []  # [bool] once known: the extension's load state does not change after import


def _kernel_ready() -> bool:
    if not _ready:
        from gradguard import _extension

        _ready.append(bool(_extension._state["loaded"]) and torch._C._dispatch_has_kernel_for_dispatch_key(
            "gradguard::fused_adam_readonly_grads_", "CPU"))
    return _ready[0]


def takes(optimizer) -> bool:
    """Whether `optimizer`'s fused steps can take the read-only-grads kernel at all (the per-call
    checks come later): a fused Adam/AdamW without amsgrad, with the CPU kernels built."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # AdamW subclasses Adam from torch 2.7
        return False
    if any(not g.get("fused") or g.get("amsgrad") or g.get("differentiable") for g in optimizer.param_groups):
        return False
    return _kernel_ready()


def _kernel():
    """The kernel as a function (args of the op) -> True, or False having touched nothing when it
    cannot take the lists. The CPU module's helper calls the op typed from C++ (torch.ops converts
    the five lists to IValues: ~270 us at 1,000 parameters) and asks first; through torch.ops a
    refusal is an exception. A function, so that tests can put a wrong kernel in its place."""
    from gradguard import _C

    helper = getattr(_C, "fused_adam_readonly_grads", None)
    if helper is not None:
        return helper

    def via_ops(*args) -> bool:
        try:
            torch.ops.gradguard.fused_adam_readonly_grads_(*args)
        except RuntimeError:  # refused before it wrote anything
            return False
        return True
    return via_ops


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def _probe_agrees(key, hyper) -> bool:
    """Steps a probe with PyTorch's kernel and with ours, once per hyperparameter set in `hyper`
    ((lr, beta1, beta2, weight_decay, eps) tuples); True when parameters and both moments agree
    in every bit (NaNs agree as NaN) and our grads are untouched, every time."""
    dtype, decoupled, maximize = key[0], key[1], key[2]
    fi = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    # Every length around AVX2/AVX-512 vector widths (and their 64-byte parallel units), so that
    # both a vector body and a scalar tail of either width are compared.
    sizes = list(range(0, 40)) + [63, 64, 65, 127, 129, 1031]
    total = sum(sizes)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), fi.max, fi.tiny, fi.tiny / 8],
                           dtype=dtype)

    def draw(scale, nonneg=False):
        x = torch.randn(total, generator=gen, dtype=dtype) * scale
        pick = torch.rand(total, generator=gen) < 0.02
        x[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=gen)]
        return x.abs() if nonneg else x

    # float32 whatever the default dtype: PyTorch's fused steps and grad_scale are float32.
    steps = [torch.tensor(float(1 + i % 5), dtype=torch.float32) for i in range(len(sizes))]
    grad_scale = torch.tensor(1.7, dtype=torch.float32)
    func = torch.ops.aten._fused_adamw_.default if decoupled else torch.ops.aten._fused_adam_.default
    for lr, beta1, beta2, weight_decay, eps in hyper:
        lists = [list(f.split(sizes)) for f in (draw(1.0), draw(3.0), draw(0.1), draw(0.01, nonneg=True))]
        ref = [[t.clone() for t in lst] for lst in lists]
        mine = [[t.clone() for t in lst] for lst in lists]
        func(ref[0], ref[1], ref[2], ref[3], [], steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
             eps=eps, amsgrad=False, maximize=maximize, grad_scale=grad_scale, found_inf=None)
        if not _kernel()(mine[0], mine[1], mine[2], mine[3], steps, lr, beta1, beta2, weight_decay, eps, maximize,
                         decoupled, grad_scale, None):
            return False
        for k in (0, 2, 3):
            x, y = torch.cat(ref[k]), torch.cat(mine[k])
            if not bool(((_bits(x) == _bits(y)) | (x.isnan() & y.isnan())).all()):
                return False
        if not all(torch.equal(_bits(x), _bits(y)) for x, y in zip(lists[1], mine[1])):  # grads untouched
            return False
    return True


def _in_dtype(x: float, dtype) -> float:
    """`x` in the kernels' arithmetic type: float32 for every dtype but float64 (PyTorch's opmath
    of float16/bfloat16 is float32)."""
    return x if dtype == torch.float64 else struct.unpack("f", struct.pack("f", x))[0]


def config_key(dtype, decoupled: bool, maximize: bool, weight_decay: float, beta1: float) -> tuple:
    """What decides which operations the kernels run (not the values they run on): the lerp's
    branch is taken on 1 - beta1 rounded to the kernels' arithmetic type, as they do."""
    return (dtype, bool(decoupled), bool(maximize), weight_decay != 0, abs(_in_dtype(1 - beta1, dtype)) < 0.5)


def _canonical(key) -> tuple:
    """Hyperparameters with no degenerate value (lr 0 would leave the update unchecked) that take
    the same branches as `key`."""
    return (1e-3, 0.9 if key[4] else 0.3, 0.999, 0.01 if key[3] else 0.0, 1e-8)


def _agrees(dtype, decoupled, lr, beta1, beta2, weight_decay, eps, maximize) -> bool:
    """The verdict for this configuration, probed on its first call: with fixed hyperparameters
    of the same branches and with this call's own (unless its lr is 0)."""
    key = config_key(dtype, decoupled, maximize, weight_decay, beta1)
    verdict = _verdicts.get(key)
    if verdict is None:
        hyper = [_canonical(key)] + ([(lr, beta1, beta2, weight_decay, eps)] if lr != 0 else [])
        verdict = _probe_agrees(key, hyper)
        _verdicts[key] = verdict
    return verdict


def last_step() -> dict | None:
    """What the last guarded step of this thread that could use the kernel did: ``{"taken": n,
    "declined": m}``, the calls of PyTorch's fused function it ran through gradguard's kernel and
    those it left to PyTorch's (a configuration whose probe disagreed, a layout the kernel does not
    take); None before any."""
    return getattr(_local, "last", None)


_NAMES = ("_fused_adam_", "_fused_adamw_")
_lock = threading.Lock()
_installed: dict = {}  # name -> the function it replaced, while any guard's step is inside
_active = [0]
_local = threading.local()  # .context: this thread's innermost ReadOnlyGrads; .last: see last_step()


def _wrapper(name: str):
    decoupled = name == "_fused_adamw_"

    def call(*args, **kwargs):
        context = getattr(_local, "context", None)
        if context is not None and kwargs.get("grad_scale") is context.grad_scale:
            if _run(decoupled, context.grad_scale, args, kwargs):
                context.taken += 1
                return None
            context.declined += 1
        # What it replaced (a reference kept past the step: the function torch had at import).
        return (_installed.get(name) or _ORIGINAL[name])(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"torch.{name}, or gradguard's read-only-grads kernel for a guard's grad_scale (gradguard.fused_adam)"
    return call


_ORIGINAL = {name: getattr(torch, name) for name in _NAMES}
_WRAPPERS = {name: _wrapper(name) for name in _NAMES}


class ReadOnlyGrads:
    """While active, the ``torch._fused_adam_``/``_fused_adamw_`` call handed `grad_scale` (this very
    tensor) runs ``gradguard::fused_adam_readonly_grads_`` where that is bit-identical; any other
    call, from this thread or another, runs the function it would have.

    Why the two functions are replaced for the duration and not intercepted with a
    ``TorchFunctionMode``: a mode sees every torch call of the step (four per parameter in
    ``Adam._init_group``), which cost 550 us per step at 52 parameters; the swap costs two
    attribute writes. torch.optim looks them up on the ``torch`` module at each call."""

    def __init__(self, grad_scale: torch.Tensor):
        self.grad_scale = grad_scale
        self.taken = self.declined = 0

    def __enter__(self):
        with _lock:
            if _active[0] == 0:
                for name in _NAMES:
                    current = getattr(torch, name)
                    _installed[name] = _ORIGINAL[name] if current is _WRAPPERS[name] else current
                    setattr(torch, name, _WRAPPERS[name])
            _active[0] += 1
        self._outer = getattr(_local, "context", None)
        _local.context = self
        return self

    def __exit__(self, *exc):
        _local.context = self._outer
        _local.last = {"taken": self.taken, "declined": self.declined}
        with _lock:
            _active[0] -= 1
            if _active[0] == 0:
                for name in _NAMES:
                    replaced = _installed.pop(name)
                    # Someone else's patch made during the step stays (it calls through to ours,
                    # which then calls what we replaced).
                    if getattr(torch, name) is _WRAPPERS[name]:
                        setattr(torch, name, replaced)
        return False


def _run(decoupled: bool, grad_scale: torch.Tensor, args, kwargs) -> bool:
    """Runs the call through gradguard's kernel if it can take it; False: PyTorch's must."""
    if len(args) != 6 or kwargs.get("amsgrad") or args[4]:
        return False
    params, grads, exp_avgs, exp_avg_sqs, _, steps = args
    if not params:
        return False
    dtype = params[0].dtype
    if dtype not in _DTYPES or params[0].device.type != "cpu" or grad_scale.device.type != "cpu":
        return False
    lr = kwargs["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.device.type != "cpu":
            return False
        lr = lr.item()  # PyTorch's CPU kernel reads a tensor lr on the host too
    numbers = [lr, kwargs["beta1"], kwargs["beta2"], kwargs["weight_decay"], kwargs["eps"]]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return False
    lr, beta1, beta2, wd, eps = (float(x) for x in numbers)
    maximize = bool(kwargs["maximize"])
    if not _agrees(dtype, decoupled, lr, beta1, beta2, wd, eps, maximize):
        return False
    # False (nothing written) where the kernel does not take the lists: PyTorch's then does.
    return _kernel()(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps, maximize, decoupled,
                     grad_scale, kwargs.get("found_inf"))
