"""gradguard::fused_adam_readonly_grads_ and the guard's use of it (gradguard/fused_adam.py): PyTorch's
CPU fused Adam/AdamW step handed grad_scale, bit for bit, without writing the divided gradients
back to .grad; used only where a probe found it bit-identical, PyTorch's kernel otherwise."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import gradguard
from gradguard import GradGuard, fused_adam

needs_kernel = pytest.mark.skipif(not fused_adam._kernel_ready(), reason="needs the compiled CPU kernels")

# The wheel whose kernel csrc/cpu/adam_readonly_grads_cpu.cpp was read from and checked against: there
# the probe must agree (elsewhere it may refuse, and PyTorch's kernel keeps the step).
CHECKED_TORCH = fused_adam._kernel_ready() and torch.__version__.startswith("2.13.") and torch.backends.cpu.get_cpu_capability() in ("AVX2",
                                                                                                       "AVX512")
SIZES = [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 65, 1031, 100003]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def same_bits(a, b):  # every bit, NaN payloads and signs included
    return torch.equal(bits(a), bits(b))


def lists(dtype, seed=0, special=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for scale, nonneg in ((1.0, False), (3.0, False), (0.1, False), (0.01, True)):
        ts = [(torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype) for n in SIZES]
        if special:
            fi = torch.finfo(dtype)
            vals = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), fi.max, fi.tiny, fi.tiny / 4],
                                dtype=dtype)
            for t in ts:
                pick = torch.rand(t.shape, generator=g) < 0.05
                t[pick] = vals[torch.randint(0, len(vals), (int(pick.sum()),), generator=g)]
        out.append([t.abs() if nonneg else t for t in ts])
    return out


def both_kernels(dtype, decoupled, maximize, wd, beta1, grad_scale=2.5, special=False, found=None, lr=1e-3):
    ref = lists(dtype, special=special)
    mine = [[t.clone() for t in lst] for lst in ref]
    grads_before = [t.clone() for t in ref[1]]
    steps = [torch.tensor(float(1 + i % 4)) for i in range(len(SIZES))]
    gs = torch.tensor(grad_scale)
    found_t = None if found is None else torch.tensor(found)
    func = torch._fused_adamw_ if decoupled else torch._fused_adam_
    func(ref[0], ref[1], ref[2], ref[3], [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=0.999, weight_decay=wd,
         eps=1e-8, maximize=maximize, grad_scale=gs, found_inf=found_t)
    torch.ops.gradguard.fused_adam_readonly_grads_(mine[0], mine[1], mine[2], mine[3], steps, lr, beta1, 0.999, wd,
                                                   1e-8, maximize, decoupled, gs, found_t)
    return ref, mine, grads_before


CONFIGS = list(itertools.product(DTYPES, [True, False], [False, True], [0.0, 0.05], [0.9, 0.3]))


@needs_kernel
@pytest.mark.skipif(not CHECKED_TORCH, reason="the arithmetic was read from torch 2.13's x86 wheel")
@pytest.mark.parametrize("dtype,decoupled,maximize,wd,beta1", CONFIGS)
def test_kernel_is_pytorchs_step_bit_for_bit_without_the_write_back(dtype, decoupled, maximize, wd, beta1):
    for special, gs in ((False, 2.5), (True, 2.5), (True, 1e-30), (True, 0.0), (True, float("inf"))):
        ref, mine, before = both_kernels(dtype, decoupled, maximize, wd, beta1, grad_scale=gs, special=special)
        for k in (0, 2, 3):  # params, exp_avg, exp_avg_sq
            for a, b in zip(ref[k], mine[k]):
                assert same_bits(a, b), (k, a.numel(), special, gs)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(mine[1], before))  # grads: not written
        assert not all(same_bits(a, b) for a, b in zip(ref[1], before))  # PyTorch's kernel did write them


@needs_kernel
def test_found_inf_one_skips_the_whole_step_zero_takes_it():
    ref, mine, _ = both_kernels(torch.float32, True, False, 0.01, 0.9, found=1.0)
    untouched = lists(torch.float32)
    for k in (0, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(mine[k], untouched[k]))
    ref, mine, _ = both_kernels(torch.float32, True, False, 0.01, 0.9, found=0.0)
    assert not torch.equal(mine[0][-1], untouched[0][-1])
    if CHECKED_TORCH:
        assert all(torch.equal(a, b) for a, b in zip(ref[0], mine[0]))


@pytest.mark.parametrize("kernel", [pytest.param("op", marks=needs_kernel), "reference"])
def test_kernel_refuses_what_it_cannot_take_before_writing_anything(kernel):
    # The reference (aten's fused kernel on a copy of the grads) checked nothing: a gradient
    # shorter than its parameter was read past its end (a wrong update, or a segmentation fault).
    from gradguard import reference  # noqa: PLC0415

    op = torch.ops.gradguard.fused_adam_readonly_grads_ if kernel == "op" else reference.fused_adam_readonly_grads_
    p, g, m, v = (torch.randn(10) for _ in range(4))
    keep = p.clone()
    s = [torch.tensor(1.0)]
    args = (1e-3, 0.9, 0.999, 0.0, 1e-8, False, True)
    with pytest.raises(RuntimeError, match="fused_adam_readonly_grads_: tensor 0 of grads.* differs from its "
                       "parameter in device, dtype, size or layout"):
        op([p], [torch.randn(20)[::2]], [m], [v], s, *args, torch.tensor(1.0), None)
    with pytest.raises(RuntimeError, match="fused_adam_readonly_grads_: float32, float64, float16 or bfloat16"):
        c = [x.to(torch.complex64) for x in (p, g, m, v)]
        op([c[0]], [c[1]], [c[2]], [c[3]], s, *args, torch.tensor(1.0), None)
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element float32"):
        op([p], [g], [m], [v], s, *args, torch.tensor(1.0, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element float32"):
        op([p], [g], [m], [v], s, *args, torch.tensor([1.0, 100.0]), None)
    with pytest.raises(RuntimeError, match="tensor 0 of grads/exp_avgs/exp_avg_sqs differs from its parameter"):
        op([p], [torch.randn(3)], [m], [v], s, *args, torch.tensor(1.0), None)
    with pytest.raises(RuntimeError, match="tensor 1 of grads/exp_avgs/exp_avg_sqs differs from its parameter"):
        op([p, p.clone()], [g, torch.randn(3)], [m, m.clone()], [v, v.clone()], s * 2, *args, torch.tensor(2.0), None)
    assert torch.equal(p, keep)  # the second tensor's size error came before the first was stepped
    # What it takes: a transposed parameter with its grads and moments strided alike (the
    # reference's layout check called a method Tensor does not have), stepped as aten's kernel.
    pt, gt, mt, vt = (torch.randn(4, 3).t() for _ in range(4))
    vt.abs_()
    want = pt.clone()
    torch.ops.aten._fused_adamw_.default([want], [gt.clone()], [mt.clone()], [vt.clone()], [], [torch.tensor(1.0)],
                                         lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                                         maximize=False, grad_scale=torch.tensor(2.0), found_inf=None)
    op([pt], [gt], [mt], [vt], [torch.tensor(1.0)], *args, torch.tensor(2.0), None)
    if kernel == "reference" or CHECKED_TORCH:  # the compiled kernel's bits were read from torch 2.13
        assert torch.equal(pt, want)
    else:
        torch.testing.assert_close(pt, want, rtol=1e-6, atol=0)


@needs_kernel
def test_probe_catches_a_kernel_that_differs_in_one_tail_element(monkeypatch):
    real = fused_adam._kernel()

    def off_by_one_ulp(params, *rest):
        took = real(params, *rest)
        last = params[-1]
        last[-1] = torch.nextafter(last[-1], torch.tensor(float("inf"), dtype=last.dtype))
        return took

    monkeypatch.setattr(fused_adam, "_kernel", lambda: off_by_one_ulp)
    monkeypatch.setattr(fused_adam, "_verdicts", {})
    assert not fused_adam._agrees(torch.float32, True, 1e-3, 0.9, 0.999, 0.01, 1e-8, False)


POISONED = 4


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5))


def run_guarded(monkeypatch, use_kernel, opt_cls, opt_kw, guard_kw, steps=8, scaler=False, dtype=torch.float32):
    """Parameters, optimizer state, guard history and the grads left after each step."""
    model = make_model().to(dtype)
    opt = GradGuard(opt_cls(model.parameters(), fused=True, **opt_kw), hygiene=False, **guard_kw)
    opt._cpu_readonly_adam = use_kernel
    amp = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler else None
    g = torch.Generator().manual_seed(1)
    left, took = [], []
    for i in range(steps):
        x = torch.randn(16, 12, generator=g) * (30.0 if i % 3 == 1 else 1.0)  # some steps clip
        if i == POISONED:
            x[0, 0] = float("nan")  # a skipped step (a zeroed one in "zero" mode)
        opt.zero_grad()
        fused_adam._local.last = None
        loss = model(x.to(dtype)).float().pow(2).mean()
        if amp is not None:
            amp.scale(loss).backward()
            amp.step(opt)
            amp.update()
        else:
            loss.backward()
            opt.step()
        left.append([p.grad.clone() for p in model.parameters()])
        took.append(fused_adam.last_step())
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.optimizer.state_dict()["state"]),
            opt.history.as_dict(), left, took)


GUARDED = [
    (torch.optim.AdamW, {"lr": 1e-2}, {"max_norm": 1.0}),
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}, {"max_norm": 0.5, "norm_type": 1.0}),
    (torch.optim.AdamW, {"lr": torch.tensor(1e-2), "betas": (0.3, 0.99)}, {"max_norm": 1.0,
                                                                          "spike": gradguard.ZScoreClip(warmup=2)}),
    (torch.optim.Adam, {"lr": 1e-2}, {"max_norm": 0.5, "on_nonfinite": "zero"}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("opt_cls,opt_kw,guard_kw", GUARDED)
def test_guarded_steps_are_bit_identical_with_and_without_the_kernel(monkeypatch, opt_cls, opt_kw, guard_kw, scaler,
                                                                     dtype):
    if scaler and dtype != torch.float32:
        pytest.skip("GradScaler is for float32 parameters")
    with_k = run_guarded(monkeypatch, True, opt_cls, opt_kw, copy.deepcopy(guard_kw), scaler=scaler, dtype=dtype)
    without = run_guarded(monkeypatch, False, opt_cls, opt_kw, copy.deepcopy(guard_kw), scaler=scaler, dtype=dtype)
    for a, b in zip(with_k[0], without[0]):
        assert torch.equal(bits(a), bits(b))
    for k in with_k[1]:
        for name in with_k[1][k]:
            assert torch.equal(with_k[1][k][name], without[1][k][name]), (k, name)
    assert repr(with_k[2]) == repr(without[2])  # repr: NaN == NaN
    assert any(with_k[2]["skipped"]) or guard_kw.get("on_nonfinite") == "zero"  # "zero" steps with the NaN zeroed
    assert any(c < 1.0 for c in with_k[2]["clip_coef"])
    clipped = [i for i, c in enumerate(with_k[2]["clip_coef"]) if i not in (0, POISONED) and c < 1.0]
    assert clipped
    assert all(t is None for t in without[4])  # the guard with the kernel off never entered it
    if scaler:
        # Under GradScaler PyTorch's kernel keeps the step (and writes the unscaled grads back,
        # GradScaler's contract): the same grads either way.
        assert all(t is None for t in with_k[4])
        for i in range(len(with_k[3])):
            assert all(same_bits(a, b) for a, b in zip(with_k[3][i], without[3][i]))
    elif CHECKED_TORCH:
        # A clipped step left .grad as backward made it on the kernel's path only. Not the first
        # step: with no optimizer state yet it is decided on the host and clipped in place.
        for i in clipped:
            assert with_k[4][i] == {"taken": 1, "declined": 0}, (i, with_k[4][i])
            assert not all(torch.equal(a, b) for a, b in zip(with_k[3][i], without[3][i]))


@needs_kernel
def test_a_probe_that_disagrees_keeps_pytorchs_kernel_and_its_write_back(monkeypatch):
    monkeypatch.setattr(fused_adam, "_verdicts", {})
    monkeypatch.setattr(fused_adam, "_probe_agrees", lambda *a: False)
    model = make_model()
    opt = GradGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1e-3, hygiene=False)
    model(torch.randn(4, 12)).sum().backward()
    opt.step()  # the first step makes the state (decided on the host, no clip through the kernel needed)
    opt.zero_grad()
    model(torch.randn(4, 12)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert float(opt.last.clip_coef) < 1.0 and fused_adam.last_step() == {"taken": 0, "declined": 1}
    coef = float(opt.last.clip_coef)
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-5, atol=0)  # PyTorch's write-back


def test_only_the_guards_own_grad_scale_is_redirected():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(4, 12)).sum().backward()
    opt.grad_scale = torch.tensor(4.0)  # someone else's (a GradScaler's): PyTorch's kernel, write-back
    before = [p.grad.clone() for p in model.parameters()]
    with fused_adam.ReadOnlyGrads(torch.tensor(4.0)):
        opt.step()
    del opt.grad_scale
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g / 4.0)


def test_torch_functions_are_pytorchs_again_after_the_step_even_one_that_raises():
    originals = (torch._fused_adam_, torch._fused_adamw_)
    with fused_adam.ReadOnlyGrads(torch.tensor(1.0)):
        assert torch._fused_adamw_ is not originals[1]
        with fused_adam.ReadOnlyGrads(torch.tensor(2.0)):  # nested (a guard inside a guard's closure)
            pass
        assert torch._fused_adamw_ is not originals[1]
    assert (torch._fused_adam_, torch._fused_adamw_) == originals
    with pytest.raises(ValueError):
        with fused_adam.ReadOnlyGrads(torch.tensor(1.0)):
            raise ValueError
    assert (torch._fused_adam_, torch._fused_adamw_) == originals


def test_another_threads_call_during_a_guarded_step_runs_pytorchs_kernel():
    import threading

    seen = []
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(4, 12)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    gs = torch.tensor(4.0)
    with fused_adam.ReadOnlyGrads(gs):
        def other():
            opt.grad_scale = gs  # the guard's tensor, but not this thread's guard
            opt.step()
            del opt.grad_scale
            seen.append(True)
        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=30)
    assert seen
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g / 4.0)  # PyTorch's kernel wrote them back


def test_reference_kernel_and_compiled_kernel_agree_and_opcheck_passes():
    from gradguard import reference

    ref = lists(torch.float32, special=True)
    mine = [[t.clone() for t in lst] for lst in ref]
    before = [t.clone() for t in ref[1]]
    steps = [torch.tensor(3.0) for _ in SIZES]
    gs = torch.tensor(1.5)
    reference.fused_adam_readonly_grads_(ref[0], ref[1], ref[2], ref[3], steps, 1e-3, 0.9, 0.999, 0.01, 1e-8, False,
                                         True, gs, None)
    torch.ops.gradguard.fused_adam_readonly_grads_(mine[0], mine[1], mine[2], mine[3], steps, 1e-3, 0.9, 0.999, 0.01,
                                                   1e-8, False, True, gs, None)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ref[1], before))  # the reference writes no grad
    if CHECKED_TORCH:
        for k in (0, 2, 3):
            assert all(same_bits(a, b) for a, b in zip(ref[k], mine[k]))
    small = lists(torch.float32)
    args = ([t[:40].clone() for t in small[0][-3:]], [t[:40].clone() for t in small[1][-3:]],
            [t[:40].clone() for t in small[2][-3:]], [t[:40].clone() for t in small[3][-3:]],
            [torch.tensor(2.0) for _ in range(3)], 1e-3, 0.9, 0.999, 0.0, 1e-8, False, False, gs, None)
    torch.library.opcheck(torch.ops.gradguard.fused_adam_readonly_grads_.default, args)


@needs_kernel
@pytest.mark.skipif(not CHECKED_TORCH, reason="the arithmetic was read from torch 2.13's x86 wheel")
@pytest.mark.parametrize("dtype", DTYPES)
def test_hyperparameters_other_than_the_probes_stay_bit_identical(dtype):
    # Among them three learning rates where float64 AdamW's decay 1 - lr * wd, rounded twice,
    # differed from PyTorch's (gcc fused it into one FMA there).
    g = torch.Generator().manual_seed(3)
    lrs = [0.0055825666144976305, 0.008616939768709142, 0.005066066077473175]
    lrs += (torch.rand(40, generator=g, dtype=torch.float64) * 0.02).tolist()
    for k, lr in enumerate(lrs):
        beta1 = 0.5 + 0.49 * k / len(lrs)
        beta2 = 0.9 + 0.0999 * (k % 7) / 7
        decoupled, wd = k % 2 == 0, (0.0, 0.1, 1e-4)[k % 3]
        ref, mine, _ = both_kernels(dtype, decoupled, k % 5 == 0, wd, beta1, grad_scale=1.0 + k / 10, lr=lr)
        for i in (0, 2, 3):
            assert all(same_bits(a, b) for a, b in zip(ref[i], mine[i])), (lr, beta1, decoupled, wd, i)


@needs_kernel
def test_a_first_call_with_lr_0_does_not_leave_the_update_unchecked(monkeypatch):
    real = fused_adam._kernel()

    def wrong_update(params, grads, ms, vs, steps, lr, *rest):
        took = real(params, grads, ms, vs, steps, lr, *rest)
        if lr != 0:  # a kernel whose update is off (at lr 0 there is no update to be off)
            for p in params:
                p.mul_(1 + 2 ** -20)
        return took

    monkeypatch.setattr(fused_adam, "_kernel", lambda: wrong_update)
    monkeypatch.setattr(fused_adam, "_verdicts", {})
    assert not fused_adam._agrees(torch.float32, True, 0.0, 0.9, 0.999, 0.01, 1e-8, False)


@needs_kernel
def test_the_probe_ignores_the_default_dtype(monkeypatch):
    monkeypatch.setattr(fused_adam, "_verdicts", {})
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        verdict = fused_adam._agrees(torch.float32, True, 1e-3, 0.9, 0.999, 0.01, 1e-8, False)
    finally:
        torch.set_default_dtype(old)
    assert verdict == CHECKED_TORCH or verdict


def test_the_lerp_branch_is_keyed_in_the_parameters_dtype():
    beta1 = 0.5 + 2.0 ** -27  # 1 - beta1 < 0.5 rounds to 0.5 in float32: the kernels' "not small" branch
    assert fused_adam.config_key(torch.float32, True, False, 0.0, beta1)[4] is False
    assert fused_adam.config_key(torch.float64, True, False, 0.0, beta1)[4] is True
    # float16/bfloat16 steps compute in float32 (PyTorch's opmath): keyed as float32.
    assert fused_adam.config_key(torch.float16, True, False, 0.0, beta1)[4] is False
    assert fused_adam.config_key(torch.bfloat16, True, False, 0.0, beta1)[4] is False


@needs_kernel
def test_channels_last_weights_take_the_kernel_and_mismatched_layouts_are_declined(monkeypatch):
    def run(use_kernel):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 4, 3))
        model = model.to(memory_format=torch.channels_last)
        opt = GradGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1e-2, hygiene=False)
        opt._cpu_readonly_adam = use_kernel
        g = torch.Generator().manual_seed(1)
        took = []
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(2, 3, 9, 9, generator=g).to(memory_format=torch.channels_last)).sum().backward()
            fused_adam._local.last = None
            opt.step()
            took.append(fused_adam.last_step())
        return [p.detach().clone() for p in model.parameters()], took

    with_k, took = run(True)
    without, _ = run(False)
    assert not with_k[0].is_contiguous()  # the conv weights really are channels_last
    assert all(torch.equal(a, b) for a, b in zip(with_k, without))
    if CHECKED_TORCH:
        assert took[1:] == [{"taken": 1, "declined": 0}] * 3
    # A grad whose strides differ from its parameter's: declined (PyTorch's kernel), no exception.
    p = torch.nn.Parameter(torch.randn(4, 6))
    p.grad = torch.randn(6, 4).t()
    opt = torch.optim.AdamW([p], lr=1e-2, fused=True)
    opt.step()
    gs = torch.tensor(2.0)
    opt.grad_scale = gs
    with fused_adam.ReadOnlyGrads(gs) as ctx:
        opt.step()
    del opt.grad_scale
    assert (ctx.taken, ctx.declined) == (0, 1)
